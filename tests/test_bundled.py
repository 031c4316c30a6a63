"""The model shipped inside the package: it loads, predicts, and still meets the accuracy recorded in it."""

import math


from legointerp.checkpoint import bundled_path, load_model
from legointerp.evaluate import accuracy_by_position, test_batch as fresh_sentences
from legointerp.train import TrainConfig, read_log


def test_bundled_model_meets_its_recorded_accuracy_on_fresh_sentences():
    model, task, checkpoint = load_model()  # no path: the bundled model
    recorded = checkpoint.accuracy
    assert recorded is not None and len(recorded) == task.config.n == 12
    assert min(recorded) >= 0.99, "the bundled model must solve every chain position"
    size, recorded_size = 3000, TrainConfig.from_dict(checkpoint.train_config).eval_size
    # a fixed seed, none of training's (its test set is seed + 7919): the test cannot flip from run to run
    fresh = accuracy_by_position(model, fresh_sentences(task, size, seed=424_242))
    for k, (now, then) in enumerate(zip(fresh.tolist(), recorded)):
        # four standard errors of the difference of two binomial estimates (the recorded one is itself a sample of
        # eval_size sentences, taken when early stopping saw every position pass: biased upwards), at least half a point
        pooled = (now + then) / 2
        tolerance = max(0.005, 4 * math.sqrt(pooled * (1 - pooled) * (1 / size + 1 / recorded_size)))
        assert now >= then - tolerance, f"position {k}: {now:.4f} on fresh sentences vs {then:.4f} recorded"


def test_bundled_model_records_how_it_was_made():
    _, _, checkpoint = load_model()
    assert checkpoint.provenance["command"].startswith("legointerp train")
    assert "--seed" in checkpoint.provenance["command"]
    assert checkpoint.provenance["seed"] == TrainConfig.from_dict(checkpoint.train_config).seed
    log = read_log(bundled_path())
    assert log and log[-1]["accuracy"] == checkpoint.accuracy


def test_bundled_model_predicts_a_typed_sentence():
    model, task, _ = load_model()
    sentence = task.parse("a=+1; b=-a; c=+b; d=-c; e=-d; f=+e")
    batch = task.encode([sentence])
    logits = model(batch.tokens, batch.attention_mask)
    assert logits.shape == (1, task.n_ctx, task.n_classes)

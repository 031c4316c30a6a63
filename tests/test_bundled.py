"""The model shipped inside the package: it loads, predicts, and still meets the accuracy recorded in it."""

import json
import math
import re
from pathlib import Path

import torch

from legointerp.checkpoint import bundled_path, load_checkpoint, load_model, weights_digest
from legointerp.files import BUNDLED_FILES, shipped_folder
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


def test_shipped_models_carry_the_checksum_of_their_weights():
    for name in BUNDLED_FILES:
        payload = torch.load(bundled_path(name), weights_only=True)
        assert payload["sha256"] == weights_digest(payload["state_dict"])  # so a flipped byte in a copy is refused


# a folder of some machine at the start of a path, not inside a relative path or a URL
MACHINE_PATH = re.compile(r"(?<![\w.~:/])/(?:work|root|home|tmp|Users|mnt|scratch|opt|var)/")


def test_nothing_shipped_carries_a_machine_path():
    root = Path(__file__).resolve().parents[1]
    texts = {str(path): path.read_text() for path in [*shipped_folder().glob("*.jsonl"), *(root / "docs").rglob("*.json"),
                                                      *(root / "docs").rglob("*.md"), root / "README.md"]}
    texts |= {f"{name}'s provenance": json.dumps(load_checkpoint(name).provenance) for name in BUNDLED_FILES}
    assert len(texts) > len(BUNDLED_FILES) + 2
    found = {where: match.group() for where, text in texts.items() if (match := MACHINE_PATH.search(text))}
    assert not found, f"absolute paths of the machine that made them: {found}"

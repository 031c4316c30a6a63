"""Shortcut detection gives the known answer on models built to count and to follow the chain, says
"inconclusive" where there is nothing to find, and each piece of evidence reads what it should."""

import json

import pytest
import torch

from legointerp import zoo
from legointerp.checkpoint import Checkpoint, load_model, resolve, save_checkpoint
from legointerp.cli import main
from legointerp.evaluate import test_batch as fresh_sentences
from legointerp.shortcut import (_earlier, _verdict, detect_shortcut, first_learned, is_abelian, learned_level,
                                 middle_depths, rewire_last, training_order, validate_log)
from legointerp.task import LegoError, LegoTask, TaskConfig
from legointerp.train import read_log
from tests.conftest import small_model


def test_middle_depths_are_the_second_half_before_the_end():
    assert middle_depths(12) == [5, 6, 7, 8, 9, 10]
    assert middle_depths(6) == [2, 3, 4]


def test_learning_order_comes_from_leaving_chance_not_a_fixed_bar():
    """A partial shortcut: the last position reaches only 0.75, but before the middle ones leave chance."""
    log = [{"samples": 100, "accuracy": [0.95, 0.5, 0.5, 0.51]},
           {"samples": 200, "accuracy": [0.99, 0.52, 0.55, 0.75]},
           {"samples": 300, "accuracy": [0.99, 0.7, 0.99, 0.75]}]
    level = learned_level(2)
    assert level == pytest.approx(0.625)
    learned = first_learned(log, level)
    assert learned == [100, 300, 300, 200]
    assert _earlier(learned[-1], learned[1:3]) is True
    assert _earlier(None, learned[1:3]) is None  # never learned: no evidence either way


def test_training_order_abstains_where_the_curriculum_admitted_the_last_position_late():
    """An untrained last position drifts across the level (0.7 at 200) before the curriculum admits it (at 300)."""
    log = [{"samples": 100, "longest_chain": 2, "accuracy": [0.95, 0.6, 0.5, 0.5]},
           {"samples": 200, "longest_chain": 3, "accuracy": [0.99, 0.9, 0.7, 0.7]},
           {"samples": 300, "longest_chain": 4, "accuracy": [0.99, 0.99, 0.9, 0.55]},
           {"samples": 400, "longest_chain": 4, "accuracy": [0.99, 0.99, 0.99, 0.9]}]
    level = learned_level(2)
    assert first_learned(log, level) == [100, 200, 200, 400]  # not 200: position 3 was not trained then
    says, why = training_order(log, level, [1, 2])
    assert says is None and "cannot tell" in why
    early = [{**row, "longest_chain": 4} for row in log]  # every position trained from the start: the vote counts
    assert first_learned(early, level) == [100, 200, 200, 200]
    assert training_order(early, level, [1, 2]) == (False, "")
    assert training_order(read_log("bundled"), level, middle_depths(12))[0] is None


@pytest.mark.parametrize("row", [{"samples": 1}, {"accuracy": [0.5] * 4}, {"samples": 1, "accuracy": [0.5] * 3},
                                 {"samples": 1, "accuracy": "high"}, "not a row",
                                 {"samples": 1, "accuracy": [0.5] * 4, "longest_chain": "4"}])
def test_a_damaged_log_row_is_named(row):
    with pytest.raises(LegoError, match="row 2"):
        validate_log([{"samples": 1, "accuracy": [0.5] * 4}, row], 4)


@pytest.mark.parametrize("votes, learned, verdict", [([True, True, False, None, None], True, "shortcut"),
                                                     ([False, False, True, None, False], True, "no shortcut"),
                                                     ([True, False, None, None, None], True, "inconclusive"),
                                                     ([True, True, True, True, True], False, "inconclusive")])
def test_verdict_needs_two_votes_a_majority_and_a_learned_last_variable(votes, learned, verdict):
    assert _verdict(votes, learned) == verdict


def test_rewired_sentences_make_the_chain_and_the_count_disagree_by_the_solver():
    task = LegoTask(TaskConfig())
    batch = fresh_sentences(task, 64, seed=1)
    tokens, chain_value, usable = rewire_last(task, batch, torch.Generator().manual_seed(0))
    assert usable.float().mean() > 0.9
    for b in torch.nonzero(usable).flatten()[:16].tolist():
        text = task.to_text(tokens[b])
        last = task.vocab[int(batch.tokens[b, batch.clause_pos[b, -1]])]
        solved = task.solve(task.parse(text))[last]  # the exact solver, independent of rewire_last's arithmetic
        assert solved == task.group.literal_names[int(chain_value[b])]
        assert solved != task.group.literal_names[int(batch.values[b, -1])]  # the count's answer
    assert is_abelian(task) and not is_abelian(LegoTask(TaskConfig(group="task2")))


@pytest.fixture(scope="module")
def verdicts():
    results = {}
    for name in ("chain-follower", "counter-at-last", "counter-at-bos", "untrained-bert"):
        model = zoo.build(name)
        results[name] = (model, detect_shortcut(model.model, fresh_sentences(model.task, 240, seed=2), model.task,
                                                attention_samples=48, patching_samples=24))
    return results


@pytest.mark.parametrize("name", ["chain-follower", "counter-at-last", "counter-at-bos"])
def test_zoo_verdicts_are_the_known_mechanism(verdicts, name):
    model, result = verdicts[name]
    assert result.verdict == ("shortcut" if model.shortcut else "no shortcut"), result.evidence.to_string()
    votes = result.evidence.set_index("evidence")["shortcut"]
    for evidence in ("counterfactual", "probes", "attention", "patching"):  # no log: training order abstains
        assert votes[evidence] == model.shortcut, (evidence, result.evidence.to_string())


def test_a_count_gathered_at_bos_is_found_where_it_is(verdicts):
    _, result = verdicts["counter-at-bos"]
    reading = result.evidence.set_index("evidence").loc["attention", "reading"]
    assert "at BOS" in reading and "L0H3" in reading
    assert result.through_chain[11] < 0.1  # BOS is not held clean: the flipped sign reaches the count


def test_an_untrained_model_is_inconclusive(verdicts):
    _, result = verdicts["untrained-bert"]
    assert result.verdict == "inconclusive" and result.last_accuracy < learned_level(2)


def test_bundled_model_follows_the_chain():
    model, task, _ = load_model()
    result = detect_shortcut(model, fresh_sentences(task, 300, seed=7), task, log=read_log(resolve("bundled")),
                             attention_samples=64, patching_samples=32)
    assert result.verdict == "no shortcut", result.evidence.to_string()
    assert result.counterfactual["chain"] > 0.7 and result.through_chain[11] > 0.9


def test_non_abelian_groups_have_no_counting_shortcut_to_test():
    task = LegoTask(TaskConfig(group="task2", n=6))
    result = detect_shortcut(small_model(task), fresh_sentences(task, 120), task, attention_samples=16, patching_samples=8)
    row = result.evidence.set_index("evidence").loc["counterfactual"]
    assert row["shortcut"] is None and "not abelian" in row["reading"] and result.counterfactual is None


def test_shortcut_result_exports(verdicts):
    _, result = verdicts["counter-at-bos"]
    assert list(result.to_frame()["evidence"]) == ["counterfactual", "training order", "probes", "attention", "patching"]
    document = json.loads(json.dumps(result.to_dict()))
    assert document["verdict"] == "shortcut" and len(document["resolution_layers"]) == 12
    figure = result.plot()
    assert "shortcut" in figure.layout.title.text and len(figure.data) >= 5
    # at write_image's default 700 px a third of the width holds ~26 characters of a 12 px subplot title per line
    assert all(len(line) <= 26 for note in figure.layout.annotations for line in note.text.split("<br>"))


def test_shortcut_figure_says_why_a_panel_or_bar_is_empty(verdicts):
    from dataclasses import replace

    _, result = verdicts["counter-at-bos"]
    assert result.learned_at is None  # no training log beside a zoo model
    figure = replace(result, through_chain={6: None, 7: 0.0, 8: 0.5}, counterfactual=None,
                     resolution_layer=[1, None] + result.resolution_layer[2:]).plot()
    notes = [note.text for note in figure.layout.annotations]
    assert "no training log" in notes and any(note.startswith("not applicable") for note in notes)
    assert all(len(line) <= 26 for note in notes for line in note.split("<br>"))
    bars = [trace for trace in figure.data if trace.type == "bar"]
    assert list(bars[-1].text) == ["no effect", "0.00", "0.50"]  # a score of 0 draws no bar: its number shows
    assert list(bars[0].text)[:2] == ["", "never"]  # the probes' panel: depth 1 never resolved


def test_shortcut_command_prints_json_and_refuses_short_chains(capsys, tmp_path):
    task = LegoTask(TaskConfig(n=6))
    model = small_model(task)
    ckpt = save_checkpoint(Checkpoint(model_config=model.cfg, task_config=task.config, state_dict=model.state_dict()),
                           tmp_path / "model.pt")
    assert main(["shortcut", "--ckpt", str(ckpt), "--samples", "200", "--format", "json",
                 "--plot", str(tmp_path / "s.html")]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["verdict"] == "inconclusive"  # an untrained model learned nothing to detect
    assert document["evidence"][1]["shortcut"] is None  # no training log beside this checkpoint
    assert (tmp_path / "s.html").read_text().count("plotly-graph-div") == 1

    short = LegoTask(TaskConfig(n=3))
    model = small_model(short)
    ckpt = save_checkpoint(Checkpoint(model_config=model.cfg, task_config=short.config, state_dict=model.state_dict()),
                           tmp_path / "short.pt")
    assert main(["shortcut", "--ckpt", str(ckpt), "--samples", "50"]) == 2
    assert "at least 4 clauses" in capsys.readouterr().err


def test_shipped_shortcut_model_counts_and_is_found():
    """The second shipped model (2 layers, n = 8: too shallow to follow the chain) learned the last variable by
    counting: rewired so that chain and count disagree, it answers the count; the detector says shortcut."""
    model, task, _ = load_model("bundled-shortcut")
    batch = fresh_sentences(task, 600, seed=8)
    result = detect_shortcut(model, batch, task, log=read_log("bundled-shortcut"), attention_samples=64, patching_samples=32)
    assert result.counterfactual["count"] > 0.7 and result.verdict == "shortcut", result.evidence.to_string()
    votes = result.evidence.set_index("evidence")["shortcut"]
    assert votes.loc[["training order", "probes"]].tolist() == [True, True]

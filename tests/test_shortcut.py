"""Shortcut detection: each piece of evidence reads what it should, and the verdict separates the two regimes."""

import json

import pytest
import torch

from legointerp.checkpoint import load_model, resolve
from legointerp.cli import main
from legointerp.evaluate import test_batch as fresh_sentences
from legointerp.shortcut import (OPERATOR_BREADTH, OPERATOR_LIFT, _verdict, detect_shortcut, first_passes,
                                 middle_depths, operator_attention)
from legointerp.train import read_log
from tests.conftest import small_model


def test_middle_depths_are_the_second_half_before_the_end():
    assert middle_depths(12) == [5, 6, 7, 8, 9, 10]
    assert middle_depths(6) == [2, 3, 4]


def test_first_passes_reads_the_log_in_order():
    log = [{"samples": 100, "accuracy": [0.95, 0.5, 0.5]},
           {"samples": 200, "accuracy": [0.99, 0.6, 0.92]},
           {"samples": 300, "accuracy": [0.99, 0.89, 0.97]}]
    assert first_passes(log) == [100, None, 200]
    assert first_passes(log, threshold=0.85) == [100, 300, 200]


@pytest.mark.parametrize("votes, verdict", [([True, True, False, None], "shortcut"),
                                            ([False, False, True, False], "no shortcut"),
                                            ([True, False, None, None], "inconclusive"),
                                            ([True, None, None, None], "inconclusive"),
                                            ([True, True, False, False], "inconclusive")])
def test_verdict_needs_two_votes_and_a_majority(votes, verdict):
    assert _verdict(votes) == verdict


def planted_operator_heads(task, batch):
    """Layer 0: head 0 spreads every query's attention evenly over all operator tokens (counting signs);
    head 1 sends each variable to its own clause's operator only (reading its operand's sign); the rest self."""
    B, T = batch.tokens.shape
    n = batch.values.shape[1]
    rows = torch.arange(B)[:, None]
    counting = torch.zeros(B, T, T)
    counting[rows, :, batch.clause_pos + 2] = 1 / n
    local = torch.eye(T).repeat(B, 1, 1)
    local[rows, batch.clause_pos] = 0
    local[rows, batch.clause_pos, batch.clause_pos + 2] = 1
    others = torch.eye(T).expand(B, 2, T, T)
    return torch.cat([counting[:, None], local[:, None], others], dim=1)  # (B, H, T, T)


def test_operator_attention_tells_counting_from_reading_one_operator(task):
    model = small_model(task, n_layers=2)
    batch = task.sample(32, torch.Generator().manual_seed(0))
    planted = planted_operator_heads(task, batch)
    model.add_hook("blocks.0.attn.hook_pattern", lambda pattern, hook: planted, is_permanent=True)
    frame = operator_attention(model, batch, middle_depths(task.config.n)).set_index(["layer", "head"])
    counting, local = frame.loc[(0, 0)], frame.loc[(0, 1)]
    n = task.config.n
    assert counting["last_lift"] == pytest.approx(1.0, abs=1e-5) and counting["last_breadth"] == pytest.approx(1.0, abs=1e-4)
    assert local["last_lift"] == pytest.approx(1.0, abs=1e-5) and local["last_breadth"] == pytest.approx(1 / n, abs=1e-4)
    assert frame.loc[(0, 2), "last_lift"] < 0  # attending to itself puts nothing on operators: below uniform
    assert counting["last_breadth"] >= OPERATOR_BREADTH > local["last_breadth"] and counting["last_lift"] >= OPERATOR_LIFT


@pytest.fixture(scope="module")
def regimes():
    """The shipped chain-following model and the shipped shortcut-regime model, each with its verdict."""
    results = {}
    for name in ("bundled", "bundled-shortcut"):
        model, task, _ = load_model(name)
        batch = fresh_sentences(task, 800, seed=7)
        results[name] = detect_shortcut(model, batch, task, log=read_log(resolve(name)), attention_samples=200,
                                        patching_samples=100)
    return results


def test_chain_following_model_has_no_shortcut(regimes):
    chain = regimes["bundled"]
    assert chain.verdict == "no shortcut", chain.evidence.to_string()
    assert chain.through_chain[11] > 0.9  # the chain carries the flipped sign to the last variable


def test_shortcut_regime_model_never_learned_the_last_variable(regimes):
    """The shipped shortcut-regime model (#0-#4 and #11 supervised, the tiny recipe with its curriculum) learned to
    follow the chain and extrapolates a little past #4, but #11 stayed at chance: no shortcut, and no evidence for
    one. A model that does take the shortcut is still to be trained (a GPU run)."""
    regime = regimes["bundled-shortcut"]
    assert None not in regime.passed_at[:5] and regime.passed_at[:5] == sorted(regime.passed_at[:5])
    assert regime.passed_at[11] is None and regime.resolution_layer[11] is None
    assert regime.verdict == "no shortcut", regime.evidence.to_string()


def test_shortcut_result_exports(regimes):
    result = regimes["bundled-shortcut"]
    frame = result.to_frame()
    assert list(frame["evidence"]) == ["training order", "probes", "attention", "patching"]
    document = json.loads(json.dumps(result.to_dict()))
    assert document["verdict"] == result.verdict and len(document["resolution_layers"]) == 12
    figure = result.plot()
    assert result.verdict in figure.layout.title.text and len(figure.data) >= 4


def test_shortcut_command_prints_json_and_refuses_short_chains(capsys, tmp_path):
    from legointerp.checkpoint import Checkpoint, save_checkpoint
    from legointerp.task import LegoTask, TaskConfig

    task = LegoTask(TaskConfig(n=6))
    model = small_model(task)
    ckpt = save_checkpoint(Checkpoint(model_config=model.cfg, task_config=task.config, state_dict=model.state_dict()),
                           tmp_path / "model.pt")
    assert main(["shortcut", "--ckpt", str(ckpt), "--samples", "200", "--format", "json",
                 "--plot", str(tmp_path / "s.html")]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["verdict"] in ("shortcut", "no shortcut", "inconclusive")
    assert document["evidence"][0]["shortcut"] is None  # no training log beside this checkpoint
    assert (tmp_path / "s.html").read_text().count("plotly-graph-div") == 1

    short = LegoTask(TaskConfig(n=3))
    model = small_model(short)
    ckpt = save_checkpoint(Checkpoint(model_config=model.cfg, task_config=short.config, state_dict=model.state_dict()),
                           tmp_path / "short.pt")
    assert main(["shortcut", "--ckpt", str(ckpt), "--samples", "50"]) == 2
    assert "at least 4 clauses" in capsys.readouterr().err

"""legointerp replicate: the verdict rules on runs whose outcome is set by hand, and the whole pipeline at a micro scale."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from legointerp.cli import main
import torch

from legointerp.replicate import (FINDINGS, REPLICATION_DIR, SCALES, Run, Scale, arm_config, ensure_runs, extrapolation,
                                  finding_figure, first_seed_logs, load_row, replicate, sentences_to, table_path, verdict,
                                  write_table)

MICRO = Scale("micro", n=4, n_tr=2, d_model=16, n_heads=2, n_layers=2, d_mlp=32, batch_size=8, steps=4, lr=1e-3,
              warmup=1, start_mimic_steps=0, mimic_steps=2, eval_every=2, eval_size=32, shortcut_steps=4, seeds=(0, 1), analysis_sentences=48, device="cpu")
OUTCOMES = ("yes", "partly", "no", "untestable")


def _run(arm: str, seed: int, curve: list[list[float]]) -> Run:
    """A run whose log is ``curve`` (one accuracy list per evaluation, 100 sentences apart)."""
    log = [{"step": i + 1, "samples": 100 * (i + 1), "elapsed_s": 6.0 * (i + 1), "accuracy": acc} for i, acc in enumerate(curve)]
    return Run(arm, seed, arm_config(arm, SCALES["cpu"], seed), log, Path(f"{arm}-seed{seed}.pt"))


def _runs(albert_beyond: list[float], bert_beyond: list[float], fit: float = 1.0) -> dict:
    """R1-shaped runs (cpu scale: n=6, n_tr=3): supervised #0-#2 at ``fit``, #3/#4 at the given accuracy per seed."""
    make = lambda arm, values: [_run(arm, s, [[fit] * 3 + [v, v, 0.5]]) for s, v in enumerate(values)]  # noqa: E731
    return {"albert": make("albert", albert_beyond), "bert": make("bert", bert_beyond)}


@pytest.mark.parametrize("albert, bert, fit, decision", [
    ([0.95, 0.9, 0.92, 0.93, 0.91, 0.94], [0.55, 0.6, 0.5, 0.52, 0.58, 0.54], 1.0, "holds"),  # far better, tight
    ([0.60, 0.61, 0.59, 0.62, 0.60, 0.61], [0.55, 0.56, 0.54, 0.55, 0.56, 0.55], 1.0, "smaller"),  # real but < 0.1
    ([0.55, 0.56, 0.54, 0.55, 0.56, 0.55], [0.55, 0.56, 0.55, 0.54, 0.56, 0.55], 1.0, "fails"),  # no difference
    ([0.95, 0.5, 0.92, 0.5, 0.9, 0.5], [0.55, 0.6, 0.5, 0.52, 0.58, 0.54], 1.0, "undecided"),  # too spread to tell
    ([0.95, 0.9, 0.92, 0.93, 0.91, 0.94], [0.55, 0.6, 0.5, 0.52, 0.58, 0.54], 0.7, "untestable"),  # never fitted
])
def test_extrapolation_decision_follows_the_rule(albert, bert, fit, decision):
    result = extrapolation(_runs(albert, bert, fit), "albert", "bert", [3, 4], "claim")
    assert result["decision"] == decision
    if fit == 1.0:
        assert result["effect"]["estimate"] == pytest.approx(sum(albert) / 6 - sum(bert) / 6)
    else:
        assert not result["conditions"][0]["held"] and result["effect"] is None


@pytest.mark.parametrize("decisions, expected", [
    (["holds", "holds"], "yes"), (["fails", "fails"], "no"), (["fails", "untestable"], "no"),
    (["holds", "fails"], "partly"), (["holds", "untestable"], "partly"), (["smaller"], "partly"),
    (["untestable", "undecided"], "untestable"), (["undecided"], "untestable"),
])
def test_verdict_combines_the_parts_as_its_rule_says(decisions, expected):
    assert verdict([{"decision": d} for d in decisions]) == expected


def test_a_runs_end_is_the_mean_of_its_last_evaluations():
    run = _run("albert", 0, [[0.0] * 6, [1.0] * 6, [0.8] * 6, [0.9] * 6])
    assert run.final == pytest.approx([0.9] * 6)  # (1.0 + 0.8 + 0.9) / 3; the first evaluation is left out


def test_sentences_to_reads_the_first_evaluation_where_every_supervised_position_is_there():
    run = _run("albert", 0, [[0.95, 0.5, 0.5, 0.5, 0.5, 0.5], [1.0, 0.92, 0.91, 0.5, 0.5, 0.5],
                             [1.0, 1.0, 0.995, 0.5, 0.5, 0.5]])
    assert (sentences_to(run, 0.9), sentences_to(run, 0.99), sentences_to(run, 0.999)) == (200, 300, None)
    assert sentences_to(run, 0.9, positions=[0]) == 100


def test_mimicking_on_random_data_does_not_count_as_lego_sentences():
    mimic = _run("bert-mimic", 0, [[0.5] * 6, [0.95] * 6])
    cpu = SCALES["cpu"]
    assert mimic.pretraining_sentences == cpu.mimic_steps * cpu.batch_size
    assert sentences_to(mimic, 0.9) == 200 - cpu.mimic_steps * cpu.batch_size


def test_arms_change_only_what_they_say():
    cpu = SCALES["cpu"]
    base = cpu.base()
    assert arm_config("bert", cpu, 1) == replace(base, tied=False, seed=1)
    last = arm_config("albert-last", cpu, 0)
    assert last.loss_mask().nonzero().flatten().tolist() == [0, 1, 5]
    assert arm_config("albert-depth", cpu, 0).min_depth == cpu.n_layers // 2
    assert base.norm == "post" and base.curriculum is False and base.mimic_steps == cpu.start_mimic_steps
    assert arm_config("bert-random", cpu, 0) == replace(base, tied=False, mimic_steps=0)
    # the paper's mimicking: the official loss on random data, then as many fine-tuning steps as bert-random
    mimic = arm_config("bert-mimic", cpu, 0)
    assert (mimic.mimic, mimic.mimic_data, mimic.steps - mimic.mimic_steps) == ("official", "random", cpu.steps)
    assert arm_config("albert-all", cpu, 0).loss_mask().all()


def test_arms_with_one_config_share_one_run(tmp_path):
    """At the paper scale every arm starts from random init, so bert and bert-random are one run, filed once."""
    from legointerp.replicate import _run_path
    paper, cpu = SCALES["paper"], SCALES["cpu"]
    assert _run_path(tmp_path, paper, "bert-random", 1) == _run_path(tmp_path, paper, "bert", 1) == tmp_path / "paper" / "bert-seed1.pt"
    assert _run_path(tmp_path, cpu, "bert-random", 1) != _run_path(tmp_path, cpu, "bert", 1)


def test_unrolled_runs_the_tied_block_more_times_and_refuses_untied_models():
    from legointerp.evaluate import test_batch
    from legointerp.model import ConfigError, LegoTransformer, unrolled
    from legointerp.task import LegoTask

    config = arm_config("albert", MICRO, 0)
    task = LegoTask(config.task_config())
    model = LegoTransformer(config.model_config(task)).eval()
    tokens = test_batch(task, 8, seed=0).tokens
    assert torch.equal(unrolled(model, MICRO.n_layers)(tokens), model(tokens))
    deeper = unrolled(model, 2 * MICRO.n_layers)
    assert deeper.cfg.n_layers == 2 * MICRO.n_layers and not torch.equal(deeper(tokens), model(tokens))
    with pytest.raises(ConfigError, match="weight-tied"):
        unrolled(LegoTransformer(arm_config("bert", MICRO, 0).model_config(task)), 4)


def test_the_rule_printed_is_the_rule_checked(monkeypatch):
    """A part records the text of the very Rule that decided it: change the margin and both move together."""
    import legointerp.replicate as replicate_module

    runs = _runs([0.70, 0.71, 0.69, 0.70, 0.72, 0.70], [0.55, 0.56, 0.54, 0.55, 0.56, 0.55])  # +0.15
    wide = extrapolation(runs, "albert", "bert", [3, 4], "claim")
    monkeypatch.setattr(replicate_module, "MARGIN", 0.3)
    narrow = extrapolation(runs, "albert", "bert", [3, 4], "claim")
    assert (wide["decision"], narrow["decision"]) == ("holds", "smaller")
    assert "reaches 0.1 accuracy" in wide["rule"] and "reaches 0.3 accuracy" in narrow["rule"]
    assert (wide["margin"], narrow["margin"]) == (0.1, 0.3)


def test_same_seed_and_threads_give_the_same_log_bit_for_bit(tmp_path):
    """Two trainings of one arm and seed on one thread log the same numbers (only the clock differs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    one = replace(MICRO, seeds=(0,))
    logs = []
    for folder in ("a", "b"):
        ensure_runs(["albert"], one, tmp_path / folder)
        rows = [json.loads(line) for line in (tmp_path / folder / "micro" / "albert-seed0.log.jsonl").read_text().splitlines()]
        logs.append([{k: v for k, v in row.items() if k != "elapsed_s"} for row in rows])
    torch.set_num_threads(threads)
    assert logs[0] == logs[1] and logs[0][-1]["threads"] == 1


def test_replicate_micro_scale_end_to_end(tmp_path):
    """R1 at a micro scale: trains 2 arms x 2 seeds, reuses them on a second call, writes the row, logs, figure, table."""
    runs, out = tmp_path / "runs", tmp_path / "replication"
    row = replicate("R1", MICRO, runs, out, command=f"legointerp replicate R1 --runs {runs} --out={out}")
    assert row["verdict"] in OUTCOMES
    assert row["command"] == "legointerp replicate R1 --runs runs --out=replication"  # the machine's folders are not shipped
    assert set(row["arms"]) == {"albert", "bert"} and len(row["arms"]["albert"]["final"]) == 2
    shipped = [json.loads(line) for line in (out / "logs" / "micro" / "albert-seed0.log.jsonl").read_text().splitlines()]
    assert row["arms"]["albert"]["final"][0] == pytest.approx(
        [sum(column) / len(shipped[-3:]) for column in zip(*[r["accuracy"] for r in shipped[-3:]])])
    stamps = {p: p.stat().st_mtime_ns for p in (runs / "micro").glob("*.pt")}
    assert len(stamps) == 4
    ensure_runs(["albert", "bert"], MICRO, runs)
    assert {p: p.stat().st_mtime_ns for p in (runs / "micro").glob("*.pt")} == stamps  # finished runs are not redone
    assert load_row("R1", out) == json.loads((out / "R1.json").read_text())
    figure = finding_figure(row, first_seed_logs(row, out))
    titles = [a.text for a in figure.layout.annotations]
    assert titles[:3] == ["effects and 95% intervals", "accuracy per position (mean, min-max over seeds)",
                          "more iterations at test time"] and row["verdict"] in figure.layout.title.text
    text = write_table(out).read_text()
    assert table_path(out) == tmp_path / "replication.md"
    assert "| [R1](#r1)" in text and f"**{row['verdict']}**" in text and str(tmp_path) not in text


def test_replicate_resumes_an_interrupted_run(tmp_path):
    """A run stopped half-way (a checkpoint short of the steps) is continued, not restarted."""
    runs = tmp_path / "runs"
    half = replace(MICRO, steps=2)
    ensure_runs(["albert"], replace(half, seeds=(0,)), runs)
    ensure_runs(["albert"], replace(MICRO, seeds=(0,)), runs)
    log = [json.loads(line) for line in (runs / "micro" / "albert-seed0.log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [2, 4]


@pytest.mark.parametrize("argv, message", [
    (["replicate", "R9"], "invalid choice"),
    (["replicate", "R1", "--seeds", "0"], "--seeds"),
    (["replicate", "R1", "--scale", "huge"], "invalid choice"),
])
def test_replicate_refuses_bad_options_in_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_replicate_refuses_an_out_that_is_a_file(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["replicate", "R1", "--out", str(blocker)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_every_shipped_row_redraws_from_the_shipped_logs():
    """docs/replication: each row's figure comes from its JSON and the logs beside it, with the verdict in the title."""
    rows = [load_row(key) for key in FINDINGS if (REPLICATION_DIR / f"{key}.json").is_file()]
    if not rows:
        pytest.skip("no replication rows shipped")
    for row in rows:
        figure = finding_figure(row, first_seed_logs(row))
        assert row["verdict"] in figure.layout.title.text and row["verdict"] in OUTCOMES


@pytest.mark.parametrize("scale", sorted(SCALES))
def test_every_arm_is_a_valid_config_at_every_scale(scale):
    """The paper scale is meant for a GPU that CI lacks: at least every arm's config passes validation there."""
    from legointerp.replicate import ARMS
    for arm in ARMS:
        config = arm_config(arm, SCALES[scale], 0)
        assert config.n == SCALES[scale].n and config.norm == ("pre" if arm == "shortcut" else "post")
    for finding in FINDINGS.values():
        assert set(finding.compare) | set(finding.curves) <= set(finding.arms)


def test_every_finding_runs_at_the_micro_scale(tmp_path, monkeypatch):
    """Each finding's measure, figure and table line on micro runs (outcomes are noise; the plumbing is not)."""
    import legointerp.replicate as replicate_module

    monkeypatch.setattr(replicate_module, "minilm_installed", lambda: False)  # R2's pre-trained half: untestable here
    runs, out = tmp_path / "runs", tmp_path / "replication"
    for key in FINDINGS:
        row = replicate(key, MICRO, runs, out)
        assert row["verdict"] in OUTCOMES and row["parts"]
        assert all(p["decision"] in ("holds", "smaller", "fails", "undecided", "untestable") for p in row["parts"])
        finding_figure(row, first_seed_logs(row, out))
    assert write_table(out).read_text().count("| **") == len(FINDINGS)


STOPPABLE = """
import sys
from dataclasses import replace
from pathlib import Path
from legointerp.replicate import ensure_runs
from tests.test_replicate import MICRO
ensure_runs(["albert", "bert"], replace(MICRO, steps=1_000_000, eval_every=2), Path(sys.argv[1]), jobs=2)
"""


@pytest.mark.parametrize("group", [True, False])  # Ctrl-C in a terminal signals the group; `kill -INT` the main one
def test_ctrl_c_stops_every_job_at_a_step_boundary_saved_and_starts_no_other(tmp_path, group):
    import os
    import signal
    import subprocess
    import sys
    import time

    from legointerp.train import read_log

    process = subprocess.Popen([sys.executable, "-c", STOPPABLE, str(tmp_path)], start_new_session=True,
                               env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
                               stderr=subprocess.PIPE, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    logs = lambda: sorted((tmp_path / "micro").glob("*.log.jsonl"))  # noqa: E731
    while len(logs()) < 2 and process.poll() is None:  # both jobs are training
        time.sleep(0.2)
    (os.killpg if group else os.kill)(process.pid, signal.SIGINT)
    try:
        process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"replicate --jobs 2 did not stop on SIGINT: {process.stderr.read().decode()[-2000:]}")
    assert process.returncode != 0, process.stderr.read().decode()[-2000:]
    assert [path.name for path in logs()] == ["albert-seed0.log.jsonl", "albert-seed1.log.jsonl"]  # bert never started
    for path in logs():
        checkpoint = Path(str(path).replace(".log.jsonl", ".pt"))
        assert checkpoint.is_file() and read_log(checkpoint)[-1]["step"] < 1_000_000

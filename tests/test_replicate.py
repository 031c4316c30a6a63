"""legointerp replicate: the verdict rules on runs whose outcome is set by hand, and the whole pipeline at a micro scale."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from legointerp.cli import main
from legointerp.replicate import (FINDINGS, REPLICATION_DIR, SCALES, Run, Scale, arm_config, ensure_runs, extrapolation,
                                  finding_figure, first_seed_logs, load_row, replicate, sentences_to, table_path,
                                  write_table)

MICRO = Scale("micro", n=4, n_tr=2, d_model=16, n_heads=2, n_layers=2, d_mlp=32, batch_size=8, steps=4, lr=1e-3,
              warmup=1, start_mimic_steps=0, mimic_steps=2, eval_every=2, eval_size=32, seeds=(0, 1), analysis_sentences=48, device="cpu")


def _run(arm: str, seed: int, curve: list[list[float]]) -> Run:
    """A run whose log is ``curve`` (one accuracy list per evaluation, 100 sentences apart)."""
    log = [{"step": i + 1, "samples": 100 * (i + 1), "elapsed_s": 6.0 * (i + 1), "accuracy": acc} for i, acc in enumerate(curve)]
    return Run(arm, seed, arm_config(arm, SCALES["cpu"], seed), log, Path(f"{arm}-seed{seed}.pt"))


def _runs(albert_beyond: list[float], bert_beyond: list[float], fit: float = 1.0) -> dict:
    """R1-shaped runs (cpu scale: n=6, n_tr=3): supervised #0-#2 at ``fit``, #3/#4 at the given accuracy per seed."""
    make = lambda arm, values: [_run(arm, s, [[fit] * 3 + [v, v, 0.5]]) for s, v in enumerate(values)]
    return {"albert": make("albert", albert_beyond), "bert": make("bert", bert_beyond)}


@pytest.mark.parametrize("albert, bert, fit, verdict", [
    ([0.95, 0.9, 0.92], [0.55, 0.6, 0.5], 1.0, "yes"),     # better by far on every seed
    ([0.95, 0.9, 0.52], [0.55, 0.6, 0.6], 1.0, "partly"),  # better on the mean, not on seed 2
    ([0.55, 0.6, 0.5], [0.95, 0.9, 0.92], 1.0, "no"),      # the other way round
    ([0.95, 0.9, 0.92], [0.55, 0.6, 0.5], 0.7, "no"),      # training positions never fitted: no claim either way
])
def test_extrapolation_verdict_follows_the_rule(albert, bert, fit, verdict):
    result = extrapolation(_runs(albert, bert, fit), SCALES["cpu"], "albert", "bert", [3, 4])
    assert result["verdict"] == verdict
    assert result["albert"]["values"] == pytest.approx(albert)


def test_sentences_to_reads_the_first_evaluation_where_every_supervised_position_is_there():
    run = _run("albert", 0, [[0.95, 0.5, 0.5, 0.5, 0.5, 0.5], [1.0, 0.92, 0.91, 0.5, 0.5, 0.5],
                             [1.0, 1.0, 0.995, 0.5, 0.5, 0.5]])
    assert (sentences_to(run, 0.9), sentences_to(run, 0.99), sentences_to(run, 0.999)) == (200, 300, None)


def test_arms_change_only_what_they_say():
    base = SCALES["cpu"].base()
    assert arm_config("bert", SCALES["cpu"], 1) == replace(base, tied=False, seed=1)
    last = arm_config("albert-last", SCALES["cpu"], 0)
    assert last.loss_mask().nonzero().flatten().tolist() == [0, 1, 5]
    assert arm_config("albert-depth", SCALES["cpu"], 0).min_depth == SCALES["cpu"].n_layers // 2
    assert base.norm == "post" and base.curriculum is False and base.mimic_steps == SCALES["cpu"].start_mimic_steps
    assert arm_config("albert-random", SCALES["cpu"], 0).mimic_steps == arm_config("albert-all", SCALES["cpu"], 0).mimic_steps == 0


def test_arms_with_one_config_share_one_run(tmp_path):
    """At the cpu scale every arm starts with mimicking, so albert and albert-mimic are one run, filed once."""
    from legointerp.replicate import _run_path
    cpu = SCALES["cpu"]
    assert _run_path(tmp_path, cpu, "albert-mimic", 1) == _run_path(tmp_path, cpu, "albert", 1) == tmp_path / "cpu" / "albert-seed1.pt"
    assert _run_path(tmp_path, cpu, "albert-random", 1) != _run_path(tmp_path, cpu, "albert", 1)


def test_replicate_micro_scale_end_to_end(tmp_path):
    """R1 at a micro scale: trains 2 arms x 2 seeds, reuses them on a second call, writes the row, logs, figure, table."""
    runs, out = tmp_path / "runs", tmp_path / "replication"
    row = replicate("R1", MICRO, runs, out, command=f"legointerp replicate R1 --runs {runs} --out={out}")
    assert row["verdict"] in ("yes", "partly", "no")
    assert row["command"] == "legointerp replicate R1 --runs runs --out=replication"  # the machine's folders are not shipped
    assert set(row["arms"]) == {"albert", "bert"} and len(row["arms"]["albert"]["final"]) == 2
    assert row["arms"]["albert"]["final"][0] == json.loads(
        (out / "logs" / "micro" / "albert-seed0.log.jsonl").read_text().splitlines()[-1])["accuracy"]
    stamps = {p: p.stat().st_mtime_ns for p in (runs / "micro").glob("*.pt")}
    assert len(stamps) == 4
    ensure_runs(["albert", "bert"], MICRO, runs)
    assert {p: p.stat().st_mtime_ns for p in (runs / "micro").glob("*.pt")} == stamps  # finished runs are not redone
    assert load_row("R1", out) == json.loads((out / "R1.json").read_text())
    figure = finding_figure(row, first_seed_logs(row, out))
    assert len(figure.data) == 2 + 2 * MICRO.n  # two arms' bars, then each curve panel's n positions
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
        assert row["verdict"] in figure.layout.title.text
        assert row["verdict"] in ("yes", "partly", "no")


def _shipped_runs(row: dict) -> tuple[Scale, dict]:
    """The row's scale and its runs rebuilt from the shipped logs alone (no checkpoints)."""
    scale = Scale(**{**row["scale"], "seeds": tuple(row["scale"]["seeds"])})
    logs = REPLICATION_DIR / "logs" / scale.name
    runs = {arm: [Run(arm, seed, arm_config(arm, scale, seed),
                      [json.loads(line) for line in (logs / name.replace(".pt", ".log.jsonl")).read_text().splitlines()],
                      Path(name)) for seed, name in zip(record["seeds"], record["logs"])]
            for arm, record in row["arms"].items()}
    return scale, runs


@pytest.mark.parametrize("key", ["R1", "R5", "R6"])
def test_shipped_verdicts_that_rest_on_logs_follow_from_the_shipped_logs(key):
    """R1, R5 and R6 need only the training logs: measured again from the shipped logs, they give the row's verdict,
    text and final accuracies (a row edited by hand, or logs from other runs, would fail here)."""
    if not (REPLICATION_DIR / f"{key}.json").is_file():
        pytest.skip(f"no {key} row shipped")
    row = load_row(key)
    scale, runs = _shipped_runs(row)
    verdict, ours, _ = FINDINGS[key].measure(runs, scale)
    assert (verdict, ours) == (row["verdict"], row["ours"])
    assert {arm: [run.final for run in arm_runs] for arm, arm_runs in runs.items()} == \
        {arm: record["final"] for arm, record in row["arms"].items()}


@pytest.mark.parametrize("scale", sorted(SCALES))
def test_every_arm_is_a_valid_config_at_every_scale(scale):
    """The paper scale is meant for a GPU that CI lacks: at least every arm's config passes validation there."""
    from legointerp.replicate import ARMS
    for arm in ARMS:
        config = arm_config(arm, SCALES[scale], 0)
        assert config.n == SCALES[scale].n and config.norm == "post"
    for finding in FINDINGS.values():
        assert set(finding.compare) | set(finding.curves) <= set(finding.arms)


def test_every_finding_runs_at_the_micro_scale(tmp_path):
    """Each finding's measure, figure and table line on micro runs (outcomes are noise; the plumbing is not)."""
    runs, out = tmp_path / "runs", tmp_path / "replication"
    for key in FINDINGS:
        row = replicate(key, MICRO, runs, out)
        assert row["verdict"] in ("yes", "partly", "no") and row["ours"]
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

"""Snapshots during training and the timeline of mechanisms, checked on a run whose emergence is known by construction."""

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from legointerp import timeline as timeline_module
from legointerp.checkpoint import load_checkpoint, save_checkpoint
from legointerp.cli import main
from legointerp import evaluate
from legointerp.heads import LABEL_THRESHOLD, attention_patterns
from legointerp.model import ConfigError
from legointerp.shortcut import learned_level, middle_depths
from legointerp.task import LegoTask, TaskConfig
from legointerp.timeline import Timeline, TimelineOptions, curriculum_admissions, timeline
from legointerp.train import TrainConfig, Trainer, snapshot_folder, snapshot_steps
from legointerp.zoo import chain_follower

TASK = TaskConfig(n=6, heldout_alphabet="")
RAMP = (0.0, 1 / 16, 1 / 4, 9 / 16, 1.0)  # the planted query scale over consecutive snapshots
N = TASK.n


def tiny_config(**overrides) -> TrainConfig:
    config = dict(n=4, d_model=16, n_heads=2, n_layers=2, d_mlp=32, batch_size=16, steps=12, eval_every=4,
                  eval_size=64, save_every=4, warmup=2, device="cpu")
    return TrainConfig(**{**config, **overrides})


def test_schedules_are_log_spaced_from_the_start_or_linear_and_end_at_the_last_step():
    log_spaced = snapshot_steps(TrainConfig(steps=10_000, snapshots=20))
    assert log_spaced[0] == 0 and log_spaced[-1] == 10_000 and len(log_spaced) == 20
    assert sum(step <= 100 for step in log_spaced) >= 9  # half of them in the first 1% of training
    assert snapshot_steps(TrainConfig(steps=100, snapshots=1)) == [100]
    assert snapshot_steps(TrainConfig(steps=1000, snapshot_every=300)) == [0, 300, 600, 900, 1000]
    assert snapshot_steps(TrainConfig(steps=5, snapshots=20)) == [0, 1, 2, 3, 4, 5]  # a short run: fewer
    assert snapshot_steps(TrainConfig(steps=100)) == []
    with pytest.raises(ConfigError, match="not both"):
        TrainConfig(snapshots=5, snapshot_every=10)


def test_a_run_keeps_small_snapshots_with_an_index_and_resume_keeps_the_schedule(tmp_path, one_thread):
    out = tmp_path / "run.pt"
    first = Trainer(tiny_config(steps=8, snapshots=4), out, progress=False)
    plan = first.snapshot_plan
    first.fit()
    resumed = Trainer(tiny_config(steps=12, snapshots=4), out, resume=True, progress=False)
    assert resumed.snapshot_plan == sorted(set(plan) | {12})
    final = resumed.fit()
    folder = snapshot_folder(out)
    index = [json.loads(line) for line in (folder / "index.jsonl").read_text().splitlines()]
    assert [row["step"] for row in index] == sorted(set(plan) | {12})
    assert sorted(p.name for p in folder.glob("step-*.pt")) == [row["file"] for row in index]
    last = load_checkpoint(folder / index[-1]["file"])
    assert last.train_state is None  # weights and config only
    assert last.provenance["snapshot"] == {"step": 12, "samples": 12 * 16}
    assert all(torch.equal(last.state_dict[k], final.state_dict[k]) for k in final.state_dict)
    assert (folder / index[-1]["file"]).stat().st_size < out.stat().st_size / 2  # no optimizer moments


def test_a_replaced_run_leaves_no_snapshot_of_the_old_one(tmp_path, one_thread):
    out = tmp_path / "run.pt"
    Trainer(tiny_config(snapshot_every=3), out, progress=False).fit()
    Trainer(tiny_config(steps=4, snapshots=2), out, progress=False, force=True).fit()
    assert sorted(p.name for p in snapshot_folder(out).glob("step-*.pt")) == ["step-0000000.pt", "step-0000004.pt"]
    Trainer(tiny_config(steps=4), out, progress=False, force=True).fit()
    assert not list(snapshot_folder(out).glob("step-*.pt"))


# ---------------------------------------------------------------------------- known emergence
def onset(layer: int) -> int:
    return layer - 1  # chain-step head of layer l starts growing at snapshot l - 1


def emerging_run(folder) -> list:
    """Snapshots moving from the chain-follower with every chain step switched off to the full one: head 0 of layer
    l scales its query by RAMP over snapshots onset(l) ... onset(l) + 4.  Returns the models."""
    base = chain_follower(TASK).checkpoint()
    folder.mkdir()
    rows, models = [], []
    for t in range(onset(N - 1) + len(RAMP)):
        state = {k: v.clone() for k, v in base.state_dict.items()}
        for layer in range(1, N):
            scale = RAMP[min(max(t - onset(layer), 0), len(RAMP) - 1)]
            state[f"blocks.{layer}.attn.W_Q"][0] *= scale
            state[f"blocks.{layer}.attn.b_Q"][0] *= scale
        snapshot = replace(base, state_dict=state, provenance={**base.provenance, "snapshot": {"step": t, "samples": 10 * t}})
        save_checkpoint(snapshot, folder / f"step-{t:07d}.pt")
        rows.append({"step": t, "samples": 10 * t, "file": f"step-{t:07d}.pt"})
        models.append(snapshot.build_model())
    (folder / "index.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return models


def attention_mass(pattern: torch.Tensor, queries: torch.Tensor, *keys: torch.Tensor) -> torch.Tensor:
    """(L, H) mean attention mass of ``pattern`` ((L, B, H, Q, K), :func:`attention_patterns`) from the (B, m)
    ``queries`` positions onto the (B, m) ``keys`` positions (summed over the key sets): from the chain's positions
    alone."""
    pattern = pattern.permute(1, 3, 4, 0, 2)  # (B, Q, K, L, H)
    rows = torch.arange(pattern.shape[0])[:, None]
    return sum(pattern[rows, queries, key] for key in keys).mean((0, 1))  # (B, m, L, H) -> (L, H)


def as_lift(mass: torch.Tensor, batch, keys: int = 1) -> torch.Tensor:
    """Mass on ``keys`` keys per query as a lift over a uniform head on full-length sentences."""
    uniform = keys / batch.tokens.shape[1]
    return (mass - uniform) / (1 - uniform)


def parent_lifts(pattern: torch.Tensor, batch) -> torch.Tensor:
    """(L, H) attention from each clause's variable (chain position k >= 1) to the variable of clause k - 1, which
    defines its operand, as a lift: a chain step."""
    return as_lift(attention_mass(pattern, batch.clause_pos[:, 1:], batch.clause_pos[:, :-1]), batch)


def chain_step_lifts(model, batch) -> torch.Tensor:
    """(L,) head 0 of each layer: its chain step's lift (:func:`parent_lifts`)."""
    return parent_lifts(attention_patterns(model, batch), batch)[:, 0]


@pytest.fixture(scope="module")
def emergence(tmp_path_factory):
    folder = tmp_path_factory.mktemp("emergence") / "run.snapshots"
    models = emerging_run(folder)
    options = TimelineOptions(shortcut=False)
    torch.set_num_threads(1)
    try:
        return SimpleNamespace(models=models, folder=folder, options=options, result=timeline(folder, options))
    finally:
        torch.set_num_threads(2)


def test_each_chain_step_appears_where_its_attention_crosses_the_threshold(emergence, one_thread):
    batch = evaluate.test_batch(LegoTask(TASK), emergence.options.samples, seed=emergence.options.seed)
    labels, onsets = emergence.result.labels(), emergence.result.onsets("chain step")
    measured = torch.stack([chain_step_lifts(model, batch) for model in emergence.models])  # (snapshots, L)
    for layer in range(1, N):
        lifts = measured[:, layer].tolist()
        crossed = next(t for t, lift in enumerate(lifts) if lift >= LABEL_THRESHOLD)
        assert onset(layer) < crossed < onset(layer) + len(RAMP)  # the ramp's middle, not its ends
        said = labels[f"L{layer}H0"].tolist()
        assert said.index("chain step") == crossed, (layer, lifts, said)
        assert all(label == "chain step" for label in said[crossed:])
        assert onsets[layer] == 10 * crossed  # in sentences seen: the snapshots are 10 apart
    assert np.isnan(onsets[0])  # layer 0 fetches the literal: never a chain step


def test_an_onset_is_where_a_label_stays_not_where_it_first_flickers():
    said = {1: ["diffuse", "chain step", "diffuse", "chain step", "chain step"],
            2: ["diffuse", "diffuse", "chain step", "chain step", "diffuse"]}
    rows = [{"step": t, "samples": 100 * t, "measure": "head", "layer": layer, "head": head, "position": None,
             "label": said[layer][t] if head == 1 else "inert", "value": 0.0}
            for t in range(5) for layer in said for head in (0, 1)]
    onsets = Timeline(pd.DataFrame(rows, columns=timeline_module.COLUMNS), n=4, n_classes=2).onsets("chain step")
    assert onsets[1] == 300 and np.isnan(onsets[2])  # layer 2 lost it at the last snapshot


def test_the_curriculum_admits_depth_k_where_the_log_first_trains_chains_of_k_plus_1():
    log = [{"samples": 100, "longest_chain": 2}, {"samples": 200, "longest_chain": 3}, {"samples": 300, "longest_chain": 3}]
    admitted = curriculum_admissions(log, n=4)
    assert admitted[:3].tolist() == [100, 100, 200] and np.isnan(admitted[3])
    assert curriculum_admissions([{"samples": 1, "longest_chain": 4}], n=4) is None and curriculum_admissions([], n=4) is None


def test_depth_k_accuracy_and_its_probe_rung_rise_with_the_chain_step_of_layer_k(emergence):
    result = emergence.result
    labels, accuracy, ladder = result.labels(), result.accuracy(), result.probe_ladder()
    left = result.left_chance(level=0.9)
    for depth in range(1, N):
        appears = labels.index[labels[f"L{depth}H0"] == "chain step"].min()
        assert left[depth] == appears  # depth k is answered from the snapshot its step forms
        assert accuracy.loc[accuracy.index < appears, depth].max() < 0.75
        assert ladder.loc[appears, depth] == depth + 1  # resolved right after block k, from then on
        # a probe reads the value from a partly formed step: the rung may come before the label, never before the ramp
        assert ladder.loc[ladder.index > appears, depth].eq(depth + 1).all()
        assert ladder.loc[ladder.index <= 10 * onset(depth), depth].isna().all()
    first = result.first_appearance().set_index("label")
    assert first.loc["manipulation", "step"] == 0 and first.loc["chain step", "heads"] == "L1H0"


def test_the_timeline_is_tidy_cached_and_drawn(emergence, monkeypatch, one_thread):
    result = emergence.result
    frame = result.to_frame()
    assert list(frame.columns) == timeline_module.COLUMNS
    assert set(frame["measure"]) == {"accuracy", "head", "probe"}
    assert frame.groupby("step").size().nunique() == 1  # every snapshot measured alike
    monkeypatch.setattr(timeline_module, "analyse_snapshot", lambda *a, **k: pytest.fail("a cached snapshot was recomputed"))
    again = timeline(emergence.folder, emergence.options)
    assert again.to_frame().equals(frame)
    figures = result.figures()
    assert set(figures) == {"accuracy", "heads", "probes", "chain steps"}
    formed = figures["chain steps"].data[0]  # no log, so no curriculum: the onsets come first
    assert formed.name.startswith("layer k has a chain-step head") and list(formed.x) == emergence.result.onsets("chain step")[1:].tolist()
    assert len(figures["heads"].frames) == frame["step"].nunique()
    assert {trace.name for trace in figures["accuracy"].data} >= {f"#{k}" for k in range(N)}



def test_the_command_prints_a_summary_and_csv_from_the_cache(emergence, capsys, one_thread):
    options = emergence.options
    argv = ["timeline", str(emergence.folder), "--samples", str(options.samples), "--no-shortcut", "--quiet"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "chain step" in table and max(len(line) for line in table.splitlines()) <= 120
    assert main(argv + ["--format", "csv"]) == 0
    csv = capsys.readouterr().out
    assert csv.splitlines()[0] == ",".join(timeline_module.COLUMNS)
    assert len(csv.splitlines()) == len(emergence.result.to_frame()) + 1


def snapshot_folder_with(tmp_path, index: str | None):
    folder = tmp_path / "run.snapshots"
    folder.mkdir()
    if index is not None:
        (folder / "index.jsonl").write_text(index)
    return folder


@pytest.mark.parametrize("make, says", [
    (lambda tmp: tmp / "missing", "neither a snapshot folder nor a checkpoint"),
    (lambda tmp: snapshot_folder_with(tmp, None), "has no index.jsonl"),
    (lambda tmp: snapshot_folder_with(tmp, "{\n"), "line 1 is not a snapshot row"),
    (lambda tmp: snapshot_folder_with(tmp, '{"step": 3, "samples": 9, "file": "step-3.pt"}\n'), "step-3.pt but the file is missing"),
])
def test_bad_runs_get_one_line_and_exit_2(tmp_path, capsys, make, says):
    assert main(["timeline", str(make(tmp_path)), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


# ---------------------------------------------------------------------------- a real run
SHORTCUT_RUN = Path(__file__).parent / "data" / "shortcut-run"


def test_a_real_run_in_the_shortcut_regime_turns_to_shortcut_when_the_last_position_leaves_chance(one_thread):
    """The bundled-shortcut recipe run again with --snapshots 24: its final snapshot is bit for bit the shipped
    bundled-shortcut, and its log the shipped log.  Two of its snapshots ship here: the last before the last position
    left chance (step 3452) and the first after (5088); the shipped model is the run's end (7500)."""
    sources = sorted(SHORTCUT_RUN.glob("step-*.pt")) + ["bundled-shortcut"]
    result = timeline(sources, TimelineOptions(), cache=False)
    accuracy, votes = result.accuracy(), result.votes()
    assert list(result.frame["step"].unique()) == [3452, 5088, 7500]
    level, middle = learned_level(2), middle_depths(result.n)
    last_learned = accuracy[result.n - 1] >= level
    assert not last_learned.iloc[0] and last_learned.iloc[1:].all()
    assert (accuracy.loc[last_learned, middle] < level).all().all()  # the last leaves chance before the middle ones
    assert (votes["verdict"] == np.where(last_learned, "shortcut", "inconclusive")).all()
    # the verdict's turn, checked by the behavioural vote alone: at the run's end the rewired sentences are answered
    # by the count (at 5088 the count share, ~0.7, sits at the vote's bar)
    assert votes["counterfactual"].iloc[-1] == 1.0 and votes["counterfactual"].iloc[0] != 1.0


BUNDLED_RUN = Path(__file__).parent / "data" / "bundled-run" / "model.snapshots"


def test_the_bundled_recipe_rerun_follows_its_chain_without_chain_step_heads(one_thread):
    """A rerun of the bundled recipe (seed 1, --snapshot-every 125; README's bundled-recipe check): three of its
    snapshots ship here with its log, before any depth past 0 left chance, mid-curriculum, and after every depth left
    chance.  The check's rule fails at its first part: no head of any layer is ever a chain step.  Checked here
    against the attention itself, from the chain's positions alone, and so is how the heads attend along the chain
    instead: association heads, the operand attending to its identical token, the variable of the clause defining it."""
    result = timeline(BUNDLED_RUN, TimelineOptions(probes=False, shortcut=False), cache=False)
    task = load_checkpoint(next(BUNDLED_RUN.glob("step-*.pt"))).build_task()
    batch = evaluate.test_batch(task, 120, seed=2024)
    depths = list(range(1, result.n))
    left = result.left_chance()[depths]
    assert left.notna().all()  # every depth leaves chance by the last snapshot
    assert result.onsets("chain step").isna().all() and not (result.labels() == "chain step").any().any()
    labels = result.measure("head")
    for step, path in zip(sorted(labels["step"].unique()), sorted(BUNDLED_RUN.glob("step-*.pt"))):
        pattern = attention_patterns(load_checkpoint(path).build_model(), batch)
        assert parent_lifts(pattern, batch).max() < LABEL_THRESHOLD  # no head steps along the chain
        said = labels[labels["step"] == step]
        association = said[(said["label"] == "association") & (said["layer"] >= 1)]
        where = association["layer"].to_numpy(int), association["head"].to_numpy(int)
        # a chain's operand has two identical tokens: itself and the variable of the clause defining it
        operand, parent = batch.operand_pos[:, 1:], batch.clause_pos[:, :-1]
        on_parent = attention_mass(pattern, operand, parent)[where]
        on_itself = attention_mass(pattern, operand, operand)[where]
        assert (as_lift(on_parent + on_itself, batch, keys=2) >= LABEL_THRESHOLD).all(), step
        assert (on_parent > on_itself).all(), step  # and it is the lookup: most of it on the defining variable
    assert len(association) >= result.n // 2  # at the end, in most layers
    admitted = result.admitted[depths]
    assert admitted.is_monotonic_increasing and (admitted <= left).all()  # the curriculum admits before each is answered


def test_the_report_of_a_run_with_snapshots_tells_how_it_was_learned(tmp_path, one_thread):
    out = tmp_path / "run.pt"
    Trainer(tiny_config(snapshots=3), out, progress=False).fit()
    page, plain = tmp_path / "report.html", tmp_path / "plain.html"
    common = ["--samples", "40", "--head-samples", "20", "--patch-samples", "4", "--quiet"]
    assert main(["report", "--ckpt", str(out), "--out", str(page), *common]) == 0
    text = page.read_text()
    assert "How it was learned" in text and "figure-timeline-heads" in text
    snapshot_folder(out).rename(tmp_path / "elsewhere")
    assert main(["report", "--ckpt", str(out), "--out", str(plain), *common]) == 0
    assert "How it was learned" not in plain.read_text()

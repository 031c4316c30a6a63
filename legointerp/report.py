"""One self-contained HTML page about a model: accuracy, training curves, heads, percolation, patching, shortcut.

Plotly's JavaScript is inlined once in the head and every figure can be downloaded as PNG or SVG.  circuitsvis
widgets live in an iframe (``srcdoc``): their markup is a whole document of its own, and inline it would swallow
the rest of the page (its ``<div .../>`` is not self-closing in HTML).  :func:`analyse` runs the analyses;
:func:`model_report` only lays out their results.
"""

from __future__ import annotations

import html
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from legointerp.checkpoint import Checkpoint
from legointerp.evaluate import accuracy_by_position
from legointerp.files import atomic_write
from legointerp.heads import LABEL_THRESHOLD, HeadReport, attention_view_html, classify_heads
from legointerp.patching import PatchingResult, patch
from legointerp.plots import accuracy_figure, training_curves_figure
from legointerp.probes import PercolationResult, percolation
from legointerp.shortcut import ShortcutResult, detect_shortcut
from legointerp.task import LegoBatch, LegoTask
from legointerp.timeline import Timeline
from legointerp.train import TrainConfig

WIDE_TEXT = 40  # characters: a table column with longer text is given a minimum width
TABLE_ROWS = 8  # the page shows the strongest rows; the sub-commands' --format csv give the full tables
VIEW_KINDS = ("association", "manipulation", "chain step")
ANALYSIS_STEPS = 6  # progress ticks of analyse: accuracy, heads, probes, patching, shortcut, attention views

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 2.2em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; } div.table { overflow-x: auto; }
td, th { padding: 2px 10px; border-bottom: 1px solid #eee; text-align: left; vertical-align: top; } th { background: #f6f6f6; }
td.num, th.num { text-align: right; white-space: nowrap; } td.wide { min-width: 20em; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; color: #444; font-size: 0.92em; }
dl.meta dt { font-weight: 600; } dl.meta dd { margin: 0; }
nav { font-size: 0.9em; margin: 1em 0; display: flex; flex-wrap: wrap; gap: 0.3em 1.2em; }
.read { color: #333; max-width: 60em; } .note { color: #666; font-size: 0.85em; }
.figure { margin: 1em 0; } .export { font-size: 0.8em; color: #666; margin-top: -0.3em; }
.export button { font-size: 1em; margin-left: 0.4em; cursor: pointer; }
code { background: #f4f4f4; padding: 1px 4px; border-radius: 3px; }
iframe.widget { width: 100%; height: 900px; border: 1px solid #eee; }
select { font-family: ui-monospace, monospace; font-size: 0.9em; max-width: 100%; }
"""

SCRIPT = """
function downloadFigure(id, format, filename) {
  Plotly.downloadImage(document.getElementById(id), {format: format, filename: filename, scale: format === 'png' ? 2 : 1});
}
function showSentence(select) {
  const views = JSON.parse(document.getElementById(select.dataset.views).textContent);
  document.getElementById(select.dataset.frame).srcdoc = views.shared + views.views[select.value];
}
function fitFrame(frame) {
  try {
    const doc = frame.contentDocument;
    doc.documentElement.style.overflow = 'hidden';  // no scroll bar to come and go as the frame grows
    const fit = () => {
      const bottom = Math.max(0, ...[...doc.body.children].map(child => child.getBoundingClientRect().bottom));
      frame.style.height = Math.ceil(bottom + 20) + 'px';
    };
    // the widget mounts after the load event and keeps its size after; a ResizeObserver would fire on its own
    // effect (the frame's new height) and report a loop
    [0, 300, 1500].forEach(delay => setTimeout(fit, delay));
  } catch (error) {}  // a browser that keeps the frame's document apart: it keeps its CSS height and scrolls
}
"""
START = "document.querySelectorAll('select.sentence').forEach(showSentence);"  # at the end of the body: the selects exist

WIDGET_ID = re.compile(r"circuits-vis-[0-9a-f-]+")  # circuitsvis's random id: one name makes the views' markup line up
SELF_CLOSED_DIV = re.compile(r"<div([^<>]*?)\s*/>")


@dataclass
class Section:
    title: str
    body: str  # HTML

    @property
    def anchor(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.title.lower()).strip("-")


@dataclass
class AttentionViews:
    heads: dict[str, tuple[int, int]]  # kind -> the (layer, head) scoring highest on it
    sentences: list[str]  # (k,) the sentences' text
    markup: list[str]  # (k,) circuitsvis HTML of the heads on each sentence


@dataclass
class Analyses:
    samples: int  # fresh sentences analysed
    accuracy: list[float]  # (n,) per chain position
    counts: list[int]  # (n,) sentences behind each accuracy
    supervised: list[int] | None  # chain positions the training loss saw; None: unknown
    heads: HeadReport
    views: AttentionViews
    percolation: PercolationResult
    patching: PatchingResult
    shortcut: ShortcutResult


def cell(value) -> str:
    """A table cell for people: whole numbers without decimals, thousands separated, no ``-0.000``, missing as a dash."""
    if value is None or (isinstance(value, (float, np.floating)) and np.isnan(value)):
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        if float(value).is_integer():  # a count or a layer that a missing value made a float column
            return f"{value:,.0f}"
        text = f"{value:.3f}"
        return text.lstrip("-") if float(text) == 0 else text
    if isinstance(value, (int, np.integer)):
        return f"{value:,}"
    return str(value)


def frame_html(frame: pd.DataFrame) -> str:
    """The frame as a table, numbers right-aligned, that scrolls sideways rather than widen the page."""
    # a column of sentences keeps a readable width (the table scrolls) rather than wrap a word a line
    align = ["num" if pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c])
             else "wide" if frame[c].astype(str).str.len().max() > WIDE_TEXT else "" for c in frame.columns]

    def row(cells, tag: str) -> str:
        return "<tr>" + "".join(f"<{tag} class='{a}'>{html.escape(str(v))}</{tag}>" for v, a in zip(cells, align)) + "</tr>"
    body = "".join(row(cells, "td") for cells in frame.map(cell).to_numpy())
    return f"<div class='table'><table><thead>{row([str(c).replace('_', ' ') for c in frame.columns], 'th')}</thead><tbody>{body}</tbody></table></div>"


def figure_html(figure: go.Figure, name: str) -> str:
    """The figure with its modebar camera (PNG) and buttons for PNG and SVG files named ``name``."""
    config = {"displaylogo": False, "toImageButtonOptions": {"format": "png", "scale": 2, "filename": name}}
    buttons = "".join(f'<button type="button" onclick="downloadFigure(\'figure-{name}\', \'{f}\', \'{name}\')">{f.upper()}</button>'
                      for f in ("png", "svg"))
    div = figure.to_html(full_html=False, include_plotlyjs=False, div_id=f"figure-{name}", config=config, auto_play=False)
    return f'<div class="figure">{div}<div class="export">download figure:{buttons}</div></div>'


def read(*sentences: str) -> str:
    """How to read a section, as a paragraph."""
    return f"<p class='read'>{' '.join(sentences)}</p>"


def shown_command(command: str) -> str:
    """The training command with each path cut to its file name: a folder on the trainer's machine means nothing here."""
    def short(word: str) -> str:
        option, eq, value = word.rpartition("=") if word.startswith("--") else ("", "", word)
        return option + eq + re.split(r"[\\/]", value)[-1]
    return " ".join(short(word) for word in command.split(" "))


def header_html(checkpoint: Checkpoint, log: list[dict], samples: int) -> str:
    c, t = checkpoint.model_config, checkpoint.task_config
    kind = "ALBERT-like (one block applied at every layer)" if c.tied else "BERT-like"
    rows = {"model": f"{kind} encoder: {c.n_layers} layers, d_model {c.d_model}, {c.n_heads} heads, MLP {c.d_mlp}",
            "task": f"{t.group}: chains of {t.n} clauses"}
    if log:
        last = log[-1]
        rows["training"] = f"{last['step']:,} steps, {last['samples']:,} sentences, {last['elapsed_s'] / 60:.0f} min"
    rows["analysed on"] = f"{samples:,} fresh test sentences"
    items = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in rows.items())
    commands = "<br>".join(f"<code>{html.escape(part)}</code>" for part in shown_command(checkpoint.command).split(" && "))
    return f"<dl class='meta'>{items}<dt>made by</dt><dd>{commands}</dd></dl>"


def attention_html(views: AttentionViews) -> str:
    """A sentence selector over one iframe; the widgets' shared markup (circuitsvis's bundle) is stored once."""
    markups = []
    for markup in views.markup:
        start, script, rest = WIDGET_ID.sub("widget", markup).partition("<script")
        markups.append(SELF_CLOSED_DIV.sub(r"<div\1></div>", start) + script + rest)
    shared = os.path.commonprefix(markups)
    # "<" escaped: the JSON sits inside a <script> element, which a "</script" in it would close
    payload = json.dumps({"shared": "<!DOCTYPE html>" + shared, "views": [m[len(shared):] for m in markups]}).replace("<", "\\u003c")
    options = "".join(f"<option value='{i}'>sentence {i + 1}: {html.escape(s)}</option>" for i, s in enumerate(views.sentences))
    return (f"<label>Example sentence: <select class='sentence' data-views='attention-views' data-frame='attention-frame' "
            f"onchange='showSentence(this)'>{options}</select></label>"
            f"<script type='application/json' id='attention-views'>{payload}</script>"
            f"<iframe id='attention-frame' class='widget' title='attention patterns' onload='fitFrame(this)'></iframe>")


def top_heads(report: HeadReport) -> tuple[pd.DataFrame, str]:
    """The heads' table cut to the ones that matter most, and what it shows: sorted by the first ablation drop
    column (``*drop``, the causal evidence), else by ``lift``; the drops come right after the head's name."""
    frame = report.to_frame()
    frame = frame[[c for c in frame.columns if not c.endswith("_uniform")]]
    drops = [c for c in frame.columns if c.endswith("drop")]
    key = (drops or [c for c in ("lift",) if c in frame] or [None])[0]
    numbers = [c for c in frame.select_dtypes("number").columns if c not in ("layer", "head")]
    names = [c for c in frame.columns if c not in numbers]
    frame = frame[names + drops + [c for c in numbers if c not in drops]]
    if key is not None:
        frame = frame.sort_values(key, ascending=False, kind="stable")
    shown = f"the {min(TABLE_ROWS, len(frame))} of {len(frame)} heads" + (f" with the largest {key.replace('_', ' ')}" if key else "")
    return frame.head(TABLE_ROWS), shown


def model_report(*, name: str, checkpoint: Checkpoint, log: list[dict], analyses: Analyses,
                 timeline: Timeline | None = None) -> str:
    """The HTML page from the analyses' results (no computation here); ``timeline``: the run's snapshots analysed."""
    accuracy, heads, views = analyses.accuracy, analyses.heads, analyses.views
    percolation, patching, shortcut, supervised = analyses.percolation, analyses.patching, analyses.shortcut, analyses.supervised
    chance = f"{1 / percolation.n_classes:.0%}"
    resolution = ", ".join(f"#{k}: {'-' if layer is None else layer}" for k, layer in enumerate(percolation.resolution_layer))
    linearity = "undefined" if percolation.linearity is None else f"{percolation.linearity:.2f}"
    curriculum = bool(log) and all("longest_chain" in row for row in log)
    head_table, head_rows = top_heads(heads)
    viewed = ", ".join(f"L{layer}H{head} (strongest {kind})" for kind, (layer, head) in views.heads.items())
    counting = heads.to_frame().query("label == 'operators'")
    counters = ("Heads labelled operators (attending to the other clauses' signs, as a counter does): "
                + ", ".join(f"L{r['layer']}H{r['head']} at the {r['role']} (lift {r['lift']:.2f})" for _, r in counting.iterrows()) + "."
                if len(counting) else "No head is labelled operators (attending to the other clauses' signs).")
    sections = [
        Section("Accuracy per chain position",
                read("Each bar is the share of fresh sentences whose variable at that chain position the model gets "
                     "right: #0 is the clause that reads the root literal, #k the variable k steps down the chain.",
                     f"The whisker is a 95% interval for that many sentences; chance is {chance}.",
                     "The light bar beside it is the accuracy recorded in the checkpoint when training ended.")
                + figure_html(accuracy_figure(accuracy, analyses.counts, checkpoint.accuracy), "accuracy")),
        Section("Training curves",
                read("Test accuracy of every chain position at each evaluation during training (the paper's Figure 3).",
                     "Dashed lines are positions the loss never supervised." if supervised is not None and len(supervised) < len(accuracy) else "",
                     "The grey step (right axis) is the curriculum: the longest chain in the training sentences. Test "
                     "sentences always have the full chain, so positions stay near chance while training chains are "
                     "short, and move together as the curriculum reaches them." if curriculum else "")
                + (figure_html(training_curves_figure(log, supervised), "training-curves") if log
                   else read("No training log found beside the checkpoint, so there are no curves to draw."))),
        Section("Attention heads",
                read("Each head's attention by query role and kind of key (association: identical tokens; manipulation: "
                     "the query's own clause; chain step: the clause defining the query's operand; operators: other "
                     "clauses' signs; broadcast: BOS/EOS), as a lift over a head that attends uniformly. A head is "
                     f"labelled with the kind it reaches a lift of {LABEL_THRESHOLD} on where that kind does its job; "
                     "otherwise diffuse (flat) or structured. A head that writes nothing, or whose ablation costs "
                     "nothing, is inert whatever its attention looks like (attends: what it looks like); runner-up is "
                     "the best other kind, evidence the drop that confirms the label, and a flag marks a head whose "
                     "ablation disagrees with its label.",
                     "The drop columns are the accuracy lost at the worst chain depth when the head is ablated; the "
                     "truncated drop runs only the blocks up to the head's, where later blocks cannot redo its step. "
                     "Hover a cell of the map for all of a head's scores.")
                + figure_html(heads.plot(), "heads") + frame_html(head_table)
                + f"<p class='note'>Shown: {head_rows}; <code>legointerp heads --format csv</code> gives all of them.</p>"),
        Section("Attention patterns",
                read(f"The heads {html.escape(viewed)} on one example sentence; pick another sentence above the view.",
                     "Hover a head's thumbnail to show its pattern, click it to keep it. In the pattern each row is a "
                     "token that attends (query) and each column a token attended to (key); darker is more attention, "
                     "and the number after each token is its position.")
                + attention_html(views)),
        Section("Information percolation",
                read("A linear probe per layer and chain depth reads the variable's value from the residual stream of "
                     "its token; colour is held-out probe accuracy, the right panel the same probes on a random model "
                     f"(what the probe can do alone). A chain depth is resolved at the first layer reaching "
                     f"{percolation.threshold:.0%}: {html.escape(resolution)}.",
                     f"Rank correlation of resolution layer with depth: {linearity} (1: one chain step per layer).")
                + figure_html(percolation.plot(), "percolation")),
        Section("Activation patching",
                read(f"Corruption: {html.escape(patching.corruption)}. Each cell patches the clean run's residual stream "
                     "at one (layer, position) into the corrupted run and scores the answers the corruption changes: "
                     "1 = the clean answers come back, 0 = nothing restored.",
                     f"The lower panel is a gradient estimate of each cell (integrated gradients, "
                     f"{patching.attribution_steps} steps; 1 step is plain attribution patching). Measured on these "
                     f"sentences it agrees with exact patching at Pearson r = {patching.agreement:.2f}, Spearman "
                     f"rho = {float(patching.agreements['spearman'].iloc[0]):.2f}: a screen for large effects, not the map.")
                + figure_html(patching.plot(), "patching")),
        Section(f"Shortcut detection: {shortcut.verdict}",
                read("Did the model follow the chain to the last variable, or count the minus signs (the paper's "
                     "section 4.3)? Each row is one piece of evidence and its vote (dash: unavailable); the verdict "
                     "needs two votes and a majority.", html.escape(counters),
                     "In the figure the last position is red, the middle ones blue.")
                + frame_html(shortcut.to_frame()) + figure_html(shortcut.plot(), "shortcut")),
    ]
    if timeline is not None:
        sections.append(timeline_section(timeline))
    return render(f"legointerp report: {name}", header_html(checkpoint, log, analyses.samples), sections)


def timeline_section(timeline: Timeline) -> Section:
    """"How it was learned": the analyses on every snapshot the run kept."""
    first = timeline.first_appearance()
    snapshots = timeline.frame["step"].nunique()
    figures = timeline.figures()
    return Section("How it was learned",
                   read(f"The same analyses on the {snapshots} snapshots the run kept, on one set of fresh sentences: "
                        "accuracy per chain position over training (dotted: the first snapshot where some head carries "
                        "each kind), the head map at every snapshot (slider), the probes' resolution layer per depth "
                        "(the ladder's rungs appearing) and the shortcut detector's votes.",
                        "Snapshots are log-spaced by default, so the x axes are logarithmic: early training is where "
                        "mechanisms form.")
                   + "".join(figure_html(figure, f"timeline-{name}") for name, figure in figures.items())
                   + frame_html(first)
                   + "<p class='note'>First appearance of each head kind; <code>legointerp timeline --format csv</code> "
                     "gives every measurement of every snapshot.</p>")


def render(title: str, header: str, sections: list[Section]) -> str:
    nav = "".join(f"<a href='#{s.anchor}'>{html.escape(s.title)}</a>" for s in sections)
    body = "\n".join(f"<h2 id='{s.anchor}'>{html.escape(s.title)}</h2>\n{s.body}" for s in sections)
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style><script>{get_plotlyjs()}</script><script>{SCRIPT}</script></head><body><h1>{html.escape(title)}</h1>"
            f"{header}<nav>{nav}</nav>\n{body}\n<script>{START}</script></body></html>")


def clearest_heads_by_kind(report: HeadReport, kinds=VIEW_KINDS) -> dict[str, tuple[int, int]]:
    """Kind -> the (layer, head) with the highest score of that kind (kinds the report lacks are left out)."""
    frame = report.to_frame()
    return {k: (int(frame.loc[i, "layer"]), int(frame.loc[i, "head"])) for k in kinds if k in frame
            for i in [frame[k].idxmax()]}


def clearest_heads(report: HeadReport, kinds=VIEW_KINDS) -> list[tuple[int, int]]:
    """The (layer, head) with the highest score of each kind, for attention views."""
    return list(dict.fromkeys(clearest_heads_by_kind(report, kinds).values()))


def attention_views(model, batch: LegoBatch, task: LegoTask, heads: dict[str, tuple[int, int]], sentences: int) -> AttentionViews:
    """The chosen heads on the first ``sentences`` sentences of ``batch``."""
    chosen = list(dict.fromkeys(heads.values()))
    indices = range(min(sentences, len(batch)))
    return AttentionViews(heads, [task.to_text(batch.tokens[i]) for i in indices],
                          [attention_view_html(model, batch, task, heads=chosen, index=i) for i in indices])


def analyse(model, task: LegoTask, checkpoint: Checkpoint, batch: LegoBatch, log: list[dict], *, head_samples: int,
            patch_samples: int, sentences: int = 5, progress: Callable[[], object] = lambda: None) -> Analyses:
    """Every analysis of the page on ``batch`` (the head classifier on its first ``head_samples``, patching on its
    first ``patch_samples``, attention views of its first ``sentences``); ``progress`` is called after each of
    ``ANALYSIS_STEPS`` steps."""
    accuracy = accuracy_by_position(model, batch)
    progress()
    heads = classify_heads(model, batch[:head_samples], task)
    progress()
    probes = percolation(model, batch, task)
    progress()
    patching = patch(model, batch[:patch_samples], task, corruption="sign", depth=0, heads=False)
    progress()
    shortcut = detect_shortcut(model, batch, task, log=log, probes=probes, accuracy=accuracy)
    progress()
    views = attention_views(model, batch, task, clearest_heads_by_kind(heads), sentences)
    progress()
    config = TrainConfig.from_dict(checkpoint.train_config) if checkpoint.train_config else None
    return Analyses(samples=len(batch), accuracy=accuracy.tolist(), counts=batch.valid.sum(0).tolist(),
                    supervised=config.loss_mask().nonzero().flatten().tolist() if config else None, heads=heads,
                    views=views, percolation=probes, patching=patching, shortcut=shortcut)


def write_html(page: str, path: str | os.PathLike) -> Path:
    path = Path(path)
    atomic_write(path, lambda f: f.write(page.encode()))
    return path

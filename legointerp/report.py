"""One self-contained HTML page about a model: accuracy, training curves, heads, percolation, patching, shortcut.

Plotly's JavaScript is inlined once and circuitsvis's bundle is inlined by its local mode, so the page opens
offline.  The page only composes analyses' results; it computes nothing of its own.
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

from legointerp.files import atomic_write
from legointerp.heads import HeadReport
from legointerp.patching import PatchingResult
from legointerp.plots import accuracy_figure, training_curves_figure
from legointerp.probes import PercolationResult
from legointerp.shortcut import ShortcutResult

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
table { border-collapse: collapse; font-size: 0.85em; } td, th { padding: 2px 8px; border-bottom: 1px solid #eee; }
.meta { color: #666; font-size: 0.9em; } .figure { margin: 1em 0; } code { background: #f4f4f4; padding: 1px 4px; }
"""


@dataclass
class Section:
    title: str
    body: str  # HTML


def figure_html(figure: go.Figure, include_plotlyjs: bool) -> str:
    return f'<div class="figure">{figure.to_html(full_html=False, include_plotlyjs=include_plotlyjs)}</div>'


def frame_html(frame: pd.DataFrame) -> str:
    return frame.to_html(index=False, float_format=lambda x: f"{x:.3f}", border=0)


def render(title: str, subtitle: str, sections: list[Section]) -> str:
    body = "\n".join(f"<h2>{html.escape(s.title)}</h2>\n{s.body}" for s in sections)
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p class='meta'>{subtitle}</p>\n{body}\n</body></html>")


def model_report(*, name: str, description: str, accuracy: list[float], recorded: list[float] | None,
                 log: list[dict], supervised: list[int] | None, heads: HeadReport, attention_view: str,
                 percolation: PercolationResult, patching: PatchingResult, shortcut: ShortcutResult) -> str:
    """The HTML page from the analyses' results (no computation here)."""
    resolution = ", ".join(f"#{k}: {'-' if layer is None else layer}" for k, layer in enumerate(percolation.resolution_layer))
    linearity = "undefined" if percolation.linearity is None else f"{percolation.linearity:.2f}"
    sections = [
        Section("Accuracy per chain position", figure_html(accuracy_figure(accuracy, recorded), include_plotlyjs=True)),
        Section("Training curves", figure_html(training_curves_figure(log, supervised), include_plotlyjs=False)),
        Section("Attention heads",
                "<p>Each head's attention mass by type (association: a variable to its other occurrence; "
                "manipulation: within the clause; broadcast: to BOS/EOS), labelled by the largest lift over a "
                "uniform head, and the accuracy lost when the head is mean-ablated.</p>"
                + figure_html(heads.plot(), include_plotlyjs=False) + frame_html(pd.DataFrame(heads.to_records()))),
        Section("Attention patterns of the clearest heads", attention_view),
        Section("Information percolation (linear probes per layer)",
                f"<p>Resolution layer per chain depth (first layer whose probe reaches {percolation.threshold:.0%}): "
                f"{html.escape(resolution)}. Rank correlation of resolution layer with depth: {linearity}.</p>"
                + figure_html(percolation.plot(), include_plotlyjs=False)),
        Section("Activation patching",
                f"<p>Corruption: {html.escape(patching.corruption)}. Each cell: the clean residual stream patched into "
                f"the corrupted run at one (layer, position), scored by the normalised logit difference of the "
                f"variables the corruption changes. Attribution patching estimates the same map from one backward "
                f"pass; its agreement with exact patching: r = {patching.agreement:.2f}.</p>"
                + figure_html(patching.plot(), include_plotlyjs=False)),
        Section(f"Shortcut detection: {shortcut.verdict}",
                "<p>Did the model follow the chain to the last variable, or count the operators (the paper's "
                "section 4.3)? Each row is one piece of evidence; <code>shortcut</code> is its vote (empty: "
                "unavailable).</p>" + frame_html(shortcut.to_frame()) + figure_html(shortcut.plot(), include_plotlyjs=False)),
    ]
    return render(f"legointerp report: {name}", html.escape(description), sections)


def clearest_heads(report: HeadReport, kinds=("association", "manipulation", "broadcast")) -> list[tuple[int, int]]:
    """The (layer, head) with the highest score of each kind, for attention views."""
    frame = report.to_frame()
    return list(dict.fromkeys((int(frame.loc[i, "layer"]), int(frame.loc[i, "head"])) for i in (frame[k].idxmax() for k in kinds)))


def write_html(page: str, path: str | os.PathLike) -> Path:
    path = Path(path)
    atomic_write(path, lambda f: f.write(page.encode()))
    return path

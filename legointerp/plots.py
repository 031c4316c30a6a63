"""Figures of a model's behaviour: accuracy per chain position and training curves (the paper's Figure 3).

Analyses' own figures live beside them (``HeadReport.plot``, ``PercolationResult.plot``); these take
plain results: a list of accuracies, or the training log's rows.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
from plotly.colors import sample_colorscale


def wilson_interval(accuracy: np.ndarray, counts: np.ndarray, z: float = 1.96) -> tuple[np.ndarray, np.ndarray]:
    """(n,) lower and upper 95% bounds of a binomial proportion; Wilson's, as it stays inside [0, 1] near 1.0."""
    counts = np.maximum(counts, 1)
    centre = (accuracy + z**2 / (2 * counts)) / (1 + z**2 / counts)
    half = z / (1 + z**2 / counts) * np.sqrt(accuracy * (1 - accuracy) / counts + z**2 / (4 * counts**2))
    return centre - half, centre + half


def accuracy_figure(accuracy: list[float], counts: list[int] | None = None, recorded: list[float] | None = None,
                    title: str = "Accuracy per chain position") -> go.Figure:
    """Bars: test accuracy at each chain position (0 = the clause reading the root literal), with its 95% interval
    when ``counts`` (n,) gives the sentences behind each bar; ``recorded`` (n,) is drawn as a second bar beside it."""
    positions = [f"#{k}" for k in range(len(accuracy))]
    values = np.asarray(accuracy, dtype=float)
    bar = dict(x=positions, y=values, name="fresh sentences", marker_color="#4c78a8", text=[f"{v:.3f}" for v in values],
               textposition="inside", insidetextanchor="start", textangle=0, textfont_size=10)
    if counts is not None:
        counts = np.asarray(counts)
        low, high = wilson_interval(values, counts)
        low, high = np.minimum(low, values), np.maximum(high, values)  # rounding can put the bound past the value
        low_count, high_count = counts.min(), counts.max()
        sentences = f"{low_count:,}" if low_count == high_count else f"{low_count:,}-{high_count:,}"
        bar.update(name=f"fresh sentences (n = {sentences})", customdata=counts,
                   error_y=dict(type="data", symmetric=False, array=high - values, arrayminus=values - low,
                                color="#333", thickness=1),
                   hovertemplate="position %{x}<br>accuracy %{y:.4f} of %{customdata:,} sentences<extra></extra>")
        title = f"{title} on {sentences} fresh sentences (95% intervals)"
    figure = go.Figure(go.Bar(**bar))
    if recorded is not None:
        figure.add_trace(go.Bar(x=positions, y=recorded, name="recorded in the checkpoint at the end of training",
                                marker_color="#b8cde3", hovertemplate="position %{x}<br>recorded %{y:.4f}<extra></extra>"))
    figure.update_layout(title=title, xaxis_title="chain position", yaxis=dict(title="accuracy", range=[0, 1.05]),
                         template="plotly_white", height=380, barmode="group", bargap=0.25, showlegend=True,
                         legend=dict(orientation="h", y=-0.2))
    return figure


def training_curves_figure(log: list[dict], supervised: list[int] | None = None) -> go.Figure:
    """One line per chain position: test accuracy against training sentences; unsupervised positions dashed.  The
    curriculum's longest chain (log rows' ``longest_chain``) is a grey step on the right axis."""
    figure = go.Figure()
    if not log:
        return figure.update_layout(title="Training curves (no training log found beside the checkpoint)")
    accuracy = np.array([row["accuracy"] for row in log], dtype=float)  # (rows, n)
    n = accuracy.shape[1]
    colours = sample_colorscale("Viridis", [k / max(1, n - 1) for k in range(n)])
    samples = [row["samples"] for row in log]
    for k in range(n):
        dashed = supervised is not None and k not in supervised
        figure.add_trace(go.Scatter(x=samples, y=accuracy[:, k], mode="lines", name=f"#{k}" + (" (unsupervised)" if dashed else ""),
                                    line=dict(color=colours[k], dash="dash" if dashed else "solid"),
                                    hovertemplate=f"#{k}: %{{y:.3f}} after %{{x:,}} sentences<extra></extra>"))
    if all("longest_chain" in row for row in log):
        figure.add_trace(go.Scatter(x=samples, y=[row["longest_chain"] for row in log], mode="lines", yaxis="y2",
                                    name="longest chain trained on (right axis)", line=dict(color="#999", width=2, shape="hv"),
                                    hovertemplate="chains of up to %{y} clauses<extra></extra>"))
        figure.update_layout(yaxis2=dict(title="longest chain in training", overlaying="y", side="right", range=[0, n + 0.5],
                                         dtick=max(1, n // 6), showgrid=False))
    # below the lowest dip, and never above chance, so a fall under 0.5 is seen rather than clipped
    low = min(0.4, np.floor(np.nanmin(accuracy) * 20) / 20 - 0.05)
    figure.update_layout(title="Test accuracy per chain position during training", xaxis_title="training sentences",
                         yaxis=dict(title="test accuracy", range=[low, 1.03]), template="plotly_white", height=480,
                         legend=dict(orientation="h", y=-0.18, title="position"), hovermode="x")
    return figure


def static_figures(width: int = 1000) -> bool:
    """Show figures as static PNG when kaleido (which drives Chromium) is installed: small notebook outputs that show
    wherever a notebook is read, GitHub included; interactive figures otherwise.  Returns whether PNG is on."""
    if importlib.util.find_spec("kaleido") is None:
        return False
    pio.renderers.default = "png"
    pio.renderers["png"].width = width
    return True

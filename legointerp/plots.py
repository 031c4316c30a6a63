"""Figures of a model's behaviour: accuracy per chain position and training curves (the paper's Figure 3).

Analyses' own figures live beside them (``HeadReport.plot``, ``PercolationResult.plot``); these take
plain results: a list of accuracies, or the training log's rows.
"""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.colors import sample_colorscale


def accuracy_figure(accuracy: list[float], recorded: list[float] | None = None, title: str = "Accuracy per chain position"
                    ) -> go.Figure:
    """Bars: test accuracy at each chain position (0 = the clause reading the root literal)."""
    positions = [f"#{k}" for k in range(len(accuracy))]
    figure = go.Figure(go.Bar(x=positions, y=accuracy, name="fresh sentences", marker_color="#4c78a8",
                              hovertemplate="position %{x}<br>accuracy %{y:.4f}<extra></extra>"))
    if recorded is not None:
        figure.add_trace(go.Scatter(x=positions, y=recorded, mode="markers", name="recorded in checkpoint",
                                    marker=dict(symbol="line-ew-open", size=28, color="#e45756", line_width=3)))
    figure.update_layout(title=title, xaxis_title="chain position", yaxis=dict(title="accuracy", range=[0, 1.02]),
                         template="plotly_white", height=360)
    return figure


def training_curves_figure(log: list[dict], supervised: list[int] | None = None) -> go.Figure:
    """One line per chain position: test accuracy against training samples; unsupervised positions dashed."""
    figure = go.Figure()
    if not log:
        return figure.update_layout(title="Training curves (no training log found beside the checkpoint)")
    n = len(log[0]["accuracy"])
    colours = sample_colorscale("Viridis", [k / max(1, n - 1) for k in range(n)])
    samples = [row["samples"] for row in log]
    for k in range(n):
        dashed = supervised is not None and k not in supervised
        figure.add_trace(go.Scatter(x=samples, y=[row["accuracy"][k] for row in log], mode="lines", name=f"#{k}",
                                    line=dict(color=colours[k], dash="dash" if dashed else "solid")))
    figure.update_layout(title="Test accuracy per chain position during training", xaxis_title="training sentences",
                         yaxis=dict(title="accuracy", range=[0.4, 1.02]), template="plotly_white", height=400,
                         legend_title="position")
    return figure

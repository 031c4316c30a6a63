"""Linear probes per layer: where in depth is each chain step resolved? (the paper's Figure 4)

For every residual-stream site (the embeddings, then each layer's output) and every chain depth k, a
linear probe (a ridge classifier) reads the variable token's representation and predicts its value.  Held-out
accuracy forms a (layer x depth) matrix; the first layer reaching a threshold is the depth's *resolution
layer*; the rank correlation of resolution layer with depth says how linearly information percolates (a
for-loop resolving one step per layer gives 1).  The same probes on a randomly initialised model of the same
shape are the control.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from scipy.stats import spearmanr
from sklearn.dummy import DummyClassifier
from sklearn.linear_model import RidgeClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from legointerp.model import LegoTransformer
from legointerp.task import LegoBatch, LegoTask


def residual_sites(n_layers: int) -> list[str]:
    """The embedding output, then every layer's output: n_layers + 1 sites."""
    return ["blocks.0.hook_resid_pre"] + [f"blocks.{layer}.hook_resid_post" for layer in range(n_layers)]


@torch.no_grad()
def variable_representations(model, batch: LegoBatch) -> np.ndarray:
    """(sites, B, n, d_model): the residual stream at each chain position's assigned variable, from one forward pass."""
    sites = residual_sites(model.cfg.n_layers)
    inputs = (batch.tokens,) if bool(batch.attention_mask.all()) else (batch.tokens, batch.attention_mask)
    _, cache = model.run_with_cache(*inputs, names_filter=lambda name: name in sites)
    resid = torch.stack([cache[site] for site in sites])  # (S, B, T, D)
    index = batch.clause_pos.to(resid.device)[None, :, :, None].expand(len(sites), -1, -1, resid.shape[-1])
    return resid.gather(2, index).float().cpu().numpy()


def _probe(labels: np.ndarray):
    if len(np.unique(labels)) < 2:  # one value only: nothing to separate
        return DummyClassifier(strategy="most_frequent")
    return make_pipeline(StandardScaler(), RidgeClassifier(alpha=1.0))  # closed form: ~50x faster than a logistic fit


class PercolationProbe:
    """One linear probe per (site, depth), with scikit-learn's fit/score shape over (model, batch)."""

    def fit(self, model, batch: LegoBatch) -> "PercolationProbe":
        features, values, valid = variable_representations(model, batch), batch.values.numpy(), batch.valid.numpy()
        self.probes_ = [[_probe(values[valid[:, k], k]).fit(features[s, valid[:, k], k], values[valid[:, k], k])
                         for k in range(values.shape[1])] for s in range(features.shape[0])]
        return self

    def score(self, model, batch: LegoBatch) -> np.ndarray:
        """(sites, n) held-out accuracy."""
        features, values, valid = variable_representations(model, batch), batch.values.numpy(), batch.valid.numpy()
        return np.array([[probe.score(features[s, valid[:, k], k], values[valid[:, k], k]) for k, probe in enumerate(row)]
                         for s, row in enumerate(self.probes_)])


def resolution_layers(accuracy: np.ndarray, threshold: float) -> list[int | None]:
    """Per depth (column), the first layer (row) whose accuracy reaches ``threshold``; None if none does."""
    reached = accuracy >= threshold
    return [int(reached[:, k].argmax()) if reached[:, k].any() else None for k in range(accuracy.shape[1])]


def linearity(resolution: list[int | None]) -> float | None:
    """Spearman correlation of resolution layer with depth over the depths that resolve (None if undefined)."""
    pairs = [(depth, layer) for depth, layer in enumerate(resolution) if layer is not None]
    if len(pairs) < 3 or len({layer for _, layer in pairs}) < 2:
        return None
    rho = spearmanr(*zip(*pairs)).statistic
    return None if math.isnan(rho) else float(rho)


@dataclass
class PercolationResult:
    accuracy: np.ndarray  # (n_layers + 1, n): rows are sites (0 = embeddings), columns chain depths
    control: np.ndarray | None  # the same for a randomly initialised model
    resolution_layer: list[int | None]
    linearity: float | None
    threshold: float
    chance: float

    def to_frame(self) -> pd.DataFrame:
        layers, depths = np.indices(self.accuracy.shape)
        frame = pd.DataFrame({"layer": layers.ravel(), "depth": depths.ravel(), "accuracy": self.accuracy.ravel()})
        if self.control is not None:
            frame["control"] = self.control.ravel()
        return frame

    def to_dict(self) -> dict:
        return {"matrix": self.accuracy.tolist(), "control": None if self.control is None else self.control.tolist(),
                "resolution_layers": self.resolution_layer, "linearity": self.linearity, "threshold": self.threshold}

    def plot(self) -> go.Figure:
        return percolation_figure(self)


def percolation(model, batch: LegoBatch, task: LegoTask, *, control: bool = True, threshold: float = 0.9,
                test_fraction: float = 0.3, seed: int = 0) -> PercolationResult:
    """Probe accuracy per (layer, depth) on a held-out part of ``batch``, with a random-init control."""
    n_test = max(1, int(len(batch) * test_fraction))
    train, test = batch[n_test:], batch[:n_test]
    accuracy = PercolationProbe().fit(model, train).score(model, test)
    control_accuracy = None
    if control:
        torch.manual_seed(seed)
        random_model = LegoTransformer(model.cfg).to(batch.tokens.device).eval()
        control_accuracy = PercolationProbe().fit(random_model, train).score(random_model, test)
    resolution = resolution_layers(accuracy, threshold)
    return PercolationResult(accuracy, control_accuracy, resolution, linearity(resolution), threshold, 1 / task.n_classes)


def percolation_figure(result: PercolationResult) -> go.Figure:
    """Heatmap of probe accuracy (x: chain depth, y: layer), resolution layers marked; the control beside it."""
    panels = [("trained model", result.accuracy)] + ([("random-init control", result.control)] if result.control is not None else [])
    figure = make_subplots(rows=1, cols=len(panels), subplot_titles=[title for title, _ in panels], horizontal_spacing=0.08)
    for col, (_, matrix) in enumerate(panels, start=1):
        figure.add_trace(go.Heatmap(z=matrix, zmin=result.chance, zmax=1, colorscale="Viridis", showscale=col == 1,
                                    hovertemplate="depth %{x}<br>layer %{y}<br>accuracy %{z:.3f}<extra></extra>"),
                         row=1, col=col)
    resolved = [(depth, layer) for depth, layer in enumerate(result.resolution_layer) if layer is not None]
    if resolved:
        figure.add_trace(go.Scatter(x=[d for d, _ in resolved], y=[l for _, l in resolved], mode="markers+lines",
                                    name=f"resolution layer (>= {result.threshold:.0%})",
                                    marker=dict(color="white", size=9, line=dict(color="black", width=1))), row=1, col=1)
    figure.update_xaxes(title="chain depth", dtick=1)
    figure.update_yaxes(title="layer (0 = embeddings)", dtick=1)
    figure.update_layout(title="Information percolation: linear-probe accuracy per layer and chain depth",
                         template="plotly_white", height=460, legend=dict(orientation="h", y=-0.2))
    return figure

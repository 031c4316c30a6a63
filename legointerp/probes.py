"""Linear probes per layer: at which layer is each chain step resolved? (the paper's Figure 4)

For every residual-stream site (the embeddings, then each layer's output) and every chain depth k, a logistic
regression reads the representation of the variable at depth k and predicts its value.  Held-out accuracy forms
a (layer x depth) matrix; the first layer reaching a threshold is the depth's *resolution layer*, and the rank
correlation of resolution layer with depth says how linearly information percolates (a for-loop resolving one
step per layer gives 1).  The same probes on a randomly initialised model of the same shape are the control.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from scipy.stats import spearmanr
from sklearn.dummy import DummyClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from legointerp.model import LegoTransformer
from legointerp.task import LegoBatch, LegoTask


def residual_sites(n_layers: int) -> list[str]:
    """The embedding output, then every layer's output: n_layers + 1 hook names."""
    return ["blocks.0.hook_resid_pre"] + [f"blocks.{layer}.hook_resid_post" for layer in range(n_layers)]


@torch.no_grad()
def variable_representations(model, batch: LegoBatch) -> np.ndarray:
    """(n_layers + 1, B, n, d_model): the residual stream at each chain position's variable, from one forward pass."""
    sites = residual_sites(model.cfg.n_layers)
    batch = batch.to(next(model.parameters()).device)
    _, cache = model.run_with_cache(batch.tokens, batch.attention_mask, names_filter=sites)
    index = batch.clause_pos[:, :, None].expand(-1, -1, model.cfg.d_model)  # (B, n, d_model)
    return torch.stack([cache[site].gather(1, index) for site in sites]).float().cpu().numpy()


def _examples(model, batch: LegoBatch) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """[site][depth] -> (features (N_k, d_model), values (N_k,)) over the N_k sentences that have depth k."""
    features = variable_representations(model, batch)
    values, valid = batch.values.cpu().numpy(), batch.valid.cpu().numpy()
    return [[(site[valid[:, k], k], values[valid[:, k], k]) for k in range(values.shape[1])] for site in features]


class PercolationProbe:
    """One linear probe per (site, depth) with scikit-learn's fit/score shape, on (model, batch) pairs."""

    def __init__(self, C: float = 1.0, max_iter: int = 1000):
        self.C, self.max_iter = C, max_iter

    def _fit_one(self, features: np.ndarray, values: np.ndarray):
        if len(values) == 0:  # no sentence reaches this depth
            return None
        if len(np.unique(values)) < 2:  # a single value: nothing to separate, the probe can only repeat it
            return DummyClassifier(strategy="most_frequent").fit(features, values)
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=self.C, max_iter=self.max_iter))
        return probe.fit(features, values)

    def fit(self, model, batch: LegoBatch) -> "PercolationProbe":
        """Fit the (n_layers + 1) x n probes on ``batch``'s representations in ``model``."""
        examples = _examples(model, batch)
        with threadpool_limits(1):  # multithreaded BLAS on these small matrices is ~10x slower than one thread
            self.probes_ = [[self._fit_one(*example) for example in row] for row in examples]
        return self

    def score(self, model, batch: LegoBatch) -> np.ndarray:
        """(n_layers + 1, n) accuracy on ``batch``; NaN where no probe was fit or no sentence has the depth."""
        examples = _examples(model, batch)
        with threadpool_limits(1):
            return np.array([[np.nan if probe is None or len(values) == 0 else probe.score(features, values)
                              for probe, (features, values) in zip(probes, row)]
                             for probes, row in zip(self.probes_, examples)])


def resolution_layers(accuracy: np.ndarray, threshold: float) -> list[int | None]:
    """accuracy: (layers, depths).  Per depth, the first layer whose accuracy reaches ``threshold``, or None."""
    reached = accuracy >= threshold
    return [int(layer) if hit else None for layer, hit in zip(reached.argmax(0), reached.any(0))]


def linearity(resolution: list[int | None]) -> float | None:
    """Spearman correlation of resolution layer with depth over the depths that resolve; None when undefined
    (fewer than three resolved depths, or all resolved at one layer)."""
    depths = [k for k, layer in enumerate(resolution) if layer is not None]
    layers = [resolution[k] for k in depths]
    if len(layers) < 3 or len(set(layers)) < 2:
        return None
    rho, _ = spearmanr(depths, layers)
    return float(rho)


@dataclass
class PercolationResult:
    accuracy: np.ndarray  # (n_layers + 1, n) held-out accuracy: rows are layers (0 = embeddings), columns chain depths
    control: np.ndarray | None  # (n_layers + 1, n) the same probes on a randomly initialised model
    resolution_layer: list[int | None]  # (n,) first layer reaching the threshold, per depth
    linearity: float | None
    threshold: float
    n_classes: int = 2

    def to_frame(self) -> pd.DataFrame:
        """One row per (layer, depth)."""
        layers, depths = np.indices(self.accuracy.shape)
        control = np.full(self.accuracy.shape, np.nan) if self.control is None else self.control
        return pd.DataFrame({"layer": layers.ravel(), "depth": depths.ravel(), "accuracy": self.accuracy.ravel(),
                             "control": control.ravel()})

    def to_dict(self) -> dict:
        """JSON-ready (NaN, for a depth no sentence reaches, becomes None)."""
        rows = lambda matrix: [[None if np.isnan(x) else float(x) for x in row] for row in matrix]
        return {"matrix": rows(self.accuracy), "control": None if self.control is None else rows(self.control),
                "resolution_layers": self.resolution_layer, "linearity": self.linearity, "threshold": self.threshold}

    def plot(self) -> go.Figure:
        return percolation_figure(self)


def percolation(model, batch: LegoBatch, task: LegoTask, *, control: bool = True, threshold: float = 0.9,
                test_fraction: float = 0.3, seed: int = 0) -> PercolationResult:
    """Probe accuracy per (layer, depth) on a random held-out ``test_fraction`` of ``batch``; ``seed`` fixes the
    split and the control model's initialisation."""
    order = torch.randperm(len(batch), generator=torch.Generator().manual_seed(seed))
    n_test = min(max(1, round(len(batch) * test_fraction)), len(batch) - 1)
    train, test = batch[order[n_test:]], batch[order[:n_test]]
    accuracy = PercolationProbe().fit(model, train).score(model, test)
    control_accuracy = None
    if control:
        with torch.random.fork_rng(devices=[]):  # a fixed random model without disturbing the caller's stream
            torch.manual_seed(seed)
            random_model = LegoTransformer(dataclasses.replace(model.cfg)).to(next(model.parameters()).device)
        control_accuracy = PercolationProbe().fit(random_model, train).score(random_model, test)
    resolution = resolution_layers(accuracy, threshold)
    return PercolationResult(accuracy, control_accuracy, resolution, linearity(resolution), threshold, task.n_classes)


def percolation_figure(result: PercolationResult) -> go.Figure:
    """Heatmap of probe accuracy (x: chain depth, y: layer), resolution layers marked; the control beside it."""
    panels = {"trained model": result.accuracy, "random-init control": result.control}
    panels = {title: matrix for title, matrix in panels.items() if matrix is not None}
    figure = make_subplots(rows=1, cols=len(panels), subplot_titles=list(panels), shared_yaxes=True)
    hover = "depth %{x}<br>layer %{y}<br>accuracy %{z:.3f}<extra></extra>"
    for col, matrix in enumerate(panels.values(), start=1):
        figure.add_trace(go.Heatmap(z=matrix, zmin=1 / result.n_classes, zmax=1, colorscale="Viridis",
                                    showscale=col == 1, hovertemplate=hover), row=1, col=col)
    resolved = [(k, layer) for k, layer in enumerate(result.resolution_layer) if layer is not None]
    if resolved:
        depths, layers = zip(*resolved)
        marker = dict(color="white", size=9, line=dict(color="black", width=1))
        figure.add_trace(go.Scatter(x=depths, y=layers, mode="markers", marker=marker,
                                    name=f"resolution layer (>= {result.threshold:.0%})"), row=1, col=1)
    figure.update_xaxes(title="chain depth", dtick=1)
    figure.update_yaxes(title="layer (0 = embeddings)", dtick=1, col=1)
    figure.update_layout(title="Information percolation: linear-probe accuracy per layer and chain depth",
                         template="plotly_white", height=460, legend=dict(orientation="h", y=-0.2))
    return figure

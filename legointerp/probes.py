"""Linear probes per layer: at which layer is each chain step resolved? (the paper's Figure 4)

For every residual-stream site (the embeddings, then each layer's output) and every chain depth k, a logistic
regression reads the representation of the variable at depth k and predicts its value.  Held-out accuracy forms
a (layer x depth) matrix; the first layer reaching a threshold is the depth's *resolution layer*, and the rank
correlation of resolution layer with depth says how linearly information percolates (a for-loop resolving one
step per layer gives 1).  The same probes on a randomly initialised model of the same shape are the control.
"""

from __future__ import annotations

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

from legointerp.model import random_twin
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


REPORTED_THRESHOLDS = (0.9, 0.95)  # deep depths of a trained model can reach 0.9 a layer before they reach 0.95


@dataclass
class PercolationResult:
    accuracy: np.ndarray  # (n_layers + 1, n) held-out accuracy: rows are layers (0 = embeddings), columns chain depths
    control: np.ndarray | None  # (n_layers + 1, n) the same probes on a randomly initialised model
    threshold: float  # the accuracy that counts as resolved for resolution_layer and linearity
    test_sentences: int  # held-out sentences the accuracies are measured on
    train_sentences: int  # sentences the probes are fitted on
    test_examples: list[int]  # (n,) held-out sentences that reach each depth: the denominator of each column
    n_classes: int = 2

    @property
    def thresholds(self) -> list[float]:
        """The chosen threshold and the reported ones, ascending."""
        return sorted({self.threshold, *REPORTED_THRESHOLDS})

    @property
    def resolution_by_threshold(self) -> dict[float, list[int | None]]:
        """threshold -> (n,) first layer reaching it, per depth."""
        return {t: resolution_layers(self.accuracy, t) for t in self.thresholds}

    @property
    def resolution_layer(self) -> list[int | None]:
        """(n,) first layer reaching ``threshold``, per depth."""
        return self.resolution_by_threshold[self.threshold]

    @property
    def linearity(self) -> float | None:
        return linearity(self.resolution_layer)

    def describe(self) -> str:
        """One line for people: what "resolved" means here and how many sentences measured it."""
        examples = sorted(set(self.test_examples))
        reach = ("all reach every depth" if examples == [self.test_sentences]
                 else f"{examples[0]}-{examples[-1]} examples per depth")
        rho = ", ".join(f"{'-' if r is None else f'{r:.3f}'} at {t:.0%}" for t, r in
                        ((t, linearity(layers)) for t, layers in self.resolution_by_threshold.items()))
        return (f"resolution layer: the first layer whose probe reaches {self.threshold:.0%} held-out accuracy; "
                f"{self.test_sentences} held-out sentences ({reach}), {self.train_sentences} for fitting; "
                f"linearity {rho}")

    def depth_frame(self) -> pd.DataFrame:
        """One row per depth: held-out examples, the resolution layer at every threshold, the last layer's accuracy."""
        frame = pd.DataFrame({"depth": range(self.accuracy.shape[1]), "examples": self.test_examples})
        for t, layers in self.resolution_by_threshold.items():
            frame[f"layer >= {t:g}"] = pd.array(layers, dtype="Int64")
        frame["last layer accuracy"] = self.accuracy[-1]
        return frame

    def to_frame(self) -> pd.DataFrame:
        """One row per (layer, depth); ``first >= t`` marks the depth's resolution layer at threshold t."""
        layers, depths = np.indices(self.accuracy.shape)
        control = np.full(self.accuracy.shape, np.nan) if self.control is None else self.control
        frame = pd.DataFrame({"layer": layers.ravel(), "depth": depths.ravel(), "accuracy": self.accuracy.ravel(),
                              "control": control.ravel(), "examples": np.array(self.test_examples)[depths.ravel()]})
        for t, resolution in self.resolution_by_threshold.items():
            first = np.array([-1 if layer is None else layer for layer in resolution])  # (n,)
            frame[f"first >= {t:g}"] = first[frame["depth"]] == frame["layer"]
        return frame

    def to_dict(self) -> dict:
        """JSON-ready (NaN, for a depth no sentence reaches, becomes None; thresholds as keys are strings)."""
        rows = lambda matrix: [[None if np.isnan(x) else float(x) for x in row] for row in matrix]
        by_threshold = self.resolution_by_threshold
        return {"matrix": rows(self.accuracy), "control": None if self.control is None else rows(self.control),
                "threshold": self.threshold, "resolution_layers": self.resolution_layer, "linearity": self.linearity,
                "resolution_by_threshold": {f"{t:g}": layers for t, layers in by_threshold.items()},
                "linearity_by_threshold": {f"{t:g}": linearity(layers) for t, layers in by_threshold.items()},
                "test_sentences": self.test_sentences, "train_sentences": self.train_sentences,
                "test_examples": self.test_examples}

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
        random_model = random_twin(model, seed)
        control_accuracy = PercolationProbe().fit(random_model, train).score(random_model, test)
    return PercolationResult(accuracy, control_accuracy, threshold, test_sentences=n_test,
                             train_sentences=len(batch) - n_test, test_examples=test.valid.sum(0).tolist(),
                             n_classes=task.n_classes)


def percolation_figure(result: PercolationResult) -> go.Figure:
    """Heatmap of probe accuracy (x: chain depth, y: layer), the resolution layers at every threshold marked (nested
    markers, largest for the lowest threshold); the control beside it."""
    panels = {"trained model": result.accuracy, "random-init control": result.control}
    panels = {title: matrix for title, matrix in panels.items() if matrix is not None}
    figure = make_subplots(rows=1, cols=len(panels), subplot_titles=list(panels), shared_yaxes=True)
    examples = np.broadcast_to(np.array(result.test_examples), result.accuracy.shape)  # (layers, depths)
    hover = "depth %{x}<br>layer %{y}<br>accuracy %{z:.3f} on %{customdata} held-out sentences<extra></extra>"
    for col, matrix in enumerate(panels.values(), start=1):
        figure.add_trace(go.Heatmap(z=matrix, zmin=1 / result.n_classes, zmax=1, colorscale="Viridis",
                                    customdata=examples, showscale=col == 1, hovertemplate=hover,
                                    colorbar=dict(title="probe accuracy")), row=1, col=col)
    for i, (t, resolution) in enumerate(result.resolution_by_threshold.items()):
        resolved = [(k, layer) for k, layer in enumerate(resolution) if layer is not None]
        if not resolved:
            continue
        depths, layers = zip(*resolved)
        marker = dict(symbol=["circle", "diamond", "square"][i % 3], color="white" if i % 2 == 0 else "black",
                      size=12 - 4 * i, line=dict(color="black", width=1))
        chosen = " (resolution layer)" if t == result.threshold else ""
        figure.add_trace(go.Scatter(x=depths, y=layers, mode="markers", marker=marker,
                                    name=f"first layer >= {t:.0%}{chosen}"), row=1, col=1)
    figure.update_xaxes(title="chain depth", dtick=1)
    figure.update_yaxes(title="layer (0 = embeddings)", dtick=1, col=1)
    title = ("Information percolation: linear-probe accuracy per layer and chain depth<br>"
             f"<sup>{result.test_sentences} held-out sentences, {result.train_sentences} for fitting</sup>")
    figure.update_layout(title=title, template="plotly_white", height=480, legend=dict(orientation="h", y=-0.2))
    return figure

"""Logit lens and direct logit attribution at each chain position's readout token.

The model answers chain position k at the first token of its clause, the variable being assigned (the *readout
token*).  Both analyses look only there, so one forward pass keeps a (B, n, ...) slice of each activation instead
of caching (B, T, ...) everywhere.

*Logit lens*: the residual stream at the readout token after every layer (row 0: the embeddings), read through
``ln_final`` (with that row's own statistics, as ``cache.accumulated_resid(apply_ln=True)``) and the unembedding,
and scored like the model's answer: accuracy per (layer, depth).  The last row is the model's output.

*Direct logit attribution*: the answer's logit difference, the true value's logit minus the mean of the other
values' (the classifier direction of that position; for two values, the plain difference), split into what each
component writes to the residual stream: the token and position embeddings, each head, each MLP, and one term for
the constant biases (attention ``b_O``, ``ln_final``'s bias, ``b_U``).  ``ln_final``'s scale is frozen at its value
in this forward pass, as TransformerLens's ``logit_attrs`` does, so the parts sum exactly to the model's logit
difference; unlike ``logit_attrs`` the direction includes ``ln_final``'s weight, which this model does not fold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from legointerp.evaluate import clause_logits
from legointerp.model import affine, require_pre_ln, require_writes_at_z
from legointerp.probes import residual_sites
from legointerp.task import LegoBatch


ROBUST_PERCENTILE = 98  # the attribution heatmap's colour range: this percentile of the cells' magnitudes


def answer_contrast(values: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(B, n) true value indices -> (B, n, C) weights: 1 on the true value, -1/(C-1) on each other one, so
    ``(logits * contrast).sum(-1)`` is the logit difference and ``contrast @ W_U.T`` its residual direction."""
    true = torch.nn.functional.one_hot(values, n_classes).float()
    return true - (1 - true) / (n_classes - 1)


@torch.no_grad()
def readout_activations(model, batch: LegoBatch, names: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward pass: (B, n, C) logits at the readout tokens and {name: (B, n, ...) activation there}."""
    batch = batch.to(next(model.parameters()).device)
    rows = torch.arange(len(batch), device=batch.tokens.device)[:, None]
    kept = {}

    def keep(activation, hook):
        kept[hook.name] = activation[rows, batch.clause_pos]

    logits = model.run_with_hooks(batch.tokens, batch.attention_mask, fwd_hooks=[(name, keep) for name in names])
    return clause_logits(logits, batch), kept


def _mean_over_valid(values: torch.Tensor, valid: torch.Tensor) -> np.ndarray:
    """(..., B, n) -> (..., n) mean over the sentences that have each chain position (NaN where none does)."""
    total = (values * valid).sum(-2)
    count = valid.sum(0)
    return torch.where(count > 0, total / count.clamp(min=1), torch.nan).double().cpu().numpy()


@dataclass
class LogitLensResult:
    logits: torch.Tensor  # (n_layers + 1, B, n, C) the lens's logits at each readout token; row 0: the embeddings
    accuracy: np.ndarray  # (n_layers + 1, n) share of sentences whose lens argmax is the true value
    logit_difference: np.ndarray  # (n_layers + 1, n) mean true-minus-others logit difference
    sentences: np.ndarray  # (n,) sentences that have each chain position

    def to_frame(self) -> pd.DataFrame:
        """One row per (layer, depth); layer 0 is the embeddings, layer l the output of block l - 1."""
        layers, depths = np.indices(self.accuracy.shape)
        return pd.DataFrame({"layer": layers.ravel(), "depth": depths.ravel(), "accuracy": self.accuracy.ravel(),
                             "logit_difference": self.logit_difference.ravel(),
                             "sentences": np.broadcast_to(self.sentences, self.accuracy.shape).ravel()})

    def plot(self) -> go.Figure:
        """Heatmap of lens accuracy (x: chain depth, y: layer), chance at the bottom of the scale."""
        n_classes = self.logits.shape[-1]
        hover = "depth %{x}<br>layer %{y}<br>accuracy %{z:.3f}<br>logit difference %{customdata:.2f}<extra></extra>"
        figure = go.Figure(go.Heatmap(z=self.accuracy, customdata=self.logit_difference, zmin=1 / n_classes, zmax=1,
                                      colorscale="Viridis", hovertemplate=hover,
                                      colorbar=dict(title="accuracy")))
        figure.update_layout(title="Logit lens<br><sup>each layer's residual stream at the readout token, through "
                                   "ln_final and the unembedding</sup>", xaxis=dict(title="chain depth", dtick=1),
                             yaxis=dict(title="layer (0 = embeddings)", dtick=1), template="plotly_white", height=460)
        return figure


def logit_lens(model, batch: LegoBatch) -> LogitLensResult:
    """The residual stream after every layer at each chain position's readout token, decoded by the model's own
    ``ln_final`` and unembedding; accuracy and logit difference per (layer, depth)."""
    require_pre_ln(model.cfg, "the logit lens")
    sites = residual_sites(model.cfg.n_layers)
    _, kept = readout_activations(model, batch, sites)
    resid = torch.stack([kept[site] for site in sites])  # (n_layers + 1, B, n, D)
    with torch.no_grad():
        logits = affine(model.ln_final(resid), model.W_U, model.b_U)
    values, valid = batch.values.to(logits.device), batch.valid.to(logits.device)
    difference = (logits * answer_contrast(values, logits.shape[-1])).sum(-1)
    correct = (logits.argmax(-1) == values).float()
    return LogitLensResult(logits=logits, accuracy=_mean_over_valid(correct, valid),
                           logit_difference=_mean_over_valid(difference, valid),
                           sentences=valid.sum(0).cpu().numpy())


def attribution_components(n_layers: int, n_heads: int) -> pd.DataFrame:
    """The components of :func:`direct_logit_attribution` in forward order: label ("L2H1", "L2 MLP"), kind
    (embed, pos_embed, head, mlp, biases), layer and head (-1 where they do not apply)."""
    rows = [("embed", "embed", -1, -1), ("pos_embed", "pos_embed", -1, -1)]
    for layer in range(n_layers):
        rows += [(f"L{layer}H{head}", "head", layer, head) for head in range(n_heads)]
        rows.append((f"L{layer} MLP", "mlp", layer, -1))
    rows.append(("biases", "biases", -1, -1))
    return pd.DataFrame(rows, columns=["component", "kind", "layer", "head"])


@dataclass
class LogitAttribution:
    components: pd.DataFrame  # one row per component, as attribution_components
    attribution: torch.Tensor  # (components, B, n) each component's part of the logit difference
    total: torch.Tensor  # (B, n) the model's logit difference (true value minus the mean of the others)
    valid: torch.Tensor  # (B, n) chain position k exists in sentence b

    def to_frame(self) -> pd.DataFrame:
        """One row per (component, depth): the mean attribution over the sentences that have the depth, beside the
        mean logit difference it is a part of."""
        mean = _mean_over_valid(self.attribution, self.valid)  # (components, n)
        n = mean.shape[1]
        frame = self.components.loc[self.components.index.repeat(n)].reset_index(drop=True)
        frame["depth"] = np.tile(np.arange(n), len(self.components))
        frame["attribution"] = mean.ravel()
        frame["logit_difference"] = np.tile(_mean_over_valid(self.total, self.valid), len(self.components))
        return frame

    def plot(self) -> go.Figure:
        """Heatmap: component (rows, in forward order) x chain depth, diverging around 0."""
        mean = _mean_over_valid(self.attribution, self.valid)
        total = _mean_over_valid(self.total, self.valid)
        # a robust range: one huge cell (a zoo model's hand-set weights write +-1e5 that cancel) must not blank the rest;
        # cells beyond it saturate, and the hover still reads their value
        magnitude = np.abs(mean[np.isfinite(mean)])
        bound = float(np.percentile(magnitude, ROBUST_PERCENTILE)) if magnitude.any() else 1.0
        hover = "%{y} at depth %{x}<br>attribution %{z:.3f}<extra></extra>"
        figure = go.Figure(go.Heatmap(z=mean, y=list(self.components["component"]), zmid=0, zmin=-bound, zmax=bound,
                                      colorscale="RdBu", hovertemplate=hover, colorbar=dict(title="logit<br>difference")))
        ticks = [f"{k}<br>({x:.1f})" for k, x in enumerate(total)]
        figure.update_layout(
            title="Direct logit attribution<br><sup>what each component writes along the answer's classifier direction</sup>",
            xaxis=dict(title="chain depth (the model's mean logit difference, which each column sums to)",
                       tickvals=list(range(len(total))), ticktext=ticks),
            yaxis=dict(title="component", autorange="reversed"), template="plotly_white",
            height=max(400, 16 * len(self.components) + 160))
        return figure


def direct_logit_attribution(model, batch: LegoBatch) -> LogitAttribution:
    """Each component's direct contribution to every answer's logit difference, ``ln_final``'s scale frozen."""
    cfg = model.cfg
    require_pre_ln(cfg, "direct logit attribution")
    require_writes_at_z(cfg, "direct logit attribution")
    layers = range(cfg.n_layers)
    names = ["hook_embed", "hook_pos_embed", "ln_final.hook_scale", *(f"blocks.{l}.attn.hook_z" for l in layers),
             *(f"blocks.{l}.hook_mlp_out" for l in layers)]
    logits, kept = readout_activations(model, batch, names)
    with torch.no_grad():
        contrast = answer_contrast(batch.values.to(logits.device), cfg.d_vocab_out)  # (B, n, C)
        # A unit of residual moves the logit difference by (w * W_U c) after ln_final; ln_final first removes the
        # mean over d_model, so the centred direction, divided by the frozen scale, reads each component exactly.
        direction = (contrast @ model.W_U.T) * model.ln_final.w  # (B, n, D)
        reader = (direction - direction.mean(-1, keepdim=True)) / kept["ln_final.hook_scale"]
        z = torch.stack([kept[f"blocks.{l}.attn.hook_z"] for l in layers])  # (L, B, n, H, E)
        heads = torch.einsum("lbkhe,lhed,bkd->lbkh", z, model.W_O, reader)  # (L, B, n, H)
        mlps = (torch.stack([kept[f"blocks.{l}.hook_mlp_out"] for l in layers]) * reader).sum(-1)  # (L, B, n)
        constant = model.ln_final.b @ model.W_U + model.b_U  # (C,)
        biases = (model.b_O.sum(0) * reader).sum(-1) + contrast @ constant  # (B, n)
        per_layer = torch.cat([heads, mlps[..., None]], dim=-1).permute(0, 3, 1, 2).flatten(0, 1)  # (L (H + 1), B, n)
        attribution = torch.cat([((kept["hook_embed"] * reader).sum(-1))[None],
                                 ((kept["hook_pos_embed"] * reader).sum(-1))[None], per_layer, biases[None]])
        total = (logits * contrast).sum(-1)
    return LogitAttribution(components=attribution_components(cfg.n_layers, cfg.n_heads), attribution=attribution,
                            total=total, valid=batch.valid.to(total.device))

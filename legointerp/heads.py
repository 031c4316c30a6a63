"""Attention-head classifiers: which heads associate, manipulate or broadcast (the paper's sections 4.2 and 5).

Correlational: for every (layer, head), the attention mass that query rows of a kind put on keys of that kind
(masks in :mod:`legointerp.patterns`), beside the mass a uniform head would put there.  A head's label is the
kind with the largest *lift* ``(score - uniform) / (1 - uniform)`` if that lift is at least
``LABEL_THRESHOLD``, else ``"mixed"``.

Causal: mean-ablate each head (its ``hook_z`` replaced by the batch mean at each position) and each label
group, and measure the accuracy lost at every chain position: a label is trusted where ablation hurts.

Works on any TransformerLens-style model with ``blocks.{l}.attn.hook_pattern`` / ``hook_z`` and a ``cfg``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import partial

import circuitsvis
import pandas as pd
import plotly.graph_objects as go
import torch

from legointerp.evaluate import clause_logits
from legointerp.patterns import association_mask, broadcast_mask, manipulation_mask, offset_mask
from legointerp.task import PAD, LegoBatch, LegoTask

KINDS = ("association", "manipulation", "broadcast", "self", "previous", "next")
LABEL_THRESHOLD = 0.5
COLOURS = {"association": "#e45756", "manipulation": "#4c78a8", "broadcast": "#f2cf5b", "self": "#9d9d9d",
           "previous": "#72b7b2", "next": "#b279a2", "mixed": "#eeeeee"}
RECORD_FIELDS = ["layer", "head", "label", *KINDS, "ablation_drop"]


def kind_masks(tokens: torch.Tensor, task: LegoTask) -> dict[str, torch.Tensor]:
    """Each kind's (B, Q, K) mask of the keys its query rows should attend to."""
    is_variable = tokens >= task.variable_offset
    return {"association": association_mask(tokens, is_variable), "manipulation": manipulation_mask(tokens),
            "broadcast": broadcast_mask(tokens), "self": offset_mask(tokens, 0), "previous": offset_mask(tokens, -1),
            "next": offset_mask(tokens, 1)}


def _model_inputs(batch: LegoBatch) -> tuple:
    return (batch.tokens,) if bool(batch.attention_mask.all()) else (batch.tokens, batch.attention_mask)


@torch.no_grad()
def attention_patterns(model, batch: LegoBatch) -> torch.Tensor:
    """(L, B, H, Q, K) attention of every layer from one cached forward pass."""
    _, cache = model.run_with_cache(*_model_inputs(batch), names_filter=lambda name: name.endswith("attn.hook_pattern"))
    return torch.stack([cache[f"blocks.{layer}.attn.hook_pattern"] for layer in range(model.cfg.n_layers)])


def head_scores(model, batch: LegoBatch, task: LegoTask) -> pd.DataFrame:
    """One row per (layer, head): mean mass per kind over that kind's query rows, the uniform reference, a label."""
    patterns = attention_patterns(model, batch).float()
    real = (batch.tokens != PAD).to(patterns.device)
    n_layers, _, n_heads = patterns.shape[:3]
    columns = {"layer": torch.arange(n_layers).repeat_interleave(n_heads), "head": torch.arange(n_heads).repeat(n_layers)}
    lifts = []
    for kind, mask in kind_masks(batch.tokens.to(patterns.device), task).items():
        rows = mask.any(-1)  # (B, Q): queries this kind speaks about
        mass = torch.einsum("lbhqk,bqk->lhbq", patterns, mask.float())
        score = (mass * rows).sum((-1, -2)) / rows.sum().clamp(min=1)  # (L, H)
        uniform = ((mask.sum(-1) / real.sum(-1, keepdim=True)) * rows).sum() / rows.sum().clamp(min=1)
        columns[kind] = score.flatten().cpu()
        columns[f"{kind}_uniform"] = uniform.expand(n_layers * n_heads).cpu()
        lifts.append(((score - uniform) / (1 - uniform).clamp(min=1e-6)).flatten().cpu())
    best_lift, best_kind = torch.stack(lifts, dim=1).max(dim=1)
    frame = pd.DataFrame({k: v.numpy() for k, v in columns.items()})
    frame.insert(2, "label", [KINDS[k] if lift >= LABEL_THRESHOLD else "mixed" for k, lift in zip(best_kind.tolist(), best_lift.tolist())])
    frame["lift"] = best_lift.numpy()
    return frame


def _accuracy(logits: torch.Tensor, batch: LegoBatch) -> torch.Tensor:
    """(n,) accuracy per chain position."""
    correct = (clause_logits(logits, batch).argmax(-1) == batch.values) & batch.valid
    return correct.sum(0) / batch.valid.sum(0).clamp(min=1)


def _mean_ablate(z: torch.Tensor, hook, heads: list[int]) -> torch.Tensor:
    """z: (B, P, H, E); the chosen heads' z replaced by their batch mean at each position."""
    z[:, :, heads] = z[:, :, heads].mean(0, keepdim=True)
    return z


@torch.no_grad()
def ablation_drops(model, batch: LegoBatch, heads: dict[str, list[tuple[int, int]]]) -> pd.DataFrame:
    """Accuracy lost per chain position when each named group of (layer, head)s is mean-ablated at once.

    The ablated z is the head's mean over the batch at each position (positions carry the clause structure, so a
    per-position mean keeps what any head would see there).  Models that accept ``start_at_layer`` (ours,
    TransformerLens's HookedTransformer) rerun only the layers from the group's first one, from the cached
    residual stream.  Returns one row per group, one column per chain position."""
    inputs = _model_inputs(batch)
    resumable = "start_at_layer" in inspect.signature(model.forward).parameters
    logits, cache = model.run_with_cache(*inputs, names_filter=lambda name: name.endswith("hook_resid_pre"))
    clean = _accuracy(logits, batch)
    rows = {}
    for name, group in heads.items():
        by_layer: dict[int, list[int]] = {}
        for layer, head in group:
            by_layer.setdefault(layer, []).append(head)
        hooks = [(f"blocks.{layer}.attn.hook_z", partial(_mean_ablate, heads=hs)) for layer, hs in by_layer.items()]
        if resumable:
            first = min(by_layer)
            ablated = model.run_with_hooks(cache["resid_pre", first], *inputs[1:], start_at_layer=first, fwd_hooks=hooks)
        else:
            ablated = model.run_with_hooks(*inputs, fwd_hooks=hooks)
        rows[name] = (clean - _accuracy(ablated, batch)).cpu().numpy()
    return pd.DataFrame.from_dict(rows, orient="index", columns=[f"#{k}" for k in range(batch.values.shape[1])])


@dataclass
class HeadReport:
    scores: pd.DataFrame  # one row per head: layer, head, label, kind scores, uniform references, ablation_drop
    position_drops: pd.DataFrame | None  # one row per head "L{l}H{h}", one column per chain position
    group_drops: pd.DataFrame | None  # one row per label, one column per chain position

    def to_frame(self) -> pd.DataFrame:
        return self.scores

    def to_records(self) -> list[dict]:
        fields = [f for f in RECORD_FIELDS if f in self.scores]
        return [{k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
                for row in self.scores[fields].to_dict(orient="records")]

    def plot(self) -> go.Figure:
        return head_map_figure(self)


def classify_heads(model, batch: LegoBatch, task: LegoTask, ablate: bool = True) -> HeadReport:
    """Scores, labels and (with ``ablate``) the causal check for every head."""
    scores = head_scores(model, batch, task)
    if not ablate:
        return HeadReport(scores, None, None)
    singles = {f"L{l}H{h}": [(l, h)] for l, h in zip(scores["layer"], scores["head"])}
    position_drops = ablation_drops(model, batch, singles)
    scores["ablation_drop"] = position_drops.mean(axis=1).to_numpy()
    groups = {label: list(zip(part["layer"], part["head"])) for label, part in scores.groupby("label")}
    return HeadReport(scores, position_drops, ablation_drops(model, batch, groups))


def head_map_figure(report: HeadReport) -> go.Figure:
    """Layer x head grid coloured by label, every score on hover."""
    frame = report.scores
    labels = list(COLOURS)
    n_layers, n_heads = frame["layer"].max() + 1, frame["head"].max() + 1
    code = frame["label"].map(labels.index).to_numpy().reshape(n_layers, n_heads)
    hover = frame.apply(lambda r: "<br>".join([f"L{r.layer}H{r.head}: <b>{r.label}</b>"]
                                              + [f"{k}: {r[k]:.2f} (uniform {r[k + '_uniform']:.2f})" for k in KINDS]
                                              + ([f"ablation drop: {r.ablation_drop:.3f}"] if "ablation_drop" in r else [])),
                        axis=1).to_numpy().reshape(n_layers, n_heads)
    # a stepped colour scale: label i owns the band [i, i + 1), and its code sits in the band's middle
    scale = [[(i + e) / len(labels), COLOURS[name]] for i, name in enumerate(labels) for e in (0, 1)]
    figure = go.Figure(go.Heatmap(z=code + 0.5, zmin=0, zmax=len(labels), colorscale=scale, text=hover,
                                  hovertemplate="%{text}<extra></extra>", xgap=2, ygap=2, showscale=False))
    for name in labels:  # a legend entry per label
        figure.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=name,
                                    marker=dict(size=12, symbol="square", color=COLOURS[name])))
    figure.update_layout(title="Attention heads by type", xaxis=dict(title="head", dtick=1),
                         yaxis=dict(title="layer", dtick=1, autorange="reversed"), template="plotly_white",
                         height=120 + 28 * n_layers, width=420 + 40 * n_heads)
    return figure


def attention_view_html(model, batch: LegoBatch, task: LegoTask, heads: list[tuple[int, int]], index: int = 0) -> str:
    """circuitsvis view of the chosen heads on sentence ``index``, with its JavaScript inlined (works offline)."""
    length = int((batch.tokens[index] != PAD).sum())
    patterns = attention_patterns(model, batch[index:index + 1])[:, 0, :, :length, :length]  # (L, H, T, T)
    chosen = torch.stack([patterns[layer, head] for layer, head in heads]).cpu()
    view = circuitsvis.attention.attention_heads(attention=chosen, tokens=task.token_strings(batch.tokens[index, :length]),
                                                 attention_head_names=[f"L{l}H{h}" for l, h in heads], mask_upper_tri=False)
    return view.local_src

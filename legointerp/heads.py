"""Attention-head classifier: what does each head do, for which tokens, and does the model need it?

**Where each head looks.**  For every (layer, head), every *query role* (the clause's first token, i.e. the variable
whose value is read out; the same restricted to clauses not yet resolved at that layer; ``=``; the operator; the
operand; ``;``; BOS; EOS) and every *kind* of key set, the attention mass the role's queries put on the kind's keys,
as a *lift* over a uniform head: ``(mass - uniform) / (1 - uniform)`` (1: all mass there, 0: no more than chance).
The kinds are the paper's *association* (identical tokens, the query itself included: 1[u_i = u_j]), *manipulation*
(the other tokens of the query's clause) and *broadcast* (BOS/EOS), and, from the chain metadata, the *chain step*
(a clause's first token to the first token of the clause defining its operand), the *reverse step* (to the clause
that reads this variable), the *frontier* (to the clause resolved at the previous layer, in a one-step-per-layer
model), *operators* (the operator tokens of the other clauses: counting signs), and the previous / next token.

**Labels.**  A head's label is the kind with the largest lift at a role where that kind does its job in LEGO
(``JOB_ROLES``: association at variable tokens, manipulation and the chain kinds at clause-first tokens, operators
there and at BOS/EOS; positional kinds anywhere), if that lift reaches ``LABEL_THRESHOLD``.  Broadcast is where heads rest when they have nothing to do, so it is the label only when no
other kind reaches the threshold.  ``mixed`` means two kinds share one role's queries (each holds at least
``MIXED_SHARE`` of the mass on keys the other kind does not have, e.g. half on the clause's own operand, half on
the clause defining it); a head matching no kind is ``structured`` when its
attention is concentrated (normalised entropy below ``DIFFUSE_ENTROPY``) and ``diffuse`` when it is flat.

**Causal checks, per chain depth.**  Each head's ``hook_z`` is replaced by its batch mean at each position (mean
ablation) and by another sentence's (resample ablation); the accuracy lost at each depth is reported.  The truncated
test runs only ``l + 1`` blocks and ablates head ``h`` in the last one, reading depth ``l``: the step a
one-step-per-layer model takes in block ``l`` (full runs hide it: later blocks redo what was ablated).  For a
weight-tied model, each head is also ablated at every iteration.
"""

from __future__ import annotations

from dataclasses import dataclass

import circuitsvis
import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from legointerp.evaluate import clause_logits
from legointerp.patterns import association_mask, broadcast_mask, clause_of_position, manipulation_mask, offset_mask
from legointerp.task import BOS, CLAUSE_LEN, EOS, PAD, LegoBatch, LegoTask

ROLES = ("variable", "unresolved variable", "=", "operator", "operand", ";", "BOS", "EOS")
KINDS = ("association", "manipulation", "broadcast", "chain step", "reverse step", "frontier", "operators",
         "previous token", "next token")
# the query roles where each kind does its job in LEGO: a label comes from these (every role is still scored)
VARIABLES = ("variable", "unresolved variable")
JOB_ROLES = {"association": VARIABLES + ("operand",), "manipulation": VARIABLES, "chain step": VARIABLES,
             "reverse step": VARIABLES, "frontier": VARIABLES, "operators": VARIABLES + ("BOS", "EOS")}
LABEL_THRESHOLD = 0.5  # lift a kind must reach at one of its job roles to name the head
MIXED_SHARE = 0.3  # two kinds each holding this much of a role's attention on keys of their own: "mixed"
DIFFUSE_ENTROPY = 0.75  # unlabelled heads with mean normalised entropy above this are "diffuse", else "structured"
MIN_QUERIES = 8  # a (role, kind) needs this many queries in the batch to be scored
TIE = 0.02  # kinds whose best lifts differ by less than this (their keys coincide): the first in KINDS wins
COLOURS = {"association": "#e45756", "manipulation": "#4c78a8", "broadcast": "#f2cf5b", "chain step": "#54a24b",
           "reverse step": "#88d27a", "frontier": "#b279a2", "operators": "#ff9da6", "previous token": "#72b7b2",
           "next token": "#9ecae9", "mixed": "#bab0ac", "structured": "#79706e", "diffuse": "#eeeeee"}
DROPS = ("truncated_drop", "mean_drop", "resample_drop", "every_iteration_drop")
RECORD_FIELDS = ["layer", "head", "label", "role", "lift", "self", "entropy", *KINDS, *DROPS]
THRESHOLDS = {"label_lift": LABEL_THRESHOLD, "mixed_share": MIXED_SHARE, "diffuse_entropy": DIFFUSE_ENTROPY,
              "min_queries": MIN_QUERIES, "tie": TIE}


def _model_inputs(batch: LegoBatch) -> tuple:
    return (batch.tokens,) if bool(batch.attention_mask.all()) else (batch.tokens, batch.attention_mask)


@torch.no_grad()
def attention_patterns(model, batch: LegoBatch) -> torch.Tensor:
    """(L, B, H, Q, K) attention of every layer from one cached forward pass."""
    _, cache = model.run_with_cache(*_model_inputs(batch), names_filter=lambda name: name.endswith("attn.hook_pattern"))
    return torch.stack([cache["pattern", layer] for layer in range(model.cfg.n_layers)])


def clause_depth(batch: LegoBatch) -> torch.Tensor:
    """(B, T) chain depth of the clause starting at each position; -1 where no clause starts."""
    depth = torch.full(batch.tokens.shape, -1, dtype=torch.long)
    return depth.scatter(1, batch.clause_pos, torch.where(batch.valid, batch.depth, -1))


def query_roles(batch: LegoBatch, layer: int) -> torch.Tensor:
    """(R, B, T) bool: which positions are queries of each role in ``ROLES`` at ``layer``."""
    tokens = batch.tokens
    in_clause = (torch.arange(tokens.shape[1]) - 1) % CLAUSE_LEN
    clause = (tokens != PAD) & (tokens != BOS) & (tokens != EOS)
    depth = clause_depth(batch)
    first = depth >= 0
    return torch.stack([first, depth >= layer, *[clause & (in_clause == r) for r in range(1, CLAUSE_LEN)],
                        tokens == BOS, tokens == EOS])


def kind_masks(batch: LegoBatch, task: LegoTask, layer: int) -> dict[str, torch.Tensor]:
    """Each kind's (B, Q, K) mask of the keys its queries should attend to at ``layer`` (rows without keys: no query)."""
    tokens = batch.tokens
    first = clause_depth(batch) >= 0
    operand = torch.cat([tokens[:, 3:], torch.full_like(tokens[:, :3], PAD)], dim=1)  # (B, T) token 3 after each position
    starts = first[:, :, None] & first[:, None, :]
    depth = clause_depth(batch)
    is_operator = (tokens >= task.op_offset) & (tokens < task.literal_offset)
    real = tokens != PAD
    clause = clause_of_position(tokens)
    same_clause = (clause[:, :, None] == clause[:, None, :]) & (clause[:, :, None] >= 0)
    return {
        "association": association_mask(tokens, tokens >= task.variable_offset, include_self=True),
        "manipulation": manipulation_mask(tokens),
        "broadcast": broadcast_mask(tokens),
        "chain step": starts & (tokens[:, None, :] == operand[:, :, None]),
        "reverse step": starts & (operand[:, None, :] == tokens[:, :, None]),
        "frontier": (depth >= layer)[:, :, None] & (depth == layer - 1)[:, None, :] & (layer > 0),
        "operators": real[:, :, None] & is_operator[:, None, :] & ~same_clause,
        "previous token": offset_mask(tokens, -1),
        "next token": offset_mask(tokens, 1),
    }


def _role_means(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """values (H, B, T), weights (R, B, T) -> (H, R) weighted means (NaN where a role has too few queries)."""
    total = weights.sum((1, 2))
    means = torch.einsum("hbt,rbt->hr", values, weights) / total.clamp(min=1)
    return torch.where(total >= MIN_QUERIES, means, torch.nan)


@torch.no_grad()
def head_scores(model, batch: LegoBatch, task: LegoTask) -> tuple[pd.DataFrame, np.ndarray]:
    """One row per (layer, head): label, where it was found, lift, self-attention, entropy and each kind's best lift.
    Also returns the full lifts, (L, H, R, K) with NaN where a (role, kind) has no queries."""
    patterns = attention_patterns(model, batch.to(next(model.parameters()).device)).float().cpu()  # (L, B, H, Q, K)
    batch = batch.to("cpu")  # the scores below end in numpy
    n_layers, _, n_heads, T, _ = patterns.shape
    real = batch.tokens != PAD
    n_real = real.sum(-1, keepdim=True).float()  # (B, 1)
    lifts, summaries = np.full((n_layers, n_heads, len(ROLES), len(KINDS)), np.nan), []
    layer_masks = []  # per layer: (kind masks, query roles), reused to tell mixed heads apart
    for layer in range(n_layers):
        pattern = patterns[layer].transpose(0, 1)  # (H, B, Q, K)
        roles = query_roles(batch, layer).float()
        masks = kind_masks(batch, task, layer)
        layer_masks.append((list(masks.values()), roles.bool()))
        mass = torch.stack([torch.einsum("hbqk,bqk->hbq", pattern, m.float()) for m in masks.values()])  # (K, H, B, Q)
        for k, m in enumerate(masks.values()):
            weights = roles * m.any(-1)
            score = _role_means(mass[k], weights)
            uniform = _role_means((m.sum(-1) / n_real)[None], weights)
            lifts[layer, :, :, k] = ((score - uniform) / (1 - uniform).clamp(min=1e-6)).numpy()
        entropy = -(pattern * pattern.clamp(min=1e-12).log()).sum(-1) / n_real.clamp(min=2).log()  # (H, B, Q)
        self_mass = pattern.diagonal(dim1=-2, dim2=-1)  # (H, B, Q)
        variable = (batch.tokens >= task.variable_offset).float()[None]
        summaries.append((_role_means(entropy, real.float()[None])[:, 0], _role_means(self_mass, variable)[:, 0]))
    records = []
    for layer in range(n_layers):
        for head in range(n_heads):
            entropy, self_mass = (float(summary[head]) for summary in summaries[layer])
            label, role, lift = _label(lifts[layer, head], patterns[layer][:, head], layer_masks[layer], entropy)
            records.append({"layer": layer, "head": head, "label": label, "role": role, "lift": lift,
                            "self": self_mass, "entropy": entropy,
                            **{kind: float(np.nanmax(np.append(lifts[layer, head, :, k], -np.inf)))
                               for k, kind in enumerate(KINDS)}})
    frame = pd.DataFrame(records)
    frame[list(KINDS)] = frame[list(KINDS)].replace(-np.inf, np.nan)
    return frame, lifts


def _label(lifts: np.ndarray, pattern: torch.Tensor, masks: tuple[list[torch.Tensor], torch.Tensor],
           entropy: float) -> tuple[str, str, float]:
    """(label, role, lift) of one head from its (R, K) lifts; ``pattern``: (B, Q, K); ``masks``: the layer's kind
    masks (B, Q, K) in KINDS order and query roles (R, B, Q)."""
    broadcast = KINDS.index("broadcast")
    working = lifts.copy()
    working[:, broadcast] = np.nan
    for k, kind in enumerate(KINDS):
        if kind in JOB_ROLES:
            working[[r for r, role in enumerate(ROLES) if role not in JOB_ROLES[kind]], k] = np.nan
    if np.isnan(working).all() or np.nanmax(working) < LABEL_THRESHOLD:
        if np.nanmax(np.append(lifts[:, broadcast], -np.inf)) >= LABEL_THRESHOLD:
            role = int(np.nanargmax(lifts[:, broadcast]))
            return "broadcast", ROLES[role], float(lifts[role, broadcast])
        best = np.unravel_index(np.nanargmax(np.where(np.isnan(lifts), -np.inf, lifts)), lifts.shape)
        return ("diffuse" if entropy > DIFFUSE_ENTROPY else "structured"), ROLES[best[0]], float(lifts[best])
    near_best = np.argwhere(working >= np.nanmax(working) - TIE)  # (role, kind) pairs; keys coinciding there
    role, kind = min(near_best, key=lambda pair: (pair[1], -working[pair[0], pair[1]]))  # the first kind in KINDS
    rivals = [k for k in range(len(KINDS)) if k not in (kind, broadcast) and working[role, k] >= MIXED_SHARE]
    if rivals:
        kinds, roles = masks
        queries = roles[role]
        for rival in rivals:
            own = (kinds[kind] & ~kinds[rival]).float()
            theirs = (kinds[rival] & ~kinds[kind]).float()
            share_own = (pattern * own).sum(-1)[queries].mean()
            share_theirs = (pattern * theirs).sum(-1)[queries].mean()
            if min(float(share_own), float(share_theirs)) >= MIXED_SHARE:
                return "mixed", ROLES[role], float(working[role, kind])
    return KINDS[kind], ROLES[role], float(working[role, kind])


# ---------------------------------------------------------------------------- causal checks
def _accuracy(logits: torch.Tensor, batch: LegoBatch) -> torch.Tensor:
    """(..., n) accuracy per chain position; logits (V * B, T, C) for V stacked variants -> (V, n)."""
    predicted = clause_logits(logits, _tile(batch, len(logits) // len(batch))).argmax(-1).view(-1, *batch.values.shape)
    correct = (predicted == batch.values) & batch.valid
    return correct.sum(1) / batch.valid.sum(0).clamp(min=1)


def _tile(batch: LegoBatch, times: int) -> LegoBatch:
    return LegoBatch(**{k: v.repeat(times, *[1] * (v.dim() - 1)) for k, v in batch.__dict__.items()})


def _ablating(replacements: list[tuple[int, torch.Tensor]], B: int):
    """A hook on hook_z (V * B, P, H, E): variant v has head replacements[v][0] replaced by replacements[v][1]."""
    def hook(z, hook):
        z = z.clone()
        for v, (head, value) in enumerate(replacements):
            z[v * B:(v + 1) * B, :, head] = value
        return z
    return hook


def head_outputs(cfg) -> tuple[str, ...]:
    """The hooks that together carry each head's write: its ``z`` and, with +aI/+bI attention, the identity copy."""
    return ("attn.hook_z",) + (("attn.hook_identity_out",) if getattr(cfg, "identity_attention", False) else ())


@torch.no_grad()
def ablation_drops(model, batch: LegoBatch) -> dict[str, pd.DataFrame]:
    """Accuracy lost per chain depth when each head is ablated: ``mean`` and ``resample`` (one row per head
    ``L{l}H{h}``, one column per depth ``#k``), ``truncated`` (one column: depth l in a run of l + 1 blocks) and, for a
    weight-tied model, ``every_iteration`` (one row per head index, ablated in every block).  Needs a model whose
    forward takes ``start_at_layer`` and ``n_layers`` (legointerp's own; a TransformerLens bridge does not)."""
    inputs = _model_inputs(batch)
    mask = inputs[1:]
    L, H, B = model.cfg.n_layers, model.cfg.n_heads, len(batch)
    outputs = head_outputs(model.cfg)
    names = [f"blocks.{layer}.hook_resid_pre" for layer in range(L)]
    names += [f"blocks.{layer}.{output}" for layer in range(L) for output in outputs]
    logits, cache = model.run_with_cache(*inputs, names_filter=names)
    clean = _accuracy(logits, batch)[0].cpu()  # the drops end in numpy
    resample = torch.roll(torch.arange(B), 1)
    columns = [f"#{k}" for k in range(batch.values.shape[1])]
    frames = {"mean": {}, "resample": {}, "truncated": {}}
    tiled_mask = [m.repeat(2 * H, 1) for m in mask]
    # a model with hardcoded heads builds their patterns from the token ids, which a residual-stream start lacks
    hardcoded = bool(getattr(model.cfg, "hardcoded", ()))

    def source(times: int) -> dict:
        return {"source_tokens": batch.tokens.repeat(times, 1)} if hardcoded else {}

    def hooks(layer: int, variants) -> list:
        """Variant v replaces head variants[v][0]'s write by variants[v][1](activation) at every output hook."""
        return [(f"blocks.{layer}.{output}",
                 _ablating([(h, value(cache[f"blocks.{layer}.{output}"][:, :, h])) for h, value in variants], B))
                for output in outputs]

    def mean(activation: torch.Tensor) -> torch.Tensor:
        return activation.mean(0, keepdim=True)

    def rolled(activation: torch.Tensor) -> torch.Tensor:
        return activation[resample]

    for layer in range(L):
        variants = [(h, mean) for h in range(H)] + [(h, rolled) for h in range(H)]
        start = cache["resid_pre", layer].repeat(2 * H, 1, 1)
        full = _accuracy(model.run_with_hooks(start, *tiled_mask, start_at_layer=layer, fwd_hooks=hooks(layer, variants),
                                              **source(2 * H)), batch).cpu()
        truncated = model.run_with_hooks(start[: H * B], *[m[: H * B] for m in tiled_mask], start_at_layer=layer,
                                         n_layers=layer + 1, fwd_hooks=hooks(layer, variants[:H]), **source(H))
        clean_truncated = model(cache["resid_pre", layer], *mask, start_at_layer=layer, n_layers=layer + 1, **source(1))
        depth = min(layer, batch.values.shape[1] - 1)
        truncated_drop = _accuracy(clean_truncated, batch)[0, depth] - _accuracy(truncated, batch)[:, depth]
        for h in range(H):
            frames["mean"][f"L{layer}H{h}"] = (clean - full[h]).numpy()
            frames["resample"][f"L{layer}H{h}"] = (clean - full[H + h]).numpy()
            frames["truncated"][f"L{layer}H{h}"] = [float(truncated_drop[h]) if layer < batch.values.shape[1] else np.nan]
    result = {kind: pd.DataFrame.from_dict(rows, orient="index", columns=columns if kind != "truncated" else ["drop"])
              for kind, rows in frames.items()}
    if getattr(model.cfg, "tied", False):  # a TransformerLens bridge has no tied blocks
        rows = {}
        for h in range(H):
            every = [hook for layer in range(L) for hook in hooks(layer, [(h, mean)])]
            rows[f"H{h}"] = (clean - _accuracy(model.run_with_hooks(*inputs, fwd_hooks=every), batch)[0].cpu()).numpy()
        result["every_iteration"] = pd.DataFrame.from_dict(rows, orient="index", columns=columns)
    return result


@dataclass
class HeadReport:
    scores: pd.DataFrame  # one row per head, columns RECORD_FIELDS (drops: the largest over chain depths)
    lifts: np.ndarray  # (L, H, R, K) lift of every (role, kind), NaN where unscored
    drops: dict[str, pd.DataFrame] | None  # see :func:`ablation_drops`

    def to_frame(self) -> pd.DataFrame:
        return self.scores

    def to_records(self) -> list[dict]:
        fields = [f for f in RECORD_FIELDS if f in self.scores]
        return [{k: (None if isinstance(v, float) and np.isnan(v) else v.item() if hasattr(v, "item") else v)
                 for k, v in row.items()} for row in self.scores[fields].to_dict(orient="records")]

    def role_frame(self, layer: int, head: int) -> pd.DataFrame:
        """Lift of every kind (columns) at every query role (rows) for one head."""
        return pd.DataFrame(self.lifts[layer, head], index=list(ROLES), columns=list(KINDS))

    def plot(self) -> go.Figure:
        return head_map_figure(self)


def classify_heads(model, batch: LegoBatch, task: LegoTask, ablate: bool = True) -> HeadReport:
    """Labels, scores and (with ``ablate``) the causal checks for every head, on full-length ``batch``."""
    scores, lifts = head_scores(model, batch, task)
    if not ablate:
        return HeadReport(scores, lifts, None)
    drops = ablation_drops(model, batch.to(next(model.parameters()).device))
    scores["mean_drop"] = drops["mean"].max(axis=1).to_numpy()
    scores["resample_drop"] = drops["resample"].max(axis=1).to_numpy()
    scores["truncated_drop"] = drops["truncated"]["drop"].to_numpy()
    if "every_iteration" in drops:
        scores["every_iteration_drop"] = drops["every_iteration"].max(axis=1).to_numpy()[scores["head"]]
    return HeadReport(scores, lifts, drops)


def head_map_figure(report: HeadReport) -> go.Figure:
    """Layer x head grid coloured by label (only the labels that occur), lift and ablation drops on hover."""
    frame = report.scores
    present = [name for name in COLOURS if name in set(frame["label"])]
    n_layers, n_heads = frame["layer"].max() + 1, frame["head"].max() + 1
    code = frame["label"].map(present.index).to_numpy().reshape(n_layers, n_heads)
    drop = [c for c in DROPS if c in frame]

    def hover(r):
        lines = [f"L{r.layer}H{r.head}: <b>{r.label}</b> (at the {r.role} token, lift {r.lift:.2f})",
                 f"self {r['self']:.2f}, entropy {r.entropy:.2f}"]
        return "<br>".join(lines + [f"{c.replace('_', ' ')}: {r[c]:.2f}" for c in drop])
    text = frame.apply(hover, axis=1).to_numpy().reshape(n_layers, n_heads)
    cell = frame.apply(lambda r: f"{r.label}<br>{r.lift:.2f}", axis=1).to_numpy().reshape(n_layers, n_heads)
    scale = [[(i + e) / len(present), COLOURS[name]] for i, name in enumerate(present) for e in (0, 1)]
    figure = go.Figure(go.Heatmap(z=code + 0.5, zmin=0, zmax=len(present), colorscale=scale, text=text, customdata=cell,
                                  texttemplate="%{customdata}", hovertemplate="%{text}<extra></extra>", xgap=2, ygap=2,
                                  showscale=False, textfont=dict(size=9)))
    for name in present:
        figure.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=name,
                                    marker=dict(size=12, symbol="square", color=COLOURS[name])))
    figure.update_layout(title=f"Attention heads by kind (label where lift >= {LABEL_THRESHOLD})", template="plotly_white",
                         xaxis=dict(title="head", dtick=1), yaxis=dict(title="layer", dtick=1, autorange="reversed"),
                         height=160 + 34 * n_layers, width=460 + 90 * n_heads)
    return figure


def attention_view_html(model, batch: LegoBatch, task: LegoTask, heads: list[tuple[int, int]], index: int = 0) -> str:
    """circuitsvis view of the chosen heads on sentence ``index``, with its JavaScript inlined (works offline)."""
    length = int((batch.tokens[index] != PAD).sum())
    patterns = attention_patterns(model, batch[index:index + 1])[:, 0, :, :length, :length]  # (L, H, T, T)
    chosen = torch.stack([patterns[layer, head] for layer, head in heads]).cpu()
    view = circuitsvis.attention.attention_heads(attention=chosen, tokens=task.token_strings(batch.tokens[index, :length]),
                                                 attention_head_names=[f"L{l}H{h}" for l, h in heads], mask_upper_tri=False)
    return view.local_src

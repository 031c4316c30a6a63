"""Attention-head classifier: what does each head do, for which tokens, and does the model need it?

**Where each head looks.**  For every (layer, head), every *query role* (the clause's first token, i.e. the variable
whose value is read out; the same restricted to clauses not yet resolved at that layer; the last variable, read by
no clause, where the shortcut answers; ``=``; the operator; the operand; ``;``; BOS; EOS) and every *kind* of key
set, the attention mass the role's queries put on the kind's keys, as a *lift* over a uniform head: ``(mass - uniform) / (1 - uniform)`` (1: all mass there, 0: no more than chance).
The kinds are the paper's *association* (identical tokens, the query itself included: 1[u_i = u_j]), *manipulation*
(the other tokens of the query's clause) and *broadcast* (BOS/EOS), and, from the chain metadata, the *chain step*
(a clause's first token to the first token of the clause defining its operand), the *reverse step* (to the clause
that reads this variable), the *frontier* (to the clause resolved at the previous layer, in a one-step-per-layer
model), *operators* (the operator tokens of the other clauses: counting signs), and the previous / next token.

**Labels.**  A head's label is the kind with the largest lift at a role where that kind does its job in LEGO
(``JOB_ROLES``: association at variable tokens, manipulation and the chain kinds at clause-first tokens, operators
there and at BOS/EOS; positional kinds anywhere), if that lift reaches ``LABEL_THRESHOLD``.  Broadcast is where
heads rest when they have nothing to do, so it is the label only when no other kind reaches the threshold (a head
that rests on BOS everywhere but at the last variable, where it counts the operators, is ``operators``).  Kinds
whose best lifts are within ``TIE`` explain the head equally well: they are told apart by the keys only one of them
has, at the queries where both do their job (a head fetching its clause's operand is manipulation at the variable,
and its operand's attention on itself, which association's mask also holds, decides nothing); a kind that holds
``TIE`` more of that mass wins, keys that coincide there leave the first in ``KINDS`` (the tie is noted), and
``mixed`` means both hold ``MIXED_SHARE`` of it, as when two kinds share one role's queries (e.g. half on the
clause's own operand, half on the clause defining it).  A head matching no kind is ``structured`` when its attention
is concentrated (normalised entropy below ``DIFFUSE_ENTROPY``) and ``diffuse`` when it is flat.  ``attends`` keeps
this attention kind ("mixed: a + b" for a mixed head); ``runner_up`` is the best other kind and its lift.

**Inert heads.**  A label is a claim about what a head does, so a head that does nothing is ``inert`` whatever its
attention looks like: its output ``OV = W_V W_O`` (+ ``b I`` with +aI/+bI attention) has a norm of at most
``INERT_OUTPUT`` of the model's largest head's (evidence: ``weights``), or, with the causal checks, no ablation of it
(truncated, mean, resample) costs more than ``INERT_DROP`` of accuracy at any depth.  Ablating a head alone is what
is measured: one of two redundant heads is inert by that measure too.  The ``evidence`` column names the drop that
confirms a label (a step kind's truncated drop, else the largest), and ``flag`` says where label and causal evidence
disagree: a head whose attention matches no kind but whose ablation costs ``FLAG_DROP``, or a step whose truncated
test finds nothing while mean or resample ablation costs ``FLAG_DROP``.

**Causal checks, per chain depth.**  Each head's ``hook_z`` is replaced by its batch mean at each position (mean
ablation) and by another sentence's (resample ablation); the accuracy lost at each depth is reported.  The truncated
test runs only ``l + 1`` blocks and ablates head ``h`` in the last one, reading depth ``l``: the step a
one-step-per-layer model takes in block ``l`` (full runs hide it: later blocks redo what was ablated); for a head
that attends as a reverse step it reads depth ``n - 1 - l`` instead, the step taken from the end of the chain.  For a
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

ROLES = ("variable", "unresolved variable", "last variable", "=", "operator", "operand", ";", "BOS", "EOS")
KINDS = ("association", "manipulation", "broadcast", "chain step", "reverse step", "frontier", "operators",
         "previous token", "next token")
# the query roles where each kind does its job in LEGO: a label comes from these (every role is still scored)
VARIABLES = ("variable", "unresolved variable", "last variable")
JOB_ROLES = {"association": VARIABLES + ("operand",), "manipulation": VARIABLES, "chain step": VARIABLES,
             "reverse step": VARIABLES, "frontier": VARIABLES, "operators": VARIABLES + ("BOS", "EOS")}
LABEL_THRESHOLD = 0.5  # lift a kind must reach at one of its job roles to name the head
MIXED_SHARE = 0.3  # two kinds each holding this much of a role's attention on keys of their own: "mixed"
DIFFUSE_ENTROPY = 0.75  # unlabelled heads with mean normalised entropy above this are "diffuse", else "structured"
MIN_QUERIES = 8  # a (role, kind) needs this many queries in the batch to be scored
TIE = 0.02  # kinds whose best lifts differ by less than this are told apart by the keys only one of them has
INERT_OUTPUT = 1e-3  # a head whose OV norm is at most this share of the model's largest head's writes nothing
INERT_DROP = 0.02  # ...or, ablated, costs at most this accuracy at every depth: inert
FLAG_DROP = 0.1  # an ablation costing this much disagrees with a label that claims no job (or with an empty step test)
STEPS = ("chain step", "reverse step", "frontier")  # the kinds whose causal test is the truncated run
COLOURS = {"association": "#e45756", "manipulation": "#4c78a8", "broadcast": "#f2cf5b", "chain step": "#54a24b",
           "reverse step": "#88d27a", "frontier": "#b279a2", "operators": "#ff9da6", "previous token": "#72b7b2",
           "next token": "#9ecae9", "mixed": "#bab0ac", "structured": "#79706e", "diffuse": "#eeeeee",
           "inert": "#f7f7f7"}
DROPS = ("truncated_drop", "mean_drop", "resample_drop", "every_iteration_drop")
EVIDENCE = ["label", "attends", "role", "lift", "runner_up", "runner_up_lift", "output", "evidence", "evidence_drop",
            "flag"]
RECORD_FIELDS = ["layer", "head", *EVIDENCE, "tie", "self", "entropy", *KINDS, *DROPS]
THRESHOLDS = {"label_lift": LABEL_THRESHOLD, "mixed_share": MIXED_SHARE, "diffuse_entropy": DIFFUSE_ENTROPY,
              "min_queries": MIN_QUERIES, "tie": TIE, "inert_output": INERT_OUTPUT, "inert_drop": INERT_DROP,
              "flag_drop": FLAG_DROP}


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
    last = depth == (batch.lengths - 1)[:, None]
    return torch.stack([first, depth >= layer, last, *[clause & (in_clause == r) for r in range(1, CLAUSE_LEN)],
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
    output = output_norms(model)
    records = []
    for layer in range(n_layers):
        for head in range(n_heads):
            entropy, self_mass = (float(summary[head]) for summary in summaries[layer])
            verdict = _label(lifts[layer, head], patterns[layer][:, head], layer_masks[layer], entropy)
            writes = output[layer, head] > INERT_OUTPUT
            records.append({"layer": layer, "head": head, **verdict, "label": verdict["label"] if writes else "inert",
                            "output": float(output[layer, head]), "evidence": "" if writes else "weights",
                            "evidence_drop": np.nan, "flag": "", "self": self_mass, "entropy": entropy,
                            **{kind: float(np.nanmax(np.append(lifts[layer, head, :, k], -np.inf)))
                               for k, kind in enumerate(KINDS)}})
    frame = pd.DataFrame(records)
    frame[list(KINDS)] = frame[list(KINDS)].replace(-np.inf, np.nan)
    return frame[[c for c in RECORD_FIELDS if c in frame]], lifts


def output_norms(model) -> np.ndarray:
    """(L, H) each head's OV norm (its +bI identity copy included) over the model's largest: 0 writes nothing."""
    norms = model.OV.AB.detach().float().flatten(-2).norm(dim=-1).cpu().numpy()  # (L, H, D, D) is small; no SVD
    return norms / max(float(norms.max()), np.finfo(np.float32).tiny)


def _job_roles(kind: int) -> list[int]:
    """The roles (indices into ROLES) where kind ``kind`` does its job: positional kinds anywhere."""
    return [r for r, role in enumerate(ROLES) if role in JOB_ROLES.get(KINDS[kind], ROLES)]


def _own_shares(pattern: torch.Tensor, kinds: list[torch.Tensor], queries: torch.Tensor, a: int, b: int) -> tuple[float, float]:
    """Mean attention of ``queries`` (B, Q) on the keys only kind ``a`` has and on those only kind ``b`` has."""
    share = lambda own, other: float((pattern * (kinds[own] & ~kinds[other])).sum(-1)[queries].mean())
    return share(a, b), share(b, a)


def _label(lifts: np.ndarray, pattern: torch.Tensor, masks: tuple[list[torch.Tensor], torch.Tensor],
           entropy: float) -> dict:
    """One head's attention verdict from its (R, K) lifts: ``label``, ``attends`` (with a mixed head's two kinds), the
    deciding ``role`` and ``lift``, ``runner_up`` and ``runner_up_lift``, and how a tie was decided (``tie``).
    ``pattern``: (B, Q, K); ``masks``: the layer's kind masks (B, Q, K) in KINDS order and query roles (R, B, Q)."""
    kinds, roles = masks
    broadcast = KINDS.index("broadcast")
    working = np.full_like(lifts, np.nan)
    for k in range(len(KINDS)):
        if k != broadcast:
            working[_job_roles(k), k] = lifts[_job_roles(k), k]
    best = np.nanmax(np.where(np.isnan(working), -np.inf, working), axis=0)  # (K,) each kind's best lift at its job

    def verdict(label: str, role: int, lift: float, chosen: tuple[int, ...] = (), tie: str = "", attends: str = "") -> dict:
        others = [k for k in np.argsort(-best, kind="stable") if k not in chosen and np.isfinite(best[k])]
        return {"label": label, "attends": attends or label, "role": ROLES[role], "lift": float(lift),
                "runner_up": KINDS[others[0]] if others else "", "runner_up_lift": float(best[others[0]]) if others else np.nan,
                "tie": tie}

    if best.max() < LABEL_THRESHOLD:
        if np.nanmax(np.append(lifts[:, broadcast], -np.inf)) >= LABEL_THRESHOLD:
            role = int(np.nanargmax(lifts[:, broadcast]))
            return verdict("broadcast", role, lifts[role, broadcast])
        role, kind = np.unravel_index(np.nanargmax(np.where(np.isnan(lifts), -np.inf, lifts)), lifts.shape)
        return verdict("diffuse" if entropy > DIFFUSE_ENTROPY else "structured", role, lifts[role, kind])
    near = [k for k in range(len(KINDS)) if best[k] >= best.max() - TIE]  # in KINDS order
    kind, ties = near[0], []
    for other in near[1:]:
        # the kinds explain the head equally well: compare them on the keys only one has, where both do their job
        shared = [r for r in set(_job_roles(kind)) & set(_job_roles(other)) if not np.isnan(lifts[r, [kind, other]]).any()]
        where = shared or [int(np.nanargmax(working[:, k])) for k in (kind, other)]
        queries = roles[sorted(where)].any(0)
        mine, theirs = _own_shares(pattern, kinds, queries, kind, other)
        place = "the variables" if set(where) <= {ROLES.index(r) for r in VARIABLES} else ", ".join(ROLES[r] for r in sorted(where))
        if min(mine, theirs) >= MIXED_SHARE:
            role = int(np.nanargmax(working[:, kind]))
            return verdict("mixed", role, working[role, kind], (kind, other), attends=f"mixed: {KINDS[kind]} + {KINDS[other]}",
                           tie=f"keys only {KINDS[kind]} has {mine:.2f}, only {KINDS[other]} has {theirs:.2f} at {place}")
        if abs(mine - theirs) >= TIE:
            ties.append(f"{KINDS[kind]} {mine:.2f} vs {KINDS[other]} {theirs:.2f} on the keys only each has, at {place}")
            kind = kind if mine > theirs else other
        else:
            ties.append(f"keys coincide with {KINDS[other]}'s at {place}: the first kind is named")
    role = int(np.nanargmax(working[:, kind]))
    queries = roles[role]
    for rival in [k for k in range(len(KINDS)) if k != kind and working[role, k] >= MIXED_SHARE]:
        mine, theirs = _own_shares(pattern, kinds, queries, kind, rival)
        if min(mine, theirs) >= MIXED_SHARE:
            return verdict("mixed", role, working[role, kind], (kind, rival), attends=f"mixed: {KINDS[kind]} + {KINDS[rival]}",
                           tie=f"keys only {KINDS[kind]} has {mine:.2f}, only {KINDS[rival]} has {theirs:.2f} at the {ROLES[role]}")
    return verdict(KINDS[kind], role, working[role, kind], (kind,), tie="; ".join(ties))


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
    ``L{l}H{h}``, one column per depth ``#k``), ``truncated`` (in a run of l + 1 blocks: ``forward``, depth l, the
    step a chain step takes there, and ``reverse``, depth n - 1 - l, the step taken from the chain's end) and, for a
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
        n = batch.values.shape[1]
        truncated_drop = _accuracy(clean_truncated, batch)[0] - _accuracy(truncated, batch)  # (H, n)
        for h in range(H):
            frames["mean"][f"L{layer}H{h}"] = (clean - full[h]).numpy()
            frames["resample"][f"L{layer}H{h}"] = (clean - full[H + h]).numpy()
            frames["truncated"][f"L{layer}H{h}"] = [float(truncated_drop[h, depth]) if 0 <= depth < n else np.nan
                                                    for depth in (layer, n - 1 - layer)]
    result = {kind: pd.DataFrame.from_dict(rows, orient="index",
                                           columns=columns if kind != "truncated" else ["forward", "reverse"])
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
    # the truncated test follows the direction of the step the head's attention takes
    direction = np.where(scores["attends"] == "reverse step", "reverse", "forward")
    scores["truncated_drop"] = drops["truncated"].to_numpy()[np.arange(len(scores)), (direction == "reverse").astype(int)]
    if "every_iteration" in drops:
        scores["every_iteration_drop"] = drops["every_iteration"].max(axis=1).to_numpy()[scores["head"]]
    return HeadReport(causal_evidence(scores), lifts, drops)


def causal_evidence(scores: pd.DataFrame) -> pd.DataFrame:
    """``scores`` with the ablations' verdict: heads whose every own ablation (truncated, mean, resample; the tied
    model's every-iteration drop belongs to no one layer) costs at most ``INERT_DROP`` are inert; ``evidence`` names
    the drop that confirms the label (a step's truncated drop, else the largest) and ``flag`` the disagreements."""
    scores = scores.copy()
    own = scores[["truncated_drop", "mean_drop", "resample_drop"]]
    largest, strongest = own.max(axis=1), own.fillna(-np.inf).idxmax(axis=1)
    step = scores["attends"].isin(STEPS) & scores["truncated_drop"].notna()
    name = pd.Series(np.where(step, "truncated_drop", strongest), index=scores.index)
    confirming = own.to_numpy()[np.arange(len(own)), own.columns.get_indexer(name)]
    by_weights = scores["evidence"] == "weights"
    scores["evidence"] = np.where(by_weights, "weights", name.str.removesuffix("_drop"))
    scores["evidence_drop"] = np.where(by_weights, np.nan, confirming)
    scores["label"] = np.where(by_weights | (largest <= INERT_DROP), "inert", scores["label"])
    full = scores[["mean_drop", "resample_drop"]].max(axis=1)
    unexplained = scores["attends"].isin(["diffuse", "structured"]) & (largest >= FLAG_DROP) & ~by_weights
    empty_step = step & (scores["truncated_drop"] <= INERT_DROP) & (full >= FLAG_DROP) & ~by_weights
    scores["flag"] = np.select(
        [unexplained, empty_step],
        [[f"ablation costs {d:.2f} ({c.removesuffix('_drop')}) but the attention matches no kind" for d, c in zip(largest, strongest)],
         [f"needed (mean/resample {d:.2f}) but the truncated test of its step finds {t:.2f}"
          for d, t in zip(full, scores["truncated_drop"])]], "")
    return scores


def head_verdict(row) -> str:
    """A head's label in words: "chain step", "mixed: manipulation + chain step", "inert: attends like a chain step"."""
    attends = row["attends"]
    if row["label"] != "inert":
        return attends
    if attends in ("diffuse", "structured"):
        return f"inert: attends {'diffusely' if attends == 'diffuse' else 'in a structure of no kind'}"
    return f"inert: attends like {'a ' if attends in STEPS + ('previous token', 'next token') else ''}{attends}"


HEAD_MAP_LINE = 12  # px per line of the head map's 9 px cell text
HEAD_MAP_LEGEND_ENTRY = 22  # px per entry of its legend
HEAD_MAP_MARGINS = (90, 60)  # px above (the title) and below (the head axis) the plot


def head_map_figure(report: HeadReport) -> go.Figure:
    """Layer x head grid coloured by label (only the labels that occur; a flagged head's cell says "check"), the
    evidence behind each label and the ablation drops on hover."""
    frame = report.scores
    present = [name for name in COLOURS if name in set(frame["label"])]
    n_layers, n_heads = frame["layer"].max() + 1, frame["head"].max() + 1
    code = frame["label"].map(present.index).to_numpy().reshape(n_layers, n_heads)
    drop = [c for c in DROPS if c in frame]

    def hover(r):
        lines = [f"L{r['layer']}H{r['head']}: <b>{head_verdict(r)}</b> (at the {r['role']} token, lift {r['lift']:.2f})",
                 f"runner-up: {r['runner_up'] or '-'} {r['runner_up_lift']:.2f}; output norm {r['output']:.3f} of the largest",
                 f"self {r['self']:.2f}, entropy {r['entropy']:.2f}"]
        lines += [f"evidence: {r['evidence']} {r['evidence_drop']:.2f}"] if r["evidence"] not in ("", "weights") else []
        lines += [f"<b>check</b>: {r['flag']}"] if r["flag"] else []
        return "<br>".join(lines + [f"{c.replace('_', ' ')}: {r[c]:.2f}" for c in drop])

    def cell(r):
        second = f"({r['attends']})" if r["label"] == "inert" else f"{r['lift']:.2f}"
        return f"{r['label']}<br>{second}" + ("<br><b>check</b>" if r["flag"] else "")
    hovers = frame.apply(hover, axis=1).to_numpy().reshape(n_layers, n_heads)
    cells = frame.apply(cell, axis=1).to_numpy().reshape(n_layers, n_heads)
    scale = [[(i + e) / len(present), COLOURS[name]] for i, name in enumerate(present) for e in (0, 1)]
    figure = go.Figure(go.Heatmap(z=code + 0.5, zmin=0, zmax=len(present), colorscale=scale, text=cells, hovertext=hovers,
                                  texttemplate="%{text}", hovertemplate="%{hovertext}<extra></extra>", xgap=2, ygap=2,
                                  showscale=False, textfont=dict(size=9)))
    for name in present:
        figure.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=name,
                                    marker=dict(size=12, symbol="square", color=COLOURS[name])))
    # each row as tall as its cells' lines of 9 px text, and the plot as tall as the legend's entries, so a shallow
    # model's cells and legend are not clipped
    lines = max(text.count("<br>") + 1 for text in cells.flat)
    plot_height = max(n_layers * (HEAD_MAP_LINE * lines + 10), HEAD_MAP_LEGEND_ENTRY * len(present))
    figure.update_layout(title=f"Attention heads by kind (label where lift >= {LABEL_THRESHOLD}; inert: writes or "
                               f"costs nothing)", template="plotly_white",
                         xaxis=dict(title="head", dtick=1), yaxis=dict(title="layer", dtick=1, autorange="reversed"),
                         margin=dict(t=HEAD_MAP_MARGINS[0], b=HEAD_MAP_MARGINS[1]),
                         height=sum(HEAD_MAP_MARGINS) + plot_height, width=460 + 90 * n_heads)
    return figure


def attention_view_html(model, batch: LegoBatch, task: LegoTask, heads: list[tuple[int, int]], index: int = 0) -> str:
    """circuitsvis view of the chosen heads on sentence ``index``, with its JavaScript inlined (works offline)."""
    length = int((batch.tokens[index] != PAD).sum())
    patterns = attention_patterns(model, batch[index:index + 1])[:, 0, :, :length, :length]  # (L, H, T, T)
    chosen = torch.stack([patterns[layer, head] for layer, head in heads]).cpu()
    view = circuitsvis.attention.attention_heads(attention=chosen, tokens=task.token_strings(batch.tokens[index, :length]),
                                                 attention_head_names=[f"L{l}H{h}" for l, h in heads], mask_upper_tri=False)
    return view.local_src

"""Activation patching on LEGO: which activations carry each answer?

Clean and corrupted sentences differ in one controlled place: the operator of the clause at chain depth k
(:func:`flip_sign`) or the root literal (:func:`flip_root`).  All sentences of a pair batch share one clause
order, so a position means the same token role in every sentence.  The metric is the normalised logit
difference over the variables whose value the corruption changes: 1 where a patch restores the clean answers,
0 where it leaves the corrupted ones.

Exact patching copies a clean activation into the corrupted run (the direction of
``transformer_lens.patching.get_act_patch_*``) and runs only the layers after the patch, from the corrupted
run's cached residual stream, with all the patched variants of a layer stacked into one batch.  Attribution
patching estimates every site at once from one forward and one backward pass:
``(clean - corrupted) . d metric / d activation``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from legointerp.evaluate import clause_logits
from legointerp.task import CLAUSE_LEN, LegoBatch, LegoError, LegoTask

Metric = Callable[[torch.Tensor], torch.Tensor]  # logits (B, T, C) -> scalar


@dataclass
class PatchingPair:
    clean: LegoBatch
    corrupted: LegoBatch
    affected: torch.Tensor  # (B, n) bool: chain positions whose value the corruption changes


def aligned(batch: LegoBatch, template: int = 0) -> LegoBatch:
    """The same sentences with every one's clauses in the slot order of sentence ``template``."""
    if bool((batch.lengths != batch.values.shape[1]).any()):
        raise LegoError("patching needs full-length sentences: sample the batch without min_length")
    B, n = batch.values.shape
    offsets = torch.arange(CLAUSE_LEN)
    clauses = batch.tokens.gather(1, (batch.clause_pos[:, :, None] + offsets).flatten(1)).view(B, n, CLAUSE_LEN)
    clause_pos = batch.clause_pos[template].expand(B, n)
    tokens = batch.tokens.clone()
    tokens.scatter_(1, (clause_pos[:, :, None] + offsets).flatten(1), clauses.flatten(1))
    return LegoBatch(tokens=tokens, clause_pos=clause_pos.clone(), operand_pos=clause_pos + 3, values=batch.values,
                     ops=batch.ops, depth=batch.depth, lengths=batch.lengths)


def _rewritten(task: LegoTask, batch: LegoBatch, ops: torch.Tensor, root: torch.Tensor) -> LegoBatch:
    tokens = batch.tokens.clone()
    tokens.scatter_(1, batch.clause_pos + 2, task.op_offset + ops)
    tokens.scatter_(1, batch.operand_pos[:, :1], (task.literal_offset + root)[:, None])
    return LegoBatch(tokens=tokens, clause_pos=batch.clause_pos, operand_pos=batch.operand_pos,
                     values=task.chain_values(ops, root), ops=ops, depth=batch.depth, lengths=batch.lengths)


def _pair(task: LegoTask, batch: LegoBatch, ops: torch.Tensor, root: torch.Tensor) -> PatchingPair:
    clean = aligned(batch)
    corrupted = _rewritten(task, clean, ops, root)
    return PatchingPair(clean, corrupted, corrupted.values != clean.values)


def flip_sign(task: LegoTask, batch: LegoBatch, depth: int) -> PatchingPair:
    """Corrupt the operator of the clause at chain depth ``depth`` (to the next group element)."""
    ops = batch.ops.clone()
    ops[:, depth] = (ops[:, depth] + 1) % task.group.n_ops
    return _pair(task, batch, ops, task.root(batch))


def flip_root(task: LegoTask, batch: LegoBatch) -> PatchingPair:
    """Corrupt the root literal (to the next element of the set)."""
    return _pair(task, batch, batch.ops, (task.root(batch) + 1) % task.group.n_literals)


def logit_difference(logits: torch.Tensor, pair: PatchingPair) -> torch.Tensor:
    """Mean over affected variables of logit(clean value) - logit(corrupted value); logits (B, T, C) -> scalar."""
    at_variables = clause_logits(logits, pair.clean)
    clean = at_variables.gather(-1, pair.clean.values[..., None]).squeeze(-1)
    corrupted = at_variables.gather(-1, pair.corrupted.values[..., None]).squeeze(-1)
    return ((clean - corrupted) * pair.affected).sum() / pair.affected.sum().clamp(min=1)


@torch.no_grad()
def normalised_metric(model, pair: PatchingPair) -> Metric:
    """Logit difference rescaled so that the corrupted run scores 0 and the clean run 1."""
    low = logit_difference(model(pair.corrupted.tokens), pair)
    high = logit_difference(model(pair.clean.tokens), pair)
    return lambda logits: (logit_difference(logits, pair) - low) / (high - low)


def _caches(model, pair: PatchingPair, hook: str):
    names = lambda name: name.endswith(hook)  # noqa: E731
    _, clean = model.run_with_cache(pair.clean.tokens, names_filter=names)
    _, corrupted = model.run_with_cache(pair.corrupted.tokens, names_filter=lambda n: n.endswith("hook_resid_pre") or names(n))
    return clean, corrupted


@torch.no_grad()
def patch_resid_pre(model, pair: PatchingPair, metric: Metric, max_batch: int = 4096) -> torch.Tensor:
    """(n_layers, T): the metric after patching the clean ``resid_pre`` at one (layer, position) into the corrupted run."""
    clean, corrupted = _caches(model, pair, "hook_resid_pre")
    B, T = pair.clean.tokens.shape
    result = torch.empty(model.cfg.n_layers, T)
    for layer in range(model.cfg.n_layers):
        base, source = corrupted["resid_pre", layer], clean["resid_pre", layer]
        for positions in torch.arange(T).split(max(1, max_batch // B)):
            resid = base.repeat(len(positions), 1, 1, 1)  # (V, B, T, D): one variant per patched position
            resid[torch.arange(len(positions)), :, positions] = source[:, positions].transpose(0, 1)
            logits = model(resid.flatten(0, 1), start_at_layer=layer).unflatten(0, (len(positions), B))
            result[layer, positions] = torch.stack([metric(variant) for variant in logits]).cpu()
    return result


@torch.no_grad()
def patch_head_z(model, pair: PatchingPair, metric: Metric, max_batch: int = 4096) -> torch.Tensor:
    """(n_layers, T, n_heads): the metric after patching one head's clean ``z`` at one position."""
    clean, corrupted = _caches(model, pair, "attn.hook_z")
    B, T = pair.clean.tokens.shape
    H = model.cfg.n_heads
    result = torch.empty(model.cfg.n_layers, T, H)
    sites = torch.cartesian_prod(torch.arange(T), torch.arange(H))  # (T * H, 2): every (position, head)
    for layer in range(model.cfg.n_layers):
        source = clean["z", layer]  # (B, T, H, E)
        for chunk in sites.split(max(1, max_batch // B)):
            positions, heads = chunk[:, 0], chunk[:, 1]

            def patch(z, hook):
                z = z.unflatten(0, (len(chunk), B)).clone()
                z[torch.arange(len(chunk)), :, positions, heads] = source[:, positions, heads].transpose(0, 1)
                return z.flatten(0, 1)

            resid = corrupted["resid_pre", layer].repeat(len(chunk), 1, 1)
            logits = model.run_with_hooks(resid, start_at_layer=layer, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", patch)])
            scores = torch.stack([metric(variant) for variant in logits.unflatten(0, (len(chunk), B))])
            result[layer, positions, heads] = scores.cpu()
    return result


def attribution(model, pair: PatchingPair, metric: Metric) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear estimates of :func:`patch_resid_pre` and :func:`patch_head_z` minus the corrupted score, from one
    forward and one backward pass: ``(n_layers, T)`` and ``(n_layers, T, n_heads)``."""
    wanted = lambda name: name.endswith(("hook_resid_pre", "attn.hook_z"))  # noqa: E731
    with torch.no_grad():
        _, clean = model.run_with_cache(pair.clean.tokens, names_filter=wanted)
    activations = {}

    def keep(activation, hook):
        activation.retain_grad()
        activations[hook.name] = activation

    hooks = [(name, keep) for name in clean.keys()]
    with torch.enable_grad():
        metric(model.run_with_hooks(pair.corrupted.tokens, fwd_hooks=hooks)).backward()
    model.zero_grad(set_to_none=True)
    estimate = {name: ((clean[name] - act.detach()) * act.grad).sum(0) for name, act in activations.items()}
    L = model.cfg.n_layers
    resid = torch.stack([estimate[f"blocks.{l}.hook_resid_pre"].sum(-1) for l in range(L)])
    heads = torch.stack([estimate[f"blocks.{l}.attn.hook_z"].sum(-1) for l in range(L)])
    return resid.cpu(), heads.cpu()


@dataclass
class PatchingResult:
    corruption: str
    positions: list[str]  # "position:token #depth" of the template sentence (the clause's chain depth), for axes
    resid_pre: torch.Tensor  # (n_layers, T) exact
    attribution_resid: torch.Tensor  # (n_layers, T)
    head_z: torch.Tensor | None  # (n_layers, T, n_heads) exact
    attribution_head: torch.Tensor  # (n_layers, T, n_heads)

    @property
    def agreement(self) -> float:
        """Pearson correlation of attribution with exact patching over all residual sites (and head sites)."""
        exact = [self.resid_pre.flatten()] + ([self.head_z.flatten()] if self.head_z is not None else [])
        estimate = [self.attribution_resid.flatten()] + ([self.attribution_head.flatten()] if self.head_z is not None else [])
        return float(torch.corrcoef(torch.stack([torch.cat(exact), torch.cat(estimate)]))[0, 1])

    def to_frame(self) -> pd.DataFrame:
        """One row per residual site (head = -1) and per head site: exact score and attribution estimate."""
        L, T = self.resid_pre.shape
        layer, position = torch.meshgrid(torch.arange(L), torch.arange(T), indexing="ij")
        frames = [pd.DataFrame({"site": "resid_pre", "layer": layer.flatten(), "position": position.flatten(), "head": -1,
                                "exact": self.resid_pre.flatten(), "attribution": self.attribution_resid.flatten()})]
        if self.head_z is not None:
            H = self.head_z.shape[-1]
            layer, position, head = torch.meshgrid(torch.arange(L), torch.arange(T), torch.arange(H), indexing="ij")
            frames.append(pd.DataFrame({"site": "head_z", "layer": layer.flatten(), "position": position.flatten(),
                                        "head": head.flatten(), "exact": self.head_z.flatten(),
                                        "attribution": self.attribution_head.flatten()}))
        frame = pd.concat(frames, ignore_index=True)
        frame.insert(3, "token", [self.positions[p] for p in frame["position"]])
        return frame

    def to_dict(self) -> dict:
        return {"corruption": self.corruption, "positions": self.positions, "resid_pre": self.resid_pre.tolist(),
                "attribution_resid": self.attribution_resid.tolist(),
                "head_z": None if self.head_z is None else self.head_z.tolist(),
                "attribution_head": self.attribution_head.tolist(), "agreement": self.agreement}

    def plot(self) -> go.Figure:
        return patching_figure(self)


def patch(model, batch: LegoBatch, task: LegoTask, corruption: str = "sign", depth: int = 0, heads: bool = True
          ) -> PatchingResult:
    """Exact and attribution patching of one corruption (``"sign"`` at chain depth ``depth``, or ``"root"``)."""
    if corruption == "root":
        pair = flip_root(task, batch)
    elif corruption == "sign":
        if not 0 <= depth < batch.values.shape[1]:
            raise LegoError(f"depth {depth} is not a chain depth of these sentences (0..{batch.values.shape[1] - 1})")
        pair = flip_sign(task, batch, depth)
    else:
        raise LegoError(f"unknown corruption {corruption!r}: use sign or root")
    metric = normalised_metric(model, pair)
    attribution_resid, attribution_head = attribution(model, pair, metric)
    tokens = task.token_strings(pair.clean.tokens[0])
    clause_depth = {int(start) + offset: k for k, start in enumerate(pair.clean.clause_pos[0]) for offset in range(CLAUSE_LEN)}
    labels = [f"{p}:{t}" + (f" #{clause_depth[p]}" if p in clause_depth else "") for p, t in enumerate(tokens)]
    described = "the root literal" if corruption == "root" else f"the operator at chain depth {depth}"
    return PatchingResult(corruption=f"flip {described}", positions=labels,
                          resid_pre=patch_resid_pre(model, pair, metric), attribution_resid=attribution_resid,
                          head_z=patch_head_z(model, pair, metric) if heads else None, attribution_head=attribution_head)


def patching_figure(result: PatchingResult) -> go.Figure:
    """Exact residual patching (layer x position, tokens of the template sentence on the axis) over its attribution estimate."""
    figure = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                           subplot_titles=["exact patching of resid_pre",
                                           f"attribution estimate (agreement r = {result.agreement:.2f})"])
    for row, matrix in enumerate([result.resid_pre, result.attribution_resid], start=1):
        figure.add_trace(go.Heatmap(z=matrix.numpy(), x=result.positions, colorscale="RdBu", zmid=0,
                                    showscale=row == 1, hovertemplate="%{x}<br>layer %{y}<br>%{z:.3f}<extra></extra>"),
                         row=row, col=1)
    figure.update_yaxes(title="layer", autorange="reversed", dtick=1)
    figure.update_xaxes(title="position:token #chain depth of its clause", row=2, col=1)
    figure.update_layout(title=f"Activation patching: {result.corruption} (1 = clean answers restored)",
                         template="plotly_white", height=640)
    return figure

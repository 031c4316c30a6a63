"""Activation patching on LEGO: which activations carry each answer?

Clean and corrupted sentences differ in one controlled place: the operator of the clause at chain depth k
(:func:`flip_sign`) or the root literal (:func:`flip_root`).  All sentences of a pair batch share one clause
order, so a position means the same token role in every sentence.  The metric is the normalised logit
difference over the variables whose value the corruption changes: 1 where a patch restores the clean answers,
0 where it leaves the corrupted ones.

Exact patching copies a clean activation into the corrupted run (the direction of
``transformer_lens.patching.get_act_patch_*``; equal to it within 1e-6) and runs only what the patch can change:
the blocks from the patched layer on (from the next one for a head, whose write changes one position), all the
variants of a layer stacked into one batch, the last block only at the clause-first tokens the metric reads, and
no run at all for a site where clean and corrupted agree.  The attribution estimates every site from gradients:
attribution patching (one gradient at the corrupted run) or integrated gradients over a few steps from the
corrupted to the clean activations of each layer.  How well either agrees with exact patching is measured on the
sentences at hand and stored in the result (:attr:`PatchingResult.agreements`): it is an estimate, not the map.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from legointerp.evaluate import Inference, clause_logits
from legointerp.model import require_writes_at_z
from legointerp.task import CLAUSE_LEN, LegoBatch, LegoError, LegoTask

Metric = Callable[[torch.Tensor], torch.Tensor]  # logits (B, T, C) -> scalar
ESTIMATE_CLIP = 2.0  # the estimate's colours stop at this many times the largest exact effect


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
    offsets = torch.arange(CLAUSE_LEN, device=batch.tokens.device)
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


def _caches(model, pair: PatchingPair, hooks: tuple[str, ...]):
    """Clean and corrupted activations at the hook names ending in ``hooks``, from one forward pass each."""
    wanted = lambda name: name.endswith(hooks)  # noqa: E731
    return (model.run_with_cache(pair.clean.tokens, names_filter=wanted)[1],
            model.run_with_cache(pair.corrupted.tokens, names_filter=wanted)[1])


def _scores(metric: Metric, logits: torch.Tensor, readout: torch.Tensor, T: int) -> torch.Tensor:
    """(V, B, R, C) logits at the read-out positions ``readout`` (B, R) -> (V,) the metric of each variant.
    The metric is handed full (B, T, C) logits, NaN where the patched runs never computed them (NaN, not 0, so a
    metric that reads elsewhere fails loudly)."""
    V, B, R, C = logits.shape
    full = torch.full((V, B, T, C), float("nan"), dtype=logits.dtype, device=logits.device)
    full.scatter_(2, readout[None, :, :, None].expand(V, -1, -1, C), logits)
    return torch.stack([metric(variant) for variant in full])


@torch.no_grad()
def _run_variants(engine: Inference, metric: Metric, base: torch.Tensor, positions: torch.Tensor,
                  values: torch.Tensor, start: int, readout: torch.Tensor, max_batch: int,
                  patterns: torch.Tensor | None) -> torch.Tensor:
    """(S,) the metric of S patched runs: run s is ``base`` (B, T, D), the residual stream entering block ``start``,
    with position ``positions[s]`` set to ``values[:, s]`` (values: (B, S, D)); hardcoded heads keep the corrupted
    run's ``patterns``, as in TransformerLens's patching.  Variants run stacked, max_batch sentences per call."""
    B, T, _ = base.shape
    scores = []
    for chunk in torch.arange(len(positions)).split(max(1, max_batch // B)):
        resid = base.repeat(len(chunk), 1, 1, 1)  # (V, B, T, D)
        resid[torch.arange(len(chunk)), :, positions[chunk]] = values[:, chunk].transpose(0, 1)
        variants = None if patterns is None else patterns.repeat(len(chunk), 1, 1, 1)
        logits = engine.run(resid.flatten(0, 1), readout.repeat(len(chunk), 1), start=start, patterns=variants)
        scores.append(_scores(metric, logits.unflatten(0, (len(chunk), B)), readout, T))
    return torch.cat(scores) if scores else torch.empty(0)


@torch.no_grad()
def patch_resid_pre(model, pair: PatchingPair, metric: Metric, max_batch: int = 1024) -> torch.Tensor:
    """(n_layers, T): the metric after patching the clean ``resid_pre`` at one (layer, position) into the corrupted run.

    Each variant runs only the blocks from the patched layer on, and the last block only at the clause-first tokens
    the metric reads; a site whose clean and corrupted activations are equal (at layer 0, every position but the
    corrupted token) scores the corrupted run's metric without a run."""
    clean, corrupted = _caches(model, pair, ("hook_resid_pre",))
    engine, readout, patterns = Inference(model), pair.clean.clause_pos, model.fixed_patterns(pair.corrupted.tokens)
    L, T = model.cfg.n_layers, pair.clean.tokens.shape[1]
    baseline = _scores(metric, engine.run(engine.embed(pair.corrupted.tokens), readout, patterns=patterns)[None], readout, T)
    result = baseline.expand(L, T).clone()
    for layer in range(L):
        base, source = corrupted["resid_pre", layer], clean["resid_pre", layer]
        changed = (base != source).any(-1).any(0).nonzero().flatten()
        result[layer, changed] = _run_variants(engine, metric, base, changed, source[:, changed], layer, readout,
                                               max_batch, patterns)
    return result


@torch.no_grad()
def patch_head_z(model, pair: PatchingPair, metric: Metric, max_batch: int = 1024) -> torch.Tensor:
    """(n_layers, T, n_heads): the metric after patching one head's clean ``z`` at one position.

    Patching head h's z at (layer l, position p) changes block l's output only at p, by the head's write
    ``(z_clean - z_corrupted) @ W_O[h]`` and the MLP's answer to it there: so that position's residual stream is
    formed directly and the run starts at block l + 1 (for the last layer, only the read-out remains).  Post-LN,
    the write joins the sum that ``ln1`` normalises before the MLP reads it."""
    require_writes_at_z(model.cfg, "head patching")
    post = model.cfg.norm == "post"
    mid = "hook_resid_mid_unnormalized" if post else "hook_resid_mid"
    clean, corrupted = _caches(model, pair, ("attn.hook_z", mid, "hook_resid_post"))
    engine, readout, patterns = Inference(model), pair.clean.clause_pos, model.fixed_patterns(pair.corrupted.tokens)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    T = pair.clean.tokens.shape[1]
    baseline = _scores(metric, engine.run(engine.embed(pair.corrupted.tokens), readout, patterns=patterns)[None], readout, T)
    result = baseline.expand(L, T, H).clone()
    for layer in range(L):
        difference = clean["z", layer] - corrupted["z", layer]  # (B, T, H, E)
        sites = (difference != 0).any(-1).any(0).nonzero()  # (S, 2): (position, head) where the runs differ
        positions, heads = sites[:, 0], sites[:, 1]
        W_O = model.blocks[layer].attn.W_O.detach()  # (H, E, D)
        write = torch.einsum("bse,sed->bsd", difference[:, positions, heads], W_O[heads])  # (B, S, D)
        resid_mid = corrupted[f"blocks.{layer}.{mid}"][:, positions] + write
        resid_post = engine.mlp(layer, engine.norm(layer, "ln1", resid_mid) if post else resid_mid)
        result[layer, positions, heads] = _run_variants(engine, metric, corrupted["resid_post", layer], positions,
                                                        resid_post, layer + 1, readout, max_batch, patterns)
    return result


def attribution(model, pair: PatchingPair, metric: Metric, steps: int = 1, heads: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradient estimates of :func:`patch_resid_pre` and :func:`patch_head_z` minus the corrupted score:
    ``(n_layers, T)`` and ``(n_layers, T, n_heads)`` (None without ``heads``).

    ``steps=1`` is attribution patching, ``(clean - corrupted) . d metric / d activation`` at the corrupted run,
    every site from one forward and one backward pass.  ``steps > 1`` integrates the gradient along the straight
    line from the corrupted to the clean activations of one site type at one layer (midpoint rule, all steps in one
    batch; a forward and backward pass per layer and site type): a layer's estimates then sum to the exact effect
    of patching the whole layer, and a site that is the only one its layer changes (the corrupted token at layer 0)
    gets its exact effect, as the steps grow."""
    if steps < 1:
        raise LegoError(f"steps={steps}: attribution needs at least one gradient step")
    if heads:
        require_writes_at_z(model.cfg, "head attribution")
    hooks = ("hook_resid_pre", "attn.hook_z") if heads else ("hook_resid_pre",)
    with torch.no_grad():
        clean, corrupted = _caches(model, pair, hooks)
    if steps == 1:
        gradients = _gradients_at_corrupted(model, pair, metric, list(clean.keys()))
    else:
        gradients = {name: _integrated_gradient(model, metric, clean, corrupted, name, steps, pair.corrupted.tokens)
                     for name in clean.keys()}
    estimate = {name: ((clean[name] - corrupted[name]) * gradients[name]).sum(0).sum(-1).cpu() for name in gradients}
    L = model.cfg.n_layers
    resid = torch.stack([estimate[f"blocks.{layer}.hook_resid_pre"] for layer in range(L)])
    return resid, torch.stack([estimate[f"blocks.{layer}.attn.hook_z"] for layer in range(L)]) if heads else None


def _gradients_at_corrupted(model, pair: PatchingPair, metric: Metric, names: list[str]) -> dict[str, torch.Tensor]:
    """d metric / d activation at the corrupted run, for every hook in ``names``."""
    activations = {}

    def keep(activation, hook):
        activation.retain_grad()
        activations[hook.name] = activation

    with torch.enable_grad():
        metric(model.run_with_hooks(pair.corrupted.tokens, fwd_hooks=[(name, keep) for name in names])).backward()
    model.zero_grad(set_to_none=True)
    return {name: activation.grad for name, activation in activations.items()}


def _integrated_gradient(model, metric: Metric, clean, corrupted, name: str, steps: int,
                         tokens: torch.Tensor) -> torch.Tensor:
    """d metric / d activation at hook ``name``, averaged over ``steps`` points on the line from its corrupted to its
    clean value (every other activation of its layer stays corrupted; the later layers follow)."""
    layer = int(name.split(".")[1])
    B = corrupted[name].shape[0]
    alphas = ((torch.arange(steps, device=corrupted[name].device) + 0.5) / steps).view(-1, *[1] * corrupted[name].ndim)
    with torch.enable_grad():
        path = (corrupted[name] + alphas * (clean[name] - corrupted[name])).flatten(0, 1).requires_grad_()
        resid = corrupted[f"blocks.{layer}.hook_resid_pre"].repeat(steps, 1, 1)
        source = tokens.repeat(steps, 1)  # the corrupted ids, for hardcoded heads' patterns
        if name.endswith("hook_resid_pre"):
            logits = model(path, start_at_layer=layer, source_tokens=source)
        else:
            logits = model.run_with_hooks(resid, start_at_layer=layer, source_tokens=source,
                                          fwd_hooks=[(name, lambda z, hook: path)])
        total = sum(metric(step) for step in logits.unflatten(0, (steps, B)))
        (gradient,) = torch.autograd.grad(total, path)
    return gradient.unflatten(0, (steps, B)).mean(0)


def _agreement(exact: torch.Tensor, estimate: torch.Tensor, baseline: float) -> dict:
    """Pearson and Spearman correlation of an estimate with exact patching over the sites of one type."""
    from scipy.stats import pearsonr, spearmanr

    exact, estimate = (exact - baseline).flatten().numpy(), estimate.flatten().numpy()
    return {"sites": len(exact), "pearson": float(pearsonr(exact, estimate)[0]),
            "spearman": float(spearmanr(exact, estimate)[0])}


@dataclass
class PatchingResult:
    corruption: str
    positions: list[str]  # "position:token #depth" of the template sentence (the clause's chain depth), for axes
    resid_pre: torch.Tensor  # (n_layers, T) exact
    attribution_resid: torch.Tensor  # (n_layers, T), an estimate of resid_pre minus the corrupted score
    head_z: torch.Tensor | None  # (n_layers, T, n_heads) exact
    attribution_head: torch.Tensor | None  # (n_layers, T, n_heads)
    attribution_steps: int = 1  # 1: attribution patching; more: integrated gradients over that many steps
    corrupted_score: float = 0.0  # the metric of the corrupted run, which the attribution is measured from

    def __post_init__(self):
        """The scores live on the CPU whatever device computed them: tables and figures read them with numpy."""
        for name in ("resid_pre", "attribution_resid", "head_z", "attribution_head"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).cpu())

    @property
    def agreements(self) -> pd.DataFrame:
        """Per site type (resid_pre, head_z): how many sites, and the Pearson and Spearman (rank) correlation of the
        attribution estimate with exact patching, measured on these sentences."""
        rows = {"resid_pre": _agreement(self.resid_pre, self.attribution_resid, self.corrupted_score)}
        if self.head_z is not None and self.attribution_head is not None:
            rows["head_z"] = _agreement(self.head_z, self.attribution_head, self.corrupted_score)
        return pd.DataFrame.from_dict(rows, orient="index").rename_axis("site").reset_index()

    @property
    def agreement(self) -> float:
        """Pearson correlation of the attribution estimate with exact patching over the residual sites."""
        return float(self.agreements["pearson"].iloc[0])

    def to_frame(self) -> pd.DataFrame:
        """One row per residual site (head = -1) and per head site: exact score and attribution estimate."""
        L, T = self.resid_pre.shape
        layer, position = torch.meshgrid(torch.arange(L), torch.arange(T), indexing="ij")
        frames = [pd.DataFrame({"site": "resid_pre", "layer": layer.flatten(), "position": position.flatten(), "head": -1,
                                "exact": self.resid_pre.flatten(), "attribution": self.attribution_resid.flatten()})]
        if self.head_z is not None:
            H = self.head_z.shape[-1]
            layer, position, head = torch.meshgrid(torch.arange(L), torch.arange(T), torch.arange(H), indexing="ij")
            attribution = self.attribution_head if self.attribution_head is not None else torch.full_like(self.head_z, float("nan"))
            frames.append(pd.DataFrame({"site": "head_z", "layer": layer.flatten(), "position": position.flatten(),
                                        "head": head.flatten(), "exact": self.head_z.flatten(),
                                        "attribution": attribution.flatten()}))
        frame = pd.concat(frames, ignore_index=True)
        frame.insert(3, "token", [self.positions[p] for p in frame["position"]])
        return frame

    def strongest(self, count: int) -> pd.DataFrame:
        """The ``count`` sites whose exact patch moves the metric furthest from the corrupted run, strongest first."""
        frame = self.to_frame()
        effect = (frame["exact"] - self.corrupted_score).abs()
        return frame.loc[effect.sort_values(ascending=False, kind="stable").index[:count]]

    def to_dict(self) -> dict:
        listed = lambda tensor: None if tensor is None else tensor.tolist()  # noqa: E731
        return {"corruption": self.corruption, "positions": self.positions, "resid_pre": self.resid_pre.tolist(),
                "attribution_resid": self.attribution_resid.tolist(), "head_z": listed(self.head_z),
                "attribution_head": listed(self.attribution_head), "attribution_steps": self.attribution_steps,
                "corrupted_score": self.corrupted_score, "agreement": self.agreements.to_dict(orient="records")}

    def plot(self) -> go.Figure:
        return patching_figure(self)


def patch(model, batch: LegoBatch, task: LegoTask, corruption: str = "sign", depth: int = 0, heads: bool = False,
          attribution_steps: int = 4) -> PatchingResult:
    """Exact and attribution patching of one corruption (``"sign"`` at chain depth ``depth``, or ``"root"``):
    every residual site, and with ``heads`` every (layer, position, head) too."""
    batch = batch.to(next(model.parameters()).device)
    if corruption == "root":
        pair = flip_root(task, batch)
    elif corruption == "sign":
        if not 0 <= depth < batch.values.shape[1]:
            raise LegoError(f"depth {depth} is not a chain depth of these sentences (0..{batch.values.shape[1] - 1})")
        pair = flip_sign(task, batch, depth)
    else:
        raise LegoError(f"unknown corruption {corruption!r}: use sign or root")
    metric = normalised_metric(model, pair)
    attribution_resid, attribution_head = attribution(model, pair, metric, steps=attribution_steps, heads=heads)
    tokens = task.token_strings(pair.clean.tokens[0])
    clause_depth = {int(start) + offset: k for k, start in enumerate(pair.clean.clause_pos[0]) for offset in range(CLAUSE_LEN)}
    labels = [f"{p}:{t}" + (f" #{clause_depth[p]}" if p in clause_depth else "") for p, t in enumerate(tokens)]
    described = "the root literal" if corruption == "root" else f"the operator at chain depth {depth}"
    with torch.no_grad():
        corrupted_score = float(metric(model(pair.corrupted.tokens)))
    return PatchingResult(corruption=f"flip {described}", positions=labels,
                          resid_pre=patch_resid_pre(model, pair, metric), attribution_resid=attribution_resid,
                          head_z=patch_head_z(model, pair, metric) if heads else None, attribution_head=attribution_head,
                          attribution_steps=attribution_steps, corrupted_score=corrupted_score)


def estimate_colour_range(result: PatchingResult) -> tuple[float, int]:
    """The estimate's colour range ``(bound, cells beyond it)``: its own largest magnitude (it can be far smaller than
    the exact scores), clipped at ``ESTIMATE_CLIP`` times the largest exact effect, beyond which a gradient has
    blown up (a hand-set model's saturated units: one cell at 4e4 left every other cell blank)."""
    estimate = result.attribution_resid.abs()
    exact = float((result.resid_pre - result.corrupted_score).abs().max())
    bound = float(estimate.max())
    if exact > 0:
        bound = min(bound, ESTIMATE_CLIP * exact)
    return bound, int((estimate > bound).sum())


def patching_figure(result: PatchingResult) -> go.Figure:
    """Exact residual patching (layer x position, tokens of the template sentence on the axis) over its attribution
    estimate, each on its own colour scale (:func:`estimate_colour_range`)."""
    method = ("attribution patching" if result.attribution_steps == 1
              else f"integrated gradients, {result.attribution_steps} steps")
    measured = result.agreements.iloc[0]
    bound, beyond = estimate_colour_range(result)
    clipped = (f"<br>colours clipped at ±{bound:.3g}: {beyond} cells beyond (largest magnitude "
               f"{float(result.attribution_resid.abs().max()):.3g})" if beyond else "")
    figure = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.13 if beyond else 0.1,
                           subplot_titles=["exact patching of resid_pre (1 = clean answers restored)",
                                           f"gradient estimate ({method}) of exact minus corrupted<br>Pearson r = "
                                           f"{measured.pearson:.2f}, Spearman rho = {measured.spearman:.2f} with exact"
                                           + clipped])
    figure.update_annotations(font_size=12)  # so that a two-line title fits write_image's default 700 px
    for row, matrix in enumerate([result.resid_pre, result.attribution_resid], start=1):
        scale = dict(zmid=0) if row == 1 or bound == 0 else dict(zmin=-bound, zmax=bound)
        figure.add_trace(go.Heatmap(z=matrix.numpy(), x=result.positions, colorscale="RdBu", **scale,
                                    colorbar=dict(len=0.45, y=0.78 if row == 1 else 0.22),
                                    hovertemplate="%{x}<br>layer %{y}<br>%{z:.3f}<extra></extra>"), row=row, col=1)
    figure.update_yaxes(title="layer", autorange="reversed", dtick=1)
    figure.update_xaxes(title="position:token #chain depth of its clause", row=2, col=1)
    figure.update_layout(title=f"Activation patching: {result.corruption}", template="plotly_white", height=680,
                         margin=dict(t=110))
    return figure

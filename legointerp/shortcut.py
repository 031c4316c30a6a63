"""Shortcut detection: did the model follow the chain, or read the last variable off the signs? (paper §4.3)

The last variable of a chain is assigned but never read by another clause, and in Task 1 its value is the parity
of the minus signs in the sentence: a model can resolve it by counting, without following the chain, and models
trained from scratch learn it before the middle of the chain.  Four independent pieces of evidence, each saying
shortcut yes, no, or nothing (unavailable):

- **training order**: from the training log, the last position passed 90% test accuracy before most of the
  middle positions (the paper's Figure 3a);
- **probes**: the last depth's linear-probe resolution layer is earlier than the middle depths' median;
- **attention**: a head reads from the last variable's token onto the operator tokens of the sentence, spread over
  many of them (counting signs) rather than on one (following an operand);
- **patching**: flip the operator at the first middle depth, then hold every position except that operator and
  the last variable at its clean activation in every layer.  A model that follows the chain gets the clean answer
  back from its operand's (clean) value; one that counts signs reads the flipped operator directly and keeps the
  corrupted answer.  The score is the normalised logit difference (1 = clean answer, 0 = corrupted).

"Middle" means the depths of the second half of the chain before its end (5..10 at n = 12: the positions the
paper's shortcut regime leaves unsupervised).  The verdict is "shortcut" when at least two pieces say yes and more
say yes than no, "no shortcut" in the mirror case, and "inconclusive" otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from legointerp.heads import attention_patterns
from legointerp.patching import PatchingPair, flip_sign, logit_difference
from legointerp.probes import PercolationResult, percolation
from legointerp.task import PAD, LegoBatch, LegoError, LegoTask

PASS_ACCURACY = 0.9  # a position has been learned once its test accuracy reaches this
OPERATOR_LIFT = 0.5  # attention evidence: the head's mass on operator tokens, as a lift over a uniform head...
OPERATOR_BREADTH = 0.5  # ...spread over at least this fraction of the sentence's operators
SEPARABLE = 1.0  # patching needs the flip to move the variable's logit difference by at least this
THROUGH_CHAIN = 0.5  # patching evidence: below this, the last answer comes from the flipped operator directly
EVIDENCE = ("training order", "probes", "attention", "patching")


def middle_depths(n: int) -> list[int]:
    """The second half of the chain before its end: 5..10 for n = 12, 2..4 for n = 6."""
    return list(range(max(1, n // 2 - 1), n - 1))


def first_passes(log: list[dict], threshold: float = PASS_ACCURACY) -> list[int | None]:
    """Training sentences seen when each chain position first reached ``threshold`` in the log (None: never)."""
    accuracy = np.array([row["accuracy"] for row in log])  # (evaluations, n)
    reached = accuracy >= threshold
    return [int(log[i]["samples"]) if hit else None for i, hit in zip(reached.argmax(0), reached.any(0))]


def _earlier(last: float | None, middle: list[float | None]) -> bool | None:
    """Whether ``last`` comes strictly before the median of ``middle`` (None counts as never); None when the last
    never comes (then the model did not resolve it, by the shortcut or otherwise)."""
    if last is None:
        return False
    return bool(last < np.median([np.inf if m is None else m for m in middle]))


@torch.no_grad()
def operator_attention(model, batch: LegoBatch, middle: list[int]) -> pd.DataFrame:
    """One row per (layer, head): attention from the last variable's token (and, for contrast, the middle
    variables') onto the operator tokens of all clauses.  ``*_lift`` is the mass as a lift over a uniform head,
    ``*_breadth`` the effective number of operators attended (exp of the entropy) over n."""
    patterns = attention_patterns(model, batch).float().cpu()  # (L, B, H, T, T)
    L, B, H, T, _ = patterns.shape
    n = batch.values.shape[1]
    rows = patterns.permute(1, 0, 2, 3, 4).gather(3, batch.clause_pos[:, None, None, :, None].expand(B, L, H, n, T))
    on_operators = rows.gather(4, (batch.clause_pos + 2)[:, None, None, None, :].expand(B, L, H, n, n))  # (B, L, H, q, op)
    mass = on_operators.sum(-1)
    share = on_operators / mass[..., None].clamp(min=1e-12)
    breadth = torch.exp(-(share * share.clamp(min=1e-12).log()).sum(-1)) / n
    uniform = (n / (batch.tokens != PAD).sum(-1).float())[:, None, None, None]
    lift = ((mass - uniform) / (1 - uniform)).mean(0)  # (L, H, q)
    breadth = breadth.mean(0)
    layer, head = torch.meshgrid(torch.arange(L), torch.arange(H), indexing="ij")
    return pd.DataFrame({"layer": layer.flatten(), "head": head.flatten(),
                         "last_lift": lift[..., n - 1].flatten(), "last_breadth": breadth[..., n - 1].flatten(),
                         "middle_lift": lift[..., middle].mean(-1).flatten(),
                         "middle_breadth": breadth[..., middle].mean(-1).flatten()})


def _hold_clean(clean_cache, held: torch.Tensor):
    """Hooks that overwrite ``resid_pre`` at the ``held`` (B, T) positions with the clean run's, in every layer."""
    def hook(resid, hook):
        return torch.where(held[..., None], clean_cache[hook.name], resid)
    return [(name, hook) for name in clean_cache.keys()]


@torch.no_grad()
def through_chain(model, task: LegoTask, batch: LegoBatch, flip_depth: int) -> dict[int, float | None]:
    """Per depth after ``flip_depth``: the normalised logit difference of that variable when the operator at
    ``flip_depth`` is flipped and every other position except the variable's own is held clean in every layer.
    None where the flip moves the variable's logit difference by less than ``SEPARABLE`` (the model does not tell
    the clean answer from the corrupted one, so there is nothing to restore)."""
    pair = flip_sign(task, batch, flip_depth)
    clean_logits, clean_cache = model.run_with_cache(pair.clean.tokens,
                                                     names_filter=lambda name: name.endswith("hook_resid_pre"))
    corrupted_logits = model(pair.corrupted.tokens)
    B, n = pair.clean.values.shape
    rows = torch.arange(B)
    scores = {}
    for depth in range(flip_depth + 1, n):
        held = pair.clean.tokens != PAD
        held[rows, pair.clean.clause_pos[:, flip_depth] + 2] = False  # the flipped operator stays corrupted
        held[rows, pair.clean.clause_pos[:, depth]] = False  # the variable being read computes freely
        target = PatchingPair(pair.clean, pair.corrupted, pair.affected & (torch.arange(n) == depth))
        high, low = logit_difference(clean_logits, target), logit_difference(corrupted_logits, target)
        if float(high - low) < SEPARABLE:
            scores[depth] = None
            continue
        logits = model.run_with_hooks(pair.corrupted.tokens, fwd_hooks=_hold_clean(clean_cache, held))
        scores[depth] = float((logit_difference(logits, target) - low) / (high - low))
    return scores


@dataclass
class ShortcutResult:
    verdict: str  # "shortcut", "no shortcut" or "inconclusive"
    evidence: pd.DataFrame  # one row per piece of evidence: evidence, shortcut (True/False/None), last, middle, reading
    middle: list[int]  # the middle depths compared with the last
    passed_at: list[int | None] | None  # (n,) training sentences when each position reached 90%; None without a log
    resolution_layer: list[int | None]  # (n,) probe resolution layer per depth
    attention: pd.DataFrame  # one row per (layer, head), see :func:`operator_attention`
    flip_depth: int
    through_chain: dict[int, float | None]  # depth -> patching score, depths after flip_depth

    def to_frame(self) -> pd.DataFrame:
        return self.evidence

    def to_dict(self) -> dict:
        clean = lambda x: None if x is None or (isinstance(x, float) and np.isnan(x)) else x  # noqa: E731
        return {"verdict": self.verdict, "middle": self.middle,
                "evidence": [{k: clean(v.item() if hasattr(v, "item") else v) for k, v in row.items()}
                             for row in self.evidence.to_dict(orient="records")],
                "passed_at": self.passed_at, "resolution_layers": self.resolution_layer,
                "attention": self.attention.to_dict(orient="records"), "flip_depth": self.flip_depth,
                "through_chain": {str(k): v for k, v in self.through_chain.items()}}

    def plot(self) -> go.Figure:
        return shortcut_figure(self)


def _verdict(says: list[bool | None]) -> str:
    yes, no = says.count(True), says.count(False)
    if yes >= 2 and yes > no:
        return "shortcut"
    if no >= 2 and no > yes:
        return "no shortcut"
    return "inconclusive"


def detect_shortcut(model, batch: LegoBatch, task: LegoTask, *, log: list[dict] | None = None,
                    probes: PercolationResult | None = None, attention_samples: int = 300,
                    patching_samples: int = 200) -> ShortcutResult:
    """Combine the four pieces of evidence on full-length sentences ``batch``.  ``log``: the training log's rows
    (``legointerp.train.read_log``); ``probes``: a percolation result on this model, computed here if not given."""
    n = batch.values.shape[1]
    if n < 4:
        raise LegoError(f"shortcut detection compares the last variable with the middle of the chain: it needs "
                        f"sentences of at least 4 clauses, these have {n}")
    middle = middle_depths(n)
    rows = []

    passed = first_passes(log) if log else None
    if passed is None:
        rows.append(("training order", None, None, None, "no training log beside the checkpoint"))
    else:
        middle_passed = [passed[k] for k in middle]
        rows.append(("training order", _earlier(passed[-1], middle_passed), passed[-1],
                     None if None in middle_passed else float(np.median(middle_passed)),
                     "training sentences until 90% test accuracy (middle: median; none = some never passed)"))

    probes = probes or percolation(model, batch, task, control=False)
    resolution = probes.resolution_layer
    middle_resolution = [resolution[k] for k in middle]
    rows.append(("probes", _earlier(resolution[-1], middle_resolution), resolution[-1],
                 None if None in middle_resolution else float(np.median(middle_resolution)),
                 f"first layer whose linear probe reaches {probes.threshold:.0%} (middle: median)"))

    attention = operator_attention(model, batch[:attention_samples], middle)
    best = attention.loc[(attention["last_lift"] * (attention["last_breadth"] >= OPERATOR_BREADTH)).idxmax()]
    spread = bool(best["last_lift"] >= OPERATOR_LIFT and best["last_breadth"] >= OPERATOR_BREADTH)
    rows.append(("attention", spread, float(best["last_lift"]), float(best["middle_lift"]),
                 f"L{int(best['layer'])}H{int(best['head'])}: lift of attention onto operator tokens, breadth "
                 f"{best['last_breadth']:.2f} (counts when lift >= {OPERATOR_LIFT} over >= {OPERATOR_BREADTH:.0%} of them)"))

    flip_depth = middle[0]
    scores = through_chain(model, task, batch[:patching_samples], flip_depth)
    last_score = scores[n - 1]
    middle_scores = [scores[k] for k in middle if k in scores and scores[k] is not None]
    rows.append(("patching", None if last_score is None else last_score < THROUGH_CHAIN, last_score,
                 float(np.mean(middle_scores)) if middle_scores else None,
                 f"answer restored through the chain after flipping the operator at depth {flip_depth} "
                 f"(1 = via the chain, 0 = read directly; shortcut below {THROUGH_CHAIN})"))

    evidence = pd.DataFrame(rows, columns=["evidence", "shortcut", "last", "middle", "reading"])
    return ShortcutResult(verdict=_verdict(evidence["shortcut"].tolist()), evidence=evidence, middle=middle,
                          passed_at=passed, resolution_layer=resolution, attention=attention, flip_depth=flip_depth,
                          through_chain=scores)


def shortcut_figure(result: ShortcutResult) -> go.Figure:
    """The four pieces of evidence side by side, the last position in red and the middle ones in blue."""
    n = len(result.resolution_layer)
    colour = ["#e45756" if k == n - 1 else "#4c78a8" if k in result.middle else "#bbbbbb" for k in range(n)]
    figure = make_subplots(rows=2, cols=2, vertical_spacing=0.18, horizontal_spacing=0.1, subplot_titles=[
        "training sentences until 90% accuracy", "probe resolution layer",
        "attention onto operator tokens (best head per layer)", f"answer through the chain (flip at depth {result.flip_depth})"])
    positions = [f"#{k}" for k in range(n)]
    if result.passed_at is not None:
        figure.add_trace(go.Bar(x=positions, y=result.passed_at, marker_color=colour, showlegend=False,
                                hovertemplate="%{x}: %{y} sentences<extra></extra>"), row=1, col=1)
    figure.add_trace(go.Bar(x=positions, y=result.resolution_layer, marker_color=colour, showlegend=False,
                            hovertemplate="depth %{x}: layer %{y}<extra></extra>"), row=1, col=2)
    per_layer = result.attention.groupby("layer")[["last_lift", "middle_lift"]].max()
    for column, name, line in (("last_lift", "last variable", "#e45756"), ("middle_lift", "middle variables", "#4c78a8")):
        figure.add_trace(go.Scatter(x=per_layer.index, y=per_layer[column], name=name, mode="lines+markers",
                                    line_color=line), row=2, col=1)
    depths = list(result.through_chain)
    figure.add_trace(go.Bar(x=[f"#{k}" for k in depths], y=[result.through_chain[k] for k in depths],
                            marker_color=[colour[k] for k in depths], showlegend=False,
                            hovertemplate="%{x}: %{y:.2f}<extra></extra>"), row=2, col=2)
    figure.add_hline(y=THROUGH_CHAIN, line_dash="dot", row=2, col=2)
    figure.update_xaxes(title="layer", row=2, col=1)
    figure.update_yaxes(title="lift over uniform", row=2, col=1)
    figure.update_yaxes(range=[-0.1, 1.1], row=2, col=2)
    figure.update_layout(title=f"Shortcut detection: {result.verdict}", template="plotly_white", height=640,
                         legend=dict(orientation="h", y=-0.12))
    return figure

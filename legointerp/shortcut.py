"""Shortcut detection: did the model follow the chain, or read the last variable off the signs? (paper §4.3)

The last variable of a chain is assigned but never read by another clause, and in Task 1 its value is the parity
of the minus signs in the sentence (for any abelian group: the root acted on by every operator, in any order): a
model can resolve it by counting, without following the chain.  Five independent pieces of evidence, each saying
shortcut yes, no, or nothing:

- **counterfactual** (behaviour): rewire the last clause's operand to an earlier variable so that the chain's value
  and the count disagree, and see which one the model answers.  Not applicable to non-abelian groups (no count gives
  the answer there);
- **training order**: from the learning curves, the last position left chance before most of the middle ones (the
  paper's Figure 3a);
- **probes**: the last depth's linear-probe resolution layer is earlier than the middle depths' median;
- **attention**: a head at some position (the last variable's token, BOS, EOS) spreads its attention over the
  operator tokens, and that position feeds the last answer (resampling its residual stream costs accuracy there);
- **patching**: flip the operator at the first middle depth and hold only the chain's own tokens at their clean
  activations, in every layer (BOS, EOS, the flipped operator and the last clause compute freely).  A chain-follower
  gets the clean answer back through its operand (score 1); a counter, wherever it counts, reads the flip (score 0).

"Middle" means the depths of the second half of the chain before its end (5..10 at n = 12).  The verdict is
"inconclusive" when the last variable is not learned (no mechanism to find); else "shortcut" when at least two pieces
say yes and more say yes than no, "no shortcut" in the mirror case, "inconclusive" otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from legointerp.evaluate import accuracy_by_position, clause_logits
from legointerp.heads import attention_patterns
from legointerp.patching import PatchingPair, flip_sign, logit_difference
from legointerp.probes import PercolationResult, percolation
from legointerp.task import EOS, PAD, CLAUSE_LEN, LegoBatch, LegoError, LegoTask

LEARNED = 0.25  # a position is learned (left chance) once its accuracy is this share of the way from chance to 1
FOLLOWS = 0.7  # counterfactual: the model follows the count (or the chain) on at least this share of sentences
OPERATOR_LIFT = 0.5  # attention: the head's mass on operator tokens, as a lift over a uniform head...
OPERATOR_BREADTH = 0.5  # ...spread over at least this fraction of the sentence's operators
FEEDS = 0.1  # attention: resampling the counting position's residual costs the last answer this much accuracy
SEPARABLE = 1.0  # patching needs the flip to move the variable's logit difference by at least this
THROUGH_CHAIN = 0.5  # patching: below this, the last answer comes from the flipped operator directly
EVIDENCE = ("counterfactual", "training order", "probes", "attention", "patching")
# what each piece of evidence's "last" and "middle" numbers are
EVIDENCE_UNITS = {"counterfactual": "share by count / by chain", "training order": "training sentences",
                  "probes": "layer", "attention": "lift over uniform", "patching": "score (1 = via chain)"}


def middle_depths(n: int) -> list[int]:
    """The second half of the chain before its end: 5..10 for n = 12, 2..4 for n = 6."""
    return list(range(max(1, n // 2 - 1), n - 1))


def learned_level(n_classes: int) -> float:
    """Accuracy above which a position counts as learned: LEARNED of the way from chance to 1."""
    return 1 / n_classes + LEARNED * (1 - 1 / n_classes)


def validate_log(log: list[dict], n: int) -> None:
    """Raise one clear error for a log row that is not {"samples": int, "accuracy": [n numbers], ...}."""
    for i, row in enumerate(log, start=1):
        accuracy = row.get("accuracy") if isinstance(row, dict) else None
        if (not isinstance(row, dict) or not isinstance(row.get("samples"), (int, float)) or not isinstance(accuracy, list)
                or len(accuracy) != n or not all(isinstance(a, (int, float)) for a in accuracy)
                or not isinstance(row.get("longest_chain", n), int)):
            raise LegoError(f"training log row {i} is not {{\"samples\": N, \"accuracy\": [{n} numbers]}}: the log "
                            "is damaged or from another model; move it away to analyse without it")


def _first(log: list[dict], hits: np.ndarray) -> list[int | None]:
    """(evaluations, n) bool -> per position, the training sentences at its first hit (None: never)."""
    return [int(log[i]["samples"]) if hit else None for i, hit in zip(hits.argmax(0), hits.any(0))]


def _admitted(log: list[dict]) -> np.ndarray:
    """(evaluations, n) bool: the curriculum has trained chain position k by this evaluation (``longest_chain``
    beyond it; a row without one trained them all)."""
    n = len(log[0]["accuracy"])
    longest = np.maximum.accumulate([row.get("longest_chain", n) for row in log])  # (evaluations,)
    return longest[:, None] > np.arange(n)


def first_admitted(log: list[dict]) -> list[int | None]:
    """Training sentences at the first evaluation whose curriculum trained each chain position (None: never)."""
    return _first(log, _admitted(log))


def first_learned(log: list[dict], level: float) -> list[int | None]:
    """Training sentences seen when each chain position first reached ``level`` in the log while the curriculum
    trained it (an untrained position's accuracy drifts around chance and can cross the level), None: never."""
    accuracy = np.array([row["accuracy"] for row in log])  # (evaluations, n)
    return _first(log, (accuracy >= level) & _admitted(log))


def training_order(log: list[dict], level: float, middle: list[int]) -> tuple[bool | None, str]:
    """The training-order vote: the last position left chance before most ``middle`` ones, and why it abstains
    where the log cannot tell (the curriculum admitted the last position only once the middle had left chance)."""
    learned_at, admitted_at = first_learned(log, level), first_admitted(log)
    middle_median = float(np.median([np.inf if learned_at[k] is None else learned_at[k] for k in middle]))
    if admitted_at[-1] is not None and admitted_at[-1] >= middle_median:
        return None, (f"abstains: the curriculum trained the last position from {_fmt(admitted_at[-1])} sentences, after "
                      "the middle left chance, so the log cannot tell which came first")
    return _earlier(learned_at[-1], [learned_at[k] for k in middle]), ""


def _earlier(last: float | None, middle: list[float | None]) -> bool | None:
    """Whether ``last`` comes strictly before the median of ``middle`` (None counts as never); None when the last
    never comes (then nothing resolved it, by the shortcut or otherwise)."""
    if last is None:
        return None
    return bool(last < np.median([np.inf if m is None else m for m in middle]))


def is_abelian(task: LegoTask) -> bool:
    act = task.group.act  # (ops, literals): g(h(x)) == h(g(x)) for every g, h, x
    return bool((act[:, act] == act[:, act].transpose(0, 1)).all())


def rewire_last(task: LegoTask, batch: LegoBatch, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Point the last clause's operand at an earlier variable (depth j <= n - 3) chosen so that the chain's new value
    differs from the count's (the old value, the root acted on by every operator).  Returns the rewired tokens (B, T),
    the last variable's new chain value (B,) and which sentences could be rewired that way (B,) bool."""
    B, n = batch.values.shape
    candidates = task.group.act.to(batch.ops.device)[batch.ops[:, n - 1, None], batch.values[:, : n - 2]]  # (B, n - 2): value via depth j
    differs = candidates != batch.values[:, n - 1, None]
    j = (torch.rand(B, n - 2, generator=generator).to(differs.device) * differs).argmax(1)  # drawn on the CPU: the same on any device
    rows = torch.arange(B, device=differs.device)
    tokens = batch.tokens.clone()
    tokens[rows, batch.operand_pos[:, n - 1]] = batch.tokens[rows, batch.clause_pos[rows, j]]
    return tokens, candidates[rows, j], differs.any(1)


@torch.no_grad()
def counterfactual(model, task: LegoTask, batch: LegoBatch, seed: int = 0) -> dict[str, float]:
    """On rewired sentences (chain and count disagree): the share where the last answer is the chain's, the count's."""
    tokens, chain_value, usable = rewire_last(task, batch, torch.Generator().manual_seed(seed))
    device = next(model.parameters()).device
    predicted = clause_logits(model(tokens.to(device)), batch.to(device))[:, -1].argmax(-1).to(tokens.device)
    return {"chain": float((predicted == chain_value)[usable].float().mean()),
            "count": float((predicted == batch.values[:, -1])[usable].float().mean()), "sentences": int(usable.sum())}


def _position_rows(batch: LegoBatch) -> dict[str, torch.Tensor]:
    """(B,) position of each candidate counting site: BOS, EOS, the last variable, the middle variables' first one."""
    B, n = batch.values.shape
    return {"BOS": torch.zeros(B, dtype=torch.long), "EOS": (batch.tokens == EOS).long().argmax(1),
            "last variable": batch.clause_pos[:, n - 1]}


@torch.no_grad()
def operator_attention(model, batch: LegoBatch, middle: list[int]) -> pd.DataFrame:
    """One row per (layer, head, site) for the sites BOS, EOS, the last variable and (for contrast) the middle
    variables: ``lift`` of the mass on the sentence's operator tokens over a uniform head, ``breadth`` the effective
    number of operators attended (exp of the entropy) over n."""
    patterns = attention_patterns(model, batch.to(next(model.parameters()).device)).float().cpu()  # (L, B, H, T, T)
    batch = batch.to("cpu")  # the lifts below end in pandas
    L, B, H, T, _ = patterns.shape
    n = batch.values.shape[1]
    operators = batch.clause_pos + 2  # (B, n)
    uniform = (n / (batch.tokens != PAD).sum(-1).float())[:, None, None]
    sites = {**_position_rows(batch), **{f"#{k}": batch.clause_pos[:, k] for k in middle}}
    frames = []
    for name, position in sites.items():
        rows = patterns.permute(1, 3, 0, 2, 4)[torch.arange(B), position].permute(1, 0, 2, 3)  # (L, B, H, T)
        on_operators = rows.gather(3, operators[None, :, None, :].expand(L, B, H, n))
        mass = on_operators.sum(-1)
        share = on_operators / mass[..., None].clamp(min=1e-12)
        breadth = torch.exp(-(share * share.clamp(min=1e-12).log()).sum(-1)) / n
        lift = ((mass - uniform.squeeze(-1)) / (1 - uniform.squeeze(-1))).mean(1)  # (L, H)
        layer, head = torch.meshgrid(torch.arange(L), torch.arange(H), indexing="ij")
        frames.append(pd.DataFrame({"layer": layer.flatten(), "head": head.flatten(), "site": name,
                                    "lift": lift.flatten(), "breadth": breadth.mean(1).flatten()}))
    return pd.concat(frames, ignore_index=True)


@torch.no_grad()
def feeds_last(model, batch: LegoBatch, site: str, layer: int) -> float:
    """Accuracy of the last answer lost when the residual stream at ``site`` after ``layer`` is taken from another
    sentence (the batch rolled by one), in every later layer."""
    position = _position_rows(batch)[site]
    rows = torch.arange(len(batch))
    donor = torch.roll(rows, 1)
    n_layers = model.cfg.n_layers
    names = [f"blocks.{l}.hook_resid_pre" for l in range(layer + 1, n_layers)]
    if not names:
        return 0.0
    _, cache = model.run_with_cache(batch.tokens, names_filter=names)

    def resample(resid, hook):
        resid = resid.clone()
        resid[rows, position] = cache[hook.name][donor, position[donor]]
        return resid
    logits = model.run_with_hooks(batch.tokens, fwd_hooks=[(name, resample) for name in names])
    clean = accuracy_by_position(model, batch)[-1]
    patched = (clause_logits(logits, batch)[:, -1].argmax(-1) == batch.values[:, -1]).float().mean()
    return float(clean - patched)


def _hold_clean(clean_cache, held: torch.Tensor):
    """Hooks that overwrite ``resid_pre`` at the ``held`` (B, T) positions with the clean run's, in every layer."""
    def hook(resid, hook):
        return torch.where(held[..., None], clean_cache[hook.name], resid)
    return [(name, hook) for name in clean_cache.keys()]


@torch.no_grad()
def through_chain(model, task: LegoTask, batch: LegoBatch, flip_depth: int) -> dict[int, float | None]:
    """Per depth after ``flip_depth``: the normalised logit difference of that variable when the operator at
    ``flip_depth`` is flipped and only the chain's tokens before that variable are held clean in every layer (the
    flipped operator, the variable's own clause, later clauses, BOS and EOS compute freely).  None where the flip
    moves the variable's logit difference by less than ``SEPARABLE`` (nothing to restore)."""
    pair = flip_sign(task, batch, flip_depth)
    clean_logits, clean_cache = model.run_with_cache(pair.clean.tokens,
                                                     names_filter=lambda name: name.endswith("hook_resid_pre"))
    corrupted_logits = model(pair.corrupted.tokens)
    B, n = pair.clean.values.shape
    rows = torch.arange(B, device=pair.clean.tokens.device)
    clause_tokens = pair.clean.clause_pos[:, :, None] + torch.arange(CLAUSE_LEN, device=rows.device)  # (B, n, 5)
    scores = {}
    for depth in range(flip_depth + 1, n):
        held = torch.zeros_like(pair.clean.tokens, dtype=torch.bool)
        held[rows[:, None], clause_tokens[:, :depth].flatten(1)] = True  # the chain up to the variable's operand
        held[rows, pair.clean.clause_pos[:, flip_depth] + 2] = False  # the flipped operator stays corrupted
        target = PatchingPair(pair.clean, pair.corrupted, pair.affected & (torch.arange(n, device=rows.device) == depth))
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
    last_accuracy: float  # accuracy of the last variable on the batch
    learned_at: list[int | None] | None  # (n,) training sentences when each position left chance; None without a log
    resolution_layer: list[int | None]  # (n,) probe resolution layer per depth
    attention: pd.DataFrame  # one row per (layer, head, site), see :func:`operator_attention`
    counterfactual: dict[str, float] | None  # share of rewired sentences answered by the chain / the count
    flip_depth: int
    through_chain: dict[int, float | None]  # depth -> patching score, depths after flip_depth

    def to_frame(self) -> pd.DataFrame:
        return self.evidence

    def to_dict(self) -> dict:
        clean = lambda x: None if x is None or (isinstance(x, float) and np.isnan(x)) else x  # noqa: E731
        return {"verdict": self.verdict, "middle": self.middle, "last_accuracy": self.last_accuracy,
                "evidence": [{k: clean(v.item() if hasattr(v, "item") else v) for k, v in row.items()}
                             for row in self.evidence.to_dict(orient="records")],
                "learned_at": self.learned_at, "resolution_layers": self.resolution_layer,
                "counterfactual": self.counterfactual, "attention": self.attention.to_dict(orient="records"),
                "flip_depth": self.flip_depth, "through_chain": {str(k): v for k, v in self.through_chain.items()}}

    def plot(self) -> go.Figure:
        return shortcut_figure(self)


def _verdict(says: list[bool | None], learned: bool) -> str:
    yes, no = says.count(True), says.count(False)
    if not learned:
        return "inconclusive"
    if yes >= 2 and yes > no:
        return "shortcut"
    if no >= 2 and no > yes:
        return "no shortcut"
    return "inconclusive"


def _fmt(value: float | None) -> str:
    return "none" if value is None else f"{value:,.0f}"


def detect_shortcut(model, batch: LegoBatch, task: LegoTask, *, log: list[dict] | None = None,
                    probes: PercolationResult | None = None, accuracy: torch.Tensor | None = None,
                    attention_samples: int = 300, patching_samples: int = 200) -> ShortcutResult:
    """Combine the five pieces of evidence on full-length sentences ``batch``.  ``log``: the training log's rows
    (``legointerp.train.read_log``); ``probes`` (a percolation result) and ``accuracy`` ((n,) per chain position)
    on this model and batch, each computed here if not given."""
    batch = batch.to(next(model.parameters()).device)
    n = batch.values.shape[1]
    if n < 4:
        raise LegoError(f"shortcut detection compares the last variable with the middle of the chain: it needs "
                        f"sentences of at least 4 clauses, these have {n}")
    middle = middle_depths(n)
    level = learned_level(task.n_classes)
    last_accuracy = float((accuracy_by_position(model, batch) if accuracy is None else accuracy)[-1])
    rows = []

    if is_abelian(task):
        shares = counterfactual(model, task, batch)
        says = True if shares["count"] >= FOLLOWS else False if shares["chain"] >= FOLLOWS else None
        rows.append(("counterfactual", says, shares["count"], shares["chain"],
                     f"last clause rewired so that chain and count disagree ({shares['sentences']} sentences): share "
                     f"answered by the count (last) and by the chain (middle); shortcut at >= {FOLLOWS:.0%}"))
    else:
        shares = None
        rows.append(("counterfactual", None, None, None,
                     f"not applicable: {task.config.group} is not abelian, so no count of operators gives the answer"))

    learned_at = None
    if log:
        validate_log(log, n)
        learned_at = first_learned(log, level)
        middle_learned = [learned_at[k] for k in middle]
        says, abstention = training_order(log, level, middle)
        rows.append(("training order", says, learned_at[-1],
                     None if None in middle_learned else float(np.median(middle_learned)),
                     f"training sentences until test accuracy left chance (>= {level:.3g}); middle: median "
                     f"({_fmt(learned_at[-1])} vs {_fmt(None if None in middle_learned else float(np.median(middle_learned)))})"
                     + (f"; {abstention}" if abstention else "")))
    else:
        rows.append(("training order", None, None, None, "no training log beside the checkpoint"))

    probes = probes or percolation(model, batch, task, control=False)
    resolution = probes.resolution_layer
    middle_resolution = [resolution[k] for k in middle]
    rows.append(("probes", _earlier(resolution[-1], middle_resolution), resolution[-1],
                 None if None in middle_resolution else float(np.median(middle_resolution)),
                 f"first layer whose linear probe reaches {probes.threshold:.0%} (middle: median)"))

    attention = operator_attention(model, batch[:attention_samples], middle)
    spread = attention[(attention["lift"] >= OPERATOR_LIFT) & (attention["breadth"] >= OPERATOR_BREADTH)
                       & ~attention["site"].str.startswith("#")]
    counting = None
    for _, row in spread.sort_values("lift", ascending=False).iterrows():
        lost = 1.0 if row.site == "last variable" else feeds_last(model, batch[:attention_samples], row.site, int(row.layer))
        if lost >= FEEDS:
            counting = (row, lost)
            break
    middle_lift = float(attention.loc[attention["site"].str.startswith("#"), "lift"].max())
    if counting is None:
        best = attention.loc[~attention["site"].str.startswith("#")].sort_values("lift").iloc[-1]
        rows.append(("attention", False, float(best["lift"]), middle_lift,
                     f"no head spreads over the operators (lift >= {OPERATOR_LIFT}, breadth >= {OPERATOR_BREADTH:.0%}) "
                     f"at a position feeding the last answer; strongest: L{int(best.layer)}H{int(best['head'])} at "
                     f"{best.site}, lift {best['lift']:.2f}, breadth {best.breadth:.2f}"))
    else:
        row, lost = counting
        rows.append(("attention", True, float(row["lift"]), middle_lift,
                     f"L{int(row.layer)}H{int(row['head'])} at {row.site} spreads over {row.breadth:.0%} of the operators "
                     f"(lift {row['lift']:.2f}); that position feeds the last answer (resampling it costs {lost:.2f})"))

    flip_depth = middle[0]
    scores = through_chain(model, task, batch[:patching_samples], flip_depth)
    last_score = scores[n - 1]
    middle_scores = [scores[k] for k in middle if k in scores and scores[k] is not None]
    rows.append(("patching", None if last_score is None else last_score < THROUGH_CHAIN, last_score,
                 float(np.mean(middle_scores)) if middle_scores else None,
                 f"answer restored through the chain's own tokens after flipping the operator at depth {flip_depth} "
                 f"(1 = via the chain, 0 = read directly; shortcut below {THROUGH_CHAIN})"
                 + ("" if last_score is not None else f"; abstains: the flip moves the last answer's logit difference "
                    f"by less than {SEPARABLE}, so there is nothing to restore")))

    evidence = pd.DataFrame(rows, columns=["evidence", "shortcut", "last", "middle", "reading"])
    learned = last_accuracy >= level
    return ShortcutResult(verdict=_verdict(evidence["shortcut"].tolist(), learned), evidence=evidence, middle=middle,
                          last_accuracy=last_accuracy, learned_at=learned_at, resolution_layer=resolution,
                          attention=attention, counterfactual=shares, flip_depth=flip_depth, through_chain=scores)


def _missing(values: list, word: str) -> list[str]:
    """A bar label per value: ``word`` where it is None (no bar to see), else nothing."""
    return [word if v is None else "" for v in values]


def _unavailable(figure: go.Figure, why: str, row: int, col: int) -> None:
    """Say in the middle of an empty subplot why it has no data."""
    figure.add_annotation(text=why, x=0.5, y=0.5, xref="x domain", yref="y domain", showarrow=False,
                          font=dict(size=12, color="#666"), row=row, col=col)


def shortcut_figure(result: ShortcutResult) -> go.Figure:
    """The evidence side by side, the last position in red and the middle ones in blue."""
    n = len(result.resolution_layer)
    colour = ["#e45756" if k == n - 1 else "#4c78a8" if k in result.middle else "#bbbbbb" for k in range(n)]
    # two-line subplot titles: at write_image's default 700 px, one-line ones run into their neighbours
    figure = make_subplots(rows=2, cols=3, vertical_spacing=0.2, horizontal_spacing=0.1, subplot_titles=[
        "rewired last clause:<br>answered by", "training sentences until<br>a position left chance",
        "probe resolution<br>layer", "attention onto operators<br>(best head per layer)",
        f"answer through the chain<br>(flip at depth {result.flip_depth})"])
    figure.update_annotations(font_size=12)
    positions = [f"#{k}" for k in range(n)]
    if result.counterfactual is not None:
        figure.add_trace(go.Bar(x=["the count", "the chain"], y=[result.counterfactual["count"], result.counterfactual["chain"]],
                                marker_color=["#e45756", "#4c78a8"], showlegend=False, texttemplate="%{y:.2f}",
                                textposition="outside", hovertemplate="%{x}: %{y:.2f}<extra></extra>"), row=1, col=1)
    else:
        _unavailable(figure, "not applicable:<br>the group is not abelian", row=1, col=1)
    if result.learned_at is not None:
        figure.add_trace(go.Bar(x=positions, y=result.learned_at, marker_color=colour, showlegend=False,
                                text=_missing(result.learned_at, "never"), textposition="outside",
                                hovertemplate="%{x}: %{y:,} sentences<extra></extra>"), row=1, col=2)
    else:
        _unavailable(figure, "no training log", row=1, col=2)
    figure.add_trace(go.Bar(x=positions, y=result.resolution_layer, marker_color=colour, showlegend=False,
                            text=_missing(result.resolution_layer, "never"), textposition="outside",
                            hovertemplate="depth %{x}: layer %{y}<extra></extra>"), row=1, col=3)
    per_layer = result.attention.assign(site=result.attention["site"].where(~result.attention["site"].str.startswith("#"), "middle variables"))
    per_layer = per_layer.groupby(["site", "layer"])["lift"].max().unstack(0)
    line = {"last variable": "#e45756", "middle variables": "#4c78a8", "BOS": "#f2cf5b", "EOS": "#9d9d9d"}
    for site in per_layer:
        figure.add_trace(go.Scatter(x=per_layer.index, y=per_layer[site], name=site, mode="lines+markers",
                                    line_color=line[site]), row=2, col=1)
    depths = list(result.through_chain)
    scores = [result.through_chain[k] for k in depths]
    # a score of 0 (the shortcut's answer) draws no bar: every bar carries its number, or why it has none
    figure.add_trace(go.Bar(x=[f"#{k}" for k in depths], y=scores, marker_color=[colour[k] for k in depths],
                            showlegend=False, text=[f"{v:.2f}" if v is not None else "no effect" for v in scores],
                            textposition="outside", hovertemplate="%{x}: %{y:.2f}<extra></extra>"), row=2, col=2)
    figure.add_hline(y=THROUGH_CHAIN, line_dash="dot", row=2, col=2)
    figure.update_yaxes(title="share of sentences", range=[0, 1.2], row=1, col=1)  # room for the bars' numbers
    figure.update_yaxes(title="sentences", row=1, col=2)
    figure.update_yaxes(title="layer", row=1, col=3)
    figure.update_xaxes(title="layer", dtick=1 if len(per_layer) <= 12 else None, row=2, col=1)
    figure.update_yaxes(title="lift over uniform", row=2, col=1)
    figure.update_yaxes(title="normalised logit difference", range=[-0.1, 1.25], row=2, col=2)
    figure.update_layout(title=f"Shortcut detection: {result.verdict} (red: last variable, blue: middle)",
                         template="plotly_white", height=680, legend=dict(orientation="h", y=-0.12))
    return figure

"""Models whose mechanism is known by construction: the ground truth every analysis is checked against.

An analysis is an instrument; before trusting what it says about a trained model, check that it gives the known
answer here.  Every zoo model is a plain :class:`~legointerp.model.LegoTransformer` with weights set by hand (or left
at their random initialisation), saved in the ordinary checkpoint format, so every command reads it with ``--ckpt``:

- ``chain-follower``: the paper's hardcoded LEGO attention (section 5).  Layer 0 *manipulates* (each clause's first
  token fetches its own operator and operand) and resolves the clause reading the root literal; every later layer
  ``l`` takes one *chain step* (each clause-first token attends to the first token of the clause defining its
  operand and reads its value), so depth ``k`` is resolved by block ``k``, exactly.  Any group: the MLP holds the
  group's action table.
- ``counter-at-last`` (Task 1): the chain-follower, except that the last variable (the one no clause reads, found by
  an *association* head) is answered at layer 0 by the parity of the minus signs, counted by a head spread over the
  operator tokens from the last variable's own token: the paper's shortcut.
- ``counter-at-bos`` (Task 1): the same shortcut with the count gathered at BOS in layer 0 and copied to the last
  variable by a *broadcast* head in layer 1 (a shortcut that a detector looking only at the last token misses).
- ``untrained-bert`` / ``untrained-albert``: the random initialisation, of the bundled model's shapes.

Decoys, built to fool a head classifier (each solves every position; its ground truth is what ``heads`` should say):

- ``shadow-heads``: the chain-follower plus a *shadow* of every planted head (the same queries and keys, so the
  same attention, but W_O = 0): a shadow is inert, however much it looks like the head it copies.
- ``moved-heads``: the chain-follower with its heads at other indices (the chain step moves head every layer) and
  every other head *idle*: random queries, keys and values, W_O = 0 (inert).
- ``both-ends`` (Task 1): the chain resolved from both ends: the last variable counted in layer 0 as in
  ``counter-at-last``, then every block ``l`` takes a chain step (depth ``l``, head 0) and a *reverse step* (depth
  ``n - 1 - l``, head 1: each clause reads the value and operator of the clause that reads it and inverts that
  operator), so ``(n + 1) // 2`` blocks solve the chain.
- ``operand-fetcher``: the chain-follower whose operand-fetching head is read by every token of the clause (each
  attends to its clause's operand, the operand itself included): manipulation at the variable, and at the operand
  an attention on itself that association's mask (identical tokens, itself included) explains as well.
- ``counter-only-last`` (Task 1): the shortcut with the count made in layer 1 by a head that attends to the
  operators from the last variable only (found by the association head of layer 0); every other token rests on BOS.

How it is built.  Each token's residual stream holds named one-hot features (token identity, clause slot and role,
the fetched operand and operator, the resolved value ...).  LayerNorm is made linear: two *ballast* dimensions hold
``+C`` and ``-C`` at every position, so the norm is ``C`` up to 1e-4 whatever else is written, and every reader
cancels the mean with a dimension nothing writes to.  Attention is saturated (score margins >= 15), and each MLP
neuron is a GELU far from its knee, so the hand-set arithmetic is exact to ~1e-4.  Heads with no job keep zero
weights: uniform attention writing nothing (``inert``: attends diffusely).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from legointerp.checkpoint import Checkpoint
from legointerp.model import LegoTransformer, ModelConfig
from legointerp.train import PRESETS
from legointerp.task import BOS, CLAUSE_LEN, LegoError, LegoTask, TaskConfig

D_MODEL, N_HEADS, D_MLP = 160, 4, 48
BALLAST = 1000.0  # |C| of the two ballast dimensions: keeps LayerNorm linear to ~(features / C)^2
SCORE = 30.0  # attention score unit (after the 1/sqrt(d_head) scaling): margins of >= SCORE / 2 saturate softmax
SHARP = 20.0  # MLP pre-activation per unit of feature: GELU(+-SHARP / 2) is linear / zero to 1e-20
GATE = 1000.0  # pre-activation that switches a neuron off (larger than any count * SHARP)
LOGIT = 10.0  # logit of the resolved value over the others
# one-hot variable features: the held-out alphabet would double the width (and the time every analysis takes)
ZOO_TASK = TaskConfig(heldout_alphabet="")


class Features:
    """Named slices of the residual stream."""

    def __init__(self):
        self.size, self.slices = 0, {}

    def add(self, name: str, width: int = 1) -> None:
        self.slices[name] = slice(self.size, self.size + width)
        self.size += width

    def __getitem__(self, name: str) -> slice:
        return self.slices[name]

    def dim(self, name: str, index: int = 0) -> int:
        return self.slices[name].start + index


@dataclass
class ZooModel:
    """A model with its ground truth.  ``heads``: the label ``legointerp heads`` should give every head that has a job
    or looks as if it had one (every other head writes nothing: ``inert``); ``attends``: the designed attention kind
    of inert heads built to look like working ones (a shadow, or a step whose result nothing reads);
    ``resolution_layer[k]``: the first residual site (0 = embeddings, l + 1 = after block l) where depth k is
    decodable; ``shortcut``: whether the last variable is answered by counting (None: no mechanism)."""

    name: str
    model: LegoTransformer
    task: LegoTask
    description: str
    heads: dict[tuple[int, int], str] = field(default_factory=dict)
    resolution_layer: list[int | None] = field(default_factory=list)
    shortcut: bool | None = None
    attends: dict[tuple[int, int], str] = field(default_factory=dict)

    def checkpoint(self) -> Checkpoint:
        known = {"heads": {f"L{l}H{h}": kind for (l, h), kind in sorted(self.heads.items())},
                 "attends": {f"L{l}H{h}": kind for (l, h), kind in sorted(self.attends.items())},
                 "resolution_layer": self.resolution_layer, "shortcut": self.shortcut}
        return Checkpoint(self.model.cfg, self.task.config, self.model.state_dict(),
                          provenance={"command": f"legointerp zoo {self.name}", "zoo": self.name,
                                      "description": self.description, "known": known})


class _Builder:
    """Sets a LegoTransformer's weights feature by feature."""

    def __init__(self, task: LegoTask, n_layers: int, extra: dict[str, int]):
        self.task, self.n = task, task.config.n
        group = task.group
        f = self.features = Features()
        for name, width in [("ballast", 2), ("null", 1), ("bos", 1), ("var", task.d_vocab - task.variable_offset),
                            ("lit", group.n_literals), ("op", group.n_ops), ("is_op", 1), ("slot0", self.n), ("slot2", self.n),
                            ("slot3", self.n), ("role0", 1), ("role3", 1), ("operand", task.d_vocab - task.variable_offset),
                            ("operand_lit", group.n_literals), ("my_op", group.n_ops), ("value", group.n_literals),
                            *[(f"fetched{l}", group.n_literals) for l in range(1, n_layers)], *extra.items()]:
            f.add(name, width)
        if f.size > D_MODEL:
            raise LegoError(f"the hand-built model needs {f.size} residual dimensions, more than {D_MODEL}: use n <= 12 "
                            "and no held-out alphabet")
        self.cfg = ModelConfig(d_vocab=task.d_vocab, d_vocab_out=task.n_classes, n_ctx=task.n_ctx, d_model=D_MODEL,
                               n_heads=N_HEADS, n_layers=n_layers, d_mlp=D_MLP)
        self.model = LegoTransformer(self.cfg)
        with torch.no_grad():
            for p in self.model.parameters():
                p.zero_()
            for ln in [m for b in self.model.blocks for m in (b.ln1, b.ln2)] + [self.model.ln_final]:
                ln.w.fill_(1.0)
        # LayerNorm divides by this (the ballast's share of the norm), so every reader multiplies by it
        self.scale = BALLAST * math.sqrt(2 / D_MODEL)
        self._embed()
        self.neurons = [0] * n_layers

    # ------------------------------------------------------------------ writing and reading features
    def _embed(self) -> None:
        f, task, W_E, W_pos = self.features, self.task, self.model.embed.W_E.data, self.model.pos_embed.W_pos.data
        W_E[:, f.dim("ballast", 0)], W_E[:, f.dim("ballast", 1)] = BALLAST, -BALLAST
        W_E[BOS, f.dim("bos")] = 1
        for v in range(task.d_vocab - task.variable_offset):
            W_E[task.variable_offset + v, f.dim("var", v)] = 1
        for x in range(task.group.n_literals):
            W_E[task.literal_offset + x, f.dim("lit", x)] = 1
        for g in range(task.group.n_ops):
            W_E[task.op_offset + g, f.dim("op", g)] = W_E[task.op_offset + g, f.dim("is_op")] = 1
        for s in range(self.n):
            start = 1 + CLAUSE_LEN * s
            W_pos[start, f.dim("slot0", s)] = W_pos[start, f.dim("role0")] = 1
            W_pos[start + 2, f.dim("slot2", s)] = 1
            W_pos[start + 3, f.dim("slot3", s)] = W_pos[start + 3, f.dim("role3")] = 1

    def reader(self, weights: torch.Tensor) -> torch.Tensor:
        """A (D, ...) map designed on raw features -> the map on LayerNorm's output (mean cancelled, scale undone)."""
        weights = weights * self.scale
        weights[self.features.dim("null")] = -weights.sum(0)
        return weights

    def head(self, layer: int, head: int, query: list[tuple[str, str, float]], key_bias: list[tuple[str, float]],
             copy: list[tuple[str, str]]) -> None:
        """One attention head.  ``query``: (query feature, key feature, score) pairs, matched dimension by dimension
        (one-hot features of equal width) or, with query feature "*", a score for every query on that key feature;
        ``copy``: (read at the key, write at the query) feature pairs moved by the OV circuit."""
        f, attn = self.features, self.model.blocks[layer].attn
        E = self.cfg.d_head
        W_Q, W_K, b_Q = torch.zeros(D_MODEL, E), torch.zeros(D_MODEL, E), torch.zeros(E)
        column = 0
        for q_name, k_name, score in query + [("*", name, s) for name, s in key_bias]:
            keys = range(f[k_name].start, f[k_name].stop)
            for i, k_dim in enumerate(keys):
                if q_name == "*":
                    b_Q[column] = score * math.sqrt(E)
                else:
                    W_Q[f[q_name].start + i, column] = score * math.sqrt(E)
                W_K[k_dim, column] = 1
                column += 1
        W_V, W_O = torch.zeros(D_MODEL, E), torch.zeros(E, D_MODEL)
        column = 0
        for source, target in copy:
            for i in range(f[source].stop - f[source].start):
                W_V[f[source].start + i, column] = 1
                W_O[column, f[target].start + i] = 1
                column += 1
        attn.W_Q.data[head], attn.b_Q.data[head] = self.reader(W_Q), b_Q
        attn.W_K.data[head], attn.W_V.data[head], attn.W_O.data[head] = self.reader(W_K), self.reader(W_V), W_O

    def neuron(self, layer: int, inputs: list[tuple[str, int, float]], bias: float, outputs: list[tuple[str, int, float]]) -> None:
        """One MLP neuron GELU(sum of weight * feature + bias); writes output weight / (SHARP / 2) per unit of activation,
        so a neuron designed to sit at +SHARP / 2 writes exactly the output weights."""
        mlp, f, i = self.model.blocks[layer].mlp, self.features, self.neurons[layer]
        if i >= D_MLP:
            raise LegoError(f"layer {layer} of the hand-built model needs more than {D_MLP} neurons")
        W_in = torch.zeros(D_MODEL)
        for name, index, weight in inputs:
            W_in[f.dim(name, index)] = weight
        mlp.W_in.data[:, i], mlp.b_in.data[i] = self.reader(W_in[:, None])[:, 0], bias
        for name, index, weight in outputs:
            mlp.W_out.data[i, f.dim(name, index)] = weight / (SHARP / 2)
        self.neurons[layer] += 1

    # ------------------------------------------------------------------ the mechanisms
    def manipulation(self, heads: tuple[int, int] = (0, 1), operand_query: str = "slot0") -> None:
        """Layer 0: each clause-first token fetches its own operand (head ``heads[0]``, read by every
        ``operand_query`` position) and operator (``heads[1]``) from keys in its own slot; every other token rests on
        BOS, which carries nothing."""
        sink = [("bos", SCORE / 2)]
        self.head(0, heads[0], [(operand_query, "slot3", SCORE)], sink, [("var", "operand"), ("lit", "operand_lit")])
        self.head(0, heads[1], [("slot0", "slot2", SCORE)], sink, [("op", "my_op")])

    def apply(self, layer: int, operand: str, operator: str = "my_op", inverse: bool = False) -> None:
        """MLP of ``layer``: an unresolved clause whose ``operator`` is g and whose ``operand`` value is x becomes
        g(x) (``inverse``: the y with g(y) = x)."""
        act = self.task.group.act
        for g in range(act.shape[0]):
            for x in range(act.shape[1]):
                result = int((act[g] == x).nonzero()[0, 0]) if inverse else int(act[g, x])
                self.neuron(layer, [(operator, g, SHARP), (operand, x, SHARP)]
                            + [("value", y, -GATE) for y in range(act.shape[1])], -1.5 * SHARP,
                            [("value", result, 1.0)])

    def chain_step(self, layer: int, head: int) -> None:
        """Each clause-first token attends to the first token of the clause defining its operand and reads its value.
        Score: operand match + clause-first key (2 units) beats BOS (1.5) beats a mere match or a clause start (1)."""
        self.head(layer, head, [("operand", "var", SCORE)], [("role0", SCORE), ("bos", 1.5 * SCORE)],
                  [("value", f"fetched{layer}")])
        self.apply(layer, f"fetched{layer}")

    def reverse_step(self, layer: int, head: int) -> None:
        """Each clause-first token attends to the first token of the clause that reads it (whose fetched operand is
        this variable) and reads its value and operator, then inverts that operator: x = g^-1(reader's value)."""
        self.head(layer, head, [("var", "operand", SCORE)], [("role0", SCORE), ("bos", 1.5 * SCORE)],
                  [("value", f"reverse{layer}"), ("my_op", f"reverse_op{layer}")])
        self.apply(layer, f"reverse{layer}", f"reverse_op{layer}", inverse=True)

    def shadow(self, layer: int, head: int, of: int) -> None:
        """Head ``head`` attends exactly like head ``of`` of the same layer (and reads the same values) but W_O = 0."""
        attn = self.model.blocks[layer].attn
        for name in ("W_Q", "b_Q", "W_K", "b_K", "W_V", "b_V"):
            getattr(attn, name).data[head] = getattr(attn, name).data[of]
        attn.W_O.data[head] = 0

    def idle(self, layer: int, head: int, generator: torch.Generator) -> None:
        """Random queries, keys and values on the features (a structured attention of no kind) and W_O = 0."""
        attn, E = self.model.blocks[layer].attn, self.cfg.d_head
        for name in ("W_Q", "W_K", "W_V"):
            weights = torch.randn(D_MODEL, E, generator=generator)
            weights[self.features["ballast"]] = 0
            getattr(attn, name).data[head] = self.reader(weights)
        attn.W_O.data[head] = 0

    def clause_slots(self) -> None:
        """The one-hot ``clause`` feature: the clause's slot at every one of its tokens."""
        for s in range(self.n):
            self.model.pos_embed.W_pos.data[1 + CLAUSE_LEN * s:1 + CLAUSE_LEN * (s + 1), self.features.dim("clause", s)] = 1

    def unembed(self) -> None:
        W_U = torch.zeros(D_MODEL, self.task.n_classes)
        for x in range(self.task.n_classes):
            W_U[self.features.dim("value", x), x] = LOGIT
        self.model.unembed.W_U.data = self.reader(W_U)

    def association(self, layer: int, head: int) -> None:
        """Each variable token attends to the occurrence of the same variable as an operand (itself, for an operand
        token); the last variable, read by no clause, finds none and rests on BOS.  Writes ``used``."""
        self.head(layer, head, [("var", "var", SCORE)], [("role3", SCORE), ("bos", 1.5 * SCORE)], [("role3", "used")])

    def parity(self, layer: int, count: str, gate: list[tuple[str, int, float]], gate_bias: float, out: str,
               scale: float = 1.0) -> None:
        """Writes ``scale`` times the parity of ``count`` * n minus signs as a value one-hot into ``out`` where the gate
        is open: odd = sum_j (-1)^(j+1) [c >= j], each step the difference of two GELU ramps one unit apart."""
        minus, plus = 1, 0
        n = self.n
        self.neuron(layer, gate, gate_bias + SHARP / 2, [(out, plus, scale)])  # even until a step says otherwise
        for j in range(1, n + 1):
            sign = scale if j % 2 else -scale
            for offset, weight in ((1 - j, 1.0), (-j, -1.0)):
                step = [(out, minus, sign * weight * 0.5), (out, plus, -sign * weight * 0.5)]
                self.neuron(layer, [(count, minus, SHARP * n)] + gate, gate_bias + SHARP * offset, step)

    def count_minus(self, layer: int, head: int, query_feature: str) -> None:
        """A head from ``query_feature`` positions spread evenly over the operator tokens (every other position rests on
        BOS): writes the share of each operator, so ``count[1]`` * n is the number of minus signs."""
        self.head(layer, head, [(query_feature, "is_op", SCORE)], [("bos", SCORE / 2)], [("op", "count")])

    def copy_where(self, layer: int, source: str, gate: list[tuple[str, int, float]], gate_bias: float, out: str,
                   weight: float = 1.0) -> None:
        """MLP neurons adding ``weight`` times the one-hot ``source`` to ``out`` where the gate is open."""
        for x in range(self.features[source].stop - self.features[source].start):
            self.neuron(layer, [(source, x, SHARP)] + gate, gate_bias - SHARP / 2, [(out, x, weight)])

def _follower(task: LegoTask, extra: dict[str, int] | None = None, manipulation: tuple[int, int] = (0, 1),
              chain_head=lambda layer: 0, operand_query: str = "slot0") -> tuple[_Builder, dict[tuple[int, int], str]]:
    """The chain-follower's weights with its heads where given (``chain_head(layer)``: the chain step's index), and
    its planted heads."""
    n = task.config.n
    b = _Builder(task, n_layers=n, extra={**({"clause": n} if operand_query == "clause" else {}), **(extra or {})})
    if operand_query == "clause":
        b.clause_slots()
    b.manipulation(manipulation, operand_query)
    b.apply(0, "operand_lit")
    for layer in range(1, n):
        b.chain_step(layer, chain_head(layer))
    b.unembed()
    return b, {(0, manipulation[0]): "manipulation", (0, manipulation[1]): "manipulation",
               **{(layer, chain_head(layer)): "chain step" for layer in range(1, n)}}


def chain_follower(task_config: TaskConfig = ZOO_TASK) -> ZooModel:
    """The hardcoded chain-follower: depth k resolved by block k (see the module docstring)."""
    task = LegoTask(task_config)
    b, heads = _follower(task)
    return ZooModel("chain-follower", b.model, task, "hand-set chain-follower: manipulation in layer 0, one chain "
                    "step per later layer", heads, list(range(1, task.config.n + 1)), shortcut=False)


def shadow_heads(task_config: TaskConfig = ZOO_TASK) -> ZooModel:
    """The chain-follower plus a shadow (same attention, W_O = 0) of each planted head: L0H2, L0H3 and L{l}H1."""
    task = LegoTask(task_config)
    n = task.config.n
    b, heads = _follower(task)
    shadows = {(0, 2): 0, (0, 3): 1, **{(layer, 1): 0 for layer in range(1, n)}}
    for (layer, head), of in shadows.items():
        b.shadow(layer, head, of)
    attends = {site: heads[(site[0], of)] for site, of in shadows.items()}
    return ZooModel("shadow-heads", b.model, task, "decoy: the chain-follower plus a shadow of every planted head "
                    "(its attention exactly, W_O = 0)", {**heads, **dict.fromkeys(shadows, "inert")},
                    list(range(1, n + 1)), shortcut=False, attends=attends)


def moved_heads(task_config: TaskConfig = ZOO_TASK, seed: int = 0) -> ZooModel:
    """The chain-follower with manipulation at L0H2, L0H3, the chain step at head ``l % 4`` of layer l, and every other
    head idle (random queries, keys and values; W_O = 0)."""
    task = LegoTask(task_config)
    n = task.config.n
    b, heads = _follower(task, manipulation=(2, 3), chain_head=lambda layer: layer % N_HEADS)
    generator = torch.Generator().manual_seed(seed)
    idle = [(layer, head) for layer in range(n) for head in range(N_HEADS) if (layer, head) not in heads]
    for layer, head in idle:
        b.idle(layer, head, generator)
    return ZooModel("moved-heads", b.model, task, "decoy: the chain-follower's heads at other indices, every other "
                    "head random with W_O = 0", {**heads, **dict.fromkeys(idle, "inert")}, list(range(1, n + 1)),
                    shortcut=False)


def operand_fetcher(task_config: TaskConfig = ZOO_TASK) -> ZooModel:
    """The chain-follower whose operand-fetching head L0H0 is read by every token of the clause: at the operand it
    attends to itself, which association's mask (identical tokens) explains as fully as manipulation does the rest."""
    task = LegoTask(task_config)
    b, heads = _follower(task, operand_query="clause")
    return ZooModel("operand-fetcher", b.model, task, "decoy: the chain-follower whose L0H0 brings each clause's "
                    "operand to every token of the clause (the operand attends to itself)", heads,
                    list(range(1, task.config.n + 1)), shortcut=False)


def _require_sign_count(task_config: TaskConfig) -> None:
    if task_config.group not in ("task1", "s2") or task_config.random_root:
        raise LegoError("the sign counter needs Task 1 with the root fixed at 1: the parity of the minus signs is the "
                        "last value only there")


UNUSED_CLAUSE_START = [("role0", 0, GATE), ("used", 0, -GATE)]  # a gate open (0) only at the last variable's token


def _count_at_last(b: _Builder) -> None:
    """Layer 0 of the counters: manipulation, the root clause, association (L0H2) and the sign count read by every
    clause-first token (L0H3), whose parity answers the last variable."""
    b.manipulation()
    b.apply(0, "operand_lit")
    b.association(0, 2)
    b.count_minus(0, 3, "role0")
    b.parity(0, "count", UNUSED_CLAUSE_START, -GATE, "value")


def sign_counter(where: str = "last", task_config: TaskConfig = ZOO_TASK) -> ZooModel:
    """The chain-follower whose last variable is answered by the parity of the minus signs instead, counted at the
    last variable's own token by a head read by every clause-first token (``where="last"``), at BOS and copied by a
    broadcast head (``where="bos"``), or in layer 1 by a head that only the last variable's token reads
    (``where="only-last"``: it needs layer 0's association head to know which token that is)."""
    _require_sign_count(task_config)
    if where not in ("last", "bos", "only-last"):
        raise LegoError(f"where={where!r}: the count is gathered at 'last', 'bos' or 'only-last'")
    task = LegoTask(task_config)
    n = task.config.n
    b = _Builder(task, n_layers=n, extra={"used": 1, "count": task.group.n_ops, "parity": 2, "broadcast_parity": 2})
    if where == "last":
        _count_at_last(b)
        planted = {(0, 3): "operators"}
    else:
        b.manipulation()
        b.apply(0, "operand_lit")
        b.association(0, 2)
    if where == "bos":
        b.count_minus(0, 3, "bos")
        b.parity(0, "count", [("bos", 0, GATE)], -GATE, "parity")
        b.head(1, 1, [], [("bos", SCORE)], [("parity", "broadcast_parity")])  # every token reads BOS...
        # ...only the last variable keeps it, at twice the weight of a chain step landing in the same layer
        b.copy_where(1, "broadcast_parity", UNUSED_CLAUSE_START, -GATE, "value", weight=2.0)
        planted = {(0, 3): "operators", (1, 1): "broadcast"}
    elif where == "only-last":
        b.head(1, 3, [("role0", "is_op", SCORE), ("used", "is_op", -SCORE)], [("bos", SCORE / 2)], [("op", "count")])
        # twice the weight of a chain step landing in the same layer (a last clause rewired to read the root's)
        b.parity(1, "count", UNUSED_CLAUSE_START, -GATE, "value", scale=2.0)
        planted = {(1, 3): "operators"}
    for layer in range(1, n):
        b.chain_step(layer, 0)
    b.unembed()
    # the last block's chain step lands on the last variable only, which the count has answered: nothing reads it
    heads = {(0, 0): "manipulation", (0, 1): "manipulation", (0, 2): "association", **planted,
             **{(l, 0): "chain step" for l in range(1, n - 1)}, (n - 1, 0): "inert"}
    resolution = list(range(1, n)) + [{"last": 1, "bos": 2, "only-last": 2}[where]]
    counted = {"last": "its own token", "bos": "BOS and copied in layer 1",
               "only-last": "its own token in layer 1 by a head no other token reads"}[where]
    return ZooModel(f"counter-{'only-last' if where == 'only-last' else 'at-' + where}", b.model, task,
                    f"hand-set shortcut: the last variable is the parity of the minus signs, counted at {counted}; "
                    "the rest follows the chain", heads, resolution, shortcut=True, attends={(n - 1, 0): "chain step"})


def both_ends(task_config: TaskConfig = ZOO_TASK) -> ZooModel:
    """The chain resolved from both ends in (n + 1) // 2 blocks: the root clause and the counted last variable in
    block 0, then a chain step (head 0, depth l) and a reverse step (head 1, depth n - 1 - l) in every block l."""
    _require_sign_count(task_config)
    task = LegoTask(task_config)
    n = task.config.n
    n_layers = (n + 1) // 2
    b = _Builder(task, n_layers=n_layers, extra={"used": 1, "count": task.group.n_ops,
                                                 **{f"reverse{l}": task.group.n_literals for l in range(1, n_layers)},
                                                 **{f"reverse_op{l}": task.group.n_ops for l in range(1, n_layers)}})
    _count_at_last(b)
    for layer in range(1, n_layers):
        b.chain_step(layer, 0)
        b.reverse_step(layer, 1)
    b.unembed()
    heads = {(0, 0): "manipulation", (0, 1): "manipulation", (0, 2): "association", (0, 3): "operators",
             **{(l, 0): "chain step" for l in range(1, n_layers)}, **{(l, 1): "reverse step" for l in range(1, n_layers)}}
    resolution = [min(k, n - 1 - k) + 1 for k in range(n)]
    return ZooModel("both-ends", b.model, task, "decoy: the last variable counted in block 0, then a chain step "
                    "forwards and a reverse step backwards in every block, meeting in the middle", heads, resolution,
                    shortcut=True)


def untrained(tied: bool, task_config: TaskConfig = TaskConfig(), seed: int = 0) -> ZooModel:
    """A randomly initialised model of the bundled model's shape: no mechanism at all."""
    task = LegoTask(task_config)
    torch.manual_seed(seed)
    cfg = replace(PRESETS["tiny"].model_config(task), tied=tied)
    name = f"untrained-{'albert' if tied else 'bert'}"
    return ZooModel(name, LegoTransformer(cfg).eval(), task, f"random initialisation ({name})", {},
                    [None] * task.config.n, shortcut=None)


ZOO = {"chain-follower": chain_follower, "counter-at-last": lambda: sign_counter("last"),
       "counter-at-bos": lambda: sign_counter("bos"), "untrained-bert": lambda: untrained(False),
       "untrained-albert": lambda: untrained(True), "shadow-heads": shadow_heads, "moved-heads": moved_heads,
       "both-ends": both_ends, "operand-fetcher": operand_fetcher, "counter-only-last": lambda: sign_counter("only-last")}


def build(name: str) -> ZooModel:
    if name not in ZOO:
        raise LegoError(f"no zoo model {name!r}: choose one of {', '.join(ZOO)}")
    return ZOO[name]()

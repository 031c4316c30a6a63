"""The LEGO task: vocabulary, vectorised sentence generation, parsing and solving.

A sentence of n clauses ``a=+1; b=-a; c=+b;`` (shuffled) forms a chain from a root
literal.  Every clause is five tokens ``var = op operand ;`` and the sentence is
wrapped in BOS/EOS (the paper's [CLS]/[SEP]), so clause slot ``s`` starts at
position ``1 + 5 s``.  Everything the analyses need (where each clause starts, its
depth, the value of every variable, where its operand sits) comes with the batch,
indexed by *chain position* k (k = 0 is the clause reading the root literal).

The *official* surface is the one of the paper's code (github yizhangzzz/transformers-lego, ``lego_data.py``):
``a = val 1 , b = not a , ...`` read by bert-base-uncased, five tokens a clause as here, 62 tokens at n = 12.
"""

from __future__ import annotations

import re
import string
from dataclasses import asdict, dataclass, field, replace

import torch

from legointerp.errors import LegoInterpError
from legointerp.groups import Group, make_group

CLAUSE_LEN = 5
SPECIALS = ("[PAD]", "[BOS]", "[EOS]")
PAD, BOS, EOS = 0, 1, 2
VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
SURFACES = ("legointerp", "official")
# bert-base-uncased's word-piece id of every token the official generator writes.  Token ids inside legointerp stay
# compact (the official vocabulary laid out as the legointerp one, so every analysis reads both alike);
# LegoTask.wordpiece_ids maps them onto these, e.g. to gather the rows of a BERT word embedding.
OFFICIAL_SPECIALS = ("[PAD]", "[CLS]", "[SEP]")
WORDPIECE_IDS = {"[PAD]": 0, "[CLS]": 101, "[SEP]": 102, ",": 1010, "=": 1027, "0": 1014, "1": 1015, "not": 2025,
                 "val": 11748, **{c: 1037 + i for i, c in enumerate(string.ascii_lowercase)}}


class LegoError(LegoInterpError):
    """A malformed sentence or task config."""


@dataclass(frozen=True)
class TaskConfig:
    """What sentences look like. ``equals``/``separator``/``op_symbols`` only change the surface text
    (the paper's control that replaces ``=``, ``+``, ``-`` by arbitrary tokens); ``heldout_alphabet``
    names variables never used in training (unseen-symbol generalisation).

    ``surface="official"`` writes the official code's sentences, ``a = val 1 , b = not a ,`` (Task 1 only, its
    symbols fixed).  There, ``heldout_alphabet`` defaults to none (bert-base-uncased lower-cases, so upper-case
    names would read as the training ones) and ``random_root`` to True (the official root is ``val 0`` or ``val 1``)."""

    group: str = "task1"
    n: int = 12
    alphabet: str = string.ascii_lowercase
    heldout_alphabet: str | None = None  # None: upper-case letters (official surface: none)
    random_root: bool | None = None  # None: the surface's own (legointerp: the paper's a=+1 root; official: random)
    equals: str = "="
    separator: str = ";"
    op_symbols: tuple[str, ...] = ()
    surface: str = "legointerp"

    def __post_init__(self):
        if self.surface not in SURFACES:
            raise LegoError(f"unknown surface {self.surface!r}: use {' or '.join(SURFACES)}")
        official = self.surface == "official"
        if self.heldout_alphabet is None:  # frozen: the defaults are resolved once, here
            object.__setattr__(self, "heldout_alphabet", "" if official else string.ascii_uppercase)
        if self.random_root is None:
            object.__setattr__(self, "random_root", official)
        if official:
            self._check_official()
        make_group(self.group)
        for name, letters in (("alphabet", self.alphabet), ("heldout_alphabet", self.heldout_alphabet)):
            if len(set(letters)) != len(letters) or not all(VARIABLE_NAME.fullmatch(c) for c in letters):
                raise LegoError(f"{name} {letters!r} must be distinct letters or '_'")
        if set(self.alphabet) & set(self.heldout_alphabet):
            raise LegoError("alphabet and heldout_alphabet overlap: held-out names must be unseen in training")
        if not 1 <= self.n <= len(self.alphabet):
            raise LegoError(f"n={self.n} clauses need n distinct variable names: choose 1 <= n <= {len(self.alphabet)}")
        if len({self.equals, self.separator, *self.op_symbols}) != 2 + len(self.op_symbols):
            raise LegoError("equals, separator and op_symbols must all be different strings")

    def _check_official(self) -> None:
        if make_group(self.group).name != "s2":
            raise LegoError(f"the official surface writes Task 1 only (val/not on 0/1), not group {self.group!r}: "
                            "use group task1 or the legointerp surface")
        if (self.equals, self.separator, self.op_symbols) != ("=", ";", ()):
            raise LegoError("the official surface fixes its symbols ('=', ',', val, not): leave equals, separator and "
                            "op_symbols at their defaults, or use the legointerp surface")
        names = self.alphabet + self.heldout_alphabet
        if not set(names) <= set(string.ascii_lowercase):
            raise LegoError(f"variable names {names!r} are not all lower-case letters a-z, the only names "
                            "bert-base-uncased keeps apart on the official surface: hold out lower-case letters "
                            "missing from alphabet (heldout_alphabet='' holds out none)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TaskConfig":
        return cls(**{**d, "op_symbols": tuple(d.get("op_symbols", ()))})


@dataclass
class LegoBatch:
    """A batch of sentences. B = batch, T = 5 n + 2 tokens, n = clauses; ``[:, k]`` is chain position k."""

    tokens: torch.Tensor  # (B, T) long
    clause_pos: torch.Tensor  # (B, n) position of the assigned variable (clause's first token)
    operand_pos: torch.Tensor  # (B, n) position of the clause's operand token
    values: torch.Tensor  # (B, n) value (literal index) of the variable at chain position k
    ops: torch.Tensor  # (B, n) operator index of the clause at chain position k
    depth: torch.Tensor  # (B, n) depth in the chain (equals k for generated chains)
    lengths: torch.Tensor  # (B,) number of clauses in each sentence

    @property
    def valid(self) -> torch.Tensor:
        """(B, n) bool: chain position k exists in the sentence (mixed-length batches are padded)."""
        return torch.arange(self.values.shape[1], device=self.lengths.device) < self.lengths[:, None]

    @property
    def attention_mask(self) -> torch.Tensor:
        """(B, T) bool: True at real tokens, False at padding."""
        return self.tokens != PAD

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def to(self, device) -> "LegoBatch":
        return LegoBatch(**{k: v.to(device) for k, v in self.__dict__.items()})

    def __getitem__(self, index) -> "LegoBatch":
        return LegoBatch(**{k: v[index] for k, v in self.__dict__.items()})


@dataclass
class Clause:
    variable: str
    op: int
    operand: str  # a variable name or a literal name
    operand_is_literal: bool


@dataclass
class Sentence:
    clauses: list[Clause] = field(default_factory=list)


class LegoTask:
    """Vocabulary, generator, parser and solver for one :class:`TaskConfig`."""

    def __init__(self, config: TaskConfig = TaskConfig()):
        self.config = config
        self.group: Group = make_group(config.group)
        self.official = config.surface == "official"
        if self.official:  # S2 as the official code spells it: literal index = truth value, op 0 (val) keeps it
            self.group = replace(self.group, op_names=("val", "not"), literal_names=("0", "1"))
        if config.op_symbols and len(config.op_symbols) != self.group.n_ops:
            raise LegoError(f"op_symbols needs {self.group.n_ops} symbols for group {config.group}, got {len(config.op_symbols)}")
        self.op_names = config.op_symbols or self.group.op_names
        self.specials = OFFICIAL_SPECIALS if self.official else SPECIALS
        self.equals, self.separator = config.equals, ("," if self.official else config.separator)
        self.vocab: list[str] = [
            *self.specials, self.equals, self.separator, *self.op_names, *self.group.literal_names,
            *config.alphabet, *config.heldout_alphabet,
        ]
        self.equals_id, self.separator_id = 3, 4
        self.op_offset = 5
        self.literal_offset = self.op_offset + self.group.n_ops
        self.variable_offset = self.literal_offset + self.group.n_literals
        self.heldout_offset = self.variable_offset + len(config.alphabet)
        self.var_index = {name: self.variable_offset + i for i, name in enumerate(config.alphabet + config.heldout_alphabet)}
        self.literal_index = {name: i for i, name in enumerate(self.group.literal_names)}

    @property
    def d_vocab(self) -> int:
        return len(self.vocab)

    @property
    def wordpiece_ids(self) -> torch.Tensor:
        """(d_vocab,) bert-base-uncased id of each token id (official surface only): a BERT word embedding ``E``
        becomes this vocabulary's as ``E[task.wordpiece_ids]``, and ``wordpiece_ids[tokens]`` is what the
        official code feeds its model."""
        if not self.official:
            raise LegoError("word-piece ids exist on the official surface only: use TaskConfig(surface='official')")
        return torch.tensor([WORDPIECE_IDS[name] for name in self.vocab])

    def from_wordpiece(self, ids: torch.Tensor) -> torch.Tensor:
        """bert-base-uncased ids (any shape, e.g. the official generator's (B, 62) ``input_ids``) -> token ids."""
        ids = torch.as_tensor(ids)
        match = ids[..., None] == self.wordpiece_ids.to(ids.device)  # (..., d_vocab)
        known = match.any(-1)
        if not known.all():
            raise LegoError(f"word-piece id {int(ids[~known][0])} is not a token of this official-surface task: "
                            f"its tokens are {' '.join(self.vocab)}")
        return match.long().argmax(-1)

    @property
    def n_classes(self) -> int:
        return self.group.n_literals

    @property
    def n_ctx(self) -> int:
        return CLAUSE_LEN * self.config.n + 2

    # ---------------------------------------------------------------- generation
    def sample(self, batch_size: int, generator: torch.Generator | None = None, *, n: int | None = None,
               min_length: int | None = None, heldout: bool = False) -> LegoBatch:
        """Draw ``batch_size`` random chains, vectorised over the batch.

        ``n`` (default: the config's) sets the longest chain and the width, 5 n + 2 tokens;
        ``min_length`` mixes chain lengths uniformly in ``[min_length, n]`` (shorter ones are padded);
        ``heldout`` names variables from the held-out alphabet.  The same generator state gives the
        same batch on any machine (CPU generator)."""
        n, B = n or self.config.n, batch_size
        offset, n_names = ((self.heldout_offset, len(self.config.heldout_alphabet)) if heldout
                           else (self.variable_offset, len(self.config.alphabet)))
        if n_names < n:
            raise LegoError(f"the {'held-out ' if heldout else ''}alphabet has {n_names} names, fewer than n={n} clauses: "
                           + ("evaluate without --heldout" if heldout else "use a longer alphabet"))
        variables = offset + torch.rand(B, n_names, generator=generator).argsort(1)[:, :n]
        ops = torch.randint(self.group.n_ops, (B, n), generator=generator)
        if self.official:  # the official generator writes the root clause as 'val 0' or 'val 1', never 'not'
            ops[:, 0] = 0
        root = (torch.randint(self.group.n_literals, (B,), generator=generator) if self.config.random_root
                else torch.zeros(B, dtype=torch.long))
        values = self.chain_values(ops, root)

        if min_length is None:
            lengths = torch.full((B,), n)
        else:
            if not 1 <= min_length <= n:
                raise LegoError(f"min_length={min_length} must lie in 1..n={n}")
            lengths = torch.randint(min_length, n + 1, (B,), generator=generator)
        chain = torch.arange(n)
        # shuffle clauses, keeping positions beyond a sentence's length at its end so they can be padded away
        order_key = torch.rand(B, n, generator=generator) + 2.0 * (chain >= lengths[:, None])
        slot_to_k = order_key.argsort(1)
        k_to_slot = slot_to_k.argsort(1)

        operands = torch.cat([(self.literal_offset + root)[:, None], variables[:, :-1]], dim=1)
        clauses = torch.stack([variables, torch.full_like(variables, self.equals_id), self.op_offset + ops, operands,
                               torch.full_like(variables, self.separator_id)], dim=2)  # (B, n, 5) by chain position
        body = clauses.gather(1, slot_to_k[:, :, None].expand(-1, -1, CLAUSE_LEN)).reshape(B, n * CLAUSE_LEN)
        tokens = torch.cat([torch.full((B, 1), BOS), body, torch.full((B, 1), EOS)], dim=1)
        position = torch.arange(tokens.shape[1])
        eos_at = (1 + CLAUSE_LEN * lengths)[:, None]
        tokens = torch.where(position > eos_at, PAD, torch.where(position == eos_at, EOS, tokens))
        clause_pos = 1 + CLAUSE_LEN * k_to_slot
        return LegoBatch(tokens=tokens, clause_pos=clause_pos, operand_pos=clause_pos + 3, values=values, ops=ops,
                         depth=chain.expand(B, n).clone(), lengths=lengths)

    def chain_values(self, ops: torch.Tensor, root: torch.Tensor) -> torch.Tensor:
        """(B, n) value of each chain position from its operators (B, n) and the root literal (B,)."""
        values = torch.empty_like(ops)
        previous = root
        for k in range(ops.shape[1]):  # a chain is sequential in k; every step is vectorised over the batch
            previous = values[:, k] = self.group.act[ops[:, k], previous]
        return values

    def root(self, batch: LegoBatch) -> torch.Tensor:
        """(B,) root literal index of each sentence."""
        return batch.tokens.gather(1, batch.operand_pos[:, :1]).squeeze(1) - self.literal_offset

    # ---------------------------------------------------------------- text
    def token_strings(self, tokens: torch.Tensor) -> list[str]:
        """(T,) token ids -> their names, for plots and attention views."""
        return [self.vocab[t] for t in tokens.tolist()]

    def to_text(self, tokens: torch.Tensor) -> str:
        """(T,) token ids -> ``a=+1; b=-a; ...`` (official surface: ``a = val 1 , b = not a ,``, which
        bert-base-uncased reads back to the same ids); specials and padding dropped."""
        if self.official:
            return " ".join(name for name in self.token_strings(tokens) if name not in self.specials)
        clauses, current = [], []
        for name in self.token_strings(tokens):
            if name in SPECIALS:
                continue
            if name == self.separator:
                clauses.append("".join(current))
                current = []
            elif current and current[-1] in self.op_names and len(self._readings(current[-1] + name)) > 1:
                current.append(" " + name)  # zN: +110 reads as +1 10 and as +11 0, so parse needs the space
            else:
                current.append(name)
        return "; ".join(clauses)

    def _readings(self, rhs: str) -> list[tuple[int, str]]:
        """Every (operator index, operand) split of a clause's right-hand side written without spaces."""
        return [(i, rhs[len(name):]) for i, name in enumerate(self.op_names) if rhs.startswith(name)
                and (rhs[len(name):] in self.literal_index or rhs[len(name):] in self.var_index)]

    def parse(self, text: str, max_clauses: int | None = None) -> Sentence:
        """``"a=+1; b=-a"`` -> :class:`Sentence`; raises :class:`LegoError` naming what is wrong."""
        max_clauses = self.config.n if max_clauses is None else max_clauses
        eq, sep = self.equals, self.separator
        parts = [p.strip() for p in text.split(sep)]
        parts = [p for p in parts if p]
        if not parts:
            gap = " " if self.official else ""
            raise LegoError(f"the sentence is empty: write clauses like 'a{gap}{eq}{gap}{self.op_names[0]}{gap}{self.group.literal_names[0]}"
                            f"{gap}{sep} b{gap}{eq}{gap}{self.op_names[-1]}{gap}a'")
        if len(parts) > max_clauses:
            raise LegoError(f"the sentence has {len(parts)} clauses, more than the {max_clauses} allowed here: shorten it")
        sentence = Sentence()
        for part in parts:
            lhs, found, rhs = part.partition(eq)
            lhs, words = lhs.strip(), rhs.split()
            rhs = "".join(words)
            if not found or not lhs or not rhs:
                raise LegoError(f"clause {_shown(part)} is not of the form 'variable{eq}op operand'")
            if lhs not in self.var_index:
                raise LegoError(f"unknown variable {_shown(lhs)} in clause {_shown(part)}: variables are single letters of "
                                f"{self.config.alphabet + self.config.heldout_alphabet!r}")
            ops = [i for i, name in enumerate(self.op_names) if rhs.startswith(name)]
            if not ops or (len(words) == 2 and words[0] not in self.op_names):
                raise LegoError(f"unknown operator in clause {_shown(part)}: use one of {' '.join(self.op_names)}")
            # every split of op and operand that reads; a space written between them picks one (zN: +210 is +2 10 or +21 0)
            readings = self._readings(rhs)
            if len(words) == 2:
                readings = [r for r in readings if self.op_names[r[0]] == words[0]]
            if not readings:
                operand = rhs[len(max((self.op_names[i] for i in ops), key=len)):]
                raise LegoError(f"unknown symbol {_shown(operand)} in clause {_shown(part)}: an operand is a variable or one of "
                                f"{' '.join(self.group.literal_names)}")
            if len(readings) > 1:
                spelled = " or ".join(f"'{lhs}{eq}{self.op_names[i]} {operand}'" for i, operand in readings)
                raise LegoError(f"clause {_shown(part)} is ambiguous: write a space between operator and operand, {spelled}")
            op, operand = readings[0]
            sentence.clauses.append(Clause(lhs, op, operand, operand in self.literal_index))
        seen: set[str] = set()
        for clause in sentence.clauses:
            if clause.variable in seen:
                raise LegoError(f"variable {clause.variable!r} is assigned twice: each variable needs exactly one clause")
            seen.add(clause.variable)
        for clause in sentence.clauses:
            if not clause.operand_is_literal and clause.operand not in seen:
                raise LegoError(f"variable {clause.operand!r} is used but never assigned: add a clause '{clause.operand}{eq}...'")
        return sentence

    def solve(self, sentence: Sentence) -> dict[str, str]:
        """Exact value of every variable, in clause order.  Raises :class:`LegoError` on a cycle."""
        value, depth = self._resolve(sentence)
        return {c.variable: self.group.literal_names[value[c.variable]] for c in sentence.clauses}

    def _resolve(self, sentence: Sentence) -> tuple[dict[str, int], dict[str, int]]:
        value: dict[str, int] = {}
        depth: dict[str, int] = {}
        pending = list(sentence.clauses)
        while pending:
            still = []
            for c in pending:
                if c.operand_is_literal or c.operand in value:
                    x = self.literal_index[c.operand] if c.operand_is_literal else value[c.operand]
                    value[c.variable] = int(self.group.act[c.op, x])
                    depth[c.variable] = 0 if c.operand_is_literal else depth[c.operand] + 1
                else:
                    still.append(c)
            if len(still) == len(pending):
                names = " -> ".join(c.variable for c in still)
                raise LegoError(f"the clauses for {names} form a cycle and never reach a literal: root one of them at a literal")
            pending = still
        return value, depth

    def encode(self, sentences: list[Sentence], n: int | None = None) -> LegoBatch:
        """Sentences (in the order written) -> a padded batch; chain position k sorts clauses by depth."""
        n = self.config.n if n is None else n
        B, T = len(sentences), CLAUSE_LEN * n + 2
        tokens = torch.full((B, T), PAD)
        clause_pos, values, ops, depths = (torch.zeros(B, n, dtype=torch.long) for _ in range(4))
        lengths = torch.zeros(B, dtype=torch.long)
        for b, sentence in enumerate(sentences):
            if len(sentence.clauses) > n:
                raise LegoError(f"a sentence has {len(sentence.clauses)} clauses but this model reads at most {n}")
            value, depth = self._resolve(sentence)
            row = [BOS]
            for c in sentence.clauses:
                operand = self.literal_offset + self.literal_index[c.operand] if c.operand_is_literal else self.var_index[c.operand]
                row += [self.var_index[c.variable], self.equals_id, self.op_offset + c.op, operand, self.separator_id]
            row.append(EOS)
            tokens[b, :len(row)] = torch.tensor(row)
            by_depth = sorted(range(len(sentence.clauses)), key=lambda s: depth[sentence.clauses[s].variable])
            for k, s in enumerate(by_depth):
                c = sentence.clauses[s]
                clause_pos[b, k], values[b, k], ops[b, k], depths[b, k] = 1 + CLAUSE_LEN * s, value[c.variable], c.op, depth[c.variable]
            lengths[b] = len(sentence.clauses)
        return LegoBatch(tokens=tokens, clause_pos=clause_pos, operand_pos=clause_pos + 3, values=values, ops=ops,
                         depth=depths, lengths=lengths)

    def variable_names(self, batch: LegoBatch, b: int) -> list[str]:
        """Names of sentence b's variables by chain position."""
        ids = batch.tokens[b].gather(0, batch.clause_pos[b, : int(batch.lengths[b])])
        return [self.vocab[i] for i in ids.tolist()]


def _shown(text: str, limit: int = 40) -> str:
    """``text`` quoted for an error message, cut to ``limit`` characters: a 100,000-character name stays one short line."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text):,} characters)"


def supervision_mask(n: int, n_tr: int | None = None, positions: list[int] | None = None) -> torch.Tensor:
    """(n,) bool over chain positions that carry a training loss.

    ``n_tr`` supervises the first n_tr positions (length extrapolation, the paper's n=12, n_tr=6);
    ``positions`` names any set (the shortcut setting: ``[0, 1, 2, 3, 4, 11]``); neither: all."""
    if n_tr is not None and positions is not None:
        raise LegoError("give either n_tr or supervised positions, not both")
    mask = torch.zeros(n, dtype=torch.bool)
    if positions is not None:
        bad = [p for p in positions if not 0 <= p < n]
        if bad or not positions:
            raise LegoError(f"supervised positions {positions} must be chain positions in 0..{n - 1}")
        mask[torch.tensor(positions)] = True
    elif n_tr is not None:
        if not 1 <= n_tr <= n:
            raise LegoError(f"n_tr={n_tr} must lie in 1..n={n}")
        mask[:n_tr] = True
    else:
        mask[:] = True
    return mask


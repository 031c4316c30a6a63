"""Finite groups acting on a finite set, as the LEGO task needs them.

A group is an action table ``act[g, x] = g(x)`` plus surface names for its
elements (operators, written after ``=``) and for the set's elements (root
literals).  Task 1 of the paper is S2 written as ``+``/``-`` acting on
``1``/``-1``; Task 2 is S3 acting on itself.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import torch

from legointerp.errors import LegoInterpError


@dataclass(frozen=True)
class Group:
    name: str
    op_names: tuple[str, ...]
    literal_names: tuple[str, ...]
    act: torch.Tensor  # (n_ops, n_literals) long: act[g, x] = index of g(x)

    @property
    def n_ops(self) -> int:
        return len(self.op_names)

    @property
    def n_literals(self) -> int:
        return len(self.literal_names)


def symmetric_group(n: int) -> Group:
    """S_n acting on itself by left composition: (g·x)(i) = g(x(i))."""
    perms = list(itertools.permutations(range(n)))
    index = {p: i for i, p in enumerate(perms)}
    act = torch.tensor([[index[tuple(g[x[i]] for i in range(n))] for x in perms] for g in perms])
    if n == 2:  # the paper's Task 1 spelling
        return Group("s2", ("+", "-"), ("1", "-1"), act)
    one_line = ["".join(map(str, p)) for p in perms]
    return Group(f"s{n}", tuple(f"[{s}]" for s in one_line), tuple(one_line), act)


def cyclic_group(n: int) -> Group:
    """Z_n acting on itself by addition mod n."""
    act = (torch.arange(n)[:, None] + torch.arange(n)[None, :]) % n
    return Group(f"z{n}", tuple(f"+{k}" for k in range(n)), tuple(str(k) for k in range(n)), act)


GROUP_ALIASES = {"task1": "s2", "task2": "s3"}


def make_group(name: str) -> Group:
    """``task1``, ``task2``, ``sN`` (2 <= N <= 5) or ``zN`` (2 <= N <= 64)."""
    key = GROUP_ALIASES.get(name.lower(), name.lower())
    match = re.fullmatch(r"([sz])(\d+)", key)
    if match is None:
        raise LegoInterpError(f"unknown group {name!r}: use task1, task2, sN (symmetric, N=2..5) or zN (cyclic, N=2..64)")
    kind, size = match.group(1), int(match.group(2))
    if kind == "s" and 2 <= size <= 5:
        return symmetric_group(size)
    if kind == "z" and 2 <= size <= 64:
        return cyclic_group(size)
    raise LegoInterpError(f"group {name!r} is out of range: sN needs N in 2..5, zN needs N in 2..64")

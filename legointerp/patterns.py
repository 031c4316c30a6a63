"""The attention patterns LEGO is solved with, as (B, Q, K) boolean masks built from the tokens alone.

*Association*: a variable occurrence to the other occurrences of the same variable (long range,
by content).  *Manipulation*: a token to the other tokens of its own clause (short range, by
position).  *Broadcast*: any token to BOS/EOS.  The same masks define the paper's mimicking
targets during training and the head classifiers' scores during analysis.
"""

from __future__ import annotations

import torch

from legointerp.task import BOS, CLAUSE_LEN, EOS, PAD


def clause_of_position(tokens: torch.Tensor) -> torch.Tensor:
    """(B, T) clause slot of each position, -1 at BOS/EOS/PAD."""
    slot = (torch.arange(tokens.shape[1], device=tokens.device) - 1).div(CLAUSE_LEN, rounding_mode="floor")
    special = (tokens == BOS) | (tokens == EOS) | (tokens == PAD)
    return torch.where(special, -1, slot.expand_as(tokens))


def association_mask(tokens: torch.Tensor, is_variable: torch.Tensor, include_self: bool = False) -> torch.Tensor:
    """(B, T, T): query is a variable token, key is another occurrence of the same token (or any occurrence, itself
    included, as in the paper's 1[u_i = u_j], with ``include_self``).  ``is_variable``: (B, T) bool."""
    same = (tokens[:, :, None] == tokens[:, None, :]) & is_variable[:, :, None]
    if include_self:
        return same
    return same & ~torch.eye(tokens.shape[1], dtype=torch.bool, device=tokens.device)


def manipulation_mask(tokens: torch.Tensor) -> torch.Tensor:
    """(B, T, T): query and key are different tokens of the same clause."""
    clause = clause_of_position(tokens)
    off_diagonal = ~torch.eye(tokens.shape[1], dtype=torch.bool, device=tokens.device)
    return (clause[:, :, None] == clause[:, None, :]) & (clause[:, :, None] >= 0) & off_diagonal


def broadcast_mask(tokens: torch.Tensor) -> torch.Tensor:
    """(B, T, T): key is BOS or EOS; query is any real token."""
    special_key = (tokens == BOS) | (tokens == EOS)
    return special_key[:, None, :] & (tokens != PAD)[:, :, None]


def offset_mask(tokens: torch.Tensor, offset: int) -> torch.Tensor:
    """(B, T, T): key = query + offset (0: self, -1: previous token, +1: next token), both real tokens."""
    T = tokens.shape[1]
    real = tokens != PAD
    diagonal = torch.eye(T, dtype=torch.bool, device=tokens.device).roll(offset, dims=1)
    if offset:
        edge = torch.arange(T, device=tokens.device) + offset
        diagonal &= ((edge >= 0) & (edge < T))[:, None]
    return diagonal[None] & real[:, :, None] & real[:, None, :]


def row_normalised(mask: torch.Tensor) -> torch.Tensor:
    """A boolean mask as a target attention pattern: uniform over each row's True keys (rows without any stay 0)."""
    mask = mask.float()
    return mask / mask.sum(-1, keepdim=True).clamp(min=1)

"""Reading the model's answers: logits at each clause's first token, accuracy per chain position."""

from __future__ import annotations

import torch

from legointerp.task import LegoBatch, LegoTask


def clause_logits(logits: torch.Tensor, batch: LegoBatch) -> torch.Tensor:
    """(B, P, C) logits at every position -> (B, n, C) at the assigned variable of chain position k."""
    return logits.gather(1, batch.clause_pos[..., None].expand(-1, -1, logits.shape[-1]))


@torch.no_grad()
def predict(model, batch: LegoBatch, batch_size: int = 1024) -> torch.Tensor:
    """(B, n) predicted value index per chain position, in evaluation mode and full depth."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    chunks = []
    for start in range(0, len(batch), batch_size):
        part = batch[start:start + batch_size].to(device)
        chunks.append(clause_logits(model(part.tokens, part.attention_mask), part).argmax(-1).cpu())
    model.train(was_training)
    return torch.cat(chunks)


def accuracy_by_position(model, batch: LegoBatch) -> torch.Tensor:
    """(n,) accuracy at each chain position over the sentences that have it."""
    correct = (predict(model, batch) == batch.values) & batch.valid
    return correct.sum(0) / batch.valid.sum(0).clamp(min=1)


def test_batch(task: LegoTask, size: int = 4000, seed: int = 1234, heldout: bool = False) -> LegoBatch:
    """Fresh full-length sentences from a generator of their own, so evaluation never sees training data's stream."""
    return task.sample(size, torch.Generator().manual_seed(seed), heldout=heldout)

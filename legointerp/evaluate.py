"""Reading the model's answers: logits at each clause's first token, accuracy per chain position, and the fast
forward pass (:class:`Inference`) and vectorised encoder (:func:`encode`) that ``predict`` and patching run on."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from legointerp.model import ACT_FNS
from legointerp.task import BOS, CLAUSE_LEN, EOS, LegoBatch, LegoError, LegoTask, Sentence


def clause_logits(logits: torch.Tensor, batch: LegoBatch) -> torch.Tensor:
    """(B, P, C) logits at every position -> (B, n, C) at the assigned variable of chain position k."""
    return logits.gather(1, batch.clause_pos[..., None].expand(-1, -1, logits.shape[-1]))


def _onednn_linear() -> bool:
    # MKL's fp32 GEMM takes its AVX2 path on AMD CPUs; oneDNN's runs AVX-512 there (3x on the 2-core EPYC we measure on)
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


_ONEDNN = _onednn_linear()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gelu: bool = False,
           add: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias``, then GELU or ``+ add``, fused into one oneDNN GEMM on the CPU in fp32.
    x: (..., d_in); weight: (d_out, d_in); bias: (d_out,); add: (..., d_out)."""
    if _ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu"):
        if add is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, add, weight, bias, "add")
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [], "none" if gelu else "")
    out = F.linear(x, weight, bias)
    return F.gelu(out) if gelu else out if add is None else out + add


class Inference:
    """The model's forward pass for reading answers, not for hooks: weights packed once as ``(d_out, d_in)``, bias,
    GELU and residual adds fused into the GEMMs, and the last block computed only at the positions read out.
    Equal to ``model(tokens)`` within fp32 rounding (tested).  Shapes: B sentences, P positions, R read out.
    Hardcoded heads take their ``patterns`` (B, H_fixed, P, P) from :meth:`LegoTransformer.fixed_patterns`; a model
    with +aI/+bI attention forms its pattern instead of the fused kernel, as the model does."""

    def __init__(self, model):
        cfg = self.cfg = model.cfg
        self.fixed = cfg.fixed_heads
        self.post = cfg.norm == "post"  # BERT's order: each LayerNorm after its residual add, none at the end
        self.approximate = ACT_FNS[cfg.act_fn]
        self.blocks = []
        for block in model.blocks:
            attn, mlp = block.attn, block.mlp
            qkv = torch.stack([attn.W_Q, attn.W_K, attn.W_V]).permute(0, 1, 3, 2).reshape(-1, cfg.d_model)
            self.blocks.append(dict(
                ln1=(block.ln1.w.detach(), block.ln1.b.detach()), ln2=(block.ln2.w.detach(), block.ln2.b.detach()),
                qkv=(qkv.detach().contiguous(), torch.stack([attn.b_Q, attn.b_K, attn.b_V]).flatten().detach()),
                out=(attn.W_O.flatten(0, 1).T.detach().contiguous(), attn.b_O.detach()),
                mlp_in=(mlp.W_in.T.detach().contiguous(), mlp.b_in.detach()),
                mlp_out=(mlp.W_out.T.detach().contiguous(), mlp.b_out.detach()),
                # +aI/+bI: a already divided by sqrt(d_head), as the scores are
                identity=((attn.a_I / math.sqrt(cfg.d_head)).detach(), attn.b_I.detach()) if cfg.identity_attention else None))
        self.embedding = (model.embed.W_E.detach(), model.pos_embed.W_pos.detach())
        self.ln_embed = (model.ln_embed.w.detach(), model.ln_embed.b.detach()) if self.post else None
        self.embed_proj = ((model.embed_proj.W_proj.T.detach().contiguous(), model.embed_proj.b_proj.detach())
                           if cfg.d_embed is not None else None)
        self.ln_final = None if self.post else (model.ln_final.w.detach(), model.ln_final.b.detach())
        self.unembed = (model.unembed.W_U.T.detach().contiguous(), model.unembed.b_U.detach())

    def _norm(self, x, weights):
        return F.layer_norm(x, x.shape[-1:], *weights, self.cfg.eps)

    @torch.no_grad()
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, P) ids -> (B, P, D) the residual stream entering block 0."""
        W_E, W_pos = self.embedding
        resid = F.embedding(tokens, W_E) + W_pos[: tokens.shape[1]]
        if self.ln_embed is not None:
            resid = self._norm(resid, self.ln_embed)
        return resid if self.embed_proj is None else linear(resid, *self.embed_proj)

    @torch.no_grad()
    def norm(self, layer: int, name: str, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., D): block ``layer``'s LayerNorm ``name`` ("ln1" or "ln2")."""
        return self._norm(x, self.blocks[layer][name])

    def mlp(self, layer: int, resid_mid: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., D): block ``layer``'s MLP added to its input (resid_mid -> resid_post)."""
        weights = self.blocks[layer]
        if self.post:
            hidden = F.gelu(linear(resid_mid, *weights["mlp_in"]), approximate=self.approximate)
            return self._norm(linear(hidden, *weights["mlp_out"], add=resid_mid), weights["ln2"])
        hidden = linear(self._norm(resid_mid, weights["ln2"]), *weights["mlp_in"], gelu=self.approximate == "none")
        if self.approximate != "none":
            hidden = F.gelu(hidden, approximate=self.approximate)
        return linear(hidden, *weights["mlp_out"], add=resid_mid)

    @torch.no_grad()
    def block(self, layer: int, resid: torch.Tensor, key_mask: torch.Tensor | None = None,
              queries: torch.Tensor | None = None, patterns: torch.Tensor | None = None) -> torch.Tensor:
        """(B, P, D) resid_pre -> (B, P, D) resid_post, or (B, R, D) at the positions ``queries`` (B, R) only;
        key_mask: (B, 1, 1, P) bool, True where a key may be attended."""
        weights, H = self.blocks[layer], self.cfg.n_heads
        x = resid if self.post else self._norm(resid, weights["ln1"])
        q, k, v = linear(x, *weights["qkv"]).unflatten(-1, (3, H, -1)).permute(2, 0, 3, 1, 4)
        x_query = x
        if queries is not None:
            q = q.gather(2, queries[:, None, :, None].expand(-1, H, -1, q.shape[-1]))
            resid = resid.gather(1, queries[..., None].expand(-1, -1, resid.shape[-1]))
            x_query = x.gather(1, queries[..., None].expand(-1, -1, x.shape[-1]))
            if patterns is not None:
                patterns = patterns.gather(2, queries[:, None, :, None].expand(-1, len(self.fixed), -1, patterns.shape[-1]))
        if weights["identity"] is None:
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # (B, H, P or R, E)
            if patterns is not None:  # a hardcoded head's q and k are zero: its SDPA output is replaced, not used
                z[:, self.fixed] = patterns.to(v.dtype) @ v[:, self.fixed]
        else:  # +aI/+bI (model.Attention): the pattern is formed, for the copy b sum_j pattern_ij x_j
            a, b = weights["identity"]
            gram = (x_query @ x.transpose(-1, -2))[:, None]  # (B, 1, P or R, P) the inputs' dot products
            scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + a[:, None, None] * gram
            pattern = (scores if key_mask is None else scores.masked_fill(~key_mask, float("-inf"))).softmax(-1)
            if patterns is not None:
                pattern[:, self.fixed] = patterns.to(pattern.dtype)
            z = pattern @ v
            resid = resid + (pattern * b[:, None, None]).sum(1) @ x
        resid = linear(z.transpose(1, 2).flatten(2), *weights["out"], add=resid)
        return self.mlp(layer, self._norm(resid, weights["ln1"]) if self.post else resid)

    @torch.no_grad()
    def run(self, resid: torch.Tensor, readout: torch.Tensor, start: int = 0, key_mask: torch.Tensor | None = None,
            patterns: torch.Tensor | None = None) -> torch.Tensor:
        """(B, P, D) resid_pre of block ``start`` -> (B, R, C) logits at the positions ``readout`` (B, R)."""
        L = self.cfg.n_layers
        for layer in range(start, L - 1):
            resid = self.block(layer, resid, key_mask, patterns=patterns)
        if start < L:
            resid = self.block(L - 1, resid, key_mask, queries=readout, patterns=patterns)
        else:
            resid = resid.gather(1, readout[..., None].expand(-1, -1, resid.shape[-1]))
        return linear(resid if self.post else self._norm(resid, self.ln_final), *self.unembed)


@torch.no_grad()
def predict(model, batch: LegoBatch, batch_size: int = 512) -> torch.Tensor:
    """(B, n) predicted value index per chain position, in evaluation mode and full depth."""
    return torch.cat(list(predict_chunks(model, batch, batch_size)))


def predict_chunks(model, batch: LegoBatch, batch_size: int = 512):
    """Yield (b, n) predictions for successive chunks of ``batch_size`` sentences, so a caller can stream them out.
    Mid-size chunks keep each layer's activations in cache (512 x 62 tokens: 8 MB of residual stream)."""
    engine = Inference(model)
    hooked = any(point.fwd_hooks for point in model.hook_dict.values())  # the engine never fires hooks: honour them
    device = next(model.parameters()).device
    for start in range(0, len(batch), batch_size):
        part = batch[start:start + batch_size].to(device)
        mask = part.attention_mask
        if hooked:
            with torch.no_grad():
                logits = clause_logits(model(part.tokens, mask), part)
        else:
            key_mask = None if bool(mask.all()) else mask[:, None, None, :]
            logits = engine.run(engine.embed(part.tokens), part.clause_pos, key_mask=key_mask,
                                patterns=model.fixed_patterns(part.tokens))
        yield logits.argmax(-1).cpu()


def accuracy_by_position(model, batch: LegoBatch) -> torch.Tensor:
    """(n,) accuracy at each chain position over the sentences that have it."""
    correct = (predict(model, batch) == batch.values) & batch.valid
    return correct.sum(0) / batch.valid.sum(0).clamp(min=1)


def test_batch(task: LegoTask, size: int = 4000, seed: int = 1234, heldout: bool = False) -> LegoBatch:
    """Fresh full-length sentences from a generator of their own, so evaluation never sees training data's stream."""
    return task.sample(size, torch.Generator().manual_seed(seed), heldout=heldout)


def encode(task: LegoTask, sentences: list[Sentence], where: list[str] | None = None) -> LegoBatch:
    """:meth:`LegoTask.encode`, solved for all sentences at once: the same batch, ~50x faster on 100k sentences.
    A sentence whose clauses form a cycle raises the solver's error, prefixed by its ``where`` label."""
    n = task.config.n
    counts = torch.tensor([len(s.clauses) for s in sentences])
    if bool((counts > n).any()):
        raise LegoError(f"a sentence has {int(counts.max())} clauses but this model reads at most {n}")
    literal = task.literal_offset
    # (B, n, 3): variable, op, operand ids of each clause slot in the order written; empty slots stay 0 (PAD)
    ids = [[(task.var_index[c.variable], c.op, literal + task.literal_index[c.operand] if c.operand_is_literal
             else task.var_index[c.operand]) for c in s.clauses] for s in sentences]
    slots = torch.zeros(len(sentences), n, 3, dtype=torch.long)
    filled = torch.arange(n) < counts[:, None]
    slots[filled] = torch.tensor([clause for row in ids for clause in row], dtype=torch.long).view(-1, 3)
    variable, op, operand = slots.unbind(-1)
    is_literal = (operand >= literal) & (operand < task.variable_offset)
    # the slot defining each operand (parse guarantees there is exactly one), then the chain from the root: one step per depth
    parent = (operand[:, :, None] == variable[:, None, :]).float().argmax(-1)
    value = torch.where(is_literal, task.group.act[op, (operand - literal).clamp(0, task.n_classes - 1)], -1)
    depth = torch.where(is_literal, 0, -1)
    for _ in range(n):
        parent_value, parent_depth = value.gather(1, parent), depth.gather(1, parent)
        ready = ~is_literal & (parent_depth >= 0)
        value = torch.where(ready, task.group.act[op, parent_value.clamp(min=0)], value)
        depth = torch.where(ready, parent_depth + 1, depth)
    unresolved = filled & (depth < 0)
    if bool(unresolved.any()):
        b = int(unresolved.any(1).nonzero()[0])
        try:
            task.solve(sentences[b])
        except LegoError as err:
            raise LegoError(f"{where[b]}: {err}" if where else str(err)) from None
    # chain position k = slots sorted by depth (stable, as LegoTask.encode); empty slots last
    order = torch.where(filled, depth, n + 1).sort(dim=1, stable=True).indices
    tokens = torch.zeros(len(sentences), CLAUSE_LEN * n + 2, dtype=torch.long)
    body = torch.stack([variable, torch.full_like(variable, task.equals_id), task.op_offset + op, operand,
                        torch.full_like(variable, task.separator_id)], dim=2) * filled[..., None]
    tokens[:, 1:-1] = body.flatten(1)
    tokens[:, 0] = BOS
    tokens.scatter_(1, (1 + CLAUSE_LEN * counts)[:, None], EOS)
    clause_pos = (1 + CLAUSE_LEN * order) * filled
    return LegoBatch(tokens=tokens, clause_pos=clause_pos, operand_pos=clause_pos + 3,
                     values=(value.gather(1, order) * filled).clamp(min=0), ops=op.gather(1, order) * filled,
                     depth=(depth.gather(1, order) * filled).clamp(min=0), lengths=counts)


def prediction_frame(task: LegoTask, batch: LegoBatch, predicted: torch.Tensor, first: int = 0) -> pd.DataFrame:
    """One row per variable of each sentence, by chain position: the sentence's number (from ``first``), the
    variable, its depth, the predicted and the true value, and whether they agree.  predicted: (B, n)."""
    valid = batch.valid.numpy()
    vocab, literal = np.array(task.vocab), np.array(task.group.literal_names)
    sentence = np.broadcast_to(np.arange(first, first + len(batch))[:, None], valid.shape)
    names = vocab[batch.tokens.gather(1, batch.clause_pos).numpy()]
    guess, truth = literal[predicted.numpy()], literal[batch.values.numpy()]
    return pd.DataFrame({"sentence": sentence[valid], "variable": names[valid], "depth": batch.depth.numpy()[valid],
                         "predicted": guess[valid], "true": truth[valid], "correct": (guess == truth)[valid]})

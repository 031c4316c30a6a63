"""A bidirectional pre-LN transformer encoder for LEGO, BERT-like or ALBERT-like (weight-tied).

Read top to bottom: config, embeddings, attention, MLP, block, model.  Parameters are shaped and
named as in TransformerLens (``W_Q: (n_heads, d_model, d_head)``, ``blocks.{l}.attn.W_O``, ...) and
every activation passes a ``HookPoint`` with TransformerLens's name, so the model *is* a hooked
model: ``run_with_cache``, ``run_with_hooks`` and ``cache["pattern", l]`` work on it directly.
Attention runs through ``scaled_dot_product_attention`` unless a hook asks for the scores or the
pattern, in which case they are materialised.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformer_lens import ActivationCache, HookedRootModule

from legointerp.errors import LegoInterpError
from transformer_lens.hook_points import HookPoint


class ConfigError(LegoInterpError):
    """An impossible model or training configuration."""


@dataclass
class ModelConfig:
    d_vocab: int
    d_vocab_out: int
    n_ctx: int
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 6
    d_mlp: int = 512
    tied: bool = False  # ALBERT-like: one block applied n_layers times
    min_depth: int | None = None  # stochastic depth (tied only): train depth ~ U[min_depth, n_layers]
    eps: float = 1e-5
    init_range: float = 0.02
    device: str = field(default="cpu", compare=False)  # kept in step with the weights, as TransformerLens tools read it

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}: pick a width that is a multiple of the head count")
        if min(self.d_vocab, self.d_vocab_out, self.n_ctx, self.d_model, self.n_heads, self.n_layers, self.d_mlp) < 1:
            raise ConfigError("every size in the model config must be a positive integer")
        if self.min_depth is not None:
            if not self.tied:
                raise ConfigError("stochastic depth needs a weight-tied (ALBERT-like) model: add --tied or drop --min-depth")
            if not 1 <= self.min_depth <= self.n_layers:
                raise ConfigError(f"min_depth={self.min_depth} must lie in 1..n_layers={self.n_layers}")

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "device"}


class LayerNorm(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.eps = cfg.eps
        self.w = nn.Parameter(torch.ones(cfg.d_model))
        self.b = nn.Parameter(torch.zeros(cfg.d_model))

    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], self.w, self.b, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, D, E = cfg.n_heads, cfg.d_model, cfg.d_head
        self.W_Q, self.W_K, self.W_V = (nn.Parameter(torch.empty(H, D, E)) for _ in range(3))
        self.b_Q, self.b_K, self.b_V = (nn.Parameter(torch.zeros(H, E)) for _ in range(3))
        self.W_O = nn.Parameter(torch.empty(H, E, D))
        self.b_O = nn.Parameter(torch.zeros(D))
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()  # (B, P, H, E)
        self.hook_attn_scores = HookPoint()  # (B, H, Q, K) pre-softmax
        self.hook_pattern = HookPoint()  # (B, H, Q, K)
        self.hook_z = HookPoint()  # (B, P, H, E)

    def _pattern_requested(self) -> bool:
        return any(h.fwd_hooks or h.bwd_hooks for h in (self.hook_attn_scores, self.hook_pattern))

    def forward(self, x, key_mask):
        """x: (B, P, D); key_mask: (B, 1, 1, P) bool (True = attend) or None."""
        # one GEMM for q, k and v: (D, 3 H E), then split back into TransformerLens's (B, P, H, E)
        W = torch.stack([self.W_Q, self.W_K, self.W_V]).permute(2, 0, 1, 3).flatten(1)
        b = torch.stack([self.b_Q, self.b_K, self.b_V]).flatten()
        q, k, v = (x @ W + b).unflatten(-1, (3, *self.b_Q.shape)).unbind(2)
        q, k, v = (hook(t).transpose(1, 2) for hook, t in ((self.hook_q, q), (self.hook_k, k), (self.hook_v, v)))
        if self._pattern_requested():
            scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
            if key_mask is not None:
                scores = scores.masked_fill(~key_mask, float("-inf"))
            pattern = self.hook_pattern(self.hook_attn_scores(scores).softmax(-1))
            z = pattern @ v
        else:
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        z = self.hook_z(z.transpose(1, 2))  # (B, P, H, E)
        return z.flatten(2) @ self.W_O.flatten(0, 1) + self.b_O


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.W_in = nn.Parameter(torch.empty(cfg.d_model, cfg.d_mlp))
        self.b_in = nn.Parameter(torch.zeros(cfg.d_mlp))
        self.W_out = nn.Parameter(torch.empty(cfg.d_mlp, cfg.d_model))
        self.b_out = nn.Parameter(torch.zeros(cfg.d_model))
        self.hook_pre, self.hook_post = HookPoint(), HookPoint()  # (B, P, d_mlp)

    def forward(self, x):
        pre = self.hook_pre(x @ self.W_in + self.b_in)
        return self.hook_post(F.gelu(pre)) @ self.W_out + self.b_out


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1, self.attn, self.ln2, self.mlp = LayerNorm(cfg), Attention(cfg), LayerNorm(cfg), MLP(cfg)
        self.hook_resid_pre, self.hook_attn_out, self.hook_resid_mid = HookPoint(), HookPoint(), HookPoint()
        self.hook_mlp_out, self.hook_resid_post = HookPoint(), HookPoint()

    def forward(self, resid, key_mask):
        resid = self.hook_resid_pre(resid)
        resid = self.hook_resid_mid(resid + self.hook_attn_out(self.attn(self.ln1(resid), key_mask)))
        return self.hook_resid_post(resid + self.hook_mlp_out(self.mlp(self.ln2(resid))))


class LegoTransformer(HookedRootModule):
    """Encoder with a classification head read at every position (the loss uses clause starts)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Module()
        self.embed.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model))
        self.pos_embed = nn.Module()
        self.pos_embed.W_pos = nn.Parameter(torch.empty(cfg.n_ctx, cfg.d_model))
        self.hook_embed, self.hook_pos_embed = HookPoint(), HookPoint()
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_final = LayerNorm(cfg)
        self.unembed = nn.Module()
        self.unembed.W_U = nn.Parameter(torch.empty(cfg.d_model, cfg.d_vocab_out))
        self.unembed.b_U = nn.Parameter(torch.zeros(cfg.d_vocab_out))
        self._init_weights()
        if cfg.tied:
            self._tie_blocks()
        self.setup()

    def _init_weights(self):
        for name, p in self.named_parameters():
            if name.split(".")[-1].startswith("W_"):
                nn.init.normal_(p, std=self.cfg.init_range)
                if name.endswith(("W_O", "W_out")):  # GPT-2: keep the residual stream's variance flat in depth
                    p.data /= math.sqrt(2 * self.cfg.n_layers)

    def _tie_blocks(self):
        """ALBERT: every block reuses block 0's parameters, while keeping its own hook points."""
        for block in self.blocks[1:]:
            for name, module in block.named_modules():
                source = self.blocks[0].get_submodule(name)
                for pname, _ in list(module.named_parameters(recurse=False)):
                    setattr(module, pname, getattr(source, pname))

    def _apply(self, fn, *args, **kwargs):
        module = super()._apply(fn, *args, **kwargs)
        self.cfg.device = str(self.embed.W_E.device)
        return module

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
                n_layers: int | None = None, start_at_layer: int | None = None) -> torch.Tensor:
        """tokens: (B, P) long; attention_mask: (B, P) bool, False at padding; n_layers: depth to run
        (defaults to all; stochastic-depth training passes a sampled one); start_at_layer: as in TransformerLens,
        ``tokens`` is then the residual stream (B, P, d_model) entering that block.  Returns logits (B, P, d_vocab_out)."""
        P = tokens.shape[1]
        if P > self.cfg.n_ctx:
            raise ConfigError(f"input has {P} tokens but the model reads at most n_ctx={self.cfg.n_ctx}")
        key_mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask[:, None, None, :]
        if start_at_layer is None:
            resid = self.hook_embed(F.embedding(tokens, self.embed.W_E)) + self.hook_pos_embed(self.pos_embed.W_pos[:P])
        else:
            resid = tokens
        for block in self.blocks[start_at_layer or 0: n_layers or self.cfg.n_layers]:
            resid = block(resid, key_mask)
        return self.ln_final(resid) @ self.unembed.W_U + self.unembed.b_U

    def run_with_cache(self, *args, return_cache_object: bool = True, remove_batch_dim: bool = False, **kwargs):
        """As ``HookedTransformer.run_with_cache``: the cache is an ``ActivationCache`` (``cache["pattern", l]``)."""
        out, cache = super().run_with_cache(*args, remove_batch_dim=remove_batch_dim, **kwargs)
        return out, ActivationCache(cache, self, has_batch_dim=not remove_batch_dim) if return_cache_object else cache

    def sample_depth(self, generator: torch.Generator | None = None) -> int:
        """Training depth: U[min_depth, n_layers] with stochastic depth, else n_layers."""
        if self.cfg.min_depth is None:
            return self.cfg.n_layers
        return int(torch.randint(self.cfg.min_depth, self.cfg.n_layers + 1, (1,), generator=generator))

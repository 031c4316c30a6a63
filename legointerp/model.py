"""A bidirectional pre-LN transformer encoder for LEGO, BERT-like or ALBERT-like (weight-tied).

Read top to bottom: config, embeddings, attention, MLP, block, model.  Parameters are shaped and
named as in TransformerLens (``W_Q: (n_heads, d_model, d_head)``, ``blocks.{l}.attn.W_O``, ...) and
every activation passes a ``HookPoint`` with TransformerLens's name, so the model *is* a hooked
model: ``run_with_cache``, ``run_with_hooks``, ``cache["pattern", l]`` and the cache's helpers
(``accumulated_resid``, ``decompose_resid``, ``apply_ln_to_stack``, ``logit_attrs``,
``stack_head_results``) work on it directly, and it carries HookedTransformer's stacked weight
properties (``model.W_Q``: (n_layers, n_heads, d_model, d_head), ``W_U``, ``b_O``, ``QK``, ...).
Fused kernels run unless a hook asks for what they never form: attention goes through
``scaled_dot_product_attention`` unless the scores or pattern are hooked, LayerNorm through
``F.layer_norm`` unless ``hook_scale`` / ``hook_normalized`` are, and per-head outputs
(``hook_result``) exist only after ``set_use_attn_result(True)``, as in TransformerLens.
Every affine map is :func:`affine`, so under autocast q/k/v, the MLP and each sublayer's output
stay in bf16, while fp32 results are bit-identical to a plain ``x @ W + b``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformer_lens import ActivationCache, FactoredMatrix, HookedRootModule
from transformer_lens.hook_points import HookPoint

from legointerp.errors import LegoInterpError
from legointerp.task import LegoTask


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
    use_attn_result: bool = field(default=False, compare=False)  # runtime switch for hook_result, never saved
    # What TransformerLens's cache helpers read to know the architecture; fixed, so not saved either.
    normalization_type: ClassVar[str] = "LN"
    attn_only: ClassVar[bool] = False
    act_fn: ClassVar[str] = "gelu"
    positional_embedding_type: ClassVar[str] = "standard"
    attention_dir: ClassVar[str] = "bidirectional"

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
        return {k: v for k, v in asdict(self).items() if k not in ("device", "use_attn_result")}


def affine(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``x @ W + b`` with the bias cast to the product's dtype.  A plain ``+ b`` promotes an autocast bf16 product
    back to fp32 (doubling the traffic of everything downstream); ``F.linear`` keeps bf16 but fuses the bias into
    the GEMM's blocked accumulation, which moves fp32 results by up to ~1e-5 on the bundled model.
    x: (..., d_in); W: (d_in, d_out); b: (d_out,)."""
    product = x @ W
    return product + b.to(product.dtype)


def _hooked(*points: HookPoint) -> bool:
    """Whether a hook is attached to any of ``points``: then the fused kernel, which never forms them, is bypassed."""
    return any(point.fwd_hooks or point.bwd_hooks for point in points)


class LayerNorm(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.eps = cfg.eps
        self.w = nn.Parameter(torch.ones(cfg.d_model))
        self.b = nn.Parameter(torch.zeros(cfg.d_model))
        self.hook_scale = HookPoint()  # (B, P, 1): the divisor, which apply_ln_to_stack freezes
        self.hook_normalized = HookPoint()  # (B, P, D) before the affine map

    def forward(self, x):
        if not _hooked(self.hook_scale, self.hook_normalized):
            return F.layer_norm(x, x.shape[-1:], self.w, self.b, self.eps)
        x = x - x.mean(-1, keepdim=True)
        scale = self.hook_scale((x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        return self.hook_normalized(x / scale) * self.w + self.b


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg  # shared with the model, so set_use_attn_result reaches every layer
        H, D, E = cfg.n_heads, cfg.d_model, cfg.d_head
        self.W_Q, self.W_K, self.W_V = (nn.Parameter(torch.empty(H, D, E)) for _ in range(3))
        self.b_Q, self.b_K, self.b_V = (nn.Parameter(torch.zeros(H, E)) for _ in range(3))
        self.W_O = nn.Parameter(torch.empty(H, E, D))
        self.b_O = nn.Parameter(torch.zeros(D))
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()  # (B, P, H, E)
        self.hook_attn_scores = HookPoint()  # (B, H, Q, K) pre-softmax
        self.hook_pattern = HookPoint()  # (B, H, Q, K)
        self.hook_z = HookPoint()  # (B, P, H, E)
        self.hook_result = HookPoint()  # (B, P, H, D): each head's write to the residual stream, if use_attn_result

    def forward(self, x, key_mask):
        """x: (B, P, D); key_mask: (B, 1, 1, P) bool (True = attend) or None."""
        # one GEMM for q, k and v: (D, 3 H E), then split back into TransformerLens's (B, P, H, E)
        W = torch.stack([self.W_Q, self.W_K, self.W_V]).permute(2, 0, 1, 3).flatten(1)
        b = torch.stack([self.b_Q, self.b_K, self.b_V]).flatten()
        q, k, v = affine(x, W, b).unflatten(-1, (3, *self.b_Q.shape)).unbind(2)
        q, k, v = (hook(t).transpose(1, 2) for hook, t in ((self.hook_q, q), (self.hook_k, k), (self.hook_v, v)))
        if _hooked(self.hook_attn_scores, self.hook_pattern):
            scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
            if key_mask is not None:
                scores = scores.masked_fill(~key_mask, float("-inf"))
            pattern = self.hook_pattern(self.hook_attn_scores(scores).softmax(-1))
            z = pattern @ v
        else:
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        z = self.hook_z(z.transpose(1, 2))  # (B, P, H, E)
        if self.cfg.use_attn_result:
            return self.hook_result(torch.einsum("bphe,hed->bphd", z, self.W_O)).sum(-2) + self.b_O
        return affine(z.flatten(2), self.W_O.flatten(0, 1), self.b_O)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.W_in = nn.Parameter(torch.empty(cfg.d_model, cfg.d_mlp))
        self.b_in = nn.Parameter(torch.zeros(cfg.d_mlp))
        self.W_out = nn.Parameter(torch.empty(cfg.d_mlp, cfg.d_model))
        self.b_out = nn.Parameter(torch.zeros(cfg.d_model))
        self.hook_pre, self.hook_post = HookPoint(), HookPoint()  # (B, P, d_mlp)

    def forward(self, x):
        pre = self.hook_pre(affine(x, self.W_in, self.b_in))
        return affine(self.hook_post(F.gelu(pre)), self.W_out, self.b_out)


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
        self.task: LegoTask | None = None  # the vocabulary, attached by set_task
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
            embed = self.hook_embed(F.embedding(tokens, self.embed.W_E))  # (B, P, D)
            # a broadcast view, so the hook sees TransformerLens's (B, P, D) and decompose_resid can stack it with embed
            resid = embed + self.hook_pos_embed(self.pos_embed.W_pos[:P].expand_as(embed))
        else:
            resid = tokens
        for block in self.blocks[start_at_layer or 0: n_layers or self.cfg.n_layers]:
            resid = block(resid, key_mask)
        return affine(self.ln_final(resid), self.unembed.W_U, self.unembed.b_U)

    def run_with_cache(self, *args, return_cache_object: bool = True, remove_batch_dim: bool = False, **kwargs):
        """As ``HookedTransformer.run_with_cache``: the cache is an ``ActivationCache`` (``cache["pattern", l]``)."""
        out, cache = super().run_with_cache(*args, remove_batch_dim=remove_batch_dim, **kwargs)
        return out, ActivationCache(cache, self, has_batch_dim=not remove_batch_dim) if return_cache_object else cache

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """As TransformerLens's ``use_attn_result``: cache each head's write to the residual stream at
        ``blocks.{l}.attn.hook_result`` (B, P, n_heads, d_model).  Off by default: it costs that tensor per layer."""
        self.cfg.use_attn_result = bool(use_attn_result)

    # HookedTransformer's stacked weights: (n_layers, ...) one block's parameter per layer (a tied model repeats it)
    def _stacked(self, name: str) -> torch.Tensor:
        return torch.stack([block.get_parameter(name) for block in self.blocks])

    W_Q = property(lambda self: self._stacked("attn.W_Q"), doc="(n_layers, n_heads, d_model, d_head)")
    W_K = property(lambda self: self._stacked("attn.W_K"), doc="(n_layers, n_heads, d_model, d_head)")
    W_V = property(lambda self: self._stacked("attn.W_V"), doc="(n_layers, n_heads, d_model, d_head)")
    W_O = property(lambda self: self._stacked("attn.W_O"), doc="(n_layers, n_heads, d_head, d_model)")
    b_Q = property(lambda self: self._stacked("attn.b_Q"), doc="(n_layers, n_heads, d_head)")
    b_K = property(lambda self: self._stacked("attn.b_K"), doc="(n_layers, n_heads, d_head)")
    b_V = property(lambda self: self._stacked("attn.b_V"), doc="(n_layers, n_heads, d_head)")
    b_O = property(lambda self: self._stacked("attn.b_O"), doc="(n_layers, d_model)")
    W_in = property(lambda self: self._stacked("mlp.W_in"), doc="(n_layers, d_model, d_mlp)")
    b_in = property(lambda self: self._stacked("mlp.b_in"), doc="(n_layers, d_mlp)")
    W_out = property(lambda self: self._stacked("mlp.W_out"), doc="(n_layers, d_mlp, d_model)")
    b_out = property(lambda self: self._stacked("mlp.b_out"), doc="(n_layers, d_model)")
    W_E = property(lambda self: self.embed.W_E, doc="(d_vocab, d_model)")
    W_pos = property(lambda self: self.pos_embed.W_pos, doc="(n_ctx, d_model)")
    W_U = property(lambda self: self.unembed.W_U, doc="(d_model, d_vocab_out): one column per value class")
    b_U = property(lambda self: self.unembed.b_U, doc="(d_vocab_out,)")
    QK = property(lambda self: FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1)), doc="(n_layers, n_heads, d_model, d_model)")
    OV = property(lambda self: FactoredMatrix(self.W_V, self.W_O), doc="(n_layers, n_heads, d_model, d_model)")

    def accumulated_bias(self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True) -> torch.Tensor:
        """(d_model,) the attention (and MLP) output biases written before ``layer``'s attention (its MLP with
        ``mlp_input``), which ``cache.get_full_resid_decomposition`` counts as one component."""
        bias = self.b_O[:layer].sum(0) + (self.b_out[:layer].sum(0) if include_mlp_biases else 0)
        return bias + self.blocks[layer].attn.b_O if mlp_input else bias

    def tokens_to_residual_directions(self, tokens: int | str | torch.Tensor) -> torch.Tensor:
        """(*tokens.shape, d_model) the unembedding column of each output class: an index, a tensor of indices, or a
        value's name (``"-1"``).  The model's outputs are value classes, not vocabulary tokens, so this is what
        ``cache.logit_attrs`` projects on; like TransformerLens's, it ignores ``ln_final``'s weight."""
        if isinstance(tokens, str):
            literal_index = self._vocabulary().literal_index
            if tokens not in literal_index:
                raise LegoInterpError(f"{tokens!r} is not a value this model outputs: use one of {' '.join(literal_index)}")
            tokens = literal_index[tokens]
        return self.W_U[:, torch.as_tensor(tokens, device=self.W_U.device)].movedim(0, -1)

    # Text: the weights do not know which id means what, so the task's vocabulary is attached (load_model does it)
    def set_task(self, task: LegoTask) -> None:
        """Attach ``task``'s vocabulary, which ``to_tokens``, ``to_str_tokens`` and ``to_string`` read."""
        if (task.d_vocab, task.n_classes) != (self.cfg.d_vocab, self.cfg.d_vocab_out):
            raise ConfigError(f"the task has {task.d_vocab} tokens and {task.n_classes} values but the model reads "
                              f"{self.cfg.d_vocab} and writes {self.cfg.d_vocab_out}: attach the task it was trained on")
        self.task = task

    def _vocabulary(self) -> LegoTask:
        if self.task is None:
            raise LegoInterpError("this model has no vocabulary attached: load it with legointerp.checkpoint.load_model, "
                                  "or call model.set_task(task)")
        return self.task

    def to_tokens(self, input: str | list[str]) -> torch.Tensor:
        """Sentences ``"a=+1; b=-a"`` -> (B, 5 n + 2) token ids with [BOS]/[EOS], padded to the longest (n clauses);
        a malformed sentence raises ``LegoError`` naming the problem.  LEGO sentences always carry [BOS]."""
        task = self._vocabulary()
        sentences = [task.parse(text) for text in ([input] if isinstance(input, str) else input)]
        if not sentences:
            raise LegoInterpError("to_tokens got an empty list: pass one sentence or a list of sentences")
        return task.encode(sentences, n=max(len(sentence.clauses) for sentence in sentences)).tokens.to(self.cfg.device)

    def to_str_tokens(self, input: str | list | torch.Tensor) -> list[str] | list[list[str]]:
        """A sentence or (P,) ids -> its token names; a list of sentences or (B, P) ids -> one list per sentence."""
        if isinstance(input, list):
            return [self.to_str_tokens(item) for item in input]
        tokens = self.to_tokens(input)[0] if isinstance(input, str) else torch.as_tensor(input).squeeze()
        if tokens.ndim == 2:
            return [self._vocabulary().token_strings(row) for row in tokens]
        return self._vocabulary().token_strings(tokens.reshape(-1))

    def to_single_token(self, string: str) -> int:
        """The vocabulary id of one token name (``"="``, ``"a"``, ``"[BOS]"``)."""
        vocab = self._vocabulary().vocab
        if string not in vocab:
            raise LegoInterpError(f"{string!r} is not a single token of this model's vocabulary: use one of {' '.join(vocab)}")
        return vocab.index(string)

    def to_string(self, tokens: torch.Tensor) -> str | list[str]:
        """(P,) ids -> ``"a=+1; b=-a"``; (B, P) -> one sentence per row."""
        if tokens.ndim == 2:
            return [self.to_string(row) for row in tokens]
        return self._vocabulary().to_text(tokens)

    def sample_depth(self, generator: torch.Generator | None = None) -> int:
        """Training depth: U[min_depth, n_layers] with stochastic depth, else n_layers."""
        if self.cfg.min_depth is None:
            return self.cfg.n_layers
        return int(torch.randint(self.cfg.min_depth, self.cfg.n_layers + 1, (1,), generator=generator))

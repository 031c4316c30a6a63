"""A bidirectional transformer encoder for LEGO, BERT-like or ALBERT-like (weight-tied), pre-LN or post-LN.

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

*Hardcoded heads* (the paper's section 5): ``ModelConfig.hardcoded`` names, per head index, a fixed
pattern computed from the tokens alone (``HARDCODED``: the masks of :mod:`legointerp.patterns`,
row-normalised), the same in every layer; those heads have no query or key (their ``W_Q``/``W_K``
stay zero and get no gradient, no ``QK^T``, no softmax) and learn only their value/output maps.
``hook_pattern`` fires with every head's pattern, fixed ones included, so every analysis sees it;
``hook_q``/``hook_k``/``hook_attn_scores`` hold zeros for the fixed heads.  :func:`forward_flops`
counts what this saves.

*+aI / +bI attention* (``ModelConfig.identity_attention``; Boix-Adsera et al., "When can transformers reason with
abstract symbols?"): each head has two trainable scalars, ``attn.a_I`` and ``attn.b_I`` (H,), zero at
initialisation, so the model starts as the plain one.  With x the attention's input (``ln1``'s output pre-LN, the
residual stream post-LN), ``QK = W_Q W_K^T + a I`` adds ``a <x_i, x_j> / sqrt(d_head)`` to the score (attend to the
same token, by content), and ``OV = W_V W_O + b I`` adds ``b sum_j pattern_ij x_j`` to the head's output (copy the
attended tokens forward).  That copy bypasses ``hook_z``: it passes ``blocks.{l}.attn.hook_identity_out``
(B, P, H, D), one write per head, so ``attn_out = sum_h z_h W_O[h] + b_O + sum_h identity_out_h``; ``hook_result``
includes it (each head's whole write).  A hook that changes a head's ``hook_z`` while nothing hooks
``hook_identity_out`` is refused where that head's ``b`` is nonzero (TransformerLens's head-output patching writes z
alone, which would leave the copy unpatched).  Such a model always materialises its pattern (no fused kernel); the stacked
``model.QK`` / ``model.OV`` include the identity terms exactly, ``model.a_I`` / ``model.b_I`` are (n_layers, H).
A hardcoded head keeps its fixed pattern (its ``a`` is unused) and still has its ``b``.

*Post-LN* (``ModelConfig.norm="post"``), as BERT and ALBERT are (``legointerp.hf`` copies their weights in, and
the tests check the hidden states equal ``transformers``' to 1e-5): token + position embeddings, then a LayerNorm
(``ln_embed``), then for ALBERT's factorised embedding (``d_embed``) the ``embed_proj`` map to ``d_model``; each
block adds attention to its input and normalises (``ln1``), adds the MLP and normalises (``ln2``); there is no
``ln_final``.  The hooks hold the stream each reader actually receives: ``hook_resid_mid`` is *after* ``ln1``
(what the MLP reads and adds to) and ``hook_resid_post`` *after* ``ln2``, so ``blocks.{l}.hook_resid_post`` equals
``blocks.{l+1}.hook_resid_pre`` as in a pre-LN model, and probes and patching of ``resid_pre``/``resid_post`` read
and write what the next block sees.  The sums before the LayerNorms are at ``hook_resid_mid_unnormalized`` and
``hook_resid_post_unnormalized`` (TransformerLens's old HookedEncoder called the latter ``hook_resid_post`` and the
normalised one ``hook_normalized_resid_post``).  A post-LN residual stream is not a sum of component writes, so
TransformerLens's decomposition helpers (``decompose_resid``, ``apply_ln_to_stack``) do not describe it and the
cache (:class:`LegoActivationCache`) refuses them;
``cfg.normalization_type`` is None there, as no LayerNorm sits between the last block and the unembedding.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformer_lens import ActivationCache, FactoredMatrix, HookedRootModule
from transformer_lens.hook_points import HookPoint

from legointerp.errors import LegoInterpError
from legointerp.patterns import association_mask, broadcast_mask, manipulation_mask, row_normalised
from legointerp.task import CLAUSE_LEN, PAD, LegoTask

# The fixed patterns a head can be given: (B, T) tokens and the config -> (B, T, T) mask of the keys each query attends
HARDCODED = {
    # the paper's 1[u_i = u_j] at variable queries, the query itself included
    "association": lambda tokens, cfg: association_mask(tokens, tokens >= cfg.variable_offset, include_self=True),
    "manipulation": lambda tokens, cfg: manipulation_mask(tokens),
    "broadcast": lambda tokens, cfg: broadcast_mask(tokens),
}


RUNTIME_FIELDS = ("device", "dtype", "use_attn_result", "use_split_qkv_input", "use_attn_in")  # ModelConfig's, never saved
RETURN_TYPES = ("logits", "loss", "both", None)  # LegoTransformer.forward's, as TransformerLens's
NORMS = ("pre", "post")  # where each block's LayerNorms sit: before each sublayer (GPT-2) or after each residual add (BERT)
ACT_FNS = {"gelu": "none", "gelu_new": "tanh"}  # transformers' names -> F.gelu's approximate: BERT's exact erf, ALBERT's tanh


class ConfigError(LegoInterpError):
    """An impossible model or training configuration."""


def require_writes_at_z(cfg, analysis: str,
                        fix: str = "use the head classifier's ablations or residual-stream patching") -> None:
    """Refuse ``analysis`` where a head's write is not all at ``hook_z``: +aI/+bI attention also writes through
    ``hook_identity_out``."""
    if getattr(cfg, "identity_attention", False):
        raise ConfigError(f"{analysis} reads each head's write at hook_z, but this model's +bI attention also writes "
                          f"through hook_identity_out: {fix}")


def require_pre_ln(cfg, analysis: str) -> None:
    """Refuse ``analysis`` on a post-LN model: its residual stream is renormalised after every sublayer, so it is no
    sum of component writes and there is no final LayerNorm to read it through."""
    if getattr(cfg, "norm", "pre") == "post":
        raise ConfigError(f"{analysis} needs a pre-LN model (a residual stream that is a sum of writes); this one is "
                          "post-LN: use the probes, head classifier or residual-stream patching instead")


def _pre_ln_only(name: str):
    """``ActivationCache.<name>``, refused on a post-LN model."""
    def helper(self, *args, **kwargs):
        require_pre_ln(self.model.cfg, f"cache.{name}")
        return getattr(ActivationCache, name)(self, *args, **kwargs)
    return helper


class LegoActivationCache(ActivationCache):
    """TransformerLens's ``ActivationCache``, with what this architecture changes in its helpers: on a +aI/+bI model a
    head's write is ``z W_O`` plus its identity copy, so per-head results rebuilt from ``hook_z`` add the cached
    ``hook_identity_out``; on a post-LN model the residual stream is no sum of component writes, so the helpers that
    assume it is (``decompose_resid``, ``apply_ln_to_stack``, ``logit_attrs``, ``get_full_resid_decomposition``)
    refuse instead of returning numbers that describe nothing."""

    def _ensure_head_results(self) -> bool:
        names = [f"blocks.{layer}.attn.hook_result" for layer in range(self.model.cfg.n_layers)]
        rebuilt = [layer for layer, name in enumerate(names) if name not in self.cache_dict]
        if self.model.cfg.identity_attention:
            for layer in rebuilt:
                if f"blocks.{layer}.attn.hook_identity_out" not in self.cache_dict:
                    raise ConfigError(f"layer {layer}'s per-head results need each head's +bI copy, which this cache "
                                      "lacks: cache blocks.*.attn.hook_identity_out too, or run after "
                                      "model.set_use_attn_result(True)")
        all_cached = super()._ensure_head_results()
        if self.model.cfg.identity_attention:
            for layer in rebuilt:
                self.cache_dict[names[layer]] = self.cache_dict[names[layer]] + self[f"blocks.{layer}.attn.hook_identity_out"]
        return all_cached

    def apply_slice_to_batch_dim(self, batch_slice) -> "LegoActivationCache":
        sliced = super().apply_slice_to_batch_dim(batch_slice)
        return LegoActivationCache(sliced.cache_dict, self.model, has_batch_dim=sliced.has_batch_dim)

    decompose_resid = _pre_ln_only("decompose_resid")
    apply_ln_to_stack = _pre_ln_only("apply_ln_to_stack")
    logit_attrs = _pre_ln_only("logit_attrs")
    get_full_resid_decomposition = _pre_ln_only("get_full_resid_decomposition")


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
    eps: float | None = None  # LayerNorm epsilon; None: 1e-5 pre-LN, BERT's 1e-12 post-LN
    init_range: float = 0.02
    hardcoded: tuple[str | None, ...] = ()  # per head index, in every layer: a name in HARDCODED, or None (learned)
    variable_offset: int | None = None  # first variable token id (every id from it up): association's queries
    norm: str = "pre"  # "pre" (LayerNorm before each sublayer, a final one) or "post" (BERT: after each residual add)
    d_embed: int | None = None  # ALBERT's factorised embedding width (post-LN only), projected to d_model; None: d_model
    act_fn: str = "gelu"  # the MLP's: "gelu" (exact erf, BERT's) or "gelu_new" (tanh approximation, ALBERT's default)
    identity_attention: bool = False  # Boix-Adsera et al.'s +aI/+bI: two trainable scalars per head (Attention)
    device: str = field(default="cpu", compare=False)  # kept in step with the weights, as TransformerLens tools read it
    dtype: torch.dtype = field(default=torch.float32, compare=False)  # likewise (head_detector reads it)
    use_attn_result: bool = field(default=False, compare=False)  # runtime switch for hook_result, never saved
    use_split_qkv_input: bool = field(default=False, compare=False)  # runtime: hook_q_input / hook_k_input / hook_v_input
    use_attn_in: bool = field(default=False, compare=False)  # runtime: hook_attn_in
    # What TransformerLens's cache helpers read to know the architecture; fixed, so not saved either.
    attn_only: ClassVar[bool] = False
    positional_embedding_type: ClassVar[str] = "standard"
    attention_dir: ClassVar[str] = "bidirectional"

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ConfigError(f"norm={self.norm!r} is not a LayerNorm placement: use pre (GPT-2-like) or post (BERT/ALBERT)")
        if self.act_fn not in ACT_FNS:
            raise ConfigError(f"act_fn={self.act_fn!r} is not supported: use {' or '.join(ACT_FNS)}")
        if self.d_embed is not None:
            if self.norm != "post":
                raise ConfigError("a factorised embedding (d_embed) is ALBERT's, a post-LN model: add --norm post or drop --d-embed")
            if self.d_embed < 1:
                raise ConfigError(f"d_embed={self.d_embed} must be a positive integer")
        if self.eps is None:
            self.eps = 1e-5 if self.norm == "pre" else 1e-12
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}: pick a width that is a multiple of the head count")
        if min(self.d_vocab, self.d_vocab_out, self.n_ctx, self.d_model, self.n_heads, self.n_layers, self.d_mlp) < 1:
            raise ConfigError("every size in the model config must be a positive integer")
        if self.min_depth is not None:
            if not self.tied:
                raise ConfigError("stochastic depth needs a weight-tied (ALBERT-like) model: add --tied or drop --min-depth")
            if not 1 <= self.min_depth <= self.n_layers:
                raise ConfigError(f"min_depth={self.min_depth} must lie in 1..n_layers={self.n_layers}")
        # all heads learned is one config however it is spelled, so () and (None, None, ...) compare equal
        self.hardcoded = tuple(self.hardcoded) if any(kind is not None for kind in self.hardcoded) else ()
        if self.hardcoded:
            if len(self.hardcoded) != self.n_heads:
                raise ConfigError(f"hardcoded names {len(self.hardcoded)} heads but the model has n_heads={self.n_heads}: "
                                  "give one entry per head, '-' for a learned one (e.g. association,manipulation,-,-)")
            unknown = sorted({kind for kind in self.hardcoded if kind is not None} - set(HARDCODED))
            if unknown:
                raise ConfigError(f"unknown hardcoded pattern {unknown[0]!r}: use {', '.join(HARDCODED)} or '-' (learned)")
            if "association" in self.hardcoded and self.variable_offset is None:
                raise ConfigError("an association head needs the task's variable ids: set variable_offset to "
                                  "LegoTask.variable_offset (TrainConfig.model_config does)")

    @property
    def fixed_heads(self) -> list[int]:
        """Indices of the hardcoded heads (empty: every head learned)."""
        return [h for h, kind in enumerate(self.hardcoded) if kind is not None]

    @property
    def normalization_type(self) -> str | None:
        """What TransformerLens's cache helpers read: the LayerNorm between the last residual stream and the
        unembedding ("LN" pre-LN, None post-LN, whose last stream is already normalised)."""
        return "LN" if self.norm == "pre" else None

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in RUNTIME_FIELDS}


def forward_flops(cfg: ModelConfig, n_tokens: int | None = None) -> int:
    """Forward FLOPs of one sentence of ``n_tokens`` tokens (default ``n_ctx``), from the shapes alone: two per
    multiply-add of every matrix product (what ``torch.utils.flop_counter.FlopCounterMode`` counts).  Per layer:
    the q/k/v projection (q and k for the learned heads only), ``QK^T`` for the learned heads, the pattern times v
    and the output map for every head, the MLP; then the unembedding (and before the blocks, ALBERT's embedding
    projection).  A hardcoded head saves its q/k projection and ``QK^T`` (its pattern is built from token
    comparisons, which are not FLOPs); softmax, LayerNorm and GELU are elementwise and not counted."""
    T = cfg.n_ctx if n_tokens is None else n_tokens
    D, E, H, M = cfg.d_model, cfg.d_head, cfg.n_heads, cfg.d_mlp
    learned = H - len(cfg.fixed_heads)
    layer = 2 * T * D * E * (2 * learned + H) + 2 * T * T * E * (learned + H) + 2 * T * D * D + 4 * T * D * M
    if cfg.identity_attention:  # the inputs' Gram matrix for +aI (learned heads only), the mixed pattern times x for +bI
        layer += 2 * T * T * D * (2 if learned else 1)
    projection = 2 * T * cfg.d_embed * D if cfg.d_embed is not None else 0
    return cfg.n_layers * layer + 2 * T * D * cfg.d_vocab_out + projection


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
    def __init__(self, cfg: ModelConfig, width: int | None = None):
        super().__init__()
        self.eps = cfg.eps
        self.w = nn.Parameter(torch.ones(width or cfg.d_model))
        self.b = nn.Parameter(torch.zeros(width or cfg.d_model))
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
        if cfg.identity_attention:  # absent otherwise, so a plain model's state dict keeps its keys
            self.a_I = nn.Parameter(torch.zeros(H))  # QK = W_Q W_K^T + a I
            self.b_I = nn.Parameter(torch.zeros(H))  # OV = W_V W_O + b I
            self.hook_identity_out = HookPoint()  # (B, P, H, D): each head's b * sum_j pattern_ij x_j
        fixed = cfg.fixed_heads
        learned = [h for h in range(H) if h not in fixed]
        # head indices as buffers, so they follow the weights' device; never saved (the config says it all)
        self.register_buffer("fixed", torch.tensor(fixed, dtype=torch.long), persistent=False)
        self.register_buffer("order", torch.tensor(learned + fixed).argsort(), persistent=False)  # -> head order
        if fixed:
            self.register_buffer("learned", torch.tensor(learned, dtype=torch.long), persistent=False)
        else:
            self.learned = slice(None)  # the usual model gathers nothing

    def _merge(self, learned: torch.Tensor, fixed: torch.Tensor | None, dim: int) -> torch.Tensor:
        """The learned heads' and the fixed heads' slices (zeros if ``fixed`` is None), stacked along ``dim``, back
        in head order."""
        if fixed is None:
            shape = list(learned.shape)
            shape[dim] = len(self.fixed)
            fixed = learned.new_zeros(shape)
        return torch.cat([learned, fixed], dim).index_select(dim, self.order)

    def _hook_learned(self, hook: HookPoint, t: torch.Tensor, dim: int) -> torch.Tensor:
        """Fire ``hook`` on the learned heads' ``t`` shown with every head (zeros at the fixed ones, which have no
        query, key or score) and return the learned heads' part of what the hook returns."""
        if not self.cfg.hardcoded:
            return hook(t)
        return hook(self._merge(t, None, dim)).index_select(dim, self.learned)

    def qkv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The learned heads' query and key maps and every head's value map side by side, so that one GEMM makes q, k
        and v: W (D, (2 n_learned + H) E) and b ((2 n_learned + H) E,).  Under autocast they come in its dtype, cast
        here once rather than by every product that reads them (a tied model's blocks share one pair per forward)."""
        W = torch.cat([self.W_Q[self.learned], self.W_K[self.learned], self.W_V]).transpose(0, 1).flatten(1)
        b = torch.cat([self.b_Q[self.learned], self.b_K[self.learned], self.b_V]).flatten()
        device = W.device.type
        if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
            W, b = W.to(torch.get_autocast_dtype(device)), b.to(torch.get_autocast_dtype(device))
        return W, b

    def forward(self, x, key_mask, fixed_pattern=None, split=None, qkv=None):
        """x: (B, P, D); key_mask: (B, 1, 1, P) bool (True = attend) or None; fixed_pattern: (B, H_fixed, P, P) the
        hardcoded heads' attention, in head order (None when every head is learned); split: TransformerLens's
        per-head inputs (q, k, v), each (B, P, H, D), which replace ``x`` (use_split_qkv_input / use_attn_in); qkv:
        :meth:`qkv` already computed (None: computed here)."""
        H, E = self.cfg.n_heads, self.cfg.d_head
        n_learned = H - len(self.fixed)
        if split is not None:
            q, k, v = (torch.einsum("bphd,hde->bphe", inputs[:, :, heads], W[heads]) + b[heads]
                       for inputs, W, b, heads in zip(split, (self.W_Q, self.W_K, self.W_V), (self.b_Q, self.b_K, self.b_V),
                                                      (self.learned, self.learned, slice(None))))
        else:
            W, b = qkv or self.qkv()
            q, k, v = affine(x, W, b).unflatten(-1, (-1, E)).split([n_learned, n_learned, H], dim=2)  # (B, P, heads, E)
        q, k = self._hook_learned(self.hook_q, q, 2), self._hook_learned(self.hook_k, k, 2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), self.hook_v(v).transpose(1, 2)
        identity = self.cfg.identity_attention
        if identity or _hooked(self.hook_attn_scores, self.hook_pattern):  # +bI needs the pattern itself
            scores = q @ k.transpose(-1, -2) / math.sqrt(E)
            if identity:  # x_i^T (W_Q W_K^T + a I) x_j / sqrt(E): the attention inputs' own dot products
                a = (self.a_I[self.learned] / math.sqrt(E)).to(scores.dtype)
                scores = scores + a[:, None, None] * (x @ x.transpose(-1, -2))[:, None]
            if key_mask is not None:
                scores = scores.masked_fill(~key_mask, float("-inf"))
            pattern = self._hook_learned(self.hook_attn_scores, scores, 1).softmax(-1)
            if self.cfg.hardcoded:
                pattern = self._merge(pattern, fixed_pattern.to(pattern.dtype), 1)
            pattern = self.hook_pattern(pattern)
            z = pattern @ v
        elif self.cfg.hardcoded:
            z = F.scaled_dot_product_attention(q, k, v[:, self.learned], attn_mask=key_mask)
            z = self._merge(z, fixed_pattern.to(v.dtype) @ v[:, self.fixed], 1)
        else:
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        z = self._hook_z(z.transpose(1, 2))  # (B, P, H, E)
        copied = self._copied(pattern, x) if identity else None
        if self.cfg.use_attn_result:
            result = torch.einsum("bphe,hed->bphd", z, self.W_O)
            return self.hook_result(result if copied is None else result + copied).sum(-2) + self.b_O
        out = affine(z.flatten(2), self.W_O.flatten(0, 1), self.b_O)
        return out if copied is None else out + (copied.sum(-2) if copied.ndim == 4 else copied)

    def _hook_z(self, z: torch.Tensor) -> torch.Tensor:
        """``hook_z`` on z (B, P, H, E), refused where its hooks change a head whose +bI copy then stays unpatched
        (TransformerLens's head-output patching writes hook_z alone): a hook on ``hook_identity_out`` says the copy
        is taken care of."""
        if not (self.cfg.identity_attention and self.hook_z.fwd_hooks) or self.hook_identity_out.fwd_hooks:
            return self.hook_z(z)
        hooked = self.hook_z(z.clone())  # a clone, as hooks (TransformerLens's patch setters) may write in place
        changed = (hooked != z).any(-1).any(1).any(0)  # (H,)
        if bool((changed & (self.b_I != 0)).any()):
            require_writes_at_z(self.cfg, f"a hook changing {self.hook_z.name} (as TransformerLens's head-output "
                                "patching does)", f"patch {self.hook_identity_out.name} as well, or patch "
                                "hook_resid_pre / hook_pattern instead")
        return hooked

    def _copied(self, pattern: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The +bI path, ``b_h sum_j pattern_hij x_j``: (B, P, H, D) per head through ``hook_identity_out`` when it is
        hooked or per-head results are kept, else (B, P, D) already summed over heads through one mixed (B, P, P)
        pattern, which never forms the per-head tensor.  pattern: (B, H, P, P); x: (B, P, D) the attention's input."""
        if self.cfg.use_attn_result or _hooked(self.hook_identity_out):
            copied = pattern @ x[:, None]  # (B, H, P, D)
            return self.hook_identity_out((copied * self.b_I.to(copied.dtype)[:, None, None]).transpose(1, 2))
        return (pattern * self.b_I.to(pattern.dtype)[:, None, None]).sum(1) @ x


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.W_in = nn.Parameter(torch.empty(cfg.d_model, cfg.d_mlp))
        self.b_in = nn.Parameter(torch.zeros(cfg.d_mlp))
        self.W_out = nn.Parameter(torch.empty(cfg.d_mlp, cfg.d_model))
        self.b_out = nn.Parameter(torch.zeros(cfg.d_model))
        self.hook_pre, self.hook_post = HookPoint(), HookPoint()  # (B, P, d_mlp)
        self.approximate = ACT_FNS[cfg.act_fn]

    def forward(self, x):
        pre = self.hook_pre(affine(x, self.W_in, self.b_in))
        return affine(self.hook_post(F.gelu(pre, approximate=self.approximate)), self.W_out, self.b_out)


class Block(nn.Module):
    hook_out_is_single_residual_stream = True  # TransformerLens's logit_lens checks it: hook_resid_post is the stream

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1, self.attn, self.ln2, self.mlp = LayerNorm(cfg), Attention(cfg), LayerNorm(cfg), MLP(cfg)
        self.hook_resid_pre, self.hook_attn_out, self.hook_resid_mid = HookPoint(), HookPoint(), HookPoint()
        self.hook_mlp_out, self.hook_resid_post = HookPoint(), HookPoint()
        self.post = cfg.norm == "post"
        self.cfg = cfg
        # (B, P, H, D) each head's own copy of the attention's input, before ln1 (pre-LN), with use_split_qkv_input /
        # use_attn_in, so a path into one head's query, key or value can be patched alone
        self.hook_q_input, self.hook_k_input, self.hook_v_input, self.hook_attn_in = (HookPoint() for _ in range(4))
        if self.post:  # (B, P, D) the residual sums before ln1 / ln2; hook_resid_mid / hook_resid_post are after them
            self.hook_resid_mid_unnormalized, self.hook_resid_post_unnormalized = HookPoint(), HookPoint()

    def _split_inputs(self, resid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """TransformerLens's per-head attention inputs (q, k, v), each (B, P, H, D) through its hook and then ``ln1``
        (pre-LN), or None when neither use_split_qkv_input nor use_attn_in is on."""
        if not (self.cfg.use_split_qkv_input or self.cfg.use_attn_in):
            return None
        heads = resid[:, :, None].expand(-1, -1, self.cfg.n_heads, -1).clone()
        if self.cfg.use_attn_in:
            inputs = (self.hook_attn_in(heads),) * 3
        else:
            inputs = (self.hook_q_input(heads), self.hook_k_input(heads.clone()), self.hook_v_input(heads.clone()))
        return inputs if self.post else tuple(self.ln1(x) for x in inputs)

    def forward(self, resid, key_mask, fixed_pattern=None, qkv=None):
        resid = self.hook_resid_pre(resid)
        split = self._split_inputs(resid)
        if self.post:
            attn_out = self.hook_attn_out(self.attn(resid, key_mask, fixed_pattern, split, qkv))
            resid = self.hook_resid_mid(self.ln1(self.hook_resid_mid_unnormalized(resid + attn_out)))
            return self.hook_resid_post(self.ln2(self.hook_resid_post_unnormalized(resid + self.hook_mlp_out(self.mlp(resid)))))
        attn_in = None if split is not None else self.ln1(resid)
        resid = self.hook_resid_mid(resid + self.hook_attn_out(self.attn(attn_in, key_mask, fixed_pattern, split, qkv)))
        return self.hook_resid_post(resid + self.hook_mlp_out(self.mlp(self.ln2(resid))))


class LegoTransformer(HookedRootModule):
    """Encoder with a classification head read at every position (the loss uses clause starts)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d_embed = cfg.d_embed or cfg.d_model
        self.embed = nn.Module()
        self.embed.W_E = nn.Parameter(torch.empty(cfg.d_vocab, d_embed))
        self.pos_embed = nn.Module()
        self.pos_embed.W_pos = nn.Parameter(torch.empty(cfg.n_ctx, d_embed))
        self.hook_embed, self.hook_pos_embed = HookPoint(), HookPoint()
        if cfg.norm == "post":
            self.ln_embed = LayerNorm(cfg, d_embed)
        if cfg.d_embed is not None:  # ALBERT: (d_embed,) -> (d_model,) after the embedding LayerNorm
            self.embed_proj = nn.Module()
            self.embed_proj.W_proj = nn.Parameter(torch.empty(cfg.d_embed, cfg.d_model))
            self.embed_proj.b_proj = nn.Parameter(torch.zeros(cfg.d_model))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        if cfg.norm == "pre":
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
        for block in self.blocks:  # hardcoded heads have no query or key: zero, and never given a gradient
            for p in (block.attn.W_Q, block.attn.W_K, block.attn.b_Q, block.attn.b_K):
                p.data[self.cfg.fixed_heads] = 0

    def _tie_blocks(self):
        """ALBERT: every block reuses block 0's parameters, while keeping its own hook points."""
        for block in self.blocks[1:]:
            for name, module in block.named_modules():
                source = self.blocks[0].get_submodule(name)
                for pname, _ in list(module.named_parameters(recurse=False)):
                    setattr(module, pname, getattr(source, pname))

    def _apply(self, fn, *args, **kwargs):
        module = super()._apply(fn, *args, **kwargs)
        self.cfg.device, self.cfg.dtype = str(self.embed.W_E.device), self.embed.W_E.dtype
        return module

    def forward(self, tokens: torch.Tensor | str | list[str], attention_mask: torch.Tensor | None = None,
                n_layers: int | None = None, start_at_layer: int | None = None,
                source_tokens: torch.Tensor | None = None, return_type: str | None = "logits",
                padded: bool | None = None) -> torch.Tensor | None:
        """tokens: (B, P) or (P,) long, or sentences (``to_tokens``); attention_mask: (B, P) bool, False at padding; n_layers: depth to run
        (defaults to all; stochastic-depth training passes a sampled one); start_at_layer: as in TransformerLens,
        ``tokens`` is then the residual stream (B, P, d_model) entering that block, and ``source_tokens`` (B, P) the
        ids it came from, which a model with hardcoded heads needs for their patterns.  Without ``attention_mask`` the
        ``[PAD]`` positions of ``tokens`` (or ``source_tokens``) are masked, as ``to_tokens`` pads mixed lengths.
        ``padded``: whether any token is padding, where the caller knows it without reading the device (training
        does, from its CPU batch); None asks the mask, which is free on the CPU, and on an accelerator, where asking
        would make the host wait for the device every forward, applies it (the masked kernel is cheaper than the wait).
        Returns, as TransformerLens's ``return_type``: "logits" (B, P, d_vocab_out), "loss" (the mean cross-entropy
        of every clause's answer, the training loss), "both" (logits, loss) or None."""
        if return_type not in RETURN_TYPES:
            raise LegoInterpError(f"return_type={return_type!r} is not one of {', '.join(map(str, RETURN_TYPES))}")
        if isinstance(tokens, (str, list)):
            tokens = self.to_tokens(tokens)
        elif start_at_layer is None and tokens.ndim == 1:  # one unbatched sentence (P,), as TransformerLens takes it
            tokens = tokens[None]
        P = tokens.shape[1]
        if P > self.cfg.n_ctx:
            raise ConfigError(f"input has {P} tokens but the model reads at most n_ctx={self.cfg.n_ctx}")
        ids = tokens if start_at_layer is None else source_tokens
        if attention_mask is None and ids is not None and padded is not False:
            attention_mask = ids != PAD
        if padded is None:
            padded = attention_mask is not None and (attention_mask.device.type != "cpu" or not bool(attention_mask.all()))
        key_mask = attention_mask[:, None, None, :] if padded and attention_mask is not None else None
        if start_at_layer is None:
            source_tokens = tokens
            embed = self.hook_embed(F.embedding(tokens, self.embed.W_E))  # (B, P, D)
            # a broadcast view, so the hook sees TransformerLens's (B, P, D) and decompose_resid can stack it with embed
            resid = embed + self.hook_pos_embed(self.pos_embed.W_pos[:P].expand_as(embed))
            if self.cfg.norm == "post":
                resid = self.ln_embed(resid)
            if self.cfg.d_embed is not None:
                resid = affine(resid, self.embed_proj.W_proj, self.embed_proj.b_proj)
        else:
            resid = tokens
        fixed_pattern = self.fixed_patterns(source_tokens)
        qkv = self.blocks[0].attn.qkv() if self.cfg.tied else None  # the same weights in every layer: gathered once
        for block in self.blocks[start_at_layer or 0: n_layers or self.cfg.n_layers]:
            resid = block(resid, key_mask, fixed_pattern, qkv)
        if self.cfg.norm == "pre":
            resid = self.ln_final(resid)
        logits = affine(resid, self.unembed.W_U, self.unembed.b_U)
        if return_type in ("loss", "both"):
            loss = self.answer_loss(logits, source_tokens)
            return loss if return_type == "loss" else (logits, loss)
        return logits if return_type == "logits" else None

    def answer_loss(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """() the mean cross-entropy of every clause's answer, read at its variable's token as in training.
        logits: (B, P, C); tokens: (B, P) the sentences, which give the answers."""
        if tokens is None:
            raise ConfigError("return_type='loss' reads the answers off the sentences: pass source_tokens with start_at_layer")
        task = self._vocabulary()
        batch = task.encode([task.parse(text) for text in self.to_string(tokens.cpu())], n=(tokens.shape[1] - 2) // CLAUSE_LEN)
        clause_logits = logits[torch.arange(len(batch), device=logits.device)[:, None], batch.clause_pos.to(logits.device)]
        loss = F.cross_entropy(clause_logits.transpose(1, 2), batch.values.to(logits.device), reduction="none")
        return loss[batch.valid.to(logits.device)].mean()

    def fixed_patterns(self, tokens: torch.Tensor | None) -> torch.Tensor | None:
        """(B, H_fixed, P, P) the hardcoded heads' attention from (B, P) token ids, in head order: each ``HARDCODED``
        mask row-normalised (a query with no key attends to nothing), shared by every layer.  None when every head
        is learned."""
        if not self.cfg.hardcoded:
            return None
        if tokens is None:
            raise ConfigError("this model has hardcoded attention heads, whose patterns come from the token ids: pass "
                              "source_tokens=<the (batch, pos) ids> along with start_at_layer")
        kinds = [self.cfg.hardcoded[h] for h in self.cfg.fixed_heads]
        patterns = {kind: row_normalised(HARDCODED[kind](tokens, self.cfg)) for kind in set(kinds)}
        return torch.stack([patterns[kind] for kind in kinds], 1)

    def run_with_cache(self, *args, return_cache_object: bool = True, remove_batch_dim: bool = False, **kwargs):
        """As ``HookedTransformer.run_with_cache``: the cache is an ``ActivationCache`` (``cache["pattern", l]``), a
        :class:`LegoActivationCache`."""
        out, cache = super().run_with_cache(*args, remove_batch_dim=remove_batch_dim, **kwargs)
        return out, LegoActivationCache(cache, self, has_batch_dim=not remove_batch_dim) if return_cache_object else cache

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        """As TransformerLens's: each head's query, key and value input at ``blocks.{l}.hook_q_input`` /
        ``hook_k_input`` / ``hook_v_input`` (B, P, n_heads, d_model), before ``ln1``, so paths into one of them can
        be patched."""
        self._set_per_head_inputs("use_split_qkv_input", use_split_qkv_input)

    def set_use_attn_in(self, use_attn_in: bool) -> None:
        """As TransformerLens's: every head's attention input at ``blocks.{l}.hook_attn_in`` (B, P, n_heads,
        d_model), before ``ln1``."""
        self._set_per_head_inputs("use_attn_in", use_attn_in)

    def _set_per_head_inputs(self, switch: str, on: bool) -> None:
        if on and self.cfg.identity_attention:
            raise ConfigError(f"+aI/+bI attention reads one shared input in its identity terms, which {switch} would "
                              "leave unpatched: patch hook_resid_pre or the heads' hook_q / hook_k / hook_v instead")
        setattr(self.cfg, switch, bool(on))

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
    W_E = property(lambda self: self.embed.W_E, doc="(d_vocab, d_embed or d_model)")
    W_pos = property(lambda self: self.pos_embed.W_pos, doc="(n_ctx, d_embed or d_model)")
    W_U = property(lambda self: self.unembed.W_U, doc="(d_model, d_vocab_out): one column per value class")
    b_U = property(lambda self: self.unembed.b_U, doc="(d_vocab_out,)")
    a_I = property(lambda self: self._stacked("attn.a_I"), doc="(n_layers, n_heads), identity_attention only")
    b_I = property(lambda self: self._stacked("attn.b_I"), doc="(n_layers, n_heads), identity_attention only")

    @property
    def QK(self) -> FactoredMatrix:
        """(n_layers, n_heads, d_model, d_model) ``W_Q W_K^T``, plus ``a I`` with identity_attention: then the factors
        are ``[W_Q, a I]`` and ``[W_K, I]^T`` (inner width d_head + d_model), so the product is exact."""
        return self._with_identity(self.W_Q, self.W_K.transpose(-2, -1), "a_I")

    @property
    def OV(self) -> FactoredMatrix:
        """(n_layers, n_heads, d_model, d_model) ``W_V W_O``, plus ``b I`` with identity_attention (as :attr:`QK`)."""
        return self._with_identity(self.W_V, self.W_O, "b_I")

    def _with_identity(self, A: torch.Tensor, B: torch.Tensor, scalar: str) -> FactoredMatrix:
        if not self.cfg.identity_attention:
            return FactoredMatrix(A, B)
        eye = torch.eye(self.cfg.d_model, device=A.device, dtype=A.dtype).expand(*A.shape[:2], -1, -1)
        return FactoredMatrix(torch.cat([A, getattr(self, scalar)[..., None, None] * eye], -1), torch.cat([B, eye], -2))

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

    def to_tokens(self, input: str | list[str], prepend_bos: bool | None = None, padding_side: str | None = None,
                  move_to_device: bool = True, truncate: bool = True) -> torch.Tensor:
        """Sentences ``"a=+1; b=-a"`` -> (B, 5 n + 2) token ids with [BOS]/[EOS], padded on the right to the longest
        (n clauses); a malformed sentence raises ``LegoError`` naming the problem.  TransformerLens's keywords:
        ``prepend_bos=False`` drops the [BOS] column (the model was trained with it); ``padding_side`` can only be
        "right"; ``truncate`` is moot (a sentence longer than the model reads raises)."""
        if padding_side not in (None, "right"):
            raise LegoInterpError(f"padding_side={padding_side!r}: LEGO sentences are padded on the right only")
        task = self._vocabulary()
        sentences = [task.parse(text) for text in ([input] if isinstance(input, str) else input)]
        if not sentences:
            raise LegoInterpError("to_tokens got an empty list: pass one sentence or a list of sentences")
        tokens = task.encode(sentences, n=max(len(sentence.clauses) for sentence in sentences)).tokens
        tokens = tokens if prepend_bos is None or prepend_bos else tokens[:, 1:]
        return tokens.to(self.cfg.device) if move_to_device else tokens

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


def random_twin(model: LegoTransformer, seed: int) -> LegoTransformer:
    """A freshly initialised model of ``model``'s config, on its device, in eval mode: the control for an analysis
    that must show a trained model's answer is not in the architecture.  ``seed`` fixes it without disturbing the
    caller's random stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LegoTransformer(replace(model.cfg)).to(next(model.parameters()).device).eval()


def unrolled(model: LegoTransformer, iterations: int) -> LegoTransformer:
    """The same weight-tied model run for ``iterations`` applications of its block (more or fewer than it was
    trained with), on its device, in eval mode: a for-loop that percolates one step per iteration keeps answering
    when given more of them (the paper's section 4.1, Q3)."""
    if not model.cfg.tied:
        raise ConfigError("only a weight-tied (ALBERT-like) model can run more iterations than it has layers: its "
                          "layers are one block")
    if iterations < 1:
        raise ConfigError(f"iterations={iterations} must be 1 or more")
    twin = LegoTransformer(replace(model.cfg, n_layers=iterations, min_depth=None))
    source = model.state_dict()
    twin.load_state_dict({name: source[re.sub(r"^blocks\.\d+\.", "blocks.0.", name)] for name in twin.state_dict()})
    if model.task is not None:
        twin.set_task(model.task)
    return twin.to(next(model.parameters()).device).eval()

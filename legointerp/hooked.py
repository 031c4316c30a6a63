"""Hooked models: a checkpoint as a TransformerLens model.

``LegoTransformer`` is itself a ``HookedRootModule`` with TransformerLens's hook names, cache
helpers and stacked weights, and the analyses run on it (it is ~1.5x faster than the bridge).
``to_bridge`` exports any pre-LN model without hardcoded heads or nonzero +aI/+bI scalars (the bridge holds no
fixed patterns, identity terms or post-LN blocks; it refuses those) to a TransformerLens 4 ``TransformerBridge``
with equal logits, so the whole TL 4 toolset applies; a tied (ALBERT-like) model is unrolled to ``n_layers``
blocks that all carry the shared weights.  Its tokenizer is a :class:`LegoTokenizer`, a Hugging Face
``PreTrainedTokenizer`` over the task's vocabulary, so ``bridge.to_tokens`` / ``to_str_tokens`` / ``to_string`` read
and write LEGO sentences as ``model.to_tokens`` does, and as the model it masks ``[PAD]`` unless handed an
``attention_mask`` (:class:`LegoBridge`).

Pitfalls of transformer-lens 4.3 this respects: the bridge starts in train mode (we call eval);
``enable_compatibility_mode()`` with its default weight processing changes raw logits when
``d_vocab_out != d_vocab`` (so it is never applied here); its ``hook_attn_scores`` holds the
post-softmax pattern.
"""

from __future__ import annotations

import re

import torch
from transformers import PreTrainedTokenizer
from transformer_lens.config import TransformerBridgeConfig
from transformer_lens.model_bridge import TransformerBridge

from legointerp.errors import LegoInterpError
from legointerp.model import LegoTransformer
from legointerp.task import BOS, EOS, PAD, LegoError, LegoTask


class LegoTokenizer(PreTrainedTokenizer):
    """The task's vocabulary as a Hugging Face tokenizer: a sentence (either surface) is parsed by the task, so a
    malformed one raises ``LegoError`` naming the problem; ids are the model's, [BOS] ... [EOS] added, padded right
    with [PAD]."""

    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, task: LegoTask, **kwargs):
        self.task = task
        self.ids = {name: i for i, name in enumerate(task.vocab)}
        words = sorted((name for name in task.vocab if not name.startswith("[")), key=len, reverse=True)
        self.names = re.compile("|".join(map(re.escape, words)))
        # add_bos_token and name_or_path: the bridge rebuilds any tokenizer without them from the Hugging Face hub
        super().__init__(bos_token=task.vocab[BOS], eos_token=task.vocab[EOS], pad_token=task.vocab[PAD],
                         padding_side="right", add_bos_token=True, name_or_path="legointerp", **kwargs)

    @property
    def vocab_size(self) -> int:
        return len(self.task.vocab)

    def get_vocab(self) -> dict[str, int]:
        return dict(self.ids)

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        """A sentence -> the model's tokens (each clause closed by its separator); a fragment (``"a"``, ``"=+1"``, as
        TransformerLens probes a tokenizer with) -> the vocabulary names it spells, longest first."""
        try:
            sentence = self.task.parse(text)
        except LegoError:
            names = self.names.findall(text)
            if "".join(names) != "".join(text.split()):
                raise LegoError(f"{text!r} is not made of this task's tokens: use {' '.join(self.task.vocab)}") from None
            return names
        tokens = self.task.encode([sentence], n=len(sentence.clauses)).tokens[0]
        return [name for name in self.task.token_strings(tokens) if name not in self.all_special_tokens]

    def _convert_token_to_id(self, token: str) -> int:
        return self.ids[token]

    def _convert_id_to_token(self, index: int) -> str:
        return self.task.vocab[index]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        if len(tokens) == 1:  # one token (to_str_tokens decodes them one at a time): its name
            return tokens[0]
        return self.task.to_text(torch.tensor([self.ids[token] for token in tokens]))

    def build_inputs_with_special_tokens(self, token_ids_0: list[int], token_ids_1: list[int] | None = None) -> list[int]:
        if token_ids_1 is not None:
            raise LegoInterpError("a LEGO input is one sentence, not a pair")
        return [BOS, *token_ids_0, EOS]

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        return ()  # the vocabulary is the task's, saved with the checkpoint


class LegoBridge(TransformerBridge):
    """A ``TransformerBridge`` that masks ``[PAD]`` as :class:`LegoTransformer` does: given token ids and no
    ``attention_mask``, its attention skips the padding ``to_tokens`` adds to mixed lengths (the bridge itself masks
    only when handed a list of strings, and its attention is bidirectional, so real tokens would read the padding)."""

    def forward(self, input, *args, **kwargs):
        """As ``TransformerBridge.forward``; input: (B, P) or (P,) token ids, a sentence or sentences, or with
        ``start_at_layer`` a (B, P, d_model) residual stream."""
        if (kwargs.get("attention_mask") is None and len(args) < 5 and isinstance(input, torch.Tensor)
                and not input.is_floating_point()):
            padding = torch.atleast_2d(input) == PAD
            if bool(padding.any()):
                kwargs["attention_mask"] = (~padding).long()
        return super().forward(input, *args, **kwargs)


def bridge_state_dict(model: LegoTransformer) -> dict[str, torch.Tensor]:
    """Our TransformerLens-shaped parameters in the bridge's ``nn.Linear`` layout (out_features, in_features)."""
    cfg = model.cfg
    state = {
        "embed.weight": model.embed.W_E,
        "pos_embed.weight": model.pos_embed.W_pos,
        "ln_final.weight": model.ln_final.w,
        "ln_final.bias": model.ln_final.b,
        "unembed.weight": model.unembed.W_U.T,
        "unembed.bias": model.unembed.b_U,
    }
    for layer, block in enumerate(model.blocks):
        prefix, attn = f"blocks.{layer}.", block.attn
        for name, W, b in (("q", attn.W_Q, attn.b_Q), ("k", attn.W_K, attn.b_K), ("v", attn.W_V, attn.b_V)):
            state[f"{prefix}attn.{name}.weight"] = W.permute(0, 2, 1).reshape(cfg.d_model, cfg.d_model)
            state[f"{prefix}attn.{name}.bias"] = b.reshape(cfg.d_model)
        state[f"{prefix}attn.o.weight"] = attn.W_O.reshape(cfg.d_model, cfg.d_model).T
        state[f"{prefix}attn.o.bias"] = attn.b_O
        state[f"{prefix}mlp.in.weight"], state[f"{prefix}mlp.in.bias"] = block.mlp.W_in.T, block.mlp.b_in
        state[f"{prefix}mlp.out.weight"], state[f"{prefix}mlp.out.bias"] = block.mlp.W_out.T, block.mlp.b_out
        for ln in ("ln1", "ln2"):
            state[f"{prefix}{ln}.weight"], state[f"{prefix}{ln}.bias"] = getattr(block, ln).w, getattr(block, ln).b
    return {k: v.detach().clone() for k, v in state.items()}


def to_bridge(model: LegoTransformer) -> TransformerBridge:
    """A ``TransformerBridge`` (bidirectional, GELU, pre-LN) with this model's weights, in eval mode."""
    cfg = model.cfg
    if cfg.hardcoded:
        raise LegoInterpError(f"this model has hardcoded attention heads ({','.join(k or '-' for k in cfg.hardcoded)}), "
                              "whose fixed patterns a TransformerBridge cannot hold: analyse the model itself, which is a "
                              "TransformerLens HookedRootModule (run_with_cache, run_with_hooks and every command work on it)")
    if cfg.identity_attention and any(block.attn.a_I.any() or block.attn.b_I.any() for block in model.blocks):
        raise LegoInterpError("this model has +aI/+bI attention with nonzero a or b, which a TransformerBridge's attention "
                              "cannot hold exactly: analyse the model itself, a TransformerLens HookedRootModule")
    if cfg.norm == "post":
        raise LegoInterpError("this is a post-LN (BERT/ALBERT) model, and a native TransformerBridge of transformer-lens 4.3 "
                              "has pre-LN blocks only (its BERT adapter needs a Hugging Face model, and it has no ALBERT one), "
                              "so it cannot hold it exactly: analyse the model itself, a TransformerLens HookedRootModule")
    bridge_config = TransformerBridgeConfig(
        d_model=cfg.d_model, d_head=cfg.d_head, n_layers=cfg.n_layers, n_ctx=cfg.n_ctx, n_heads=cfg.n_heads,
        d_vocab=cfg.d_vocab, d_vocab_out=cfg.d_vocab_out, d_mlp=cfg.d_mlp, act_fn=cfg.act_fn, eps=cfg.eps,
        normalization_type="LN", attention_dir="bidirectional", tokenizer_prepends_bos=True,
    )
    device = next(model.parameters()).device
    tokenizer = None if model.task is None else LegoTokenizer(model.task)
    bridge = TransformerBridge.boot_native(bridge_config, tokenizer=tokenizer, device=device)
    bridge.cfg.tokenizer_appends_eos = False  # its probe sees [EOS] closing every input, but [EOS] is a real token here
    missing, unexpected = bridge.load_state_dict(bridge_state_dict(model), strict=False)
    if unexpected or any(not k.endswith(("IGNORE", "masked_bias")) for k in missing):
        raise RuntimeError(f"bridge layout changed: missing {missing}, unexpected {unexpected}")
    bridge.__class__ = LegoBridge  # boot_native builds a plain TransformerBridge; LegoBridge adds no state
    return bridge.eval()

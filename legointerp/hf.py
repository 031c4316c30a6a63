"""Hugging Face ``BertModel`` / ``AlbertModel`` weights as a post-LN :class:`LegoTransformer`'s state dict.

``transformers`` stores every map as ``nn.Linear`` (out_features, in_features); ours are TransformerLens-shaped
(``W_Q``: (n_heads, d_model, d_head), ...).  The token-type embedding's row 0 (the only segment LEGO uses) is
folded into the position embedding, and the pooler and ``position_ids`` are dropped.  ALBERT's one shared layer
becomes a weight-tied model's blocks.  Shapes give every width but not the head count, ALBERT's depth, the
activation (BERT's ``gelu``, ALBERT's default ``gelu_new``) or the LayerNorm epsilon: the caller names those.
"""

from __future__ import annotations

import torch

from legointerp.errors import LegoInterpError
from legointerp.model import ModelConfig

WORDS = "embeddings.word_embeddings.weight"
ALBERT_LAYER = "encoder.albert_layer_groups.0.albert_layers.0."


class HFWeightsError(LegoInterpError):
    """A state dict that is not a BertModel's or AlbertModel's, or does not fit the model config."""


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop whatever precedes ``embeddings.`` (``bert.``, ``module.base.``) so BertModel's own names remain
    (``nn.Sequential(embeddings, encoder)``'s ``0.`` / ``1.`` are renamed by :func:`legointerp.importer.split_source`)."""
    keys = [k for k in state if k.endswith(WORDS)]
    if len(keys) != 1:
        raise HFWeightsError(f"the state dict has {len(keys)} '{WORDS}' entries, not one: pass the state_dict of a "
                             "single transformers BertModel or AlbertModel")
    prefix = keys[0][: -len(WORDS)]
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def is_albert(state: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith("encoder.albert_layer_groups.") for k in _strip_prefix(state))


def hf_model_config(state: dict[str, torch.Tensor], *, n_heads: int, d_vocab_out: int, n_ctx: int | None = None,
                    n_layers: int | None = None, act_fn: str | None = None, eps: float = 1e-12, **overrides) -> ModelConfig:
    """The post-LN :class:`ModelConfig` of a BertModel / AlbertModel state dict: vocabulary, widths and (BERT) depth
    from the shapes; ``n_ctx`` defaults to every position the source has; ALBERT needs ``n_layers`` (its
    ``num_hidden_layers``); ``act_fn`` defaults to each library default (BERT ``gelu``, ALBERT ``gelu_new``)."""
    state = _strip_prefix(state)
    albert = is_albert(state)
    words, positions = state[WORDS], state["embeddings.position_embeddings.weight"]
    if albert:
        if n_layers is None:
            raise HFWeightsError("an ALBERT state dict holds one shared layer, so its depth is not in the weights: "
                                 "give n_layers (--n-layers on the command line: the source config's num_hidden_layers, 12 in albert-base)")
        d_model, d_mlp = state[ALBERT_LAYER + "ffn.weight"].shape[1], state[ALBERT_LAYER + "ffn.weight"].shape[0]
    else:
        n_layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
        d_model, d_mlp = state["encoder.layer.0.intermediate.dense.weight"].shape[1], state["encoder.layer.0.intermediate.dense.weight"].shape[0]
    if d_model % n_heads:
        raise HFWeightsError(f"n_heads={n_heads} (--n-heads on the command line) does not divide the weights' width "
                             f"{d_model}: give the head count the source model was built with (12 in bert-base and "
                             "albert-base), a divisor of its width")
    return ModelConfig(d_vocab=words.shape[0], d_vocab_out=d_vocab_out, n_ctx=n_ctx or positions.shape[0], d_model=d_model,
                       n_heads=n_heads, n_layers=n_layers, d_mlp=d_mlp, tied=albert, norm="post", eps=eps,
                       d_embed=words.shape[1] if albert else None, act_fn=act_fn or ("gelu_new" if albert else "gelu"),
                       **overrides)


def _layer_names(albert: bool, layer: int) -> dict[str, str]:
    """Our block's parameter -> the source's ``nn.Linear`` / LayerNorm name (without .weight / .bias)."""
    if albert:
        p = ALBERT_LAYER
        return {"q": p + "attention.query", "k": p + "attention.key", "v": p + "attention.value", "o": p + "attention.dense",
                "ln1": p + "attention.LayerNorm", "in": p + "ffn", "out": p + "ffn_output", "ln2": p + "full_layer_layer_norm"}
    p = f"encoder.layer.{layer}."
    return {"q": p + "attention.self.query", "k": p + "attention.self.key", "v": p + "attention.self.value",
            "o": p + "attention.output.dense", "ln1": p + "attention.output.LayerNorm", "in": p + "intermediate.dense",
            "out": p + "output.dense", "ln2": p + "output.LayerNorm"}


def from_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A BertModel / AlbertModel state dict (any prefix) -> our parameters for ``cfg`` (post-LN, from
    :func:`hf_model_config`), every key but the unembedding (``unembed.W_U`` (d_model, d_vocab_out), ``unembed.b_U``),
    which the source's classifier, if any, supplies.  The first ``cfg.n_ctx`` positions are kept."""
    state = _strip_prefix(state)
    albert = is_albert(state)
    if cfg.norm != "post" or albert != cfg.tied or albert != (cfg.d_embed is not None):
        raise HFWeightsError(f"a {'ALBERT' if albert else 'BERT'} state dict needs a post-LN config with "
                             f"tied={albert} and {'d_embed' if albert else 'no d_embed'}: build it with hf_model_config")
    if albert and any(k.startswith(("encoder.albert_layer_groups.1.", "encoder.albert_layer_groups.0.albert_layers.1.")) for k in state):
        raise HFWeightsError("this ALBERT has several layer groups or inner layers (num_hidden_groups or inner_group_num "
                             "> 1): only ALBERT's default, one shared layer, maps onto a weight-tied model")
    H, D, E = cfg.n_heads, cfg.d_model, cfg.d_head
    positions = state["embeddings.position_embeddings.weight"]
    if positions.shape[0] < cfg.n_ctx:
        raise HFWeightsError(f"the source has {positions.shape[0]} positions but the config reads n_ctx={cfg.n_ctx}: "
                             "lower n_ctx")
    out = {"embed.W_E": state[WORDS],
           # LEGO has one segment: token type 0 is added at every position, so it is part of the position embedding
           "pos_embed.W_pos": positions[: cfg.n_ctx] + state["embeddings.token_type_embeddings.weight"][0],
           "ln_embed.w": state["embeddings.LayerNorm.weight"], "ln_embed.b": state["embeddings.LayerNorm.bias"]}
    if albert:
        out["embed_proj.W_proj"] = state["encoder.embedding_hidden_mapping_in.weight"].T
        out["embed_proj.b_proj"] = state["encoder.embedding_hidden_mapping_in.bias"]
    for layer in range(cfg.n_layers):
        names, prefix = _layer_names(albert, layer), f"blocks.{layer}."
        try:
            weight = {name: state[source + ".weight"] for name, source in names.items()}
            bias = {name: state[source + ".bias"] for name, source in names.items()}
        except KeyError as err:
            raise HFWeightsError(f"the state dict has no {err.args[0]}: it holds fewer layers than n_layers={cfg.n_layers}, "
                                 "or is not a BertModel / AlbertModel") from None
        for name in "QKV":
            # (H E, D) rows are head-major, as transformers splits them: -> (H, D, E)
            out[f"{prefix}attn.W_{name}"] = weight[name.lower()].reshape(H, E, D).transpose(1, 2)
            out[f"{prefix}attn.b_{name}"] = bias[name.lower()].reshape(H, E)
        out[prefix + "attn.W_O"], out[prefix + "attn.b_O"] = weight["o"].T.reshape(H, E, D), bias["o"]
        out[prefix + "mlp.W_in"], out[prefix + "mlp.b_in"] = weight["in"].T, bias["in"]
        out[prefix + "mlp.W_out"], out[prefix + "mlp.b_out"] = weight["out"].T, bias["out"]
        for ln in ("ln1", "ln2"):
            out[f"{prefix}{ln}.w"], out[f"{prefix}{ln}.b"] = weight[ln], bias[ln]
    return {k: v.detach().clone().contiguous() for k, v in out.items()}

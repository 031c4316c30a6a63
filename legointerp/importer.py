"""Checkpoints saved by the official LEGO code (github yizhangzzz/transformers-lego) as legointerp checkpoints.

The official code saves ``torch.save(model.module.state_dict())`` of a ``BertModel`` / ``AlbertModel`` (no
classifier); researchers' runs of it save ``Model(BertModel + Linear(768, 1))`` or ``Encoder(nn.Sequential(
embeddings, encoder) + Linear(768, 6))``, often under ``module.`` / ``base.`` / ``bert.`` prefixes.  Every layout is
read with ``weights_only=True`` and mapped by :mod:`legointerp.hf` onto a post-LN model on the official surface:
only the word-piece rows the official sentences use are kept (``task.wordpiece_ids``), the pooler and
``position_ids`` are dropped, widths and BERT vs ALBERT come from the keys; the head count (and ALBERT's depth) are
not in the weights, so the caller names them.

The classifier becomes the model's two value classes: a 1-logit head ``w`` (trained with a sigmoid on the logit of
value 1) becomes ``[0, w]``, so value 1's logit is the source's logit and the softmax is its sigmoid; a wider head
(the official fine-tuning uses 6 classes for 2 labels) is cut to classes 0 and 1, and the share of readout tokens
whose argmax over all classes fell outside 0/1 is measured on fresh sentences.  A state dict without a classifier
(the mimicking stage's ``mimic_*.pth``) is refused unless ``zero_head``: a zero unembedding, so attention, probes and
residual patching read the encoder while every accuracy sits at chance.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from legointerp.checkpoint import FORMAT, Checkpoint, non_finite, torch_load
from legointerp.errors import LegoInterpError
from legointerp.evaluate import clause_logits, test_batch
from legointerp.hf import _layer_names, from_hf_state_dict, hf_model_config, is_albert
from legointerp.model import LegoTransformer
from legointerp.task import LegoError, LegoTask, TaskConfig

EMBEDDINGS = ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
              "embeddings.token_type_embeddings.weight", "embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias")
BUFFERS = ("position_ids", "token_type_ids")  # index buffers older transformers saved: no weights
OFFICIAL_ALBERT_ACT = "gelu"  # the official code builds ALBERT from albert-base-v1's config, whose hidden_act is gelu


class SourceError(LegoInterpError):
    """A file that is not the state dict of a BertModel / AlbertModel with at most one linear classifier."""


@dataclass
class Imported:
    """An imported checkpoint and what the import found: ``outside`` is the share of readout tokens whose argmax over
    a wider-than-2 head fell outside classes 0/1 (None otherwise); ``accuracy`` the mean accuracy over chain positions
    of the 2-class model on the same ``samples`` fresh sentences (None with a zero head)."""

    checkpoint: Checkpoint
    architecture: str  # "BERT" or "ALBERT"
    head: str  # how the classifier was turned into two classes
    source_sha256: str
    samples: int
    outside: float | None = None
    accuracy: float | None = None

    def to_dict(self) -> dict:
        c = self.checkpoint.model_config
        return {"architecture": self.architecture, "n_layers": c.n_layers, "d_model": c.d_model, "n_heads": c.n_heads,
                "d_mlp": c.d_mlp, "d_embed": c.d_embed, "act_fn": c.act_fn, "head": self.head,
                "source_sha256": self.source_sha256, "samples": self.samples, "outside_share": self.outside,
                "accuracy": self.accuracy}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)`` of a state dict; every other content is refused with the way to save one."""
    path = Path(path)
    if path.is_dir():
        raise SourceError(f"{path} is a folder: give the .pth/.pt file in it that the official code saved (e.g. "
                          f"{path / 'mimic_bert.pth'})")
    if not path.is_file():
        raise SourceError(f"no file at {path}: give the .pth/.pt file the official code saved (e.g. mimic_bert.pth)")
    try:
        payload = torch_load(path)
    except pickle.UnpicklingError:
        raise SourceError(f"{path} holds more than tensors (a pickled model or object), so it was refused unread: save "
                          "the weights with torch.save(model.state_dict(), path) and import that") from None
    except Exception:  # a damaged zip or pickle fails in many ways, all meaning the same to the user
        raise SourceError(f"{path} is not a torch.save file (truncated, damaged or another format): re-copy it") from None
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        raise SourceError(f"{path} is already a legointerp checkpoint: pass it to any command with --ckpt {path}")
    if not isinstance(payload, dict) or not payload:
        content = "an empty dict" if isinstance(payload, dict) else f"a {type(payload).__name__}"
        raise SourceError(f"{path} is not a state dict (named tensors) but {content}: save the weights with "
                          "torch.save(model.state_dict(), path) and import that")
    other = next((k for k, v in payload.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))), None)
    if other is not None:  # e.g. {"model": state_dict, "optimizer": ...}: a training record around the weights
        raise SourceError(f"{path} is not a state dict: its entry {other!r} is a {type(payload[other]).__name__}, not a "
                          "tensor; save the model's weights alone with torch.save(model.state_dict(), path)")
    broken = non_finite(payload)
    if broken is not None:
        raise SourceError(f"{path} has NaN or infinite weights (first in {broken}): the source run diverged; import a "
                          "checkpoint saved before it did")
    return payload


def split_source(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None]:
    """A source state dict -> (the encoder under BertModel's / AlbertModel's own names, pooler and index buffers
    dropped; the classifier's (weight (k, d_model), bias (k,)) or None).  ``nn.Sequential(embeddings, encoder)``
    stores them as ``0.`` / ``1.``; anything but the encoder and one linear layer is refused."""
    state = {k: v for k, v in state.items() if k.split(".")[-1] not in BUFFERS}
    words = [k for k in state if k.endswith("word_embeddings.weight")]
    if len(words) != 1:
        raise SourceError(f"the state dict has {len(words)} word embeddings ('...word_embeddings.weight'), not one: "
                          "import the state dict of one BertModel / AlbertModel, with or without a linear classifier")
    prefix = words[0][: -len("word_embeddings.weight")]
    if prefix.endswith("embeddings."):
        prefix = prefix[: -len("embeddings.")]
        rename = {"embeddings.": "embeddings.", "encoder.": "encoder.", "pooler.": "pooler."}
    elif prefix.endswith("0."):  # nn.Sequential(model.embeddings, model.encoder)
        prefix = prefix[:-2]
        rename = {"0.": "embeddings.", "1.": "encoder."}
    else:
        raise SourceError(f"{words[0]} is neither under 'embeddings.' (BertModel) nor under '0.' (nn.Sequential of the "
                          "embeddings and the encoder): import a BertModel / AlbertModel state dict")
    encoder, rest = {}, {}
    for key, value in state.items():
        inner = key[len(prefix):] if key.startswith(prefix) else None
        start = next((s for s in rename if inner is not None and inner.startswith(s)), None)
        if start is None:
            rest[key] = value
        elif rename[start] != "pooler.":  # the pooler reads [CLS] for sentence tasks; LEGO reads every clause
            encoder[rename[start] + inner[len(start):]] = value
    return encoder, _classifier(rest)


def _classifier(rest: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The one linear layer among the keys outside the encoder, as (weight (k, d), bias (k,)); None when none."""
    if not rest:
        return None
    modules = {key.rsplit(".", 1)[0] for key in rest}
    weight, bias = (rest.get(f"{next(iter(modules))}.{name}") for name in ("weight", "bias"))
    if len(modules) != 1 or weight is None or weight.ndim != 2 or len(rest) != 1 + (bias is not None) \
            or (bias is not None and bias.shape != weight.shape[:1]):
        raise SourceError(f"unknown keys outside the encoder ({', '.join(sorted(rest)[:4])}): the importer reads a "
                          "BertModel / AlbertModel and at most one nn.Linear classifier on its hidden states")
    return weight, torch.zeros(weight.shape[0]) if bias is None else bias


def _check_encoder_keys(encoder: dict[str, torch.Tensor], albert: bool, n_layers: int) -> None:
    """Refuse encoder weights the mapping would silently ignore (another architecture's, or a layer too many)."""
    read = set(EMBEDDINGS) | ({"encoder.embedding_hidden_mapping_in.weight", "encoder.embedding_hidden_mapping_in.bias"}
                              if albert else set())
    for layer in range(1 if albert else n_layers):
        read |= {f"{name}.{part}" for name in _layer_names(albert, layer).values() for part in ("weight", "bias")}
    unknown = sorted(set(encoder) - read)
    if unknown:
        raise SourceError(f"unknown encoder keys ({', '.join(unknown[:3])}): this is not a plain BertModel / AlbertModel "
                          "(ALBERT with one shared layer)")


def _head(classifier: tuple[torch.Tensor, torch.Tensor] | None, d_model: int, zero_head: bool
          ) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(W (d_model, k), b (k,)) of the source's full head, k >= 2, and how it becomes two classes."""
    if classifier is None:
        if not zero_head:
            raise SourceError("the state dict has no classifier (the official mimic_*.pth is the encoder alone): "
                              "import the fine-tuned model with its nn.Linear head, or add --zero-head to analyse the "
                              "encoder with a zero head (accuracies then sit at chance)")
        return torch.zeros(d_model, 2), torch.zeros(2), "none: a zero head (accuracy is chance)"
    weight, bias = classifier
    if weight.shape[1] != d_model:
        raise SourceError(f"the classifier reads {weight.shape[1]} features but the encoder is {d_model} wide: it "
                          "belongs to another model")
    if weight.shape[0] == 1:
        # a sigmoid on one logit for value 1: logits (0, z) have the same softmax and logit difference
        return torch.cat([torch.zeros(d_model, 1), weight.T], 1), torch.cat([torch.zeros(1), bias]), "1 logit -> [0, w]"
    return weight.T, bias, f"{weight.shape[0]}-way, classes 0/1 kept" if weight.shape[0] > 2 else "2-way"


def import_state_dict(path: str | os.PathLike, *, n_heads: int, n_layers: int | None = None, act_fn: str | None = None,
                      n: int = 12, zero_head: bool = False, samples: int = 200, seed: int = 0,
                      command: str | None = None) -> Imported:
    """The checkpoint of a state dict saved by the official code (or a run of it) on the official surface with ``n``
    clauses.  ``n_layers`` is ALBERT's depth (a BERT's is read from the keys); ``act_fn`` defaults to BERT's gelu and
    the official ALBERT's (albert-base-v1) gelu.  ``samples`` fresh sentences (seed ``seed``) measure the share of
    argmaxes outside 0/1 of a wider head and the 2-class accuracy."""
    path = Path(path)
    encoder, classifier = split_source(read_state_dict(path))
    if not any(key.startswith("encoder.") for key in encoder):
        raise SourceError("the state dict has embeddings but no encoder layers: import the whole BertModel / AlbertModel")
    albert = is_albert(encoder)
    try:
        task = LegoTask(TaskConfig(surface="official", n=n))
    except LegoError as err:
        raise SourceError(f"--n {n}: {err}") from None
    try:
        cfg = hf_model_config(encoder, n_heads=n_heads, d_vocab_out=2, n_ctx=task.n_ctx, n_layers=n_layers,
                              act_fn=act_fn or (OFFICIAL_ALBERT_ACT if albert else "gelu"))
    except KeyError as err:
        raise SourceError(f"the state dict has no {err.args[0]}: it is not a BertModel / AlbertModel's") from None
    rows = encoder["embeddings.position_embeddings.weight"].shape[0]
    if task.n_ctx > rows:
        fits = [k for k in range(1, n) if LegoTask(TaskConfig(surface="official", n=k)).n_ctx <= rows]
        raise SourceError(f"--n {n} makes sentences of {task.n_ctx} tokens but the source's position table has {rows} "
                          f"rows: give {f'--n {fits[-1]} or less' if fits else 'a source with more positions'}")
    if not albert and n_layers not in (None, cfg.n_layers):
        raise SourceError(f"the BERT weights hold {cfg.n_layers} layers, not n_layers={n_layers}: drop --n-layers")
    _check_encoder_keys(encoder, albert, cfg.n_layers)
    needed = int(task.wordpiece_ids.max())
    if cfg.d_vocab <= needed:
        raise SourceError(f"the word embedding has {cfg.d_vocab} rows but the official sentences use bert-base-uncased "
                          f"id {needed} ('val'): this model was not trained on the official code's word pieces")
    W_U, b_U, head = _head(classifier, cfg.d_model, zero_head)
    cfg = replace(cfg, d_vocab=task.d_vocab, d_vocab_out=W_U.shape[1])
    missing = next((key for key in EMBEDDINGS if key not in encoder), None)
    if missing is not None:
        raise SourceError(f"the state dict has no {missing}: it is not a BertModel / AlbertModel's")
    state = {**from_hf_state_dict(encoder, cfg), "unembed.W_U": W_U, "unembed.b_U": b_U}
    state["embed.W_E"] = state["embed.W_E"][task.wordpiece_ids]
    outside, accuracy = _measure(cfg, state, task, samples, seed) if classifier is not None else (None, None)
    cfg = replace(cfg, d_vocab_out=2)
    state["unembed.W_U"], state["unembed.b_U"] = W_U[:, :2].contiguous(), b_U[:2].clone()
    sha = file_sha256(path)
    architecture = "ALBERT" if albert else "BERT"
    provenance = {"command": command or f"legointerp import {path} --n-heads {n_heads}", "imported_from": str(path),
                  "source_sha256": sha, "architecture": architecture, "head": head, "outside_share": outside,
                  "import_accuracy": accuracy, "import_samples": samples}
    checkpoint = Checkpoint(cfg, task.config, state, provenance=provenance)
    return Imported(checkpoint, architecture, head, sha, samples, outside, accuracy)


@torch.no_grad()
def _measure(cfg, state: dict[str, torch.Tensor], task: LegoTask, samples: int, seed: int) -> tuple[float | None, float]:
    """(share of readout argmaxes outside classes 0/1 (None for a 2-class head), 2-class accuracy) on fresh sentences."""
    model = LegoTransformer(cfg).eval()
    model.load_state_dict(state)
    batch = test_batch(task, samples, seed)
    logits = clause_logits(model(batch.tokens), batch)  # (B, n, k)
    outside = float((logits.argmax(-1) >= 2).float().mean()) if cfg.d_vocab_out > 2 else None
    return outside, float((logits[..., :2].argmax(-1) == batch.values).float().mean())

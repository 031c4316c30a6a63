"""One-file checkpoints: weights, model and task config, training state and the final accuracies.

Saved with ``torch.save`` of plain containers and loaded with ``weights_only=True``, so loading a
file never runs code; a crafted pickle is refused.  Writes go to a temporary file in the same
folder and are moved into place with ``os.replace``, so an interrupted save leaves the previous
file intact.  A sha256 of the weights is stored and checked on loading (flipped bytes in a tensor
load silently otherwise); files written before it existed carry none and still load.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from legointerp.errors import LegoInterpError
from legointerp.files import BUNDLED, BUNDLED_FILES, atomic_write, shipped_folder
from legointerp.model import LegoTransformer, ModelConfig
from legointerp.options import resolve_device
from legointerp.task import LegoTask, TaskConfig
from legointerp.threads import set_threads_for

FORMAT = "legointerp-checkpoint/1"


class CheckpointError(LegoInterpError):
    """A missing, corrupt, unsafe or inconsistent checkpoint file."""


@dataclass
class Checkpoint:
    model_config: ModelConfig
    task_config: TaskConfig
    state_dict: dict[str, torch.Tensor]
    train_config: dict = field(default_factory=dict)
    train_state: dict | None = None  # optimizer state and step, for --resume
    accuracy: list[float] | None = None  # final test accuracy per chain position
    provenance: dict = field(default_factory=dict)  # command line, seed, versions, wall time

    @property
    def command(self) -> str:
        """The command line (for a resumed run, the commands joined by &&) that made this checkpoint."""
        return self.provenance.get("command", "an unrecorded command")

    def build_model(self, device: str | torch.device = "cpu") -> LegoTransformer:
        model = LegoTransformer(self.model_config)
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as err:
            raise CheckpointError(f"the checkpoint's weights do not match its model config ({_detail(err)}): "
                                  "the file was edited or mixed from two runs; retrain or use the original file") from None
        model.set_task(self.build_task())  # the vocabulary, for model.to_tokens / to_str_tokens
        return model.to(resolve_device(device)).eval()

    def build_task(self) -> LegoTask:
        return LegoTask(self.task_config)

    def describe(self) -> str:
        """One line for people: what the model is and how it was made."""
        c = self.model_config
        kind = ("ALBERT-like (tied)" if c.tied else "BERT-like") + (", post-LN" if getattr(c, "norm", "pre") == "post" else "")
        return (f"{kind} encoder, {c.n_layers} layers, d_model={c.d_model}, {c.n_heads} heads, on {self.task_config.group} "
                f"with n={self.task_config.n}; made by `{self.command}`")


def bundled_path(name: str = BUNDLED) -> Path:
    return shipped_folder() / BUNDLED_FILES[name]


def resolve(path: str | os.PathLike | None) -> Path:
    """``None`` or ``"bundled"`` mean the default model shipped with the package, ``"bundled-shortcut"`` the
    shortcut-regime one; anything else is a file path."""
    if path is None:
        return bundled_path()
    return bundled_path(str(path)) if str(path) in BUNDLED_FILES else Path(path)


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def non_finite(state_dict: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an infinity, or None."""
    return next((k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)


def torch_load(path: Path):
    """``torch.load`` of weights only, on the CPU, with torch's own warnings silenced: whatever it finds is reported
    by the caller in one line (a plain pickle makes torch warn about its protocol before it is refused)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", weights_only=True)


def save_checkpoint(checkpoint: Checkpoint, path: str | os.PathLike) -> Path:
    path = Path(path)
    state_dict = {k: v.detach().cpu() for k, v in checkpoint.state_dict.items()}
    payload = {
        "format": FORMAT,
        "model_config": checkpoint.model_config.to_dict(),
        "task_config": checkpoint.task_config.to_dict(),
        "state_dict": state_dict,
        "sha256": weights_digest(state_dict),
        "train_config": checkpoint.train_config,
        "train_state": checkpoint.train_state,
        "accuracy": checkpoint.accuracy,
        "provenance": checkpoint.provenance,
    }
    atomic_write(path, lambda f: torch.save(payload, f))
    return path


def _detail(err: BaseException) -> str:
    """The informative line of a library's error message (never its advice), for a one-line report."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        lines = lines[1:]
    return (lines[0] if lines else type(err).__name__)[:200]


def _read(path: Path):
    """``torch.load`` with weights only; every way it fails becomes one :class:`CheckpointError`.  Only a pickle
    naming a code object (a GLOBAL) is called unsafe: a damaged file fails in the same unpickler for other reasons."""
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): the save was interrupted or the copy failed; re-copy the file or retrain")
    try:
        return torch_load(path)
    except pickle.UnpicklingError as err:
        match = re.search(r"GLOBAL (\S+)", str(err))
        if match:
            raise CheckpointError(f"{path} asks to import {match.group(1)}, so it was refused unread (loading it could run "
                                  "code): use a file written by 'legointerp train'") from None
        raise CheckpointError(f"{path} is damaged or not a legointerp checkpoint, so it was refused unread: re-copy the "
                              "file or retrain") from None
    except OSError as err:
        raise CheckpointError(f"cannot read {path} ({err.strerror or _detail(err)}): check the file's permissions") from None
    except Exception:  # a damaged zip or pickle fails in many ways, all meaning the same to the user
        raise CheckpointError(f"{path} is truncated or damaged (not a readable checkpoint): re-copy the file or retrain") from None


def _check_weights(path: Path, payload: dict) -> dict[str, torch.Tensor]:
    state_dict = payload.get("state_dict")
    if not isinstance(state_dict, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                   for k, v in state_dict.items()):
        raise CheckpointError(f"{path} has no weights (its state_dict is a {type(state_dict).__name__}, not named tensors): "
                              "the file is damaged or was not written by 'legointerp train'; retrain")
    recorded = payload.get("sha256")
    if recorded is not None and recorded != weights_digest(state_dict):
        raise CheckpointError(f"{path} is corrupted: its weights do not match the checksum stored when it was saved; "
                              "re-copy the file or retrain")
    broken = non_finite(state_dict)
    if broken is not None:
        raise CheckpointError(f"{path} has NaN or infinite weights (first in {broken}): the run diverged; retrain with a "
                              "lower --lr or resume from an earlier copy")
    return state_dict


def load_checkpoint(path: str | os.PathLike | None = None) -> Checkpoint:
    """Read a checkpoint (``None``: the bundled model).  Raises :class:`CheckpointError` with the fix."""
    path = resolve(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder: give the checkpoint file in it, e.g. {path / 'model.pt'}")
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: give the path of a model.pt written by 'legointerp train'")
    payload = _read(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a legointerp checkpoint (expected format {FORMAT!r}): pass a model.pt written by 'legointerp train'")
    state_dict = _check_weights(path, payload)
    try:
        checkpoint = Checkpoint(
            model_config=ModelConfig(**payload["model_config"]),
            task_config=TaskConfig.from_dict(payload["task_config"]),
            state_dict=state_dict,
            train_config=payload.get("train_config") or {},
            train_state=payload.get("train_state"),
            accuracy=payload.get("accuracy"),
            provenance=payload.get("provenance") or {},
        )
        task = checkpoint.build_task()  # a group or surface this version does not know
    except (KeyError, TypeError, LegoInterpError) as err:  # a bad model or task config, an unknown group
        raise CheckpointError(f"{path} has a missing or invalid config ({_detail(err)}): the file is damaged or from another version; retrain") from None
    expected = (task.d_vocab, task.n_classes, task.n_ctx)
    got = (checkpoint.model_config.d_vocab, checkpoint.model_config.d_vocab_out, checkpoint.model_config.n_ctx)
    if expected != got:
        raise CheckpointError(f"{path}: the task config implies (d_vocab, classes, n_ctx)={expected} but the model has {got}: "
                              "the configs were mixed from two runs; retrain")
    return checkpoint


def load_model(path: str | os.PathLike | None = None, device: str | torch.device = "cpu"
               ) -> tuple[LegoTransformer, LegoTask, Checkpoint]:
    """The hooked model (eval mode), its task and the checkpoint record, from one file.  On the CPU, a small model
    gets the idle cores, one under load (:mod:`legointerp.threads`; LEGOINTERP_THREADS or OMP_NUM_THREADS overrides it)."""
    checkpoint = load_checkpoint(path)
    set_threads_for(checkpoint.model_config, resolve_device(device))
    return checkpoint.build_model(device), checkpoint.build_task(), checkpoint

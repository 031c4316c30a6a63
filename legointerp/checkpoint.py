"""One-file checkpoints: weights, model and task config, training state and the final accuracies.

Saved with ``torch.save`` of plain containers and loaded with ``weights_only=True``, so loading a
file never runs code; a crafted pickle is refused.  Writes go to a temporary file in the same
folder and are moved into place with ``os.replace``, so an interrupted save leaves the previous
file intact.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from legointerp.errors import LegoInterpError
from legointerp.files import atomic_write
from legointerp.model import ConfigError, LegoTransformer, ModelConfig
from legointerp.task import LegoError, LegoTask, TaskConfig

FORMAT = "legointerp-checkpoint/1"
BUNDLED = "bundled"
# Models shipped with the package, by the name --ckpt accepts: the default (full supervision, follows the chain)
# and one trained in the paper's shortcut regime (positions 0-4 and 11 supervised) for shortcut detection.
BUNDLED_FILES = {BUNDLED: "model.pt", "bundled-shortcut": "shortcut.pt"}


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
            raise CheckpointError(f"the checkpoint's weights do not match its model config ({str(err).splitlines()[1].strip()}): "
                                  "the file was edited or mixed from two runs; retrain or use the original file") from None
        return model.to(device).eval()

    def build_task(self) -> LegoTask:
        return LegoTask(self.task_config)

    def describe(self) -> str:
        """One line for people: what the model is and how it was made."""
        c = self.model_config
        kind = "ALBERT-like (tied)" if c.tied else "BERT-like"
        return (f"{kind} encoder, {c.n_layers} layers, d_model={c.d_model}, {c.n_heads} heads, on {self.task_config.group} "
                f"with n={self.task_config.n}; made by `{self.command}`")


def bundled_path(name: str = BUNDLED) -> Path:
    return Path(str(resources.files("legointerp") / "data" / BUNDLED_FILES[name]))


def resolve(path: str | os.PathLike | None) -> Path:
    """``None`` or ``"bundled"`` mean the default model shipped with the package, ``"bundled-shortcut"`` the
    shortcut-regime one; anything else is a file path."""
    if path is None:
        return bundled_path()
    return bundled_path(str(path)) if str(path) in BUNDLED_FILES else Path(path)


def save_checkpoint(checkpoint: Checkpoint, path: str | os.PathLike) -> Path:
    path = Path(path)
    payload = {
        "format": FORMAT,
        "model_config": checkpoint.model_config.to_dict(),
        "task_config": checkpoint.task_config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in checkpoint.state_dict.items()},
        "train_config": checkpoint.train_config,
        "train_state": checkpoint.train_state,
        "accuracy": checkpoint.accuracy,
        "provenance": checkpoint.provenance,
    }
    atomic_write(path, lambda f: torch.save(payload, f))
    return path


def load_checkpoint(path: str | os.PathLike | None = None) -> Checkpoint:
    """Read a checkpoint (``None``: the bundled model).  Raises :class:`CheckpointError` with the fix."""
    path = resolve(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: pass --ckpt with a model.pt written by 'legointerp train'")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path} holds objects other than weights and plain data, so it was refused unread "
                              f"(loading it could run code): use a file written by 'legointerp train' [{str(err).splitlines()[0]}]") from None
    except Exception as err:  # a damaged zip or pickle fails in many ways, all meaning the same to the user
        raise CheckpointError(f"{path} is truncated or not a checkpoint ({str(err).splitlines()[0]}): re-copy the file or retrain") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a legointerp checkpoint (expected format {FORMAT!r}): pass a model.pt written by 'legointerp train'")
    try:
        checkpoint = Checkpoint(
            model_config=ModelConfig(**payload["model_config"]),
            task_config=TaskConfig.from_dict(payload["task_config"]),
            state_dict=payload["state_dict"],
            train_config=payload.get("train_config") or {},
            train_state=payload.get("train_state"),
            accuracy=payload.get("accuracy"),
            provenance=payload.get("provenance") or {},
        )
    except (KeyError, TypeError, ConfigError, LegoError) as err:
        raise CheckpointError(f"{path} has a missing or invalid config ({err}): the file is damaged or from another version; retrain") from None
    task = checkpoint.build_task()
    expected = (task.d_vocab, task.n_classes, task.n_ctx)
    got = (checkpoint.model_config.d_vocab, checkpoint.model_config.d_vocab_out, checkpoint.model_config.n_ctx)
    if expected != got:
        raise CheckpointError(f"{path}: the task config implies (d_vocab, classes, n_ctx)={expected} but the model has {got}: "
                              "the configs were mixed from two runs; retrain")
    return checkpoint


def load_model(path: str | os.PathLike | None = None, device: str | torch.device = "cpu"
               ) -> tuple[LegoTransformer, LegoTask, Checkpoint]:
    """The hooked model (eval mode), its task and the checkpoint record, from one file."""
    checkpoint = load_checkpoint(path)
    return checkpoint.build_model(device), checkpoint.build_task(), checkpoint

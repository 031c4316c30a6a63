"""Every option's valid range, in one place: the CLI's argparse types and ``TrainConfig``'s validation read it.

A :class:`Number` is both an argparse ``type`` (text -> value, or one line saying what is wrong) and a check on a
value set from Python, so the command line and the API refuse exactly the same inputs.  Output paths are checked
before any work starts, so a long run never ends in a file that cannot be written.
"""

from __future__ import annotations

import argparse
import math
import numbers
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from legointerp.files import OutputError, check_not_shipped
from legointerp.model import HARDCODED, NORMS, ConfigError
from legointerp.pretrained import INITS, MINILM_SHAPE, minilm_dir
from legointerp.task import SURFACES, LegoTask

MAX_SAMPLES = 100_000  # sentences per analysis or batch; beyond this a CPU run takes hours and GBs
MAX_SEED = 2**63 - 1  # torch generators take 64-bit seeds; the data stream's step seeds are taken mod 2**63
MAX_SEEDS = 100  # training runs per arm of a replication: each takes minutes to hours


@dataclass(frozen=True)
class Number:
    """A whole (``kind=int``) or finite real number in [low, high]; ``strict_low`` excludes ``low`` itself."""

    kind: type = int
    low: float | None = None
    high: float | None = None
    strict_low: bool = False

    @property
    def noun(self) -> str:
        return "a whole number" if self.kind is int else "a finite number"

    def describe(self) -> str:
        if self.high is None:
            return f"{self.noun} {'>' if self.strict_low else '>='} {self.low}"
        if self.kind is int:
            return f"{self.noun} in {self.low}..{self.high}"
        return f"{self.noun} in {'(' if self.strict_low else '['}{self.low}, {self.high}]"

    def accepts(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral if self.kind is int else numbers.Real):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.strict_low else value < self.low):
            return False
        return self.high is None or value <= self.high

    def check(self, name: str, value) -> None:
        """Raise :class:`ConfigError` unless ``value`` is in range (for configs built in Python)."""
        if not self.accepts(value):
            raise ConfigError(f"{name}={value!r} is out of range: give {self.describe()}")

    def __call__(self, text: str):
        """argparse ``type``: the value of ``text``, or an :class:`argparse.ArgumentTypeError` naming the range."""
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {self.noun}: give {self.describe()}") from None
        if not self.accepts(value):
            raise argparse.ArgumentTypeError(f"{text} is out of range: give {self.describe()}")
        return value

    @property
    def __name__(self) -> str:  # argparse names the type in some messages
        return self.noun


COUNT = Number(int, 1)
NON_NEGATIVE = Number(int, 0)
SAMPLES = Number(int, 1, MAX_SAMPLES)
# fewest sentences each analysis gives numbers for: head scores need two sentences, probes a held-out part
ANALYSIS_SAMPLES = {"heads": Number(int, 2, MAX_SAMPLES), "probe": Number(int, 10, MAX_SAMPLES), "patch": SAMPLES,
                    "shortcut": Number(int, 10, MAX_SAMPLES), "report": Number(int, 10, MAX_SAMPLES),
                    "timeline": Number(int, 10, MAX_SAMPLES)}
SEED = Number(int, 0, MAX_SEED)
SEEDS = Number(int, 1, MAX_SEEDS)
FRACTION = Number(float, 0.0, 1.0, strict_low=True)  # accuracy thresholds: 0 would pass everything
PROPORTION = Number(float, 0.0, 1.0)
POSITIVE = Number(float, 0.0, strict_low=True)
NON_NEGATIVE_REAL = Number(float, 0.0)

# ---------------------------------------------------------------------------- devices
DEVICE_SYNTAX = re.compile(r"cpu|auto|cuda(:\d+)?")


class Device:
    """argparse ``type`` for ``--device``: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``, present on this machine."""

    __name__ = "device"

    def check(self, name: str, value) -> None:
        """The spelling only: a config recorded on a GPU machine stays valid where no GPU is visible."""
        if not isinstance(value, str) or not DEVICE_SYNTAX.fullmatch(value):
            raise ConfigError(f"unknown device {value!r} ({name}): use cpu, cuda, cuda:N or auto")

    def __call__(self, text: str) -> str:
        try:
            resolve_device(text)
        except ConfigError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return text


DEVICE = Device()


class HardcodedHeads:
    """argparse ``type`` for ``--hardcoded``: one entry per head, a fixed pattern or ``-`` for a learned head
    (``association,manipulation,-,-``); also checks a tuple set from Python.  The head count is checked against
    ``n_heads`` by the model config."""

    __name__ = "hardcoded heads"

    def check(self, name: str, value) -> None:
        if not isinstance(value, tuple) or any(kind is not None and kind not in HARDCODED for kind in value):
            raise ConfigError(f"{name}={value!r} is not a tuple of {', '.join(HARDCODED)} or None (learned), one per head")

    def __call__(self, text: str) -> tuple[str | None, ...]:
        kinds = tuple(None if kind.strip() in ("-", "") else kind.strip() for kind in text.split(","))
        unknown = [kind for kind in kinds if kind is not None and kind not in HARDCODED]
        if unknown:
            raise argparse.ArgumentTypeError(f"{unknown[0]!r} is not a hardcoded pattern: give one of "
                                             f"{', '.join(HARDCODED)} or - (learned) per head, e.g. association,manipulation,-,-")
        return kinds


@dataclass(frozen=True)
class Choice:
    """argparse ``type`` and Python check for an option with a few named values (``--norm pre|post``)."""

    values: tuple[str, ...]
    __name__ = "choice"

    def check(self, name: str, value) -> None:
        if value not in self.values:
            raise ConfigError(f"{name}={value!r} is not one of {', '.join(self.values)}")

    def __call__(self, text: str) -> str:
        if text not in self.values:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(self.values)}")
        return text


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` -> cuda when a GPU is visible, else cpu; raises :class:`ConfigError` for a device that is not here."""
    if isinstance(name, torch.device):
        name = str(name)
    DEVICE.check("device", name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"device {name!r} was asked for but no CUDA GPU is visible: use --device cpu or auto")
        index = int(name.partition(":")[2] or 0)
        if index >= count:
            raise ConfigError(f"device {name!r} was asked for but only {count} GPU(s) are visible: use cuda:0..cuda:{count - 1}")
    return torch.device(name)


# ---------------------------------------------------------------------------- training
# ours: association/manipulation targets added to the task loss; official: the official code's band and same-token
# targets by KL, with no task loss while they train (train.official_mimicking_loss)
MIMICKING = ("ours", "official")
MIMIC_DATA = ("lego", "random")
# TrainConfig's numeric fields, device and hardcoded heads; group, n and supervision are checked by the task that uses them
TRAIN_OPTIONS = {
    "n": COUNT, "n_tr": COUNT, "min_length": COUNT, "curriculum_start": COUNT, "curriculum_threshold": FRACTION,
    "d_model": COUNT, "n_heads": COUNT, "n_layers": COUNT, "d_mlp": COUNT, "min_depth": COUNT,
    "lr": POSITIVE, "weight_decay": NON_NEGATIVE_REAL, "warmup": NON_NEGATIVE, "decay": PROPORTION,
    "batch_size": SAMPLES, "steps": COUNT, "mimic_steps": NON_NEGATIVE, "target_accuracy": FRACTION, "seed": SEED,
    "device": DEVICE, "eval_every": COUNT, "eval_size": SAMPLES, "save_every": COUNT, "snapshots": NON_NEGATIVE,
    "snapshot_every": COUNT, "hardcoded": HardcodedHeads(),
    "norm": Choice(NORMS), "d_embed": COUNT,
    "surface": Choice(SURFACES), "mimic": Choice(MIMICKING), "mimic_data": Choice(MIMIC_DATA),
    "init": Choice(INITS),
}
OPTIONAL = {"n_tr", "min_length", "min_depth", "target_accuracy", "d_embed", "snapshot_every"}  # None means "not used"


def check_train_config(config) -> None:
    """Every range and every relation between the options of a ``TrainConfig``; raises :class:`ConfigError`
    (or the task's :class:`LegoError`) naming the option and the fix."""
    for name, option in TRAIN_OPTIONS.items():
        value = getattr(config, name)
        if value is not None or name not in OPTIONAL:
            option.check(name, value)
    task = LegoTask(config.task_config())  # the group's name and n
    config.loss_mask()  # n_tr or supervised positions within the chain
    n = config.n
    if config.min_length is not None and not config.min_length <= n:
        raise ConfigError(f"min_length={config.min_length} must lie in 1..n={n}: lower --min-length")
    if config.curriculum and not config.curriculum_start <= n:
        raise ConfigError(f"curriculum_start={config.curriculum_start} must lie in 1..n={n}: lower --curriculum-start "
                          "or train without the curriculum (--no-curriculum)")
    if config.mimic != "ours" and not config.mimic_steps:
        raise ConfigError(f"mimic={config.mimic!r} picks the loss of the first --mimic-steps steps, but mimic_steps=0: "
                          "give --mimic-steps N (the official code mimics, then fine-tunes)")
    if config.mimic_data == "random" and config.mimic != "official":
        raise ConfigError("mimic_data='random' needs mimic='official' (the paper's loss reads patterns alone; ours reads "
                          "the clauses of LEGO sentences): add --mimic official")
    if config.snapshots and config.snapshot_every:
        raise ConfigError(f"snapshots={config.snapshots} (log-spaced) and snapshot_every={config.snapshot_every} (linear) "
                          "are two schedules: give --snapshots N or --snapshot-every K, not both")
    if config.mimic_steps and config.n_heads < 2:
        raise ConfigError(f"the mimicking loss trains heads 0 and 1 but n_heads={config.n_heads}: use --n-heads 2 or "
                          "more, or --mimic-steps 0")
    if config.init == "minilm":
        wrong = [f"{name}={getattr(config, name)!r}" for name, value in MINILM_SHAPE.items() if getattr(config, name) != value]
        if wrong:
            raise ConfigError(f"--init minilm loads all-MiniLM-L6-v2's encoder, whose shape is fixed, but {', '.join(wrong)}: "
                              "drop those options (--init minilm sets norm post, 6 layers, d_model 384, 12 heads, "
                              "d_mlp 1536, no-tied), or train the same shape from scratch with --init random")
        minilm_dir()  # the package is installed, or one line naming the extra
    config.model_config(task)  # widths divisible by the head count, stochastic depth within the layers


# ---------------------------------------------------------------------------- files
def _check_not_shipped(path: Path, folder: bool = False) -> None:
    try:
        check_not_shipped(path, folder)
    except OutputError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def output_file(text: str) -> Path:
    """argparse ``type`` for a file to write: refused now, before the work, if it could not be written then.
    A missing folder is fine (it is created on writing) as long as the nearest existing one is writable."""
    path = Path(text).expanduser()
    # a trailing / names a folder even before it exists: Path() would drop it and write a file of that name
    if not text or path.is_dir() or text.endswith((os.sep, f"{os.sep}.", f"{os.sep}..")):
        raise argparse.ArgumentTypeError(f"{text!r} is a folder, not a file: name a file inside it")
    _check_not_shipped(path)
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"{folder} is a file, so {path} cannot be created under it: choose another path")
    if path.exists() and not (os.access(path, os.W_OK) and path.stat().st_mode & 0o222):
        raise argparse.ArgumentTypeError(f"{path} is read-only: choose another path or make it writable (chmod u+w {path})")
    try:
        with tempfile.TemporaryFile(dir=folder):  # what the final write does: a temporary file beside the target
            pass
    except OSError as err:
        raise argparse.ArgumentTypeError(f"cannot write in folder {folder} ({err.strerror}): choose a folder you can "
                                         "write to") from None
    return path


def output_folder(text: str) -> Path:
    """argparse ``type`` for a folder to write into (made if missing): refused now if it is a file or cannot be written."""
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a file, not a folder: name a folder (it is created if missing)")
    _check_not_shipped(path, folder=True)
    output_file(str(path / "probe"))  # the same checks as for a file written inside it
    return path

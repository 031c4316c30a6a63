"""Writing files so that an interrupted write never leaves a half-written file behind, and claiming an output
path before the work that fills it starts (its folder exists or is made, and no other process writes it).

One rule for every writer (:func:`check_not_shipped`): nothing is ever written into the package's own data folder
(the shipped models and their logs) or under a name ``--ckpt`` reads as a shipped model, ``--force`` or not."""

from __future__ import annotations

import fcntl
import glob
import os
import re
import tempfile
from importlib import resources
from pathlib import Path

from legointerp.errors import LegoInterpError

BUNDLED = "bundled"
# Models shipped with the package, by the name --ckpt accepts: the default (full supervision, follows the chain)
# and one trained in the paper's shortcut regime (positions 0-4 and 11 supervised) for shortcut detection.
BUNDLED_FILES = {BUNDLED: "model.pt", "bundled-shortcut": "shortcut.pt"}


class OutputError(LegoInterpError):
    """An output path that cannot be written, or that another process is writing."""


def shipped_folder() -> Path:
    """The package's data folder: the shipped models and their training logs."""
    return Path(str(resources.files("legointerp") / "data"))


def check_not_shipped(path: Path, folder: bool = False, flag: str = "") -> Path:
    """Raise :class:`OutputError` if writing ``path`` (a file, or with ``folder`` a folder to write in) would change
    a file shipped with the package (through any relative path, symlink or mount of its data folder) or make a file
    that ``--ckpt NAME`` never reads, because NAME means a shipped model.  Every writer calls it before writing,
    ``--force`` or not.  ``flag`` (``--out``) starts the message."""
    named = f"{flag} {path}".lstrip()
    if not folder and path.name in BUNDLED_FILES:
        raise OutputError(f"{named} has the name of a model shipped with legointerp (--ckpt {path.name} loads that one, "
                          f"never this file): pick another name, e.g. {path.with_name(path.name + '.pt')}")
    shipped = os.stat(shipped_folder())
    target = path.expanduser().resolve()
    for part in (target, *target.parents):  # compared by inode: a bind mount of the folder is the folder
        if part.is_dir() and os.path.samestat(os.stat(part), shipped):
            raise OutputError(f"{named} is inside legointerp's own data folder, which holds the shipped models and "
                              f"logs and is never written: write elsewhere, e.g. {path.name}")
    return path


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def atomic_write(path: Path, write) -> None:
    """Call ``write(file)`` on a temporary file beside ``path`` and move it into place only when complete."""
    check_not_shipped(path)
    if path.is_dir():
        raise OutputError(f"{path} is a folder, so it cannot be replaced by a file: move the folder away or write elsewhere")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a report or checkpoint is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temps(path: Path) -> list[Path]:
    """Delete the temporary files that a killed :func:`atomic_write` of ``path`` left behind (SIGKILL runs no
    cleanup).  Only safe while holding :func:`lock_output` on ``path``: another writer's temp file looks the same."""
    stale = [Path(p) for p in glob.glob(os.path.join(glob.escape(str(path.parent)), glob.escape(_temp_prefix(path)) + "*.tmp"))]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def prepare_output(path: Path, flag: str = "--out") -> Path:
    """Make ``path``'s folder now, before any work, or raise :class:`OutputError` naming the problem and the fix
    (whether the folder is writable is learnt by writing in it, e.g. :class:`OutputLock`'s file)."""
    check_not_shipped(path, flag=flag)
    if path.is_dir():
        raise OutputError(f"{flag} {path} is a folder: pass a file path inside it, e.g. {path / 'model.pt'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise OutputError(f"{flag} {path}: a part of its folder path is a file, not a folder: pick another path") from None
    except OSError as err:
        raise OutputError(f"{flag} {path}: cannot create its folder ({err.strerror}): pick a folder you can write") from None
    return path


class OutputLock:
    """An exclusive ``flock`` on a hidden ``.NAME.lock`` beside ``path``, so two processes never write one output.

    The kernel drops the lock when its process dies, however it dies, so a lock file left by a killed run is
    stale by construction and is simply locked again.  The file itself stays (removing it would let a waiting
    process lock a deleted file while a third locks a new one)."""

    def __init__(self, path: Path, flag: str = "--out"):
        self.path, self.fd = path.with_name(f".{path.name}.lock"), None
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise OutputError(f"{flag} {path}: cannot create the lock file {self.path} ({err.strerror}): "
                              "pick a folder you can write") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip()
            os.close(self.fd)
            self.fd = None
            raise OutputError(f"{flag} {path} is being written by another running process{f' (pid {holder})' if holder else ''}: "
                              "wait for it to finish, stop it, or pick another path") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        self.release()


def portable(command: str) -> str:
    """``command`` with every absolute path cut to its last part (``--runs /home/me/runs`` -> ``--runs runs``): what
    is recorded in checkpoints, rows and tables is shipped; the folders of the machine that made them are not."""
    return re.sub(r"(?<![\w.~:/])/[^\s=]+", lambda match: Path(match.group()).name, command)

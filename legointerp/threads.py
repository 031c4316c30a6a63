"""CPU threads for the work.

torch starts with one intra-op thread per core.  A LEGO model's matrices are small (d_model 64 to 160): one GEMM of
a few hundred sentences is too little work to split well, and on a busy machine every operation waits for the slowest
thread's core, so a second thread there costs several times what it saves (``benchmarks/threads.py`` measures the
ratio on your machine); on idle cores, large batches still gain from them.  So :func:`set_threads_for` gives a small
model on the CPU one thread per core that the last minute's load average (``os.getloadavg``, which counts this
process's own recent work too) left idle, at least one, and one where the system keeps no load average (Windows).
A choice in the environment wins: ``LEGOINTERP_THREADS=N`` (or ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``) keeps
torch at that, and a ``torch.set_num_threads(N)`` after loading overrides it.
"""

from __future__ import annotations

import os

import torch

from legointerp.errors import LegoInterpError

SMALL = 256 * 1024  # d_model x d_mlp up to this (the bundled model: 64 x 256) gets only the idle cores


def idle_cores() -> int | None:
    """The cores this process may run on less the 1-minute load average, rounded, at least 1; None where the system
    keeps no load average."""
    if not hasattr(os, "getloadavg"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, round(cores - os.getloadavg()[0])))


def threads_for(cfg) -> int | None:
    """The intra-op threads for a model of ``cfg`` on the CPU: for a small one the idle cores (1 where unknown),
    None (torch's default) otherwise."""
    return (idle_cores() or 1) if cfg.d_model * cfg.d_mlp <= SMALL else None


def set_threads_for(cfg, device: str | torch.device = "cpu") -> int:
    """Set torch's intra-op threads for work on a model of ``cfg`` (see the module's docstring); returns the count."""
    ours = os.environ.get("LEGOINTERP_THREADS", "").strip()
    if ours:
        if not ours.isdigit() or int(ours) < 1:
            raise LegoInterpError(f"LEGOINTERP_THREADS={ours!r} is not a positive whole number: set it to e.g. 1, or unset it")
        torch.set_num_threads(int(ours))
    elif (not any(os.environ.get(name, "").strip() for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"))
          and torch.device(device).type == "cpu"):
        threads = threads_for(cfg)
        if threads is not None:
            torch.set_num_threads(threads)
    return torch.get_num_threads()

"""CPU threads for the work.

torch starts with one intra-op thread per core.  A LEGO model's matrices are small (d_model 64 to 160): one GEMM of
a few hundred sentences is too little work to split, so a second thread mostly adds synchronisation, and on a busy
machine every operation waits for the slowest thread's core.  So :func:`set_threads_for` gives a small model one
thread on the CPU (``benchmarks/threads.py`` measures the ratio on your machine).  A choice in the environment wins:
``LEGOINTERP_THREADS=N`` (or ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``) keeps torch at that, and a
``torch.set_num_threads(N)`` after loading overrides it.
"""

from __future__ import annotations

import os

import torch

from legointerp.errors import LegoInterpError

SMALL = 256 * 1024  # d_model x d_mlp up to this (the bundled model: 64 x 256) runs on one thread


def threads_for(cfg) -> int | None:
    """The intra-op threads for a model of ``cfg`` on the CPU: 1 for a small one, None (torch's default) otherwise."""
    return 1 if cfg.d_model * cfg.d_mlp <= SMALL else None


def set_threads_for(cfg, device: str | torch.device = "cpu") -> int:
    """Set torch's intra-op threads for work on a model of ``cfg`` (see the module's docstring); returns the count."""
    ours = os.environ.get("LEGOINTERP_THREADS", "").strip()
    if ours:
        if not ours.isdigit() or int(ours) < 1:
            raise LegoInterpError(f"LEGOINTERP_THREADS={ours!r} is not a positive whole number: set it to e.g. 1, or unset it")
        torch.set_num_threads(int(ours))
    elif (not any(os.environ.get(name, "").strip() for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"))
          and torch.device(device).type == "cpu" and threads_for(cfg) is not None):
        torch.set_num_threads(threads_for(cfg))
    return torch.get_num_threads()

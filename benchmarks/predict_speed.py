"""Sentences per second of ``legointerp predict --file`` (parse, encode, forward, output) on the bundled model, the
forward pass alone, and the arithmetic bound at this machine's measured fp32 matmul peak.

    python benchmarks/predict_speed.py [--ckpt model.pt] [--lines 100000]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from legointerp.checkpoint import load_model
from legointerp.cli import main as cli_main
from legointerp.evaluate import linear, predict, test_batch


def matmul_peak(size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the best of ``repeats`` fp32 (size x size) products, through torch's GEMM and through the fused
    oneDNN GEMM the forward pass uses (the faster one on AMD CPUs), whichever is faster."""
    a, b, bias = torch.randn(size, size), torch.randn(size, size), torch.zeros(size)
    best = min(_seconds(work) for work in (lambda: a @ b, lambda: linear(a, b, bias)) for _ in range(repeats))
    return 2 * size ** 3 / best


def cpu_model() -> str:
    """The CPU's name as the kernel reports it (``platform.processor()`` is empty on Linux)."""
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or "unknown CPU"


def _seconds(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def forward_flops(cfg, tokens: int, readout: int, layers: int | None = None) -> float:
    """FLOPs of one sentence through the last ``layers`` blocks (default: all): every block at every token, the
    last block's queries and MLP only at the ``readout`` positions."""
    layers = cfg.n_layers if layers is None else layers
    if layers == 0:
        return 0.0
    D, M = cfg.d_model, cfg.d_mlp
    full = tokens * (8 * D * D + 4 * D * M + 4 * tokens * D)
    last = tokens * 6 * D * D + readout * (2 * D * D + 4 * D * M + 4 * tokens * D)
    return (layers - 1) * full + last


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", default=None)
    parser.add_argument("--lines", type=int, default=100_000)
    args = parser.parse_args()
    model, task, _ = load_model(args.ckpt)
    batch = test_batch(task, args.lines, seed=0)
    peak = matmul_peak()
    flops = forward_flops(model.cfg, batch.tokens.shape[1], batch.clause_pos.shape[1])
    print(f"{cpu_model()}, {torch.get_num_threads()} threads; fp32 matmul peak {peak / 1e9:.0f} GFLOP/s; {flops / 1e6:.0f} MFLOP per "
          f"sentence: at most {peak / flops:,.0f} sentences/s at that peak")
    forward = _seconds(lambda: predict(model, batch))
    print(f"forward pass       {args.lines / forward:9,.0f} sentences/s ({flops * args.lines / forward / peak:.0%} of peak)")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "sentences.txt"
        path.write_text("\n".join(task.to_text(row) for row in batch.tokens) + "\n")
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            seconds = _seconds(lambda: cli_main(["predict", "--ckpt", args.ckpt or "bundled", "--file", str(path)]))
    print(f"predict --file     {args.lines / seconds:9,.0f} sentences/s ({args.lines:,} lines in {seconds:.1f} s, "
          f"parse and output included)")


if __name__ == "__main__":
    main()

"""Wall time of the analyses on a checkpoint (default: the bundled model), as `legointerp report` runs them.

    python benchmarks/analysis_speed.py [--ckpt model.pt] [--samples 1500] [--head-samples 250]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from legointerp.cli import main as cli_main
from legointerp.checkpoint import load_model
from legointerp.evaluate import test_batch
from legointerp.heads import classify_heads
from legointerp.probes import percolation


def timed(label: str, work) -> float:
    started = time.perf_counter()
    work()
    seconds = time.perf_counter() - started
    print(f"{label:<34}{seconds:8.2f} s")
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", default=None)
    parser.add_argument("--samples", type=int, default=1500)
    parser.add_argument("--head-samples", type=int, default=250)
    args = parser.parse_args()
    model, task, _ = load_model(args.ckpt)
    batch = test_batch(task, args.samples, seed=0)
    print(f"{torch.get_num_threads()} threads; {args.samples} sentences ({args.head_samples} for heads)")
    timed("heads (scores + ablations)", lambda: classify_heads(model, batch[: args.head_samples], task))
    timed("probes (trained + control)", lambda: percolation(model, batch, task))
    with tempfile.TemporaryDirectory() as folder:
        argv = ["report", "--out", str(Path(folder) / "report.html"), "--samples", str(args.samples),
                "--head-samples", str(args.head_samples), "--quiet"] + (["--ckpt", args.ckpt] if args.ckpt else [])
        timed("legointerp report (all of it)", lambda: cli_main(argv))


if __name__ == "__main__":
    main()

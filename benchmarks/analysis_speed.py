"""Wall time of the analyses on a checkpoint (default: the bundled model), as `legointerp report` runs them,
then the whole report (heads + probes + patching + shortcut + page) against its 60 s goal, then the timeline of a
20-snapshot run of the checkpoint's shape (its weights interpolated from a random twin, no cache, no ablations)
against its 60 s goal.

    python benchmarks/analysis_speed.py [--ckpt model.pt] [--samples 1500] [--head-samples 120] [--patch-samples 16]
        [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from legointerp.cli import main as cli_main
from legointerp.checkpoint import load_checkpoint, load_model, resolve, save_checkpoint
from legointerp.evaluate import test_batch
from legointerp.heads import classify_heads
from legointerp.model import random_twin
from legointerp.patching import patch
from legointerp.probes import percolation
from legointerp.shortcut import detect_shortcut
from legointerp.timeline import timeline
from legointerp.train import read_log

from predict_speed import cpu_model, matmul_peak


def timed(label: str, work):
    """Run ``work``, print its wall time; return its result and the seconds."""
    started = time.perf_counter()
    result = work()
    seconds = time.perf_counter() - started
    print(f"{label:<38}{seconds:8.2f} s")
    return result, seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", default=None)
    parser.add_argument("--samples", type=int, default=1500)
    parser.add_argument("--head-samples", type=int, default=120)
    parser.add_argument("--patch-samples", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="timeline rounds, one process and all, alternating")
    args = parser.parse_args()
    model, task, _ = load_model(args.ckpt)
    batch = test_batch(task, args.samples, seed=0)
    print(f"{cpu_model()}, intra-op threads {torch.get_num_threads()}, fp32 matmul peak {matmul_peak() / 1e9:.0f} GFLOP/s; "
          f"{args.samples} sentences ({args.head_samples} for heads)")
    timed("heads (scores + ablations)", lambda: classify_heads(model, batch[: args.head_samples], task))
    probes, _ = timed("probes (trained + control)", lambda: percolation(model, batch, task))
    timed("patching (exact resid + attribution)",
          lambda: patch(model, batch[: args.patch_samples], task, corruption="sign", heads=False))
    timed("shortcut (probes reused)",
          lambda: detect_shortcut(model, batch, task, log=read_log(resolve(args.ckpt)), probes=probes))
    with tempfile.TemporaryDirectory() as folder:
        argv = ["report", "--out", str(Path(folder) / "report.html"), "--samples", str(args.samples),
                "--head-samples", str(args.head_samples), "--patch-samples", str(args.patch_samples),
                "--quiet"] + (["--ckpt", args.ckpt] if args.ckpt else [])
        _, seconds = timed("legointerp report (all of it)", lambda: cli_main(argv))
    print(f"report: {seconds:.1f} s of the 60 s goal ({seconds / 60:.2f}x)")
    jobs = os.cpu_count() or 1
    serial, parallel = [], []
    with tempfile.TemporaryDirectory() as folder:
        run = write_interpolated_run(args.ckpt, model, Path(folder) / "run.snapshots", snapshots=20)
        for _ in range(args.rounds):  # alternating, so that a change of load hits both alike
            serial.append(timed("timeline, 20 snapshots, 1 process", lambda: timeline(run, cache=False))[1])
            parallel.append(timed(f"timeline, 20 snapshots, {jobs} processes",
                                  lambda: timeline(run, cache=False, jobs=jobs))[1])
    seconds = statistics.median(parallel)
    print(f"timeline (median of {args.rounds}): {seconds:.1f} s of the 60 s goal ({seconds / 60:.2f}x); "
          f"{statistics.median(serial) / seconds:.2f}x faster than one process")


def write_interpolated_run(ckpt, model, folder: Path, snapshots: int) -> Path:
    """A snapshot folder whose weights move linearly from ``model``'s random twin to ``model``: a run of its shape."""
    checkpoint, start = load_checkpoint(ckpt), random_twin(model, seed=0).state_dict()
    folder.mkdir()
    rows = []
    for t in range(snapshots):
        share = t / (snapshots - 1)
        state = {k: (1 - share) * start[k] + share * v for k, v in checkpoint.state_dict.items()}
        name = f"step-{t:07d}.pt"
        save_checkpoint(replace(checkpoint, state_dict=state), folder / name)
        rows.append({"step": t, "samples": t, "file": name})
    (folder / "index.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


if __name__ == "__main__":
    main()

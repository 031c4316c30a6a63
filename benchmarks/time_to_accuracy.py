"""Time-to-accuracy of a training preset: when did *every* chain position first pass 90% and 99% test accuracy?

Trains the preset from scratch (or reads the log of a finished run with --log) and prints training time
(evaluation excluded), steps and sentences seen at each threshold.

    python benchmarks/time_to_accuracy.py --preset tiny --device cpu
    python benchmarks/time_to_accuracy.py --log legointerp/data/model.log.jsonl
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from legointerp.train import PRESETS, Trainer, read_log


def first_reaching(log: list[dict], threshold: float) -> dict | None:
    return next((row for row in log if min(row["accuracy"]) >= threshold), None)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--log", help="summarise this training log instead of training")
    args = parser.parse_args()
    if args.log:
        log = [json.loads(line) for line in Path(args.log).read_text().splitlines() if line.strip()]
        source = args.log
    else:
        with tempfile.TemporaryDirectory() as folder:
            out = Path(folder) / "model.pt"
            Trainer(replace(PRESETS[args.preset], device=args.device), out).fit()
            log = read_log(out)
        source = f"preset {args.preset} on {args.device}, {torch.get_num_threads()} threads"
    print(source)
    for threshold in (0.9, 0.99):
        row = first_reaching(log, threshold)
        if row is None:
            print(f"all positions >= {threshold:.0%}: not reached in {log[-1]['step']} steps ({log[-1]['elapsed_s']:.0f} s)")
        else:
            print(f"all positions >= {threshold:.0%}: {row['elapsed_s']:7.0f} s  step {row['step']:6d}  "
                  f"{row['samples']:9d} sentences")
    print("final min accuracy:", min(log[-1]["accuracy"]))


if __name__ == "__main__":
    main()

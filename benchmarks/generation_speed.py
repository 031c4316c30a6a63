"""Sentences generated per second on one CPU core (goal: >= 100k n=12 sentences/s), for each task group.

    python benchmarks/generation_speed.py
"""

from __future__ import annotations

import time

import torch

from legointerp.task import LegoTask, TaskConfig


def main():
    torch.set_num_threads(1)
    for group in ("task1", "task2", "z7"):
        task = LegoTask(TaskConfig(group=group, n=12))
        generator = torch.Generator().manual_seed(0)
        task.sample(1000, generator)  # warm-up
        size, rounds = 100_000, 5
        started = time.perf_counter()
        for _ in range(rounds):
            task.sample(size, generator)
        rate = size * rounds / (time.perf_counter() - started)
        mixed_started = time.perf_counter()
        task.sample(size, generator, min_length=1)
        mixed = size / (time.perf_counter() - mixed_started)
        print(f"{group:6s} n=12: {rate:10,.0f} sentences/s  (mixed lengths 1..12: {mixed:10,.0f}/s)")


if __name__ == "__main__":
    main()

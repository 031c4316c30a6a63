"""One forward pass of the bundled model on a few sentences, with torch's default threads and with the threads
legointerp.threads picks for it (the idle cores, by the load average now): prints both times and their ratio
(machine-dependent; run it on yours)."""

import os
import time

import torch

from legointerp.checkpoint import load_model
from legointerp.evaluate import test_batch


def per_call(model, tokens, repeats: int = 50) -> float:
    with torch.no_grad():
        model(tokens)
        started = time.perf_counter()
        for _ in range(repeats):
            model(tokens)
    return (time.perf_counter() - started) / repeats


if __name__ == "__main__":
    default = torch.get_num_threads()
    model, task, _ = load_model()
    chosen = torch.get_num_threads()
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores: {chosen} thread(s) chosen")
    tokens = test_batch(task, 16).tokens
    times = {}
    for threads in (default, chosen):
        torch.set_num_threads(threads)
        times[threads] = per_call(model, tokens)
        print(f"{threads} thread(s): {times[threads] * 1e3:.2f} ms per forward pass of 16 sentences")
    print(f"ratio default / chosen: {times[default] / times[chosen]:.1f}x")

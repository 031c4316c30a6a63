"""One check of a machine for legointerp: training speed per shape, exact resume, SIGTERM saving, DDP, and every
analysis on the device against the CPU.  benchmarks/gpu_check.sh runs it on a fresh GPU machine; ``--device cpu
--quick`` runs the same checks at CI size.

    python benchmarks/gpu_check.py [--device cuda] [--steps 300] [--quick]

Per shape it prints ms/step, sentences/s, MFU (against ``--peak-tflops``, H100 bf16 dense by default; CPU: none),
peak device memory, host syncs per step (CUDA's sync debug mode; CPU: not counted) and whether flash-attention
kernels ran (the profiler's kernel names; CPU: no).  Exits 1 if a check fails."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch

from legointerp.checkpoint import load_checkpoint
from legointerp.train import PRESETS, Trainer, TrainConfig, training_cost

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "legointerp.cli"]
# (name, config): the paper's BERT shape and a small one; --quick shrinks both to CI size
SHAPES = {"bert-paper": replace(PRESETS["bert-paper"], steps=10**9, eval_every=10**9, save_every=10**9),
          "small": TrainConfig(n_tr=6, d_model=128, n_heads=4, n_layers=6, d_mlp=512, batch_size=512, steps=10**9,
                               eval_every=10**9, save_every=10**9)}
QUICK = dict(d_model=32, n_heads=2, n_layers=2, d_mlp=64, batch_size=32, eval_size=64)


def measure(name: str, config: TrainConfig, steps: int, peak_tflops: float, folder: Path) -> dict:
    trainer = Trainer(config, folder / f"{name}.pt", progress=False)
    cuda = trainer.device.type == "cuda"
    trainer.train_step()  # warm-up
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        started = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        if cuda:
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - started) / steps
    if cuda:
        torch.cuda.set_sync_debug_mode(0)
    syncs = sum("synchroniz" in str(w.message) for w in caught) / steps if cuda else None
    flash = False
    if cuda:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
            trainer.train_step()
            torch.cuda.synchronize()
        flash = any("flash" in event.name.lower() for event in profile.events())
    cost = training_cost(config)
    rate = config.batch_size / seconds
    return {"shape": name, "ms_per_step": round(1e3 * seconds, 2), "sentences_per_s": round(rate),
            "mfu": round(rate * cost.flops_per_sentence / (peak_tflops * 1e12), 3) if cuda else None,
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            "host_syncs_per_step": syncs, "flash_attention": flash}


def train_cli(out: Path, device: str, steps: int, *extra: str) -> list[str]:
    return [*CLI, "train", "--quiet", "--out", str(out), "--length", "4", "--d-model", "32", "--n-heads", "2",
            "--n-layers", "2", "--d-mlp", "64", "--batch-size", "32", "--eval-every", "4", "--eval-size", "64",
            "--save-every", "4", "--steps", str(steps), "--device", device, "--format", "json", *extra]


def check_resume(device: str, folder: Path) -> bool:
    """8 steps straight and 4 + 4 resumed end in the same weights (bit-identical on the CPU, to rounding on CUDA)."""
    for args in (train_cli(folder / "straight.pt", device, 8), train_cli(folder / "resumed.pt", device, 4),
                 train_cli(folder / "resumed.pt", device, 8, "--resume")):
        subprocess.run(args, check=True, capture_output=True)
    a, b = (load_checkpoint(folder / f"{name}.pt").state_dict for name in ("straight", "resumed"))
    tolerance = 0 if device == "cpu" else 1e-2
    return all(float((a[k].float() - b[k].float()).abs().max()) <= tolerance for k in a)


def check_sigterm(device: str, folder: Path) -> bool:
    """SIGTERM mid-run: the run stops at a step boundary, saves, and says so."""
    out = folder / "term.pt"
    run = subprocess.Popen(train_cli(out, device, 10**6), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out.with_suffix(".log.jsonl")).exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    run.send_signal(signal.SIGTERM)
    stdout, _ = run.communicate(timeout=120)
    return json.loads(stdout).get("interrupted") == "SIGTERM" and load_checkpoint(out).train_state["step"] > 0


def check_ddp(device: str, folder: Path) -> tuple[int, bool]:
    processes = 2 if device == "cpu" else max(1, min(2, torch.cuda.device_count()))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                             str(processes), "-m", "legointerp.cli", *train_cli(folder / "ddp.pt", device, 4)[3:],
                             "--mimic", "official", "--mimic-steps", "2"],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return processes, result.returncode == 0


def check_analyses(device: str, folder: Path) -> dict[str, bool]:
    """Every analysis command on ``device`` and on the CPU: the same JSON, numbers to 1e-3 (bf16-free fp32 kernels
    of two devices differ by rounding; near-tied rank correlations move most)."""
    commands = {"eval": ["--samples", "64"], "heads": ["--samples", "24"], "probe": ["--samples", "120"],
                "patch": ["--samples", "4"], "shortcut": ["--samples", "40"]}
    agree = {}
    for name, extra in commands.items():
        documents = [json.loads(subprocess.run([*CLI, name, "--ckpt", "bundled", *extra, "--format", "json",
                                                "--device", where], check=True, capture_output=True, text=True).stdout)
                     for where in ("cpu", device)]
        agree[name] = _close(*documents)
    return agree


def _close(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, (int, float)):
        return a != a and b != b or abs(a - b) <= 1e-3 * max(1.0, abs(a))
    return a == b


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=300, help="timed training steps per shape")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the device's bf16 dense peak (H100: 989)")
    parser.add_argument("--quick", action="store_true", help="CI size: tiny shapes, a few steps")
    args = parser.parse_args()
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, config in SHAPES.items():
            config = replace(config, device=args.device, **(QUICK if args.quick else {}))
            print(json.dumps(measure(name, config, args.steps, args.peak_tflops, folder)), flush=True)
        checks = {"resume_equal": check_resume(args.device, folder), "sigterm_saves": check_sigterm(args.device, folder)}
        processes, checks["ddp"] = check_ddp(args.device, folder)
        analyses = check_analyses(args.device, folder) if args.device != "cpu" else {}
        for name, passed in {**checks, **{f"analysis {k} equals the CPU's": v for k, v in analyses.items()}}.items():
            print(f"{'ok  ' if passed else 'FAIL'} {name}" + (f" ({processes} process(es))" if name == "ddp" else ""))
            if not passed:
                failures.append(name)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

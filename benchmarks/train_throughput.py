"""Training throughput: legointerp's encoder against transformers.BertForTokenClassification at the same shape.

Both are built locally (no hub download), trained on the same LEGO batches with the same loss (cross-entropy at
each clause's first token) and AdamW, alternating in one run so that machine noise hits both alike.

    python benchmarks/train_throughput.py [--preset tiny] [--device cpu] [--steps 20]
    python benchmarks/train_throughput.py --preset bert-paper --estimate-only   # analytic FLOPs and memory only
    python benchmarks/train_throughput.py --against OTHER   # this checkout's training loop against another's

``--against`` times ``Trainer.train_step`` (the whole step: sampling, copy, forward, loss, backward, AdamW) of this
checkout and of the checkout at OTHER (e.g. ``git archive main | tar x -C OTHER``), each in a process of its own that
imports its own ``legointerp``, alternating ``--rounds`` times, and prints the medians and their ratio.

The first line is the analytic cost of the preset (``legointerp.train.training_cost``): FLOPs per sentence and
the peak memory of a step at the preset's batch size, under bf16 autocast as on CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForTokenClassification

from legointerp.evaluate import clause_logits
from legointerp.model import LegoTransformer
from legointerp.task import LegoTask
from legointerp.train import PRESETS, training_cost


def bert_like(cfg) -> BertForTokenClassification:
    config = BertConfig(vocab_size=cfg.d_vocab, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                        num_attention_heads=cfg.n_heads, intermediate_size=cfg.d_mlp, max_position_embeddings=cfg.n_ctx,
                        num_labels=cfg.d_vocab_out, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        attn_implementation="sdpa")
    return BertForTokenClassification(config)


def time_steps(forward, params, batches, device) -> float:
    """Seconds per sample over the batches, after one warm-up step."""
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")
    elapsed = 0.0
    for i, batch in enumerate(batches):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        with autocast:
            loss = F.cross_entropy(clause_logits(forward(batch), batch).float().transpose(1, 2), batch.values)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            elapsed += time.perf_counter() - started
    return elapsed / (len(batches[1:]) * len(batches[0]))


def loop_rate(preset: str, steps: int, batch_size: int | None) -> float:
    """Sentences per second of ``steps`` training steps of ``preset`` (after one warm-up step), without the curriculum
    and the mimicking loss, whose schedules may differ between the checkouts compared; mixed lengths, so padded."""
    from legointerp.train import Trainer

    config = replace(PRESETS[preset], device="cpu", curriculum=False, mimic_steps=0, min_length=1, eval_every=10**9,
                     save_every=10**9, steps=10**9, batch_size=batch_size or PRESETS[preset].batch_size)
    with tempfile.TemporaryDirectory() as folder:
        trainer = Trainer(config, Path(folder) / "m.pt", progress=False, compile=False)
        trainer.train_step()
        started = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        return steps * config.batch_size / (time.perf_counter() - started)


def compare_checkouts(args) -> None:
    """This checkout's training loop against the one at ``args.against``, each run in its own process."""
    here = Path(__file__).resolve().parent.parent
    checkouts = {"this checkout": here, "--against": Path(args.against).resolve()}
    rates = {name: [] for name in checkouts}
    for _ in range(args.rounds):
        for name, root in checkouts.items():
            child = subprocess.run([sys.executable, __file__, "--loop-rate", "--preset", args.preset, "--steps",
                                    str(args.steps), *(["--batch-size", str(args.batch_size)] if args.batch_size else [])],
                                   env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}, cwd=root,
                                   capture_output=True, text=True, check=True)
            result = json.loads(child.stdout.splitlines()[-1])
            assert Path(result["package"]).resolve().is_relative_to(root), result  # imported the checkout's own code
            rates[name].append(result["rate"])
    print(f"preset {args.preset} training steps on the CPU, 1 thread, median of {args.rounds} alternating rounds")
    for name, values in rates.items():
        print(f"{name:15s} {statistics.median(values):9.1f} sentences/s  ({', '.join(f'{v:.1f}' for v in values)})")
    ratio = statistics.median(rates["this checkout"]) / statistics.median(rates["--against"])
    print(f"ratio (this checkout / --against) {ratio:.3f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3, help="alternate the two models this many times")
    parser.add_argument("--estimate-only", action="store_true", help="print the analytic cost and stop")
    parser.add_argument("--against", metavar="OTHER", help="time this checkout's training loop against OTHER's")
    parser.add_argument("--loop-rate", action="store_true", help=argparse.SUPPRESS)  # --against's child processes
    args = parser.parse_args()
    if args.loop_rate:
        torch.set_num_threads(1)
        import legointerp
        print(json.dumps({"rate": loop_rate(args.preset, args.steps, args.batch_size), "package": legointerp.__file__}))
        return
    if args.against:
        return compare_checkouts(args)
    device = torch.device(args.device)
    preset = PRESETS[args.preset]
    cost = training_cost(preset)
    print(f"estimate {args.preset}: {cost.flops_per_sentence / 1e9:.1f} GFLOP per sentence (forward + backward), "
          f"peak {cost.peak_bytes / 2**30:.1f} GiB at batch {cost.batch_size} ({cost.state_bytes / 2**30:.2f} GiB "
          f"weights, gradients and AdamW state; {cost.activation_bytes_per_sentence / 2**20:.1f} MiB of saved "
          "activations per sentence)")
    if args.estimate_only:
        return
    task = LegoTask(preset.task_config())
    cfg = preset.model_config(task)
    ours = LegoTransformer(cfg).to(device).train()
    theirs = bert_like(cfg).to(device).train()
    generator = torch.Generator().manual_seed(0)
    batches = [task.sample(args.batch_size or preset.batch_size, generator).to(device) for _ in range(args.steps + 1)]
    ours_s, theirs_s = [], []
    for _ in range(args.rounds):
        ours_s.append(time_steps(lambda b: ours(b.tokens), ours.parameters(), batches, device))
        theirs_s.append(time_steps(lambda b: theirs(input_ids=b.tokens).logits, theirs.parameters(), batches, device))
    ours_rate, theirs_rate = 1 / min(ours_s), 1 / min(theirs_s)
    shape = f"d_model={cfg.d_model} layers={cfg.n_layers} heads={cfg.n_heads} d_mlp={cfg.d_mlp} tokens={task.n_ctx}"
    print(f"preset {args.preset} ({shape}), batch {len(batches[0])}, device {device}, threads {torch.get_num_threads()}")
    print(f"legointerp                  {ours_rate:10.1f} samples/s")
    print(f"BertForTokenClassification  {theirs_rate:10.1f} samples/s")
    print(f"ratio (legointerp / BERT)   {ours_rate / theirs_rate:10.2f}x")
    print(f"legointerp at {ours_rate * cost.flops_per_sentence / 1e12:.2f} TFLOP/s by the estimate")


if __name__ == "__main__":
    main()

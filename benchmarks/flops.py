"""Forward FLOPs per sentence of hardcoded attention (the paper's section 5) beside the fully learned model's.

For each preset's shape (and, with ``--tokens 512``, the paper's measurement length), the analytic count of
``legointerp.model.forward_flops`` for the fully learned model, for the chosen heads fixed (default: association and
manipulation, the rest learned) and for every head fixed; then, on the smallest shape, that count checked against
``torch.utils.flop_counter.FlopCounterMode`` and the forward pass timed (best of ``--rounds``) for both models.

    python benchmarks/flops.py [--hardcoded association,manipulation] [--tokens 512] [--batch-size 256]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch
from torch.utils.flop_counter import FlopCounterMode

from legointerp.model import LegoTransformer, ModelConfig, forward_flops
from legointerp.options import HardcodedHeads
from legointerp.task import LegoTask
from legointerp.train import PRESETS


def with_heads(cfg: ModelConfig, kinds: tuple[str | None, ...]) -> ModelConfig:
    """``cfg`` with its first heads set to ``kinds`` and the rest learned."""
    return replace(cfg, hardcoded=(kinds + (None,) * cfg.n_heads)[: cfg.n_heads])


def counted(model: LegoTransformer, tokens: torch.Tensor) -> float:
    """FlopCounterMode's count per sentence; the pattern is hooked so that attention is materialised (the CPU's fused
    kernel hides its products from the counter)."""
    hooks = [(f"blocks.{layer}.attn.hook_pattern", lambda p, hook: None) for layer in range(model.cfg.n_layers)]
    with FlopCounterMode(display=False) as flops, model.hooks(fwd_hooks=hooks):
        model(tokens)
    return flops.get_total_flops() / len(tokens)


@torch.no_grad()
def seconds_per_sentence(model: LegoTransformer, tokens: torch.Tensor, rounds: int) -> float:
    model(tokens)  # warm-up
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        model(tokens)
        best = min(best, time.perf_counter() - started)
    return best / len(tokens)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hardcoded", type=HardcodedHeads(), default=("association", "manipulation"),
                        help="the first heads' patterns, comma-separated; the other heads are learned")
    parser.add_argument("--tokens", type=int, default=None, help="sentence length (default: each preset's n_ctx)")
    parser.add_argument("--batch-size", type=int, default=256, help="sentences per timed forward pass")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"{'preset':<14}{'tokens':>7}{'heads':>7}{'learned MFLOP':>15}{'fixed MFLOP':>13}{'ratio':>7}"
          f"{'all fixed':>11}{'ratio':>7}")
    for name, preset in PRESETS.items():
        task = LegoTask(preset.task_config())
        cfg = preset.model_config(task)
        learned, fixed = forward_flops(cfg, args.tokens), forward_flops(with_heads(cfg, args.hardcoded), args.tokens)
        every = forward_flops(with_heads(cfg, ("manipulation",) * cfg.n_heads), args.tokens)
        print(f"{name:<14}{args.tokens or cfg.n_ctx:>7}{cfg.n_heads:>7}{learned / 1e6:>15.2f}{fixed / 1e6:>13.2f}"
              f"{fixed / learned:>7.3f}{every / 1e6:>11.2f}{every / learned:>7.3f}")

    task = LegoTask(PRESETS["tiny"].task_config())
    tokens = task.sample(args.batch_size, torch.Generator().manual_seed(0)).tokens
    print(f"\ntiny shape, {args.batch_size} sentences of {task.n_ctx} tokens, {torch.get_num_threads()} threads: "
          f"analytic vs FlopCounterMode, and forward wall time")
    base = PRESETS["tiny"].model_config(task)
    for label, cfg in (("learned", base), (",".join(k or "-" for k in with_heads(base, args.hardcoded).hardcoded),
                                           with_heads(base, args.hardcoded))):
        torch.manual_seed(0)
        model = LegoTransformer(cfg).eval()
        analytic, measured = forward_flops(cfg), counted(model, tokens[:8])
        print(f"{label:<32} analytic {analytic / 1e6:8.2f} M  counted {measured / 1e6:8.2f} M "
              f"({measured / analytic - 1:+.2%})  {seconds_per_sentence(model, tokens, args.rounds) * 1e6:8.1f} us/sentence")


if __name__ == "__main__":
    main()

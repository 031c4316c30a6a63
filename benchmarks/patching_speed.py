"""Exact activation patching: legointerp's (cached layers, stacked variants) against transformer_lens.patching on
the exported TransformerBridge, same inputs and metric, side by side in one run; and attribution patching.

    python benchmarks/patching_speed.py [--ckpt model.pt] [--samples 8]
"""

from __future__ import annotations

import argparse
import time

import torch
import transformer_lens.patching as tl_patching

from legointerp.checkpoint import load_model
from legointerp.evaluate import test_batch
from legointerp.hooked import to_bridge
from legointerp.patching import attribution, flip_sign, normalised_metric, patch_head_z, patch_resid_pre


def timed(work):
    started = time.perf_counter()
    result = work()
    return result, time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", default=None)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--depth", type=int, default=3)
    args = parser.parse_args()
    model, task, _ = load_model(args.ckpt)
    bridge = to_bridge(model)
    pair = flip_sign(task, test_batch(task, args.samples, seed=0), args.depth)
    metric = normalised_metric(model, pair)
    _, clean_cache = bridge.run_with_cache(pair.clean.tokens)
    print(f"{torch.get_num_threads()} threads, {args.samples} sentences, flip the operator at depth {args.depth}")
    rows = [
        ("resid_pre", lambda: patch_resid_pre(model, pair, metric),
         lambda: tl_patching.get_act_patch_resid_pre(bridge, pair.corrupted.tokens, clean_cache, metric)),
        ("head z by position", lambda: patch_head_z(model, pair, metric),
         lambda: tl_patching.get_act_patch_attn_head_out_by_pos(bridge, pair.corrupted.tokens, clean_cache, metric)),
    ]
    exact_seconds = 0.0
    for name, ours, theirs in rows:
        (ours_result, ours_s), (theirs_result, theirs_s) = timed(ours), timed(theirs)
        exact_seconds += ours_s
        difference = (ours_result - theirs_result).abs().max().item()
        print(f"{name:<20} legointerp {ours_s:7.2f} s   TransformerLens {theirs_s:7.2f} s   "
              f"speed-up {theirs_s / ours_s:5.1f}x   max |difference| {difference:.1e}")
    (resid, heads), attribution_s = timed(lambda: attribution(model, pair, metric))
    print(f"attribution (all sites) {attribution_s:7.3f} s: {exact_seconds / attribution_s:6.0f}x faster than exact patching")


if __name__ == "__main__":
    main()

"""Exact activation patching: legointerp's (runs start at the patched layer, every variant of a layer in one batch,
the last block only at the read-out) against transformer_lens.patching on the exported TransformerBridge, same
inputs and metric; the median of ``--repeats`` runs per side, the share of the fp32 matmul peak; and the attribution
estimates with their agreement.

    python benchmarks/patching_speed.py [--ckpt model.pt] [--samples 8] [--repeats 3] [--sites resid_pre,head_z]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformer_lens.patching as tl_patching

from legointerp.checkpoint import load_model
from legointerp.evaluate import test_batch
from legointerp.hooked import to_bridge
from legointerp.patching import (PatchingResult, attribution, flip_sign, normalised_metric, patch_head_z,
                                 patch_resid_pre)
from predict_speed import forward_flops, matmul_peak


def timed(work, repeats: int):
    """The result of ``work`` and the median of ``repeats`` wall times."""
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = work()
        seconds.append(time.perf_counter() - started)
    return result, statistics.median(seconds)


def patched_flops(model, pair, site: str) -> float:
    """FLOPs legointerp's exact patching runs: for each site where the clean and corrupted runs differ, one sentence
    batch through the blocks after the patch (resid_pre: from its layer; head z: from the next one)."""
    (B, T), n = pair.clean.tokens.shape, pair.clean.clause_pos.shape[1]
    hook = "hook_resid_pre" if site == "resid_pre" else "attn.hook_z"
    caches = [model.run_with_cache(run.tokens, names_filter=lambda name: name.endswith(hook))[1]
              for run in (pair.clean, pair.corrupted)]
    total = 0.0
    for layer, name in enumerate(caches[0].keys()):
        changed = int((caches[0][name] != caches[1][name]).flatten(2).any(-1).any(0).sum())
        remaining = model.cfg.n_layers - layer - (site != "resid_pre")
        total += changed * B * forward_flops(model.cfg, T, n, layers=remaining)
    return total


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", default=None)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sites", default="resid_pre,head_z")
    args = parser.parse_args()
    model, task, _ = load_model(args.ckpt)
    bridge = to_bridge(model)
    pair = flip_sign(task, test_batch(task, args.samples, seed=0), args.depth)
    metric = normalised_metric(model, pair)
    _, clean_cache = bridge.run_with_cache(pair.clean.tokens)
    peak = matmul_peak()
    print(f"{torch.get_num_threads()} threads, {args.samples} sentences, flip the operator at depth {args.depth}, "
          f"median of {args.repeats} runs; fp32 matmul peak {peak / 1e9:.0f} GFLOP/s")
    rows = {
        "resid_pre": (patch_resid_pre, tl_patching.get_act_patch_resid_pre),
        "head_z": (patch_head_z, tl_patching.get_act_patch_attn_head_out_by_pos),
    }
    exact = {}
    for site in args.sites.split(","):
        ours, theirs = rows[site]
        ours_result, ours_s = timed(lambda: ours(model, pair, metric), args.repeats)
        theirs_result, theirs_s = timed(lambda: theirs(bridge, pair.corrupted.tokens, clean_cache, metric), args.repeats)
        exact[site] = ours_result
        share = patched_flops(model, pair, site) / ours_s / peak
        print(f"{site:<10} legointerp {ours_s:7.2f} s ({share:4.0%} of peak)   TransformerLens {theirs_s:7.2f} s   "
              f"speed-up {theirs_s / ours_s:5.1f}x   max |difference| {(ours_result - theirs_result).abs().max().item():.1e}")
    if set(exact) == set(rows):
        for steps in (1, 4, 8):
            (resid, heads), seconds = timed(lambda: attribution(model, pair, metric, steps=steps), 1)
            result = PatchingResult("", [], exact["resid_pre"], resid, exact["head_z"], heads, steps)
            agreement = ", ".join(f"{row.site} Pearson {row.pearson:.2f} Spearman {row.spearman:.2f}"
                                  for row in result.agreements.itertuples())
            print(f"attribution, {steps} step(s): {seconds:6.2f} s; agreement with exact: {agreement}")


if __name__ == "__main__":
    main()

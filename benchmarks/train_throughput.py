"""Training throughput: legointerp's encoder against transformers.BertForTokenClassification at the same shape.

Both are built locally (no hub download), trained on the same LEGO batches with the same loss (cross-entropy at
each clause's first token) and AdamW, alternating in one run so that machine noise hits both alike.

    python benchmarks/train_throughput.py [--preset tiny] [--device cpu] [--steps 20]
    python benchmarks/train_throughput.py --preset bert-paper --estimate-only   # analytic FLOPs and memory only

The first line is the analytic cost of the preset (``legointerp.train.training_cost``): FLOPs per sentence and
the peak memory of a step at the preset's batch size, under bf16 autocast as on CUDA.
"""

from __future__ import annotations

import argparse
import time

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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3, help="alternate the two models this many times")
    parser.add_argument("--estimate-only", action="store_true", help="print the analytic cost and stop")
    args = parser.parse_args()
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

"""Training: presets, the loop (CPU, CUDA with bf16 autocast, DDP under torchrun), exact resume.

Every step draws its batch from a generator seeded by (seed, step, rank), so the data stream is a
pure function of the step: resuming from a checkpoint replays exactly the batches an uninterrupted
run would have seen, and on the CPU ends with identical weights.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from legointerp.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from legointerp.evaluate import accuracy_by_position, clause_logits, test_batch
from legointerp.model import ConfigError, LegoTransformer, ModelConfig
from legointerp.patterns import association_mask, manipulation_mask, row_normalised
from legointerp.task import LegoBatch, LegoTask, TaskConfig, supervision_mask


@dataclass
class TrainConfig:
    # task
    group: str = "task1"
    n: int = 12
    n_tr: int | None = None  # supervise the first n_tr chain positions (None: all)
    supervised: tuple[int, ...] | None = None  # or exactly these chain positions
    min_length: int | None = None  # mix chain lengths uniformly in [min_length, longest]
    curriculum: bool = False  # grow the longest chain from curriculum_start to n as training sentences are solved
    curriculum_start: int = 2
    curriculum_threshold: float = 0.98  # running fraction of training sentences solved that admits a longer chain
    # model
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 12
    d_mlp: int = 256
    tied: bool = True
    min_depth: int | None = None
    # optimisation
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 200
    decay: float = 0.2  # fraction of the steps over which the learning rate decays at the end
    batch_size: int = 128
    steps: int = 10_000
    mimic_steps: int = 0  # the paper's mimicking: pull heads 0/1 towards association/manipulation first
    target_accuracy: float | None = None  # stop early once every chain position reaches this test accuracy
    seed: int = 0
    device: str = "auto"
    # bookkeeping
    eval_every: int = 250
    eval_size: int = 2000
    save_every: int = 1000

    def task_config(self) -> TaskConfig:
        return TaskConfig(group=self.group, n=self.n)

    def model_config(self, task: LegoTask) -> ModelConfig:
        return ModelConfig(d_vocab=task.d_vocab, d_vocab_out=task.n_classes, n_ctx=task.n_ctx, d_model=self.d_model,
                           n_heads=self.n_heads, n_layers=self.n_layers, d_mlp=self.d_mlp, tied=self.tied,
                           min_depth=self.min_depth)

    def loss_mask(self) -> torch.Tensor:
        return supervision_mask(self.n, self.n_tr, list(self.supervised) if self.supervised is not None else None)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        config = cls(**{k: v for k, v in d.items() if k in known})
        return replace(config, supervised=tuple(config.supervised) if config.supervised is not None else None)


PRESETS: dict[str, TrainConfig] = {
    # the bundled model: a CPU run
    "tiny": TrainConfig(min_length=1, curriculum=True, mimic_steps=1000, warmup=100, steps=12_000,
                        target_accuracy=0.995),
    # the paper's setting (n=12, n_tr=6), sized for a GPU: BERT-base-like width, batch as the authors' code
    "bert-paper": TrainConfig(n_tr=6, d_model=768, n_heads=12, n_layers=12, d_mlp=3072, tied=False, lr=5e-5,
                              warmup=1000, batch_size=1000, steps=40_000, eval_every=500, save_every=2000),
    "albert-paper": TrainConfig(n_tr=6, d_model=768, n_heads=12, n_layers=12, d_mlp=3072, tied=True, lr=5e-5,
                                warmup=1000, batch_size=1000, steps=40_000, eval_every=500, save_every=2000),
}


def log_path(checkpoint_path: Path) -> Path:
    """Per-position test accuracy at every evaluation, one JSON object per line, beside the checkpoint."""
    return checkpoint_path.with_suffix(".log.jsonl")


def read_log(checkpoint_path: str | os.PathLike) -> list[dict]:
    path = log_path(Path(checkpoint_path))
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is visible: use --device cpu or auto")
    if name.split(":")[0] not in ("cpu", "cuda"):
        raise ConfigError(f"unknown device {name!r}: use cpu, cuda or auto")
    return torch.device(name)


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1009 + rank) % (2**63))


def learning_rate(config: TrainConfig, step: int) -> float:
    """Warmup-stable-decay: linear warmup, constant while the curriculum climbs, cosine to a tenth over the last
    ``decay`` fraction of the steps."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    decay_start = config.steps * (1 - config.decay)
    progress = min(1.0, max(0.0, step - decay_start) / max(1.0, config.steps - decay_start))
    return config.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def mimicking_loss(patterns: list[torch.Tensor], batch: LegoBatch, task: LegoTask) -> torch.Tensor:
    """Cross-entropy from the association (head 0) and manipulation (head 1) targets to each layer's pattern.
    patterns: list of (B, H, T, T)."""
    is_variable = batch.tokens >= task.variable_offset
    targets = [association_mask(batch.tokens, is_variable), manipulation_mask(batch.tokens)]
    total = 0.0
    for head, mask in enumerate(targets):
        rows = mask.any(-1)
        target = row_normalised(mask)
        for pattern in patterns:
            nll = -(target * pattern[:, head].clamp_min(1e-9).log()).sum(-1)
            total = total + (nll * rows).sum() / rows.sum().clamp(min=1)
    return total / (len(targets) * len(patterns))


class Trainer:
    def __init__(self, config: TrainConfig, out: str | os.PathLike, resume: bool = False, progress: bool = True,
                 command: str | None = None):
        self.config, self.out, self.progress = config, Path(out), progress
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        self.device = resolve_device(config.device)
        if self.world > 1:
            if self.device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        if config.batch_size % self.world:
            raise ConfigError(f"batch_size={config.batch_size} must divide evenly over {self.world} processes")
        self.task = LegoTask(config.task_config())
        self.loss_mask = config.loss_mask().to(self.device)
        torch.manual_seed(config.seed)
        self.model = LegoTransformer(config.model_config(self.task)).to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.step, self.elapsed = 0, 0.0
        self.longest = config.curriculum_start if config.curriculum else config.n
        self.solved_rate = 0.0  # running mean of training sentences fully solved, drives the curriculum
        self.provenance = {"command": command or " ".join(sys.argv), "seed": config.seed, "torch": str(torch.__version__)}
        if resume:
            self._resume()
        elif self.rank == 0:
            log_path(self.out).unlink(missing_ok=True)
        self.ddp = (torch.nn.parallel.DistributedDataParallel(self.model) if self.world > 1 else None)
        self.test = test_batch(self.task, config.eval_size, seed=config.seed + 7919)

    def _resume(self):
        checkpoint = load_checkpoint(self.out)
        if checkpoint.train_state is None:
            raise ConfigError(f"{self.out} holds no training state to resume from: train without --resume")
        saved = TrainConfig.from_dict(checkpoint.train_config)
        if replace(saved, steps=self.config.steps, device=self.config.device) != self.config:
            raise ConfigError(f"{self.out} was trained with other options; --resume may only change --steps and --device "
                              "(drop the other options to continue that run)")
        self.model.load_state_dict(checkpoint.state_dict)
        self.optimizer.load_state_dict(checkpoint.train_state["optimizer"])
        state = checkpoint.train_state
        self.step, self.elapsed = state["step"], state["elapsed"]
        self.longest, self.solved_rate = state["longest"], state["solved_rate"]
        # a resumed run is reproduced by its whole history of commands, not by the last one
        self.provenance["command"] = f"{checkpoint.command} && {self.provenance['command']}"

    def train_step(self) -> float:
        config, model = self.config, self.ddp or self.model
        generator = step_generator(config.seed, self.step, self.rank)
        shortest = None if config.min_length is None else min(config.min_length, self.longest)
        batch = self.task.sample(config.batch_size // self.world, generator, n=self.longest, min_length=shortest)
        batch = batch.to(self.device)
        depth = self.model.sample_depth(generator)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(config, self.step)
        patterns: list[torch.Tensor] = []
        hooks = ([(f"blocks.{layer}.attn.hook_pattern", lambda p, hook: patterns.append(p)) for layer in range(depth)]
                 if self.step < config.mimic_steps else [])
        with self.model.hooks(fwd_hooks=hooks), torch.autocast(self.device.type, torch.bfloat16,
                                                                enabled=self.device.type == "cuda"):
            logits = clause_logits(model(batch.tokens, batch.attention_mask, depth), batch).float()
            supervised = batch.valid & self.loss_mask[: self.longest]
            weight = supervised.float()
            loss = (F.cross_entropy(logits.transpose(1, 2), batch.values, reduction="none") * weight).sum() / weight.sum().clamp(min=1)
            if patterns:
                loss = loss + mimicking_loss([p.float() for p in patterns], batch, self.task)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.step += 1
        if config.curriculum:
            self._advance_curriculum(((logits.argmax(-1) == batch.values) | ~supervised).all(1))
        return loss.item()

    def _advance_curriculum(self, solved: torch.Tensor) -> None:
        """Admit chains one clause longer once the running rate of solved training sentences passes the threshold.
        With DDP the rate is averaged over processes so that every rank grows the same curriculum."""
        rate = solved.float().mean()
        if self.world > 1:
            dist.all_reduce(rate)
            rate /= self.world
        self.solved_rate = 0.95 * self.solved_rate + 0.05 * float(rate)
        if self.solved_rate >= self.config.curriculum_threshold and self.longest < self.config.n:
            self.longest += 1
            self.solved_rate = 0.0

    def evaluate(self) -> list[float]:
        return [round(a, 5) for a in accuracy_by_position(self.model, self.test).tolist()]

    def checkpoint(self, accuracy: list[float] | None) -> Checkpoint:
        return Checkpoint(model_config=self.model.cfg, task_config=self.task.config, state_dict=self.model.state_dict(),
                          train_config=self.config.to_dict(),
                          train_state={"optimizer": self.optimizer.state_dict(), "step": self.step, "elapsed": self.elapsed,
                                       "longest": self.longest, "solved_rate": self.solved_rate},
                          accuracy=accuracy, provenance=self.provenance)

    def _reached_target(self, accuracy: list[float] | None) -> bool:
        """Whether every position reached the target; rank 0 decides for all processes."""
        target = self.config.target_accuracy
        reached = torch.tensor(float(target is not None and accuracy is not None and min(accuracy) >= target),
                               device=self.device)
        if self.world > 1:
            dist.broadcast(reached, src=0)
        return bool(reached)

    def _log(self, loss: float, accuracy: list[float]):
        row = {"step": self.step, "samples": self.step * self.config.batch_size, "elapsed_s": round(self.elapsed, 2),
               "loss": round(loss, 5), "longest_chain": self.longest, "accuracy": accuracy}
        with log_path(self.out).open("a") as f:
            f.write(json.dumps(row) + "\n")

    def fit(self) -> Checkpoint:
        """Train to ``config.steps``; Ctrl-C saves a resumable checkpoint before stopping."""
        config, leader = self.config, self.rank == 0
        bar = tqdm(total=config.steps, initial=self.step, disable=not (self.progress and leader), unit="step",
                   dynamic_ncols=True)
        accuracy, loss = None, float("nan")
        try:
            while self.step < config.steps:
                started = time.perf_counter()
                loss = self.train_step()
                self.elapsed += time.perf_counter() - started
                bar.update(1)
                if self.step % config.eval_every == 0 or self.step == config.steps:
                    if leader:
                        accuracy = self.evaluate()
                        self._log(loss, accuracy)
                        bar.set_postfix(loss=f"{loss:.3f}", longest=self.longest, min_acc=f"{min(accuracy):.3f}")
                    if self._reached_target(accuracy):
                        break
                if leader and self.step % config.save_every == 0 and self.step < config.steps:
                    save_checkpoint(self.checkpoint(accuracy), self.out)
        except KeyboardInterrupt:
            if leader:
                save_checkpoint(self.checkpoint(accuracy), self.out)
                bar.write(f"interrupted at step {self.step}: saved {self.out}; continue with --resume")
            raise
        finally:
            bar.close()
        final = self.checkpoint(self.evaluate() if leader else None)
        if leader:
            save_checkpoint(final, self.out)
        if self.world > 1:
            dist.barrier()
        return final


def train(config: TrainConfig, out: str | os.PathLike, resume: bool = False, progress: bool = True) -> Checkpoint:
    return Trainer(config, out, resume=resume, progress=progress).fit()

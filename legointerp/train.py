"""Training: presets, the loop (CPU, CUDA with bf16 autocast, DDP under torchrun), exact resume.

Every step draws its batch from a generator seeded by (seed, step, rank) and its stochastic depth from
(seed, step), so the data stream is a pure function of the step and the process count: resuming from a
checkpoint replays exactly the batches, depths, curriculum and learning rates an uninterrupted run would
have seen.  On the CPU the resumed run ends with bit-identical weights and log.  On CUDA the stream is the
same but GPU kernels (atomic adds in the backward pass, bf16 autocast) are not bit-deterministic, so weights
agree to rounding, not bit for bit.  Resume refuses a different process count, which would change the stream.
Ctrl-C and SIGTERM (preemption) stop every process at the same step boundary and save first.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from legointerp.checkpoint import Checkpoint, load_checkpoint, resolve, save_checkpoint
from legointerp.errors import LegoInterpError
from legointerp.evaluate import accuracy_by_position, clause_logits, test_batch
from legointerp.files import OutputLock, atomic_write, check_not_shipped, prepare_output, remove_stale_temps
from legointerp.model import ConfigError, LegoTransformer, ModelConfig, forward_flops
from legointerp.options import check_train_config, resolve_device
from legointerp.patterns import association_mask, manipulation_mask, row_normalised
from legointerp.pretrained import MINILM_SHAPE, load_minilm
from legointerp.task import PAD, LegoBatch, LegoTask, TaskConfig, supervision_mask


@dataclass
class TrainConfig:
    # task
    group: str = "task1"
    n: int = 12
    surface: str = "legointerp"  # or "official": the official code's sentences (task.TaskConfig)
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
    hardcoded: tuple[str | None, ...] = ()  # per head index: a fixed pattern (model.HARDCODED) or None (learned)
    norm: str = "pre"  # LayerNorm placement: "pre" (GPT-2-like) or "post" (BERT/ALBERT)
    d_embed: int | None = None  # ALBERT's factorised embedding width (post-LN only; None: d_model)
    identity_attention: bool = False  # +aI/+bI: two trainable scalars per head (model.Attention)
    init: str = "random"  # or "minilm": all-MiniLM-L6-v2's encoder (pretrained.load_minilm), its shape by default
    # optimisation
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 200
    decay: float = 0.2  # fraction of the steps over which the learning rate decays at the end
    batch_size: int = 128
    steps: int = 10_000
    mimic_steps: int = 0  # the paper's mimicking: pull heads 0/1 towards association/manipulation first
    mimic: str = "ours"  # or "official": the official code's targets and loss (official_mimicking_loss)
    mimic_data: str = "lego"  # or "random": mimic on random token ids, as the paper's section 4.2.2 (official loss only)
    target_accuracy: float | None = None  # stop early once every chain position reaches this test accuracy
    seed: int = 0
    device: str = "auto"
    # bookkeeping
    eval_every: int = 250
    eval_size: int = 2000
    save_every: int = 1000
    snapshots: int = 0  # keep this many weight-only checkpoints along the run, log-spaced (OUT.snapshots/)
    snapshot_every: int | None = None  # or one every this many steps (linear spacing)

    def __post_init__(self):
        if self.init == "minilm":
            # shape fields left at their defaults take MiniLM's; check_train_config names any other value
            defaults = {f.name: f.default for f in fields(self)}
            for name, value in MINILM_SHAPE.items():
                if getattr(self, name) == defaults[name]:
                    setattr(self, name, value)
        check_train_config(self)

    def task_config(self) -> TaskConfig:
        return TaskConfig(group=self.group, n=self.n, surface=self.surface)

    def model_config(self, task: LegoTask) -> ModelConfig:
        return ModelConfig(d_vocab=task.d_vocab, d_vocab_out=task.n_classes, n_ctx=task.n_ctx, d_model=self.d_model,
                           n_heads=self.n_heads, n_layers=self.n_layers, d_mlp=self.d_mlp, tied=self.tied,
                           min_depth=self.min_depth, hardcoded=self.hardcoded, variable_offset=task.variable_offset,
                           norm=self.norm, d_embed=self.d_embed, identity_attention=self.identity_attention)

    def loss_mask(self) -> torch.Tensor:
        return supervision_mask(self.n, self.n_tr, list(self.supervised) if self.supervised is not None else None)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        config = cls(**{k: v for k, v in d.items() if k in known})
        return replace(config, supervised=tuple(config.supervised) if config.supervised is not None else None,
                       hardcoded=tuple(config.hardcoded))


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


@dataclass(frozen=True)
class TrainingCost:
    """Analytic cost of a training step of a config (bf16 autocast, as on CUDA), from the shapes alone."""

    flops_per_sentence: float  # forward + backward matmul FLOPs (backward = 2x forward; no recomputation)
    parameters: int
    state_bytes: int  # fp32 weights, gradients and both AdamW moments, plus autocast's bf16 copy of the weights
    activation_bytes_per_sentence: int  # tensors saved for the backward pass
    batch_size: int

    @property
    def peak_bytes(self) -> int:
        """State plus one batch's saved activations; the backward pass's short-lived buffers come on top."""
        return self.state_bytes + self.batch_size * self.activation_bytes_per_sentence


def training_cost(config: TrainConfig) -> TrainingCost:
    """FLOPs and memory of ``config``'s training step.  Per token and layer, the bytes saved for backward are
    the two LayerNorm inputs (fp32: 8 D) and their statistics (16), the bf16 casts of both normalised inputs
    (4 D), q, k and v (6 D), the attention output (2 D) and its log-sum-exp (4 per head), the MLP's pre- and
    post-GELU (4 d_mlp); after the last layer, the final LayerNorm's input and its bf16 cast (6 D).
    tests/test_train.py checks both counts against torch's own on the CPU."""
    task = LegoTask(config.task_config())
    T, D, M, H, L = task.n_ctx, config.d_model, config.d_mlp, config.n_heads, config.n_layers
    model_config = config.model_config(task)
    parameters = sum(p.numel() for p in LegoTransformer(model_config).parameters())
    return TrainingCost(flops_per_sentence=3 * forward_flops(model_config), parameters=parameters,
                        state_bytes=18 * parameters, activation_bytes_per_sentence=T * (L * (20 * D + 4 * M + 4 * H + 16) + 6 * D),
                        batch_size=config.batch_size)


def log_path(checkpoint_path: Path) -> Path:
    """Per-position test accuracy at every evaluation, one JSON object per line, beside the checkpoint."""
    return checkpoint_path.with_suffix(".log.jsonl")


def read_log(checkpoint: str | os.PathLike, missing_ok: bool = False) -> list[dict]:
    """The training log beside ``checkpoint`` (a path, or ``bundled`` / ``bundled-shortcut``), one dict per evaluation.
    A missing log raises, naming where it was looked for, unless ``missing_ok`` (then: no rows)."""
    path = log_path(resolve(checkpoint))
    if not path.is_file():
        if missing_ok:
            return []
        raise LegoInterpError(f"no training log at {path}: 'legointerp train' writes it beside the checkpoint "
                              "(model.pt -> model.log.jsonl); pass missing_ok=True to go on without one")
    rows = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise LegoInterpError(f"{path} line {number} is not JSON (a truncated write?): delete that line or the "
                                      "log to go on") from None
    return rows


def snapshot_folder(checkpoint_path: Path) -> Path:
    """Where a run keeps its snapshots, beside the checkpoint: model.pt -> model.snapshots/ (index.jsonl, step-*.pt)."""
    return checkpoint_path.with_suffix(".snapshots")


def snapshot_steps(config: TrainConfig) -> list[int]:
    """The steps after which a snapshot is kept: every ``snapshot_every`` steps, or ``snapshots`` steps log-spaced from
    0 (the initialisation) to ``steps``, because mechanisms form early (a short run may get fewer distinct steps); the
    last step always.  Empty without snapshots."""
    if config.snapshot_every:
        chosen = range(0, config.steps + 1, config.snapshot_every)
    elif config.snapshots:
        exponents = np.arange(1, config.snapshots) / max(1, config.snapshots - 1)
        chosen = ([0] if config.snapshots > 1 else []) + np.round(config.steps ** exponents).tolist()
    else:
        return []
    return sorted({int(step) for step in chosen} | {config.steps})


def synchronize(device: torch.device) -> None:
    """Wait until ``device`` has run what was queued on it (nothing to wait for on the CPU), so that a clock read
    next measures the work and not just its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1009 + rank) % (2**63))


def depth_generator(seed: int, step: int) -> torch.Generator:
    """The stochastic depth of a step, a function of (seed, step) alone: every rank runs the same depth, as one
    GPU would, and no rank waits for a deeper one."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step]).generate_state(1, np.uint64)[0] >> 1))


def fine_tuning_start(config: TrainConfig) -> int:
    """The step where the task's training starts afresh: after the official mimicking, a pre-training of its own
    (the official code fine-tunes in a separate run, with a new optimizer and schedule), else 0."""
    return config.mimic_steps if config.mimic == "official" else 0


def learning_rate(config: TrainConfig, step: int) -> float:
    """Warmup-stable-decay: linear warmup, constant while the curriculum climbs, cosine to a tenth over the last
    ``decay`` fraction of the steps; restarted at ``fine_tuning_start``."""
    start = fine_tuning_start(config) if step >= fine_tuning_start(config) else 0
    step, steps = step - start, config.steps - start
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    decay_start = steps * (1 - config.decay)
    progress = min(1.0, max(0.0, step - decay_start) / max(1.0, steps - decay_start))
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


OFFICIAL_BAND = (1.0, 2.0, 4.0, 2.0, 1.0)  # head 0's target weights on keys i-2..i+2


def official_mimicking_loss(patterns: list[torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """The official code's mimicking loss (mimicking_experiments/pretrain_mimic.py): head 0 towards the band
    ``OFFICIAL_BAND`` around each query (itself included), head 1 towards every other occurrence of the query's
    token id (all tokens, ``=`` and ``,`` too), each pattern and target +1e-3 and row-normalised, KL(pattern ||
    target) averaged over queries, summed over heads and layers.  patterns: list of (B, H, T, T); tokens: (B, T).
    Padding (absent from the official data) is left out of keys and queries, so unpadded batches match it exactly."""
    B, T = tokens.shape
    real = tokens != PAD
    position = torch.arange(T, device=tokens.device)
    offset = position[None, :] - position[:, None]  # (T, T) key - query
    band = torch.tensor(OFFICIAL_BAND).to(tokens.device)[(offset + 2).clamp(0, 4)] * (offset.abs() <= 2)
    same = (tokens[:, :, None] == tokens[:, None, :]) & ~torch.eye(T, dtype=torch.bool, device=tokens.device)
    keys = real[:, None, :].expand(B, T, T)
    queries = real.sum()  # the KL's mean over real queries, by a sum: boolean indexing would make the host wait

    def smoothed(pattern: torch.Tensor) -> torch.Tensor:
        """(B, T, T) distribution over real keys; 1 at padded keys, where 1 log 1 adds nothing to the KL, and no NaN
        to its gradient."""
        pattern = (pattern + 1e-3) * keys
        return torch.where(keys, pattern / pattern.sum(-1, keepdim=True), 1.0)

    total = 0.0
    for head, target in enumerate([smoothed(band.expand(B, T, T)), smoothed(same.float())]):
        for pattern in patterns:
            p = smoothed(pattern[:, head])
            total = total + torch.where(real, (p * (p.log() - target.log())).sum(-1), 0.0).sum() / queries
    return total


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
CURRICULUM_EVERY = 8  # steps between the curriculum's decisions (a running rate needs >= 77 steps to pass 0.98)


class Interrupted(KeyboardInterrupt):
    """Training stopped by SIGINT or SIGTERM at a step boundary, after a resumable checkpoint was saved."""

    def __init__(self, signum: int, step: int, checkpoint: Checkpoint):
        super().__init__(f"{signal.Signals(signum).name} at step {step}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


class _StopRequests:
    """While active, SIGINT and SIGTERM only record their number, so that they take effect at the next step
    boundary, never inside ``optimizer.step`` or a save (a half-updated model cannot be resumed exactly)."""

    def __init__(self):
        self.signum, self.previous = 0, {}

    def _record(self, signum, frame) -> None:
        self.signum = self.signum or signum

    def __enter__(self) -> "_StopRequests":
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
            self.previous = {s: signal.signal(s, self._record) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def claim_output(out: Path, resume: bool, force: bool) -> OutputLock:
    """Refuse an --out that would destroy work or could never be loaded, make its folder, and lock it.
    Temp files that a killed save left beside it are removed (safe only now that no one else writes there)."""
    check_not_shipped(out, flag="--out")
    if log_path(out).is_dir():
        raise ConfigError(f"--out {out} keeps its training log in {log_path(out)}, which is a folder: move that folder "
                          "away or pick another --out")
    if resume and not out.is_file():
        raise ConfigError(f"--resume found no checkpoint at {out}: point --out at the checkpoint of the run to "
                          "continue, or start a new run without --resume")
    if not resume and out.exists() and not force and not out.is_dir():
        raise ConfigError(f"{out} already exists: add --resume to continue its run, --force to replace it, "
                          "or pick another --out")
    lock = OutputLock(prepare_output(out))  # a run still before its first save holds it too
    for path in (out, log_path(out)):
        remove_stale_temps(path)
    return lock


def _alias_key(t: torch.Tensor) -> tuple:
    """Equal for two tensors that are views of the same memory with the same layout (weight-tied aliases)."""
    return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device


def cpu_state_dict(state: dict[str, torch.Tensor], copy=lambda t: t.detach().cpu()) -> dict[str, torch.Tensor]:
    """``state`` copied with ``copy`` (default: to the CPU) once per tensor, so that weight-tied aliases stay
    aliases and ``torch.save`` writes each tied tensor once (``.cpu()`` per entry would copy a CUDA alias 12 times)."""
    copies: dict[tuple, torch.Tensor] = {}
    for t in state.values():
        if _alias_key(t) not in copies:
            copies[_alias_key(t)] = copy(t)
    return {name: copies[_alias_key(t)] for name, t in state.items()}


class Trainer:
    """One training run writing ``out``.  Under torchrun every process builds one; rank 0 checks and locks ``out``,
    evaluates, logs and saves, and every rank raises the same error if ``out`` is refused."""

    def __init__(self, config: TrainConfig, out: str | os.PathLike, resume: bool = False, progress: bool = True,
                 command: str | None = None, force: bool = False, compile: bool | None = None):
        self.config, self.out, self.progress = config, Path(out), progress
        self.device = resolve_device(config.device)
        self.owns_group = int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized()
        if self.owns_group:
            if self.device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        # stop requests and answer counts are agreed on the CPU (gloo), so agreeing never waits for the GPU
        self.host_group = dist.new_group(backend="gloo") if self.world > 1 and self.device.type == "cuda" else None
        if config.batch_size % self.world:
            raise ConfigError(f"batch_size={config.batch_size} must divide evenly over {self.world} processes")
        self.lock = self._on_every_rank(lambda: claim_output(self.out, resume, force))
        # a replaced run's log stays until this run's first save, so a run that dies early destroys nothing
        self.log_live = resume or not self.out.exists()
        self.task = LegoTask(config.task_config())
        self.loss_mask = config.loss_mask()
        torch.manual_seed(config.seed)
        self.model = LegoTransformer(config.model_config(self.task)).to(self.device)
        if config.init == "minilm" and not resume:
            load_minilm(self.model, self.task)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.step, self.elapsed, self.saved_step = 0, 0.0, None
        self.longest = config.curriculum_start if config.curriculum else config.n
        # running mean of training sentences fully solved, which drives the curriculum: () on the device, read by the
        # host only every CURRICULUM_EVERY steps
        self.solved_rate = torch.zeros((), device=self.device)
        self.rows: list[dict] = []  # the log, also kept in the checkpoint: the file is rebuilt from it on resume
        self.provenance = {"command": command or " ".join(sys.argv), "seed": config.seed, "torch": str(torch.__version__)}
        self.snapshot_plan = snapshot_steps(config)
        self.snapshot_rows: list[dict] = []  # the snapshot index, also kept in the checkpoint for --resume
        if resume:
            self._resume()
        self.ddp = (torch.nn.parallel.DistributedDataParallel(self.model) if self.world > 1 else None)
        self.forward = self.ddp or self.model
        if self.device.type == "cuda" if compile is None else compile:
            # each block on its own: one graph serves every block of every depth (stochastic depth, a tied model's
            # repeats), where compiling the model would trace one graph per depth, past dynamo's limit of 8
            for block in self.model.blocks:
                block.compile()
        self.test = test_batch(self.task, config.eval_size, seed=config.seed + 7919)

    def _on_every_rank(self, claim):
        """Run ``claim`` on rank 0 and return its result there; if it raises, every rank raises the same error
        (a rank left waiting in a collective would hang under NCCL)."""
        result, error = None, None
        if self.rank == 0:
            try:
                result = claim()
            except LegoInterpError as err:
                error = err
        if self.world > 1:
            shared = [error]
            dist.broadcast_object_list(shared, src=0)
            error = shared[0]
        if error is not None:
            raise error
        return result

    def _resume(self):
        checkpoint = load_checkpoint(self.out)
        if checkpoint.train_state is None:
            raise ConfigError(f"{self.out} holds no training state to resume from: train without --resume")
        saved = TrainConfig.from_dict(checkpoint.train_config)
        if replace(saved, steps=self.config.steps, device=self.config.device) != self.config:
            raise ConfigError(f"{self.out} was trained with other options; --resume may only change --steps and --device "
                              "(drop the other options to continue that run)")
        state = checkpoint.train_state
        if self.config.steps < state["step"]:
            raise ConfigError(f"--steps {self.config.steps} is below the {state['step']} steps {self.out} has already "
                              f"trained: give --steps {state['step'] + 1} or more to continue it")
        world = state.get("world_size")  # absent in checkpoints older than this check
        if world is not None and world != self.world:
            how = f"torchrun --nproc_per_node {world}" if world > 1 else "one process (without torchrun)"
            raise ConfigError(f"{self.out} was trained on {world} process(es), this run has {self.world}: each step's "
                              f"data depends on the process count, so resume it with {how}")
        self.model.load_state_dict(checkpoint.state_dict)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.elapsed = state["step"], state["elapsed"]
        self.longest, self.solved_rate = state["longest"], torch.tensor(state["solved_rate"]).to(self.device)
        self.saved_step = self.step
        # rows logged after the last save (a killed run) are dropped: the resumed run logs those steps again
        self.rows = state.get("log") or [row for row in read_log(self.out, missing_ok=True) if row["step"] <= self.step]
        # the schedule the run started with, so that a longer --steps adds only its own last step
        if self.snapshot_plan:
            self.snapshot_plan = sorted(set(state.get("snapshot_plan", self.snapshot_plan)) | {self.config.steps})
        self.snapshot_rows = state.get("snapshots", [])
        if self.rank == 0:
            self._write_log()
            self._write_snapshot_index()
        # a resumed run is reproduced by its whole history of commands, not by the last one
        self.provenance["command"] = f"{checkpoint.command} && {self.provenance['command']}"

    def train_step(self) -> torch.Tensor:
        """One optimizer step on this rank's share of the step's batch.  Returns the loss unread: reading it
        would make the host wait for the GPU."""
        config = self.config
        shortest = None if config.min_length is None else min(config.min_length, self.longest)
        generator = step_generator(config.seed, self.step, self.rank)
        batch = self.task.sample(config.batch_size // self.world, generator, n=self.longest, min_length=shortest)
        if self.step < config.mimic_steps and config.mimic_data == "random":
            # the paper mimics "without access to pretraining data": random ids in LEGO's shape, no padding
            batch = replace(batch, tokens=torch.randint(PAD + 1, self.task.d_vocab, batch.tokens.shape, generator=generator))
        depth = self.model.sample_depth(depth_generator(config.seed, self.step))
        supervised = batch.valid & self.loss_mask[: self.longest]
        # the loss is the mean over every supervised answer of the step on all ranks, not a mean of per-rank
        # means; DDP averages gradients over ranks, hence the division by count / world
        count = supervised.sum().float()
        if self.world > 1:
            dist.all_reduce(count, group=self.host_group)
        padded = not bool(batch.attention_mask.all())  # read on the CPU batch: free, where the GPU's would sync
        batch, supervised = batch.to(self.device), supervised.to(self.device)
        if self.step == fine_tuning_start(config) > 0:
            self.optimizer.state.clear()  # Adam's moments of the mimicking loss would steer the task's first steps
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(config, self.step)
        patterns: list[torch.Tensor] = []
        hooks = ([(f"blocks.{layer}.attn.hook_pattern", lambda p, hook: patterns.append(p)) for layer in range(depth)]
                 if self.step < config.mimic_steps else [])
        # the official mimicking loss reads the patterns alone: the last MLP and the unembedding get no gradient, which
        # DDP cannot see (find_unused_parameters walks the graph from the logits, which use them), so those steps
        # average the gradients that exist by hand and leave the others None, as one process does
        by_hand = self.ddp is not None and hooks and config.mimic == "official"
        # the mimicking steps' hooks, closures new every step, would recompile the blocks every step: they run eager
        with torch.compiler.set_stance("force_eager") if hooks else contextlib.nullcontext(), \
                self.ddp.no_sync() if by_hand else contextlib.nullcontext(), self.model.hooks(fwd_hooks=hooks), \
                torch.autocast("cuda", torch.bfloat16) if self.device.type == "cuda" else contextlib.nullcontext():
            out = self.forward(batch.tokens, n_layers=depth, padded=padded)
            logits = clause_logits(out, batch).float()
            nll = F.cross_entropy(logits.transpose(1, 2), batch.values, reduction="none")
            loss = (nll * supervised.float()).sum() / (max(float(count), 1.0) / self.world)
            if patterns:  # the official code mimics with no task loss, then fine-tunes
                patterns = [p.float() for p in patterns]
                loss = (official_mimicking_loss(patterns, batch.tokens) if config.mimic == "official"
                        else loss + mimicking_loss(patterns, batch, self.task))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        if by_hand:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            flat = torch.cat([g.flatten() for g in grads])
            dist.all_reduce(flat)
            for g, averaged in zip(grads, torch._utils._unflatten_dense_tensors(flat / self.world, grads)):
                g.copy_(averaged)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        if config.curriculum and self.longest < config.n:
            self._advance_curriculum(((logits.argmax(-1) == batch.values) | ~supervised).all(1))
        self.step += 1  # last, so that every field of the state describes the same step
        return loss.detach()

    def _advance_curriculum(self, solved: torch.Tensor) -> None:
        """Update the running rate of solved training sentences (on the device; with DDP averaged over processes, so
        that every rank grows the same curriculum) and, every ``CURRICULUM_EVERY`` steps, admit chains one clause
        longer if it passed the threshold.  The next batch's shape depends on that decision, so reading the rate is
        a wait for the device: the only one of the loop, once every ``CURRICULUM_EVERY`` steps while the curriculum
        grows, where every step would leave the device idle at each launch.  solved: (B,) bool."""
        rate = solved.float().mean()
        if self.world > 1:
            dist.all_reduce(rate)
            rate /= self.world
        self.solved_rate = 0.95 * self.solved_rate + 0.05 * rate
        if (self.step + 1) % CURRICULUM_EVERY == 0 and float(self.solved_rate) >= self.config.curriculum_threshold:
            self.longest += 1
            self.solved_rate = torch.zeros_like(self.solved_rate)

    def _agreed_stop(self, signum: int) -> int:
        """The stop request of any rank (0: none), so that all ranks stop at the same step boundary."""
        if self.world == 1:
            return signum
        flag = torch.tensor([signum])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.host_group)
        return int(flag)

    def evaluate(self) -> list[float]:
        return [round(a, 5) for a in accuracy_by_position(self.model, self.test).tolist()]

    def checkpoint(self, accuracy: list[float] | None) -> Checkpoint:
        return Checkpoint(model_config=self.model.cfg, task_config=self.task.config,
                          state_dict=cpu_state_dict(self.model.state_dict()), train_config=self.config.to_dict(),
                          train_state={"optimizer": self.optimizer.state_dict(), "step": self.step, "elapsed": self.elapsed,
                                       "longest": self.longest, "solved_rate": float(self.solved_rate),
                                       "world_size": self.world, "log": self.rows,
                                       "snapshot_plan": self.snapshot_plan, "snapshots": self.snapshot_rows},
                          accuracy=accuracy, provenance=self.provenance)

    def _reached_target(self, accuracy: list[float] | None) -> bool:
        """Whether every position reached the target; rank 0 decides for all processes."""
        target = self.config.target_accuracy
        reached = torch.tensor(float(target is not None and accuracy is not None and min(accuracy) >= target),
                               device=self.device)
        if self.world > 1:
            dist.broadcast(reached, src=0)
        return bool(reached)

    def _write_log(self) -> None:
        text = "".join(json.dumps(row) + "\n" for row in self.rows)
        atomic_write(log_path(self.out), lambda f: f.write(text.encode()))

    def _log(self, loss: float, accuracy: list[float]) -> None:
        self.rows.append({"step": self.step, "samples": self.step * self.config.batch_size,
                          "elapsed_s": round(self.elapsed, 2), "loss": round(loss, 5), "longest_chain": self.longest,
                          "accuracy": accuracy, "threads": torch.get_num_threads()})  # a log is bit-exact per thread count
        if self.log_live:
            self._write_log()

    def _snapshot(self, accuracy: list[float]) -> None:
        """A weight-only checkpoint of this step (no optimizer state) in the run's snapshot folder, and its index row."""
        name = f"step-{self.step:07d}.pt"
        samples = self.step * self.config.batch_size
        save_checkpoint(Checkpoint(model_config=self.model.cfg, task_config=self.task.config,
                                   state_dict=cpu_state_dict(self.model.state_dict()), train_config=self.config.to_dict(),
                                   accuracy=accuracy, provenance={**self.provenance,
                                                                  "snapshot": {"step": self.step, "samples": samples}}),
                        snapshot_folder(self.out) / name)
        self.snapshot_rows.append({"step": self.step, "samples": samples, "elapsed_s": round(self.elapsed, 2),
                                   "accuracy": accuracy, "file": name})
        self._write_snapshot_index()

    def _write_snapshot_index(self) -> None:
        """index.jsonl lists exactly this run's snapshots; snapshot files it does not list (a replaced run's, or steps
        a killed run took after its last save, which the resumed run takes again) are removed."""
        folder = snapshot_folder(self.out)
        if not self.snapshot_rows and not folder.is_dir():
            return
        folder.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(row) + "\n" for row in self.snapshot_rows)
        atomic_write(folder / "index.jsonl", lambda f: f.write(text.encode()))
        listed = {row["file"] for row in self.snapshot_rows}
        for stale in folder.glob("step-*.pt"):
            if stale.name not in listed:
                stale.unlink()

    def _snapshot_due(self, last: bool = False) -> bool:
        """Whether this step's snapshot is still to take: a planned step, or (``last``) the step the run ends at."""
        planned = bool(self.snapshot_plan) if last else self.step in self.snapshot_plan
        return planned and not (self.snapshot_rows and self.snapshot_rows[-1]["step"] == self.step)

    def _save(self, checkpoint: Checkpoint) -> None:
        """The checkpoint, then the log it holds (a kill in between leaves a log that --resume rebuilds), and the
        snapshot index (a replaced run without snapshots leaves none of the old run's behind its checkpoint)."""
        save_checkpoint(checkpoint, self.out)
        self.saved_step, self.log_live = self.step, True
        self._write_log()
        self._write_snapshot_index()

    def _close_group(self) -> None:
        """Close the process group this trainer opened, once every rank has left its last collective.  Without this a
        rank that exits first closes connections a slower rank is still reading the end of that collective from, and
        gloo aborts the slow rank (SIGABRT, and torchrun then stops the others).  The ranks agree through the
        rendezvous store, which is not one of the connections being closed."""
        if not self.owns_group:
            return
        store = dist.distributed_c10d._get_default_store()
        store.add("legointerp/left", 1)
        while store.add("legointerp/left", 0) < self.world:
            time.sleep(0.01)
        dist.destroy_process_group()

    def fit(self) -> Checkpoint:
        """Train to ``config.steps``.  SIGINT (Ctrl-C) or SIGTERM on any rank stops every rank at the same step
        boundary; rank 0 saves a resumable checkpoint and :class:`Interrupted` is raised on every rank."""
        config, leader = self.config, self.rank == 0
        bar = tqdm(total=config.steps, initial=self.step, disable=not (self.progress and leader), unit="step",
                   dynamic_ncols=True)
        accuracy = self.rows[-1]["accuracy"] if self.rows else None
        try:
            with _StopRequests() as requests:
                stop = 0
                if leader and self._snapshot_due():  # step 0: the initialisation
                    self._snapshot(self.evaluate())
                while self.step < config.steps and not (stop := self._agreed_stop(requests.signum)):
                    started = time.perf_counter()
                    loss = self.train_step()
                    if (self.step % config.eval_every == 0 or self.step % config.save_every == 0
                            or self.step in self.snapshot_plan or self.step == config.steps):
                        synchronize(self.device)  # the elapsed_s it records: compute time, not launch time
                    self.elapsed += time.perf_counter() - started
                    bar.update(1)
                    if self.step % config.eval_every == 0 or self.step == config.steps:
                        if leader:
                            accuracy = self.evaluate()
                            self._log(float(loss), accuracy)
                            bar.set_postfix(loss=f"{float(loss):.3f}", longest=self.longest, min_acc=f"{min(accuracy):.3f}")
                        if self._reached_target(accuracy):
                            break
                    if leader and self._snapshot_due():
                        self._snapshot(accuracy if self.rows and self.rows[-1]["step"] == self.step else self.evaluate())
                    if leader and self.step % config.save_every == 0 and self.step < config.steps:
                        self._save(self.checkpoint(accuracy))
                if leader and not stop and not (self.rows and self.rows[-1]["step"] == self.step):
                    accuracy = self.evaluate()
                if leader and not stop and self._snapshot_due(last=True):
                    self._snapshot(accuracy)  # the model the run ends with, also when the target stopped it early
                final = self.checkpoint(accuracy)
                if leader and self.saved_step != self.step:
                    self._save(final)
                if self.world > 1:
                    dist.barrier()
                    self._close_group()
        finally:
            bar.close()
            if self.lock is not None:
                self.lock.release()
        if stop:
            raise Interrupted(stop, self.step, final)
        return final


def train(config: TrainConfig, out: str | os.PathLike, resume: bool = False, progress: bool = True,
          force: bool = False) -> Checkpoint:
    return Trainer(config, out, resume=resume, progress=progress, force=force).fit()

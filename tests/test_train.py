import copy
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from legointerp import cli
from legointerp import train as train_module
from legointerp.checkpoint import bundled_path, load_checkpoint, save_checkpoint
from legointerp.errors import LegoInterpError
from legointerp.evaluate import clause_logits
from legointerp.files import OutputLock
from legointerp.model import ConfigError, LegoTransformer
from legointerp.task import LegoBatch, LegoTask, TaskConfig
from legointerp.train import (CURRICULUM_EVERY, PRESETS, Interrupted, TrainConfig, Trainer, cpu_state_dict, depth_generator,
                              learning_rate, log_path, official_mimicking_loss, read_log, train, training_cost)
from tests.conftest import small_model

TINY = TrainConfig(n=4, d_model=16, n_heads=2, n_layers=2, d_mlp=32, batch_size=16, steps=8, warmup=2, eval_every=4,
                   eval_size=64, save_every=4, device="cpu", mimic_steps=3, min_length=1, curriculum=True,
                   curriculum_threshold=1e-9)


def without_time(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in rows]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted run of TINY: its final weights and log."""
    out = tmp_path_factory.mktemp("straight") / "model.pt"
    return train(TINY, out, progress=False).state_dict, without_time(read_log(out))


def test_training_writes_checkpoint_and_per_position_log(tmp_path):
    checkpoint = train(TINY, tmp_path / "model.pt", progress=False)
    log = read_log(tmp_path / "model.pt")
    assert [row["step"] for row in log] == [4, 8]
    assert all(len(row["accuracy"]) == 4 for row in log)
    loaded = load_checkpoint(tmp_path / "model.pt")
    assert loaded.accuracy == checkpoint.accuracy and loaded.train_state["step"] == 8
    assert loaded.train_state["log"] == log  # the checkpoint holds the log it was saved with
    assert "seed" in loaded.provenance and "command" in loaded.provenance


def signal_on_call(monkeypatch, owner, name: str, call: int, signum=signal.SIGINT):
    """Make the ``call``-th call of ``owner.name`` send ``signum`` to this process from inside that call."""
    original, calls = getattr(owner, name), []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signum)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapped)


# where a signal lands (owner, attribute, calls during a run before its last step): inside the optimizer step,
# the forward pass, the periodic save's torch.save, an evaluation, a log write
PLACES = [(torch.optim.AdamW, "step", 7), (LegoTransformer, "forward", 8), (torch, "save", 1), (Trainer, "evaluate", 1),
          (train_module, "atomic_write", 2)]


@pytest.mark.parametrize("place", range(len(PLACES)), ids=["optimizer.step", "forward", "save", "evaluate", "log"])
def test_a_signal_anywhere_stops_at_a_step_boundary_and_resume_is_bit_identical(tmp_path, monkeypatch, straight, place):
    owner, name, calls = PLACES[place]
    call = random.Random(place).randint(1, calls)
    signum = (signal.SIGINT, signal.SIGTERM)[place % 2]
    with monkeypatch.context() as patch:
        signal_on_call(patch, owner, name, call, signum)
        with pytest.raises(Interrupted) as stop:
            train(TINY, tmp_path / "m.pt", progress=False)
    assert stop.value.signum == signum and 0 < stop.value.step < TINY.steps
    saved = load_checkpoint(tmp_path / "m.pt")
    assert saved.train_state["step"] == stop.value.step
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    resumed = train(TINY, tmp_path / "m.pt", resume=True, progress=False)
    weights, log = straight
    assert all(torch.equal(value, resumed.state_dict[key]) for key, value in weights.items())
    assert without_time(read_log(tmp_path / "m.pt")) == log
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_kill_inside_a_save_keeps_the_previous_checkpoint_and_resume_drops_the_later_log_rows(tmp_path, monkeypatch, straight):
    original, saves = torch.save, []

    def killed_in_second_save(*args, **kwargs):  # what SIGKILL or a second Ctrl-C does: no cleanup by the trainer
        saves.append(1)
        if len(saves) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", killed_in_second_save)
        with pytest.raises(KeyboardInterrupt):
            train(TINY, tmp_path / "m.pt", progress=False)
    assert load_checkpoint(tmp_path / "m.pt").train_state["step"] == 4
    assert [row["step"] for row in read_log(tmp_path / "m.pt")] == [4, 8]  # logged live, past the checkpoint
    stale = tmp_path / ".m.pt.abc123.tmp"  # as a SIGKILLed save leaves it
    stale.write_bytes(b"half a checkpoint")
    resumed = train(TINY, tmp_path / "m.pt", resume=True, progress=False)
    assert not stale.exists() and not list(tmp_path.glob(".*.tmp"))
    assert without_time(read_log(tmp_path / "m.pt")) == straight[1]
    assert all(torch.equal(value, resumed.state_dict[key]) for key, value in straight[0].items())


def test_refuses_outputs_that_would_lose_work_before_any_training(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for reserved in ("bundled", "bundled-shortcut"):
        with pytest.raises(LegoInterpError, match="shipped with legointerp"):
            Trainer(TINY, reserved, progress=False)
    with pytest.raises(LegoInterpError, match="data folder"):
        Trainer(TINY, bundled_path(), progress=False)
    with pytest.raises(LegoInterpError, match="data folder"):
        Trainer(TINY, bundled_path().with_name("new.pt"), force=True, progress=False)
    assert not bundled_path().with_name("new.pt").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(LegoInterpError, match="is a file"):
        Trainer(TINY, tmp_path / "file" / "m.pt", progress=False)
    with pytest.raises(LegoInterpError, match="is a folder"):
        Trainer(TINY, tmp_path, progress=False)
    with pytest.raises(ConfigError, match="--resume found no checkpoint") as error:
        Trainer(TINY, tmp_path / "missing.pt", resume=True, progress=False)
    assert "--ckpt" not in str(error.value)
    Trainer(TINY, tmp_path / "new" / "dir" / "m.pt", progress=False)
    assert (tmp_path / "new" / "dir").is_dir()


def test_an_existing_checkpoint_is_replaced_only_with_force_and_kept_if_that_run_dies(tmp_path, monkeypatch):
    out = tmp_path / "m.pt"
    train(replace(TINY, steps=4), out, progress=False)
    before, log_before = out.read_bytes(), log_path(out).read_text()
    with pytest.raises(ConfigError, match="already exists: add --resume .* --force"):
        Trainer(TINY, out, progress=False)

    def dies_at_step_2(self):
        if self.step == 2:
            raise RuntimeError("out of memory")
        return step(self)

    step = Trainer.train_step
    monkeypatch.setattr(Trainer, "train_step", dies_at_step_2)
    with pytest.raises(RuntimeError):
        train(replace(TINY, eval_every=1, save_every=100), out, force=True, progress=False)
    assert out.read_bytes() == before and log_path(out).read_text() == log_before  # evaluated at step 1, not logged


def test_a_second_run_on_the_same_output_is_refused_while_the_first_runs(tmp_path):
    first = Trainer(TINY, tmp_path / "m.pt", progress=False)
    with pytest.raises(LegoInterpError, match=f"being written by another running process \\(pid {os.getpid()}\\)"):
        Trainer(TINY, tmp_path / "m.pt", progress=False)
    first.fit()
    Trainer(TINY, tmp_path / "m.pt", resume=True, progress=False)  # the lock went with the run


def test_a_lock_left_by_a_killed_process_is_stale(tmp_path):
    (tmp_path / ".m.pt.lock").write_text("99999999")  # the kernel dropped its flock when that process died
    with OutputLock(tmp_path / "m.pt") as lock:
        assert lock.path.read_text() == str(os.getpid())


def test_ctrl_c_with_json_keeps_stdout_one_document(tmp_path, monkeypatch, capsys):
    signal_on_call(monkeypatch, torch.optim.AdamW, "step", 3)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--quiet", "--format", "json", "--out", str(tmp_path / "m.pt"), "--length", "4",
                  "--d-model", "16", "--n-heads", "2", "--n-layers", "2", "--d-mlp", "32", "--batch-size", "16",
                  "--steps", "8", "--eval-every", "2", "--eval-size", "32", "--device", "cpu", "--mimic-steps", "0"])
    out, err = capsys.readouterr()
    assert exit_.value.code == 128 + signal.SIGINT
    assert json.loads(out) == {"checkpoint": str(tmp_path / "m.pt"), "steps": 3, "interrupted": "SIGINT",
                               "accuracy": read_log(tmp_path / "m.pt")[-1]["accuracy"]}
    assert "stopped by SIGINT at step 3" in err and "--resume" in err


def test_curriculum_grows_only_when_training_sentences_are_solved(tmp_path):
    always = Trainer(TINY, tmp_path / "a.pt", progress=False)
    never = Trainer(replace(TINY, curriculum_threshold=1.0), tmp_path / "b.pt", progress=False)
    for step in range(1, 3 * CURRICULUM_EVERY):
        always.train_step(), never.train_step()
        # a decision every CURRICULUM_EVERY steps, one clause at a time, up to n
        assert always.longest == min(TINY.n, TINY.curriculum_start + step // CURRICULUM_EVERY)
    assert never.longest == TINY.curriculum_start == 2
    assert read_log(tmp_path / "a.pt", missing_ok=True) == []


def test_resume_refuses_a_different_run_or_process_count(tmp_path):
    checkpoint = train(replace(TINY, steps=4), tmp_path / "m.pt", progress=False)
    with pytest.raises(ConfigError, match="other options"):
        Trainer(replace(TINY, lr=0.5), tmp_path / "m.pt", resume=True, progress=False)
    checkpoint.train_state["world_size"] = 4
    save_checkpoint(checkpoint, tmp_path / "m.pt")
    with pytest.raises(ConfigError, match="trained on 4 process.*torchrun --nproc_per_node 4"):
        Trainer(TINY, tmp_path / "m.pt", resume=True, progress=False)


def test_tied_weights_are_copied_once_and_stay_aliases(task):
    model = small_model(task, tied=True)
    copies = []
    state = cpu_state_dict(model.state_dict(), copy=lambda t: copies.append(t) or t.clone())
    assert len(copies) == len({id(p) for p in model.parameters()})
    assert state["blocks.2.attn.W_Q"] is state["blocks.0.attn.W_Q"]
    assert state["blocks.0.attn.W_Q"].data_ptr() != model.blocks[0].attn.W_Q.data_ptr()


def test_bf16_autocast_keeps_the_sublayers_in_bf16(task):
    model = small_model(task)
    names = ["attn.hook_q", "attn.hook_z", "mlp.hook_pre", "mlp.hook_post", "hook_attn_out", "hook_mlp_out",
             "hook_resid_post"]
    dtypes = {}

    def record(x, hook):
        dtypes[hook.name.split(".", 2)[2]] = x.dtype

    hooks = [(f"blocks.1.{name}", record) for name in names]
    tokens = task.sample(4, torch.Generator().manual_seed(0)).tokens
    with torch.autocast("cpu", torch.bfloat16):
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
    assert {name: dtypes[name] for name in names[:-1]} == {name: torch.bfloat16 for name in names[:-1]}
    assert dtypes["hook_resid_post"] == torch.float32  # the residual stream keeps full precision
    assert logits.dtype == torch.bfloat16


def test_training_cost_matches_torchs_flop_count_and_saved_tensors():
    config = replace(TINY, n=12, d_model=64, n_heads=4, n_layers=2, d_mlp=256, tied=False, min_depth=None)
    cost = training_cost(config)
    task = LegoTask(config.task_config())
    model = LegoTransformer(config.model_config(task)).train()
    assert cost.parameters == sum(p.numel() for p in model.parameters())

    def step(size: int, materialise: bool) -> tuple[float, int]:
        """FLOPs and bytes saved for backward; attention materialised (so that FlopCounterMode counts its matmuls,
        which it does not in the CPU's fused kernel) or fused (as it runs in training)."""
        batch, saved = task.sample(size, torch.Generator().manual_seed(0)), {}
        hooks = [(f"blocks.{layer}.attn.hook_pattern", lambda p, hook: None)
                 for layer in range(config.n_layers)] if materialise else []
        pack = lambda t: saved.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) and t
        with FlopCounterMode(display=False) as flops, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast("cpu", torch.bfloat16), model.hooks(fwd_hooks=hooks):
                logits = clause_logits(model(batch.tokens), batch).float()
            F.cross_entropy(logits.transpose(1, 2), batch.values).backward()
        return flops.get_total_flops(), sum(saved.values())

    # differences between two batch sizes: what is per sentence, without the weights' own bf16 copies
    assert (step(16, True)[0] - step(8, True)[0]) / 8 == pytest.approx(cost.flops_per_sentence, rel=0.01)
    assert (step(16, False)[1] - step(8, False)[1]) / 8 == pytest.approx(cost.activation_bytes_per_sentence, rel=0.05)
    bert = training_cost(PRESETS["bert-paper"])
    assert 25e9 < bert.flops_per_sentence < 40e9 and bert.peak_bytes < 80e9  # fits an 80 GB GPU at batch 1000


def test_compile_runs_each_block_through_torch_compile_with_the_same_result(tmp_path, monkeypatch):
    config = replace(TINY, steps=3, mimic_steps=0, curriculum=False, min_length=None)
    eager = train(config, tmp_path / "eager.pt", progress=False)
    compiled, compile_ = [], torch.compile

    def aot_eager(forward):  # the same tracing and autograd graph as inductor, without its slow CPU code generation
        compiled.append(forward.__self__)
        return compile_(forward, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", aot_eager)
    trainer = Trainer(config, tmp_path / "compiled.pt", compile=True, progress=False)
    assert compiled == list(trainer.model.blocks)
    result = trainer.fit()
    assert all(torch.equal(value, result.state_dict[key]) for key, value in eager.state_dict.items())
    assert not Trainer(config, tmp_path / "cpu.pt", progress=False).model.blocks[0]._compiled_call_impl  # CPU: off


def test_compiled_stochastic_depth_and_curriculum_stop_compiling_once_each_shape_kind_is_seen(tmp_path, monkeypatch):
    """One graph serves every depth and every block: after the first steps (masked or not, then lengths made
    dynamic) no step compiles again, whatever its depth or chain length, well inside dynamo's recompile limit;
    the mimicking steps run eager rather than compile their hooks."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter, compile_ = CompileCounter(), torch.compile
    monkeypatch.setattr(torch, "compile", lambda forward: compile_(forward, backend=counter))
    config = replace(TINY, n=5, n_layers=4, min_depth=1, tied=True, mimic_steps=2, steps=100)
    trainer = Trainer(config, tmp_path / "m.pt", compile=True, progress=False)
    depths, lengths = set(), set()
    for _ in range(2 + CURRICULUM_EVERY):
        trainer.train_step()
    warm = counter.frame_count
    while trainer.step < 2 + 3 * CURRICULUM_EVERY:
        depths.add(trainer.model.sample_depth(depth_generator(config.seed, trainer.step)))
        lengths.add(trainer.longest)
        trainer.train_step()
    assert counter.frame_count == warm < torch._dynamo.config.recompile_limit
    assert depths == set(range(1, 5)) and len(lengths) > 2  # every depth, and chains that grew after the warm-up
    torch._dynamo.reset()


def test_the_clock_is_read_after_the_device_finishes_at_every_step_it_records(tmp_path, monkeypatch):
    """elapsed_s is what logs, checkpoints and snapshots record: those steps wait for the device before reading the
    clock (the others do not, which would leave it idle at every launch)."""
    config = replace(TINY, steps=8, eval_every=3, save_every=4, snapshot_every=5, mimic_steps=0)
    trainer = Trainer(config, tmp_path / "m.pt", progress=False)
    waited = []
    monkeypatch.setattr(train_module, "synchronize", lambda device: waited.append((trainer.step, device)))
    trainer.fit()
    assert waited == [(step, trainer.device) for step in (3, 4, 5, 6, 8)]


def test_supervision_only_trains_the_chosen_positions(tmp_path):
    config = replace(TINY, supervised=(0, 3), mimic_steps=0, min_length=None)
    trainer = Trainer(config, tmp_path / "s.pt", progress=False)
    assert trainer.loss_mask.nonzero().flatten().tolist() == [0, 3]


def test_schedule_warms_up_holds_then_decays():
    config = replace(TINY, lr=1.0, warmup=4, steps=100, decay=0.2)
    rates = [learning_rate(config, s) for s in range(100)]
    assert rates[0] < rates[3] == pytest.approx(1.0) and max(rates) <= 1.0
    assert rates[4:81] == [1.0] * 77 and rates[-1] < 0.11


def test_presets_are_valid_configs():
    from legointerp.task import LegoTask

    for name, preset in PRESETS.items():
        task = LegoTask(preset.task_config())
        preset.model_config(task)
        assert preset.loss_mask().sum() >= 1, name
    assert PRESETS["bert-paper"].n_tr == 6 and not PRESETS["bert-paper"].tied and PRESETS["albert-paper"].tied


def test_cuda_requested_without_gpu_is_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ConfigError, match="no CUDA"):
        Trainer(replace(TINY, device="cuda"), tmp_path / "x.pt", progress=False)


# ---------------------------------------------------------------------------- DDP with gloo on the CPU
DDP = replace(TINY, tied=True, n_layers=3, min_depth=1, mimic_steps=2)


def _concat(batches: list[LegoBatch]) -> LegoBatch:
    return LegoBatch(**{k: torch.cat([getattr(b, k) for b in batches]) for k in batches[0].__dict__})


def _ddp_worker(rank: int, world: int, folder: str) -> None:
    """Every DDP check in one process group (a group costs seconds to start): results go to rank{r}.pt."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    seen = {"depth": [], "tokens": []}
    forward = LegoTransformer.forward

    def recording(self, tokens, attention_mask=None, n_layers=None, start_at_layer=None, **kwargs):
        if self.training:
            seen["depth"].append(n_layers)
            seen["tokens"].append(tokens.clone())
        return forward(self, tokens, attention_mask, n_layers, start_at_layer, **kwargs)

    LegoTransformer.forward = recording
    straight = Trainer(DDP, f"{folder}/a.pt", progress=False).fit()
    LegoTransformer.forward = forward
    # rank 1 alone is signalled, inside its optimizer step: both ranks must stop after that step
    interrupted = Trainer(DDP, f"{folder}/b.pt", progress=False)
    if rank == 1:
        step = interrupted.optimizer.step

        def signalled(*args, **kwargs):
            if interrupted.step == 5:
                os.kill(os.getpid(), signal.SIGTERM)
            return step(*args, **kwargs)

        interrupted.optimizer.step = signalled
    try:
        interrupted.fit()
        stopped = None
    except Interrupted as stop:
        stopped = stop.step
    resumed = Trainer(DDP, f"{folder}/b.pt", resume=True, progress=False).fit()
    # one step's gradient equals that of the global mean loss over both ranks' answers
    trainer = Trainer(replace(DDP, curriculum=False, mimic_steps=0), f"{folder}/g.pt", progress=False)
    before, captured, sample = copy.deepcopy(trainer.model), [], trainer.task.sample
    trainer.task.sample = lambda *args, **kwargs: captured.append(sample(*args, **kwargs)) or captured[-1]
    trainer.train_step()
    batches = [None] * world
    dist.all_gather_object(batches, captured[0])
    batch = _concat(batches)
    supervised = batch.valid & trainer.loss_mask
    depth = before.sample_depth(depth_generator(DDP.seed, 0))
    logits = clause_logits(before(batch.tokens, batch.attention_mask, depth), batch)
    loss = (F.cross_entropy(logits.transpose(1, 2), batch.values, reduction="none") * supervised).sum() / supervised.sum()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(before.parameters(), 1.0)
    gradient_error = max((a.grad - b.grad).abs().max().item() for a, b in zip(before.parameters(), trainer.model.parameters()))
    torch.save({"straight": straight.state_dict, "resumed": resumed.state_dict, "stopped": stopped,
                "depth": seen["depth"], "tokens": seen["tokens"], "gradient_error": gradient_error},
               f"{folder}/rank{rank}.pt")
    dist.destroy_process_group()


def test_ddp_with_two_gloo_processes(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, value in ranks[0]["straight"].items():  # weights equal across ranks
        assert torch.equal(value, ranks[1]["straight"][name]), name
    assert ranks[0]["depth"] == ranks[1]["depth"] and len(set(ranks[0]["depth"])) > 1  # one depth per step, all ranks
    assert all(not torch.equal(a, b) for a, b in zip(ranks[0]["tokens"], ranks[1]["tokens"]))  # distinct data
    assert ranks[0]["stopped"] == ranks[1]["stopped"] == 6  # rank 1's SIGTERM in step 5 stopped both after it
    for rank in ranks:
        for name, value in ranks[0]["straight"].items():  # resumed under DDP: bit-identical
            assert torch.equal(value, rank["resumed"][name]), name
        assert rank["gradient_error"] < 1e-6
    assert without_time(read_log(tmp_path / "b.pt")) == without_time(read_log(tmp_path / "a.pt"))


def test_ctrl_c_under_torchrun_stops_every_rank_saves_and_resumes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "ddp.pt"

    def torchrun(*extra):
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", cli.__file__,
                "train", "--quiet", "--out", str(out), "--length", "4", "--d-model", "16", "--n-heads", "2",
                "--n-layers", "2", "--d-mlp", "32", "--batch-size", "16", "--eval-every", "2", "--eval-size", "32",
                "--save-every", "1000000", "--device", "cpu", "--format", "json", *extra]

    run = subprocess.Popen(torchrun("--steps", "1000000"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=env, start_new_session=True)
    deadline = time.monotonic() + 240
    while not log_path(out).exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(run.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: every process of the group gets it
    stdout, stderr = run.communicate(timeout=120)
    document = json.loads(stdout)
    assert document["interrupted"] == "SIGINT", stderr[-2000:]
    steps = document["steps"]
    assert load_checkpoint(out).train_state["step"] == steps and "Connection closed" not in stderr
    result = subprocess.run(torchrun("--steps", str(steps + 2), "--resume"), capture_output=True, text=True, env=env,
                            timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["steps"] == steps + 2
    logged = [row["step"] for row in read_log(out)]
    assert logged == sorted(set(logged)) and logged[-1] == steps + 2


def test_official_mimicking_trains_under_torchrun(tmp_path):
    """Its loss leaves the unembedding and the last layer's MLP without a gradient; DDP must expect that (it raised
    'Expected to have finished reduction' at step 2), and the run goes on into the task loss after the mimicking."""
    out = tmp_path / "mimic.pt"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             cli.__file__, "train", "--quiet", "--out", str(out), "--length", "4", "--d-model", "16",
                             "--n-heads", "2", "--n-layers", "2", "--d-mlp", "32", "--batch-size", "8", "--steps", "4",
                             "--mimic-steps", "2", "--mimic", "official", "--eval-every", "2", "--eval-size", "16",
                             "--device", "cpu", "--format", "json"],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["steps"] == 4 and load_checkpoint(out).train_state["step"] == 4


def test_read_log_names_a_missing_or_truncated_log(tmp_path):
    with pytest.raises(LegoInterpError, match="no training log at"):
        read_log(tmp_path / "m.pt")
    assert read_log(tmp_path / "m.pt", missing_ok=True) == []
    log_path(tmp_path / "m.pt").write_text('{"step": 1, "samples": 8, "accuracy": [0.5]}\n{"step": 2, "sam')
    with pytest.raises(LegoInterpError, match="line 2 is not JSON"):
        read_log(tmp_path / "m.pt")
    assert read_log("bundled") == read_log(bundled_path()) != []


def official_loss_by_entry(patterns: list[torch.Tensor], tokens: torch.Tensor) -> float:
    """The official mimicking loss written out one attention row at a time, for unpadded tokens (B, T)."""
    band = {-2: 1.0, -1: 2.0, 0: 4.0, 1: 2.0, 2: 1.0}
    B, T = tokens.shape
    smooth = lambda row: [(x + 1e-3) / sum(y + 1e-3 for y in row) for x in row]
    total = 0.0
    for head in (0, 1):
        for pattern in patterns:
            kls = []
            for b in range(B):
                for i in range(T):
                    target = smooth([band.get(j - i, 0.0) if head == 0 else float(i != j and tokens[b, i] == tokens[b, j])
                                     for j in range(T)])
                    p = smooth(pattern[b, head, i].tolist())
                    kls.append(sum(pj * math.log(pj / tj) for pj, tj in zip(p, target)))
            total += sum(kls) / len(kls)
    return total


def test_official_mimicking_loss_is_kl_to_the_band_and_same_token_targets():
    task = LegoTask(TaskConfig(n=3, surface="official"))
    tokens = task.sample(3, torch.Generator().manual_seed(0)).tokens
    patterns = [torch.randn(3, 2, 17, 17, generator=torch.Generator().manual_seed(layer)).softmax(-1) for layer in range(2)]
    assert official_mimicking_loss(patterns, tokens).item() == pytest.approx(official_loss_by_entry(patterns, tokens),
                                                                             rel=1e-5)


def test_official_mimicking_loss_vanishes_at_its_targets_and_ignores_padding():
    task = LegoTask(TaskConfig(n=5, surface="official"))
    batch = task.sample(32, torch.Generator().manual_seed(1), min_length=2)
    T = batch.tokens.shape[1]
    # the targets themselves as patterns: the official code's smoothing of both sides leaves only a small remainder
    real = batch.attention_mask
    offset = torch.arange(T)[None, :] - torch.arange(T)[:, None]
    band = torch.tensor([1.0, 2, 4, 2, 1])[(offset + 2).clamp(0, 4)] * (offset.abs() <= 2) * real[:, None, :]
    same = (batch.tokens[:, :, None] == batch.tokens[:, None, :]) & ~torch.eye(T, dtype=torch.bool) & real[:, None, :]
    targets = torch.stack([band, same.float() + 1e-3 * real[:, None, :]], 1)
    targets = targets / targets.sum(-1, keepdim=True)
    uniform = real[:, None, None, :] / real.sum(-1)[:, None, None, None]
    at_target = official_mimicking_loss([targets], batch.tokens)
    assert 0 <= at_target < 0.01 * official_mimicking_loss([uniform.expand_as(targets)], batch.tokens)
    scrambled = targets.clone()
    scrambled[~real[:, None, :, None].expand_as(targets)] = 0.5  # padded queries' rows
    assert official_mimicking_loss([scrambled], batch.tokens) == at_target
    scores = torch.randn(32, 2, T, T).masked_fill(~real[:, None, None, :], -torch.inf).requires_grad_()
    official_mimicking_loss([scores.softmax(-1)], batch.tokens).backward()
    assert torch.isfinite(scores.grad).all() and scores.grad.abs().sum() > 0
    assert official_mimicking_loss([targets, targets.roll(1, -1)], batch.tokens) > 10 * at_target  # every layer counts


@pytest.mark.parametrize("mimic", ["ours", "official"])
def test_official_mimicking_trains_attention_alone_then_fine_tunes(tmp_path, mimic):
    config = replace(TINY, surface="official", mimic=mimic, mimic_steps=2, curriculum=False, min_length=None)
    trainer = Trainer(config, tmp_path / "m.pt", progress=False)
    unembed = trainer.model.unembed.W_U.detach().clone()
    trainer.train_step(), trainer.train_step()
    mimicked = trainer.model.unembed.W_U.detach().clone()
    # the official code mimics with no task loss: the classifier gets no gradient until fine-tuning
    assert torch.equal(mimicked, unembed) == (mimic == "official")
    trainer.train_step()
    assert not torch.equal(trainer.model.unembed.W_U, mimicked)


def test_train_cli_on_the_official_surface_with_official_mimicking(tmp_path, capsys):
    cli.main(["train", "--quiet", "--format", "json", "--out", str(tmp_path / "m.pt"), "--length", "4", "--d-model", "16",
              "--n-heads", "2", "--n-layers", "2", "--d-mlp", "32", "--batch-size", "16", "--steps", "4", "--eval-every",
              "2", "--eval-size", "32", "--device", "cpu", "--surface", "official", "--mimic", "official",
              "--mimic-steps", "2", "--no-curriculum"])
    checkpoint = load_checkpoint(tmp_path / "m.pt")
    assert checkpoint.task_config.surface == "official" and checkpoint.train_config["mimic"] == "official"
    assert len(json.loads(capsys.readouterr().out)["accuracy"]) == 4
    with pytest.raises(ConfigError, match="mimic_steps=0"):
        replace(TINY, mimic="official", mimic_steps=0)
    assert cli.main(["train", "--surface", "bert"]) == 2
    assert "not one of legointerp, official" in capsys.readouterr().err


def test_fine_tuning_after_the_official_mimicking_starts_afresh(tmp_path):
    """The official mimicking is a pre-training: the task's steps after it warm up again from a new optimizer, as the
    official code's separate fine-tuning run does; our mimicking (added to the task loss) keeps one schedule."""
    official = replace(TINY, mimic="official", mimic_steps=5, warmup=4, steps=20, curriculum=False, min_length=None)
    ours = replace(official, mimic="ours")
    assert learning_rate(official, 5) == learning_rate(official, 0) == official.lr / 4
    assert learning_rate(ours, 5) == official.lr
    trainer = Trainer(replace(official, steps=6), tmp_path / "m.pt", progress=False)
    for _ in range(5):
        trainer.train_step()
    assert trainer.optimizer.state  # the mimicking's moments
    trainer.train_step()  # the first step of the task: its moments alone
    assert all(int(state["step"]) == 1 for state in trainer.optimizer.state.values())

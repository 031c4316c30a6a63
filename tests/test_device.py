"""Every sub-command and analysis runs on the model's device, and gives the CPU's answer there.

No GPU is needed: ``tests/emulated_device.py`` emulates one (real values, device mixing raises as on CUDA, host syncs
counted).  ``--device cuda`` on the command line puts the model on it.  The emulated device computes with the CPU's
kernels, the CPU-only oneDNN path of the inference engine switched off (it rounds differently, as a GPU's kernels
do); what is left is summation order (~1e-7), so numbers agree to 1e-5, and a rank correlation, which near-tied
scores amplify, to 1e-3."""

import contextlib
import io
import json
import math

import pytest
import torch

from legointerp import cli, evaluate
from legointerp import checkpoint as checkpoint_module
from legointerp.evaluate import accuracy_by_position
from legointerp.evaluate import test_batch as fresh_batch
from legointerp.heads import classify_heads
from legointerp.lens import direct_logit_attribution, logit_lens
from legointerp.patching import patch
from legointerp.probes import percolation
from legointerp.shortcut import detect_shortcut
from tests.conftest import small_model
from tests.emulated_device import EMULATED, DeviceMixed, emulated_device

TOLERANCE = 1e-5
RANK_TOLERANCE = 1e-3  # Spearman's rho over scores tied up to rounding


def test_the_emulated_device_refuses_mixing_and_counts_syncs():
    with emulated_device() as device:
        x = torch.arange(6, device=EMULATED)
        assert x.device == EMULATED and torch.ones(6).to(x.device).device == EMULATED
        with pytest.raises(DeviceMixed):
            x + torch.arange(6)
        with pytest.raises(DeviceMixed):
            torch.rand(3, generator=torch.Generator(), device=EMULATED)
        with pytest.raises(RuntimeError):
            x.numpy()
        assert torch.equal((x + torch.tensor(1)).cpu(), torch.arange(1, 7))  # a CPU scalar mixes, as on CUDA
        assert float(x[torch.tensor([2])]) == 2  # CPU indices into a device tensor too
        assert device.syncs == 2
        model = torch.nn.Linear(2, 1).to(EMULATED)
        assert model(torch.ones(1, 2, device=EMULATED)).device == EMULATED
        with pytest.raises(DeviceMixed):
            model(torch.ones(1, 2))


def test_a_batch_reaches_the_device_in_one_copy(task):
    batch = task.sample(8, torch.Generator().manual_seed(0), min_length=2)
    with emulated_device() as device:
        moved = batch.to(EMULATED)
        assert device.uploads == 1 and device.syncs == 0  # one copy, and the host does not wait for it
        assert all(getattr(moved, k).device == EMULATED for k in batch.__dict__)
        back = moved.to("cpu")
    for k, v in batch.__dict__.items():
        assert torch.equal(getattr(back, k), v), k


def _close(a, b, where="", tolerance=TOLERANCE) -> None:
    """JSON documents equal, numbers to ``tolerance`` (relative beyond 1)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _close(a[key], b[key], f"{where}.{key}", tolerance)
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{where}[{i}]", tolerance)
    elif isinstance(a, float) and isinstance(b, (int, float)):
        tolerance = max(tolerance, RANK_TOLERANCE) if where.endswith("spearman") else tolerance
        assert (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tolerance * max(1.0, abs(a)), (where, a, b)
    else:
        assert a == b, where


@pytest.fixture(autouse=True)
def same_kernels(monkeypatch):
    monkeypatch.setattr(evaluate, "_ONEDNN", False)


@pytest.fixture
def cuda_is_emulated(monkeypatch):
    """``--device cuda`` passes the CLI's check and puts the model on the emulated device."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    resolve = checkpoint_module.resolve_device
    monkeypatch.setattr(checkpoint_module, "resolve_device",
                        lambda name: EMULATED if str(name).startswith("cuda") else resolve(name))


def _run(argv: list[str]) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cli.main(argv)
    return json.loads(out.getvalue())


COMMANDS = {
    "eval": ["--samples", "50"],
    "predict": ["a=+1; b=-a; c=+b", "a=-1; b=-a"],
    "heads": ["--samples", "24", "--no-ablation"],  # the ablations run in the API test below
    "probe": ["--samples", "120", "--no-control"],
    "patch": ["--samples", "4", "--attribution-steps", "2"],
    "shortcut": ["--samples", "40"],
    "report": ["--samples", "40", "--head-samples", "12", "--patch-samples", "2", "--quiet"],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_runs_on_the_device_and_agrees_with_the_cpu(command, cuda_is_emulated, tmp_path, one_thread):
    argv = [command, "--ckpt", "bundled", *COMMANDS[command], "--format", "json"]
    if command == "report":
        argv += ["--out", str(tmp_path / "report.html")]
    on_cpu = _run(argv + ["--device", "cpu"])
    with emulated_device():
        on_device = _run(argv + ["--device", "cuda"])
    _close(on_cpu, on_device)


@pytest.mark.parametrize("variant", [{}, {"norm": "post", "tied": True}, {"identity_attention": True},
                                     {"hardcoded": ("association", "manipulation", None, None)}])
def test_every_analysis_runs_on_the_device_for_every_architecture(task, variant, one_thread):
    """The API: each analysis of a model on the device, batch on the CPU or on the device, equals the CPU run.  Where
    an architecture refuses an analysis (post-LN: the lens; +aI/+bI: head patching), it refuses it alike on both."""
    # large weights: decisive logits, so rounding cannot flip an argmax; random weights still leave small gaps between
    # clean and corrupted runs, which the normalised patching scores divide by: 1e-3 here
    model = small_model(task, variable_offset=task.variable_offset, init_range=0.5, **variant)
    batch = fresh_batch(task, 24, seed=1)
    analyses = {
        "accuracy": lambda m, b: accuracy_by_position(m, b).tolist(),
        "heads": lambda m, b: classify_heads(m, b, task).to_records(),
        "probes": lambda m, b: percolation(m, b, task, control=False).to_dict(),
        # without the rank correlations, which near-tied scores of random weights make unstable
        "patch": lambda m, b: {k: v for k, v in patch(m, b[:4], task, heads=not variant.get("identity_attention"),
                                                      attribution_steps=2).to_dict().items() if k != "agreement"},
        "shortcut": lambda m, b: detect_shortcut(m, b, task, attention_samples=8, patching_samples=4).to_dict(),
        "lens": lambda m, b: logit_lens(m, b).accuracy.tolist(),
        "attribution": lambda m, b: direct_logit_attribution(m, b).to_frame().to_dict(orient="list"),
    }
    for name, analysis in analyses.items():
        try:
            expected = json.loads(json.dumps(analysis(model, batch), default=float))
        except Exception as error:  # refused on this architecture: refused on the device too
            with emulated_device():
                with pytest.raises(type(error)):
                    analysis(model.to(EMULATED), batch)
                model.cpu()
            continue
        with emulated_device():
            on_device = model.to(EMULATED)
            for where in (batch, batch.to(EMULATED)):
                _close(expected, json.loads(json.dumps(analysis(on_device, where), default=float)), name, 1e-3)
            model.cpu()


def test_replicate_analyses_run_on_the_scale_device(cuda_is_emulated):
    from dataclasses import replace

    from legointerp.checkpoint import bundled_path
    from legointerp.replicate import SCALES, Run, _analysis_batch

    scale = replace(SCALES["gpu"], device="cuda", analysis_sentences=8)
    with emulated_device():
        model, _, batch = _analysis_batch(Run("albert", 0, scale.base(), [], bundled_path()), scale)
        assert next(model.parameters()).device == EMULATED and batch.tokens.device == EMULATED
        model.cpu()


TRAINING = {"plain": dict(curriculum=False, min_length=None, mimic_steps=0),
            "curriculum": dict(curriculum=True, min_length=1, mimic_steps=0, curriculum_threshold=1e-9),
            "stochastic depth": dict(curriculum=False, min_length=1, mimic_steps=0, tied=True, min_depth=1),
            "mimicking": dict(curriculum=False, min_length=None, mimic_steps=100),
            "official mimicking": dict(curriculum=False, min_length=None, mimic_steps=100, mimic="official",
                                       surface="official")}


@pytest.mark.parametrize("variant", TRAINING)
def test_a_training_step_never_waits_for_the_device(variant, tmp_path, monkeypatch, one_thread):
    """The host runs ahead of the device: a step reads no device value (the curriculum reads its rate once every
    CURRICULUM_EVERY steps), so an accelerator is never left idle waiting for the next launch."""
    from legointerp import train as train_module
    from legointerp.train import CURRICULUM_EVERY, TrainConfig, Trainer

    monkeypatch.setattr(train_module, "resolve_device", lambda name: EMULATED)
    config = TrainConfig(n=4, d_model=16, n_heads=2, n_layers=3, d_mlp=32, batch_size=8, steps=100, warmup=2,
                         eval_size=16, **TRAINING[variant])
    steps = 2 * CURRICULUM_EVERY
    with emulated_device() as device:
        trainer = Trainer(config, tmp_path / "m.pt", progress=False)
        assert next(trainer.model.parameters()).device == EMULATED
        device.syncs = 0
        for _ in range(steps):
            trainer.train_step()
        assert device.syncs == (steps // CURRICULUM_EVERY if config.curriculum else 0)
        trainer.model.cpu()

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from legointerp import cli
from legointerp.checkpoint import load_checkpoint
from legointerp.model import ConfigError
from legointerp.train import PRESETS, TrainConfig, Trainer, learning_rate, read_log, train

TINY = TrainConfig(n=4, d_model=16, n_heads=2, n_layers=2, d_mlp=32, batch_size=16, steps=8, warmup=2, eval_every=4,
                   eval_size=64, save_every=4, device="cpu", mimic_steps=3, min_length=1, curriculum=True,
                   curriculum_threshold=0.0)


def test_training_writes_checkpoint_and_per_position_log(tmp_path):
    checkpoint = train(TINY, tmp_path / "model.pt", progress=False)
    log = read_log(tmp_path / "model.pt")
    assert [row["step"] for row in log] == [4, 8]
    assert all(len(row["accuracy"]) == 4 for row in log)
    loaded = load_checkpoint(tmp_path / "model.pt")
    assert loaded.accuracy == checkpoint.accuracy and loaded.train_state["step"] == 8
    assert "seed" in loaded.provenance and "command" in loaded.provenance


@pytest.mark.parametrize("config", [TINY, replace(TINY, tied=True, min_depth=1, n_tr=2, mimic_steps=0)])
def test_interrupted_and_resumed_run_ends_with_the_same_weights(tmp_path, config, monkeypatch):
    straight = train(config, tmp_path / "a.pt", progress=False)
    step = Trainer.train_step

    def ctrl_c_at_step_5(self):
        if self.step == 5:
            raise KeyboardInterrupt
        return step(self)

    monkeypatch.setattr(Trainer, "train_step", ctrl_c_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "b.pt", progress=False)
    monkeypatch.setattr(Trainer, "train_step", step)
    assert load_checkpoint(tmp_path / "b.pt").train_state["step"] == 5
    resumed = train(config, tmp_path / "b.pt", resume=True, progress=False)
    for name, value in straight.state_dict.items():
        assert torch.equal(value, resumed.state_dict[name]), name
    assert [r["step"] for r in read_log(tmp_path / "b.pt")] == [4, 8]
    assert resumed.provenance["command"].count(" && ") == 1  # both commands recorded


def test_curriculum_grows_only_when_training_sentences_are_solved(tmp_path):
    always = Trainer(TINY, tmp_path / "a.pt", progress=False)
    never = Trainer(replace(TINY, curriculum_threshold=1.01), tmp_path / "b.pt", progress=False)
    for _ in range(3):
        always.train_step(), never.train_step()
    assert always.longest == 4 and never.longest == TINY.curriculum_start == 2
    assert read_log(tmp_path / "a.pt") == []


def test_resume_refuses_a_different_run(tmp_path):
    train(TINY, tmp_path / "m.pt", progress=False)
    with pytest.raises(ConfigError, match="other options"):
        Trainer(replace(TINY, lr=0.5), tmp_path / "m.pt", resume=True, progress=False)


def test_supervision_only_trains_the_chosen_positions(tmp_path):
    config = replace(TINY, supervised=(0, 3), mimic_steps=0, min_length=None)
    trainer = Trainer(config, tmp_path / "s.pt", progress=False)
    batch_loss_positions = trainer.loss_mask.nonzero().flatten().tolist()
    assert batch_loss_positions == [0, 3]


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


def test_runs_under_torchrun_with_two_gloo_processes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
               cli.__file__, "train", "--quiet", "--out", str(tmp_path / "ddp.pt"), "--length", "4",
               "--d-model", "16", "--n-heads", "2", "--n-layers", "2", "--d-mlp", "32", "--batch-size", "16",
               "--steps", "4", "--eval-every", "2", "--eval-size", "32", "--device", "cpu", "--format", "json"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["steps"] == 4  # only rank 0 reports
    assert load_checkpoint(tmp_path / "ddp.pt").train_state["step"] == 4

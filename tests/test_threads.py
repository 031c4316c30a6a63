"""Threads for the work: a small model gets the idle cores on the CPU (one on a busy machine) unless the environment
chose."""

import os

import pytest
import torch

from legointerp.checkpoint import load_model
from legointerp.cli import main
from legointerp.errors import LegoInterpError
from legointerp.model import ModelConfig
from legointerp.threads import threads_for
from legointerp.train import read_log

SMALL = ModelConfig(d_vocab=20, d_vocab_out=2, n_ctx=62, d_model=64, d_mlp=256)


@pytest.fixture
def restore_threads(monkeypatch):
    for name in ("LEGOINTERP_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    threads = torch.get_num_threads()
    yield monkeypatch
    torch.set_num_threads(threads)


def machine(monkeypatch, cores: int, load: float):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load), raising=False)


def test_a_small_model_runs_on_one_thread_on_a_busy_machine_unless_the_environment_says_otherwise(restore_threads):
    machine(restore_threads, cores=2, load=3.0)
    torch.set_num_threads(2)
    load_model()
    assert torch.get_num_threads() == 1  # the bundled model: 64 x 256 matrices
    restore_threads.setenv("LEGOINTERP_THREADS", "2")
    load_model()
    assert torch.get_num_threads() == 2
    restore_threads.setenv("LEGOINTERP_THREADS", "two")
    with pytest.raises(LegoInterpError, match="LEGOINTERP_THREADS"):
        load_model()
    restore_threads.delenv("LEGOINTERP_THREADS")
    restore_threads.setenv("OMP_NUM_THREADS", "2")
    load_model()
    assert torch.get_num_threads() == 2  # the user's OpenMP choice stands


def test_training_follows_the_same_rule_and_logs_its_threads(restore_threads, tmp_path):
    machine(restore_threads, cores=2, load=3.0)
    out = tmp_path / "m.pt"
    for setting, threads in (("", 1), ("2", 2)):
        restore_threads.setenv("LEGOINTERP_THREADS", setting)
        torch.set_num_threads(2 if threads == 1 else 1)  # the other count, so the rule must set it
        assert main(["train", "--quiet", "--force", "--out", str(out), "--length", "4", "--d-model", "16", "--n-heads",
                     "2", "--n-layers", "2", "--d-mlp", "32", "--batch-size", "16", "--steps", "2", "--eval-every", "2",
                     "--eval-size", "16", "--device", "cpu", "--mimic-steps", "0", "--no-curriculum"]) == 0
        assert read_log(out)[-1]["threads"] == threads, setting


def test_a_small_model_gets_the_idle_cores(restore_threads):
    expected = {(2, 0.1): 2, (2, 0.7): 1, (2, 1.2): 1, (4, 0.6): 3, (4, 9.0): 1}
    for (cores, load), threads in expected.items():
        machine(restore_threads, cores, load)
        assert threads_for(SMALL) == threads, (cores, load)
    machine(restore_threads, cores=2, load=0.0)
    load_model()
    assert torch.get_num_threads() == 2
    restore_threads.delattr(os, "getloadavg")  # no load average (Windows): the safe choice
    assert threads_for(SMALL) == 1


def test_a_wide_model_keeps_torchs_default(restore_threads):
    machine(restore_threads, cores=2, load=3.0)
    wide = ModelConfig(d_vocab=20, d_vocab_out=2, n_ctx=62, d_model=768, n_heads=12, n_layers=1, d_mlp=3072)
    assert threads_for(wide) is None

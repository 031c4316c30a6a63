"""Threads for the work: a small model gets one intra-op thread on the CPU unless the environment chose."""

import pytest
import torch

from legointerp.checkpoint import load_model
from legointerp.errors import LegoInterpError
from legointerp.model import ModelConfig
from legointerp.threads import threads_for


@pytest.fixture
def restore_threads(monkeypatch):
    for name in ("LEGOINTERP_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    threads = torch.get_num_threads()
    yield monkeypatch
    torch.set_num_threads(threads)


def test_a_small_model_runs_on_one_thread_unless_the_environment_says_otherwise(restore_threads):
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


def test_a_wide_model_keeps_torchs_default():
    wide = ModelConfig(d_vocab=20, d_vocab_out=2, n_ctx=62, d_model=768, n_heads=12, n_layers=1, d_mlp=3072)
    assert threads_for(wide) is None
    assert threads_for(ModelConfig(d_vocab=20, d_vocab_out=2, n_ctx=62, d_model=64, d_mlp=256)) == 1

import pytest
import torch

from legointerp.model import LegoTransformer, ModelConfig
from legointerp.task import LegoTask, TaskConfig

torch.set_num_threads(2)


@pytest.fixture
def task():
    return LegoTask(TaskConfig(n=6))


def small_model(task: LegoTask, **overrides) -> LegoTransformer:
    torch.manual_seed(0)
    config = dict(d_vocab=task.d_vocab, d_vocab_out=task.n_classes, n_ctx=task.n_ctx, d_model=32, n_heads=4,
                  n_layers=3, d_mlp=64)
    return LegoTransformer(ModelConfig(**{**config, **overrides})).eval()


@pytest.fixture
def one_thread():
    # tiny matrices: a second thread only adds synchronisation, which on a busy machine costs ~50x
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

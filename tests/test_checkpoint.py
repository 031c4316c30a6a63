import os
import pickle

import pytest
import torch

from legointerp.checkpoint import Checkpoint, CheckpointError, load_checkpoint, load_model, save_checkpoint
from tests.conftest import small_model


def _checkpoint(task, **overrides):
    model = small_model(task, **overrides)
    return Checkpoint(model_config=model.cfg, task_config=task.config, state_dict=model.state_dict(),
                      accuracy=[0.5] * task.config.n)


@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_gives_the_same_logits(task, tmp_path, tied):
    checkpoint = _checkpoint(task, tied=tied)
    save_checkpoint(checkpoint, tmp_path / "model.pt")
    model, loaded_task, loaded = load_model(tmp_path / "model.pt")
    batch = task.sample(4)
    original = checkpoint.build_model()
    assert torch.equal(model(batch.tokens), original(batch.tokens))
    assert loaded.accuracy == checkpoint.accuracy and loaded_task.vocab == task.vocab
    assert model.blocks[1].attn.W_Q is model.blocks[0].attn.W_Q or not tied


class Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"format": "legointerp-checkpoint/1", "x": Payload()}, f)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_truncated_wrong_and_missing_files(task, tmp_path):
    path = save_checkpoint(_checkpoint(task), tmp_path / "model.pt")
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(tmp_path / "cut.pt")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "notes.txt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a legointerp checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "absent.pt")


def test_config_that_does_not_match_the_weights(task, tmp_path):
    checkpoint = _checkpoint(task)
    checkpoint.model_config.d_mlp = 128
    save_checkpoint(checkpoint, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="do not match"):
        load_model(tmp_path / "model.pt")


def test_an_interrupted_save_keeps_the_previous_file(task, tmp_path, monkeypatch):
    path = save_checkpoint(_checkpoint(task), tmp_path / "model.pt")
    before = path.read_bytes()

    def explode(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", explode)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(_checkpoint(task, d_mlp=128), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]

import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from legointerp.checkpoint import (Checkpoint, CheckpointError, bundled_path, load_checkpoint, load_model, save_checkpoint,
                                   weights_digest)
from legointerp.files import BUNDLED_FILES, OutputError, shipped_folder
from legointerp.report import write_html
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


def _tensor_offset(path, name_suffix):
    """Byte offset of a stored tensor's data inside the checkpoint's zip (torch stores them uncompressed)."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(name_suffix))
    return info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)


def test_a_flipped_byte_in_the_weights_is_caught_by_the_checksum(task, tmp_path):
    path = save_checkpoint(_checkpoint(task), tmp_path / "model.pt")
    data = bytearray(path.read_bytes())
    data[_tensor_offset(path, "data/3") + 5] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(path)


def test_non_finite_weights_are_refused_with_or_without_a_checksum(task, tmp_path):
    checkpoint = _checkpoint(task)
    checkpoint.state_dict = {k: v.clone() for k, v in checkpoint.state_dict.items()}
    checkpoint.state_dict["blocks.1.mlp.W_in"][0, 0] = float("nan")
    path = save_checkpoint(checkpoint, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match=r"NaN or infinite weights \(first in blocks.1.mlp.W_in\)"):
        load_checkpoint(path)
    payload = torch.load(path, weights_only=True)
    del payload["sha256"]
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        load_checkpoint(path)


def test_a_checkpoint_saved_before_checksums_still_loads(task, tmp_path):
    checkpoint = _checkpoint(task)
    path = save_checkpoint(checkpoint, tmp_path / "model.pt")
    payload = torch.load(path, weights_only=True)
    assert payload["sha256"] == weights_digest(checkpoint.state_dict)
    del payload["sha256"]
    torch.save(payload, path)
    model, _, _ = load_model(path)
    assert all(torch.equal(v, checkpoint.state_dict[k]) for k, v in model.state_dict().items())


def test_the_digest_sees_names_dtypes_and_shapes(task):
    state = _checkpoint(task).state_dict
    digest = weights_digest(state)
    name = "blocks.0.attn.W_Q"
    renamed = {("x" if k == name else k): v for k, v in state.items()}
    retyped = {**state, name: state[name].double()}
    reshaped = {**state, name: state[name].reshape(-1)}
    assert len({digest, weights_digest(renamed), weights_digest(retyped), weights_digest(reshaped)}) == 4


def test_empty_files_and_non_tensor_weights(task, tmp_path):
    (tmp_path / "zero.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(tmp_path / "zero.pt")
    path = save_checkpoint(_checkpoint(task), tmp_path / "model.pt")
    payload = torch.load(path, weights_only=True)
    torch.save({**payload, "state_dict": "weights"}, path)
    with pytest.raises(CheckpointError, match="state_dict is a str"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="is a folder"):
        load_checkpoint(tmp_path)


def test_a_damaged_pickle_is_never_called_unsafe_nor_passes_on_torchs_advice(task, tmp_path):
    path = save_checkpoint(_checkpoint(task), tmp_path / "model.pt")
    start = _tensor_offset(path, "data.pkl")
    data = path.read_bytes()
    messages = set()
    for k in range(0, 400, 3):  # bytes of the pickle overwritten one at a time: most fail, each its own way
        damaged = bytearray(data)
        damaged[start + k] = 0xFE
        (tmp_path / "damaged.pt").write_bytes(bytes(damaged))
        try:
            load_checkpoint(tmp_path / "damaged.pt")
        except CheckpointError as err:
            messages.add(str(err))
    assert any("is damaged or not a legointerp checkpoint" in m for m in messages)  # the unpickler refused it
    assert not any("could run code" in m or "weights_only" in m or "\n" in m for m in messages)


def test_a_checkpoint_naming_code_is_called_unsafe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"format": "legointerp-checkpoint/1", "x": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="could run code") as caught:
        load_checkpoint(tmp_path / "evil.pt")
    assert "weights_only" not in str(caught.value) and not (tmp_path / "pwned").exists()


def test_no_writer_can_change_the_shipped_files_by_any_path(task, tmp_path, monkeypatch):
    """The rule sits under every writer (files.atomic_write), so the library refuses what the command line does."""
    monkeypatch.chdir(tmp_path)
    checkpoint = load_checkpoint("bundled")
    before = {path.name: path.read_bytes() for path in shipped_folder().iterdir()}
    (tmp_path / "link").symlink_to(shipped_folder(), target_is_directory=True)
    relative = Path(os.path.relpath(bundled_path("bundled-shortcut"), tmp_path))
    for target in (bundled_path(), relative, tmp_path / "link" / "model.pt", tmp_path / "link" / "new.pt"):
        with pytest.raises(OutputError, match="data folder"):
            save_checkpoint(checkpoint, target)
    for name in BUNDLED_FILES:
        with pytest.raises(OutputError, match="shipped with legointerp"):
            save_checkpoint(checkpoint, Path(name))
    with pytest.raises(OutputError, match="data folder"):
        write_html("<p>", tmp_path / "link" / "model.log.jsonl")
    assert {path.name: path.read_bytes() for path in shipped_folder().iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link"]

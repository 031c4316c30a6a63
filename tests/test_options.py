import argparse
import math

import pytest
import torch

from legointerp.errors import LegoInterpError
from legointerp.model import ConfigError
from legointerp.files import shipped_folder
from legointerp.options import FRACTION, SAMPLES, SEED, TRAIN_OPTIONS, output_file, output_folder, resolve_device
from legointerp.train import PRESETS, TrainConfig


def test_numbers_are_read_and_range_checked_in_one_place():
    assert SAMPLES("12") == 12 and SEED(str(2**63 - 1)) == 2**63 - 1 and FRACTION("1") == 1.0
    for option, text in ((SAMPLES, "0"), (SAMPLES, "1e3"), (SEED, str(2**63)), (FRACTION, "0"), (FRACTION, "nan")):
        with pytest.raises(argparse.ArgumentTypeError, match=option.describe().replace("(", r"\(").replace("[", r"\[")):
            option(text)


@pytest.mark.parametrize("field, value", [("lr", math.nan), ("lr", -1.0), ("weight_decay", -0.1), ("steps", 0),
                                          ("batch_size", 0), ("seed", 2**70), ("eval_every", 0), ("decay", 1.5),
                                          ("n_heads", 3), ("curriculum_start", 13), ("min_length", 13), ("n_tr", 13),
                                          ("device", "tpu"), ("steps", True)])
def test_train_config_built_in_python_is_checked_like_the_command_line(field, value):
    with pytest.raises(LegoInterpError, match=field):  # ConfigError, or the task's LegoError for n_tr
        TrainConfig(**{"curriculum": True, field: value})


def test_mimicking_needs_two_heads_and_every_preset_is_valid():
    with pytest.raises(ConfigError, match="n_heads=1"):
        TrainConfig(n_heads=1, d_model=16, mimic_steps=1)
    assert TrainConfig(n_heads=1, d_model=16).n_heads == 1
    assert all(isinstance(p, TrainConfig) for p in PRESETS.values())
    assert set(TRAIN_OPTIONS) < {f for f in TrainConfig.__dataclass_fields__}


def test_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_device("cuda:x")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ConfigError, match="GPU"):
        resolve_device(f"cuda:{count}")


def test_output_file_accepts_a_new_folder_and_refuses_what_cannot_be_written(tmp_path):
    assert output_file(str(tmp_path / "new" / "deeper" / "r.html")) == tmp_path / "new" / "deeper" / "r.html"
    assert not (tmp_path / "new").exists()  # checking writes nothing
    (tmp_path / "file").write_text("x")
    for bad, reason in ((tmp_path, "folder"), (tmp_path / "file" / "r.html", "is a file"), (f"{tmp_path}/new/", "folder"),
                        (shipped_folder() / "model.pt", "data folder"), (shipped_folder() / "new" / "r.html", "data folder"),
                        ("bundled", "shipped with legointerp")):
        with pytest.raises(argparse.ArgumentTypeError, match=reason):
            output_file(str(bad))
    assert not (tmp_path / "new").exists()
    with pytest.raises(argparse.ArgumentTypeError, match="data folder"):
        output_folder(str(shipped_folder()))

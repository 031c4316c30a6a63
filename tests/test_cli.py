import json

import pytest

from legointerp.checkpoint import Checkpoint, save_checkpoint
from legointerp.cli import main
from legointerp.task import LegoTask, TaskConfig
from tests.conftest import small_model


@pytest.fixture
def ckpt(tmp_path):
    task = LegoTask(TaskConfig(n=6))
    model = small_model(task)
    return save_checkpoint(Checkpoint(model_config=model.cfg, task_config=task.config, state_dict=model.state_dict(),
                                      accuracy=[0.5] * 6), tmp_path / "model.pt")


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_solve_prints_exact_values_as_json(capsys):
    code, out, _ = run(capsys, "solve", "a=+1; b=-a; c=-b", "--format", "json")
    assert code == 0 and json.loads(out) == {"a": "1", "b": "-1", "c": "1"}


def test_solve_task2(capsys):
    code, out, _ = run(capsys, "solve", "a=[120]012; b=[120]a", "--group", "task2", "--format", "json")
    assert code == 0 and json.loads(out) == {"a": "120", "b": "201"}


@pytest.mark.parametrize("argv", [["solve", "a=+1; b=-c"], ["solve", ""], ["eval", "--ckpt", "missing.pt"],
                                  ["predict", "--ckpt", "missing.pt", "a=+1"], ["solve", "a=+1", "--group", "q7"]])
def test_bad_input_is_one_line_and_exit_code_2(capsys, argv):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and "error:" in err


def test_predict_returns_prediction_beside_truth(capsys, ckpt, tmp_path):
    code, out, _ = run(capsys, "predict", "--ckpt", ckpt, "a=+1; b=-a; c=+b", "--format", "json")
    document = json.loads(out)
    assert code == 0 and document["true"] == {"a": "1", "b": "-1", "c": "-1"}
    assert set(document["predicted"]) == {"a", "b", "c"} and set(document["predicted"].values()) <= {"1", "-1"}
    sentences = tmp_path / "sentences.txt"
    sentences.write_text("a=+1; b=-a\n\nx=-1; y=-x; z=+y\n")
    code, out, _ = run(capsys, "predict", "--ckpt", ckpt, "--file", sentences, "--format", "json")
    assert code == 0 and [d["true"] for d in json.loads(out)] == [{"a": "1", "b": "-1"}, {"x": "-1", "y": "1", "z": "1"}]


def test_predict_refuses_sentences_longer_than_the_model_reads(capsys, ckpt):
    code, _, err = run(capsys, "predict", "--ckpt", ckpt, "; ".join(f"{c}=+1" for c in "abcdefg"))
    assert code == 2 and "more than the 6" in err


def test_eval_reports_accuracy_by_chain_position(capsys, ckpt):
    code, out, _ = run(capsys, "eval", "--ckpt", ckpt, "--samples", 200, "--format", "json")
    document = json.loads(out)
    assert code == 0 and list(document["accuracy"]) == [str(k) for k in range(6)]
    assert all(0 <= a <= 1 for a in document["accuracy"].values())
    code, out, _ = run(capsys, "eval", "--ckpt", ckpt, "--samples", 200)
    assert code == 0 and "position" in out and "recorded" in out


def test_every_subcommand_has_help(capsys):
    for command in ["train", "eval", "predict", "solve", "heads", "probe", "patch", "report"]:
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0
        assert "--" in capsys.readouterr().out


def test_heads_json_has_one_record_per_head_with_the_documented_fields(capsys, ckpt, tmp_path):
    code, out, _ = run(capsys, "heads", "--ckpt", ckpt, "--samples", 64, "--format", "json",
                       "--plot", tmp_path / "map.html", "--view", tmp_path / "view.html")
    records = json.loads(out)
    assert code == 0 and len(records) == 3 * 4
    assert list(records[0]) == ["layer", "head", "label", "association", "manipulation", "broadcast", "self", "previous",
                                "next", "ablation_drop"]
    assert (tmp_path / "map.html").stat().st_size > 0 and (tmp_path / "view.html").stat().st_size > 0


def test_probe_json_matrix_is_layers_by_depths(capsys, ckpt):
    code, out, _ = run(capsys, "probe", "--ckpt", ckpt, "--samples", 200, "--format", "json")
    document = json.loads(out)
    assert code == 0 and len(document["matrix"]) == 3 + 1 and len(document["matrix"][0]) == 6
    assert len(document["control"]) == 4 and len(document["resolution_layers"]) == 6
    assert "linearity" in document


def test_bad_head_name_is_a_clear_error(capsys, ckpt, tmp_path):
    code, _, err = run(capsys, "heads", "--ckpt", ckpt, "--samples", 16, "--no-ablation", "--view", tmp_path / "v.html",
                       "--view-heads", "zero")
    assert code == 2 and "LAYER.HEAD" in err


def test_patch_json_has_layer_by_position_matrices(capsys, ckpt):
    code, out, err = run(capsys, "patch", "--ckpt", ckpt, "--samples", 4, "--depth", 2, "--format", "json")
    document = json.loads(out)
    assert code == 0 and len(document["resid_pre"]) == 3 and len(document["resid_pre"][0]) == len(document["positions"])
    assert len(document["head_z"][0][0]) == 4 and "agreement" in document and "r =" in err
    code, _, err = run(capsys, "patch", "--ckpt", ckpt, "--samples", 4, "--depth", 9)
    assert code == 2 and "chain depth" in err


def test_each_analysis_keeps_its_own_default_sample_count():
    from legointerp.cli import build_parser

    parser = build_parser()
    defaults = {command: parser.parse_args([command]).samples for command in ("heads", "probe", "patch", "shortcut", "report")}
    assert defaults["heads"] < defaults["probe"] and defaults["patch"] < defaults["heads"]
    assert defaults["probe"] == defaults["shortcut"] == defaults["report"]

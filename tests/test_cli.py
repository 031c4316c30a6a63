import hashlib
import io
import json
import os
import pickle
import sys
import warnings

import pytest
import torch

from legointerp.checkpoint import Checkpoint, save_checkpoint
from legointerp import cli
from legointerp.files import shipped_folder
from legointerp.hf import _layer_names
from legointerp.cli import EXIT_BROKEN_PIPE, main
from legointerp.heads import LABEL_THRESHOLD, RECORD_FIELDS
from legointerp.task import WORDPIECE_IDS, LegoTask, TaskConfig
from legointerp.train import PRESETS
from legointerp.model import LegoTransformer
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
    for command in ["train", "eval", "predict", "solve", "heads", "probe", "patch", "shortcut", "report", "zoo"]:
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0
        assert "--" in capsys.readouterr().out


def test_heads_json_has_one_record_per_head_with_the_documented_fields(capsys, ckpt, tmp_path):
    code, out, _ = run(capsys, "heads", "--ckpt", ckpt, "--samples", 64, "--format", "json",
                       "--plot", tmp_path / "map.html", "--view", tmp_path / "view.html")
    document = json.loads(out)
    records = document["heads"]
    assert code == 0 and len(records) == 3 * 4 and document["samples"] == 64
    assert list(records[0]) == [f for f in RECORD_FIELDS if f != "every_iteration_drop"]  # an untied model
    assert document["thresholds"]["label_lift"] == LABEL_THRESHOLD
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
    code, out, err = run(capsys, "patch", "--ckpt", ckpt, "--samples", 4, "--depth", 2, "--heads", "--format", "json")
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


# ---------------------------------------------------------------------------- bad input, table-driven
@pytest.fixture
def inputs(tmp_path, ckpt):
    """Bad and odd input files in tmp_path/in; returns the placeholders the table's argv use."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "binary.txt").write_bytes(bytes(range(256)))
    (folder / "latin1.txt").write_bytes("a=+1; b=-a\nc=+1  # café\n".encode("latin-1"))
    (folder / "nul.txt").write_bytes(b"a=+1\n\0\0\n")
    (folder / "bad_line.txt").write_text("a=+1; b=-a\n" * 516 + "a=+1; b=-q\n" + "a=+1\n" * 484)
    (folder / "a_file").write_text("x")
    (folder / "zero.pt").write_bytes(b"")
    payload = torch.load(ckpt, weights_only=True)
    torch.save({**payload, "state_dict": "weights"}, folder / "string_state.pt")
    read_only = folder / "read_only.html"
    read_only.write_text("keep")
    read_only.chmod(0o444)
    torch.save({**payload, "task_config": {**payload["task_config"], "group": "q99"}}, folder / "bad_group.pt")
    (folder / "raw.pkl").write_bytes(pickle.dumps({"a": 1}, protocol=4))  # not a zip: torch warns about its protocol
    source = bert_state_dict()
    torch.save(source, folder / "bert.pth")
    source["encoder.layer.0.attention.self.query.weight"][0, 0] = float("nan")
    torch.save(source, folder / "nan.pth")
    task = LegoTask(PRESETS["tiny"].task_config())
    trained = LegoTransformer(PRESETS["tiny"].model_config(task))
    save_checkpoint(Checkpoint(trained.cfg, task.config, trained.state_dict(), train_config=PRESETS["tiny"].to_dict(),
                               train_state={"step": 5}), folder / "trained.pt")
    (folder / "logged.log.jsonl").mkdir()  # where train --out logged.pt would write its log
    (folder / "link").symlink_to(shipped_folder(), target_is_directory=True)
    return {"ckpt": str(ckpt), "in": str(folder), "data": str(shipped_folder()),
            "data_rel": os.path.relpath(shipped_folder(), tmp_path)}


def bert_state_dict(d_model: int = 8, d_mlp: int = 16, positions: int = 66) -> dict[str, torch.Tensor]:
    """A 1-layer BertModel's weights and a 1-logit head on bert-base-uncased's id range (66 positions: n = 12 on the
    official surface), without transformers."""
    torch.manual_seed(0)
    shapes = {"embeddings.word_embeddings.weight": (max(WORDPIECE_IDS.values()) + 1, d_model),
              "embeddings.position_embeddings.weight": (positions, d_model),
              "embeddings.token_type_embeddings.weight": (2, d_model), "fc.weight": (1, d_model), "fc.bias": (1,)}
    widths = {"q": (d_model, d_model), "k": (d_model, d_model), "v": (d_model, d_model), "o": (d_model, d_model),
              "in": (d_mlp, d_model), "out": (d_model, d_mlp), "ln1": (d_model,), "ln2": (d_model,)}
    for part, name in _layer_names(False, 0).items():
        shapes |= {f"{name}.weight": widths[part], f"{name}.bias": widths[part][:1]}
    shapes |= {"embeddings.LayerNorm.weight": (d_model,), "embeddings.LayerNorm.bias": (d_model,)}
    return {name: 0.1 * torch.randn(shape) for name, shape in shapes.items()}


BAD_INPUTS = {
    "binary --file": ["predict", "--ckpt", "{ckpt}", "--file", "{in}/binary.txt"],
    "latin-1 --file": ["predict", "--ckpt", "{ckpt}", "--file", "{in}/latin1.txt"],
    "NUL bytes in --file": ["predict", "--ckpt", "{ckpt}", "--file", "{in}/nul.txt"],
    "bad line 517 in --file": ["predict", "--ckpt", "{ckpt}", "--file", "{in}/bad_line.txt"],
    "--file is a folder": ["predict", "--ckpt", "{ckpt}", "--file", "{in}"],
    "ambiguous zN clause": ["solve", "a=+210", "--group", "z64"],
    "solve --max-clauses 0": ["solve", "a=+1", "--max-clauses", "0"],
    "zero-byte checkpoint": ["eval", "--ckpt", "{in}/zero.pt"],
    "state dict is a string": ["eval", "--ckpt", "{in}/string_state.pt"],
    "checkpoint is a folder": ["eval", "--ckpt", "{in}"],
    "--device tpu": ["eval", "--ckpt", "{ckpt}", "--device", "tpu"],
    "--device cuda:x": ["heads", "--ckpt", "{ckpt}", "--device", "cuda:x"],
    "--device cuda:99": ["eval", "--ckpt", "{ckpt}", "--device", "cuda:99"],
    "--file missing": ["predict", "--ckpt", "{ckpt}", "--file", "{in}/missing.txt"],
    "--samples 0": ["eval", "--ckpt", "{ckpt}", "--samples", "0"],
    "--samples -1": ["probe", "--ckpt", "{ckpt}", "--samples", "-1"],
    "--samples 1e9": ["heads", "--ckpt", "{ckpt}", "--samples", "1e9"],
    "--samples 10**9": ["patch", "--ckpt", "{ckpt}", "--samples", str(10**9)],
    "probe --samples 1": ["probe", "--ckpt", "{ckpt}", "--samples", "1"],
    "report --head-samples 1": ["report", "--ckpt", "{ckpt}", "--head-samples", "1", "--out", "r.html"],
    "--seed 2**70": ["eval", "--ckpt", "{ckpt}", "--seed", str(2**70)],
    "--seed -1": ["shortcut", "--ckpt", "{ckpt}", "--seed", "-1"],
    "--threshold nan": ["probe", "--ckpt", "{ckpt}", "--threshold", "nan"],
    "--threshold 2": ["probe", "--ckpt", "{ckpt}", "--threshold", "2"],
    "--threshold -1": ["probe", "--ckpt", "{ckpt}", "--threshold", "-1"],
    "--view-heads 99.99": ["heads", "--ckpt", "{ckpt}", "--samples", "8", "--view", "v.html", "--view-heads", "99.99"],
    "--view-heads without --view": ["heads", "--ckpt", "{ckpt}", "--samples", "8", "--view-heads", "0.0"],
    "--depth -1": ["patch", "--ckpt", "{ckpt}", "--depth", "-1"],
    "--plot is a folder": ["heads", "--ckpt", "{ckpt}", "--plot", "{in}"],
    "--plot under a file": ["probe", "--ckpt", "{ckpt}", "--plot", "{in}/a_file/map.html"],
    "--plot read-only": ["shortcut", "--ckpt", "{ckpt}", "--plot", "{in}/read_only.html"],
    "--view is a folder": ["heads", "--ckpt", "{ckpt}", "--view", "{in}"],
    "report --out is a folder": ["report", "--ckpt", "{ckpt}", "--out", "{in}"],
    "report --out under a file": ["report", "--ckpt", "{ckpt}", "--out", "{in}/a_file/r.html"],
    "train --out is a folder": ["train", "--out", "{in}", "--steps", "1"],
    "train --out under a file": ["train", "--out", "{in}/a_file/m.pt", "--steps", "1"],
    "train --out read-only": ["train", "--out", "{in}/read_only.html", "--steps", "1"],
    # one train option out of its range each
    **{f"{flag} {value}": ["train", flag, value] for flag, value in [
        ("--eval-size", "0"), ("--batch-size", "0"), ("--batch-size", "-1"), ("--steps", "-5"), ("--lr", "nan"),
        ("--lr", "inf"), ("--lr", "-1"), ("--weight-decay", "-1"), ("--n-heads", "0"), ("--eval-every", "0"),
        ("--save-every", "0"), ("--min-length", "0"), ("--min-length", "30"), ("--decay", "2"),
        ("--target-accuracy", "0"), ("--supervised", "0,99"), ("--group", "q7"),
    ]},
    "--n-heads 1 with mimicking": ["train", "--n-heads", "1", "--mimic-steps", "10"],
    "--n-heads 3 does not divide": ["train", "--n-heads", "3"],
    "--curriculum-start 0": ["train", "--curriculum", "--curriculum-start", "0"],
    "--curriculum-start 100": ["train", "--curriculum", "--curriculum-start", "100"],
    "train --device tpu": ["train", "--device", "tpu"],
    "unknown option": ["train", "--frobnicate"],
    "unknown command": ["frobnicate"],
    "no command": [],
    "bad --format": ["eval", "--format", "xml"],
    # nothing the package ships is ever written, --force or not, by any path to it
    "heads --plot onto the shipped model": ["heads", "--ckpt", "{ckpt}", "--plot", "{data}/model.pt"],
    "zoo --out onto a shipped model --force": ["zoo", "chain-follower", "--out", "{data}/shortcut.pt", "--force"],
    "import --out onto a shipped model --force": ["import", "{in}/bert.pth", "--n-heads", "2", "--out", "{data}/model.pt", "--force"],
    "report --out onto a shipped log": ["report", "--ckpt", "{ckpt}", "--out", "{data}/model.log.jsonl"],
    "--plot into the data folder by a relative path": ["probe", "--ckpt", "{ckpt}", "--plot", "{data_rel}/map.html"],
    "--plot into the data folder through a symlink": ["shortcut", "--ckpt", "{ckpt}", "--plot", "{in}/link/map.html"],
    "train --out into the data folder through a symlink": ["train", "--out", "{in}/link/new.pt", "--force"],
    "replicate --runs is the data folder": ["replicate", "R1", "--runs", "{data}", "--out", "{in}/rows"],
    "replicate --out inside the data folder": ["replicate", "R1", "--runs", "{in}/runs", "--out", "{data}/rows"],
    "zoo --out bundled": ["zoo", "chain-follower", "--out", "bundled"],
    "import --out bundled-shortcut": ["import", "{in}/bert.pth", "--n-heads", "2", "--out", "bundled-shortcut"],
    "heads --view bundled": ["heads", "--ckpt", "{ckpt}", "--view", "{in}/bundled"],
    # import: what it cannot import right
    "import NaN weights": ["import", "{in}/nan.pth", "--n-heads", "2", "--out", "{in}/x.pt"],
    "import --n beyond the position table": ["import", "{in}/bert.pth", "--n-heads", "2", "--n", "13", "--out", "{in}/x.pt"],
    "import --n beyond the names": ["import", "{in}/bert.pth", "--n-heads", "2", "--n", "27", "--out", "{in}/x.pt"],
    "import --n-heads 3 does not divide the width": ["import", "{in}/bert.pth", "--n-heads", "3", "--out", "{in}/x.pt"],
    "import a folder": ["import", "{in}", "--n-heads", "2", "--out", "{in}/x.pt"],
    "import a raw pickle": ["import", "{in}/raw.pkl", "--n-heads", "2", "--out", "{in}/x.pt"],
    # option values that slipped through or failed late
    "replicate --seeds 10**12": ["replicate", "R1", "--seeds", str(10**12), "--runs", "{in}/runs", "--out", "{in}/rows"],
    "train --supervised=-1": ["train", "--supervised=-1"],
    "train --out newdir/": ["train", "--out", "{in}/newdir/", "--steps", "1"],
    "train --resume --steps below the saved step": ["train", "--out", "{in}/trained.pt", "--resume", "--steps", "2"],
    "train log path is a folder": ["train", "--out", "{in}/logged.pt", "--steps", "1"],
    "100k-character variable name": ["solve", "x" * 100_000 + "=+1"],
    "checkpoint with an unknown group": ["eval", "--ckpt", "{in}/bad_group.pt"],
    "checkpoint is a raw pickle": ["eval", "--ckpt", "{in}/raw.pkl"],
}
# what the line must name, for the rows above whose message once named something else (a temporary file, n_ctx)
# or nothing (a folder)
MUST_NAME = {
    "heads --plot onto the shipped model": "data folder", "zoo --out onto a shipped model --force": "data folder",
    "--plot into the data folder through a symlink": "data folder", "zoo --out bundled": "shipped with legointerp",
    "import --out bundled-shortcut": "shipped with legointerp", "import NaN weights": "nan.pth",
    "import --n beyond the position table": "--n 13", "import --n beyond the names": "--n 27",
    "import --n-heads 3 does not divide the width": "--n-heads", "import a folder": "is a folder",
    "replicate --seeds 10**12": "--seeds", "train --supervised=-1": "supervised", "train --out newdir/": "newdir/",
    "train --resume --steps below the saved step": "--steps 2", "train log path is a folder": "logged.log.jsonl",
    "checkpoint with an unknown group": "bad_group.pt", "checkpoint is a raw pickle": "raw.pkl",
}


def _snapshot(root):
    """Every file under ``root`` with its size and time (a folder by its name: what it holds is listed), but the
    empty lock file a refused --resume leaves beside its --out (files.OutputLock keeps lock files by design)."""
    return {(str(p.relative_to(root)), *((p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else ()))
            for p in root.rglob("*") if not p.name.endswith(".lock")}


def _shipped_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted(shipped_folder().rglob("*")):
        digest.update(path.name.encode() + (path.read_bytes() if path.is_file() else b"/"))
    return digest.hexdigest()


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_every_bad_input_is_one_line_exit_2_and_writes_nothing(capsys, tmp_path, monkeypatch, inputs, name):
    monkeypatch.chdir(tmp_path)
    before, shipped = _snapshot(tmp_path), _shipped_digest()
    with warnings.catch_warnings(record=True) as caught:  # a library's warning would be a second line
        warnings.simplefilter("always")
        code, out, err = run(capsys, *[a.format(**inputs) for a in BAD_INPUTS[name]])
    assert code == 2 and out == "" and "Traceback" not in err and not caught
    assert len(err.strip().splitlines()) == 1 and ": error: " in err and len(err) < 600
    assert MUST_NAME.get(name, "") in err
    assert _snapshot(tmp_path) == before and _shipped_digest() == shipped


def test_argparse_errors_point_at_help_instead_of_a_usage_block(capsys):
    code, _, err = run(capsys, "eval", "--samples", "0")
    assert code == 2 and "usage:" not in err and "legointerp eval --help" in err and "1..100000" in err


def test_a_bad_line_is_named_by_its_line_number(capsys, inputs):
    _, _, err = run(capsys, "predict", "--ckpt", inputs["ckpt"], "--file", inputs["in"] + "/bad_line.txt")
    assert "line 517:" in err and "'q'" in err
    _, _, err = run(capsys, "predict", "--ckpt", inputs["ckpt"], "--file", inputs["in"] + "/latin1.txt")
    assert "line 2:" in err and "UTF-8" in err


def test_file_dash_reads_standard_input(capsys, monkeypatch, ckpt):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"a=+1; b=-a\n\nc=+1; d=-e\n")))
    code, _, err = run(capsys, "predict", "--ckpt", ckpt, "--file", "-")
    assert code == 2 and "stdin line 3:" in err and "'e'" in err


def test_file_dash_with_standard_input_closed_is_one_line(capsys, monkeypatch, ckpt):
    monkeypatch.setattr("sys.stdin", None)  # what Python sets when started with <&-
    code, _, err = run(capsys, "predict", "--ckpt", ckpt, "--file", "-")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--file -" in err and "closed" in err


def test_ambiguous_clause_asks_for_a_space_and_a_space_resolves_it(capsys):
    code, _, err = run(capsys, "solve", "a=+210", "--group", "z64")
    assert code == 2 and "ambiguous" in err and "'a=+2 10'" in err and "'a=+21 0'" in err
    for text, value in (("a=+21 0", "21"), ("a=+2 10", "12"), ("a=+12", "3")):
        code, out, _ = run(capsys, "solve", text, "--group", "z64", "--format", "json")
        assert code == 0 and json.loads(out) == {"a": value}


def test_a_closed_pipe_ends_quietly(capsys, monkeypatch):
    class ClosedPipe(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("sys.stdout", ClosedPipe())
    code = main(["solve", "a=+1; b=-a"])
    assert code == EXIT_BROKEN_PIPE and capsys.readouterr().err == ""


def test_device_auto_works_everywhere(capsys, ckpt):
    code, out, _ = run(capsys, "eval", "--ckpt", ckpt, "--samples", 20, "--device", "auto", "--format", "json")
    assert code == 0 and json.loads(out)["samples"] == 20


def test_report_json_summarises_the_written_page(capsys, ckpt, tmp_path):
    page = tmp_path / "nested" / "r.html"
    code, out, _ = run(capsys, "report", "--ckpt", ckpt, "--samples", 10, "--head-samples", 2, "--patch-samples", 1,
                       "--quiet", "--out", page, "--format", "json")
    document = json.loads(out)
    assert code == 0 and page.stat().st_size > 0 and document["report"] == str(page)
    assert list(document["accuracy"]) == [str(k) for k in range(6)] and len(document["heads"]) == 3 * 4
    assert document["shortcut"] in {"shortcut", "no shortcut", "inconclusive"}


@pytest.mark.parametrize("argv", [["zoo"], ["shortcut", "--samples", "64"], ["heads", "--samples", "32"],
                                  ["patch", "--samples", "4"], ["eval", "--samples", "64"]])
def test_terminal_tables_fit_120_columns_and_explain_on_stdout(capsys, tmp_path, argv):
    task = LegoTask(TaskConfig(n=6))
    model = small_model(task)
    unevaluated = save_checkpoint(Checkpoint(model_config=model.cfg, task_config=task.config,
                                             state_dict=model.state_dict()), tmp_path / "model.pt")
    code, out, _ = run(capsys, *argv, *([] if argv == ["zoo"] else ["--ckpt", unevaluated]))
    assert code == 0 and max(map(len, out.splitlines())) <= 120, out
    assert "None" not in out and "  -1 " not in out
    if argv[0] == "patch":
        assert "0 = corrupted, 1 = clean" in out and "Pearson r" in out
    if argv[0] == "shortcut":
        assert "training sentences" in out and "verdict:" in out
    if argv[0] == "zoo":
        assert "counter-at-bos description: hand-set shortcut" in out


def test_recorded_commands_name_no_folder_of_the_machine(monkeypatch):
    from legointerp.checkpoint import load_checkpoint, resolve

    monkeypatch.setattr(sys, "argv", ["legointerp", "train", "--out", "/home/me/runs/m.pt", "--log=/srv/x/y.jsonl", "--seed", "1"])
    assert cli._command() == "legointerp train --out m.pt --log=y.jsonl --seed 1"
    for shipped in ("bundled", "bundled-shortcut"):
        assert " /" not in load_checkpoint(resolve(shipped)).command

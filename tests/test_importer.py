"""legointerp import: state dicts saved by the official LEGO code, in each layout, give transformers' logits."""

import json

import pytest
import torch
from torch import nn

from legointerp.checkpoint import load_checkpoint, load_model
from legointerp.cli import main
from legointerp.evaluate import clause_logits
from legointerp.evaluate import test_batch as fresh
from legointerp.importer import import_state_dict
from legointerp.task import WORDPIECE_IDS, LegoTask, TaskConfig

transformers = pytest.importorskip("transformers")
TASK = LegoTask(TaskConfig(surface="official"))
VOCAB = max(WORDPIECE_IDS.values()) + 1  # the word-piece ids reach 11748 ('val'), so the table is full height


def source_model(albert: bool, seed: int = 0):
    """A tiny random BertModel / AlbertModel on bert-base-uncased's id range, every parameter moved off its init."""
    torch.manual_seed(seed)
    sizes = dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32,
                 max_position_embeddings=TASK.n_ctx + 4, attn_implementation="eager", hidden_act="gelu")
    model = (transformers.AlbertModel(transformers.AlbertConfig(embedding_size=8, **sizes)) if albert
             else transformers.BertModel(transformers.BertConfig(**sizes))).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


class Model(nn.Module):
    """A researcher's run: BertModel + Linear(d, 1), saved through DataParallel (module. prefix)."""

    def __init__(self, bert, width):
        super().__init__()
        self.bert, self.fc = bert, nn.Linear(width, 1)


class Encoder(nn.Module):
    """The official fine-tuning's model: nn.Sequential(embeddings, encoder) + Linear(d, 6)."""

    def __init__(self, base, width):
        super().__init__()
        self.base, self.classifier = nn.Sequential(base.embeddings, base.encoder), nn.Linear(width, 6)


def layouts(albert: bool):
    """(name, state dict to save, the head (Linear or None)) for each layout the official code and its users write."""
    base = source_model(albert)
    model, encoder = Model(base, 16), Encoder(base, 16)
    with torch.no_grad():
        for head in (model.fc, encoder.classifier):
            head.weight.normal_(0, 1.0)  # logits of a few units: argmaxes spread over every class
    return base, {"plain": (base.state_dict(), None),
                  "module": ({"module." + k: v for k, v in model.state_dict().items()}, model.fc),
                  "sequential": ({"module." + k: v for k, v in encoder.state_dict().items()}, encoder.classifier)}


@torch.no_grad()
def reference(base, head, batch) -> torch.Tensor:
    """(B, n, k) transformers' hidden state at each clause's first token through the source's head."""
    hidden = base(TASK.wordpiece_ids[batch.tokens]).last_hidden_state
    return head(clause_logits(hidden, batch))


@pytest.mark.parametrize("albert", [False, True])
def test_every_layout_gives_transformers_logits(tmp_path, albert):
    base, saved = layouts(albert)
    batch = fresh(TASK, 64, seed=7)
    for name, (state, head) in saved.items():
        path = tmp_path / f"{name}.pth"
        torch.save(state, path)
        imported = import_state_dict(path, n_heads=4, n_layers=2 if albert else None, zero_head=head is None, samples=50)
        model = imported.checkpoint.build_model()
        assert imported.architecture == ("ALBERT" if albert else "BERT") and model.cfg.tied == albert
        assert model.cfg.d_vocab == TASK.d_vocab and model.cfg.d_vocab_out == 2
        assert len(imported.source_sha256) == 64 and imported.checkpoint.provenance["source_sha256"] == imported.source_sha256
        with torch.no_grad():
            ours = clause_logits(model(batch.tokens), batch)
        if head is None:
            assert not ours.any() and imported.accuracy is None
            continue
        theirs = reference(base, head, batch)
        if theirs.shape[-1] == 1:  # [0, w]: value 1's logit is the source's, value 0's is zero
            assert (ours[..., 0] == 0).all() and (ours[..., 1] - theirs[..., 0]).abs().max() <= 1e-5
        else:
            assert (ours - theirs[..., :2]).abs().max() <= 1e-5
            assert imported.outside == pytest.approx(float((reference(base, head, fresh(TASK, 50, 0)).argmax(-1) >= 2)
                                                           .float().mean()))


def test_cli_writes_a_checkpoint_every_command_reads(tmp_path, capsys):
    _, saved = layouts(albert=False)
    torch.save(saved["sequential"][0], tmp_path / "src.pth")
    out = tmp_path / "imported.pt"
    assert main(["import", str(tmp_path / "src.pth"), "--n-heads", "4", "--out", str(out), "--samples", "20",
                 "--format", "json"]) == 0
    record = json.loads(capsys.readouterr().out)
    checkpoint = load_checkpoint(out)
    assert record["head"] == checkpoint.provenance["head"] and record["source_sha256"] == checkpoint.provenance["source_sha256"]
    assert 0 <= record["outside_share"] <= 1 and checkpoint.task_config.surface == "official"
    model, task, _ = load_model(out)
    assert task.official and model.cfg.norm == "post"
    assert main(["heads", "--ckpt", str(out), "--samples", "8", "--no-ablation", "--format", "json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) > 0
    one_line_exit_2(capsys, ["import", str(tmp_path / "src.pth"), "--n-heads", "4", "--out", str(out)], "already exists")


def one_line_exit_2(capsys, argv, match: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err


def test_bad_sources_end_in_one_line(tmp_path, capsys):
    base, saved = layouts(albert=False)
    out = ["--out", str(tmp_path / "x.pt")]
    torch.save(base, tmp_path / "pickled.pth")  # a whole model object, not a state dict
    torch.save([1, 2], tmp_path / "list.pth")
    torch.save({**saved["module"][0], "module.extra.weight": torch.zeros(3, 16)}, tmp_path / "extra.pth")
    torch.save({**saved["plain"][0], "encoder.layer.0.attention.self.distance_embedding.weight": torch.zeros(2)},
               tmp_path / "unknown.pth")
    torch.save(saved["plain"][0], tmp_path / "plain.pth")
    one_line_exit_2(capsys, ["import", str(tmp_path / "pickled.pth"), "--n-heads", "4", *out], "state_dict")
    one_line_exit_2(capsys, ["import", str(tmp_path / "list.pth"), "--n-heads", "4", *out], "not a state dict")
    one_line_exit_2(capsys, ["import", str(tmp_path / "extra.pth"), "--n-heads", "4", *out], "unknown keys")
    one_line_exit_2(capsys, ["import", str(tmp_path / "unknown.pth"), "--n-heads", "4", "--zero-head", *out], "unknown encoder keys")
    one_line_exit_2(capsys, ["import", str(tmp_path / "plain.pth"), *out], "--n-heads")
    one_line_exit_2(capsys, ["import", str(tmp_path / "plain.pth"), "--n-heads", "3", "--zero-head", *out], "n_heads=3")
    one_line_exit_2(capsys, ["import", str(tmp_path / "plain.pth"), "--n-heads", "4", *out], "no classifier")
    assert not (tmp_path / "x.pt").exists()

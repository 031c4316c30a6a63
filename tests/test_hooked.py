"""Every model kind loads as a TransformerLens model: our HookedRootModule and the exported TransformerBridge agree."""

import pytest
import torch
import transformer_lens.patching as patching

from legointerp.evaluate import clause_logits
from legointerp.hooked import to_bridge
from tests.conftest import small_model

KINDS = {"bert": {}, "albert": {"tied": True}, "albert-stochastic-depth": {"tied": True, "n_layers": 4, "min_depth": 2}}


def perturbed(model):
    """Random init has near-zero biases and unit norms; perturb everything so that a mis-mapped weight shows."""
    generator = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.data += 0.1 * torch.randn(p.shape, generator=generator)
    return model


@pytest.mark.parametrize("kind", KINDS)
def test_bridge_logits_equal_the_trained_model(task, kind):
    model = perturbed(small_model(task, **KINDS[kind]))
    bridge = to_bridge(model)
    assert not bridge.training
    assert len(bridge.blocks) == model.cfg.n_layers  # a tied model is unrolled
    batch = task.sample(16, torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = (bridge(batch.tokens) - model(batch.tokens)).abs().max()
    assert difference <= 1e-4


def test_bridge_patterns_and_residuals_match_under_the_same_names(task):
    model = perturbed(small_model(task))
    bridge = to_bridge(model)
    tokens = task.sample(4).tokens
    _, ours = model.run_with_cache(tokens)
    _, theirs = bridge.run_with_cache(tokens)
    for name in ["blocks.1.attn.hook_pattern", "blocks.2.hook_resid_pre", "blocks.0.attn.hook_z", "hook_embed"]:
        assert torch.allclose(ours[name], theirs[name], atol=1e-4), name


def test_transformer_lens_patching_runs_on_both_and_agrees(task):
    model = perturbed(small_model(task, n_layers=2))
    bridge = to_bridge(model)
    clean = task.sample(4, torch.Generator().manual_seed(0))
    corrupted = clean.tokens.clone()
    corrupted[:, 1:-1] = task.sample(4, torch.Generator().manual_seed(1)).tokens[:, 1:-1]

    def metric(logits):
        return clause_logits(logits, clean)[..., 0].mean()

    results = []
    for hooked in (model, bridge):
        _, cache = hooked.run_with_cache(clean.tokens)
        results.append(patching.get_act_patch_resid_pre(hooked, corrupted, cache, metric))
    assert results[0].shape == (2, task.n_ctx)
    assert torch.allclose(results[0], results[1], atol=1e-4)


def test_head_classifier_runs_on_the_bridge_and_agrees(task):
    from legointerp.heads import classify_heads

    model = perturbed(small_model(task, n_layers=2))
    batch = task.sample(32, torch.Generator().manual_seed(0))
    ours = classify_heads(model, batch, task).to_frame()
    theirs = classify_heads(to_bridge(model), batch, task).to_frame()
    assert (ours["label"] == theirs["label"]).all()
    columns = ["association", "manipulation", "broadcast", "self", "previous", "next", "ablation_drop"]
    assert ((ours[columns] - theirs[columns]).abs() < 1e-4).all().all()

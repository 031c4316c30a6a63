"""Exact patching equals TransformerLens's on the exported bridge; pairs corrupt exactly what they say."""

import pytest
import torch
import transformer_lens.patching as tl_patching

from legointerp.hooked import to_bridge
from legointerp.patching import (attribution, flip_root, flip_sign, normalised_metric, patch_head_z,
                                 patch_resid_pre)
from tests.conftest import small_model


def model_and_pair(task, depth=2):
    model = small_model(task, n_layers=2)
    with torch.no_grad():
        for p in model.parameters():
            p += 0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3))
    batch = task.sample(6, torch.Generator().manual_seed(0))
    return model, flip_sign(task, batch, depth)


def test_flip_sign_changes_one_operator_and_the_values_after_it(task):
    batch = task.sample(50, torch.Generator().manual_seed(1))
    pair = flip_sign(task, batch, depth=2)
    changed = (pair.clean.tokens != pair.corrupted.tokens)
    assert (changed.sum(1) == 1).all()
    assert (changed.nonzero()[:, 1] == pair.clean.clause_pos[0, 2] + 2).all()  # the operator of depth 2
    assert not pair.affected[:, :2].any() and pair.affected[:, 2:].all()  # S2: every later value flips
    assert (pair.clean.clause_pos == pair.clean.clause_pos[0]).all()  # one clause order for the batch
    solved = task.solve(task.parse(task.to_text(pair.corrupted.tokens[0])))
    names = task.variable_names(pair.corrupted, 0)
    assert [solved[v] for v in names] == [task.group.literal_names[i] for i in pair.corrupted.values[0].tolist()]


def test_flip_root_changes_every_value(task):
    pair = flip_root(task, task.sample(20, torch.Generator().manual_seed(2)))
    assert pair.affected.all()
    assert ((pair.clean.tokens != pair.corrupted.tokens).sum(1) == 1).all()


def test_metric_is_zero_on_corrupted_and_one_on_clean(task):
    model, pair = model_and_pair(task)
    metric = normalised_metric(model, pair)
    assert metric(model(pair.corrupted.tokens)).item() == pytest.approx(0.0, abs=1e-5)
    assert metric(model(pair.clean.tokens)).item() == pytest.approx(1.0, abs=1e-5)


def test_exact_patching_equals_transformer_lens_on_the_bridge(task):
    model, pair = model_and_pair(task)
    bridge = to_bridge(model)
    metric = normalised_metric(model, pair)
    _, clean_cache = bridge.run_with_cache(pair.clean.tokens)
    theirs_resid = tl_patching.get_act_patch_resid_pre(bridge, pair.corrupted.tokens, clean_cache, metric)
    theirs_heads = tl_patching.get_act_patch_attn_head_out_by_pos(bridge, pair.corrupted.tokens, clean_cache, metric)
    ours_resid = patch_resid_pre(model, pair, metric, max_batch=40)  # small chunks: exercise the splitting
    ours_heads = patch_head_z(model, pair, metric, max_batch=40)
    assert (ours_resid - theirs_resid).abs().max() <= 1e-4
    assert (ours_heads - theirs_heads).abs().max() <= 1e-4
    # patching the corrupted operator's own position at layer 0 restores the clean run exactly
    assert ours_resid[0, pair.clean.clause_pos[0, 2] + 2].item() == pytest.approx(1.0, abs=1e-5)


def test_attribution_is_zero_where_clean_and_corrupted_agree_and_tracks_exact_patching(task):
    model, pair = model_and_pair(task)
    metric = normalised_metric(model, pair)
    resid, heads = attribution(model, pair, metric)
    assert resid.shape == (2, task.n_ctx) and heads.shape == (2, task.n_ctx, 4)
    corrupted_position = int(pair.clean.clause_pos[0, 2] + 2)
    untouched = torch.ones(task.n_ctx, dtype=torch.bool)
    untouched[corrupted_position] = False
    assert (resid[0, untouched] == 0).all() and resid[0, corrupted_position] != 0
    exact = patch_resid_pre(model, pair, metric)
    # estimates of (patched - corrupted); the corrupted run scores 0, so they compare with the exact scores
    correlation = torch.corrcoef(torch.stack([resid.flatten(), exact.flatten()]))[0, 1]
    assert correlation > 0.5


def test_patch_result_tables_and_figure(task):
    from legointerp.patching import patch

    model, _ = model_and_pair(task)
    result = patch(model, task.sample(4, torch.Generator().manual_seed(5)), task, corruption="root", heads=True)
    frame = result.to_frame()
    assert len(frame) == 2 * task.n_ctx * (1 + 4)
    assert frame["token"].iloc[0] == "0:[BOS]" and "agreement" in result.to_dict()
    assert -1 <= result.agreement <= 1
    assert len(result.plot().data) == 2

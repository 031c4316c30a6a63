"""Logit lens and direct logit attribution: exact against the model's own logits and TransformerLens's cache helpers."""

import pytest
import torch

from legointerp.evaluate import accuracy_by_position, clause_logits
from legointerp.hooked import to_bridge
from legointerp.lens import answer_contrast, direct_logit_attribution, logit_lens
from legointerp.task import LegoTask, TaskConfig
from tests.conftest import small_model
from tests.test_hooked import perturbed


def at_readout(stack: torch.Tensor, batch) -> torch.Tensor:
    """(components, B, T, ...) -> (components, B, n, ...) at each chain position's readout token."""
    return stack[:, torch.arange(len(batch))[:, None], batch.clause_pos]


@pytest.mark.parametrize("group", ["task1", "task2"])  # two values, and six (logit difference against the mean)
@pytest.mark.parametrize("tied", [False, True])
def test_attribution_sums_to_the_models_logit_difference(group, tied):
    task = LegoTask(TaskConfig(n=6, group=group))
    model = perturbed(small_model(task, tied=tied))
    batch = task.sample(32, torch.Generator().manual_seed(0), min_length=2)  # padded, mixed lengths
    result = direct_logit_attribution(model, batch)
    logits = clause_logits(model(batch.tokens, batch.attention_mask), batch)
    true = logits.gather(-1, batch.values[..., None]).squeeze(-1)
    expected = true - (logits.sum(-1) - true) / (task.n_classes - 1)
    assert torch.allclose(result.total, expected, atol=1e-4)
    assert torch.allclose(result.attribution.sum(0), expected, atol=1e-4)
    assert result.attribution.shape == (2 + 3 * (4 + 1) + 1, 32, 6) == (len(result.components), *batch.values.shape)
    assert result.attribution[2:-1].abs().sum() > 0.1 * expected.abs().sum()  # the blocks carry the answer


def test_attribution_per_head_and_mlp_equals_transformer_lens_on_the_bridge(task):
    model = perturbed(small_model(task))
    batch = task.sample(8, torch.Generator().manual_seed(0))
    result = direct_logit_attribution(model, batch)
    _, cache = to_bridge(model).run_with_cache(batch.tokens)
    direction = (answer_contrast(batch.values, task.n_classes) @ model.W_U.T) * model.ln_final.w  # (B, n, D)
    heads = at_readout(cache.stack_head_results(apply_ln=True), batch)  # (L H, B, n, D), ln_final's scale frozen
    components = at_readout(cache.decompose_resid(apply_ln=True), batch)  # embed, pos_embed, (attn, mlp) per layer
    theirs = {"L1H2": heads[4 + 2], "L2H0": heads[8], "embed": components[0], "pos_embed": components[1],
              "L0 MLP": components[3], "L2 MLP": components[7]}
    for label, stream in theirs.items():
        ours = result.attribution[result.components["component"].tolist().index(label)]
        assert torch.allclose(ours, (stream * direction).sum(-1), atol=1e-4), label


def test_logit_lens_ends_at_the_models_logits_and_matches_accumulated_resid(task):
    model = perturbed(small_model(task, tied=True))
    batch = task.sample(16, torch.Generator().manual_seed(0))
    lens = logit_lens(model, batch)
    assert lens.logits.shape == (model.cfg.n_layers + 1, 16, 6, task.n_classes)
    assert torch.allclose(lens.logits[-1], clause_logits(model(batch.tokens), batch), atol=1e-5)
    assert lens.accuracy[-1] == pytest.approx(accuracy_by_position(model, batch).numpy())
    _, cache = model.run_with_cache(batch.tokens)
    theirs = at_readout(cache.accumulated_resid(apply_ln=True), batch) @ model.W_U + model.b_U
    assert torch.allclose(lens.logits, theirs, atol=1e-5)
    assert not torch.allclose(lens.logits[0], lens.logits[-1], atol=1e-2)  # the lens does change with depth


def test_frames_and_figures_skip_depths_no_sentence_reaches(task):
    model = small_model(task)
    batch = task.sample(24, torch.Generator().manual_seed(0), min_length=2)
    batch.lengths[:] = torch.where(batch.lengths == 6, 5, batch.lengths)  # no sentence counts depth 5
    lens = logit_lens(model, batch).to_frame()
    assert len(lens) == (model.cfg.n_layers + 1) * 6
    assert lens.loc[lens.depth == 5, "accuracy"].isna().all() and lens.loc[lens.depth < 5, "accuracy"].notna().all()
    assert (lens.loc[lens.depth == 1, "sentences"] == 24).all()
    attribution = direct_logit_attribution(model, batch)
    frame = attribution.to_frame()
    assert set(frame["kind"]) == {"embed", "pos_embed", "head", "mlp", "biases"}
    assert (frame.query("kind == 'head'").groupby("depth").size() == model.cfg.n_layers * model.cfg.n_heads).all()
    head = frame.query("component == 'L1H2' and depth == 3").iloc[0]
    assert (head["layer"], head["head"]) == (1, 2)
    valid = batch.valid[:, 3]
    index = 2 + 1 * (model.cfg.n_heads + 1) + 2  # embed, pos_embed, then each layer's heads and MLP
    assert head["attribution"] == pytest.approx(float(attribution.attribution[index, valid, 3].mean()), abs=1e-6)
    assert frame.groupby("depth")["attribution"].sum()[:5].to_numpy() == pytest.approx(
        frame.groupby("depth")["logit_difference"].first()[:5].to_numpy(), abs=1e-4)
    assert len(attribution.plot().data) == 1 and len(logit_lens(model, batch).plot().data) == 1
    for figure in (attribution.plot(), logit_lens(model, batch).plot()):  # the title fits write_image's 700 px
        assert len(figure.layout.title.text.split("<br>")[0]) <= 40


def test_post_ln_models_are_refused_with_one_clear_line(task):
    from legointerp.model import ConfigError

    model = small_model(task, norm="post", n_layers=2)
    batch = task.sample(8, torch.Generator().manual_seed(0))
    for analysis in (lambda: logit_lens(model, batch), lambda: direct_logit_attribution(model, batch)):
        with pytest.raises(ConfigError, match="needs a pre-LN model"):
            analysis()


def test_attribution_colour_range_is_robust_to_one_huge_cell(task):
    model = small_model(task)
    batch = task.sample(16, torch.Generator().manual_seed(0))
    result = direct_logit_attribution(model, batch)
    typical = float(result.attribution.abs().mean())
    result.attribution[5, :, 3] += 2e5  # one cell, as on a zoo model, whose hand-set writes of 1e5 cancel
    heatmap = result.plot().data[0]
    assert 0 < heatmap.zmax < 1e3 and heatmap.zmin == -heatmap.zmax
    assert heatmap.zmax > typical / 10  # the other cells keep their colours

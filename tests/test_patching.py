"""Exact patching equals TransformerLens's on the exported bridge; pairs corrupt exactly what they say; attribution
equals TransformerLens's, and integrated gradients reach exact patching where they must; the fast forward pass and
encoder equal the model's and the task's; predict and patch on the command line."""

import json

import pytest
import torch
import transformer_lens.patching as tl_patching

from legointerp import cli
from legointerp.checkpoint import Checkpoint, save_checkpoint
from legointerp.cli import main as cli_main
from legointerp.evaluate import Inference, clause_logits, encode, predict, prediction_frame
from legointerp.hooked import to_bridge
from legointerp.patching import (attribution, flip_root, flip_sign, normalised_metric, patch,
                                 patch_head_z, patch_resid_pre)
from legointerp.task import LegoError
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


def test_head_patching_on_a_post_ln_model_equals_transformer_lens_on_the_model(task):
    model = small_model(task, n_layers=2, norm="post")
    with torch.no_grad():
        for p in model.parameters():
            p += 0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3))
    pair = flip_sign(task, task.sample(6, torch.Generator().manual_seed(0)), 2)
    metric = normalised_metric(model, pair)
    _, clean_cache = model.run_with_cache(pair.clean.tokens)
    theirs = tl_patching.get_act_patch_attn_head_out_by_pos(model, pair.corrupted.tokens, clean_cache, metric)
    ours = patch_head_z(model, pair, metric)
    assert (ours - theirs).abs().max() <= 1e-4 and (theirs - theirs[0, 0, 0]).abs().max() > 0.05


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
    model, _ = model_and_pair(task)
    result = patch(model, task.sample(4, torch.Generator().manual_seed(5)), task, corruption="root", heads=True)
    frame = result.to_frame()
    assert len(frame) == 2 * task.n_ctx * (1 + 4)
    assert frame["token"].iloc[0] == "0:[BOS]" and "agreement" in result.to_dict()
    assert -1 <= result.agreement <= 1
    figure = result.plot()
    assert len(figure.data) == 2  # and the subplot titles fit write_image's default 700 px: ~80 characters at 12 px
    assert all(note.font.size == 12 and len(line) <= 80 for note in figure.layout.annotations for line in note.text.split("<br>"))
    agreements = result.agreements.set_index("site")
    assert list(agreements.index) == ["resid_pre", "head_z"] and agreements["sites"].tolist() == [2 * task.n_ctx, 8 * task.n_ctx]
    assert agreements[["pearson", "spearman"]].abs().le(1).all().all()
    strongest = result.strongest(5)
    effect = (strongest["exact"] - result.corrupted_score).abs()
    assert len(strongest) == 5 and effect.is_monotonic_decreasing
    assert effect.iloc[-1] >= (frame["exact"] - result.corrupted_score).abs().nlargest(5).iloc[-1]
    assert patch(model, task.sample(4, torch.Generator().manual_seed(5)), task).head_z is None  # heads are opt-in


def test_integrated_gradients_reach_exact_patching_where_one_site_carries_the_whole_layer(task):
    model, pair = model_and_pair(task)
    metric = normalised_metric(model, pair)
    exact = patch_resid_pre(model, pair, metric)
    corrupted_position = int(pair.clean.clause_pos[0, 2] + 2)  # the only position where layer 0's input differs
    one_step, _ = attribution(model, pair, metric, heads=False)
    many_steps, _ = attribution(model, pair, metric, steps=64, heads=False)
    target = exact[0, corrupted_position].item()  # the corrupted run scores 0: the estimate is of the exact score
    assert many_steps[0, corrupted_position].item() == pytest.approx(target, abs=2e-3)
    assert abs(one_step[0, corrupted_position].item() - target) > 10 * abs(many_steps[0, corrupted_position].item() - target)
    # completeness: a layer's estimates sum to the effect of patching the whole layer
    with torch.no_grad():
        _, clean = model.run_with_cache(pair.clean.tokens, names_filter="blocks.1.hook_resid_pre")
        whole_layer = metric(model(clean["blocks.1.hook_resid_pre"], start_at_layer=1)).item()
    assert many_steps[1].sum().item() == pytest.approx(whole_layer, abs=5e-3)


def test_attribution_equals_transformer_lens_attribution_patch_on_the_bridge(task):
    from transformer_lens.tools.analysis.attribution_patching import attribution_patch

    model, pair = model_and_pair(task)
    position = int(pair.clean.clause_pos[0, -1])
    metric = lambda logits: (logits[:, position, 0] - logits[:, position, 1]).sum()  # noqa: E731  per example, summed
    _, heads = attribution(model, pair, metric)
    theirs = attribution_patch(to_bridge(model), pair.clean.tokens, pair.corrupted.tokens, metric).node_scores
    compared = [(heads[node.layer, node.position, node.head].item() / len(pair.clean), score)
                for node, score in theirs.items() if node.kind == "attn_head_out"]
    assert len(compared) == heads.numel()  # TransformerLens averages over the pairs, we sum
    assert torch.allclose(*map(torch.tensor, zip(*compared)), atol=1e-5)


@pytest.mark.parametrize("hardcoded", [(), ("association", "manipulation", None, None)])
def test_fast_forward_equals_the_model_with_padding(task, hardcoded):
    model = small_model(task, hardcoded=hardcoded, variable_offset=task.variable_offset)
    with torch.no_grad():
        for p in model.parameters():  # hardcoded heads' q and k stay zero, as the model keeps them
            p += 0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * (p != 0)
    batch = task.sample(64, torch.Generator().manual_seed(4), min_length=2)
    engine = Inference(model)
    mask = batch.attention_mask[:, None, None, :]
    fast = engine.run(engine.embed(batch.tokens), batch.clause_pos, key_mask=mask, patterns=model.fixed_patterns(batch.tokens))
    with torch.no_grad():
        expected = clause_logits(model(batch.tokens, batch.attention_mask), batch)
    assert torch.allclose(fast, expected, atol=1e-5)
    assert torch.equal(predict(model, batch, batch_size=7), expected.argmax(-1))
    flip = lambda logits, hook: -logits  # noqa: E731  a hook the fast path cannot run: predict must honour it
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", flip)]), torch.no_grad():
        assert torch.equal(predict(model, batch), clause_logits(model(batch.tokens, batch.attention_mask), batch).argmax(-1))


def test_vectorised_encode_equals_the_task_encoder_and_names_a_cycle(task):
    batch = task.sample(300, torch.Generator().manual_seed(6), min_length=1, heldout=True)
    sentences = [task.parse(task.to_text(row)) for row in batch.tokens]
    ours, theirs = encode(task, sentences), task.encode(sentences)
    for name, value in theirs.__dict__.items():
        assert torch.equal(getattr(ours, name), value), name
    frame = prediction_frame(task, ours, ours.values, first=10)
    assert len(frame) == int(ours.lengths.sum()) and frame["correct"].all() and frame["sentence"].iloc[0] == 10
    cyclic = [task.parse("a=+1; b=-c; c=+b")]
    with pytest.raises(LegoError, match="line 7: the clauses for b -> c form a cycle"):
        encode(task, sentences[:2] + cyclic, where=["line 1", "line 2", "line 7"])


@pytest.fixture
def ckpt(tmp_path, task):
    model = small_model(task)
    return save_checkpoint(Checkpoint(model_config=model.cfg, task_config=task.config, state_dict=model.state_dict()),
                           tmp_path / "model.pt")


def test_patch_command_prints_the_strongest_sites_and_says_how_many_it_cut(capsys, ckpt, task):
    assert cli_main(["patch", "--ckpt", str(ckpt), "--samples", "4", "--depth", "2", "--top", "5"]) == 0
    out, err = capsys.readouterr()
    rows = out.strip().splitlines()[1:6]
    sites = 3 * task.n_ctx  # resid_pre only: heads are opt-in
    notes = " ".join(out.strip().splitlines()[6:])  # the explanation follows the table, on stdout
    assert f"of {sites}: {sites - 5} more" in notes and "Pearson r =" in notes and "Spearman rho =" in notes
    effects = [float(row.split()[-2]) for row in rows]  # the exact score; the corrupted run scores 0
    assert [abs(e) for e in effects] == sorted((abs(e) for e in effects), reverse=True)


def test_predict_streams_every_sentence_in_each_format(capsys, tmp_path, monkeypatch, ckpt, task):
    monkeypatch.setattr(cli, "PREDICT_CHUNK", 16)  # several chunks from a small file
    batch = task.sample(50, torch.Generator().manual_seed(8), min_length=1)
    path = tmp_path / "sentences.txt"
    path.write_text("\n".join(task.to_text(row) for row in batch.tokens) + "\n")
    assert cli_main(["predict", "--ckpt", str(ckpt), "--file", str(path), "--format", "json"]) == 0
    documents = json.loads(capsys.readouterr().out)
    assert len(documents) == 50 and documents[-1]["sentence"] == task.to_text(batch.tokens[-1])
    assert cli_main(["predict", "--ckpt", str(ckpt), "--file", str(path), "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "sentence,variable,depth,predicted,true,correct" and len(lines) == 1 + int(batch.lengths.sum())
    assert cli_main(["predict", "--ckpt", str(ckpt), "--file", str(path)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 1 + int(batch.lengths.sum()) and len({len(line) for line in table}) == 1  # one aligned table


def test_transformer_lens_head_output_patching_refuses_a_plus_b_i_model_whose_copy_it_would_leave(task):
    from legointerp.model import ConfigError
    from tests.test_model import identity_model

    model = identity_model(task, n_layers=2)
    pair = flip_sign(task, task.sample(4, torch.Generator().manual_seed(0)), 1)
    metric = normalised_metric(model, pair)
    _, clean_cache = model.run_with_cache(pair.clean.tokens)
    with pytest.raises(ConfigError, match="hook_z.*patch blocks.0.attn.hook_identity_out as well"):
        tl_patching.get_act_patch_attn_head_out_all_pos(model, pair.corrupted.tokens, clean_cache, metric)
    # patching the copy along with z is the head's whole write: it restores the clean layer-0 attention output
    patched = lambda name: lambda activation, hook: clean_cache[name]  # noqa: E731
    names = ["blocks.0.attn.hook_z", "blocks.0.attn.hook_identity_out"]
    with model.hooks(fwd_hooks=[(name, patched(name)) for name in names]):
        _, cache = model.run_with_cache(pair.corrupted.tokens)
    assert torch.allclose(cache["attn_out", 0], clean_cache["attn_out", 0], atol=1e-5)
    # heads whose b is zero write all at z: TransformerLens's patching of them stands
    with torch.no_grad():
        for block in model.blocks:
            block.attn.b_I.zero_()
    _, clean_cache = model.run_with_cache(pair.clean.tokens)
    heads = tl_patching.get_act_patch_attn_head_out_all_pos(model, pair.corrupted.tokens, clean_cache, metric)
    assert heads.shape == (2, 4) and heads.abs().max() > 0


def test_patching_figure_clips_a_blown_up_gradient_estimate_so_the_other_cells_show():
    from legointerp.patching import PatchingResult

    generator = torch.Generator().manual_seed(0)
    exact = torch.rand(3, 8, generator=generator)  # effects up to ~1 over a corrupted score of 0
    estimate = 0.5 * exact
    result = PatchingResult(corruption="flip", positions=[str(p) for p in range(8)], resid_pre=exact,
                            attribution_resid=estimate, head_z=None, attribution_head=None)
    heatmap = result.plot().data[1]
    assert heatmap.zmax == pytest.approx(float(estimate.abs().max()))  # its own scale: smaller than the exact one
    blown = estimate.clone()
    blown[0, 3], blown[1, 5] = 4e4, -30.0  # what the zoo's counter-at-bos gave: one cell at 4e4, a few at 5 to 30
    result.attribution_resid = blown
    figure = result.plot()
    heatmap = figure.data[1]
    assert heatmap.zmax == -heatmap.zmin <= 2 * float(exact.max())
    assert (blown.abs() <= heatmap.zmax).float().mean() >= 0.9  # every other cell within the colours
    assert "2 cells beyond" in figure.layout.annotations[1].text

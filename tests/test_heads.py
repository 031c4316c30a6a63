"""The head classifier gives the known answer: planted heads of the zoo, planted patterns, the bundled model's chain
step, no mechanism on untrained models, and the zoo's decoys (inert look-alikes, ties, a counter at the last variable,
reverse steps); the ablations measure what an independent hook measures."""

import numpy as np
import pandas as pd
import pytest
import torch

from legointerp import zoo
from legointerp.checkpoint import load_model
from legointerp.evaluate import test_batch as fresh_batch
from legointerp.heads import (FLAG_DROP, INERT_DROP, KINDS, RECORD_FIELDS, ROLES, TIE, attention_view_html,
                              causal_evidence, classify_heads, head_verdict, kind_masks)
from legointerp.patterns import row_normalised
from tests.conftest import small_model


@pytest.fixture(scope="module")
def counter_report():
    model = zoo.build("counter-at-bos")
    return model, classify_heads(model.model, fresh_batch(model.task, 48, seed=3), model.task)


def test_every_planted_zoo_head_gets_its_kind_and_every_idle_head_is_inert(counter_report):
    model, report = counter_report
    for row in report.to_frame().itertuples():
        assert row.label == model.heads.get((row.layer, row.head), "inert"), (row.layer, row.head, row.label)
        assert row.attends == model.attends.get((row.layer, row.head), row.attends if (row.layer, row.head) in model.heads
                                                else "diffuse")


def test_truncated_ablation_finds_each_chain_step_that_full_runs_hide(counter_report):
    model, report = counter_report
    frame = report.to_frame().set_index(["layer", "head"])
    chain_steps = [key for key, kind in model.heads.items() if kind == "chain step" and key[0] < 11]
    # the chain-follower resolves depth k in block k or, when that block is ablated, in a later spare block
    assert (frame.loc[chain_steps, "truncated_drop"] > 0.3).all()
    assert (frame.loc[chain_steps[:5], "mean_drop"] < 0.05).all()
    idle = frame[frame["label"] == "inert"]
    assert (idle[["mean_drop", "resample_drop", "truncated_drop"]].abs() < 1e-6).all().all()
    # the last variable is the counter's: the chain step of the last block has nothing to do, so it is inert
    assert frame.loc[(11, 0), "truncated_drop"] == pytest.approx(0, abs=1e-6)
    assert head_verdict(frame.reset_index().iloc[11 * 4]) == "inert: attends like a chain step"


def test_untrained_models_get_no_mechanism_label():
    for name in ("untrained-bert", "untrained-albert"):
        model = zoo.build(name)
        frame = classify_heads(model.model, fresh_batch(model.task, 48), model.task, ablate=False).to_frame()
        assert set(frame["label"]) <= {"diffuse", "structured"}, frame["label"].value_counts()


def test_bundled_model_chain_step_heads_are_found():
    model, task, _ = load_model()
    frame = classify_heads(model, fresh_batch(task, 48, seed=5), task, ablate=False).to_frame()
    chain = frame[frame["label"] == "chain step"]
    assert set(chain["layer"]) >= set(range(1, 12))  # head 2 takes one chain step in every iteration
    assert (chain["lift"] > 0.9).all()
    assert chain.query("layer == 11")["head"].tolist() == [2]  # the last step, where chain step and frontier coincide
    assert frame.set_index(["layer", "head"]).loc[[(0, 0), (0, 3)], "label"].tolist() == ["association"] * 2


def _plant(model, batch, task, patterns_by_head):
    """Layer 0's pattern replaced by the given (B, Q, K) patterns per head."""
    planted = torch.stack(patterns_by_head, dim=1)
    model.add_hook("blocks.0.attn.hook_pattern", lambda pattern, hook: planted, is_permanent=True)


def _target(mask, batch):
    """Row-normalised mask; rows without a target rest on BOS."""
    rest = torch.zeros_like(mask)
    rest[:, :, 0] = True
    return row_normalised(torch.where(mask.any(-1, keepdim=True), mask, rest))


def test_planted_patterns_get_their_labels_and_a_shared_head_is_mixed(task):
    model = small_model(task, n_layers=2)
    batch = task.sample(64, torch.Generator().manual_seed(0))
    masks = kind_masks(batch, task, layer=0)
    manipulation, chain = _target(masks["manipulation"], batch), _target(masks["chain step"], batch)
    first = (batch.tokens[:, :, None] >= task.variable_offset) & masks["chain step"].any(-1, keepdim=True)
    shared = torch.where(first, (manipulation + chain) / 2, manipulation)
    _plant(model, batch, task, [_target(masks["association"], batch), manipulation, shared,
                                _target(masks["previous token"], batch)])
    report = classify_heads(model, batch, task, ablate=False)
    labels = report.to_frame().query("layer == 0").set_index("head")["label"].to_dict()
    assert labels == {0: "association", 1: "manipulation", 2: "mixed", 3: "previous token"}
    roles = report.role_frame(0, 1)
    assert list(roles.index) == list(ROLES) and list(roles.columns) == list(KINDS)
    assert roles.loc["variable", "manipulation"] == pytest.approx(1.0, abs=1e-5)


def test_ablation_drop_matches_an_independent_hook(task):
    model = small_model(task, n_layers=2)
    with torch.no_grad():
        for p in model.parameters():
            p += 0.3 * torch.randn_like(p)  # make the model's answers depend on its heads
        model.blocks[1].attn.W_O[2] = 0  # head 1.2 writes nothing
    batch = task.sample(256, torch.Generator().manual_seed(1))
    drops = classify_heads(model, batch, task).drops
    assert (drops["mean"].loc["L1H2"].abs() < 1e-9).all() and (drops["resample"].loc["L1H2"].abs() < 1e-9).all()

    def accuracy(logits):
        predicted = logits.gather(1, batch.clause_pos[..., None].expand(-1, -1, 2)).argmax(-1)
        return (predicted == batch.values).float().mean(0)

    def mean_ablate(z, hook):
        z[:, :, 0] = z[:, :, 0].mean(0, keepdim=True)
        return z

    def resample_ablate(z, hook):
        z[:, :, 0] = z[torch.roll(torch.arange(len(z)), 1), :, 0]
        return z

    with torch.no_grad():
        clean = accuracy(model(batch.tokens))
        for kind, hook in (("mean", mean_ablate), ("resample", resample_ablate)):
            expected = clean - accuracy(model.run_with_hooks(batch.tokens, fwd_hooks=[("blocks.0.attn.hook_z", hook)]))
            assert np.allclose(drops[kind].loc["L0H0"].to_numpy(), expected.numpy(), atol=1e-6)
        truncated = model(batch.tokens, n_layers=2)
        ablated = model.run_with_hooks(batch.tokens, n_layers=2, fwd_hooks=[("blocks.1.attn.hook_z", mean_ablate)])
    lost = accuracy(truncated) - accuracy(ablated)
    n = batch.values.shape[1]
    assert drops["truncated"].loc["L1H0", "forward"] == pytest.approx(float(lost[1]), abs=1e-6)
    assert drops["truncated"].loc["L1H0", "reverse"] == pytest.approx(float(lost[n - 2]), abs=1e-6)


def test_records_and_offline_attention_view(task):
    model = small_model(task, n_layers=2, tied=True)
    batch = task.sample(16, torch.Generator().manual_seed(2))
    report = classify_heads(model, batch, task)
    assert all(list(record) == RECORD_FIELDS for record in report.to_records())
    assert len(report.to_records()) == 2 * 4 and "every_iteration" in report.drops
    view = attention_view_html(model, batch, task, heads=[(0, 1), (1, 3)])
    assert "src=\"http" not in view and "https://unpkg" not in view
    assert "L0H1" in view and task.to_text(batch.tokens[0]).split("=")[0].strip() in view
    assert report.plot().data[0].z.shape == (2, 4)


def test_head_map_cells_show_label_and_lift_and_hover_names_the_head(task):
    model = small_model(task, n_layers=2)
    report = classify_heads(model, task.sample(16, torch.Generator().manual_seed(2)), task, ablate=False)
    heatmap = report.plot().data[0]
    assert heatmap.texttemplate == "%{text}"  # a Heatmap's texttemplate cannot read customdata: it renders "-"
    scores = report.scores.set_index(["layer", "head"])
    for layer in range(2):
        for head in range(4):
            row = scores.loc[(layer, head)]
            assert heatmap.text[layer][head] == f"{row.label}<br>{row.lift:.2f}"
            assert heatmap.hovertext[layer][head].startswith(f"L{layer}H{head}: <b>{row.label}</b>")


def test_head_map_of_a_shallow_model_fits_its_cells_text_and_its_legend(task):
    model = small_model(task, n_layers=2)
    report = classify_heads(model, task.sample(16, torch.Generator().manual_seed(2)), task, ablate=False)
    report.scores.loc[0, "flag"] = "needs a look"  # a flagged cell has a third line, "check"
    report.scores.loc[:3, "label"] = ["association", "manipulation", "chain step", "inert"]  # four legend entries
    figure = report.plot()
    margin = figure.layout.margin
    plot_height = figure.layout.height - (100 if margin.t is None else margin.t) - (80 if margin.b is None else margin.b)
    # 9 px text takes at least 11 px a line; plotly's legend at least 19 px an entry (else it scrolls)
    assert plot_height / 2 >= 3 * 11
    assert plot_height >= 19 * len([trace for trace in figure.data if trace.type == "scatter"]) >= 4 * 19


def test_hardcoded_heads_are_labelled_with_their_fixed_pattern_and_ablate(task):
    model = small_model(task, n_layers=2, hardcoded=("association", "manipulation", None, None),
                        variable_offset=task.variable_offset)
    batch = task.sample(32, torch.Generator().manual_seed(6))
    frame = classify_heads(model, batch, task).to_frame()
    assert frame.query("head == 0")["label"].eq("association").all()
    assert frame.query("head == 1")["label"].eq("manipulation").all()
    assert frame[["mean_drop", "resample_drop", "truncated_drop"]].notna().all().all()


def test_ablation_removes_the_identity_copy_of_plus_b_i_heads_too(task):
    from legointerp.model import ConfigError
    from legointerp.patching import flip_sign, normalised_metric, patch_head_z

    model = small_model(task, n_layers=2, identity_attention=True)
    with torch.no_grad():
        for p in model.parameters():
            p += 0.3 * torch.randn_like(p)  # nonzero a and b, answers that depend on the heads
    batch = task.sample(128, torch.Generator().manual_seed(3))
    drops = classify_heads(model, batch, task).drops["mean"]

    def accuracy(logits):
        return (logits.gather(1, batch.clause_pos[..., None].expand(-1, -1, 2)).argmax(-1) == batch.values).float().mean(0)

    def mean_ablate(activation, hook):
        activation[:, :, 0] = activation[:, :, 0].mean(0, keepdim=True)
        return activation

    with torch.no_grad():
        both = model.run_with_hooks(batch.tokens, fwd_hooks=[("blocks.0.attn.hook_z", mean_ablate),
                                                             ("blocks.0.attn.hook_identity_out", mean_ablate)])
        expected = accuracy(model(batch.tokens)) - accuracy(both)
    assert np.allclose(drops.loc["L0H0"].to_numpy(), expected.numpy(), atol=1e-6)
    pair = flip_sign(task, batch, 1)
    with pytest.raises(ConfigError, match="hook_identity_out"):
        patch_head_z(model, pair, normalised_metric(model, pair))


def _decoy(name: str, ablate: bool, samples: int = 24):
    built = zoo.build(name)
    report = classify_heads(built.model, fresh_batch(built.task, samples, seed=3), built.task, ablate=ablate)
    return built, report.to_frame().set_index(["layer", "head"]), report


def _assert_truth(built, frame):
    labels = {site: built.heads.get(site, "inert") for site in frame.index}
    assert frame["label"].to_dict() == labels
    for site, kind in built.attends.items():
        assert frame.loc[site, "attends"] == kind, site


@pytest.mark.parametrize("name", ["shadow-heads", "moved-heads"])
def test_heads_that_write_nothing_are_inert_whatever_their_attention(name):
    """Shadows attend exactly like the planted heads, idle heads have random queries and keys: W_O = 0 makes them
    inert by their weights alone, with no ablation run, and their attention stays on record."""
    built, frame, _ = _decoy(name, ablate=False)
    _assert_truth(built, frame)
    inert = frame[frame["label"] == "inert"]
    assert (inert["evidence"] == "weights").all() and (inert["output"] == 0).all()
    assert inert["attends"].isin(KINDS).any()  # the decoy bites: some inert head attends like a kind
    assert (frame.loc[frame["label"] != "inert", "output"] > 0.1).all()


def test_a_tie_is_decided_by_the_keys_only_one_kind_has():
    """L0H0 brings each clause's operand to every token of the clause: manipulation at the variable, and the operand's
    attention on itself, which association's mask explains equally (lift 1.00 both): the variables, where both kinds
    do their job, decide.  The chain steps tie with association at the operand tokens in the same way."""
    built, frame, _ = _decoy("operand-fetcher", ablate=False)
    _assert_truth(built, frame)
    head = frame.loc[(0, 0)]
    assert head["runner_up"] == "association" and head["runner_up_lift"] >= head["lift"] - TIE
    assert "association 0.00 vs manipulation 1.00" in head["tie"]
    assert frame.loc[(1, 0), "runner_up"] == "association" and "at the variables" in frame.loc[(1, 0), "tie"]


def test_a_head_counting_the_signs_at_the_last_variable_is_operators():
    """The counting head rests on BOS everywhere but at the last variable, where it attends to the operators."""
    built, frame, _ = _decoy("counter-only-last", ablate=False)
    assert frame.loc[(1, 3), ["label", "role"]].tolist() == ["operators", "last variable"]
    assert frame.loc[(1, 3), "lift"] > 0.8 and frame.loc[(1, 3), "runner_up"] != "broadcast"


@pytest.fixture(scope="module")
def both_ends():
    return _decoy("both-ends", ablate=True, samples=48)


def test_the_truncated_test_follows_a_reverse_step_backwards(both_ends):
    built, frame, _ = both_ends
    _assert_truth(built, frame)
    reverse = frame[frame["attends"] == "reverse step"]
    forward = frame[frame["attends"] == "chain step"]
    assert len(reverse) == len(forward) == 5
    assert (reverse["truncated_drop"] > 0.3).all() and (forward["truncated_drop"] > 0.3).all()
    assert (reverse["evidence"] == "truncated").all() and (frame["flag"] == "").all()


def test_every_label_shows_its_evidence_and_a_disagreement_is_flagged(both_ends):
    built, frame, report = both_ends
    working = frame[frame["label"] != "inert"]
    assert working["runner_up"].isin(KINDS).all() and working["runner_up_lift"].notna().all()
    named = working.apply(lambda r: r[f"{r['evidence']}_drop"], axis=1)
    assert np.allclose(named, working["evidence_drop"]) and (working["evidence_drop"] > INERT_DROP).all()
    # the forward depth's truncated drop for a reverse step: the step test finds nothing the full ablations find
    wrong = report.scores.assign(truncated_drop=report.drops["truncated"]["forward"].to_numpy())
    flags = causal_evidence(wrong).set_index(["layer", "head"]).loc[frame.index[frame["attends"] == "reverse step"], "flag"]
    assert flags.str.contains("truncated test").all()
    idle = pd.DataFrame({"label": ["diffuse", "diffuse"], "attends": ["diffuse", "diffuse"], "evidence": ["", ""],
                         "truncated_drop": [np.nan, 0.0], "mean_drop": [2 * FLAG_DROP, INERT_DROP / 2],
                         "resample_drop": [0.0, 0.0]})
    judged = causal_evidence(idle)
    assert judged["label"].tolist() == ["diffuse", "inert"] and "matches no kind" in judged["flag"][0]
    assert judged["evidence"].tolist() == ["mean", "mean"] and judged["flag"][1] == ""

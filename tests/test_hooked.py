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
    ours = classify_heads(model, batch, task, ablate=False).to_frame()
    theirs = classify_heads(to_bridge(model), batch, task, ablate=False).to_frame()  # ablations need start_at_layer
    assert (ours["label"] == theirs["label"]).all()
    columns = ["lift", "self", "entropy", "association", "manipulation", "chain step", "operators"]
    assert ((ours[columns] - theirs[columns]).abs().fillna(0) < 1e-4).all().all()


WEIGHTS = "W_Q W_K W_V W_O b_Q b_K b_V b_O W_in b_in W_out b_out W_E W_pos W_U b_U".split()


@pytest.mark.parametrize("kind", ["bert", "albert"])
def test_stacked_weights_equal_the_bridges(task, kind):
    model = perturbed(small_model(task, **KINDS[kind]))
    bridge = to_bridge(model)
    for name in WEIGHTS:
        ours, theirs = getattr(model, name), getattr(bridge, name)
        assert ours.shape == theirs.shape and torch.equal(ours, theirs), name
    assert torch.allclose(model.QK.AB, bridge.QK.AB, atol=1e-6) and torch.allclose(model.OV.AB, bridge.OV.AB, atol=1e-6)
    for layer, mlp_input in [(0, False), (2, True), (3, False)]:
        assert torch.allclose(model.accumulated_bias(layer, mlp_input), bridge.accumulated_bias(layer, mlp_input))


def test_cache_helpers_agree_with_the_bridges(task):
    model = perturbed(small_model(task))
    bridge = to_bridge(model)
    tokens = task.sample(4, torch.Generator().manual_seed(0)).tokens
    _, ours = model.run_with_cache(tokens)
    _, theirs = bridge.run_with_cache(tokens)
    values = torch.randint(task.n_classes, (4, task.n_ctx), generator=torch.Generator().manual_seed(2))
    helpers = {
        "accumulated_resid": lambda c: c.accumulated_resid(apply_ln=True, incl_mid=True),
        "decompose_resid": lambda c: c.decompose_resid(apply_ln=True),
        "decompose_resid mlp_input": lambda c: c.decompose_resid(layer=1, mlp_input=True, apply_ln=True),
        "stack_head_results": lambda c: c.stack_head_results(apply_ln=True, incl_remainder=True),
        "apply_ln_to_stack ln2": lambda c: c.apply_ln_to_stack(c.decompose_resid(layer=2, mlp_input=True), 2, mlp_input=True),
        "logit_attrs": lambda c: c.logit_attrs(c.decompose_resid(), values, incorrect_tokens=1 - values),
        "full decomposition": lambda c: c.get_full_resid_decomposition(expand_neurons=False, apply_ln=True),
    }
    for name, helper in helpers.items():
        assert torch.allclose(helper(ours), helper(theirs), atol=1e-4), name
    labels = ours.decompose_resid(return_labels=True)[1]
    assert labels[:2] == ["embed", "pos_embed"] and len(labels) == 2 + 2 * model.cfg.n_layers


def test_head_results_only_when_asked_and_equal_the_bridges(task):
    model = perturbed(small_model(task))
    tokens = task.sample(4, torch.Generator().manual_seed(0)).tokens
    logits, cache = model.run_with_cache(tokens)
    assert "blocks.0.attn.hook_result" not in cache.cache_dict
    model.set_use_attn_result(True)
    logits_with_results, cache = model.run_with_cache(tokens)
    assert torch.allclose(logits_with_results, logits, atol=1e-5)
    result = cache["result", 1]
    assert result.shape == (4, task.n_ctx, model.cfg.n_heads, model.cfg.d_model)
    assert torch.allclose(result.sum(-2) + model.blocks[1].attn.b_O, cache["attn_out", 1], atol=1e-5)
    _, theirs = to_bridge(model).run_with_cache(tokens)
    assert torch.allclose(cache.stack_head_results(), theirs.stack_head_results(), atol=1e-4)
    assert "use_attn_result" not in model.cfg.to_dict()


def test_padding_from_to_tokens_is_masked_by_default(task):
    model = perturbed(small_model(task))
    model.set_task(task)
    long, short = task.to_text(task.sample(1, torch.Generator().manual_seed(0)).tokens[0]), "a=+1; b=-a"
    tokens = model.to_tokens([long, short])
    assert (tokens[1] == task.vocab.index("[PAD]")).any()
    alone = model(model.to_tokens(short))[0]
    logits, cache = model.run_with_cache(tokens)
    assert torch.allclose(logits[1, : alone.shape[0]], alone, atol=1e-5)
    padding = tokens[1] == task.vocab.index("[PAD]")
    assert cache["pattern", 1][1][..., padding].abs().max() == 0
    assert torch.equal(model(tokens), model(tokens, tokens != task.vocab.index("[PAD]")))


def test_transformer_lens_habits_work_on_the_native_model(task):
    from transformer_lens.head_detector import detect_head

    model = perturbed(small_model(task))
    model.set_task(task)
    sentence = "a=+1; b=-a; c=+b"
    tokens = model.to_tokens(sentence)
    assert torch.equal(model(sentence), model(tokens))  # a string runs as TransformerLens's models do
    assert torch.equal(model.to_tokens(sentence, prepend_bos=False), tokens[:, 1:])
    logits, loss = model(tokens, return_type="both")
    answers = logits[0, [1, 6, 11]]  # each clause's variable token reads its value: +1, -1, -1
    expected = torch.nn.functional.cross_entropy(answers, torch.tensor([task.literal_index[v] for v in ("1", "-1", "-1")]))
    assert torch.allclose(loss, expected) and torch.allclose(model(sentence, return_type="loss"), expected)
    assert model(tokens, return_type=None) is None
    assert model.cfg.dtype == torch.float32 and "dtype" not in model.cfg.to_dict()
    scores = detect_head(model, sentence, torch.tril(torch.ones(tokens.shape[1], tokens.shape[1])))
    assert scores.shape == (model.cfg.n_layers, model.cfg.n_heads) and (scores >= 0).all()
    pair, cache = model.run_with_cache([sentence, "a=-1; b=+a"])
    lens = cache.logit_lens()  # at the last position, each layer read through ln_final and the unembedding
    assert torch.allclose(lens.values[-1], pair[:, -1], atol=1e-5)


def test_the_bridge_reads_and_writes_lego_sentences_with_a_hugging_face_tokenizer(task):
    from transformers import PreTrainedTokenizer

    from legointerp.task import LegoError

    model = perturbed(small_model(task))
    model.set_task(task)
    bridge = to_bridge(model)
    assert isinstance(bridge.tokenizer, PreTrainedTokenizer)
    sentences = ["a=+1; b=-a; c=+b", "c=-1; a=+c"]
    assert torch.equal(bridge.to_tokens(sentences), model.to_tokens(sentences))
    assert bridge.to_str_tokens(sentences[0]) == model.to_str_tokens(sentences[0])
    assert bridge.to_string(bridge.to_tokens(sentences)) == model.to_string(model.to_tokens(sentences))
    assert torch.equal(bridge.to_tokens(sentences[0], prepend_bos=False), model.to_tokens(sentences[0])[:, 1:])
    with torch.no_grad():
        assert torch.allclose(bridge(sentences[0]), model(sentences[0]), atol=1e-4)
    with pytest.raises(LegoError, match="not made of this task's tokens"):
        bridge.to_tokens("a=+1; b=*a")


@pytest.mark.parametrize("overrides", [{}, {"norm": "post"}, {"hardcoded": ("association", None, None, None)}])
def test_split_qkv_inputs_patch_one_heads_value_path(task, overrides):
    if "hardcoded" in overrides:
        overrides = {**overrides, "variable_offset": task.variable_offset}
    model = perturbed(small_model(task, **overrides))
    clean, corrupted = (task.sample(4, torch.Generator().manual_seed(seed)).tokens for seed in (0, 1))
    logits, cache = model.run_with_cache(corrupted)
    model.set_use_split_qkv_input(True)
    assert torch.allclose(model(clean), model.run_with_hooks(clean), atol=1e-5)
    split_logits, split_cache = model.run_with_cache(corrupted)
    assert torch.allclose(split_logits, logits, atol=1e-5)
    assert split_cache["blocks.1.hook_v_input"].shape == (4, task.n_ctx, 4, 32)

    def value_input(x, hook):  # head 2's value reads the corrupted stream
        return torch.cat([x[:, :, :2], cache["resid_pre", 1][:, :, None], x[:, :, 3:]], 2)

    def value(v, hook):
        return torch.cat([v[:, :, :2], cache["v", 1][:, :, 2:3], v[:, :, 3:]], 2)

    patched = model.run_with_hooks(clean, fwd_hooks=[("blocks.1.hook_v_input", value_input)])
    model.set_use_split_qkv_input(False)
    assert torch.allclose(patched, model.run_with_hooks(clean, fwd_hooks=[("blocks.1.attn.hook_v", value)]), atol=1e-5)
    assert not torch.allclose(patched, model(clean), atol=1e-3)
    model.set_use_attn_in(True)
    assert torch.allclose(model(corrupted), logits, atol=1e-5)
    assert "use_attn_in" not in model.cfg.to_dict()


def test_the_bridge_masks_padding_as_the_model_does(task):
    model = perturbed(small_model(task))
    model.set_task(task)
    bridge = to_bridge(model)
    long, short = "a=+1; b=-a; c=+b", "c=-1; a=+c"
    tokens = model.to_tokens([long, short])
    with torch.no_grad():
        alone = model(model.to_tokens(short))[0]
        n = len(alone)
        for hooked in (model, bridge):
            logits, cache = hooked.run_with_cache(tokens)
            assert (hooked(tokens)[1, :n] - alone).abs().max() <= 1e-5
            assert (logits[1, :n] - alone).abs().max() <= 1e-5 and cache["pattern", 1][1, :, :, n:].abs().max() == 0
            assert (hooked(tokens[1])[0, :n] - alone).abs().max() <= 1e-5  # one unbatched row too
        unmasked = bridge(tokens, attention_mask=torch.ones_like(tokens))  # a mask given is the mask used
    assert (unmasked[1, :n] - alone).abs().max() > 1e-3

import pytest
import torch

from legointerp.errors import LegoInterpError
from legointerp.model import ConfigError, ModelConfig, affine
from legointerp.task import LegoTask, TaskConfig
from tests.conftest import small_model


def test_tied_model_shares_one_block_but_keeps_hook_points_per_layer(task):
    model = small_model(task, tied=True)
    unique = {id(p) for p in model.parameters()}
    assert len(unique) == len(list(model.parameters()))
    assert model.blocks[2].attn.W_Q is model.blocks[0].attn.W_Q
    untied = small_model(task)
    assert sum(p.numel() for p in untied.parameters()) > sum(p.numel() for p in model.parameters())
    assert {f"blocks.{l}.attn.hook_pattern" for l in range(3)} <= set(model.hook_dict)


def test_run_with_cache_uses_transformer_lens_names(task):
    model = small_model(task)
    batch = task.sample(3, torch.Generator().manual_seed(0))
    logits, cache = model.run_with_cache(batch.tokens)
    assert torch.allclose(logits, model(batch.tokens), atol=1e-5)  # materialised pattern == SDPA path
    pattern = cache["pattern", 1]
    assert pattern.shape == (3, 4, task.n_ctx, task.n_ctx)
    assert torch.allclose(pattern.sum(-1), torch.ones(3, 4, task.n_ctx))
    assert cache["resid_pre", 0].shape == (3, task.n_ctx, 32)
    assert cache["z", 2].shape == (3, task.n_ctx, 4, 8)


def test_padding_is_invisible_to_real_tokens(task):
    model = small_model(task)
    batch = task.sample(8, torch.Generator().manual_seed(0), min_length=2)
    padded = model(batch.tokens, batch.attention_mask)
    for b in range(8):
        length = 1 + 5 * int(batch.lengths[b]) + 1
        alone = model(batch.tokens[b:b + 1, :length])
        assert torch.allclose(padded[b, :length], alone[0], atol=1e-5)


def test_the_encoder_is_bidirectional(task):
    model = small_model(task)
    batch = task.sample(1, torch.Generator().manual_seed(0))
    changed = batch.tokens.clone()
    changed[0, -2] = task.separator_id if changed[0, -2] != task.separator_id else task.equals_id
    assert not torch.allclose(model(batch.tokens)[0, 0], model(changed)[0, 0])


def test_stochastic_depth_samples_in_range_and_evaluates_at_full_depth(task):
    model = small_model(task, tied=True, n_layers=6, min_depth=2)
    generator = torch.Generator().manual_seed(0)
    depths = {model.sample_depth(generator) for _ in range(200)}
    assert depths == set(range(2, 7))
    batch = task.sample(2)
    assert torch.allclose(model(batch.tokens), model(batch.tokens, n_layers=6))
    assert not torch.allclose(model(batch.tokens), model(batch.tokens, n_layers=2))


@pytest.mark.parametrize("overrides, problem", [
    (dict(d_model=30, n_heads=4), "divisible"),
    (dict(min_depth=2), "weight-tied"),
    (dict(tied=True, min_depth=9), "min_depth"),
    (dict(n_layers=0), "positive"),
])
def test_impossible_model_configs(overrides, problem):
    config = dict(d_vocab=10, d_vocab_out=2, n_ctx=12, d_model=32, n_heads=4, n_layers=3, d_mlp=64)
    with pytest.raises(ConfigError, match=problem):
        ModelConfig(**{**config, **overrides})


def test_too_long_input_is_refused(task):
    model = small_model(task)
    with pytest.raises(ConfigError, match="n_ctx"):
        model(torch.ones(1, task.n_ctx + 1, dtype=torch.long))


def test_starting_at_a_layer_from_its_cached_residual_gives_the_same_logits(task):
    model = small_model(task, tied=True)
    tokens = task.sample(4).tokens
    logits, cache = model.run_with_cache(tokens)
    for layer in range(3):
        assert torch.allclose(model(cache["resid_pre", layer], start_at_layer=layer), logits, atol=1e-5)


def test_affine_is_exact_in_fp32_and_stays_in_bf16_under_autocast():
    generator = torch.Generator().manual_seed(0)
    x, W, b = torch.randn(3, 5, 256, generator=generator), torch.randn(256, 96, generator=generator), torch.randn(96, generator=generator)
    assert torch.equal(affine(x, W, b), x @ W + b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert affine(x, W, b).dtype == torch.bfloat16


def test_to_tokens_reads_what_the_generator_wrote(task):
    model = small_model(task)
    model.set_task(task)
    batch = task.sample(3, torch.Generator().manual_seed(0))
    texts = [task.to_text(row) for row in batch.tokens]
    assert torch.equal(model.to_tokens(texts), batch.tokens)
    assert model.to_string(batch.tokens) == texts
    assert model.to_str_tokens(texts[0]) == task.token_strings(batch.tokens[0])
    assert model.to_str_tokens(batch.tokens[:2]) == [task.token_strings(row) for row in batch.tokens[:2]]
    short = model.to_tokens(["a=+1", "a=+1; b=-a"])
    assert short.shape == (2, 12) and model.to_str_tokens(short[0])[-1] == "[PAD]"
    assert model.to_single_token("=") == task.equals_id
    assert torch.equal(model.tokens_to_residual_directions("-1"), model.W_U[:, 1])
    assert model.tokens_to_residual_directions(torch.tensor([[0, 1]])).shape == (1, 2, model.cfg.d_model)


@pytest.mark.parametrize("call, problem", [
    (lambda model: model.to_tokens("a=+1; a=-a"), "assigned twice"),
    (lambda model: model.to_tokens([]), "empty list"),
    (lambda model: model.to_single_token("zz"), "not a single token"),
    (lambda model: model.tokens_to_residual_directions("7"), "not a value"),
])
def test_bad_text_input_names_the_problem(task, call, problem):
    model = small_model(task)
    model.set_task(task)
    with pytest.raises(LegoInterpError, match=problem):
        call(model)


def test_text_without_a_vocabulary_says_how_to_attach_one(task):
    with pytest.raises(LegoInterpError, match="set_task"):
        small_model(task).to_tokens("a=+1")
    with pytest.raises(ConfigError, match="trained on"):
        small_model(task).set_task(LegoTask(TaskConfig(n=6, group="task2")))

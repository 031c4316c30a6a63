import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from legointerp.checkpoint import Checkpoint, load_checkpoint, load_model, save_checkpoint
from legointerp.errors import LegoInterpError
from legointerp.evaluate import clause_logits, test_batch as fresh_sentences
from legointerp.hooked import to_bridge
from legointerp.hf import from_hf_state_dict, hf_model_config
from legointerp.model import Attention, ConfigError, LegoTransformer, ModelConfig, affine, forward_flops
from legointerp.options import HardcodedHeads
from legointerp.patterns import association_mask, broadcast_mask, manipulation_mask, row_normalised
from legointerp.task import PAD, LegoTask, TaskConfig
from legointerp.train import TrainConfig, Trainer
from tests.conftest import small_model


def test_tied_model_shares_one_block_but_keeps_hook_points_per_layer(task):
    model = small_model(task, tied=True)
    unique = {id(p) for p in model.parameters()}
    assert len(unique) == len(list(model.parameters()))
    assert model.blocks[2].attn.W_Q is model.blocks[0].attn.W_Q
    untied = small_model(task)
    assert sum(p.numel() for p in untied.parameters()) > sum(p.numel() for p in model.parameters())
    assert {f"blocks.{l}.attn.hook_pattern" for l in range(3)} <= set(model.hook_dict)


@pytest.mark.parametrize("variant", [{}, {"norm": "post"}, {"hardcoded": ("association", None, None, None)}])
def test_a_tied_model_gathers_its_qkv_weights_once_and_computes_what_its_untied_copy_does(task, variant, monkeypatch):
    """The tied model forms its one block's q/k/v map once per forward, not per layer: logits and gradients equal
    those of an untied model holding the same weights in every layer, which forms it per layer."""
    tied = small_model(task, tied=True, variable_offset=task.variable_offset, **variant)
    untied = small_model(task, variable_offset=task.variable_offset, **variant)
    untied.load_state_dict(tied.state_dict())
    batch = task.sample(6, torch.Generator().manual_seed(0), min_length=2)
    gathered, qkv = [], Attention.qkv
    monkeypatch.setattr(Attention, "qkv", lambda self: gathered.append(self) or qkv(self))
    logits = [model(batch.tokens) for model in (tied, untied)]
    assert len(gathered) == 1 + untied.cfg.n_layers
    assert torch.allclose(*logits, atol=1e-6, rtol=0)
    for model, out in zip((tied, untied), logits):
        out.square().sum().backward()
    for name, p in tied.blocks[0].named_parameters():
        total = sum(block.get_parameter(name).grad for block in untied.blocks)
        assert torch.allclose(p.grad, total, atol=1e-5, rtol=1e-5), name
    with torch.autocast("cpu", torch.bfloat16):
        assert torch.equal(tied(batch.tokens), untied(batch.tokens))


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


# ---------------------------------------------------------------------------- hardcoded attention (paper, section 5)
HARDCODED_HEADS = ("association", "manipulation", None, "broadcast")


def hardcoded_model(task, **overrides):
    return small_model(task, hardcoded=HARDCODED_HEADS, variable_offset=task.variable_offset, **overrides)


@pytest.mark.parametrize("tied", [False, True])
def test_hardcoded_heads_attend_exactly_by_their_row_normalised_mask(task, tied):
    model = hardcoded_model(task, tied=tied)
    batch = task.sample(6, torch.Generator().manual_seed(0), min_length=2)  # padded rows too
    tokens = batch.tokens
    expected = {"association": association_mask(tokens, tokens >= task.variable_offset, include_self=True),
                "manipulation": manipulation_mask(tokens), "broadcast": broadcast_mask(tokens)}
    logits, cache = model.run_with_cache(tokens, batch.attention_mask)
    for layer in range(3):
        pattern = cache["pattern", layer]
        for head, kind in enumerate(HARDCODED_HEADS):
            if kind is not None:
                assert torch.equal(pattern[:, head], row_normalised(expected[kind])), (layer, kind)
        real = tokens != PAD
        assert torch.allclose(pattern[:, 2].sum(-1)[real], torch.ones(int(real.sum())))  # the learned head: softmax
        assert not cache["q", layer][:, :, [0, 1, 3]].any() and cache["q", layer][:, :, 2].any()
    assert torch.allclose(model(tokens, batch.attention_mask), logits, atol=1e-5)  # fused path == materialised
    resumed = model(cache["resid_pre", 1], batch.attention_mask, start_at_layer=1, source_tokens=tokens)
    assert torch.allclose(resumed, logits, atol=1e-5)
    with pytest.raises(ConfigError, match="source_tokens"):
        model(cache["resid_pre", 1], start_at_layer=1)


def test_hardcoded_heads_learn_only_their_value_and_output_maps(task):
    model = hardcoded_model(task).train()
    model(task.sample(4, torch.Generator().manual_seed(0)).tokens).square().sum().backward()
    for block in model.blocks:
        attn = block.attn
        for p in (attn.W_Q, attn.W_K, attn.b_Q, attn.b_K):
            assert not p[[0, 1, 3]].any() and not p.grad[[0, 1, 3]].any()  # zero, and kept zero
        assert attn.W_Q.grad[2].any() and attn.W_K.grad[2].any()
        assert attn.W_V.grad[[0, 1, 3]].flatten(1).any(-1).all() and attn.W_O.grad[[0, 1, 3]].flatten(1).any(-1).all()


def test_hardcoded_model_round_trips_and_older_checkpoints_still_load(task, tmp_path):
    model = hardcoded_model(task, tied=True)
    tokens = task.sample(3, torch.Generator().manual_seed(0)).tokens
    path = save_checkpoint(Checkpoint(model.cfg, task.config, model.state_dict()), tmp_path / "hard.pt")
    loaded, _, _ = load_model(path)
    assert loaded.cfg.hardcoded == HARDCODED_HEADS and loaded.cfg == model.cfg
    assert torch.equal(loaded(tokens), model(tokens))
    # a checkpoint written before the option existed has neither field: every head learned
    learned = small_model(task)
    old = save_checkpoint(Checkpoint(learned.cfg, task.config, learned.state_dict()), tmp_path / "old.pt")
    payload = torch.load(old, weights_only=True)
    for name in ("hardcoded", "variable_offset", "norm", "d_embed", "act_fn"):
        del payload["model_config"][name]
    torch.save(payload, old)
    loaded, _, _ = load_model(old)
    assert loaded.cfg.hardcoded == () and loaded.cfg.norm == "pre" and torch.equal(loaded(tokens), learned(tokens))


@pytest.mark.parametrize("hardcoded", [(), ("association", "manipulation", None, None), ("manipulation",) * 4])
def test_forward_flops_match_torchs_count(hardcoded):
    task = LegoTask(TaskConfig(n=12))
    model = small_model(task, hardcoded=hardcoded, variable_offset=task.variable_offset, d_mlp=128)

    def counted(size: int) -> int:
        # hooking the pattern materialises attention, whose products FlopCounterMode misses in the CPU's fused kernel
        hooks = [(f"blocks.{layer}.attn.hook_pattern", lambda p, hook: None) for layer in range(3)]
        with FlopCounterMode(display=False) as flops, model.hooks(fwd_hooks=hooks):
            model(task.sample(size, torch.Generator().manual_seed(0)).tokens)
        return flops.get_total_flops()

    assert (counted(8) - counted(4)) / 4 == pytest.approx(forward_flops(model.cfg), rel=0.02)
    learned = forward_flops(ModelConfig(**{**model.cfg.to_dict(), "hardcoded": ()}))
    assert (forward_flops(model.cfg) < learned) == bool(hardcoded)


@pytest.mark.parametrize("overrides, problem", [
    (dict(hardcoded=("association", None)), "one entry per head"),
    (dict(hardcoded=("manipulation", "induction", None, None)), "unknown hardcoded pattern 'induction'"),
    (dict(hardcoded=("association", None, None, None)), "variable_offset"),
])
def test_impossible_hardcoded_configs(overrides, problem):
    config = dict(d_vocab=10, d_vocab_out=2, n_ctx=12, d_model=32, n_heads=4, n_layers=3, d_mlp=64)
    with pytest.raises(ConfigError, match=problem):
        ModelConfig(**{**config, **overrides})


def test_hardcoded_option_on_the_command_line_and_the_bridge(task, capsys, tmp_path):
    from legointerp.cli import main

    assert HardcodedHeads()("association, manipulation,-,-") == ("association", "manipulation", None, None)
    assert main(["train", "--hardcoded", "association,conv,-,-"]) == 2
    assert "'conv' is not a hardcoded pattern" in capsys.readouterr().err
    assert main(["train", "--hardcoded", "association,-", "--out", str(tmp_path / "model.pt")]) == 2
    assert "n_heads=4" in capsys.readouterr().err
    with pytest.raises(LegoInterpError, match="TransformerBridge cannot hold"):
        to_bridge(hardcoded_model(task))


def test_training_with_association_and_manipulation_fixed_learns_the_first_step(tmp_path, one_thread):
    config = TrainConfig(n=6, d_model=32, n_heads=4, n_layers=3, d_mlp=64, hardcoded=("association", "manipulation", None, None),
                         mimic_steps=0, steps=100, batch_size=64, warmup=20, lr=3e-3, eval_every=100, eval_size=100,
                         device="cpu")
    trainer = Trainer(config, tmp_path / "hard.pt", progress=False)
    logged = trainer.fit().accuracy
    batch = fresh_sentences(trainer.task, 400)
    with torch.no_grad():
        accuracy = (clause_logits(trainer.model(batch.tokens), batch).argmax(-1) == batch.values).float().mean(0)
    assert accuracy[0] > 0.9 and logged[0] > 0.9  # chance: 0.5
    assert load_checkpoint(tmp_path / "hard.pt").model_config.hardcoded == config.hardcoded


# ---------------------------------------------------------------------------- post-LN, as BERT and ALBERT (issue 11)
def hf_twin(task, albert: bool, seed: int = 0):
    """A small random transformers BertModel / AlbertModel on the task's vocabulary, every parameter (LayerNorms and
    biases included) away from its initial value so that a mis-mapped one shows; and our model with its weights."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    sizes = dict(vocab_size=task.d_vocab, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                 max_position_embeddings=task.n_ctx + 8, attn_implementation="eager")
    source = (transformers.AlbertModel(transformers.AlbertConfig(embedding_size=16, **sizes)) if albert
              else transformers.BertModel(transformers.BertConfig(**sizes))).eval()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.1 * torch.randn_like(p))
    cfg = hf_model_config(source.state_dict(), n_heads=4, d_vocab_out=task.n_classes, n_ctx=task.n_ctx,
                          n_layers=3 if albert else None)
    model = LegoTransformer(cfg).eval()
    model.load_state_dict({**from_hf_state_dict(source.state_dict(), cfg), "unembed.W_U": model.unembed.W_U,
                           "unembed.b_U": model.unembed.b_U})
    return source, model


@pytest.mark.parametrize("albert", [False, True])
def test_post_ln_hidden_states_equal_transformers(task, albert):
    source, model = hf_twin(task, albert)
    assert model.cfg.tied == albert and model.cfg.eps == 1e-12
    assert model.cfg.act_fn == ("gelu_new" if albert else "gelu") and (model.cfg.d_embed == 16) == albert
    batch = task.sample(6, torch.Generator().manual_seed(0), min_length=2)  # padded rows too
    mask = batch.attention_mask
    with torch.no_grad():
        expected = source(batch.tokens, attention_mask=mask.long(), output_hidden_states=True).hidden_states
    _, cache = model.run_with_cache(batch.tokens, mask)
    ours = [cache["resid_pre", 0]] + [cache["resid_post", layer] for layer in range(3)]
    assert len(expected) == len(ours) == 4
    for layer, (theirs, mine) in enumerate(zip(expected, ours)):
        assert (theirs - mine)[mask].abs().max() <= 1e-5, layer


@pytest.mark.parametrize("albert", [False, True])
def test_hf_weights_load_under_any_prefix_and_missing_facts_are_asked_for(task, albert):
    source, model = hf_twin(task, albert)
    prefixed = {"module.base." + k: v for k, v in source.state_dict().items()}
    mapped = from_hf_state_dict(prefixed, model.cfg)
    assert all(torch.equal(mapped[k], v) for k, v in model.state_dict().items() if not k.startswith("unembed."))
    if albert:
        with pytest.raises(LegoInterpError, match="n_layers"):
            hf_model_config(prefixed, n_heads=4, d_vocab_out=2)
    with pytest.raises(LegoInterpError, match="n_ctx"):
        from_hf_state_dict(prefixed, ModelConfig(**{**model.cfg.to_dict(), "n_ctx": task.n_ctx + 9}))
    with pytest.raises(LegoInterpError, match="one"):
        from_hf_state_dict({**prefixed, **source.state_dict()}, model.cfg)


def test_post_ln_hooks_hold_what_the_next_reader_receives(task):
    model = small_model(task, norm="post", tied=True, d_embed=16)
    batch = task.sample(4, torch.Generator().manual_seed(0))
    logits, cache = model.run_with_cache(batch.tokens)
    for layer in range(3):
        block = model.blocks[layer]
        mid, post = cache["resid_mid", layer], cache["resid_post", layer]
        assert torch.allclose(mid, block.ln1(cache["resid_pre", layer] + cache["attn_out", layer]), atol=1e-6)
        assert torch.allclose(mid, block.ln1(cache[f"blocks.{layer}.hook_resid_mid_unnormalized"]), atol=1e-6)
        assert torch.allclose(post, block.ln2(cache[f"blocks.{layer}.hook_resid_post_unnormalized"]), atol=1e-6)
        # an untrained LayerNorm is the identity affine map, so a normalised stream has zero mean and unit variance
        assert torch.allclose(post.mean(-1), torch.zeros(post.shape[:-1]), atol=1e-5)
        assert torch.allclose(post.var(-1, unbiased=False), torch.ones(post.shape[:-1]), atol=1e-4)
        if layer < 2:
            assert torch.equal(post, cache["resid_pre", layer + 1])
        assert torch.allclose(model(cache["resid_pre", layer], start_at_layer=layer), logits, atol=1e-5)
    assert torch.allclose(logits, affine(cache["resid_post", 2], model.W_U, model.b_U), atol=1e-6)  # no final LayerNorm
    assert not hasattr(model, "ln_final") and model.cfg.normalization_type is None
    assert model.W_E.shape == (task.d_vocab, 16) and cache["resid_pre", 0].shape[-1] == 32


def test_post_ln_model_round_trips_and_is_refused_by_the_bridge(task, tmp_path):
    model = small_model(task, norm="post", tied=True, d_embed=16)
    tokens = task.sample(3, torch.Generator().manual_seed(0)).tokens
    path = save_checkpoint(Checkpoint(model.cfg, task.config, model.state_dict()), tmp_path / "post.pt")
    loaded, _, _ = load_model(path)
    assert loaded.cfg == model.cfg and loaded.cfg.norm == "post" and torch.equal(loaded(tokens), model(tokens))
    pre = small_model(task)
    assert forward_flops(model.cfg) - forward_flops(pre.cfg) == 2 * task.n_ctx * 16 * 32  # only the embedding projection
    with pytest.raises(LegoInterpError, match="post-LN"):
        to_bridge(model)


@pytest.mark.parametrize("overrides, problem", [
    (dict(norm="sandwich"), "norm='sandwich'"),
    (dict(d_embed=16), "--norm post"),
    (dict(act_fn="relu"), "act_fn='relu'"),
])
def test_impossible_post_ln_configs(overrides, problem):
    config = dict(d_vocab=10, d_vocab_out=2, n_ctx=12, d_model=32, n_heads=4, n_layers=3, d_mlp=64)
    with pytest.raises(ConfigError, match=problem):
        ModelConfig(**{**config, **overrides})


def test_heads_and_probes_run_on_a_post_ln_model(task):
    from legointerp.heads import classify_heads
    from legointerp.probes import percolation

    model = small_model(task, norm="post", tied=True, d_embed=16, n_layers=2)
    batch = task.sample(24, torch.Generator().manual_seed(0))
    report = classify_heads(model, batch, task)
    assert len(report.scores) == 2 * model.cfg.n_heads and report.scores["mean_drop"].notna().all()
    result = percolation(model, batch, task, control=False)
    assert result.accuracy.shape[0] == 3  # the embeddings and each block's (normalised) resid_post


def test_post_ln_trains_from_the_command_line(tmp_path, capsys, one_thread):
    from legointerp.cli import main

    assert main(["train", "--norm", "sideways", "--out", str(tmp_path / "x.pt")]) == 2
    assert "'sideways' is not one of pre, post" in capsys.readouterr().err
    out = tmp_path / "post.pt"
    assert main(["train", "--norm", "post", "--d-embed", "16", "--length", "6", "--d-model", "32", "--n-layers", "2",
                 "--d-mlp", "64", "--steps", "3", "--warmup", "1", "--batch-size", "8", "--eval-every", "3",
                 "--eval-size", "16", "--mimic-steps", "0", "--no-curriculum", "--out", str(out), "--quiet"]) == 0
    model, _, checkpoint = load_model(out)
    assert model.cfg.norm == "post" and model.cfg.d_embed == 16 and model.cfg.tied and len(checkpoint.accuracy) == 6


# ---------------------------------------------------------------------------- +aI / +bI attention (issue 11, section 4)
def identity_model(task, seed: int = 5, **overrides):
    """A model with +aI/+bI attention whose a and b are set away from zero (per head, per layer)."""
    model = small_model(task, identity_attention=True, **overrides)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.a_I.copy_(torch.randn(4, generator=generator))
            block.attn.b_I.copy_(torch.randn(4, generator=generator))
    return model


def materialised(model):
    """Hooks that make every layer form its pattern (no fused kernel) and change nothing."""
    return model.hooks(fwd_hooks=[(f"blocks.{l}.attn.hook_pattern", lambda p, hook: p) for l in range(model.cfg.n_layers)])


def test_identity_attention_with_zero_scalars_is_the_plain_model(task):
    plain, identity = small_model(task), small_model(task, identity_attention=True)
    added = {f"blocks.{layer}.attn.{scalar}" for layer in range(3) for scalar in ("a_I", "b_I")}
    assert set(identity.state_dict()) - set(plain.state_dict()) == added
    batch = task.sample(6, torch.Generator().manual_seed(0), min_length=2)
    with materialised(plain):
        expected = plain(batch.tokens, batch.attention_mask)
    assert torch.equal(identity(batch.tokens, batch.attention_mask), expected)
    assert torch.allclose(plain(batch.tokens, batch.attention_mask), expected, atol=1e-5)  # the fused kernel, rounded


def reference_attention(attn, x, mask):
    """The paper's formula written out: softmax(x (W_Q W_K^T + a I) x^T / sqrt(E) with biases), then pattern x
    (W_V W_O + b I), per head.  x: (B, P, D); mask: (B, P) bool.  Returns (B, P, D)."""
    E = attn.cfg.d_head
    out = attn.b_O.expand_as(x).clone()
    for h in range(attn.cfg.n_heads):
        q, k = x @ attn.W_Q[h] + attn.b_Q[h], x @ attn.W_K[h] + attn.b_K[h]
        scores = (q @ k.mT + attn.a_I[h] * x @ x.mT) / E ** 0.5
        pattern = scores.masked_fill(~mask[:, None, :], float("-inf")).softmax(-1)
        out += pattern @ (x @ attn.W_V[h] + attn.b_V[h]) @ attn.W_O[h] + attn.b_I[h] * pattern @ x
    return out


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_identity_attention_follows_the_formula_and_its_hooks_hold_the_whole_output(task, norm):
    model = identity_model(task, norm=norm)
    batch = task.sample(5, torch.Generator().manual_seed(1), min_length=2)
    mask = batch.attention_mask
    logits, cache = model.run_with_cache(batch.tokens, mask)
    assert torch.allclose(model(batch.tokens, mask), logits, atol=1e-5)  # summed copy == per-head copy
    for layer in range(3):
        block = model.blocks[layer]
        x = cache["resid_pre", layer] if norm == "post" else block.ln1(cache["resid_pre", layer])
        expected = reference_attention(block.attn, x, mask)
        assert torch.allclose(cache["attn_out", layer], expected, atol=1e-5), layer
        copied = cache[f"blocks.{layer}.attn.hook_identity_out"]
        assert copied.shape == (5, task.n_ctx, 4, 32) and copied.abs().sum() > 0
        written = torch.einsum("bphe,hed->bpd", cache["z", layer], block.attn.W_O) + block.attn.b_O
        assert torch.allclose(written + copied.sum(2), cache["attn_out", layer], atol=1e-5)
        assert not torch.allclose(written, cache["attn_out", layer], atol=1e-3)  # hook_z alone misses the copy
    model.set_use_attn_result(True)
    _, with_result = model.run_with_cache(batch.tokens, mask)
    heads = with_result["blocks.1.attn.hook_result"].sum(2) + model.blocks[1].attn.b_O
    assert torch.allclose(heads, cache["attn_out", 1], atol=1e-5)  # each head's whole write, copy included
    QK = model.QK.AB[1, 2]
    assert torch.allclose(QK, model.W_Q[1, 2] @ model.W_K[1, 2].T + model.a_I[1, 2] * torch.eye(32), atol=1e-6)


def test_ablating_the_identity_hook_removes_the_copy(task):
    model = identity_model(task)
    tokens = task.sample(3, torch.Generator().manual_seed(2)).tokens
    _, cache = model.run_with_cache(tokens)
    zero = lambda copied, hook: torch.zeros_like(copied)  # noqa: E731
    with model.hooks(fwd_hooks=[("blocks.0.attn.hook_identity_out", zero)]):
        _, ablated = model.run_with_cache(tokens, names_filter="blocks.0.hook_attn_out")
    assert torch.allclose(ablated["blocks.0.hook_attn_out"],
                          cache["attn_out", 0] - cache["blocks.0.attn.hook_identity_out"].sum(2), atol=1e-5)


def test_stacked_head_results_include_the_identity_copy_without_use_attn_result(task):
    model = identity_model(task)
    tokens = task.sample(3, torch.Generator().manual_seed(2)).tokens
    _, cache = model.run_with_cache(tokens)
    assert "blocks.1.attn.hook_result" not in cache.cache_dict  # rebuilt from hook_z, as TransformerLens does
    heads = cache.stack_head_results(layer=2).unflatten(0, (2, 4))  # (layers, heads, B, P, D)
    b_O = model.b_O[:2, None, None]
    assert torch.allclose(heads.sum(1) + b_O, torch.stack([cache["attn_out", 0], cache["attn_out", 1]]), atol=1e-5)
    _, partial = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_z"))
    with pytest.raises(ConfigError, match="hook_identity_out"):
        partial.stack_head_results()


def test_post_ln_cache_refuses_the_helpers_that_assume_a_sum_of_writes(task):
    model = small_model(task, norm="post")
    _, cache = model.run_with_cache(task.sample(2, torch.Generator().manual_seed(0)).tokens)
    values = torch.zeros(2, task.n_ctx, dtype=torch.long)
    helpers = {"decompose_resid": lambda: cache.decompose_resid(),
               "apply_ln_to_stack": lambda: cache.apply_ln_to_stack(cache.accumulated_resid(), -1),
               "logit_attrs": lambda: cache.logit_attrs(cache.accumulated_resid(), values),
               "get_full_resid_decomposition": lambda: cache.get_full_resid_decomposition(expand_neurons=False),
               "sliced decompose_resid": lambda: cache.apply_slice_to_batch_dim(0).decompose_resid()}
    for name, helper in helpers.items():
        with pytest.raises(ConfigError, match="needs a pre-LN model"):
            helper()
    assert cache.accumulated_resid().shape[0] == model.cfg.n_layers + 1  # the streams themselves are fine


def test_identity_scalars_learn_and_round_trip(task, tmp_path):
    model = small_model(task, identity_attention=True, tied=True).train()
    model(task.sample(4, torch.Generator().manual_seed(0)).tokens).square().sum().backward()
    assert model.blocks[0].attn.a_I.grad.abs().min() > 0 and model.blocks[0].attn.b_I.grad.abs().min() > 0
    assert model.blocks[2].attn.b_I is model.blocks[0].attn.b_I  # tied: one pair per head for every iteration
    model = identity_model(task).eval()
    tokens = task.sample(3, torch.Generator().manual_seed(0)).tokens
    path = save_checkpoint(Checkpoint(model.cfg, task.config, model.state_dict()), tmp_path / "identity.pt")
    loaded, _, _ = load_model(path)
    assert loaded.cfg.identity_attention and torch.equal(loaded.a_I, model.a_I) and torch.equal(loaded(tokens), model(tokens))
    payload = torch.load(path, weights_only=True)  # a checkpoint older than the option: plain attention
    learned = small_model(task)
    payload.update(model_config={k: v for k, v in learned.cfg.to_dict().items() if k != "identity_attention"},
                   state_dict=learned.state_dict(), sha256=None)
    torch.save(payload, tmp_path / "old.pt")
    assert not load_model(tmp_path / "old.pt")[0].cfg.identity_attention


@pytest.mark.parametrize("hardcoded", [(), ("association", "manipulation", None, None)])
def test_the_fast_engine_computes_identity_attention(task, hardcoded):
    from legointerp.evaluate import Inference, predict

    model = identity_model(task, hardcoded=hardcoded, variable_offset=task.variable_offset)
    batch = task.sample(32, torch.Generator().manual_seed(4), min_length=2)
    engine = Inference(model)
    fast = engine.run(engine.embed(batch.tokens), batch.clause_pos, key_mask=batch.attention_mask[:, None, None, :],
                      patterns=model.fixed_patterns(batch.tokens))
    with torch.no_grad():
        expected = clause_logits(model(batch.tokens, batch.attention_mask), batch)
        plain = small_model(task, hardcoded=hardcoded, variable_offset=task.variable_offset)
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith(("a_I", "b_I"))})
        assert not torch.allclose(clause_logits(plain(batch.tokens, batch.attention_mask), batch), expected, atol=1e-3)
    assert torch.allclose(fast, expected, atol=1e-5)
    assert torch.equal(predict(model, batch, batch_size=7), expected.argmax(-1))


def test_identity_attention_flops_and_the_bridge(task):
    model = small_model(task, identity_attention=True, d_mlp=128)
    hooks = [(f"blocks.{layer}.attn.hook_pattern", lambda p, hook: None) for layer in range(3)]

    def counted(size: int) -> int:
        with FlopCounterMode(display=False) as flops, model.hooks(fwd_hooks=hooks):
            model(task.sample(size, torch.Generator().manual_seed(0)).tokens)
        return flops.get_total_flops()

    assert (counted(8) - counted(4)) / 4 == pytest.approx(forward_flops(model.cfg), rel=0.02)
    assert forward_flops(model.cfg) > forward_flops(ModelConfig(**{**model.cfg.to_dict(), "identity_attention": False}))
    tokens = task.sample(2, torch.Generator().manual_seed(0)).tokens
    assert torch.allclose(to_bridge(model)(tokens), model(tokens), atol=1e-5)  # a = b = 0: the plain model, exactly held
    with pytest.raises(LegoInterpError, match=r"\+aI/\+bI"):
        to_bridge(identity_model(task))


def test_identity_attention_trains_from_the_command_line_and_its_heads_classify(task, tmp_path, one_thread):
    from legointerp.cli import main
    from legointerp.heads import classify_heads

    out = tmp_path / "identity.pt"
    assert main(["train", "--identity-attention", "--length", "6", "--d-model", "32", "--n-layers", "2", "--d-mlp", "64",
                 "--steps", "30", "--warmup", "5", "--batch-size", "32", "--eval-every", "30", "--eval-size", "32",
                 "--mimic-steps", "0", "--no-curriculum", "--out", str(out), "--quiet"]) == 0
    model, trained_task, checkpoint = load_model(out)
    assert model.cfg.identity_attention and checkpoint.train_config["identity_attention"] and len(checkpoint.accuracy) == 6
    assert model.a_I.abs().min() > 0 and model.b_I.abs().min() > 0  # trained away from their zero start
    report = classify_heads(model, trained_task.sample(24, torch.Generator().manual_seed(0)), trained_task)
    assert len(report.scores) == 2 * model.cfg.n_heads and report.scores["mean_drop"].notna().all()

"""The zoo's ground truth, checked by behaviour rather than by any analysis: each model solves its task as built,
the chain-follower takes exactly one chain step per block, the counters answer the last variable by the parity of
the minus signs even where the chain says otherwise, and `legointerp zoo NAME --out` writes a checkpoint that every
command reads."""

import json

import pytest
import torch

from legointerp import zoo
from legointerp.checkpoint import load_model
from legointerp.cli import main
from legointerp.evaluate import accuracy_by_position, clause_logits
from legointerp.evaluate import test_batch as fresh_batch
from legointerp.shortcut import rewire_last


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


DECOYS = ["shadow-heads", "moved-heads", "both-ends", "operand-fetcher", "counter-only-last"]


@pytest.mark.parametrize("name", ["chain-follower", "counter-at-last", "counter-at-bos", *DECOYS])
def test_hand_set_models_solve_every_position(name):
    built = zoo.build(name)
    accuracy = accuracy_by_position(built.model, fresh_batch(built.task, 300, seed=1))
    assert len(accuracy) == built.task.config.n == 12 and (accuracy == 1.0).all()


@pytest.mark.parametrize("name", ["untrained-bert", "untrained-albert"])
def test_untrained_models_are_at_chance(name):
    built = zoo.build(name)
    accuracy = accuracy_by_position(built.model, fresh_batch(built.task, 300, seed=1))
    chance = 1 / built.task.n_classes
    assert (accuracy - chance).abs().max() < 0.15 and abs(accuracy.mean() - chance) < 0.05


@torch.no_grad()
def test_chain_follower_takes_one_chain_step_per_block():
    """A run of the first k + 1 blocks answers exactly depths 0..k: one step per layer, seen without any probe."""
    built = zoo.build("chain-follower")
    batch = fresh_batch(built.task, 64, seed=2)
    n = built.task.config.n
    for k in range(n):
        predicted = clause_logits(built.model(batch.tokens, n_layers=k + 1), batch).argmax(-1)  # (B, n)
        accuracy = (predicted == batch.values).float().mean(0)
        assert (accuracy[: k + 1] == 1.0).all(), k
        assert (accuracy[k + 1:] < 0.75).all(), k  # not yet resolved: a guess


@torch.no_grad()
def test_both_ends_takes_a_step_from_each_end_per_block():
    """A run of the first j + 1 blocks answers exactly depths 0..j and n - 1 - j..n - 1: the chain is walked forwards
    from the root and backwards from the counted last variable, one step each per block."""
    built = zoo.build("both-ends")
    batch = fresh_batch(built.task, 64, seed=2)
    n = built.task.config.n
    assert built.model.cfg.n_layers == n // 2
    for j in range(n // 2):
        predicted = clause_logits(built.model(batch.tokens, n_layers=j + 1), batch).argmax(-1)
        accuracy = (predicted == batch.values).float().mean(0)
        solved = torch.zeros(n, dtype=torch.bool)
        solved[: j + 1] = solved[n - 1 - j:] = True
        assert (accuracy[solved] == 1.0).all() and (accuracy[~solved] < 0.75).all(), j


@torch.no_grad()
def test_decoy_heads_are_what_they_claim_without_any_analysis():
    """A shadow's attention equals its original's (to float error); a shadow, an idle head and the counters' last chain step
    can be zeroed without changing a single answer (zeroing a planted manipulation head does change them)."""
    built = zoo.build("shadow-heads")
    batch = fresh_batch(built.task, 32, seed=5)
    _, cache = built.model.run_with_cache(batch.tokens, names_filter=lambda name: name.endswith("hook_pattern"))
    for (layer, head), kind in built.attends.items():
        originals = [h for (l, h), k in built.heads.items() if l == layer and k == kind]
        assert any(torch.allclose(cache["pattern", layer][:, head], cache["pattern", layer][:, h], atol=1e-6)
                   for h in originals), (layer, head)

    def answers(model, zeroed):
        hooks = [(f"blocks.{layer}.attn.hook_z", lambda z, hook, h=head: z.index_fill(2, torch.tensor([h]), 0))
                 for layer, head in zeroed]
        return clause_logits(model.run_with_hooks(batch.tokens, fwd_hooks=hooks), batch).argmax(-1)

    for name in ["shadow-heads", "moved-heads", "counter-at-bos", "counter-only-last"]:
        built = zoo.build(name)
        inert = [site for site, kind in built.heads.items() if kind == "inert"]
        assert inert and torch.equal(answers(built.model, inert), batch.values), name
        planted = [site for site, kind in built.heads.items() if kind == "manipulation"]
        assert not torch.equal(answers(built.model, planted[:1]), batch.values)


@torch.no_grad()
@pytest.mark.parametrize("name, counts", [("chain-follower", False), ("counter-at-last", True), ("counter-at-bos", True),
                                          ("counter-only-last", True), ("both-ends", True)])
def test_rewired_last_clause_separates_counting_from_following(name, counts):
    """The last clause's operand now points at an earlier variable, so the chain's value and the sign parity differ:
    a counter keeps answering the parity, the chain-follower follows the new chain."""
    built = zoo.build(name)
    batch = fresh_batch(built.task, 200, seed=3)
    tokens, chain_value, usable = rewire_last(built.task, batch, torch.Generator().manual_seed(0))
    assert usable.float().mean() > 0.9
    last = clause_logits(built.model(tokens), batch)[:, -1].argmax(-1)[usable]  # (usable,)
    parity = batch.values[usable, -1]
    assert (last == (parity if counts else chain_value[usable])).all()
    assert (last != (chain_value[usable] if counts else parity)).all()


@torch.no_grad()
@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_zoo_checkpoint_round_trips_through_the_command(capsys, tmp_path, name):
    path = tmp_path / "zoo" / f"{name}.pt"
    code, out, _ = run(capsys, "zoo", name, "--out", path, "--format", "json")
    document = json.loads(out)
    built = zoo.build(name)
    assert code == 0 and document["checkpoint"] == str(path) and document["name"] == name
    assert document["shortcut"] == built.shortcut and document["resolution_layer"] == built.resolution_layer
    assert document["heads"] == {f"L{l}H{h}": kind for (l, h), kind in sorted(built.heads.items())}
    model, task, checkpoint = load_model(path)
    assert checkpoint.provenance["zoo"] == name and task.config == built.task.config
    tokens = fresh_batch(task, 8, seed=4).tokens
    assert torch.equal(model(tokens), built.model(tokens))


def test_zoo_refuses_to_overwrite_without_force_and_eval_reads_the_file(capsys, tmp_path):
    path = tmp_path / "chain.pt"
    assert run(capsys, "zoo", "chain-follower", "--out", path)[0] == 0
    code, out, err = run(capsys, "zoo", "chain-follower", "--out", path)
    assert code == 2 and out == "" and "--force" in err and len(err.strip().splitlines()) == 1
    assert run(capsys, "zoo", "counter-at-bos", "--out", path, "--force")[0] == 0
    assert load_model(path)[2].provenance["zoo"] == "counter-at-bos"
    code, out, _ = run(capsys, "eval", "--ckpt", path, "--samples", 100, "--format", "json")
    assert code == 0 and set(json.loads(out)["accuracy"].values()) == {1.0}


def test_zoo_lists_every_model_with_its_ground_truth(capsys):
    code, out, _ = run(capsys, "zoo", "--format", "json")
    records = json.loads(out)
    assert code == 0 and [r["name"] for r in records] == list(zoo.ZOO)
    truth = {r["name"]: r["shortcut"] for r in records}
    assert truth["chain-follower"] is False and truth["counter-at-last"] is truth["counter-at-bos"] is True
    assert truth["untrained-bert"] is None and records[0]["heads"]["L0H0"] == "manipulation"
    code, out, _ = run(capsys, "zoo")
    assert code == 0 and all(name in out for name in zoo.ZOO) and "L1H0..L11H0" in out and "no shortcut" in out
    assert "inert, attends like chain step: L1H1..L11H1" in out and "reverse step: L1H1..L5H1" in out
    shadows = {r["name"]: r for r in records}["shadow-heads"]
    assert shadows["heads"]["L1H1"] == "inert" and shadows["attends"]["L1H1"] == "chain step"


@pytest.mark.parametrize("argv, problem", [(["zoo", "bogus"], "chain-follower"), (["zoo", "--out", "{tmp}/x.pt"], "name it"),
                                          (["zoo", "chain-follower", "--force"], "--out")])
def test_zoo_bad_input_is_one_line(capsys, tmp_path, argv, problem):
    code, out, err = run(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert code == 2 and out == "" and problem in err and len(err.strip().splitlines()) == 1


def test_exact_patching_of_the_chain_follower_is_the_map_its_construction_predicts():
    """Flip the operator at depth d and patch one clean residual site at a time.  By construction: the embedding of
    the flipped operator restores everything; at block l >= 1 only clause-first tokens matter (the operator was
    fetched in block 0); depth d's token restores everything until its value has been read (l <= d + 1), depth k's
    restores itself and every later depth right after it is resolved (l = k + 1), and only itself after that."""
    from legointerp.patching import flip_sign, normalised_metric, patch_resid_pre

    built = zoo.build("chain-follower")
    n, d = built.task.config.n, 3
    pair = flip_sign(built.task, fresh_batch(built.task, 8, seed=4), d)
    exact = patch_resid_pre(built.model, pair, normalised_metric(built.model, pair)).numpy()  # (L, T)
    expected = torch.zeros(exact.shape)
    start = pair.clean.clause_pos[0]
    expected[0, start[d] + 2] = 1
    for k in range(d, n):
        for layer in range(1, n):
            if k == d and layer <= d + 1:
                expected[layer, start[k]] = 1
            elif layer == k + 1:
                expected[layer, start[k]] = (n - k) / (n - d)
            elif layer > k + 1:
                expected[layer, start[k]] = 1 / (n - d)
    assert torch.allclose(torch.tensor(exact), expected, atol=0.01)  # each variable's logit difference is equal to ~1%


def test_exact_patching_tells_the_counter_from_the_chain_follower():
    """Patching the flipped clause's first token after block 0 restores every later variable of a chain-follower, but
    not the counter's last one, whose answer was counted from the operator tokens in block 0; patching the last
    variable's own token after block 0 restores only the counter."""
    from legointerp.patching import flip_sign, normalised_metric, patch_resid_pre

    scores = {}
    for name in ("chain-follower", "counter-at-last"):
        built = zoo.build(name)
        n, d = built.task.config.n, 3
        pair = flip_sign(built.task, fresh_batch(built.task, 8, seed=4), d)
        exact = patch_resid_pre(built.model, pair, normalised_metric(built.model, pair))
        start = pair.clean.clause_pos[0]
        scores[name] = (float(exact[1, start[d]]), float(exact[1, start[n - 1]]))
    assert scores["chain-follower"] == pytest.approx((1.0, 0.0), abs=0.01)
    assert scores["counter-at-last"] == pytest.approx(((n - d - 1) / (n - d), 1 / (n - d)), abs=0.01)

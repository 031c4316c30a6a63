import re

import pytest
import torch

from legointerp.task import (BOS, CLAUSE_LEN, EOS, PAD, SURFACES, WORDPIECE_IDS, LegoError, LegoTask, TaskConfig,
                             supervision_mask)

OFFICIAL = LegoTask(TaskConfig(surface="official"))


@pytest.mark.parametrize("group", ["task1", "task2", "s4", "z5", "z12"])
def test_generated_chains_are_solved_by_the_solver(group):
    task = LegoTask(TaskConfig(group=group, n=8))
    batch = task.sample(64, torch.Generator().manual_seed(0))
    for b in range(len(batch)):
        solved = task.solve(task.parse(task.to_text(batch.tokens[b])))
        names = task.variable_names(batch, b)
        assert [solved[v] for v in names] == [task.group.literal_names[i] for i in batch.values[b].tolist()]


def test_text_spaces_operator_and_operand_only_where_parse_needs_it():
    task = LegoTask(TaskConfig(group="z12", n=4))
    batch = task.sample(300, torch.Generator().manual_seed(4))
    texts = [task.to_text(tokens) for tokens in batch.tokens]
    assert [len(task.parse(text).clauses) for text in texts] == [4] * len(texts)  # every text reads back
    clauses = [clause for text in texts for clause in text.split("; ")]
    spaced = [clause for clause in clauses if " " in clause]
    assert 0 < len(spaced) < len(clauses)  # +1 10 is spaced, +2 1 is not
    for clause in spaced:
        with pytest.raises(LegoError, match="ambiguous"):
            task.parse(clause.replace(" ", ""))
    task1 = LegoTask(TaskConfig())
    assert " " not in task1.to_text(task1.sample(1).tokens[0]).replace("; ", "")


@pytest.mark.parametrize("surface", SURFACES)
def test_batch_metadata_points_at_the_right_tokens(surface):
    task = LegoTask(TaskConfig(n=6, surface=surface))
    batch = task.sample(256, torch.Generator().manual_seed(1))
    tokens = batch.tokens
    assert (tokens[:, 0] == BOS).all() and (tokens[:, -1] == EOS).all()
    assigned = tokens.gather(1, batch.clause_pos)
    operand = tokens.gather(1, batch.operand_pos)
    assert (operand[:, 1:] == assigned[:, :-1]).all()  # each clause reads the previous variable
    assert (operand[:, 0] >= task.literal_offset).all() and (operand[:, 0] < task.variable_offset).all()
    assert (tokens.gather(1, batch.clause_pos + 2) == task.op_offset + batch.ops).all()
    assert ((batch.clause_pos - 1) % CLAUSE_LEN == 0).all()
    assert torch.equal(batch.clause_pos.sort(1).values, 1 + CLAUSE_LEN * torch.arange(task.config.n).expand(256, -1))
    assert assigned.unique(dim=1).shape == assigned.shape  # distinct names within a sentence


def test_noncommutative_group_values_follow_composition():
    task = LegoTask(TaskConfig(group="task2", n=5))
    batch = task.sample(128, torch.Generator().manual_seed(2))
    act = task.group.act
    assert not torch.equal(act, act.T)  # S3 is non-abelian
    previous = batch.values[:, 0]
    for k in range(1, 5):
        assert torch.equal(batch.values[:, k], act[batch.ops[:, k], previous])
        previous = batch.values[:, k]


def test_same_seed_same_data_and_shuffled_order(task):
    a = task.sample(500, torch.Generator().manual_seed(7))
    b = task.sample(500, torch.Generator().manual_seed(7))
    assert torch.equal(a.tokens, b.tokens)
    assert (a.clause_pos[:, 0] != 1).any()  # the root clause is not always first


def test_mixed_lengths_are_padded_after_eos(task):
    batch = task.sample(300, torch.Generator().manual_seed(3), min_length=2)
    assert batch.lengths.min() == 2 and batch.lengths.max() == task.config.n
    eos = 1 + CLAUSE_LEN * batch.lengths
    assert (batch.tokens.gather(1, eos[:, None]) == EOS).all()
    position = torch.arange(batch.tokens.shape[1])
    assert ((batch.tokens == PAD) == (position > eos[:, None])).all()
    assert (batch.clause_pos[batch.valid] < eos.repeat_interleave(batch.lengths)).all()
    for b in range(20):
        text = task.to_text(batch.tokens[b])
        assert len(task.parse(text).clauses) == batch.lengths[b]


def test_heldout_alphabet_is_disjoint_from_training_names(task):
    train = task.sample(200, torch.Generator().manual_seed(0))
    test = task.sample(200, torch.Generator().manual_seed(0), heldout=True)
    names = lambda batch: set(batch.tokens.gather(1, batch.clause_pos).flatten().tolist())
    assert names(train).isdisjoint(names(test))
    assert all(task.vocab[i] in task.config.heldout_alphabet for i in names(test))


def test_surface_symbols_are_replaceable():
    task = LegoTask(TaskConfig(n=3, equals="is", separator="|", op_symbols=("plus", "minus")))
    values = task.solve(task.parse("a is plus1 | b is minus a | c is minus b"))
    assert values == {"a": "1", "b": "-1", "c": "1"}
    assert " is " not in task.to_text(task.sample(1).tokens[0]) and "is" in task.to_text(task.sample(1).tokens[0])


def test_solver_on_a_typed_sentence():
    task = LegoTask(TaskConfig())
    assert task.solve(task.parse("a=+1; b=-a; e=+b; d=-f; c=+d; f=+e")) == {
        "a": "1", "b": "-1", "e": "-1", "d": "1", "c": "1", "f": "-1"}


@pytest.mark.parametrize("text, problem", [
    ("", "empty"),
    ("a=+1; b=-z", "never assigned"),
    ("a=+1; a=-a", "assigned twice"),
    ("a=+b; b=-a", "cycle"),
    ("a=+a", "cycle"),
    ("a=*1", "unknown operator"),
    ("a=+7", "unknown symbol"),
    ("a+1", "not of the form"),
    ("; ".join(f"{c}=+1" for c in "abcdefghijklm"), "more than"),
])
def test_parse_errors_name_the_problem(text, problem):
    task = LegoTask(TaskConfig(n=12))
    with pytest.raises(LegoError, match=problem):
        task.solve(task.parse(text))


def test_supervision_masks():
    assert supervision_mask(12, n_tr=6).tolist() == [True] * 6 + [False] * 6
    assert supervision_mask(12, positions=[0, 1, 2, 3, 4, 11]).nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 11]
    assert supervision_mask(4).all()
    with pytest.raises(LegoError):
        supervision_mask(12, n_tr=13)
    with pytest.raises(LegoError):
        supervision_mask(12, n_tr=3, positions=[1])


@pytest.mark.parametrize("config", [dict(group="q8"), dict(n=0), dict(n=27), dict(alphabet="aab"),
                                    dict(alphabet="abc", heldout_alphabet="cde")])
def test_impossible_task_configs_are_refused(config):
    with pytest.raises(ValueError):
        LegoTask(TaskConfig(**config))


def test_official_surface_is_the_official_generators_text_and_wordpiece_ids():
    batch = OFFICIAL.sample(200, torch.Generator().manual_seed(5))
    assert batch.tokens.shape == (200, 62) and OFFICIAL.n_ctx == 62 and (batch.tokens != PAD).all()
    clause = r"[a-z] = (val|not) ([a-z]|[01]) ,"
    for b in range(len(batch)):
        text = OFFICIAL.to_text(batch.tokens[b])
        assert re.fullmatch(rf"{clause}( {clause}){{11}}", text)
        # bert-base-uncased splits these words on spaces alone: the ids the official code feeds its model
        words = ["[CLS]", *text.split(), "[SEP]"]
        assert [WORDPIECE_IDS[w] for w in words] == OFFICIAL.wordpiece_ids[batch.tokens[b]].tolist()
        solved = OFFICIAL.solve(OFFICIAL.parse(text))
        assert [solved[v] for v in OFFICIAL.variable_names(batch, b)] == [str(v) for v in batch.values[b].tolist()]
    root = batch.tokens.gather(1, batch.operand_pos[:, :1] - 1)
    assert (root == OFFICIAL.vocab.index("val")).all()  # the official root clause is always 'val 0' or 'val 1'
    assert set(batch.values[:, 0].tolist()) == {0, 1} and set(batch.ops[:, 1:].flatten().tolist()) == {0, 1}
    flips = batch.ops[:, 1:] == OFFICIAL.vocab.index("not") - OFFICIAL.op_offset
    assert torch.equal(flips, batch.values[:, 1:] != batch.values[:, :-1])  # label: the variable's truth value


def test_official_text_with_its_spacing_parses_and_wordpieces_map_back():
    assert OFFICIAL.solve(OFFICIAL.parse("b = not a ,  a = val 1 ,  c = val b , ")) == {"b": "0", "a": "1", "c": "0"}
    tokens = OFFICIAL.sample(8, torch.Generator().manual_seed(0)).tokens
    assert torch.equal(OFFICIAL.from_wordpiece(OFFICIAL.wordpiece_ids[tokens]), tokens)
    with pytest.raises(LegoError, match="word-piece id 1063"):
        OFFICIAL.from_wordpiece(torch.tensor([101, 1063, 102]))
    with pytest.raises(LegoError, match="official surface only"):
        LegoTask(TaskConfig()).wordpiece_ids


@pytest.mark.parametrize("config, problem", [
    (dict(group="task2"), "Task 1 only"),
    (dict(separator="|"), "fixes its symbols"),
    (dict(heldout_alphabet="ABC"), "lower-case"),
    (dict(surface="bert"), "unknown surface"),
])
def test_impossible_official_configs_are_refused(config, problem):
    with pytest.raises(LegoError, match=problem):
        TaskConfig(**{"surface": "official", **config})


def test_official_surface_can_hold_out_lower_case_letters():
    task = LegoTask(TaskConfig(n=4, alphabet="abcdefghij", heldout_alphabet="uvwxyz", surface="official"))
    batch = task.sample(50, torch.Generator().manual_seed(0), heldout=True)
    assert set(task.to_text(batch.tokens[0]).split()) & set("xyzuvw")
    with pytest.raises(LegoError, match="held-out alphabet has 0 names"):
        OFFICIAL.sample(1, heldout=True)

import pytest
import torch

from legointerp.task import BOS, CLAUSE_LEN, EOS, PAD, LegoError, LegoTask, TaskConfig, supervision_mask


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


def test_batch_metadata_points_at_the_right_tokens(task):
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

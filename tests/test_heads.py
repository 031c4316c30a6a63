"""Head classifiers label hand-planted attention patterns correctly, and the ablation check measures real drops."""

import torch

from legointerp.heads import KINDS, LABEL_THRESHOLD, RECORD_FIELDS, attention_view_html, classify_heads, kind_masks
from legointerp.patterns import row_normalised
from tests.conftest import small_model

PLANTED = {0: "association", 1: "manipulation", 2: "broadcast", 3: "previous"}


def plant(model, task, batch):
    """Layer 0 heads follow the PLANTED kinds exactly; layer 1 head 0 is uniform over real tokens."""
    masks = kind_masks(batch.tokens, task)
    eye = torch.eye(batch.tokens.shape[1], dtype=torch.bool)
    planted = torch.stack([row_normalised(masks[kind] | (~masks[kind].any(-1, keepdim=True) & eye))
                           for kind in PLANTED.values()], dim=1)  # rows without a target attend to themselves
    real = batch.attention_mask
    uniform = row_normalised(real[:, None, :].expand(-1, real.shape[1], -1))

    def layer0(pattern, hook):
        return planted

    def layer1(pattern, hook):
        pattern = pattern.clone()
        pattern[:, 0] = uniform
        return pattern

    model.add_hook("blocks.0.attn.hook_pattern", layer0, is_permanent=True)
    model.add_hook("blocks.1.attn.hook_pattern", layer1, is_permanent=True)



def test_planted_heads_get_their_labels_and_uniform_is_mixed(task):
    model = small_model(task, n_layers=2)
    batch = task.sample(32, torch.Generator().manual_seed(0))
    plant(model, task, batch)
    frame = classify_heads(model, batch, task, ablate=False).to_frame()
    layer0 = frame[frame["layer"] == 0].set_index("head")
    for head, kind in PLANTED.items():
        assert layer0.loc[head, "label"] == kind
        assert abs(layer0.loc[head, kind] - 1.0) < 1e-5  # all of each row's mass is on its kind's keys
    uniform_head = frame[(frame["layer"] == 1) & (frame["head"] == 0)].iloc[0]
    assert uniform_head.label == "mixed"
    for kind in KINDS:
        assert abs(uniform_head[kind] - uniform_head[f"{kind}_uniform"]) < 1e-5
    assert ((frame[list(KINDS)] >= 0) & (frame[list(KINDS)] <= 1 + 1e-6)).all().all()
    assert 0 < LABEL_THRESHOLD < 1


def test_ablation_drop_is_zero_for_a_silent_head_and_matches_an_independent_count(task):
    model = small_model(task, n_layers=2)
    with torch.no_grad():
        model.blocks[1].attn.W_O[2] = 0  # head 1.2 writes nothing
        for p in model.parameters():
            p += 0.3 * torch.randn_like(p)  # make the model's answers depend on its heads
        model.blocks[1].attn.W_O[2] = 0
    batch = task.sample(256, torch.Generator().manual_seed(1))
    report = classify_heads(model, batch, task)
    drops = report.position_drops
    assert (drops.loc["L1H2"].abs() < 1e-9).all()

    def accuracy(logits):
        predicted = logits.gather(1, batch.clause_pos[..., None].expand(-1, -1, 2)).argmax(-1)
        return (predicted == batch.values).float().mean(0)

    def ablate_head_0_0(z, hook):
        z[:, :, 0] = z[:, :, 0].mean(0, keepdim=True)
        return z

    with torch.no_grad():
        expected = accuracy(model(batch.tokens)) - accuracy(model.run_with_hooks(batch.tokens, fwd_hooks=[("blocks.0.attn.hook_z", ablate_head_0_0)]))
    assert torch.allclose(torch.tensor(drops.loc["L0H0"].to_numpy(), dtype=torch.float), expected, atol=1e-6)
    assert set(report.group_drops.index) == set(report.scores.label)


def test_records_and_offline_attention_view(task):
    model = small_model(task, n_layers=2)
    batch = task.sample(8, torch.Generator().manual_seed(2))
    report = classify_heads(model, batch, task)
    assert all(list(record) == RECORD_FIELDS for record in report.to_records())
    assert len(report.to_records()) == 2 * 4
    view = attention_view_html(model, batch, task, heads=[(0, 1), (1, 3)])
    assert "src=\"http" not in view and "https://unpkg" not in view
    assert "L0H1" in view and task.to_text(batch.tokens[0]).split("=")[0].strip() in view
    figure = report.plot()
    assert figure.data[0].z.shape == (2, 4)

"""Percolation probes find information where it was planted and nowhere it cannot be; the summary numbers
follow from the matrix by hand; exports and the figure have the promised shape."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from legointerp import zoo
from legointerp.evaluate import test_batch as fresh_batch
from legointerp.probes import PercolationResult, linearity, percolation, percolation_figure, resolution_layers
from legointerp.task import LegoTask, TaskConfig
from tests.conftest import small_model


def plant_values(model, batch, layer: int, depths: list[int]):
    """From blocks.{layer}'s output on, the residual at the variable of each of ``depths`` holds its value as a large
    one-hot, in the sentences that reach that depth.  The hook finds the sentences it is run on in ``batch`` by their
    tokens, so it works on whatever split the probes make."""
    seen = {}
    model.register_forward_pre_hook(lambda module, args: seen.update(tokens=args[0]))

    def write(resid, hook):
        part = batch[(seen["tokens"][:, None] == batch.tokens[None]).all(-1).int().argmax(1)]  # (b,) rows of batch
        one_hot = F.one_hot(part.values[:, depths], resid.shape[-1]) * part.valid[:, depths, None]  # (b, depths, D)
        resid = resid.clone()
        resid[torch.arange(len(part))[:, None], part.clause_pos[:, depths]] += 10.0 * one_hot
        return resid

    model.add_hook(f"blocks.{layer}.hook_resid_post", write, is_permanent=True)


@pytest.mark.parametrize("group, min_length", [("task1", None), ("task2", 2)], ids=["task1-full", "task2-mixed"])
def test_probes_find_planted_values_and_nothing_at_the_embeddings(group, min_length):
    task = LegoTask(TaskConfig(group=group, n=6))
    model = small_model(task, n_layers=2)
    batch = task.sample(600, torch.Generator().manual_seed(0), min_length=min_length)
    planted = [0, 1, 2]  # with min_length=2, depth 2 is missing from some sentences: those rows must be left out
    plant_values(model, batch, layer=1, depths=planted)
    result = percolation(model, batch, task)
    assert result.accuracy.shape == result.control.shape == (3, task.config.n)
    # row 2 is blocks.1's output, where the values were written
    assert (result.accuracy[2, planted] == 1.0).all()
    # row 0: a variable token's embedding is its name and position, both drawn independently of every value, and it
    # has not yet seen the operator token of its own clause that sets depth 0's value: at every depth, a guess
    near_chance = 1 / task.n_classes + 0.25
    assert (result.accuracy[0] < near_chance).all() and (result.control[0] < near_chance).all()
    # resolved by the planted layer at the latest, and not at the embeddings
    assert all(layer in (1, 2) for layer in (result.resolution_layer[k] for k in planted))
    # the control is a fresh model: the planted values are not in it
    assert (result.control[2, planted] < result.threshold).all()


def test_resolution_and_linearity_from_a_hand_made_matrix():
    accuracy = np.array([[0.5, 0.5, 0.5, 0.5, 0.5],
                         [0.95, 0.5, 0.5, 0.5, np.nan],
                         [1.0, 0.6, 0.92, 0.5, np.nan],
                         [1.0, 0.91, 1.0, 0.7, np.nan]])
    resolution = resolution_layers(accuracy, threshold=0.9)
    assert resolution == [1, 3, 2, None, None]
    # ranks of layers (1, 3, 2) against depths (0, 1, 2): d = (0, 1, -1), rho = 1 - 6 * 2 / (3 * 8) = 0.5
    assert linearity(resolution) == pytest.approx(0.5)
    assert linearity([1, None, 2, 3]) == pytest.approx(1.0)  # unresolved depths are skipped
    assert linearity([3, 2, 1]) == pytest.approx(-1.0)
    assert linearity([1, 1, 2]) == pytest.approx(np.sqrt(3) / 2)  # tied layers take their mean rank
    assert linearity([1, None, 2]) is None  # fewer than three resolved depths
    assert linearity([2, 2, 2]) is None  # a constant layer: the correlation is undefined


def test_percolation_exports(task):
    batch = task.sample(200, torch.Generator().manual_seed(1), min_length=2)
    result = percolation(small_model(task, n_layers=2), batch, task)
    assert result.accuracy.shape == result.control.shape == (3, task.config.n)
    assert len(result.resolution_layer) == task.config.n and result.n_classes == task.n_classes
    # every sentence has depth 0, fewer reach the deeper ones
    assert result.test_sentences + result.train_sentences == len(batch)
    assert result.test_examples[0] == result.test_sentences > result.test_examples[-1] > 0
    assert sorted(result.test_examples, reverse=True) == result.test_examples
    document = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert set(document) == {"matrix", "control", "resolution_layers", "linearity", "threshold", "resolution_by_threshold",
                             "linearity_by_threshold", "test_sentences", "train_sentences", "test_examples"}
    assert set(document["resolution_by_threshold"]) == set(document["linearity_by_threshold"]) == {"0.9", "0.95"}
    assert document["resolution_by_threshold"]["0.9"] == document["resolution_layers"]
    assert np.array(document["matrix"]).shape == np.array(document["control"]).shape == (3, task.config.n)
    frame = result.to_frame()
    assert list(frame.columns) == ["layer", "depth", "accuracy", "control", "examples", "first >= 0.9", "first >= 0.95"]
    assert len(frame) == 3 * task.config.n
    cell = frame.set_index(["layer", "depth"]).loc[(2, 4)]
    assert cell["accuracy"] == result.accuracy[2, 4] and cell["examples"] == result.test_examples[4]
    few = task.sample(50, torch.Generator().manual_seed(2))
    assert percolation(small_model(task, n_layers=2), few, task, control=False).control is None


def test_every_threshold_is_reported_in_the_frames_and_the_figure():
    accuracy = np.array([[0.5, 0.5, 0.5], [0.95, 0.5, np.nan], [1.0, 0.93, np.nan]])
    result = PercolationResult(accuracy, accuracy / 2, 0.9, test_sentences=10, train_sentences=20, test_examples=[10, 10, 0])
    assert result.resolution_by_threshold == {0.9: [1, 2, None], 0.95: [1, None, None]}
    assert result.resolution_layer == [1, 2, None]
    assert json.dumps(result.to_dict(), allow_nan=False)  # a depth no sentence reaches is null, not NaN
    frame = result.to_frame()
    marked = lambda column: list(zip(frame.loc[frame[column], "layer"], frame.loc[frame[column], "depth"]))
    assert marked("first >= 0.9") == [(1, 0), (2, 1)] and marked("first >= 0.95") == [(1, 0)]
    depths = result.depth_frame()
    assert depths["layer >= 0.9"].tolist() == [1, 2, pd.NA] and depths["layer >= 0.95"].tolist() == [1, pd.NA, pd.NA]
    assert depths["examples"].tolist() == [10, 10, 0]
    assert "90%" in result.describe() and "10 held-out sentences" in result.describe()

    figure = percolation_figure(result)
    heatmaps = [trace for trace in figure.data if trace.type == "heatmap"]
    markers = [trace for trace in figure.data if trace.type == "scatter"]
    assert len(heatmaps) == 2 and [h.xaxis for h in heatmaps] == ["x", "x2"]  # trained and control side by side
    assert (heatmaps[0].zmin, heatmaps[0].zmax) == (0.5, 1)
    assert heatmaps[0].colorbar.title.text == "probe accuracy" and heatmaps[0].customdata[2][1] == 10
    assert [(list(m.x), list(m.y)) for m in markers] == [([0, 1], [1, 2]), ([0], [1])]
    assert "90%" in markers[0].name and "resolution layer" in markers[0].name and "95%" in markers[1].name
    assert "10 held-out sentences" in figure.layout.title.text

    # a lower chosen threshold is reported beside 0.9 and 0.95
    low = PercolationResult(accuracy, None, 0.8, test_sentences=10, train_sentences=20, test_examples=[10, 10, 0])
    assert list(low.resolution_by_threshold) == [0.8, 0.9, 0.95] and low.resolution_layer == [1, 2, None]
    assert len([trace for trace in low.plot().data if trace.type == "scatter"]) == 3

    lone = PercolationResult(accuracy / 2, None, 0.9, 10, 20, [10, 10, 0], n_classes=6)
    figure = lone.plot()
    assert [trace.type for trace in figure.data] == ["heatmap"]  # no control panel, nothing resolved to mark
    assert figure.data[0].zmin == pytest.approx(1 / 6)


# ---------------------------------------------------------------------------- the zoo: resolution known by construction
def zoo_percolation(name: str, sentences: int = 300):
    built = zoo.build(name)
    result = percolation(built.model, fresh_batch(built.task, sentences, seed=0), built.task, control=False)
    return built, result


def test_chain_follower_resolves_depth_k_after_block_k_at_both_thresholds():
    built, result = zoo_percolation("chain-follower")
    n = built.task.config.n
    for threshold, resolution in result.resolution_by_threshold.items():
        assert resolution == built.resolution_layer == list(range(1, n + 1)), threshold
        assert linearity(resolution) == 1.0


@pytest.mark.parametrize("name, site", [("counter-at-last", 1), ("counter-at-bos", 2)])
def test_counters_resolve_the_last_depth_where_the_count_arrives(name, site):
    built, result = zoo_percolation(name)
    for resolution in result.resolution_by_threshold.values():
        assert resolution == built.resolution_layer and resolution[-1] == site
    assert result.linearity < 1.0  # the last depth comes first: no longer one step per layer


def test_untrained_model_resolves_nothing():
    _, result = zoo_percolation("untrained-bert")
    assert all(layer is None for resolution in result.resolution_by_threshold.values() for layer in resolution)
    assert result.linearity is None

"""Percolation probes find information where it was planted and nowhere it cannot be; the summary numbers
follow from the matrix by hand; exports and the figure have the promised shape."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

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
    result = percolation(small_model(task, n_layers=2), task.sample(200, torch.Generator().manual_seed(1)), task)
    assert result.accuracy.shape == result.control.shape == (3, task.config.n)
    assert len(result.resolution_layer) == task.config.n and result.n_classes == task.n_classes
    document = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert set(document) == {"matrix", "control", "resolution_layers", "linearity", "threshold"}
    assert np.array(document["matrix"]).shape == np.array(document["control"]).shape == (3, task.config.n)
    frame = result.to_frame()
    assert list(frame.columns) == ["layer", "depth", "accuracy", "control"] and len(frame) == 3 * task.config.n
    assert frame.set_index(["layer", "depth"]).loc[(2, 4), "accuracy"] == result.accuracy[2, 4]
    few = task.sample(50, torch.Generator().manual_seed(2))
    assert percolation(small_model(task, n_layers=2), few, task, control=False).control is None


def test_figure_panels_and_markers():
    accuracy = np.array([[0.5, 0.5, 0.5], [0.95, 0.5, np.nan], [1.0, 0.93, np.nan]])
    result = PercolationResult(accuracy, accuracy / 2, resolution_layers(accuracy, 0.9), None, 0.9, n_classes=2)
    assert json.dumps(result.to_dict(), allow_nan=False)  # a depth no sentence reaches is null, not NaN
    figure = percolation_figure(result)
    heatmaps = [trace for trace in figure.data if trace.type == "heatmap"]
    markers = [trace for trace in figure.data if trace.type == "scatter"]
    assert len(heatmaps) == 2 and [h.xaxis for h in heatmaps] == ["x", "x2"]  # trained and control side by side
    assert (heatmaps[0].zmin, heatmaps[0].zmax) == (0.5, 1)
    assert len(markers) == 1 and list(markers[0].x) == [0, 1] and list(markers[0].y) == [1, 2]

    lone = PercolationResult(accuracy / 2, None, [None] * 3, None, 0.9, n_classes=6)
    figure = lone.plot()
    assert [trace.type for trace in figure.data] == ["heatmap"]  # no control panel, nothing resolved to mark
    assert figure.data[0].zmin == pytest.approx(1 / 6)

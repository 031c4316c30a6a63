"""Percolation probes find information where it was planted, and the summary numbers follow from the matrix."""

import numpy as np
import pytest
import torch

from legointerp.probes import linearity, percolation, resolution_layers
from tests.conftest import small_model


def plant_values(model, batches, layer, depths):
    """From ``layer``'s output on, the residual at each variable of the given depths holds its value (one-hot, large).
    ``batches`` are the sub-batches the model will see, told apart by their sizes."""
    by_size = {len(b): b for b in batches}

    def write(resid, hook):
        batch = by_size[resid.shape[0]]
        resid = resid.clone()
        rows = torch.arange(len(batch))[:, None]
        one_hot = 10.0 * torch.nn.functional.one_hot(batch.values[:, depths], resid.shape[-1]).float()
        resid[rows, batch.clause_pos[:, depths]] += one_hot
        return resid

    model.add_hook(f"blocks.{layer}.hook_resid_post", write, is_permanent=True)


def test_probes_find_planted_values_and_nothing_before(task):
    model = small_model(task, n_layers=2)
    batch = task.sample(600, torch.Generator().manual_seed(0))
    n_test = int(len(batch) * 0.3)  # percolation holds out the first 30%
    plant_values(model, [batch[:n_test], batch[n_test:]], layer=1, depths=[0, 1, 2])
    result = percolation(model, batch, task, control=True, test_fraction=0.3)
    assert result.accuracy.shape == result.control.shape == (3, task.config.n)
    # row 2 is blocks.1's output, where the values were written
    assert (result.accuracy[2, :3] == 1.0).all()
    # at the embeddings a variable token is the same whatever its value: a probe can only guess
    assert (result.accuracy[0] < 0.75).all()
    assert result.resolution_layer[:3] == [2, 2, 2]
    assert (result.control[:, 1:] < 0.75).all()  # the random-init control learns nothing past depth 0's clause


def test_resolution_and_linearity_from_a_hand_made_matrix():
    accuracy = np.array([[0.5, 0.5, 0.5, 0.5],
                         [0.95, 0.5, 0.5, 0.5],
                         [1.0, 0.92, 0.6, 0.5],
                         [1.0, 1.0, 0.91, 0.7]])
    resolution = resolution_layers(accuracy, threshold=0.9)
    assert resolution == [1, 2, 3, None]
    assert linearity(resolution) == pytest.approx(1.0)
    assert linearity([3, 2, 1]) == pytest.approx(-1.0)
    assert linearity([1, None, 2]) is None  # fewer than three resolved depths
    assert linearity([2, 2, 2]) is None  # constant: undefined


def test_result_exports(task):
    model = small_model(task, n_layers=2)
    result = percolation(model, task.sample(200, torch.Generator().manual_seed(1)), task, control=False)
    document = result.to_dict()
    assert set(document) == {"matrix", "control", "resolution_layers", "linearity", "threshold"}
    assert len(document["matrix"]) == 3 and len(document["matrix"][0]) == task.config.n and document["control"] is None
    assert len(result.to_frame()) == 3 * task.config.n
    figure = result.plot()
    assert sum(trace.type == "heatmap" for trace in figure.data) == 1

"""The notebooks run top to bottom on a fresh kernel, so they cannot rot."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path, tmp_path):
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])
              if output.get("output_type") == "error"]
    assert not errors


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_ship_executed_with_small_static_outputs(path):
    """Read on GitHub, a notebook shows what it computed: figures as PNG (no plotly JSON, which GitHub cannot draw),
    the file small, and no folder of the machine that ran it."""
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count for cell in code), "run python notebooks/execute.py and commit the notebook"
    kinds = {kind for cell in code for output in cell.outputs for kind in output.get("data", {})}
    assert "image/png" in kinds and "application/vnd.plotly.v1+json" not in kinds
    text = path.read_text()
    assert len(text) < 2_000_000 and not any(folder in text for folder in ("/work/", "/tmp/", "/home/", "/root/"))

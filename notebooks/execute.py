"""Run notebooks top to bottom and save them with their outputs, as they ship: figures as PNG (install kaleido, which
drives Chromium), no stderr (its warnings name this machine's folders), circuitsvis's 1.5 MB of inlined JavaScript
replaced by a note.  Usage: python notebooks/execute.py [NOTEBOOK.ipynb ...] (default: every notebook here)."""

import sys
import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient

LARGEST_HTML = 200_000  # characters of an HTML output kept in a shipped notebook


def shipped_outputs(outputs: list) -> list:
    kept = [o for o in outputs if not (o.get("output_type") == "stream" and o.get("name") == "stderr")]
    for output in kept:
        data = output.get("data", {})
        if len(str(data.get("text/html", ""))) > LARGEST_HTML:
            del data["text/html"]
            data["text/plain"] = "the interactive view (inlined JavaScript) appears when you run this cell"
    return kept


if __name__ == "__main__":
    paths = [Path(p) for p in sys.argv[1:]] or sorted(Path(__file__).parent.glob("*.ipynb"))
    for path in paths:
        notebook = nbformat.read(path, as_version=4)
        with tempfile.TemporaryDirectory() as folder:
            NotebookClient(notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": folder}}).execute()
        for cell in notebook.cells:
            cell.metadata.pop("execution", None)
            if cell.cell_type == "code":
                cell.outputs = shipped_outputs(cell.outputs)
        nbformat.write(notebook, path)
        print(f"executed {path}")

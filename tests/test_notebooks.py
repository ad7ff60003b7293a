"""Execute the notebooks so they never rot (and check that no outputs are committed)."""
import os
import pathlib

import nbformat
import pytest

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"


@pytest.mark.parametrize("name", ["landscape.ipynb"])
def test_notebook_committed_without_outputs(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "commit notebooks without outputs"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["landscape.ipynb"])
def test_notebook_executes(name, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    # Short training and coarse grids (the notebook reads this variable); the
    # kernel inherits the environment. The repository root goes on PYTHONPATH so
    # that `import sam_jax` works without an installed package.
    monkeypatch.setenv("SAM_JAX_NOTEBOOK_FAST", "1")
    root = str(NOTEBOOKS.parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute()
    errors = [o for c in notebook.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors

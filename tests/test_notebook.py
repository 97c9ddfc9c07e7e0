"""examples/quickstart.ipynb runs top to bottom in a real Jupyter kernel (nbclient), with its figures inline
and its progress as a few plain lines."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import FASHION_DIR

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "quickstart.ipynb"


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="needs Debian's dataset-fashion-mnist (make test-deps)")
def test_the_quickstart_notebook_runs_in_a_kernel(tmp_path: Path) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(shutil.copy(NOTEBOOK, tmp_path / "quickstart.ipynb"), as_version=4)
    for cell in (c for c in notebook.cells if c.cell_type == "code"):  # run it as a user opening it fresh
        cell.update(outputs=[], execution_count=None)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()  # fmt: skip
    code = [c for c in notebook.cells if c.cell_type == "code"]
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    kinds = [set(o.get("data", {})) for c in code for o in c.outputs if o.output_type == "execute_result"]
    assert sum("image/png" in k for k in kinds) >= 3  # curves, confusion matrix, the Grad-CAM overlay
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream" and o.name == "stdout")
    assert "epoch 2 (stage 2)" in printed and "test accuracy of the best checkpoint" in printed
    assert "\x1b[" not in printed and printed.count("\n") < 40  # plain lines, a few per epoch, no redraws
    prediction = next(c for c in code if "predictor(photo" in c.source).outputs[0]["data"]["text/plain"]
    assert prediction.count("'label':") == 3 and prediction.count("'score':") == 3
    assert (tmp_path / "runs").is_dir()

"""The two notebooks: they run end to end in quick mode, draw every picture, and stay reviewable.

Executing a notebook starts a Jupyter kernel ("python3", the ipykernel of this interpreter) and runs
every cell with DETECT_QUICK=1 (small synthetic images, a couple of hundred iterations, random weights),
so a cell that raises (a failed sanity assert included) fails the test with the cell's traceback. The
kernel draws with matplotlib's inline backend, as Jupyter does, so every displayed figure is rendered to
a PNG in the cell's outputs; a figure that fails to render or comes out blank fails the test. The
executed notebook and its pictures are left in the test's temporary folder (``figures/``) for a look.
One notebook runs from ``notebooks/`` and the other from the repository root, so the first cell's search
for the repository is exercised from both places.
"""

import base64
import io
import os
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
# (notebook, working directory it is executed from)
NOTEBOOKS = [("one_stage_detector", NOTEBOOK_DIR), ("two_stage_detector", ROOT)]
NAMES = [name for name, _ in NOTEBOOKS]
CELL_TIMEOUT_S = 600
# The calls by which a notebook cell shows a picture.
DRAWS = re.compile(r"\b(show|display|show_predictions|export_and_curves|show_architecture)\(")


def _cells(notebook):
    return [(cell.cell_type, cell.source.strip()) for cell in notebook.cells]


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_has_no_outputs(name):
    notebook = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
    nbformat.validate(notebook)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code_cells, "a notebook without code"
    dirty = [index for index, cell in enumerate(code_cells) if cell.outputs or cell.execution_count is not None]
    assert not dirty, (
        f"{name}.ipynb has outputs in code cells {dirty}; clear them with "
        f"'jupyter nbconvert --clear-output --inplace notebooks/{name}.ipynb'"
    )


@pytest.mark.parametrize("name", NAMES)
def test_notebook_and_py_twin_are_in_sync(name):
    notebook = jupytext.read(NOTEBOOK_DIR / f"{name}.ipynb")
    twin = jupytext.read(NOTEBOOK_DIR / f"{name}.notebook.py")
    assert "py:percent" in notebook.metadata.get("jupytext", {}).get("formats", ""), "pair the notebook with its twin"
    assert _cells(notebook) == _cells(twin), (
        f"notebooks/{name}.ipynb and notebooks/{name}.notebook.py differ; run "
        f"'jupytext --sync notebooks/{name}.notebook.py' "
        "(it takes the newer of the two as the source)"
    )


def test_no_notebook_file_can_shadow_a_library_module():
    # Run from notebooks/, "import one_stage_detector" must find the library, not a notebook's twin.
    library = {path.stem for path in ROOT.glob("*.py")}
    importable = {path.stem for path in NOTEBOOK_DIR.glob("*.py") if "." not in path.stem}
    assert not importable & library
    assert {path.name for path in NOTEBOOK_DIR.glob("*.py")} == {f"{name}.notebook.py" for name in NAMES}


def _pictures(notebook):
    """(code cell number, PNG bytes) of every picture in an executed notebook's outputs."""
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    for number, cell in enumerate(code_cells):
        for output in cell.get("outputs", []):
            if "image/png" in output.get("data", {}):
                yield number, base64.b64decode(output["data"]["image/png"])


def _looks_blank(png):
    """Nearly every pixel of the picture has the same grey level (an empty canvas, or one flat colour)."""
    import numpy as np
    from PIL import Image

    grey = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float64)
    return (np.abs(grey - np.median(grey)) > 10).mean() < 0.01


def test_a_blank_picture_counts_as_blank():
    import numpy as np
    from PIL import Image

    def png(pixels):
        buffer = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
        return buffer.getvalue()

    white = np.full((100, 100), 255)
    assert _looks_blank(png(white))
    white[10:20, 10:20] = 0  # a 10 x 10 square: 1% of the picture
    assert not _looks_blank(png(white))


def _execute(name, cwd, tmp_path, monkeypatch):
    """Run a notebook in quick mode with figures drawn as in Jupyter; returns the executed notebook."""
    # The kernel inherits this environment. One thread per process: the notebooks are small, and
    # several processes competing for a few cores slow down badly when each spins up a thread pool.
    monkeypatch.setenv("DETECT_QUICK", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")  # display() gives a PNG
    monkeypatch.setenv("DETECT_RUN_DIR", str(tmp_path))  # checkpoints and mAP-tool files go here
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    notebook = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(cwd)}},
    )
    client.execute()  # raises CellExecutionError, with the failing cell's traceback, on any error
    figures = tmp_path / "figures"
    figures.mkdir()
    nbformat.write(notebook, figures / f"{name}.ipynb")
    for index, (number, png) in enumerate(_pictures(notebook)):
        (figures / f"{index:02d}_cell{number:02d}.png").write_bytes(png)
    return notebook


@pytest.mark.complete(start_first=True)
@pytest.mark.parametrize("name, cwd", NOTEBOOKS, ids=NAMES)
def test_notebook_runs_in_quick_mode_and_draws_every_picture(name, cwd, monkeypatch, tmp_path):
    notebook = _execute(name, cwd, tmp_path, monkeypatch)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    errors = [output for cell in code_cells for output in cell.outputs if output.output_type == "error"]
    assert not errors
    # A figure that did not render leaves only its text, "<Figure size 640x480 with 1 Axes>".
    unrendered = [
        number
        for number, cell in enumerate(code_cells)
        for output in cell.outputs
        if "<Figure size" in output.get("data", {}).get("text/plain", "") and "image/png" not in output.get("data", {})
    ]
    assert not unrendered, f"figures of code cells {unrendered} did not render"
    pictures = list(_pictures(notebook))
    drawing_cells = [number for number, cell in enumerate(code_cells) if DRAWS.search(cell.source)]
    assert {number for number, _ in pictures} == set(drawing_cells), "every cell that shows a picture has one"
    blank = [number for number, png in pictures if _looks_blank(png)]
    assert not blank, f"blank pictures in code cells {blank}"
    # Progress bars collapse to one output (a widget in Jupyter) instead of one output per refresh.
    crowded = [number for number, cell in enumerate(code_cells) if len(cell.outputs) > 8]
    assert not crowded, f"code cells {crowded} have more than 8 outputs"


class _Item:
    def __init__(self, name, mark=None):
        self.name, self.mark = name, mark

    def get_closest_marker(self, name, default=None):
        return self.mark if self.mark is not None and name == self.mark.name else default


class _Config:
    def __init__(self, complete):
        self.complete, self.hook = complete, self
        self.deselected = []

    def getoption(self, name):
        assert name == "--complete"
        return self.complete

    def pytest_deselected(self, items):
        self.deselected += items


def test_the_notebook_runs_are_marked_to_run_first_and_with_complete_only():
    import conftest

    marks = test_notebook_runs_in_quick_mode_and_draws_every_picture.pytestmark
    assert any(mark.name == "complete" and mark.kwargs == {"start_first": True} for mark in marks)
    for complete in (False, True):
        items = [
            _Item("unit"),
            _Item("grading", pytest.mark.complete.mark),
            _Item("notebook", pytest.mark.complete(start_first=True).mark),
            _Item("another unit"),
        ]
        config = _Config(complete)
        conftest.pytest_collection_modifyitems(config, items)
        if complete:
            assert [item.name for item in items] == ["notebook", "unit", "grading", "another unit"]
            assert config.deselected == []
        else:
            assert [item.name for item in items] == ["unit", "another unit"]
            assert [item.name for item in config.deselected] == ["grading", "notebook"]

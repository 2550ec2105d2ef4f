"""notebook_kit: what the notebooks show of the code, and that every checked part is shown before its check."""

import json
import re
from pathlib import Path

import pytest

import notebook_kit

jupytext = pytest.importorskip("jupytext")
pytest.importorskip("IPython")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ["one_stage_detector", "two_stage_detector"]


def test_show_source_is_the_module_source_highlighted():
    from common import iou

    shown = notebook_kit.show_source(iou)
    assert shown.data.startswith("def iou(") and "return" in shown.data
    assert 'class="' in shown._repr_html_(), "highlighted as Python"


def test_a_method_is_shown_dedented():
    from one_stage_detector import FCOSPredictionNetwork

    shown = notebook_kit.show_source(FCOSPredictionNetwork.forward).data
    assert shown.startswith("def forward(")


def test_show_part_shows_every_function_the_part_grades():
    parts = json.loads((ROOT / "tools" / "parts.json").read_text())["parts"]
    for part in (part for part in parts if part["points"] > 0):
        shown = notebook_kit.show_part(part["name"]).data
        for dotted in part["functions"]:
            assert f"def {dotted.rsplit('.', 1)[-1]}(" in shown, (part["name"], dotted)


def test_show_part_names_the_parts_when_one_is_unknown():
    with pytest.raises(ValueError, match="no part named 'ioo'.*iou"):
        notebook_kit.show_part("ioo")


def _sections(name):
    """(heading, code cells' sources) of each '## ' section of a notebook twin."""
    notebook = jupytext.read(ROOT / "notebooks" / f"{name}.notebook.py")
    sections = [("", [])]
    for cell in notebook.cells:
        heading = re.match(r"#{2} (.+)", cell.source) if cell.cell_type == "markdown" else None
        if heading:
            sections.append((heading.group(1), []))
        elif cell.cell_type == "code":
            sections[-1][1].append(cell.source)
    return sections


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_each_checked_part_is_shown_in_its_section_before_its_check(name):
    checked = 0
    for heading, sources in _sections(name):
        shown = []
        for source in sources:
            shown += re.findall(r'show_part\("(\w+)"\)', source)
            for part in re.findall(r'^check\("(\w+)"\)', source, flags=re.M):
                assert part in shown, f"{name}, section {heading!r}: check({part!r}) without show_part({part!r}) above"
                checked += 1
    assert checked >= 7


def test_show_architecture_names_the_unwritten_part_instead_of_failing(capsys):
    def build():
        raise NotImplementedError("one_stage_detector.FCOSPredictionNetwork.__init__ is yours to write.")

    assert notebook_kit.show_architecture(build, 64, 1) is None
    printed = capsys.readouterr().out
    assert printed.startswith("Not drawn yet, the detector cannot be built: one_stage_detector.FCOSPredictionNetwork")
    assert "write. Run this cell again" in printed


@pytest.mark.parametrize("data", ["synthetic", "voc2007"])
def test_try_on_photo_draws_the_ground_truth_beside_the_detections(data, tmp_path, monkeypatch):
    import torch
    from conftest import close_figure

    from one_stage_detector import course_fcos

    monkeypatch.setenv("DETECT_RUN_DIR", str(tmp_path))
    run = notebook_kit.setup("photo", ROOT, quick=True)
    run.open_data(tmp_path)  # no VOC there: the synthetic shapes
    run.data = data  # on VOC the held-out images stand in, whatever they hold
    torch.manual_seed(0)
    detector = course_fcos(len(run.idx_to_class), 16, [16], pretrained=False)
    figure = notebook_kit.NotebookRun.try_on_photo(run, detector, score_thresh=0.0)
    left, right = (ax.get_title() for ax in figure.axes)
    if data == "synthetic":  # 3 x 2 times the image size, with the objects of its scene
        size = run.sizes.image_size
        expected = len(notebook_kit.synthetic_photo(3 * size, 2 * size, notebook_kit.PHOTO_SEED)[1])
        assert figure.axes[0].get_images()[0].get_array().shape[:2] == (2 * size, 3 * size)
    else:  # the first held-out image, its padding left out
        expected = int((run.val_set[0][2][:, 4] >= 0).sum())
    assert left == f"ground truth: {expected} objects" and right.startswith("detections: the best")
    close_figure(figure)

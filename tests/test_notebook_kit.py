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

"""Tests of a4_helper, the course's facade: it greets, and it re-exports, unchanged, every name that the
course (/work/shared/API.md) and the notebooks use from it. What those names do is tested with the module
that defines each: test_detection_data.py, test_drawing.py, test_training.py and test_evaluation.py.
"""

import re
from pathlib import Path

import a4_helper
import detection_data
import drawing
import evaluation
import training

ROOT = Path(__file__).resolve().parents[1]

# The names the course uses from a4_helper, each with the module that defines it.
_COURSE_NAMES = {
    # listed for a4_helper in the course's API
    "hello_helper": a4_helper,
    "reset_seed": training,
    "rel_error": evaluation,
    "detection_visualizer": drawing,
    "VOC2007DetectionTiny": detection_data,
    "SyntheticDetection": detection_data,
    "train_detector": training,
    "inference_with_detector": evaluation,
    "compute_map": evaluation,
    # and the notebooks' others
    "plot_loss_history": drawing,
    "evaluate_detector": evaluation,
    "gt_boxes_to_targets": evaluation,
    "proposal_recall": evaluation,
    "plot_proposal_recall": evaluation,
    "draw_detector_outputs": drawing,
    "draw_iou_example": drawing,
    "draw_average_precision_example": drawing,
    "CROWDED_SCENE": detection_data,
    "VOC_LIKE_SCENE": detection_data,
    "read_checkpoint": training,
}


def test_hello_helper_prints_its_file(capsys):
    a4_helper.hello_helper()
    assert capsys.readouterr().out == "Hello from a4_helper.py!\n"


def test_a4_helper_re_exports_every_name_the_course_and_the_notebooks_use():
    used = set()  # what the notebooks take from a4_helper, as a4_helper.name or from a4_helper import name
    for notebook in sorted((ROOT / "notebooks").glob("*.notebook.py")):
        text = notebook.read_text()
        used |= set(re.findall(r"\ba4_helper\.(\w+)", text)) - {"py"}  # "a4_helper.py" names the file
        for parenthesised, names in re.findall(r"from a4_helper import (?:\(([^)]*)\)|([\w ,]+))", text):
            used |= {name.split()[0] for name in (parenthesised or names).split(",") if name.strip()}  # "x as y": x
    assert used and not used - set(_COURSE_NAMES), f"add to _COURSE_NAMES: {sorted(used - set(_COURSE_NAMES))}"
    for name, module in _COURSE_NAMES.items():
        assert name in a4_helper.__all__, name  # so that `from a4_helper import *` brings it as well
        assert getattr(a4_helper, name) is getattr(module, name), f"a4_helper.{name} is not {module.__name__}.{name}"
        assert getattr(module, name).__module__ == module.__name__, f"{name} is not defined in {module.__name__}"

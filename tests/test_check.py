"""check.py: a student checks one part with its public tests, and sees the expected and actual values."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import copy_of_the_repository, replace_body

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import check  # noqa: E402

IOU_OVER_THE_SMALLER_BOX = (  # IoU over the smaller box instead of the union: 1 of the 2 iou tests fails
    "area1, area2 = box_area(boxes1), box_area(boxes2)\n"
    "lt = torch.maximum(boxes1[:, None, :2], boxes2[None, :, :2])\n"
    "rb = torch.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])\n"
    "inter = (rb - lt).clamp(min=0).prod(dim=2)\n"
    "return inter / torch.minimum(area1[:, None], area2[None, :]).clamp(min=1e-9)"
)


def _copy_with_iou_body(tmp_path: Path, body: str) -> Path:
    """A copy of the repository where ``common.iou`` is ``body``."""
    repo = copy_of_the_repository(tmp_path / "repo")
    replace_body(repo, "common", "iou", body)
    return Path(repo)


def _check_in(repo: Path, part: str) -> str:
    finished = subprocess.run(
        [sys.executable, "check.py", part], cwd=repo, capture_output=True, text=True, timeout=300, check=True
    )
    return finished.stdout


def test_a_written_part_gets_its_points(capsys):
    earned, points = check.check("iou")
    assert earned == points == 5
    assert capsys.readouterr().out.splitlines() == ["iou: 5/5 points (2/2 tests passed)"]


def test_a_wrong_part_shows_the_expected_and_the_actual_values(tmp_path):
    # The sanity values' off-diagonal entries come out too big.
    out = _check_in(_copy_with_iou_body(tmp_path, IOU_OVER_THE_SMALLER_BOX), "iou")
    assert out.startswith("iou: 2.5/5 points (1/2 tests passed)")
    assert "FAILED test_iou_sanity_values" in out
    # pytest's explanation, with the values: the largest error 0.9375 (1 against 0.0625) and an expected 0.0526
    assert "0.9375" in out and "0.0625" in out and "0.0526" in out


def test_a_stub_is_named_in_one_line(tmp_path):
    body = 'raise NotImplementedError("common.iou is yours to write; a step explains it. Replace this line.")'
    out = _check_in(_copy_with_iou_body(tmp_path, body), "iou")
    assert out.startswith("iou: 0/5 points (0/2 tests passed)")
    assert "not written yet: common.iou is yours to write" in out


def test_an_unknown_part_names_the_parts():
    with pytest.raises(ValueError, match="no part named 'ious'; the parts are: locations, fcos_head"):
        check.check("ious")


def test_each_check_sees_the_module_as_saved_now(tmp_path):
    # A notebook checks, the student edits common.py, and checks again in the same kernel: the forked
    # child must import the edited module, not one the forkserver imported before.
    repo = _copy_with_iou_body(tmp_path, IOU_OVER_THE_SMALLER_BOX)
    wrong = (repo / "common.py").read_text()
    shutil.copy2(ROOT / "common.py", repo / "common.py")
    (repo / "common_wrong.txt").write_text(wrong)
    script = (
        "import pathlib, check\n"
        "check.check('iou', verbose=False)\n"
        "pathlib.Path('common.py').write_text(pathlib.Path('common_wrong.txt').read_text())\n"
        "check.check('iou', verbose=False)\n"
    )
    finished = subprocess.run(
        [sys.executable, "-c", script], cwd=repo, capture_output=True, text=True, timeout=300, check=True
    )
    first, second = finished.stdout.splitlines()
    assert (first, second) == ("iou: 5/5 points (2/2 tests passed)", "iou: 2.5/5 points (1/2 tests passed)")


def test_a_check_without_a_forkserver_runs_pytest_as_a_new_process(monkeypatch, capsys):
    monkeypatch.setattr(check.grade, "_forkserver", lambda: None)  # as on macOS and Windows
    assert check.check("iou") == (5, 5)
    assert capsys.readouterr().out.splitlines() == ["iou: 5/5 points (2/2 tests passed)"]


def test_a_check_that_runs_too_long_is_stopped_and_scores_nothing(monkeypatch, capsys):
    monkeypatch.setattr(check, "TIME_LIMIT_S", 0.01)
    assert check.check("iou") == (0, 5)
    assert capsys.readouterr().out.splitlines() == ["iou: 0/5 points; its tests ran past the time limit of 0.01 s"]

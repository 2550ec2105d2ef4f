"""The assignment: the student release that tools/make_assignment.py writes, and tools/grade.py scoring the
solution, the untouched release and a release with one part written."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import make_assignment  # noqa: E402

PARTS = json.loads((ROOT / "tools" / "parts.json").read_text())["parts"]
STUDENT_PARTS = [part["name"] for part in PARTS if part["points"] > 0]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    out = tmp_path_factory.mktemp("assignment") / "release"
    make_assignment.make_release(out)
    return out


def _marked_and_unmarked_lines(source):
    """(lines inside the solution markers, lines outside them), stripped, read independently of the tool."""
    inside, outside, marked = set(), set(), False
    for line in source.splitlines():
        if line.strip() == "# BEGIN SOLUTION":
            marked = True
        elif line.strip() == "# END SOLUTION":
            marked = False
        elif line.strip():
            (inside if marked else outside).add(line.strip())
    return inside, outside


def test_every_function_of_the_parts_is_marked_in_the_solution():
    for part in PARTS:
        for function in part["functions"]:
            module, name = function.split(".", 1)
            source = (ROOT / f"{module}.py").read_text()
            spans = make_assignment.enclosing_functions(source)
            [(first, last, _)] = [span for span in spans if span[2] == name]
            body = source.splitlines()[first - 1 : last]
            assert any(line.strip() == "# BEGIN SOLUTION" for line in body), function


def test_the_release_holds_no_solution_line_and_still_imports(release):
    outside_anywhere, inside_anywhere = set(), set()  # over every Python file of the solution
    for path in ROOT.rglob("*.py"):
        if "runs" not in path.relative_to(ROOT).parts:
            inside, outside = _marked_and_unmarked_lines(path.read_text())
            inside_anywhere |= inside
            outside_anywhere |= outside
    solution_only = inside_anywhere - outside_anywhere
    assert len(solution_only) > 100  # the markers do cover the students' work
    for path in release.rglob("*.py"):
        text = path.read_text()
        assert "BEGIN SOLUTION" not in text and "END SOLUTION" not in text, path
        leaked = [line for line in text.splitlines() if line.strip() in solution_only]
        assert not leaked, f"{path}: {leaked[:3]}"
    assert not (release / "tests" / "hidden").exists() and (release / "tests" / "test_common.py").is_file()
    assert (release / "notebooks" / "one_stage_detector.ipynb").is_file() and (release / "tools" / "grade.py").is_file()
    modules = "import a4_helper, common, detect, experiment, notebook_kit, one_stage_detector, two_stage_detector"
    subprocess.run([sys.executable, "-c", modules], cwd=release, check=True, timeout=120)


def test_a_stub_names_its_function_and_the_notebook_step(release):
    code = "import torch, common; common.iou(torch.zeros(1, 4), torch.zeros(1, 4))"
    finished = subprocess.run([sys.executable, "-c", code], cwd=release, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 1
    assert (
        "NotImplementedError: common.iou is yours to write; one_stage_detector.ipynb, "
        "'Overlap and duplicate removal: IoU and NMS' explains it." in finished.stderr
    )


def _grade(repo, out, *options):
    grade = [sys.executable, str(ROOT / "tools" / "grade.py"), "--jobs", "2"]  # two parts at a time: pytest starts
    command = [*grade, "--repo", str(repo), "--out", str(out), *options]  # single-threaded
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=1800)
    results = json.loads(Path(out).read_text())
    return {test["name"]: (test["score"], test["max_score"]) for test in results["tests"]}, results


def test_the_solution_gets_full_marks(tmp_path):
    scores, results = _grade(ROOT, tmp_path / "results.json")
    assert set(results) >= {"score", "max_score", "tests", "execution_time"}  # Gradescope's results.json
    for test in results["tests"]:
        assert set(test) >= {"name", "score", "max_score", "output", "visibility"}
    assert set(scores) == {part["name"] for part in PARTS}
    assert all(score == maximum for score, maximum in scores.values()), scores
    assert results["score"] == results["max_score"] == sum(part["points"] for part in PARTS)


def test_the_untouched_release_gets_zero_but_its_helpers_run(release, tmp_path):
    scores, results = _grade(release, tmp_path / "results.json")
    assert all(scores[name][0] == 0 for name in STUDENT_PARTS), scores
    helpers = next(test for test in results["tests"] if test["name"] == "helpers")
    assert helpers["output"] == "all tests passed"  # data, drawing and the training loop need no student code


def test_a_release_with_iou_written_scores_exactly_the_iou_part(release, tmp_path):
    submission = tmp_path / "submission"
    subprocess.run(["cp", "-r", str(release), str(submission)], check=True)
    solution, written = (ROOT / "common.py").read_text(), (submission / "common.py").read_text()
    solution_iou = _function_source(solution, "iou")
    written = written.replace(_function_source(written, "iou"), solution_iou)
    (submission / "common.py").write_text(written)
    # iou, and the parts whose code calls iou (the untouched release scores 0 on all the others)
    parts = ["iou", "nms", "anchor_matching", "fcos_inference", "rpn"]
    scores, _ = _grade(submission, tmp_path / "results.json", "--parts", ",".join(parts))
    points = {part["name"]: part["points"] for part in PARTS}
    assert scores["iou"] == (points["iou"], points["iou"])
    assert all(scores[name][0] == 0 for name in parts if name != "iou"), scores


def _function_source(source, name):
    node = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == name)
    return "\n".join(source.splitlines()[node.lineno - 1 : node.end_lineno])


def test_a_release_notebook_stops_with_one_line_at_the_first_unwritten_step(release, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    for name, value in (("DETECT_QUICK", "1"), ("MPLBACKEND", "Agg"), ("DETECT_RUN_DIR", str(tmp_path))):
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    notebook = nbformat.read(release / "notebooks" / "one_stage_detector.ipynb", as_version=4)
    resources = {"metadata": {"path": str(release / "notebooks")}}
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3", resources=resources)
    with pytest.raises(nbclient.exceptions.CellExecutionError):
        client.execute()
    executed = [index for index, cell in enumerate(notebook.cells) if cell.get("execution_count")]
    stopped = notebook.cells[executed[-1]]
    assert [output["text"] for output in stopped.outputs] == [
        "Not written yet: common.get_fpn_location_coords is yours to write; one_stage_detector.ipynb, "
        "'Where each prediction looks: FPN locations' explains it. Replace this line with your code.\n"
    ]  # one line, no traceback
    assert all(output.output_type != "error" for cell in notebook.cells for output in cell.get("outputs", []))
    headings = [cell.source for cell in notebook.cells[: executed[-1]] if cell.cell_type == "markdown"]
    assert any("FPN locations" in heading for heading in headings)  # every step before it ran

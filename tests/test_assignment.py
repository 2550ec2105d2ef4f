"""The assignment: the student release and Gradescope's autograder zip that tools/make_assignment.py writes,
and tools/grade.py scoring the solution, the untouched release and a release with one part written, by hand and
through the zip's run_autograder."""

import ast
import json
import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import each_part_alone  # noqa: E402
import make_assignment  # noqa: E402
import parts_from_data  # noqa: E402

CONFIG = json.loads((ROOT / "tools" / "parts.json").read_text())
PARTS = CONFIG["parts"]
STUDENT_PARTS = [part["name"] for part in PARTS if part["points"] > 0]
MARKED = ("common.py", "one_stage_detector.py", "two_stage_detector.py")
HIDDEN = " (hidden tests)"
pytestmark = pytest.mark.complete  # whole releases graded: pytest --complete


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The release and the autograder zip, written once for the module by the command the instructors run."""
    top = tmp_path_factory.mktemp("assignment")
    command = [sys.executable, str(ROOT / "tools" / "make_assignment.py"), "--out", "release"]
    subprocess.run([*command, "--autograder", "autograder.zip"], cwd=top, check=True, capture_output=True, timeout=120)
    return {"release": top / "release", "zip": top / "autograder.zip"}


@pytest.fixture(scope="module")
def release(built):
    return built["release"]


@pytest.fixture(scope="module")
def autograder(built, tmp_path_factory):
    """The zip unpacked as Gradescope does, into AUTOGRADER_ROOT/source (modes kept)."""
    source = tmp_path_factory.mktemp("autograder") / "source"
    with zipfile.ZipFile(built["zip"]) as archive:
        for info in archive.infolist():
            os.chmod(archive.extract(info, source), (info.external_attr >> 16) & 0o777)
    return source


def run_autograder(source, tmp_path, files, *options):
    """Put ``files`` ({path in submission/: source file or text}) in a fresh AUTOGRADER_ROOT's submission/, run
    the zip's run_autograder (passing ``options`` on to grade.py) and return results.json by entry name."""
    root = tmp_path / "autograder"
    for name, content in files.items():
        (root / "submission" / name).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            shutil.copy2(content, root / "submission" / name)
        else:
            (root / "submission" / name).write_text(content)
    (root / "submission").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "AUTOGRADER_ROOT": str(root), "AUTOGRADER_PYTHON": sys.executable}
    proc = subprocess.run([str(source / "run_autograder"), *options], env=env, capture_output=True, text=True,
                          timeout=1800)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((root / "results" / "results.json").read_text())
    return {test["name"]: test for test in results["tests"]}, results


def part_scores(results):
    """``{part: (score, max score)}`` over each part's entries (its public tests, and its hidden tests if any)."""
    scores = {}
    for test in results["tests"]:
        name = test["name"].removesuffix(HIDDEN)
        score, maximum = scores.get(name, (0, 0))
        scores[name] = (round(score + test["score"], 2), round(maximum + test["max_score"], 2))
    return scores


def hidden_test_names():
    """The hidden tests' names, read independently of the tool: parts.json's node ids and the test functions of
    tests/hidden/."""
    names = {node.split("::")[-1] for part in PARTS for node in part.get("hidden", [])}
    for path in (ROOT / "tests" / "hidden").glob("*.py"):
        tree = ast.parse(path.read_text())
        names |= {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    return {name for name in names if name.startswith("test")}


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


def test_every_marked_block_belongs_to_a_part():
    """The converse: no graded substance hides in a helper outside the parts (a block there would be graded with
    no part's tests, and the other parts' tests would run the student's version of it)."""
    listed = {function for part in PARTS for function in part["functions"]}
    for name in MARKED:
        source = (ROOT / name).read_text()
        spans = make_assignment.enclosing_functions(source)
        for number, line in enumerate(source.splitlines(), start=1):
            if line.strip() == "# BEGIN SOLUTION":
                inside = [span for span in spans if span[0] <= number <= span[1]]
                owner = f"{name[:-3]}.{max(inside, key=lambda span: span[0])[2]}"
                assert owner in listed, f"{name}:{number} is marked inside {owner}, which no part of parts.json lists"


def test_every_graded_part_has_hidden_tests():
    assert all(part.get("hidden") for part in PARTS if part["points"] > 0), [
        part["name"] for part in PARTS if part["points"] > 0 and not part.get("hidden")
    ]


def test_the_recorded_answers_of_the_other_parts_are_up_to_date(tmp_path):
    """tests/frozen/ (and tests/hidden/frozen/) hold what the solution answers in each graded test; recorded again
    now, they must be the same (refresh them with: python tests/parts_from_data.py)."""
    parts_from_data.record(tmp_path / "public", tmp_path / "hidden")
    for fresh_folder, shipped_folder in (
        (tmp_path / "public", parts_from_data.PUBLIC_FROZEN),
        (tmp_path / "hidden", parts_from_data.HIDDEN_FROZEN),
    ):
        fresh = sorted(path.name for path in fresh_folder.glob("*.pt"))
        shipped = sorted(path.name for path in shipped_folder.glob("*.pt"))
        assert fresh == shipped, "refresh them: python tests/parts_from_data.py"
        for name in fresh:
            new, old = (torch.load(folder / name, weights_only=False) for folder in (fresh_folder, shipped_folder))
            assert [call["function"] for call in new] == [call["function"] for call in old], name
            for a, b in zip(new, old):
                assert parts_from_data._same(a["output"], parts_from_data._restored(b["output"], "cpu")), name


def _solution_only_lines():
    outside_anywhere, inside_anywhere = set(), set()  # over every Python file of the solution
    for path in ROOT.rglob("*.py"):
        if "runs" not in path.relative_to(ROOT).parts:
            inside, outside = _marked_and_unmarked_lines(path.read_text())
            inside_anywhere |= inside
            outside_anywhere |= outside
    return inside_anywhere - outside_anywhere


def _assert_no_solution_line(name, text, solution_only):
    for line in text.splitlines():
        assert line.strip() not in ("# BEGIN SOLUTION", "# END SOLUTION"), name
        assert line.strip() not in solution_only, f"{name}: {line}"


def test_the_release_holds_no_solution_line_and_still_imports(release):
    solution_only = _solution_only_lines()
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


def test_the_release_names_no_hidden_test(release):
    names = hidden_test_names()
    assert len(names) >= 2
    for path in release.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not [name for name in names if name.encode() in data], path
    released = json.loads((release / "tools" / "parts.json").read_text())
    assert not any(part.get("hidden") for part in released["parts"])
    assert [part["tests"] for part in released["parts"]] == [part["tests"] for part in PARTS]


@pytest.mark.parametrize(
    "name, content",
    [
        ("docs/page.md", "Write it as\n\n    boxes = secret_solution(boxes)\n"),
        ("notes.txt", "  boxes = secret_solution(boxes)  \n"),
        ("setup.cfg", "[x]\n# BEGIN SOLUTION\n"),
        ("run.sh", "echo hi  # SOLUTION\n"),
        ("nb.ipynb", json.dumps({"cells": [{"source": ["a = 1\n", "boxes = secret_solution(boxes)\n"]}]})),
        ("tools/parts.json", json.dumps({"hidden": ["tests/hidden/test_x.py::test_secret_case"]})),
        ("picture.bin", b"\x00\xff test_secret_case"),
    ],
)
def test_the_leak_check_reads_every_file_not_only_python(tmp_path, name, content):
    check = make_assignment.LeakCheck(["    boxes = secret_solution(boxes)\n"], {"boxes = secret_solution(boxes)"},
                                      {"test_secret_case"})  # fmt: skip
    (tmp_path / "ok.md").write_text("Nothing given away here: boxes = given(boxes)\n")
    make_assignment.check_release(tmp_path, check)
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(RuntimeError, match=name.split("/")[-1]):
        make_assignment.check_release(tmp_path, check)


def test_the_autograder_zip_holds_what_gradescope_runs_and_no_solution(built):
    with zipfile.ZipFile(built["zip"]) as archive:
        files = {info.filename: (archive.read(info), info.external_attr >> 16) for info in archive.infolist()}
    for script in ("setup.sh", "run_autograder"):  # at the top, executable, bash
        data, mode = files[script]
        assert mode & stat.S_IXUSR and data.startswith(b"#!/usr/bin/env bash"), script
    setup = files["setup.sh"][0].decode()
    assert "--index-url https://download.pytorch.org/whl/cpu" in setup and '"torchvision>=' in setup
    assert all(f'"{name}>=' in setup for name in ("numpy", "pytest", "pillow", "matplotlib", "tqdm"))
    assert "jupyter" not in setup and "@TORCH@" not in setup and "@PACKAGES@" not in setup
    for name in (
        "tools/grade.py",
        "tools/parts.json",
        "pytest.ini",
        "tests/conftest.py",
        "tests/hidden/test_hidden.py",
    ):
        assert name in files, name
    given = {name for name in files if not name.startswith("tests/hidden/")} - {"setup.sh", "run_autograder"}
    assert given == {str(path.relative_to(built["release"])) for path in built["release"].rglob("*") if path.is_file()}
    assert json.loads(files["tools/parts.json"][0]) == CONFIG  # the full parts.json, hidden tests named
    assert b"is yours to write" in files["common.py"][0]  # stubs where students write
    solution_only = _solution_only_lines()
    for name, (data, _) in files.items():
        try:
            text = data.decode()
        except UnicodeDecodeError:
            continue
        _assert_no_solution_line(name, text, solution_only)
    for script in ("setup.sh", "run_autograder"):
        subprocess.run(["bash", "-n", "-c", files[script][0].decode()], check=True)


def test_the_solution_gets_full_marks(autograder, tmp_path):
    """The whole autograder, as Gradescope runs it, on the solution's three files: every part full marks."""
    tests, results = run_autograder(autograder, tmp_path, {name: ROOT / name for name in MARKED})
    assert set(results) >= {"score", "max_score", "tests", "execution_time"}  # Gradescope's results.json
    for test in tests.values():
        assert set(test) >= {"name", "score", "max_score", "output", "visibility"}
        assert test["score"] == test["max_score"], test
    scores = part_scores(results)
    assert set(scores) == {part["name"] for part in PARTS}
    assert all(score == maximum for score, maximum in scores.values()), scores
    assert results["score"] == results["max_score"] == sum(part["points"] for part in PARTS)
    with_hidden = [part["name"] for part in PARTS if part.get("hidden")]
    assert with_hidden and all(tests[name + HIDDEN]["visibility"] == "after_published" for name in with_hidden)
    names = hidden_test_names()
    for test in tests.values():  # the hidden tests are named in their own entries only
        if not test["name"].endswith(HIDDEN):
            assert test["visibility"] == "visible" and not [name for name in names if name in test["output"]]


def test_an_upload_of_a_folder_is_graded_and_the_release_files_get_0(autograder, release, tmp_path):
    folder = {f"my-a4/{name}": ROOT / name for name in MARKED}
    tests, results = run_autograder(autograder, tmp_path / "folder", folder, "--parts", "locations,iou")
    assert results["score"] == results["max_score"] == 10 and "output" not in results
    untouched = {name: release / name for name in MARKED}
    tests, results = run_autograder(autograder, tmp_path / "release", untouched, "--parts", "locations,iou,rpn_head")
    assert results["score"] == 0 and results["max_score"] == 15
    assert "is yours to write" in tests["iou"]["output"]


@pytest.mark.parametrize(
    "broken, problem, lost",
    [("common.py", "is missing", "locations"), ("two_stage_detector.py", "is not valid Python", "rpn_head")],
)
def test_a_missing_or_invalid_file_is_named_and_costs_its_own_parts_only(autograder, tmp_path, broken, problem, lost):
    files = {name: ROOT / name for name in MARKED if name != broken}
    if problem == "is not valid Python":
        files[broken] = (ROOT / broken).read_text().replace("def ", "def (", 1)
    tests, results = run_autograder(autograder, tmp_path, files, "--parts", "locations,fcos_deltas,rpn_head")
    assert f"{broken} {problem}" in results["output"]
    scores = part_scores(results)
    assert scores[lost] == (0, 5) and f"{broken} {problem}" in tests[lost]["output"]
    assert all(scores[name] == (5, 5) for name in ("locations", "fcos_deltas", "rpn_head") if name != lost), scores


def _grade(repo, out, *options):
    grade = [sys.executable, str(ROOT / "tools" / "grade.py"), "--jobs", "2"]  # two parts at a time: pytest starts
    command = [*grade, "--repo", str(repo), "--out", str(out), *options]  # single-threaded
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=1800)
    results = json.loads(Path(out).read_text())
    return part_scores(results), results


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


@pytest.mark.parametrize("part", STUDENT_PARTS)
def test_a_submission_with_one_part_written_scores_exactly_its_points(part, tmp_path):
    """Each part is graded alone: written on its own, with every other part a stub, it gets all its points, public
    and hidden. (The other parts score as in the untouched release, 0: while a part is graded, every other part
    answers from recorded data, never with the student's code; see tests/parts_from_data.py.)"""
    functions = next(p["functions"] for p in PARTS if p["name"] == part)
    each_part_alone.write_submission(tmp_path / "submission", functions)
    out = tmp_path / "results.json"
    grade = [sys.executable, str(ROOT / "tools" / "grade.py"), "--submission", str(tmp_path / "submission")]
    subprocess.run([*grade, "--out", str(out), "--parts", part], check=True, capture_output=True, timeout=600)
    results = json.loads(out.read_text())
    points = next(p["points"] for p in PARTS if p["name"] == part)
    failed = [test["output"] for test in results["tests"] if test["score"] != test["max_score"]]
    assert part_scores(results)[part] == (points, points), failed


def _function_source(source, name):
    node = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == name)
    return "\n".join(source.splitlines()[node.lineno - 1 : node.end_lineno])


def _check_in_a_release_notebook(repo, part):
    """The release's one-stage notebook run as far as its ``from check import check`` cell, then ``check(part)``
    in a cell of its own; returns that cell's printed text."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(repo / "notebooks" / "one_stage_detector.ipynb", as_version=4)
    setup = next(i for i, cell in enumerate(notebook.cells) if "from check import check" in cell.source)
    notebook.cells = [*notebook.cells[: setup + 1], nbformat.v4.new_code_cell(f"points = check({part!r})")]
    resources = {"metadata": {"path": str(repo / "notebooks")}}
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3", resources=resources).execute()
    return "".join(output.get("text", "") for output in notebook.cells[-1].outputs)


def test_check_in_a_release_notebook_passes_a_written_part_and_shows_a_wrong_ones(release, tmp_path, monkeypatch):
    for name, value in (("DETECT_QUICK", "1"), ("MPLBACKEND", "Agg"), ("DETECT_RUN_DIR", str(tmp_path))):
        monkeypatch.setenv(name, value)
    repo = tmp_path / "release"
    shutil.copytree(release, repo)
    each_part_alone.write_submission(tmp_path / "written", ["common.iou"])
    shutil.copy2(tmp_path / "written" / "common.py", repo / "common.py")
    printed = _check_in_a_release_notebook(repo, "iou")
    points = next(part["points"] for part in PARTS if part["name"] == "iou")
    assert f"iou: {points}/{points} points" in printed and "FAILED" not in printed, printed

    from conftest import replace_body

    replace_body(str(repo), "common", "iou", "return torch.zeros(len(boxes1), len(boxes2))")  # overlaps never seen
    printed = _check_in_a_release_notebook(repo, "iou")
    assert "FAILED test_iou_sanity_values" in printed and "FAILED test_iou_degenerate" not in printed, printed
    expected, got = printed.index("expected"), printed.index("got")  # the expected values, then the actual ones
    assert "0.0625" in printed[expected:got] and "[[0.0, 0.0, 0.0]," in printed[got:], printed


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

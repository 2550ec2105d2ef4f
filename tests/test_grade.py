"""The autograder (tools/grade.py): each test grades only one to three parts, through the script itself."""

import ast
import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRADE = os.path.join(ROOT, "tools", "grade.py")
MARKED = ("common.py", "one_stage_detector.py", "two_stage_detector.py")
HIDDEN = " (hidden tests)"


def grade_module():
    spec = importlib.util.spec_from_file_location("grade", GRADE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def part(tests, name):
    """``(score, max score)`` of a part over its entries (its public tests, and its hidden tests if any)."""
    found = [tests[key] for key in (name, name + HIDDEN) if key in tests]
    return round(sum(t["score"] for t in found), 2), round(sum(t["max_score"] for t in found), 2)


def grade(*args, cwd=None):
    """Run the grader; return the completed process."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run([sys.executable, GRADE, *args], cwd=cwd, env=env, capture_output=True, text=True)


def graded(tmp_path, *args):
    """Grade, check the exit status, and return ``{part name: test entry}`` and the whole results.json."""
    out = tmp_path / "results.json"
    proc = grade("--out", str(out), *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    return {test["name"]: test for test in results["tests"]}, results


def submission_with_iou_starting_with(tmp_path, statement: str) -> str:
    """A copy of the repository (top-level modules, tools/, pytest.ini) where ``common.iou`` begins with ``statement``.

    The grader brings its own tests/, so the copy needs none."""
    sub = tmp_path / "submission"
    sub.mkdir()
    for name in os.listdir(ROOT):
        if name.endswith(".py"):
            shutil.copy2(os.path.join(ROOT, name), sub / name)
    shutil.copytree(os.path.join(ROOT, "tools"), sub / "tools", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(os.path.join(ROOT, "pytest.ini"), sub / "pytest.ini")
    source = (sub / "common.py").read_text()
    [iou] = [node for node in ast.parse(source).body if isinstance(node, ast.FunctionDef) and node.name == "iou"]
    first = iou.body[0]
    lines = source.splitlines(keepends=True)
    lines.insert(first.lineno - 1, " " * first.col_offset + statement + "\n")
    (sub / "common.py").write_text("".join(lines))
    return str(sub)


def test_a_broken_function_loses_its_part_only(tmp_path):
    repo = submission_with_iou_starting_with(tmp_path, 'raise NotImplementedError("iou")')
    tests, results = graded(tmp_path, "--repo", repo, "--parts", "iou,locations")
    assert part(tests, "iou") == (0, 5)
    assert "NotImplementedError" in tests["iou"]["output"] and "test_iou_sanity_values" in tests["iou"]["output"]
    assert len(tests["iou"]["output"]) <= 2100
    assert part(tests, "locations") == (5, 5)
    assert results["score"] == 5 and results["max_score"] == 10
    # The hidden test is named in its own entry only, which students see once grades are published.
    hidden_name = "test_iou_of_touching_and_nested_boxes"
    assert hidden_name in tests["iou" + HIDDEN]["output"] and hidden_name not in tests["iou"]["output"]
    assert tests["iou" + HIDDEN]["visibility"] == "after_published" and tests["iou"]["visibility"] == "visible"
    assert (tests["iou"]["max_score"], tests["iou" + HIDDEN]["max_score"]) == (2.5, 2.5)  # 2 tests and 2
    assert results["stdout_visibility"] == "hidden"


def test_a_hanging_function_times_out_and_loses_its_part_only(tmp_path):
    repo = submission_with_iou_starting_with(tmp_path, "while True: pass")
    tests, _ = graded(tmp_path, "--repo", repo, "--parts", "iou,locations", "--time-limit", "20")
    assert part(tests, "iou") == (0, 5)
    assert "timed out" in tests["iou"]["output"]
    assert part(tests, "locations") == (5, 5)


def test_the_total_time_limit_gives_0_with_a_note_and_still_writes_results(tmp_path):
    tests, results = graded(tmp_path, "--parts", "iou,locations,nms", "--jobs", "1", "--total-time-limit", "0.5")
    assert "ran out while it ran" in tests["iou"]["output"]  # started, then stopped at the limit
    assert all("not started" in tests[name]["output"] for name in ("locations", "locations" + HIDDEN, "nms"))
    assert all(test["score"] == 0 for test in tests.values()) and results["score"] == 0
    assert results["max_score"] == 15


def test_submissions_folder_gives_a_csv_gradebook(tmp_path):
    """One subfolder per student: the solution's files at the top, the release's one folder down."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import make_assignment

    release = tmp_path / "release"
    make_assignment.make_release(release)
    submissions = tmp_path / "submissions"
    (submissions / "alice").mkdir(parents=True)
    (submissions / "bob" / "my-a4").mkdir(parents=True)
    for name in MARKED:
        shutil.copy2(os.path.join(ROOT, name), submissions / "alice" / name)
        shutil.copy2(release / name, submissions / "bob" / "my-a4" / name)
    out = tmp_path / "grades.csv"
    proc = grade("--submissions", str(submissions), "--parts", "locations,iou", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {row["submission"]: row for row in csv.DictReader(out.open())}
    assert set(rows) == {"alice", "bob"}
    assert [rows["alice"][key] for key in ("locations", "iou", "total", "max_score")] == ["5", "5", "10", "10"]
    assert [rows["bob"][key] for key in ("locations", "iou", "total")] == ["0", "0", "0"]


def test_a_parts_forbidden_list_reaches_its_pytest_process(monkeypatch):
    module = grade_module()
    monkeypatch.setenv("A4_FORBIDDEN", "set.outside")  # never passed on from the grader's own environment
    env = module.pytest_env({"name": "nms", "forbidden": ["torchvision.ops.nms", "torchvision.ops.box_iou"]})
    assert env["A4_FORBIDDEN"] == "torchvision.ops.nms,torchvision.ops.box_iou"
    assert "A4_FORBIDDEN" not in module.pytest_env({"name": "iou"})


def test_points_split_between_public_and_hidden_tests_by_their_numbers():
    module = grade_module()
    assert module.split_points(5, 3, 1) == (3.75, 1.25)
    assert module.split_points(5, 2, 1) == (3.33, 1.67)
    assert module.split_points(10, 4, 0) == (10, 0)
    assert 1 <= module.default_jobs() <= (os.cpu_count() or 1)


def test_output_students_see_right_away_never_names_a_hidden_test():
    """A crash's log goes into the public entry: the hidden tests' names, files and modules are taken out."""
    module = grade_module()
    node = "tests/hidden/test_hidden.py::test_iou_of_touching_and_nested_boxes"
    log = "tests/hidden/test_hidden.py:12: in test_iou_of_touching_and_nested_boxes (tests.hidden.test_hidden)"
    assert module.redact(log, [node]) == "<hidden test>:12: in <hidden test> (<hidden test>)"


def test_the_marked_files_are_found_at_the_top_or_one_folder_down(tmp_path):
    module = grade_module()
    assert module.marked_files(module.load_parts()) == list(MARKED)
    (tmp_path / "__MACOSX").mkdir()
    (tmp_path / "__MACOSX" / "common.py").write_text("junk")
    (tmp_path / "repo").mkdir()
    for name in MARKED:
        (tmp_path / "repo" / name).write_text("x = 1\n")
    (tmp_path / "common.py").write_text("x = 2\n")
    found = module.find_submitted(tmp_path, list(MARKED))
    assert found == {"common.py": tmp_path / "common.py", **{n: tmp_path / "repo" / n for n in MARKED[1:]}}
    (tmp_path / "repo" / "common.py").write_text("def f(:\n")
    assert "not valid Python" in module.python_problem(tmp_path / "repo" / "common.py")
    assert module.python_problem(tmp_path / "common.py") is None


def test_usage_errors_exit_with_status_2(tmp_path):
    proc = grade("--parts", "iou,no_such_part", "--out", str(tmp_path / "results.json"))
    assert proc.returncode == 2
    assert "no_such_part" in proc.stderr
    assert grade("--repo", str(tmp_path / "missing"), cwd=tmp_path).returncode == 2
    assert not (tmp_path / "results.json").exists()


def test_junit_counting_fails_skips_and_errors(tmp_path):
    module = grade_module()
    junit = tmp_path / "junit.xml"
    junit.write_text(
        "<testsuites><testsuite>"
        '<testcase classname="t" name="a[0]"/><testcase classname="t" name="a[1]"><failure message="bad"/></testcase>'
        '<testcase classname="t" name="b"><skipped/></testcase>'
        '<testcase classname="t" name="c"/><testcase classname="t" name="c"><error message="teardown"/></testcase>'
        "</testsuite></testsuites>"
    )
    passed, run, failures = module.read_junit(junit)
    assert (passed, run) == (1, 4)
    assert [name for name, _ in failures] == ["t::a[1]", "t::b", "t::c"]


def _tree_whose_test_starts_a_sleeper(tmp_path):
    """A tree with one test that starts ``sleep 60`` in the background, writes its pid, then hangs."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "test_sleeper.py").write_text(
        "import pathlib, subprocess, time\n"
        "def test_hangs():\n"
        "    sleeper = subprocess.Popen(['sleep', '60'])\n"
        "    pathlib.Path('sleeper.pid').write_text(str(sleeper.pid))\n"
        "    time.sleep(60)\n"
    )
    return tree


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as stat:  # still listed: gone if only a zombie waiting for its parent
        return stat.read().rsplit(")", 1)[1].split()[0] == "Z"


@pytest.mark.parametrize("forked", [True, False], ids=["forkserver", "new process"])
def test_a_part_past_its_time_limit_is_stopped_with_every_process_it_started(tmp_path, monkeypatch, forked):
    module = grade_module()
    if not forked or module._forkserver() is None:
        monkeypatch.setattr(module, "_forkserver", lambda: None)
    tree = _tree_whose_test_starts_a_sleeper(tmp_path)
    code = module.run_pytest(tree, ["test_sleeper.py"], tmp_path / "junit.xml", tmp_path / "log.txt", time_limit=3)
    assert code is None
    sleeper = int((tree / "sleeper.pid").read_text())
    deadline = time.monotonic() + 5
    while not _gone(sleeper) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(sleeper), "the test's own child process outlived the time limit"

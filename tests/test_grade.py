"""The autograder (tools/grade.py): each test grades only one to three parts, through the script itself."""

import ast
import importlib.util
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRADE = os.path.join(ROOT, "tools", "grade.py")


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
    assert tests["iou"]["score"] == 0
    assert "NotImplementedError" in tests["iou"]["output"] and "test_iou_sanity_values" in tests["iou"]["output"]
    assert len(tests["iou"]["output"]) <= 2100
    assert tests["locations"]["score"] == tests["locations"]["max_score"] == 5
    assert results["score"] == 5 and results["max_score"] == 10


def test_a_hanging_function_times_out_and_loses_its_part_only(tmp_path):
    repo = submission_with_iou_starting_with(tmp_path, "while True: pass")
    tests, _ = graded(tmp_path, "--repo", repo, "--parts", "iou,locations", "--time-limit", "20")
    assert tests["iou"]["score"] == 0
    assert "timed out" in tests["iou"]["output"]
    assert tests["locations"]["score"] == tests["locations"]["max_score"] == 5


def test_usage_errors_exit_with_status_2(tmp_path):
    proc = grade("--parts", "iou,no_such_part", "--out", str(tmp_path / "results.json"))
    assert proc.returncode == 2
    assert "no_such_part" in proc.stderr
    assert grade("--repo", str(tmp_path / "missing"), cwd=tmp_path).returncode == 2
    assert not (tmp_path / "results.json").exists()


def test_junit_counting_fails_skips_and_errors(tmp_path):
    spec = importlib.util.spec_from_file_location("grade", GRADE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
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

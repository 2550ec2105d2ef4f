"""Parts written from scratch cannot be answered with torchvision's own operator: with A4_FORBIDDEN set to a
part's list (tools/parts.json, as the grader sets it), a shortcut fails that part's tests with a "not allowed"
error (tests/conftest.py), while the same shortcut passes them with it unset, and the solution passes them with it
set. Each check runs the part's tests in a pytest subprocess on a copy of the repository."""

import json
import os
import subprocess
import sys

import pytest
from conftest import copy_of_the_repository, replace_body

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = {part["name"]: part for part in json.load(open(os.path.join(ROOT, "tools", "parts.json")))["parts"]}
SHORTCUTS = {
    # nan_to_num: torchvision gives NaN for two empty boxes, where the course's iou gives 0
    "iou": ("common", "iou", "return torchvision.ops.box_iou(boxes1, boxes2).nan_to_num(0.0)"),
    "nms": ("common", "nms", "return torchvision.ops.nms(boxes, scores, iou_threshold)"),
}


def forbidden_of(part: str) -> str:
    return ",".join(PARTS[part]["forbidden"])  # what the grader passes in A4_FORBIDDEN


def run_part_tests(repo: str, part: str, forbidden):
    """Run ``part``'s tests (public and hidden ones that exist) in ``repo``; A4_FORBIDDEN is removed when
    ``forbidden`` is None."""
    nodes = PARTS[part]["tests"] + [
        node for node in PARTS[part]["hidden"] if os.path.isfile(os.path.join(repo, node.split("::")[0]))
    ]
    env = {key: value for key, value in os.environ.items() if key not in ("A4_FORBIDDEN", "PYTEST_ADDOPTS")}
    env.setdefault("OMP_NUM_THREADS", "1")
    if forbidden is not None:
        env["A4_FORBIDDEN"] = forbidden
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", *nodes]
    return subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("part", sorted(SHORTCUTS))
def test_a_shortcut_through_torchvision_fails_its_part_only_when_forbidden(part, tmp_path):
    module, function, statement = SHORTCUTS[part]
    repo = copy_of_the_repository(tmp_path / "repo")
    replace_body(repo, module, function, statement)
    refused = run_part_tests(repo, part, forbidden_of(part))
    operator = statement.split("(")[0].removeprefix("return ")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert f"{operator} is not allowed in this part" in refused.stdout
    assert " passed" not in refused.stdout, refused.stdout  # every test of the part calls it
    allowed = run_part_tests(repo, part, None)  # the check, not the shortcut, fails them
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr


@pytest.mark.parametrize("part", sorted(SHORTCUTS))
def test_the_solution_passes_its_part_with_the_forbidden_list_set(part):
    finished = run_part_tests(ROOT, part, forbidden_of(part))
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert "not allowed" not in finished.stdout


def test_an_unknown_forbidden_name_is_a_usage_error_naming_it(monkeypatch):
    from conftest import forbidden_names_from_environment

    monkeypatch.setenv("A4_FORBIDDEN", "torchvision.ops.box_iou, torchvision.ops.no_such_op")
    with pytest.raises(pytest.UsageError, match="'torchvision.ops.no_such_op'"):
        forbidden_names_from_environment()
    monkeypatch.setenv("A4_FORBIDDEN", "torchvision.ops")  # a module, not an operator
    with pytest.raises(pytest.UsageError, match="'torchvision.ops'"):
        forbidden_names_from_environment()
    monkeypatch.setenv("A4_FORBIDDEN", " torchvision.ops.nms,,torchvision.ops.roi_align ")
    assert list(forbidden_names_from_environment()) == ["torchvision.ops.nms", "torchvision.ops.roi_align"]
    monkeypatch.delenv("A4_FORBIDDEN")
    assert forbidden_names_from_environment() == {}

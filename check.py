"""Check a part of the assignment with its public tests, as the grader will.

In a notebook::

    from check import check
    check("iou")        # runs the iou part's public tests; prints its points and each failure

In a terminal::

    python check.py iou          # one part
    python check.py              # every part, in the order the notebooks teach them

The parts, their points and their tests are those of ``tools/parts.json``. Each check runs pytest in a
fresh process, so it sees the modules as they are saved now, whatever a notebook has imported. A failure
is shown with pytest's explanation (the expected and the actual values); a part that is still a stub is
named in one line. The grader also runs instructor-only tests, so full marks here are necessary, not
sufficient.

Imports: the standard library only (pytest runs in the child process).
"""

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List, Tuple
from xml.etree import ElementTree

ROOT = Path(__file__).resolve().parent
PARTS_FILE = ROOT / "tools" / "parts.json"
STUB_MARK = "is yours to write"  # the words of a stub's NotImplementedError (tools/make_assignment.py)
MAX_LINES = 12  # explanation lines shown per failed test


def load_parts(path: Path = PARTS_FILE) -> List[dict]:
    """The graded parts (points > 0) of ``parts.json``, in the file's order."""
    return [part for part in json.loads(path.read_text())["parts"] if part["points"] > 0]


def _run_tests(part: dict, junit: Path) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "PYTEST_ADDOPTS"}
    env["A4_FORBIDDEN"] = ",".join(part.get("forbidden", []))  # the operators this part must not call
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts="]
    command += ["--tb=short", f"--junitxml={junit}", *part["tests"]]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)


def _explanation(failure: ElementTree.Element) -> List[str]:
    """What a failed test's report says: a stub in one line, else pytest's ``E`` lines (expected, actual)."""
    text = (failure.get("message") or "") + "\n" + (failure.text or "")
    stub = re.search(rf"NotImplementedError: (\S+ {STUB_MARK}[^\n]*)", text)
    if stub:
        return [f"not written yet: {stub.group(1)}"]
    lines = [line[1:].strip() for line in text.splitlines() if line.startswith("E ")]
    lines = lines or [line for line in (failure.get("message") or "").splitlines() if line.strip()]
    return lines[:MAX_LINES] + (["..."] if len(lines) > MAX_LINES else [])


def _results(junit: Path) -> Tuple[int, int, List[Tuple[str, List[str]]]]:
    """``(passed, run, [(test name, explanation lines)])``; a skipped test counts as not passed."""
    passed, run, failures = 0, 0, []
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        run += 1
        bad = [child for child in case if child.tag in ("failure", "error", "skipped")]
        if bad:
            failures.append((case.get("name", "?"), _explanation(bad[0])))
        else:
            passed += 1
    return passed, run, failures


def check(name: str, verbose: bool = True) -> Tuple[float, float]:
    """Run part ``name``'s public tests and print its points, and what each failed test expected.

    Args:
        name: a part of ``tools/parts.json``, e.g. ``"iou"``.
        verbose: print the failures (else only the points line).
    Returns:
        ``(points earned, points of the part)``, earned in proportion to the tests that pass.
    """
    parts = {part["name"]: part for part in load_parts()}
    if name not in parts:
        raise ValueError(f"no part named {name!r}; the parts are: {', '.join(parts)}")
    part = parts[name]
    with tempfile.TemporaryDirectory(prefix="check-") as tmp:
        junit = Path(tmp) / "junit.xml"
        finished = _run_tests(part, junit)
        if not junit.is_file():  # pytest itself failed: show why
            print(f"{name}: 0/{part['points']} points; pytest could not run the tests:")
            print("\n".join(finished.stdout.splitlines()[-MAX_LINES:]))
            return 0.0, float(part["points"])
        passed, run, failures = _results(junit)
    earned = round(part["points"] * passed / run, 2) if run else 0.0
    print(f"{name}: {earned:g}/{part['points']} points ({passed}/{run} tests passed)")
    if verbose:
        for test, lines in failures:
            print(f"  FAILED {test}")
            for line in lines:
                print(f"      {line}")
    return earned, float(part["points"])


def main(argv=None) -> int:
    names = sys.argv[1:] if argv is None else argv
    parts = load_parts()
    if names:
        for name in names:
            check(name)
        return 0
    total, first_unwritten = 0.0, None
    for part in parts:
        earned, points = check(part["name"], verbose=False)
        total += earned
        if earned < points and first_unwritten is None:
            first_unwritten = part
    print(f"total: {total:g}/{sum(part['points'] for part in parts)} points of the public tests")
    if first_unwritten is not None:
        print(
            f"next: {first_unwritten['name']} ({first_unwritten['step']}); 'python check.py {first_unwritten['name']}'"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

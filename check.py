"""Check a part of the assignment with its public tests, as the grader will.

In a notebook::

    from check import check
    check("iou")        # runs the iou part's public tests; prints its points and each failure

In a terminal::

    python check.py iou          # one part
    python check.py              # every part, in the order the notebooks teach them

The parts, their points and their tests are those of ``tools/parts.json``. Each check runs pytest in a
fresh process, so it sees the modules as they are saved now, whatever a notebook has imported. Where the
system allows it (Linux, Colab included), that process is forked from a helper that has imported torch and
torchvision once (``multiprocessing``'s forkserver), which saves about three seconds of imports per check;
the project's own modules are never imported before the fork. Elsewhere (macOS, where forking a process
that has loaded system frameworks is unsafe, and Windows) it is a new Python process. As in the
grader, the other parts' functions answer from recorded data meanwhile (``tests/parts_from_data.py``), so a
part can be checked before the parts it calls are written. A failure
is shown with pytest's explanation (the expected and the actual values); a part that is still a stub is
named in one line. The grader also runs instructor-only tests, so full marks here are necessary, not
sufficient.

Imports: the standard library and ``tools/grade.py`` (pytest, torch and torchvision run in child processes).
"""

import json
import re
import sys
import tempfile
from pathlib import Path
from typing import List, Optional, Tuple

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "tools"))
import grade  # noqa: E402  (the grader's own pytest run and reading of its report)

PARTS_FILE = ROOT / "tools" / "parts.json"
STUB_MARK = "is yours to write"  # the words of a stub's NotImplementedError (tools/make_assignment.py)
MAX_LINES = 12  # explanation lines shown per failed test
TIME_LIMIT_S = 300  # a part's tests, as the grader's default


def load_parts(path: Path = PARTS_FILE) -> List[dict]:
    """The graded parts (points > 0) of ``parts.json``, in the file's order."""
    return [part for part in json.loads(path.read_text())["parts"] if part["points"] > 0]


def _explanation(message: str) -> List[str]:
    """What a failed test's report says: a stub in one line, else pytest's explanation (expected, actual)."""
    stub = re.search(rf"NotImplementedError: (\S+ {STUB_MARK}[^\n]*)", message)
    return [f"not written yet: {stub.group(1)}"] if stub else grade.explanation(message, MAX_LINES)


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
        junit, log = Path(tmp) / "junit.xml", Path(tmp) / "pytest.log"
        log.touch()
        if _run_tests(part, junit, log) is None:
            print(f"{name}: 0/{part['points']} points; its tests ran past the time limit of {TIME_LIMIT_S:g} s")
            return 0.0, float(part["points"])
        if not junit.is_file():  # pytest itself failed: show why
            print(f"{name}: 0/{part['points']} points; pytest could not run the tests:")
            print("\n".join(log.read_text(errors="replace").splitlines()[-MAX_LINES:]))
            return 0.0, float(part["points"])
        passed, run, failures = grade.read_junit(junit)
    earned = round(part["points"] * passed / run, 2) if run else 0.0
    print(f"{name}: {earned:g}/{part['points']} points ({passed}/{run} tests passed)")
    if verbose:
        for test, message in failures:
            print(f"  FAILED {test.split('::')[-1]}")
            for line in _explanation(message):
                print(f"      {line}")
    return earned, float(part["points"])


def _run_tests(part: dict, junit: Path, log: Path) -> Optional[int]:
    """Run ``part``'s public tests as the grader does; pytest's exit code, or None if it ran past TIME_LIMIT_S."""
    env = grade.pytest_env(part)  # the grader's environment, so the part's forbidden operators raise here too
    return grade.run_pytest(ROOT, part["tests"], junit, log, TIME_LIMIT_S, env=env)


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

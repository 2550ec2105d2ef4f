"""Autograder: score a submission part by part with the grader's own tests, and write Gradescope's results.json.

Usage::

    python tools/grade.py [--repo DIR] [--out results.json] [--parts a,b,...] [--time-limit SECONDS] [--jobs N]

The parts, their points and their tests (pytest node ids) are listed in ``tools/parts.json``, next to this script.
The submission (``--repo``, by default the repository this script lives in) is not trusted: it is copied to a
temporary folder (without .git, runs/, data/ and caches), its ``tests/`` folder is replaced by the grader's own
``tests/`` (the one next to ``tools/``, hidden tests included when present) and the grader's ``pytest.ini`` is copied
over it. Each part then runs in a fresh ``python -m pytest`` process with a time limit; its score is
``points x passed / run``, counted from pytest's junit XML (a skipped test counts as not passed). A timeout or a crash
(pytest exit code other than 0 or 1) gives that part 0 and leaves the other parts alone.

The exit status is 0 whenever grading ran, whatever the score, and 2 for a usage error (a bad ``--repo``, an
unknown part name). Only the standard library is imported, so the grader runs wherever pytest does.
"""

import argparse
import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from xml.etree import ElementTree

GRADER_ROOT = Path(__file__).resolve().parent.parent
PARTS_FILE = Path(__file__).resolve().parent / "parts.json"
SKIP_AT_TOP = {".git", "runs", "data", "tests", "pytest.ini"}
SKIP_ANYWHERE = ("__pycache__", ".pytest_cache")
# Files a submission could use to change how pytest itself runs: removed from the copy.
UNTRUSTED_AT_TOP = ("conftest.py", "pytest.py", "_pytest", "pluggy", "py.py", "sitecustomize.py", "usercustomize.py")
MAX_OUTPUT_CHARS = 2000


def load_parts(path: Path = PARTS_FILE) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _ignore(top: Path):
    """A ``copytree`` ignore function: caches anywhere, and the SKIP_AT_TOP names in ``top`` itself."""

    def ignore(directory, names):
        skipped = {name for name in names if name in SKIP_ANYWHERE}
        if Path(directory).resolve() == top.resolve():
            skipped |= SKIP_AT_TOP & set(names)
        return skipped

    return ignore


def prepare_tree(submission: Path, workdir: Path) -> Path:
    """Copy the submission to ``workdir/submission`` with the grader's tests and pytest.ini in place of its own."""
    tree = workdir / "submission"
    shutil.copytree(submission, tree, symlinks=True, ignore=_ignore(submission))
    for name in UNTRUSTED_AT_TOP:
        path = tree / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    shutil.copytree(GRADER_ROOT / "tests", tree / "tests", ignore=shutil.ignore_patterns(*SKIP_ANYWHERE))
    shutil.copy2(GRADER_ROOT / "pytest.ini", tree / "pytest.ini")
    return tree


def node_ids(part: dict) -> list:
    """The part's tests, plus its hidden tests whose file exists in the grader's tests/hidden/."""
    hidden = [node for node in part.get("hidden", []) if (GRADER_ROOT / node.split("::")[0]).is_file()]
    return list(part["tests"]) + hidden


def run_pytest(tree: Path, nodes: list, junit: Path, log: Path, time_limit: float):
    """Run pytest on ``nodes`` in ``tree``; return its exit code, or None when it ran past ``time_limit``."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("PYTEST_ADDOPTS", None)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts="]
    command += [f"--junitxml={junit}", *nodes]
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, cwd=tree, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        try:
            return proc.wait(timeout=time_limit)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            return None


def read_junit(junit: Path):
    """``(passed, run, failures)`` from a junit XML file; failures is a list of ``(test name, message)``.

    A test reported more than once (e.g. a pass and then a teardown error) passes only if every report does,
    and a skipped test earns nothing (a submission must not escape a test by skipping it)."""
    outcomes = {}
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        bad = [child for child in case if child.tag in ("failure", "error")]
        skipped = [child for child in case if child.tag == "skipped"]
        if bad:
            outcome = ("failed", bad[0].get("message") or bad[0].text or bad[0].tag)
        elif skipped:
            outcome = ("failed", "skipped: " + (skipped[0].get("message") or "no reason given"))
        else:
            outcome = ("passed", "")
        if outcomes.get(name, ("passed", ""))[0] == "passed":
            outcomes[name] = outcome
    failures = [(name, message) for name, (state, message) in outcomes.items() if state == "failed"]
    return len(outcomes) - len(failures), len(outcomes), failures


def failure_text(failures: list, limit: int = MAX_OUTPUT_CHARS) -> str:
    """Failed test names with the first lines of their messages, cut to about ``limit`` characters."""
    lines = []
    for name, message in failures:
        first = [line for line in str(message).strip().splitlines() if line.strip()][:3]
        lines.append(f"FAILED {name}")
        lines.extend(f"    {line[:200]}" for line in first)
    return shorten("\n".join(lines), limit)


def failure_note(failures: list) -> str:
    names = ", ".join(name.split("::")[-1] for name, _ in failures)
    return shorten(f"{len(failures)} failed: {names}", 100).replace("\n", " ")


def shorten(text: str, limit: int = MAX_OUTPUT_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 4].rstrip() + "\n..."


def grade_part(part: dict, tree: Path, workdir: Path, time_limit: float) -> dict:
    """Run one part's tests; return its result (score, max_score, passed, run, note, output)."""
    points = part["points"]
    result = {"name": part["name"], "score": 0.0, "max_score": points, "passed": 0, "run": 0}
    junit, log = workdir / f"{part['name']}.xml", workdir / f"{part['name']}.log"
    code = run_pytest(tree, node_ids(part), junit, log, time_limit)
    if code is None:
        note = f"timed out after {time_limit:g} s"
        return {**result, "note": note, "output": note}
    if code not in (0, 1) or not junit.is_file():
        tail = log.read_text(encoding="utf-8", errors="replace")[-1500:].partition("\n")[2]
        note = f"pytest crashed (exit code {code}): no points for this part"
        return {**result, "note": note, "output": shorten(f"{note}\n{tail}")}
    passed, run, failures = read_junit(junit)
    score = round(points * passed / run, 2) if run else 0.0
    note = "all tests passed" if run and not failures else "no test ran" if not run else failure_note(failures)
    output = failure_text(failures) if failures else note
    return {**result, "score": score, "passed": passed, "run": run, "note": note, "output": output}


def print_table(results: list, total: float, max_total: float) -> None:
    width = max([len("part")] + [len(r["name"]) for r in results])
    print(f"{'part':<{width}}  {'score':>13}  {'passed':>9}  note")
    for r in results:
        score = f"{r['score']:g}/{r['max_score']:g}"
        passed = f"{r['passed']}/{r['run']}"
        note = r["note"].splitlines()[0] if r["note"] else ""
        print(f"{r['name']:<{width}}  {score:>13}  {passed:>9}  {note}")
    print(f"{'total':<{width}}  {f'{total:g}/{max_total:g}':>13}")


def results_json(results: list, total: float, max_total: float, seconds: float) -> dict:
    tests = [
        {"name": r["name"], "score": r["score"], "max_score": r["max_score"], "output": r["output"],
         "visibility": "visible"}
        for r in results
    ]  # fmt: skip
    return {"score": total, "max_score": max_total, "tests": tests, "execution_time": round(seconds, 1)}


def parse_args(argv, part_names: list):
    parser = argparse.ArgumentParser(description="Grade a submission part by part (see tools/parts.json).")
    parser.add_argument("--repo", type=Path, default=GRADER_ROOT, help="the submission (default: this repository)")
    parser.add_argument("--out", type=Path, default=Path("results.json"), help="where to write results.json")
    parser.add_argument("--parts", help="comma-separated part names (default: all)")
    parser.add_argument("--time-limit", type=float, help="seconds per part (default: time_limit_s of parts.json)")
    parser.add_argument("--jobs", type=int, default=1, help="parts graded side by side, each in its own process")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be 1 or more")
    if not args.repo.is_dir():
        parser.error(f"--repo {args.repo}: not a directory")
    args.parts = [name.strip() for name in args.parts.split(",") if name.strip()] if args.parts else part_names
    unknown = [name for name in args.parts if name not in part_names]
    if unknown:
        parser.error(f"unknown part(s): {', '.join(unknown)}; the parts are: {', '.join(part_names)}")
    if args.time_limit is not None and args.time_limit <= 0:
        parser.error("--time-limit must be positive")
    return args


def main(argv=None) -> int:
    config = load_parts()
    parts = {part["name"]: part for part in config["parts"]}
    args = parse_args(argv, list(parts))
    time_limit = args.time_limit or config.get("time_limit_s", 300)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="grade-") as tmp:
        workdir = Path(tmp)
        tree = prepare_tree(args.repo.resolve(), workdir)
        with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:  # each part is its own process
            futures = [pool.submit(grade_part, parts[name], tree, workdir, time_limit) for name in args.parts]
            for name, future in zip(args.parts, futures):
                print(f"graded {name}: {future.result()['note']}", file=sys.stderr, flush=True)
        results = [future.result() for future in futures]
    graded = [r for r in results if r["max_score"] > 0]
    total = round(sum(r["score"] for r in graded), 2)
    max_total = round(sum(r["max_score"] for r in graded), 2)
    print_table(results, total, max_total)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(results_json(results, total, max_total, time.monotonic() - start), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Autograder: score a submission part by part with the grader's own tests, and write Gradescope's results.json.

Usage::

    python tools/grade.py [--repo DIR | --submission DIR] [--out results.json] [--parts a,b,...]
                          [--time-limit SECONDS] [--total-time-limit SECONDS] [--jobs N]
    python tools/grade.py --submissions DIR [--out grades.csv] [...]

The parts, their points and their tests (pytest node ids) are listed in ``tools/parts.json``, next to this script.
What is graded is never trusted: it is copied to a temporary folder (without .git, runs/, data/ and caches), its
``tests/`` folder is replaced by the grader's own ``tests/`` (the one next to ``tools/``, hidden tests included when
present) and the grader's ``pytest.ini`` is copied over it. Three ways to name it:

* ``--repo DIR`` (default: the repository this script lives in): a whole tree, graded as it is.
* ``--submission DIR``: a student's upload. Only the files that hold the parts (the modules of parts.json's
  functions: common.py, one_stage_detector.py, two_stage_detector.py) are taken from it, at its top or one folder
  down (the three files, a folder holding them, or a whole repository), and laid over the given code (the
  grader's own tree, with the solutions taken out when it holds them). A file that is missing or is not valid
  Python is named in results.json; the parts whose functions live in it get 0 and the others are graded with the
  given stub in its place. This is what Gradescope's ``run_autograder`` calls.
* ``--submissions DIR``: every subfolder of DIR is one ``--submission`` (its name is the student's); the scores go
  to one CSV gradebook (``--out``, default grades.csv): a row per submission, a column per part, and the total.

Each part then runs in a fresh pytest process (on Linux forked from a server that has imported torch once) with a
time limit (``--time-limit``), and the whole run has one too (``--total-time-limit``): a part that has not started,
or still runs, when it expires gets 0 with a note. A part's score is its points x passed / run, counted from
pytest's junit XML (a skipped test counts as not passed). A timeout or a crash (pytest exit code other than 0 or 1)
gives that part 0 and leaves the other parts alone. A part with hidden tests is reported as two entries: its public
tests (visible) and "<part> (hidden tests)", with the visibility of parts.json's ``hidden_visibility``; its points
are split between the two in proportion to the number of tests, and only that second entry names the hidden tests. A
part's ``forbidden`` list (names such as ``torchvision.ops.nms``) reaches its pytest process as the environment
variable ``A4_FORBIDDEN`` (comma-separated).

The exit status is 0 whenever grading ran, whatever the score, and 2 for a usage error (a bad folder, an unknown
part name). Only the standard library is imported, so the grader runs wherever pytest does.
"""

import argparse
import ast
import concurrent.futures
import csv
import json
import math
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from xml.etree import ElementTree

GRADER_ROOT = Path(__file__).resolve().parent.parent
PARTS_FILE = Path(__file__).resolve().parent / "parts.json"
SKIP_AT_TOP = {".git", "runs", "data", "tests", "pytest.ini"}
SKIP_ANYWHERE = ("__pycache__", ".pytest_cache")
# Files a submission could use to change how pytest itself runs: removed from the copy.
UNTRUSTED_AT_TOP = ("conftest.py", "pytest.py", "_pytest", "pluggy", "py.py", "sitecustomize.py", "usercustomize.py")
MAX_OUTPUT_CHARS = 2000
EXPLANATION_LINES = 8  # lines of pytest's explanation shown per failed test
MEMORY_PER_JOB = 1 << 30  # a part's pytest process with torch peaks near 0.9 GiB
HIDDEN_SUFFIX = " (hidden tests)"


def load_parts(path: Path = PARTS_FILE) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------------- the tree


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


def marked_files(config: dict) -> list:
    """The files a student writes in: the modules of the parts' functions (``module.qualified_name``)."""
    return sorted({function.split(".")[0] + ".py" for part in config["parts"] for function in part["functions"]})


def find_submitted(folder: Path, names: list) -> dict:
    """``{name: path}`` of the named files in ``folder``: at its top, or else in one of its subfolders."""
    places = [folder] + sorted(
        child for child in folder.iterdir() if child.is_dir() and not child.name.startswith((".", "__"))
    )
    found = {}
    for name in names:
        at = [place / name for place in places if (place / name).is_file()]
        if at:
            found[name] = at[0]
    return found


def python_problem(path: Path):
    """Why ``path`` is not valid Python (a short text), or None when it parses."""
    try:
        ast.parse(path.read_bytes(), filename=path.name)
    except SyntaxError as error:
        return f"is not valid Python ({error.msg}, line {error.lineno})"
    except (ValueError, UnicodeDecodeError, RecursionError, MemoryError) as error:
        return f"is not valid Python ({type(error).__name__}: {error})"
    return None


def given_source(name: str) -> str:
    """The given code of a student's file: the grader's own, with the solutions taken out if it holds them."""
    source = (GRADER_ROOT / name).read_text(encoding="utf-8")
    tools = Path(__file__).resolve().parent
    if not (tools / "make_assignment.py").is_file():  # a release, or the autograder's zip: stubs already
        return source
    if str(tools) not in sys.path:
        sys.path.insert(0, str(tools))
    import make_assignment  # the solution's repository: its release tool sits next to this script

    steps = make_assignment.steps_by_function(PARTS_FILE)
    return make_assignment.strip_solutions(source, Path(name).stem, steps)[0]


def overlay_submission(submission: Path, tree: Path, names: list) -> dict:
    """Lay the student's files from ``submission`` over the given code in ``tree``; return the problems found,
    ``{file name: "is missing ..." or "is not valid Python (...)"}`` (those files keep the given stubs)."""
    found = find_submitted(submission, names)
    problems = {}
    for name in names:
        (tree / name).write_text(given_source(name), encoding="utf-8")
        if name not in found:
            problems[name] = "is missing from the submission (looked at its top and one folder down)"
        elif python_problem(found[name]):
            problems[name] = python_problem(found[name])
        else:
            shutil.copyfile(found[name], tree / name)
    return problems


# ----------------------------------------------------------------------------------------------- one part


def node_ids(part: dict):
    """``(public, hidden)``: the part's tests, and its hidden tests whose file is in the grader's tests/hidden/."""
    hidden = [node for node in part.get("hidden", []) if (GRADER_ROOT / node.split("::")[0]).is_file()]
    return list(part["tests"]), hidden


def junit_key(node: str):
    """``(classname, name)`` that pytest's junit XML gives the test of a node id."""
    path, *rest = node.split("::")
    module = path[:-3] if path.endswith(".py") else path
    return ".".join([module.replace("/", "."), *rest[:-1]]), rest[-1]


def _is_node(classname: str, name: str, node: str) -> bool:
    node_class, node_name = junit_key(node)
    return classname == node_class and (name == node_name or name.startswith(node_name + "["))


def split_points(points: float, public: int, hidden: int):
    """A part's points split between its public and its hidden tests in proportion to their numbers."""
    if not hidden:
        return points, 0.0
    share = round(points * public / (public + hidden), 2)
    return share, round(points - share, 2)


PYTEST_ARGS = ["-q", "-p", "no:cacheprovider", "-o", "addopts=", "--color=no"]  # a part's pytest run (check.py too)


def pytest_env(part: dict) -> dict:
    """The environment of a part's pytest process."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MPLBACKEND", "Agg")
    for name in ("PYTEST_ADDOPTS", "PYTEST_PLUGINS", "A4_FORBIDDEN", "A4_GRADED_PART", "A4_RECORD_DIR"):
        env.pop(name, None)
    if part.get("points", 0) > 0 and part.get("functions"):
        env["A4_GRADED_PART"] = part["name"]  # the other parts answer from data (tests/parts_from_data.py)
    if part.get("forbidden"):
        env["A4_FORBIDDEN"] = ",".join(part["forbidden"])
    return env


PRELOAD = ["torch", "torchvision"]  # imported once by the forkserver; never a module of a graded tree


def _forkserver():
    """``multiprocessing``'s forkserver context, its server preloading torch and torchvision; None off Linux
    (on macOS forking a process that has loaded system frameworks is unsafe; Windows cannot fork)."""
    if not sys.platform.startswith("linux") or "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)  # a module that is not installed is skipped
    return context


# A forked child's work: pytest run in ``tree`` with ``env``, as ``python -m pytest`` would run there. It reaches the
# child as text (``exec``), so that the forkserver needs nothing of this file importable, whatever its sys.path.
_CHILD_SOURCE = """
import os, sys, traceback
os.setsid()  # a process group of its own, so that a timeout stops whatever its tests started too
code = 3  # pytest's "internal error" if anything below fails before pytest runs: the part gets 0
try:
    os.environ.clear()
    os.environ.update(env)
    with open(log, "wb") as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
    os.chdir(tree)
    sys.path.insert(0, tree)  # the tree's modules come first, as with python -m pytest run in it
    if "torch" in sys.modules:  # imported by the server, before env's OMP_NUM_THREADS could apply
        sys.modules["torch"].set_num_threads(max(int(env.get("OMP_NUM_THREADS", "1")), 1))
    import pytest
    code = int(pytest.main(pytest_args))
except BaseException:
    traceback.print_exc()
finally:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
"""


def _stop_group(pid: int) -> None:
    """Kill process ``pid`` and its process group (whatever its tests started)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # not yet its own group leader, or already gone
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_pytest(tree: Path, nodes: list, junit: Path, log: Path, time_limit: float, env=None):
    """Run pytest on ``nodes`` in ``tree``; return its exit code, or None when it ran past ``time_limit``.

    On Linux the process is forked from a server that has imported torch and torchvision once (about three
    seconds less per part); it imports nothing of ``tree`` before the fork. Elsewhere it is a new Python process.
    """
    env = env if env is not None else pytest_env({})
    pytest_args = [*PYTEST_ARGS, f"--junitxml={junit}", *nodes]
    context = _forkserver()
    if context is None:
        command = [sys.executable, "-m", "pytest", *pytest_args]
        with open(log, "wb") as out:
            proc = subprocess.Popen(command, cwd=tree, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
            try:
                return proc.wait(timeout=max(time_limit, 0.01))
            except subprocess.TimeoutExpired:
                _stop_group(proc.pid)
                proc.wait()
                return None
    names = {"tree": str(tree), "log": str(log), "env": env, "pytest_args": pytest_args}
    child = context.Process(target=exec, args=(_CHILD_SOURCE, names))
    child.start()
    child.join(max(time_limit, 0.01))
    if child.is_alive():
        _stop_group(child.pid)
        child.join()
        return None
    return child.exitcode


def read_outcomes(junit: Path) -> dict:
    """``{(classname, name): (state, message)}`` from a junit XML file, state "passed" or "failed".

    A test reported more than once (e.g. a pass and then a teardown error) passes only if every report does,
    and a skipped test earns nothing (a submission must not escape a test by skipping it)."""
    outcomes = {}
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        key = (case.get("classname", ""), case.get("name", ""))
        bad = [child for child in case if child.tag in ("failure", "error")]
        skipped = [child for child in case if child.tag == "skipped"]
        if bad:
            outcome = ("failed", "\n".join(part for part in (bad[0].get("message"), bad[0].text) if part) or bad[0].tag)
        elif skipped:
            outcome = ("failed", "skipped: " + (skipped[0].get("message") or "no reason given"))
        else:
            outcome = ("passed", "")
        if outcomes.get(key, ("passed", ""))[0] == "passed":
            outcomes[key] = outcome
    return outcomes


def count(outcomes: dict):
    """``(passed, run, failures)``; failures is a list of ``(test name, message)``."""
    failures = [(f"{classname}::{name}", message) for (classname, name), (state, message) in outcomes.items()
                if state == "failed"]  # fmt: skip
    return len(outcomes) - len(failures), len(outcomes), failures


def read_junit(junit: Path):
    """``(passed, run, failures)`` from a junit XML file; failures is a list of ``(test name, message)``."""
    return count(read_outcomes(junit))


def explanation(message: str, max_lines: int = EXPLANATION_LINES) -> list:
    """What a failed test's report says: pytest's ``E`` lines (the assertion with the expected and the actual
    values) when the report has them, else its first lines."""
    lines = [line[1:].strip() for line in str(message).splitlines() if line.startswith("E ")]
    lines = lines or [line for line in str(message).strip().splitlines() if line.strip()][:3]
    return lines[:max_lines] + (["..."] if len(lines) > max_lines else [])


def failure_text(failures: list, limit: int = MAX_OUTPUT_CHARS) -> str:
    """Failed test names with what each expected and got (``explanation``), cut to about ``limit`` characters."""
    lines = []
    for name, message in failures:
        lines.append(f"FAILED {name}")
        lines.extend(f"    {line[:200]}" for line in explanation(message))
    return shorten("\n".join(lines), limit)


def failure_note(failures: list) -> str:
    names = ", ".join(name.split("::")[-1] for name, _ in failures)
    return shorten(f"{len(failures)} failed: {names}", 100).replace("\n", " ")


def shorten(text: str, limit: int = MAX_OUTPUT_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 4].rstrip() + "\n..."


def redact(text: str, hidden: list) -> str:
    """``text`` with the hidden tests' names (and their files') replaced, for an entry students see."""
    names = set()
    for node in hidden:
        path, *rest = node.split("::")
        module = path[:-3] if path.endswith(".py") else path
        names |= {node, path, Path(path).name, module.replace("/", "."), *(piece.split("[")[0] for piece in rest)}
    for name in sorted(names, key=len, reverse=True):
        text = text.replace(name, "<hidden test>")
    return text


class Clock:
    """The total time limit of a grade run."""

    def __init__(self, total: float):
        self.total, self.deadline = total, time.monotonic() + total

    def left(self) -> float:
        return self.deadline - time.monotonic()


def _entry(name: str, max_score: float, note: str, output=None, score=0.0, passed=0, run=0) -> dict:
    return {"name": name, "score": score, "max_score": max_score, "passed": passed, "run": run, "note": note,
            "output": note if output is None else output}  # fmt: skip


def grade_part(part: dict, tree: Path, workdir: Path, time_limit: float, clock: Clock, problem=None) -> dict:
    """Run one part's tests; return ``{"public": entry, "hidden": entry or None}``, an entry being
    ``{name, score, max_score, passed, run, note, output}``."""
    public, hidden = node_ids(part)
    public_max, hidden_max = split_points(part["points"], len(public), len(hidden))
    hidden_name = part["name"] + HIDDEN_SUFFIX

    def both(note: str, output=None) -> dict:
        public_entry = _entry(part["name"], public_max, note, None if output is None else redact(output, hidden))
        return {"public": public_entry, "hidden": _entry(hidden_name, hidden_max, note) if hidden else None}

    if problem:
        return both(problem)
    left = clock.left()
    if left <= 0:
        return both(f"not started: the total time limit of {clock.total:g} s for the whole run ran out")
    junit, log = workdir / f"{part['name']}.xml", workdir / f"{part['name']}.log"
    code = run_pytest(tree, public + hidden, junit, log, min(time_limit, left), pytest_env(part))
    if code is None:
        if left < time_limit:
            return both(f"stopped: the total time limit of {clock.total:g} s for the whole run ran out while it ran")
        return both(f"timed out after {time_limit:g} s")
    if code not in (0, 1) or not junit.is_file():
        tail = log.read_text(encoding="utf-8", errors="replace")[-1500:].partition("\n")[2]
        note = f"pytest crashed (exit code {code}): no points for this part"
        return both(note, shorten(f"{note}\n{tail}"))
    outcomes = read_outcomes(junit)
    hidden_outcomes = {key: value for key, value in outcomes.items() if any(_is_node(*key, node) for node in hidden)}
    public_outcomes = {key: value for key, value in outcomes.items() if key not in hidden_outcomes}
    result = {"public": _scored(part["name"], public_max, public_outcomes), "hidden": None}
    if hidden:
        result["hidden"] = _scored(hidden_name, hidden_max, hidden_outcomes)
    return result


def _scored(name: str, max_score: float, outcomes: dict) -> dict:
    passed, run, failures = count(outcomes)
    score = round(max_score * passed / run, 2) if run else 0.0
    note = "all tests passed" if run and not failures else "no test ran" if not run else failure_note(failures)
    output = failure_text(failures) if failures else note
    return _entry(name, max_score, note, output, score, passed, run)


# ----------------------------------------------------------------------------------------------- a whole run


def grade(tree_source: Path, parts: list, config: dict, *, time_limit: float, total_time_limit: float, jobs: int,
          overlay: bool = False, progress=None) -> dict:  # fmt: skip
    """Grade ``tree_source`` (a whole tree, or with ``overlay`` a student's upload laid over the given code).

    Returns ``{"parts": {part name: grade_part's result}, "problems": {file: text}, "seconds": float}``."""
    start, clock = time.monotonic(), Clock(total_time_limit)
    with tempfile.TemporaryDirectory(prefix="grade-") as tmp:
        workdir = Path(tmp)
        problems = {}
        if overlay:
            tree = prepare_tree(GRADER_ROOT, workdir)
            problems = overlay_submission(tree_source, tree, marked_files(config))
        else:
            tree = prepare_tree(tree_source, workdir)
        with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:  # each part is its own process
            futures = {}
            for part in parts:
                modules = {function.split(".")[0] + ".py" for function in part["functions"]}
                problem = "; ".join(f"{name} {problems[name]}: no points for this part"
                                    for name in sorted(modules & set(problems)))  # fmt: skip
                futures[part["name"]] = pool.submit(grade_part, part, tree, workdir, time_limit, clock, problem)
            for name, future in futures.items():
                if progress:
                    progress(f"graded {name}: {future.result()['public']['note']}")
        results = {name: future.result() for name, future in futures.items()}
    return {"parts": results, "problems": problems, "seconds": time.monotonic() - start}


def entries(graded: dict) -> list:
    """The results' entries in order: each part's public entry, then its hidden entry when it has one."""
    return [entry for result in graded["parts"].values() for entry in (result["public"], result["hidden"]) if entry]


def totals(graded: dict, config: dict):
    """``(score, max score)`` over the parts worth points."""
    points = {part["name"]: part["points"] for part in config["parts"]}
    counted = [result for name, result in graded["parts"].items() if points[name] > 0]
    score = sum(entry["score"] for result in counted for entry in (result["public"], result["hidden"]) if entry)
    return round(score, 2), round(sum(points[name] for name in graded["parts"] if points[name] > 0), 2)


def problems_text(problems: dict) -> str:
    if not problems:
        return ""
    lines = [f"{name} {text}." for name, text in sorted(problems.items())]
    lines.append("The parts whose functions live in these files get 0; the other parts were graded with the "
                 "given code (its stubs) in place of these files.")  # fmt: skip
    return "\n".join(lines)


def print_table(graded: dict, config: dict, out=sys.stdout) -> None:
    rows = entries(graded)
    width = max([len("part")] + [len(r["name"]) for r in rows])
    print(f"{'part':<{width}}  {'score':>13}  {'passed':>9}  note", file=out)
    for r in rows:
        score = f"{r['score']:g}/{r['max_score']:g}"
        passed = f"{r['passed']}/{r['run']}"
        note = r["note"].splitlines()[0] if r["note"] else ""
        print(f"{r['name']:<{width}}  {score:>13}  {passed:>9}  {note}", file=out)
    total, max_total = totals(graded, config)
    print(f"{'total':<{width}}  {f'{total:g}/{max_total:g}':>13}", file=out)
    if graded["problems"]:
        print(problems_text(graded["problems"]), file=out)


def results_json(graded: dict, config: dict) -> dict:
    """Gradescope's results.json. The hidden entries take parts.json's ``hidden_visibility``, and stdout (the
    table, which names every entry) is never shown to students."""
    visibility = config.get("hidden_visibility", "after_published")
    tests = [
        {"name": entry["name"], "score": entry["score"], "max_score": entry["max_score"], "output": entry["output"],
         "visibility": visibility if entry["name"].endswith(HIDDEN_SUFFIX) else "visible"}
        for entry in entries(graded)
    ]  # fmt: skip
    total, max_total = totals(graded, config)
    results = {"score": total, "max_score": max_total, "tests": tests, "stdout_visibility": "hidden",
               "execution_time": round(graded["seconds"], 1)}  # fmt: skip
    if graded["problems"]:
        results["output"] = problems_text(graded["problems"])
    return results


def failed_results(error: str) -> dict:
    """A results.json for a run that could not grade at all (so that Gradescope still gets one)."""
    output = f"The autograder could not grade this submission: {error}. Please tell the course staff."
    return {"score": 0.0, "output": output, "tests": [], "stdout_visibility": "hidden"}


def write_gradebook(path: Path, rows: list, part_names: list) -> None:
    """One row per submission: its name, a column per part (public and hidden entries together), the total."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["submission", *part_names, "total", "max_score", "notes"])
        writer.writerows(rows)


def gradebook_row(name: str, graded: dict, config: dict, part_names: list) -> list:
    def part_score(result):
        return round(sum(entry["score"] for entry in (result["public"], result["hidden"]) if entry), 2)

    total, max_total = totals(graded, config)
    notes = [f"{file} {text}" for file, text in sorted(graded["problems"].items())]
    notes += [f"{part}: {result['public']['note']}" for part, result in graded["parts"].items()
              if "time limit" in result["public"]["note"] or "crashed" in result["public"]["note"]]  # fmt: skip
    return [name, *(f"{part_score(graded['parts'][part]):g}" for part in part_names), f"{total:g}", f"{max_total:g}",
            "; ".join(notes)]  # fmt: skip


# ----------------------------------------------------------------------------------------------- command line


def _cgroup_number(*paths):
    for path in paths:
        try:
            text = Path(path).read_text().split()
        except OSError:
            continue
        if text and text[0] != "max":
            return [float(value) for value in text]
    return None


def default_jobs() -> int:
    """The number of cores this process may use (its CPU affinity and a container's CPU quota), but no more
    parts side by side than the memory holds at about 1 GiB each."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    quota = _cgroup_number("/sys/fs/cgroup/cpu.max")
    if quota is None:
        v1 = (
            _cgroup_number("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"),
            _cgroup_number("/sys/fs/cgroup/cpu/cpu.cfs_period_us"),
        )
        quota = [v1[0][0], v1[1][0]] if v1[0] and v1[1] and v1[0][0] > 0 else None
    if quota and len(quota) == 2 and quota[1] > 0:
        cores = min(cores, max(1, math.ceil(quota[0] / quota[1])))
    memory = [value for value in (
        _cgroup_number("/sys/fs/cgroup/memory.max"), _cgroup_number("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
    ) if value]  # fmt: skip
    try:
        available = [line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemAvailable")]
        memory.append([float(available[0].split()[1]) * 1024])
    except (OSError, IndexError, ValueError):
        pass
    if memory:
        cores = min(cores, max(1, int(min(value[0] for value in memory) // MEMORY_PER_JOB)))
    return max(1, cores)


def parse_args(argv, config: dict):
    part_names = [part["name"] for part in config["parts"]]
    parser = argparse.ArgumentParser(description="Grade a submission part by part (see tools/parts.json).")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--repo", type=Path, help="a whole tree to grade as it is (default: this repository)")
    what.add_argument("--submission", type=Path,
                      help="a student's upload: the marked files at its top or one folder down")  # fmt: skip
    what.add_argument("--submissions", type=Path, help="a folder with one subfolder per student: a CSV gradebook")
    parser.add_argument("--out", type=Path, help="where to write results.json (or the CSV with --submissions)")
    parser.add_argument("--parts", help="comma-separated part names (default: all)")
    parser.add_argument("--time-limit", type=float, help="seconds per part (default: time_limit_s of parts.json)")
    parser.add_argument(
        "--total-time-limit",
        type=float,
        help="seconds for the whole run of one submission (default: total_time_limit_s of parts.json)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=default_jobs(),
        help="parts graded side by side, each in its own process (default: the cores, %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be 1 or more")
    folder = args.repo or args.submission or args.submissions
    if folder is not None and not folder.is_dir():
        option = "--repo" if args.repo else "--submission" if args.submission else "--submissions"
        parser.error(f"{option} {folder}: not a directory")
    args.parts = [name.strip() for name in args.parts.split(",") if name.strip()] if args.parts else part_names
    unknown = [name for name in args.parts if name not in part_names]
    if unknown:
        parser.error(f"unknown part(s): {', '.join(unknown)}; the parts are: {', '.join(part_names)}")
    for option in ("time_limit", "total_time_limit"):
        if getattr(args, option) is not None and getattr(args, option) <= 0:
            parser.error(f"--{option.replace('_', '-')} must be positive")
    if args.out is None:
        args.out = Path("grades.csv" if args.submissions else "results.json")
    return args


def main(argv=None) -> int:
    config = load_parts()
    parts = {part["name"]: part for part in config["parts"]}
    args = parse_args(argv, config)
    chosen = [parts[name] for name in args.parts]
    limits = {
        "time_limit": args.time_limit or config.get("time_limit_s", 300),
        "total_time_limit": args.total_time_limit or config.get("total_time_limit_s", 1200),
        "jobs": args.jobs,
    }

    def progress(line):
        print(line, file=sys.stderr, flush=True)

    if args.submissions:
        names = sorted(d.name for d in args.submissions.iterdir() if d.is_dir() and not d.name.startswith((".", "__")))
        rows = []
        for name in names:
            progress(f"== {name}")
            try:
                graded = grade(args.submissions / name, chosen, config, overlay=True, progress=progress, **limits)
            except Exception as error:  # one submission that cannot be graded does not stop the others
                traceback.print_exc()
                rows.append([name, *("0" for _ in args.parts), "0", "", f"not graded: {type(error).__name__}: {error}"])
                continue
            print(f"== {name}")
            print_table(graded, config)
            rows.append(gradebook_row(name, graded, config, args.parts))
        write_gradebook(args.out, rows, args.parts)
        print(f"Wrote {len(rows)} submission(s) to {args.out}.")
        return 0
    if args.submission:
        try:
            graded = grade(args.submission, chosen, config, overlay=True, progress=progress, **limits)
        except Exception as error:  # Gradescope must get a results.json whatever happened
            traceback.print_exc()
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(failed_results(f"{type(error).__name__}: {error}"), indent=2))
            return 1
    else:
        graded = grade((args.repo or GRADER_ROOT).resolve(), chosen, config, progress=progress, **limits)
    print_table(graded, config)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(results_json(graded, config), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

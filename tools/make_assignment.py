"""Write the student release of the assignment: this repository with the solutions taken out.

    python tools/make_assignment.py --out DIR [--autograder autograder.zip]

The parts a student writes are marked in the library modules, otter-grader style: a line
``# BEGIN SOLUTION`` before and ``# END SOLUTION`` after a block, or ``# SOLUTION`` at the end of a
single line. The release is the same tree (the files git tracks, or every file outside a git
checkout) with each marked block replaced by a stub that raises ``NotImplementedError`` naming the
function and the notebook step that explains it (from ``tools/parts.json``); the instructor-only
tests in ``tests/hidden/``, this script, the Gradescope templates and the tests of the release and the
grader are left out, and ``tools/parts.json`` is written with its ``hidden`` lists emptied. It then checks every
text file of the release (any suffix): no marker, no marked block, no line that only a marked block holds, and
no hidden test's name (checked in every file).

``--autograder ZIP`` also writes Gradescope's autograder: a zip with ``setup.sh`` and ``run_autograder`` (from
``tools/gradescope/``) at its top and the release's tree under them, with the hidden tests and the full
``tools/parts.json`` added; every file of the zip goes through the same leak check.

Imports: the standard library only.
"""

import argparse
import ast
import json
import re
import shutil
import stat
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path
from typing import Dict, Iterable, List, NamedTuple, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END, SINGLE = "# BEGIN SOLUTION", "# END SOLUTION", "# SOLUTION"
HIDDEN_TESTS = "tests/hidden/"
# Instructor-only: the hidden tests, this script, the autograder's templates, and the tests of the release and the
# grader themselves.
LEFT_OUT = (
    HIDDEN_TESTS,
    "tools/make_assignment.py",
    "tools/gradescope/",
    "tools/student_readme.md",
    "tools/each_part_alone.py",
    "tests/test_assignment.py",
    "tests/test_grade.py",
    "tests/test_shortcuts.py",  # (these two test the solution's own checks)
    "tests/test_check.py",
)
STUB_MARK = "is yours to write"  # notebook_kit recognises a stub's error by it
LINE_LENGTH = 120  # ruff.toml's: a stub wraps there
SINGLE_LINE = re.compile(r"#\s*SOLUTION\s*$", re.M)
TEMPLATES = Path("tools") / "gradescope"
# What grading imports, from requirements.txt (torch and torchvision from the CPU index, the rest from PyPI).
GRADING_PACKAGES = ("torch", "torchvision", "numpy", "pillow", "matplotlib", "tqdm", "pytest")


def tracked_files(root: Path) -> List[str]:
    """The files of the tree, relative to ``root``: what git tracks, or everything outside a checkout."""
    try:
        listed = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout
        return [name for name in listed.splitlines() if (root / name).is_file()]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", "__pycache__", ".pytest_cache", "runs", "data"}
        return [
            str(path.relative_to(root))
            for path in sorted(root.rglob("*"))
            if path.is_file() and not skip & set(path.relative_to(root).parts)
        ]


def steps_by_function(parts_file: Path) -> Dict[str, str]:
    """``{"module.qualified_name": notebook step}`` from the parts file."""
    parts = json.loads(parts_file.read_text())["parts"]
    return {function: part["step"] for part in parts for function in part["functions"]}


def enclosing_functions(source: str) -> List[Tuple[int, int, str]]:
    """``(first line, last line, qualified name)`` of every function in ``source`` (1-based lines)."""
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = prefix + child.name
                if not isinstance(child, ast.ClassDef):
                    found.append((child.lineno, child.end_lineno, name))
                visit(child, name + ".")

    visit(ast.parse(source), "")
    return found


def stub(indent: str, module: str, line: int, functions, steps: Dict[str, str]) -> str:
    """The line that replaces a marked block at ``line``: a raise naming the innermost enclosing function."""
    inside = [f for f in functions if f[0] <= line <= f[1]]
    name = max(inside, key=lambda f: f[0])[2] if inside else "this part"
    step = steps.get(f"{module}.{name}")
    where = f"; {step} explains it" if step else ""
    message = f"{module}.{name} {STUB_MARK}{where}. Replace this line with your code."
    # The message as adjacent string literals, each line within the project's line length.
    pieces = textwrap.wrap(message, LINE_LENGTH - len(indent) - 6, drop_whitespace=False, break_on_hyphens=False)
    assert "".join(pieces) == message
    literals = "".join(f"{indent}    {json.dumps(piece)}\n" for piece in pieces)
    return f"{indent}raise NotImplementedError(\n{literals}{indent})\n"


def strip_solutions(source: str, module: str, steps: Dict[str, str], keep: Iterable[str] = ()) -> Tuple[str, List[str]]:
    """``source`` with every marked block replaced by a stub; also returns the removed blocks.

    The blocks of the functions named in ``keep`` (``module.qualified_name``) stay, without their markers: a
    release with those parts written, as the tests of the grader's "each part alone" build it."""
    functions = enclosing_functions(source)
    kept = {name.split(".", 1)[1] for name in keep if name.split(".", 1)[0] == module}
    lines = source.splitlines(keepends=True)
    out, removed, block, block_start, indent = [], [], None, 0, ""
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        if block is not None:
            if stripped == END:
                inside = [f for f in functions if f[0] <= block_start <= f[1]]
                if inside and max(inside, key=lambda f: f[0])[2] in kept:
                    out += block
                else:
                    removed.append("".join(block))
                    out.append(stub(indent, module, block_start, functions, steps))
                block = None
            else:
                block.append(line)
        elif stripped == BEGIN:
            indent, block, block_start = line[: len(line) - len(line.lstrip())], [], number
        elif SINGLE_LINE.search(line) and stripped != END:
            inside = [f for f in functions if f[0] <= number <= f[1]]
            if inside and max(inside, key=lambda f: f[0])[2] in kept:
                out.append(SINGLE_LINE.sub("", line).rstrip() + "\n")
            else:
                removed.append(line)
                out.append(stub(line[: len(line) - len(line.lstrip())], module, number, functions, steps))
        else:
            out.append(line)
    if block is not None:
        raise ValueError(f"{module}.py: '{BEGIN}' at line {block_start} has no '{END}'")
    return "".join(out), removed


class LeakCheck(NamedTuple):
    """What no file given out may hold: the removed blocks, the lines only they hold, and hidden tests' names."""

    removed_blocks: List[str]
    solution_only: set
    hidden_names: set


def make_release(out: Path, root: Path = ROOT, autograder: Optional[Path] = None) -> List[str]:
    """Write the release into ``out`` (which must not exist), and with ``autograder`` Gradescope's zip there;
    returns the files whose solutions it removed."""
    config = json.loads((root / "tools" / "parts.json").read_text())
    steps = steps_by_function(root / "tools" / "parts.json")
    stripped_files, removed_blocks, kept_lines = [], [], set()
    for name in tracked_files(root):
        if name.startswith(LEFT_OUT):
            continue
        target = out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        source = (root / name).read_text() if name.endswith(".py") else ""
        if BEGIN in source or SINGLE_LINE.search(source):
            text, removed = strip_solutions(source, Path(name).stem, steps)
            target.write_text(text)
            stripped_files.append(name)
            removed_blocks += removed
            kept_lines |= unmarked_lines(source)
        else:
            shutil.copy2(root / name, target)
            kept_lines |= {line.strip() for line in source.splitlines()}
    # The students' parts.json: the same parts, without the names of the hidden tests.
    public = {**config, "parts": [{**part, "hidden": []} for part in config["parts"]]}
    (out / "tools").mkdir(parents=True, exist_ok=True)
    (out / "tools" / "parts.json").write_text(json.dumps(public, indent=2) + "\n")
    (out / "README.md").write_text(student_readme(root, config))
    solution_only = {line.strip() for block in removed_blocks for line in block.splitlines() if line.strip()}
    check = LeakCheck(removed_blocks, solution_only - kept_lines, hidden_test_names(root, config))
    check_release(out, check)
    if autograder is not None:
        make_autograder_zip(out, Path(autograder), check, root)
    return stripped_files


def student_readme(root: Path, config: dict) -> str:
    """The release's README: ``tools/student_readme.md`` with the table of the parts to write, in order."""
    rows = ["| | part | what you write | where it is explained | points |", "|---|---|---|---|---|"]
    graded = [part for part in config["parts"] if part["points"] > 0]
    for number, part in enumerate(graded, start=1):
        functions = ", ".join(f"`{function}`" for function in part["functions"])
        rows.append(f"| {number} | `{part['name']}` | {functions} | {part['step']} | {part['points']} |")
    total = sum(part["points"] for part in graded)
    rows.append(f"| | | | total | {total} |")
    template = (root / "tools" / "student_readme.md").read_text()
    return template.replace("{parts_table}", "\n".join(rows))


def unmarked_lines(source: str) -> set:
    """The stripped lines of the solution's ``source`` outside every marked block."""
    lines, inside = set(), False
    for line in source.splitlines():
        stripped = line.strip()
        if stripped in (BEGIN, END):
            inside = stripped == BEGIN
        elif not inside and not SINGLE_LINE.search(line):
            lines.add(stripped)
    return lines


def hidden_test_names(root: Path, config: dict) -> set:
    """The hidden tests' names: parts.json's hidden node ids and their pieces, the hidden test files' names,
    and every test function or class that those files define."""
    names = set()
    for part in config["parts"]:
        for node in part.get("hidden", []):
            path, *pieces = node.split("::")
            names |= {node, Path(path).name, *(piece.split("[")[0] for piece in pieces)}
    for name in tracked_files(root):
        if name.startswith(HIDDEN_TESTS) and name.endswith(".py"):
            names.add(Path(name).name)
            for node in ast.walk(ast.parse((root / name).read_text())):
                is_test = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                if is_test and node.name.lower().startswith("test"):
                    names.add(node.name)
    names.discard("__init__.py")
    return names


def as_text(data: bytes) -> Optional[str]:
    """``data`` as text, or None for a binary file (a NUL byte, or not UTF-8)."""
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def leak(name: str, data: bytes, check: LeakCheck, hidden: bool = True) -> Optional[str]:
    """What ``data`` (the file ``name``) gives away, or None: a solution marker, a removed block, a line only a
    removed block holds (in a notebook, also in its cells' sources) and, with ``hidden``, a hidden test's name."""
    if hidden:
        named = sorted(test for test in check.hidden_names if test.encode() in data)
        if named:
            return f"{name} names the hidden test {named[0]}"
    text = as_text(data)
    if text is None:
        return None
    lines = text.splitlines()
    if name.endswith(".ipynb"):
        try:
            cells = json.loads(text).get("cells", [])
            lines += [line for cell in cells for line in "".join(cell.get("source", [])).splitlines()]
        except (ValueError, AttributeError, TypeError):
            pass
    markers = [line for line in lines if line.strip() in (BEGIN, END) or SINGLE_LINE.search(line)]
    if markers or (name.endswith(".py") and (BEGIN in text or END in text)):
        return f"{name} still holds a solution marker: {(markers or [BEGIN])[0].strip()!r}"
    left = [line for line in lines if line.strip() in check.solution_only]
    if left or any(block.strip() and block in text for block in check.removed_blocks):
        return f"{name} still holds solution lines, e.g. {left[:1]}"
    return None


def check_files(files: Iterable[Tuple[str, bytes]], check: LeakCheck, hidden: bool = True) -> None:
    """Raise if any ``(name, content)`` gives something away (see ``leak``)."""
    for name, data in files:
        found = leak(name, data, check, hidden)
        if found:
            raise RuntimeError(found)


def check_release(out: Path, check: LeakCheck) -> None:
    """No file of the release may hold a marker, a removed block or a line that only a removed block holds (a line
    such as ``return boxes`` that the solution also writes outside the markers is not a leak), nor name a hidden
    test."""
    files = sorted(path for path in out.rglob("*") if path.is_file())
    check_files(((str(path.relative_to(out)), path.read_bytes()) for path in files), check)


def grading_requirements(root: Path) -> Tuple[List[str], List[str]]:
    """``(torch and torchvision, the rest)``: requirements.txt's lines for GRADING_PACKAGES, version ranges kept."""
    found = {}
    for line in (root / "requirements.txt").read_text().splitlines():
        requirement = line.split("#")[0].strip()
        name = re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower()
        if name in GRADING_PACKAGES:
            found[name] = requirement
    specs = [found.get(name, name) for name in GRADING_PACKAGES]
    return specs[:2], specs[2:]


def setup_script(root: Path) -> str:
    """Gradescope's setup.sh: the template with the requirements filled in."""
    torch, rest = grading_requirements(root)
    template = (root / TEMPLATES / "setup.sh").read_text()
    quoted = {"@TORCH@": " ".join(f'"{spec}"' for spec in torch), "@PACKAGES@": " ".join(f'"{spec}"' for spec in rest)}
    for name, value in quoted.items():
        template = template.replace(name, value)
    return template


def make_autograder_zip(release: Path, zip_path: Path, check: LeakCheck, root: Path = ROOT) -> List[str]:
    """Write Gradescope's autograder zip from the release in ``release``; returns the names in the zip.

    At its top ``setup.sh`` and ``run_autograder``; under them the release's tree with the hidden tests and the
    full ``tools/parts.json`` (hidden tests named) added. No file may give the solution away."""
    files: Dict[str, Tuple[bytes, int]] = {}
    for path in sorted(release.rglob("*")):
        if path.is_file():
            files[str(path.relative_to(release))] = (path.read_bytes(), 0o644)
    for name in tracked_files(root):
        if name.startswith(HIDDEN_TESTS):
            files[name] = ((root / name).read_bytes(), 0o644)
    files["tools/parts.json"] = ((root / "tools" / "parts.json").read_bytes(), 0o644)
    files["setup.sh"] = (setup_script(root).encode(), 0o755)
    files["run_autograder"] = ((root / TEMPLATES / "run_autograder").read_bytes(), 0o755)
    check_files(((name, data) for name, (data, _) in files.items()), check, hidden=False)
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, (data, mode) in sorted(files.items()):
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))  # the same files give the same zip
            info.external_attr = (stat.S_IFREG | mode) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)
    with zipfile.ZipFile(zip_path) as archive:  # read back: what Gradescope gets is what was checked
        check_files(((info.filename, archive.read(info)) for info in archive.infolist()), check, hidden=False)
        return archive.namelist()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write the release into (must not exist yet)")
    parser.add_argument("--autograder", help="also write Gradescope's autograder zip to this file (replaced if there)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        parser.error(f"--out {out} exists already; pass a new folder (or delete that one).")
    autograder = Path(args.autograder) if args.autograder else None
    if autograder is not None and autograder.resolve().is_relative_to(out.resolve()):
        parser.error("--autograder must not be inside --out (the zip would end up in the students' release)")
    stripped = make_release(out, autograder=autograder)
    print(f"Wrote the student release to {out}: solutions taken out of {', '.join(stripped)}.")
    if autograder is not None:
        size = autograder.stat().st_size / 1024
        print(f"Wrote Gradescope's autograder to {autograder} ({size:.0f} KiB): upload it as the assignment's zip.")


if __name__ == "__main__":
    sys.exit(main())

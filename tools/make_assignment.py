"""Write the student release of the assignment: this repository with the solutions taken out.

    python tools/make_assignment.py --out DIR

The parts a student writes are marked in the library modules, otter-grader style: a line
``# BEGIN SOLUTION`` before and ``# END SOLUTION`` after a block, or ``# SOLUTION`` at the end of a
single line. The release is the same tree (the files git tracks, or every file outside a git
checkout) with each marked block replaced by a stub that raises ``NotImplementedError`` naming the
function and the notebook step that explains it (from ``tools/parts.json``); the instructor-only
tests in ``tests/hidden/``, this script and the tests of the release and the grader are left out.
It then checks that no marker and no marked block is left in any file of the release.

Imports: the standard library only.
"""

import argparse
import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END, SINGLE = "# BEGIN SOLUTION", "# END SOLUTION", "# SOLUTION"
# Instructor-only: the hidden tests, this script, and the tests of the release and the grader themselves.
LEFT_OUT = ("tests/hidden/", "tools/make_assignment.py", "tests/test_assignment.py", "tests/test_grade.py")
STUB_MARK = "is yours to write"  # notebook_kit recognises a stub's error by it


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
    return f"{indent}raise NotImplementedError({message!r})\n"


def strip_solutions(source: str, module: str, steps: Dict[str, str]) -> Tuple[str, List[str]]:
    """``source`` with every marked block replaced by a stub; also returns the removed blocks."""
    functions = enclosing_functions(source)
    lines = source.splitlines(keepends=True)
    out, removed, block, block_start, indent = [], [], None, 0, ""
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        if block is not None:
            if stripped == END:
                removed.append("".join(block))
                out.append(stub(indent, module, block_start, functions, steps))
                block = None
            else:
                block.append(line)
        elif stripped == BEGIN:
            indent, block, block_start = line[: len(line) - len(line.lstrip())], [], number
        elif re.search(r"#\s*SOLUTION\s*$", line) and stripped != END:
            removed.append(line)
            out.append(stub(line[: len(line) - len(line.lstrip())], module, number, functions, steps))
        else:
            out.append(line)
    if block is not None:
        raise ValueError(f"{module}.py: '{BEGIN}' at line {block_start} has no '{END}'")
    return "".join(out), removed


def make_release(out: Path, root: Path = ROOT) -> List[str]:
    """Write the release into ``out`` (which must not exist); returns the files whose solutions it removed."""
    steps = steps_by_function(root / "tools" / "parts.json")
    stripped_files, removed_blocks, kept_lines = [], [], set()
    for name in tracked_files(root):
        if name.startswith(LEFT_OUT):
            continue
        target = out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        source = (root / name).read_text() if name.endswith(".py") else ""
        if BEGIN in source or re.search(r"#\s*SOLUTION\s*$", source, re.M):
            text, removed = strip_solutions(source, Path(name).stem, steps)
            target.write_text(text)
            stripped_files.append(name)
            removed_blocks += removed
            kept_lines |= unmarked_lines(source)
        else:
            shutil.copy2(root / name, target)
            kept_lines |= {line.strip() for line in source.splitlines()}
    check_release(out, removed_blocks, kept_lines)
    return stripped_files


def unmarked_lines(source: str) -> set:
    """The stripped lines of the solution's ``source`` outside every marked block."""
    lines, inside = set(), False
    for line in source.splitlines():
        stripped = line.strip()
        if stripped in (BEGIN, END):
            inside = stripped == BEGIN
        elif not inside and not re.search(r"#\s*SOLUTION\s*$", line):
            lines.add(stripped)
    return lines


def check_release(out: Path, removed_blocks: List[str], kept_lines: set) -> None:
    """No marker, no removed block, and no line that only a removed block holds may be left in the release
    (a line such as ``return boxes`` that the solution also writes outside the markers is not a leak)."""
    solution_only = {
        line.strip() for block in removed_blocks for line in block.splitlines() if line.strip()
    } - kept_lines
    for path in out.rglob("*.py"):
        text = path.read_text()
        if BEGIN in text or END in text:
            raise RuntimeError(f"{path} still holds a solution marker")
        left = [line for line in text.splitlines() if line.strip() in solution_only]
        if left or any(block.strip() and block in text for block in removed_blocks):
            raise RuntimeError(f"{path} still holds solution lines, e.g. {left[:1]}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write the release into (must not exist yet)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        parser.error(f"--out {out} exists already; pass a new folder (or delete that one).")
    stripped = make_release(out)
    print(f"Wrote the student release to {out}: solutions taken out of {', '.join(stripped)}.")


if __name__ == "__main__":
    sys.exit(main())

"""Write one submission per part, each with only that part written, to check that parts are graded alone.

    python tools/each_part_alone.py --out DIR
    python tools/grade.py --submissions DIR --out each_part_alone.csv

Each subfolder of DIR is named after a part and holds the three files students upload (common.py,
one_stage_detector.py, two_stage_detector.py) with that part's solution in place and every other part a stub,
as ``tools/make_assignment.py`` writes them. Graded as a folder of submissions, the gradebook's row for a part
should give that part its points and every other part 0. Instructor-only (left out of the student release).
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_assignment  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MARKED_FILES = ("common.py", "one_stage_detector.py", "two_stage_detector.py")


def write_submission(out: Path, written, root: Path = ROOT) -> None:
    """The three files with the functions in ``written`` (``module.qualified_name``) left as the solution has them."""
    steps = make_assignment.steps_by_function(root / "tools" / "parts.json")
    out.mkdir(parents=True)
    for name in MARKED_FILES:
        source = (root / name).read_text()
        (out / name).write_text(make_assignment.strip_solutions(source, Path(name).stem, steps, keep=written)[0])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the submissions (must not exist yet)")
    args = parser.parse_args(argv)
    if args.out.exists():
        parser.error(f"{args.out} already exists: name a new folder with --out")
    parts = json.loads((ROOT / "tools" / "parts.json").read_text())["parts"]
    for part in parts:
        if part["points"] > 0:
            write_submission(args.out / part["name"], part["functions"])
    print(f"Wrote {sum(part['points'] > 0 for part in parts)} submissions to {args.out}; grade them with:")
    print(f"    python tools/grade.py --submissions {args.out} --out each_part_alone.csv")


if __name__ == "__main__":
    main()

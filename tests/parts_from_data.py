"""Each part graded on its own: while one part's tests run, every other part's functions answer from data.

A part's tests exercise its own functions, but some of them need other parts to run at all: ``nms`` asks
``iou``, ``FCOS.predict`` runs the head and decodes with ``fcos_apply_deltas_to_locations``, ``RPN.forward``
needs nearly everything. Graded with the student's own versions of those, a correct part would lose its
points to a stub elsewhere. So while the grader runs part P (it sets ``A4_GRADED_PART=P``), each function of
the other parts is replaced by a *replay*: it answers with what the solution returned for the same inputs in
the same test, read from a recording (``tests/frozen/``, ``tests/hidden/frozen/`` for the hidden tests). No
solution code is shipped, only those answers: tensors for the inputs these tests use.

A replay accepts the inputs it was recorded with, compared with a small float tolerance. The pure row-wise
functions (the box deltas, centerness) also answer any rows that were recorded, in any batch or order, so a
part may call them one image or one box at a time where the solution called them once. IoU is not recorded:
torchvision's ``box_iou`` answers for it, on any boxes (recording checks that it agrees with the solution).
Inputs the solution never passed give an error that says so: the graded code passed that function something
else. A replay also leaves the random number generator as the solution left it (the samplers draw from it), so
what the test draws next is the same; a replayed module ``__init__`` builds no layers.

Recording runs the solution's graded tests with ``A4_RECORD_DIR=DIR`` set (each test's calls to the other
parts, outermost only, go to ``DIR/<test>.pt``). To refresh the recordings after changing a graded test or the
solution::

    python tests/parts_from_data.py            # writes tests/frozen/ and tests/hidden/frozen/

Without either variable nothing is replaced, and the tests run the whole solution, as usual.
"""

import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PARTS_FILE = ROOT / "tools" / "parts.json"
GRADED_VARIABLE, RECORD_VARIABLE = "A4_GRADED_PART", "A4_RECORD_DIR"
PUBLIC_FROZEN, HIDDEN_FROZEN = ROOT / "tests" / "frozen", ROOT / "tests" / "hidden" / "frozen"
# Tolerances. A whole call is recognised by inputs within CALL_TOLERANCE of the maximum magnitude (features out of a
# random network differ by ~1e-3 between thread counts and CPUs); rows, which come out of exact arithmetic, within
# ROW_ATOL + ROW_RTOL * |value|.
CALL_TOLERANCE = 1e-3
ROW_ATOL, ROW_RTOL = 1e-4, 1e-5
# Pure functions whose output rows follow their input rows: (..., D) inputs -> (..., E) or (...) outputs.
ROW_WISE = {
    "one_stage_detector.fcos_get_deltas_from_locations",
    "one_stage_detector.fcos_apply_deltas_to_locations",
    "one_stage_detector.fcos_make_centerness_targets",
    "two_stage_detector.rcnn_get_deltas_from_anchors",
    "two_stage_detector.rcnn_apply_deltas_to_anchors",
}


def _library_iou(boxes1, boxes2):
    """IoU from torchvision's ``box_iou``, with the course's 0 (not NaN) where both boxes are empty."""
    import torchvision

    return torchvision.ops.box_iou(boxes1, boxes2).nan_to_num(0.0)


# Functions a library computes exactly as the solution does: answered by the library, not recorded (an IoU matrix
# of NMS's thousand boxes would weigh megabytes). Recording checks that the answers agree.
LIBRARY = {"common.iou": _library_iou}


def load_parts():
    with open(PARTS_FILE, encoding="utf-8") as f:
        return json.load(f)["parts"]


def part_of(nodeid: str, parts) -> dict:
    """The graded part whose tests (public or hidden) include this test, parameters aside; or None."""
    base = nodeid.split("[", 1)[0]
    for part in parts:
        if part["points"] > 0 and base in part["tests"] + part.get("hidden", []):
            return part
    return None


def recording_path(nodeid: str, folder=None) -> Path:
    """Where a test's recording lives: one file per test (and parameters)."""
    hidden = nodeid.startswith("tests/hidden/")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid.split("/")[-1].replace(".py::", "__")).strip("_")
    folder = Path(folder) if folder is not None else (HIDDEN_FROZEN if hidden else PUBLIC_FROZEN)
    return folder / f"{name}.pt"


# ---------------------------------------------------------------------------------------------- where functions are


def _owner_and_attribute(dotted: str):
    """``(class or module, attribute)`` of ``module.function`` or ``module.Class.method``."""
    module_name, *path = dotted.split(".")
    owner = sys.modules.get(module_name) or __import__(module_name)
    for name in path[:-1]:
        owner = getattr(owner, name)
    return owner, path[-1]


@functools.cache
def _is_project_file(filename: str) -> bool:
    folder = Path(filename).resolve().parent
    return folder == ROOT or folder == ROOT / "tests" or folder == ROOT / "tests" / "hidden"


def _project_modules():
    """The loaded modules of this repository's top-level files (common, one_stage_detector, a4_helper...) and of
    its tests (which import the functions by name too)."""
    return [
        module
        for module in list(sys.modules.values())
        if getattr(module, "__file__", None) and _is_project_file(module.__file__)
    ]


def _bindings(dotted: str):
    """Every ``(namespace, attribute)`` holding the function: its own, and the project modules importing it."""
    owner, attribute = _owner_and_attribute(dotted)
    genuine = vars(owner)[attribute]
    places = [(owner, attribute)]
    if isinstance(owner, type):
        return genuine, places
    for module in _project_modules():
        if module is not owner:
            places += [(module, name) for name, value in list(vars(module).items()) if value is genuine]
    return genuine, places


def _clear_caches():
    """Caches that would let one test skip a call another test made (the recording is per test)."""
    common = sys.modules.get("common")
    if common is not None and hasattr(common, "_cached_locations"):
        common._cached_locations.cache_clear()


# ---------------------------------------------------------------------------------------------- values


def _detached(value):
    """``value`` with every tensor detached and copied to the CPU (what is recorded)."""
    if isinstance(value, torch.Tensor):
        return {"tensor": value.detach().cpu().clone(), "requires_grad": value.requires_grad}
    if isinstance(value, dict):
        return {"dict": [(key, _detached(item)) for key, item in value.items()]}
    if isinstance(value, (list, tuple)):
        return {type(value).__name__: [_detached(item) for item in value]}
    if isinstance(value, torch.nn.Module):
        return {"module": type(value).__name__}
    return {"value": value}


def _restored(record, device):
    """The recorded value back as tensors on ``device`` (fresh leaves; ``requires_grad`` as recorded)."""
    if "tensor" in record:
        tensor = record["tensor"].to(device).clone()
        return tensor.requires_grad_() if record["requires_grad"] else tensor
    if "dict" in record:
        return {key: _restored(item, device) for key, item in record["dict"]}
    if "list" in record:
        return [_restored(item, device) for item in record["list"]]
    if "tuple" in record:
        return tuple(_restored(item, device) for item in record["tuple"])
    return record.get("value")


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    if a.is_floating_point() or b.is_floating_point():
        a, b = a.double(), b.double()
        finite = a.isfinite() & b.isfinite()
        if not torch.equal(finite, a.isfinite()) or not torch.equal(a[~finite].nan_to_num(), b[~finite].nan_to_num()):
            return False
        scale = 1.0 + (b[finite].abs().max().item() if finite.any() else 0.0)
        return bool(((a - b)[finite].abs() <= CALL_TOLERANCE * scale).all())
    return bool(torch.equal(a, b))


def _same(recorded, value) -> bool:
    """Whether a call's argument equals a recorded one (tensors within the tolerance)."""
    if "tensor" in recorded:
        return isinstance(value, torch.Tensor) and _close(recorded["tensor"], value.detach().cpu())
    if "dict" in recorded:
        return (
            isinstance(value, dict)
            and [key for key, _ in recorded["dict"]] == list(value)
            and all(_same(item, value[key]) for key, item in recorded["dict"])
        )
    for kind in ("list", "tuple"):
        if kind in recorded:
            items = recorded[kind]
            return isinstance(value, (list, tuple)) and len(items) == len(value) and all(map(_same, items, value))
    if "module" in recorded:
        return isinstance(value, torch.nn.Module)
    expected = recorded["value"]
    if isinstance(expected, float) and isinstance(value, (int, float)):
        return abs(expected - value) <= CALL_TOLERANCE * (1.0 + abs(expected))
    return type(expected) is type(value) and expected == value


def _device_of(args, kwargs):
    for value in [*args, *kwargs.values()]:
        if isinstance(value, torch.Tensor):
            return value.device
        if isinstance(value, dict):
            found = _device_of(list(value.values()), {})
            if found is not None:
                return found
    return torch.device("cpu")


def _summary(record) -> str:
    """A recorded value in a few words: a tensor's shape and first values, a dict's keys and items."""
    if "tensor" in record:
        tensor = record["tensor"]
        return f"tensor{tuple(tensor.shape)} starting {tensor.flatten()[:4].tolist()}"
    if "dict" in record:
        return "{" + ", ".join(f"{key}: {_summary(item)}" for key, item in record["dict"]) + "}"
    for kind in ("list", "tuple"):
        if kind in record:
            return "[" + ", ".join(_summary(item) for item in record[kind]) + "]"
    return repr(record.get("value", record.get("module")))


def _describe(args, kwargs) -> str:
    def one(value):
        if isinstance(value, torch.Tensor):
            return f"tensor{tuple(value.shape)}"
        if isinstance(value, dict):
            return "{" + ", ".join(f"{key}: {one(item)}" for key, item in value.items()) + "}"
        if isinstance(value, (list, tuple)):
            return "[" + ", ".join(one(item) for item in value) + "]"
        return repr(value)

    return ", ".join([one(value) for value in args] + [f"{key}={one(value)}" for key, value in kwargs.items()])


# ---------------------------------------------------------------------------------------------- replay


class Replay:
    """The recorded calls of one test, answering for the functions of the parts not graded."""

    def __init__(self, calls):
        self.calls = calls
        self.used = set()

    def answer(self, name, args, kwargs):
        device = _device_of(args, kwargs)
        for index, call in enumerate(self.calls):
            if call["function"] == name and index not in self.used and self._matches(call, args, kwargs):
                return self._give(index, call, device)
        for index, call in enumerate(self.calls):  # asked again for the same inputs (a cache, a second look)
            if call["function"] == name and self._matches(call, args, kwargs):
                return self._give(index, call, device)
        if name in ROW_WISE:
            found = self._rows(name, args, kwargs)
            if found is not None:
                return found.to(device)
        nearest = self._nearest_difference(name, args, kwargs)
        raise AssertionError(
            f"{name} is not part of the part being graded, so the test gives it the solution's answers, recorded for "
            f"the inputs the solution passes it; this call's inputs ({_describe(args, kwargs)}) are not among them"
            f"{nearest}. Check what your code passes to {name.split('.')[-1]}."
        )

    def _nearest_difference(self, name, args, kwargs) -> str:
        """How this call differs from the solution's first call of ``name``: the first argument that differs."""
        call = next((call for call in self.calls if call["function"] == name), None)
        if call is None:
            return " (the solution never calls it in this test)"
        pairs = [(f"argument {i + 1}", rec, value) for i, (rec, value) in enumerate(zip(call["args"], args))]
        pairs += [(key, rec, kwargs[key]) for key, rec in call["kwargs"] if key in kwargs]
        for label, rec, value in pairs:
            if not _same(rec, value):
                return f"; the solution's {label} was {_summary(rec)}, this one is {_summary(_detached(value))}"
        return ""

    @staticmethod
    def _matches(call, args, kwargs):
        return (
            len(call["args"]) == len(args)
            and sorted(key for key, _ in call["kwargs"]) == sorted(kwargs)
            and all(map(_same, call["args"], args))
            and all(_same(item, kwargs[key]) for key, item in call["kwargs"])
        )

    def _give(self, index, call, device):
        self.used.add(index)
        if call["rng"] is not None:
            torch.set_rng_state(call["rng"])
        return _restored(call["output"], device)

    def _row_calls(self, name, args, kwargs):
        """The recorded calls of ``name`` whose non-tensor arguments equal this call's."""
        for call in self.calls:
            if call["function"] != name or len(call["args"]) != len(args):
                continue
            if sorted(key for key, _ in call["kwargs"]) != sorted(kwargs):
                continue
            pairs = list(zip(call["args"], args)) + [(item, kwargs[key]) for key, item in call["kwargs"]]
            if all(("tensor" in rec) == isinstance(value, torch.Tensor) for rec, value in pairs) and all(
                _same(rec, value) for rec, value in pairs if "tensor" not in rec
            ):
                yield call, [rec["tensor"] for rec, _ in pairs if "tensor" in rec]

    def _rows(self, name, args, kwargs):
        """A row-wise function answered row by row from every recorded call: inputs (..., D), output (..., E)."""
        tensors = [value for value in [*args, *kwargs.values()] if isinstance(value, torch.Tensor)]
        if not tensors or any(t.dim() == 0 for t in tensors):
            return None
        lead = tensors[0].shape[:-1]
        if any(t.shape[:-1] != lead for t in tensors):
            return None
        query = torch.cat([t.detach().cpu().double().reshape(lead.numel(), -1) for t in tensors], dim=1)
        keys, values, trailing = [], [], None
        for call, recorded in self._row_calls(name, args, kwargs):
            rec_lead = recorded[0].shape[:-1]
            output = call["output"]["tensor"]
            keys.append(torch.cat([t.double().reshape(rec_lead.numel(), -1) for t in recorded], dim=1))
            values.append(output.reshape(rec_lead.numel(), -1))
            trailing = output.shape[len(rec_lead) :]
        if not keys or keys[0].shape[1] != query.shape[1]:
            return None
        found = _lookup(query, torch.cat(keys))
        return None if found is None else torch.cat(values)[found].reshape(*lead, *trailing)


def _lookup(query: torch.Tensor, keys: torch.Tensor):
    """For each query row, the index of a key row equal within the tolerance; None if a row has none."""
    index = torch.full((len(query),), -1, dtype=torch.long)
    if len(keys):
        for start in range(0, len(query), 256):
            chunk = query[start : start + 256]
            diff = (chunk[:, None, :] - keys[None, :, :]).abs()
            both_nan = chunk[:, None, :].isnan() & keys[None, :, :].isnan()
            close = ((diff <= ROW_ATOL + ROW_RTOL * keys.abs()[None]) | both_nan).all(dim=-1)
            hit = close.any(dim=1)
            index[start : start + 256] = torch.where(hit, close.float().argmax(dim=1), -1)
    return None if bool((index < 0).any()) else index


# ---------------------------------------------------------------------------------------------- the fixture


def _stand_in(name, genuine, mode, state):
    """What takes a function's place: a recorder (mode "record") or a replay (mode "replay")."""
    is_method = "." in name.split(".", 1)[1]
    is_init = name.endswith(".__init__")
    owner = _owner_and_attribute(name)[0]

    @functools.wraps(genuine)
    def stand_in(*args, **kwargs):
        __tracebackhide__ = True
        own = args[1:] if is_method else args
        if name in LIBRARY:
            output = LIBRARY[name](*own, **kwargs)
            if mode == "record":
                genuine_output = genuine(*args, **kwargs)
                assert _close(genuine_output.detach(), output.detach()), f"{name}: the library disagrees with it"
            return output
        if mode == "replay":
            if is_init:
                super(owner, args[0]).__init__()  # an empty module: no layers, nothing drawn
            return state.answer(name, own, kwargs)
        if state["depth"]:
            return genuine(*args, **kwargs)
        state["depth"] += 1
        try:
            output = genuine(*args, **kwargs)
        finally:
            state["depth"] -= 1
        state["calls"].append(
            {
                "function": name,
                "args": [_detached(value) for value in own],
                "kwargs": [(key, _detached(value)) for key, value in kwargs.items()],
                "output": _detached(output),
                "rng": torch.get_rng_state(),
            }
        )
        return output

    return stand_in


@pytest.fixture(autouse=True)
def parts_from_data(request, monkeypatch):
    """Replays (with A4_GRADED_PART) or records (with A4_RECORD_DIR) the other parts' functions for this test."""
    graded, record_dir = os.environ.get(GRADED_VARIABLE), os.environ.get(RECORD_VARIABLE)
    parts = load_parts() if (graded or record_dir) else []
    part = part_of(request.node.nodeid, parts) if parts else None
    if part is None or (graded and graded != part["name"]):
        yield
        return
    others = [f for other in parts if other["name"] != part["name"] for f in other["functions"]]
    path = recording_path(request.node.nodeid, record_dir)
    if graded:
        if path.exists():
            state = Replay(torch.load(path, weights_only=False))
        else:
            state = Replay([])  # this test calls no other part
        mode = "replay"
    else:
        state, mode = {"depth": 0, "calls": []}, "record"
    _clear_caches()
    for name in others:
        genuine, places = _bindings(name)
        stand_in = _stand_in(name, genuine, mode, state)
        for namespace, attribute in places:
            monkeypatch.setattr(namespace, attribute, stand_in)
    yield
    if mode == "record":
        if state["calls"]:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(state["calls"], path)
        elif path.exists():
            path.unlink()


# ---------------------------------------------------------------------------------------------- refreeze


def graded_nodes(parts, hidden: bool = True):
    return [node for part in parts if part["points"] > 0 for node in part["tests"] + (part.get("hidden", []) if
            hidden else [])]  # fmt: skip


def record(folder_public: Path, folder_hidden: Path, hidden: bool = True) -> subprocess.CompletedProcess:
    """Run the solution's graded tests, recording each one's calls to the other parts."""
    parts = load_parts()
    results = None
    for folder, nodes in (
        (folder_public, [n for n in graded_nodes(parts, hidden) if not n.startswith("tests/hidden/")]),
        (folder_hidden, [n for n in graded_nodes(parts, hidden) if n.startswith("tests/hidden/")]),
    ):
        if not nodes:
            continue
        for old in Path(folder).glob("*.pt"):
            old.unlink()
        env = {**os.environ, RECORD_VARIABLE: str(folder), "OMP_NUM_THREADS": "1"}  # as the grader runs them
        env.pop(GRADED_VARIABLE, None)
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", *nodes]
        results = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        if results.returncode != 0:
            raise SystemExit(f"the solution fails its own graded tests; nothing recorded:\n{results.stdout[-3000:]}")
    return results


if __name__ == "__main__":
    record(PUBLIC_FROZEN, HIDDEN_FROZEN)
    count = len(list(PUBLIC_FROZEN.glob("*.pt"))) + len(list(HIDDEN_FROZEN.glob("*.pt")))
    print(f"recorded {count} tests' calls to the other parts into {PUBLIC_FROZEN} and {HIDDEN_FROZEN}")

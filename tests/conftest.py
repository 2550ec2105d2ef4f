"""Shared fixtures and helpers. Every test runs on the CPU, offline and seeded.

The helpers below are used by more than one test file; import them with ``from conftest import ...``
(pytest puts this folder on ``sys.path`` before it imports the test files).

Forbidden operators. The grader runs each part's tests with ``A4_FORBIDDEN`` set to that part's
list from ``tools/parts.json`` (comma-separated dotted names such as
``torchvision.ops.nms,torchvision.ops.batched_nms``), so that a part the course asks to write from
scratch cannot be answered by calling the library's own version. With it set, every test runs with
each named operator replaced, wherever it can be reached from Python, by a stand-in that raises
``RuntimeError("<name> is not allowed in this part: ...")`` when the project's own modules call it:

- every binding of the same object in a loaded ``torchvision`` module (``torchvision.ops.nms`` and
  ``torchvision.ops.boxes.nms``; ``torchvision.ops.roi_align`` and ``torchvision.ops.roi_align.roi_align``,
  ``torchvision.ops.poolers.roi_align``; ``torchvision.ops.focal_loss.sigmoid_focal_loss``, ...);
- the compiled kernel's Python entry, ``torch.ops.torchvision.<name>`` (nms, roi_align, ...), which
  the ``torchvision.ops`` functions call, so that ``batched_nms``, ``RoIAlign``, ``MultiScaleRoIAlign``
  and ``torch.ops.torchvision.nms.default`` are caught too when ``nms`` / ``roi_align`` is forbidden.
  C++ callers of the kernel (none in this project) do not go through it;
- names the project's top-level modules bound with ``from torchvision.ops import ...``.

A call is refused only when the nearest project frame on the stack (skipping torch's and
torchvision's own frames) is in one of the project's top-level modules; a call from the tests
(``tests/``) goes through, as the tests compare with the genuine operator. The patches are pytest
``monkeypatch`` ones, undone after each test. An unknown name stops the session before any test runs.
"""

import ast
import importlib
import os
import shutil
import sys
import types
from xml.etree import ElementTree

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from parts_from_data import parts_from_data  # noqa: E402,F401  (an autouse fixture: each part graded alone)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


FORBIDDEN_VARIABLE = "A4_FORBIDDEN"
_ROOT_REAL = os.path.realpath(ROOT)
_TESTS_REAL = os.path.join(_ROOT_REAL, "tests") + os.sep
_forbidden = {}  # {dotted name: the genuine object}, filled at session start from A4_FORBIDDEN
_frame_kinds = {}  # {code file name: "tests" | "project" | None}, a cache for _calling_side


def _resolve(name: str):
    """The object a dotted name such as ``torchvision.ops.nms`` names: attributes from the first
    module on, importing submodules only where an attribute is missing."""
    parts = name.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], start=2):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            obj = importlib.import_module(".".join(parts[:i]))
    return obj


def forbidden_names_from_environment():
    """``{dotted name: object}`` of the names in A4_FORBIDDEN; ``pytest.UsageError`` names a bad one."""
    found = {}
    names = [name.strip() for name in os.environ.get(FORBIDDEN_VARIABLE, "").split(",") if name.strip()]
    if names:
        importlib.import_module("torchvision")  # registers torch.ops.torchvision.*, which names may point at
    for name in names:
        try:
            obj = _resolve(name)
        except (ImportError, AttributeError, ValueError):
            obj = None
        if obj is None or isinstance(obj, types.ModuleType) or not callable(obj):
            raise pytest.UsageError(
                f"{FORBIDDEN_VARIABLE} names {name!r}, which is not an operator that can be imported "
                "(expected comma-separated dotted names such as torchvision.ops.nms,torchvision.ops.box_iou)."
            )
        found[name] = obj
    return found


def pytest_addoption(parser):
    parser.addoption(
        "--complete",
        action="store_true",
        help="also run the tests marked complete: both notebooks top to bottom and the grading of whole releases",
    )


def pytest_collection_modifyitems(config, items):
    """Without --complete, leave out the tests marked ``complete`` (reported as deselected). With it, the ones
    marked ``complete(start_first=True)`` (the notebook runs, minutes each) go first: pytest-xdist then
    starts them on different workers at once, and the rest runs beside them instead of after them."""
    if config.getoption("--complete"):
        items.sort(key=lambda item: not _starts_first(item))  # stable: the rest keep their order
        return
    left_out = [item for item in items if item.get_closest_marker("complete")]
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = [item for item in items if not item.get_closest_marker("complete")]


def _starts_first(item) -> bool:
    mark = item.get_closest_marker("complete")
    return mark is not None and mark.kwargs.get("start_first", False)


def pytest_configure(config):
    _forbidden.clear()
    _forbidden.update(forbidden_names_from_environment())
    if os.environ.get("PYTEST_XDIST_WORKER"):  # one of pytest-xdist's workers (-n), as many as there are cores:
        torch.set_num_threads(1)  # one core each, for torch here and for the processes its tests start
        os.environ["OMP_NUM_THREADS"] = "1"


def _frame_kind(filename: str):
    kind = _frame_kinds.get(filename)
    if kind is None and filename not in _frame_kinds:
        path = os.path.realpath(filename)
        if filename.startswith("<"):  # generated code (<string>, <frozen ...>): its caller decides
            kind = None
        elif path.startswith(_TESTS_REAL):
            kind = "tests"
        elif os.path.dirname(path) == _ROOT_REAL:
            kind = "project"
        _frame_kinds[filename] = kind
    return kind


def _calling_side(frame) -> str:
    """``"project"`` when the nearest frame from this repository is in a top-level module, else ``"tests"``."""
    while frame is not None:
        kind = _frame_kind(frame.f_code.co_filename)
        if kind is not None:
            return kind
        frame = frame.f_back
    return "tests"


class _ForbiddenOperator:
    """Stands in for a forbidden operator: the project's modules get an error, the tests the genuine one."""

    def __init__(self, name: str, genuine):
        self._name, self._genuine = name, genuine
        self.__name__ = self.__qualname__ = getattr(genuine, "__name__", name.rsplit(".", 1)[-1])
        self.__doc__ = f"{name} is not allowed in this part."

    def _refuse(self):
        return RuntimeError(
            f"{self._name} is not allowed in this part: write it yourself (the notebook step explains how)."
        )

    def __call__(self, *args, **kwargs):
        __tracebackhide__ = True  # pytest shows the caller's line last, not this one
        if _calling_side(sys._getframe(1)) == "project":
            raise self._refuse()
        return self._genuine(*args, **kwargs)

    def __getattr__(self, attribute):  # torch.ops.torchvision.nms.default and the like
        __tracebackhide__ = True
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        if _calling_side(sys._getframe(1)) == "project":
            raise self._refuse()
        return getattr(self._genuine, attribute)

    def __repr__(self):
        return f"<{self._name}: not allowed in this part>"


def _places_holding(genuine):
    """``(namespace, attribute)`` of every binding of ``genuine`` that a test's code could reach: in the
    loaded torchvision modules, the project's top-level modules and ``torch.ops.torchvision``, and the
    ``torch.ops.torchvision`` entry of a torchvision.ops function of the same name."""
    places = []
    for module_name, module in list(sys.modules.items()):
        if module is None:
            continue
        if module_name != "torchvision" and not module_name.startswith("torchvision."):
            filename = getattr(module, "__file__", None)
            if not filename or os.path.dirname(os.path.realpath(filename)) != _ROOT_REAL:
                continue
        for attribute, value in list(vars(module).items()):
            if value is genuine:
                places.append((module, attribute))
    places += [
        (torch.ops.torchvision, name) for name, value in list(vars(torch.ops.torchvision).items()) if value is genuine
    ]
    kernel = getattr(genuine, "__name__", "")
    if kernel and str(getattr(genuine, "__module__", "")).startswith("torchvision.ops"):
        try:
            getattr(torch.ops.torchvision, kernel)  # an entry exists only for compiled kernels (nms, roi_align)
        except (AttributeError, RuntimeError):
            pass
        else:
            places.append((torch.ops.torchvision, kernel))
    return places


@pytest.fixture(autouse=True)
def _forbidden_operators(monkeypatch):
    """With A4_FORBIDDEN set, each named operator is replaced for this test (see the module docstring)."""
    done = set()
    for name, genuine in _forbidden.items():
        if id(genuine) in done:  # two names of one object (torchvision.ops.nms, torchvision.ops.boxes.nms)
            continue
        done.add(id(genuine))
        for namespace, attribute in _places_holding(genuine):
            monkeypatch.setattr(namespace, attribute, _ForbiddenOperator(name, getattr(namespace, attribute)))
    yield


def copy_of_the_repository(destination) -> str:
    """The top-level modules, tools/, tests/ (without the hidden ones) and pytest.ini of this repository,
    copied to ``destination``, for a test that changes a student's function and runs pytest there."""
    os.makedirs(destination)
    for name in os.listdir(ROOT):
        if name.endswith(".py"):
            shutil.copy2(os.path.join(ROOT, name), os.path.join(destination, name))
    for folder in ("tools", "tests"):
        ignore = shutil.ignore_patterns("__pycache__", ".pytest_cache", "hidden")
        shutil.copytree(os.path.join(ROOT, folder), os.path.join(destination, folder), ignore=ignore)
    shutil.copy2(os.path.join(ROOT, "pytest.ini"), os.path.join(destination, "pytest.ini"))
    return str(destination)


def replace_body(repo, module: str, function: str, body: str) -> None:
    """Replace the body of the top-level ``function`` of ``module`` in ``repo`` (its docstring kept) by
    ``body``, one or more lines of code."""
    path = os.path.join(repo, module + ".py")
    with open(path) as f:
        source = f.read()
    [node] = [n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == function]
    first = node.body[1] if ast.get_docstring(node) is not None else node.body[0]
    lines = source.splitlines(keepends=True)
    lines[first.lineno - 1 : node.end_lineno] = [" " * first.col_offset + line + "\n" for line in body.splitlines()]
    with open(path, "w") as f:
        f.write("".join(lines))


def gt_batch(rows_per_image, M: int = 5) -> torch.Tensor:
    """(B, M, 5) ground truth padded with -1 rows."""
    gt = torch.full((len(rows_per_image), M, 5), -1.0)
    for b, rows in enumerate(rows_per_image):
        if rows:
            gt[b, : len(rows)] = torch.tensor(rows, dtype=torch.float)
    return gt


def small_faster_rcnn(num_classes: int = 3, fpn_channels: int = 16, **rpn_kwargs):
    """A small ``FasterRCNN`` with the anchor RPN (random weights)."""
    from common import DetectorBackboneWithFPN
    from two_stage_detector import RPN, FasterRCNN

    backbone = DetectorBackboneWithFPN(fpn_channels, pretrained=False)
    rpn_kwargs = {"anchor_stride_scale": 4, "pre_nms_topk": 100, "post_nms_topk": 30, **rpn_kwargs}
    rpn = RPN(fpn_channels, [fpn_channels], batch_size_per_image=16, **rpn_kwargs)
    return FasterRCNN(backbone, rpn, num_classes, stem_channels=[fpn_channels], batch_size_per_image=16)


def write_voc_annotation(path, size, objects):
    """A VOC annotation file: ``size`` is (width, height), ``objects`` (name, x1, y1, x2, y2, difficult)
    in VOC's 1-based inclusive pixels."""
    root = ElementTree.Element("annotation")
    ElementTree.SubElement(root, "filename").text = os.path.basename(path).replace(".xml", ".jpg")
    size_node = ElementTree.SubElement(root, "size")
    for tag, value in zip(("width", "height", "depth"), (*size, 3)):
        ElementTree.SubElement(size_node, tag).text = str(value)
    for name, x1, y1, x2, y2, difficult in objects:
        node = ElementTree.SubElement(root, "object")
        ElementTree.SubElement(node, "name").text = name
        ElementTree.SubElement(node, "difficult").text = str(difficult)
        box = ElementTree.SubElement(node, "bndbox")
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), (x1, y1, x2, y2)):
            ElementTree.SubElement(box, tag).text = str(value)
    ElementTree.ElementTree(root).write(path)


def close_figure(figure):
    """Close a matplotlib figure a test drew, so that figures do not pile up over the test run."""
    from matplotlib import pyplot

    pyplot.close(figure)

"""Every sanity check of the two notebooks passes on the library and fails on each classic mistake it names.

A check is a code cell whose comment starts with "# Catches ..." and names the mistakes it catches (two more
cells, the anchors' and the deltas' of the two-stage notebook, say "must fail here" instead). Each test runs one
such cell, found by a string that only it holds (cells move as the notebooks change; their markers stay), on the
names the notebook's earlier cells define: as it is, where it must pass, or with one named mistake put in its way,
where it must raise. A mistake goes in as a wrong function, class or data set bound in the cell's namespace, or
as a wrong function patched into a library module for the test (pytest's ``monkeypatch``).

The earlier cells run once per notebook and test module (``NotebookPrefix``): in quick mode, in a plain Python
namespace (no Jupyter kernel; figures are drawn by Agg and closed). Left out of that run: the cells that only
call ``check("...")`` (they run pytest), and what ``SHORTENED`` names: the overfitting runs and the pictures of
their results, which no later check needs (an overfitting cell runs up to its training, so that the loaders
it defines are there), and the assertions that only quick mode's whole training run passes. That run lasts
``TRAIN_ITERS`` iterations here; a training cell run again by a test resumes its finished checkpoint, as a
notebook run twice does. Each overfitting check runs whole in the tests marked ``slow``, or cut short where
its mistake shows from the first steps.

Functions that earlier cells define keep the prefix's namespace as their globals, so a mistake bound in a test's
namespace does not reach them; the checks below call none that a mistake replaces.
"""

import dataclasses
import math
import re
import types
from pathlib import Path
from typing import Callable, Dict, List

import pytest
import torch

import common
import evaluation
import experiment
import notebook_kit
import one_stage_detector
import training
import two_stage_detector
from common import FPN_STRIDES, P2_LEVELS, DetectorBackboneWithFPN, get_fpn_location_coords, iou, nms
from one_stage_detector import (
    FCOSPredictionNetwork,
    fcos_apply_deltas_to_locations,
    fcos_get_deltas_from_locations,
    fcos_l1_loss,
    fcos_losses,
    fcos_match_locations_to_gt,
)
from roi_align import multi_level_roi_align
from two_stage_detector import (
    RPN,
    FasterRCNN,
    RPNPredictionNetwork,
    generate_fpn_anchors,
    rcnn_assign_rois_to_fpn_levels,
    rcnn_get_deltas_from_anchors,
    rcnn_match_anchors_to_gt,
    sample_rpn_training,
)

jupytext = pytest.importorskip("jupytext")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
FCOS, RCNN = "one_stage_detector", "two_stage_detector"
TRAIN_ITERS = 20  # the main training runs of the prefix (quick mode's are longer)

# Long cells of the prefix: a marker of the cell, and the statement it runs up to (None: it does not run).
SHORTENED = {
    FCOS: {
        "notebook_kit.show_architecture(": None,
        "overfit_history = a4_helper.train_detector(": "overfit_history = a4_helper.train_detector(",
        "overfit_map = ": None,
        'title="FCOS: held-out images"': None,
        'assert not QUICK or fcos_voc["map"] >= 0.3': 'assert not QUICK or fcos_voc["map"] >= 0.3',
    },
    RCNN: {
        "notebook_kit.show_architecture(": None,
        "rpn_history = a4_helper.train_detector(": "recall_before = recall_at_iou(",
        "proposal_names = ": None,
        "overfit_history = a4_helper.train_detector(": "overfit_history = a4_helper.train_detector(",
        "overfit_map = ": None,
        'title="Faster R-CNN: held-out images"': None,
        'assert not QUICK or rcnn_voc["map"] >= 0.3': 'assert not QUICK or rcnn_voc["map"] >= 0.3',
    },
}

# The check cells: a short name (the first part of a test's id) -> (notebook, marker).
CHECKS = {
    "fcos_data": (FCOS, "# Catches boxes in (y1, x1, y2, x2)"),
    "fcos_fpn": (FCOS, "# Catches an FPN wired to the wrong trunk stages"),
    "fcos_locations": (FCOS, "# Catches transposed locations"),
    "fcos_head": (FCOS, "# Catches a head flattened as (B, C, HW)"),
    "fcos_matching": (FCOS, "# Catches the tie rule inverted"),
    "fcos_deltas": (FCOS, "# Catches deltas not divided by the stride"),
    "fcos_centerness": (FCOS, "# Catches min and max swapped"),
    "fcos_iou": (FCOS, '# Catches the "+1" pixel convention'),
    "fcos_nms": (FCOS, "# Catches NMS that visits boxes in the wrong order"),
    "fcos_losses": (FCOS, "# Catches losses divided by zero foreground locations"),
    "fcos_overfit": (FCOS, "# Catches a loss that cannot fall"),
    "fcos_training": (FCOS, "# Catches a run that diverges"),
    "fcos_export": (FCOS, "# Catches exported files that skip images"),
    "fcos_reload": (FCOS, "# Catches a checkpoint that misses weights"),
    "rcnn_data": (RCNN, "# Catches boxes in another corner order"),
    "rcnn_head": (RCNN, "# Catches RPN outputs left as (B, A, H, W) maps"),
    "rcnn_anchors": (RCNN, "expected_anchors = {"),
    "rcnn_iou": (RCNN, '# Catches the "+1" pixel convention'),
    "rcnn_matching": (RCNN, "# Catches thresholds compared the wrong way round"),
    "rcnn_deltas": (RCNN, "expected_deltas = "),
    "rcnn_rpn": (RCNN, "# Catches losses divided by zero positives"),
    "rcnn_first_stage": (RCNN, "# Catches a first stage that does not learn"),
    "rcnn_levels": (RCNN, "# Catches log2 of the area"),
    "rcnn_roi_labels": (RCNN, "# Catches the original course's misaligned labels"),
    "rcnn_nms": (RCNN, "# Catches per-class NMS"),
    "rcnn_overfit": (RCNN, "# Catches a loss that cannot fall"),
    "rcnn_training": (RCNN, "# Catches a run that diverges"),
    "rcnn_export": (RCNN, "# Catches exported files that skip images"),
    "rcnn_reload": (RCNN, "# Catches a checkpoint that misses weights"),
}

# A cell that only runs a part's public tests: comments and check("part") calls.
_CHECK_CALLS = re.compile(r'(\s*(#[^\n]*)?\n|\s*check\("\w+"\)\s*\n)*')


def _code_cells(name: str) -> List[str]:
    """The code cells of a notebook's py:percent twin, without IPython's magic lines."""
    notebook = jupytext.read(NOTEBOOK_DIR / f"{name}.notebook.py")
    cells = []
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cells.append("\n".join(line for line in cell.source.splitlines() if not line.startswith("%")) + "\n")
    return cells


class NotebookPrefix:
    """A notebook's code cells run in order, once and only as far as a test asks for.

    ``before(marker)`` is a copy of the namespace as it was right before the cell that holds ``marker``
    (a shallow copy: rebinding a name in it changes nothing here, changing an object in place would).
    """

    def __init__(self, name: str):
        self.name = name
        self.cells = _code_cells(name)
        self.namespace: Dict[str, object] = {"__name__": "__main__"}
        self.snapshots = {0: dict(self.namespace)}  # cell index -> namespace before it
        self.done = 0

    def index(self, marker: str) -> int:
        found = [index for index, source in enumerate(self.cells) if marker in source]
        assert len(found) == 1, f"{len(found)} code cells of {self.name} hold {marker!r}"
        return found[0]

    def source(self, marker: str) -> str:
        return self.cells[self.index(marker)]

    def before(self, marker: str) -> Dict[str, object]:
        index = self.index(marker)
        while self.done < index:
            self._run_in_prefix(self.cells[self.done])
            self.done += 1
            self.snapshots[self.done] = dict(self.namespace)
        return dict(self.snapshots[index])

    def run(self, marker: str, namespace: Dict[str, object]) -> None:
        """Run the cell that holds ``marker``, whole, in ``namespace``."""
        exec(compile(self.source(marker), f"<{self.name}: {marker}>", "exec"), namespace)

    def run_shortened(self, marker: str, namespace: Dict[str, object]) -> None:
        """Run the cell that holds ``marker`` in ``namespace`` as the prefix runs it."""
        self._run_in_prefix(self.source(marker), namespace)

    def _run_in_prefix(self, source: str, namespace=None) -> None:
        if _CHECK_CALLS.fullmatch(source):
            return
        for marker, stop in SHORTENED[self.name].items():
            if marker in source:
                if stop is None:
                    return
                source = source[: source.index(stop)]
        exec(compile(source, f"<{self.name} prefix>", "exec"), self.namespace if namespace is None else namespace)


@pytest.fixture(scope="module")
def notebooks(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DETECT_QUICK", "1")
        patch.setenv("DETECT_ROOT", str(ROOT))
        patch.setenv("DETECT_RUN_DIR", str(tmp_path_factory.mktemp("notebook_runs")))
        patch.setenv("MPLBACKEND", "Agg")
        sizes = dataclasses.replace(notebook_kit.QUICK_SIZES, train_iters=TRAIN_ITERS)
        patch.setattr(notebook_kit, "QUICK_SIZES", sizes)
        yield {name: NotebookPrefix(name) for name in (FCOS, RCNN)}


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


@dataclasses.dataclass(frozen=True)
class Bug:
    """A classic mistake and how to put it in a check's way.

    ``inject(namespace, monkeypatch, notebook, tmp_path)`` changes the cell's namespace (a copy) or patches a module.
    """

    check: str
    name: str
    inject: Callable
    raises: type = AssertionError
    slow: bool = False


def bind(name: str, value) -> Callable:
    """An injection that binds ``name`` to ``value`` in the cell's namespace."""

    def inject(namespace, *_):
        namespace[name] = value

    return inject


def patch(module, attribute: str, value) -> Callable:
    """An injection that replaces ``module.attribute`` for the test."""

    def inject(namespace, monkeypatch, *_):
        monkeypatch.setattr(module, attribute, value)

    return inject


def both(*injections: Callable) -> Callable:
    """An injection made of several, in order."""

    def inject(*args):
        for injection in injections:
            injection(*args)

    return inject


# Data sets with a classic mistake ---------------------------------------------------------------------------


class RewrittenBoxes(torch.utils.data.Dataset):
    """A data set whose real GT rows come out through ``rewrite``, and whose padding rows hold ``padding``."""

    def __init__(self, dataset, rewrite=lambda rows: rows, padding=-1.0):
        self.dataset, self.rewrite, self.padding = dataset, rewrite, padding
        self.idx_to_class = dataset.idx_to_class

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        image_id, image, gt_boxes, *rest = self.dataset[index]
        real = gt_boxes[:, 4] >= 0
        rows = torch.full_like(gt_boxes, self.padding)
        rows[real] = self.rewrite(gt_boxes[real].clone())
        return (image_id, image, rows, *rest)


def rewritten_train_set(rewrite=lambda rows: rows, padding=-1.0) -> Callable:
    """An injection under which the data cell's ``RUN.open_data`` opens a training set with a mistake."""
    open_data = notebook_kit.NotebookRun.open_data

    def opened_with_a_mistake(self, *args, **kwargs):
        open_data(self, *args, **kwargs)
        self.train_set = RewrittenBoxes(self.train_set, rewrite, padding)

    return patch(notebook_kit.NotebookRun, "open_data", opened_with_a_mistake)


def yxyx(rows):
    return rows[:, [1, 0, 3, 2, 4]]


def xywh(rows):
    rows[:, 2:4] -= rows[:, 0:2]
    return rows


def corners_swapped(rows):  # (x2, y2, x1, y1)
    return rows[:, [2, 3, 0, 1, 4]]


def twice_as_large(rows):  # boxes of the original image, not scaled down with it
    rows[:, :4] *= 2
    return rows


DATA_BUGS = [
    Bug("fcos_data", "yxyx", rewritten_train_set(yxyx)),
    Bug("fcos_data", "xywh", rewritten_train_set(xywh)),
    Bug("fcos_data", "outside-the-image", rewritten_train_set(twice_as_large)),
    Bug("fcos_data", "padding-as-class-0", rewritten_train_set(padding=0.0)),
    Bug("rcnn_data", "yxyx", rewritten_train_set(yxyx)),
    Bug("rcnn_data", "x2y2x1y1", rewritten_train_set(corners_swapped)),
    Bug("rcnn_data", "padding-as-class-0", rewritten_train_set(padding=0.0)),
]


# Networks with a classic mistake ----------------------------------------------------------------------------


class FPNOnWrongStages(DetectorBackboneWithFPN):
    """p3, p4, p5 built from the trunk's c2, c3, c4 (strides 4, 8, 16), and still said to have strides 8, 16, 32."""

    def __init__(self, out_channels, pretrained=True):
        super().__init__(out_channels, pretrained, levels=P2_LEVELS)

    @property
    def fpn_strides(self):
        return dict(FPN_STRIDES)

    def forward(self, images):
        feats = super().forward(images)
        return {"p3": feats["p2"], "p4": feats["p3"], "p5": feats["p4"]}


class FPNWithNarrowLaterals(DetectorBackboneWithFPN):
    """Lateral convs (and the output convs after them) half as wide as asked."""

    def __init__(self, out_channels, pretrained=True):
        super().__init__(out_channels // 2, pretrained)


class HeadFlattenedAsBCHW(FCOSPredictionNetwork):
    """Outputs (B, C, HW) instead of (B, HW, C)."""

    def forward(self, feats_per_fpn_level):
        outputs = super().forward(feats_per_fpn_level)
        return [{level: x.transpose(1, 2) for level, x in output.items()} for output in outputs]


def flattened_without_permute(x):
    """(B, C, Hl, Wl) viewed as (B, HlWl, C) without moving C last: the memory is still laid out (B, C, HW)."""
    B, C, Hl, Wl = x.shape
    return x.reshape(B, Hl * Wl, C)


class HeadWithClassBias0(FCOSPredictionNetwork):
    """Every class starts at probability 0.5."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        torch.nn.init.zeros_(self.pred_cls.bias)


class RPNHeadLeavingMaps(RPNPredictionNetwork):
    """Objectness (B, A, Hl, Wl) and deltas (B, 4A, Hl, Wl), as the convs give them."""

    def forward(self, feats_per_fpn_level):
        stems = {level: self.stem_rpn(feats) for level, feats in feats_per_fpn_level.items()}
        return [
            {level: self.pred_obj(stem) for level, stem in stems.items()},
            {level: self.pred_box(stem) for level, stem in stems.items()},
        ]


NETWORK_BUGS = [
    Bug("fcos_fpn", "wrong-trunk-stages", bind("DetectorBackboneWithFPN", FPNOnWrongStages)),
    Bug("fcos_fpn", "narrow-laterals", bind("DetectorBackboneWithFPN", FPNWithNarrowLaterals)),
    Bug("fcos_head", "flattened-as-BCHW", bind("FCOSPredictionNetwork", HeadFlattenedAsBCHW)),
    Bug(
        "fcos_head",
        "flattened-without-permute",
        patch(one_stage_detector, "_flatten_head_output", flattened_without_permute),
    ),
    Bug("fcos_head", "class-bias-0", bind("FCOSPredictionNetwork", HeadWithClassBias0)),
    Bug("rcnn_head", "left-as-maps", bind("RPNPredictionNetwork", RPNHeadLeavingMaps)),
]


# Locations, anchors and levels ------------------------------------------------------------------------------


def _grid_size(shape):
    return tuple((shape.shape if torch.is_tensor(shape) else shape)[-2:])


def transposed_locations(shape_per_fpn_level, strides_per_fpn_level, dtype=torch.float32, device="cpu"):
    """Column-major: y moves first (the original assignment's order)."""
    locations = get_fpn_location_coords(shape_per_fpn_level, strides_per_fpn_level, dtype, device)
    for level, shape in shape_per_fpn_level.items():
        Hl, Wl = _grid_size(shape)
        locations[level] = locations[level].view(Hl, Wl, 2).transpose(0, 1).reshape(Hl * Wl, 2)
    return locations


def corner_locations(shape_per_fpn_level, strides_per_fpn_level, dtype=torch.float32, device="cpu"):
    """The top-left corner of each cell instead of its centre."""
    locations = get_fpn_location_coords(shape_per_fpn_level, strides_per_fpn_level, dtype, device)
    return {level: xy - strides_per_fpn_level[level] / 2 for level, xy in locations.items()}


def anchors_laid_out(view):
    """``generate_fpn_anchors`` with each level's (HWA, 4) rows rearranged by ``view(rows, A)``."""

    def generate(locations, strides, stride_scale, aspect_ratios):
        anchors = generate_fpn_anchors(locations, strides, stride_scale, aspect_ratios)
        return {level: view(rows, len(aspect_ratios)) for level, rows in anchors.items()}

    return generate


def levels_of_the_area(roi_boxes, strides_per_fpn_level, canonical_level=4):
    """log2 of the area where the paper takes log2 of its square root."""
    area = (roi_boxes[:, 2] - roi_boxes[:, 0]) * (roi_boxes[:, 3] - roi_boxes[:, 1])
    k = torch.floor(canonical_level + torch.log2(area / 224))
    return (k.clamp(3, 5) - 3).long()


def unclamped_levels(roi_boxes, strides_per_fpn_level, canonical_level=4):
    """Eq. 1 without the clamp: small RoIs get levels below p3 (negative positions)."""
    size = ((roi_boxes[:, 2] - roi_boxes[:, 0]) * (roi_boxes[:, 3] - roi_boxes[:, 1])).sqrt()
    return (torch.floor(canonical_level + torch.log2(size / 224) + 1e-6) - 3).long()


GEOMETRY_BUGS = [
    Bug("fcos_locations", "transposed", bind("get_fpn_location_coords", transposed_locations)),
    Bug("fcos_locations", "cell-corners", bind("get_fpn_location_coords", corner_locations)),
    # The cell's 2 x 2 grid of p5 locations, laid out column by column, or ratio by ratio (a * HW + loc).
    Bug(
        "rcnn_anchors",
        "transposed",
        bind(
            "generate_fpn_anchors",
            anchors_laid_out(lambda rows, A: rows.view(2, 2, A, 4).transpose(0, 1).reshape(-1, 4)),
        ),
    ),
    Bug(
        "rcnn_anchors",
        "ratio-first",
        bind(
            "generate_fpn_anchors", anchors_laid_out(lambda rows, A: rows.view(-1, A, 4).transpose(0, 1).reshape(-1, 4))
        ),
    ),
    Bug("rcnn_levels", "log2-of-the-area", bind("rcnn_assign_rois_to_fpn_levels", levels_of_the_area)),
    Bug("rcnn_levels", "unclamped", bind("rcnn_assign_rois_to_fpn_levels", unclamped_levels)),
]


# Matching and sampling --------------------------------------------------------------------------------------


def matched_box_by_box(larger_wins=False, padding_too=False):
    """FCOS matching of one image built from the library's, one GT row at a time: where several rows claim a
    location, the smallest wins (the larger with ``larger_wins``); padding rows count as objects with
    ``padding_too``."""

    def area(row):
        return float((row[2] - row[0]) * (row[3] - row[1]))

    def match(locations_per_fpn_level, strides_per_fpn_level, gt_boxes):
        rows = sorted((row for row in gt_boxes if padding_too or row[4] >= 0), key=area, reverse=not larger_wins)
        matched = {level: torch.full((len(xy), 5), -1.0) for level, xy in locations_per_fpn_level.items()}
        for row in rows:  # the row written last wins
            as_object = torch.cat([row[:4], row[4:].abs()])[None]
            alone = fcos_match_locations_to_gt(locations_per_fpn_level, strides_per_fpn_level, as_object)
            for level, level_matched in alone.items():
                matched[level][level_matched[:, 4] >= 0] = row
        return matched

    return match


def float32_above(value):
    """The next float32 above ``value``: compared with it, ``>=`` acts as ``>`` on float32 IoUs."""
    return torch.nextafter(torch.tensor(value), torch.tensor(2.0)).item()


def thresholds_the_wrong_way(anchor_boxes, gt_boxes, iou_thresholds, allow_low_quality_matches=False):
    """Positive above the upper threshold (> where >= belongs), negative at or below the lower one."""
    low, high = iou_thresholds
    thresholds = (float32_above(low), float32_above(high))
    return rcnn_match_anchors_to_gt(anchor_boxes, gt_boxes, thresholds, allow_low_quality_matches)


def matched_to_another_object(anchor_boxes, gt_boxes, iou_thresholds, allow_low_quality_matches=False):
    """Each positive anchor gets the row of the next object of its image, not of the one it overlaps most."""
    if gt_boxes.dim() == 3:
        return torch.stack([matched_to_another_object(anchor_boxes, gt, iou_thresholds) for gt in gt_boxes])
    matched = rcnn_match_anchors_to_gt(anchor_boxes, gt_boxes, iou_thresholds, allow_low_quality_matches)
    real = gt_boxes[gt_boxes[:, 4] >= 0]
    positive = matched[:, 4] >= 0
    index = (matched[positive, None, :] == real[None]).all(-1).int().argmax(1)
    matched[positive] = real[(index + 1) % len(real)]
    return matched


def sample_with_neutral(gt_boxes, num_samples, fg_fraction):
    """Neutral anchors (-1e8 rows) taken for background."""
    neutral = (gt_boxes == common.NEUTRAL).all(1, keepdim=True)
    return sample_rpn_training(torch.where(neutral, -1.0, gt_boxes), num_samples, fg_fraction)


def sample_without_cap(gt_boxes, num_samples, fg_fraction):
    """As many positives as there are, up to the whole sample."""
    return sample_rpn_training(gt_boxes, num_samples, 1.0)


MATCHING_BUGS = [
    Bug("fcos_matching", "larger-box-wins", bind("fcos_match_locations_to_gt", matched_box_by_box(larger_wins=True))),
    Bug("fcos_matching", "padding-matched", bind("fcos_match_locations_to_gt", matched_box_by_box(padding_too=True))),
    Bug(
        "fcos_matching",
        "size-ranges-ignored",
        patch(one_stage_detector, "_fcos_size_range", lambda *_: (0.0, math.inf)),
    ),
    Bug("rcnn_matching", "thresholds-the-wrong-way", bind("rcnn_match_anchors_to_gt", thresholds_the_wrong_way)),
    Bug("rcnn_matching", "another-object", bind("rcnn_match_anchors_to_gt", matched_to_another_object)),
    Bug("rcnn_matching", "samples-neutral", bind("sample_rpn_training", sample_with_neutral)),
    Bug("rcnn_matching", "too-many-positives", bind("sample_rpn_training", sample_without_cap)),
]


# Box encodings, centerness, IoU, NMS ------------------------------------------------------------------------


def deltas_not_divided_by_the_stride(locations, gt_boxes, stride):
    return fcos_get_deltas_from_locations(locations, gt_boxes, 1)


def deltas_with_x1_and_x2_swapped(locations, gt_boxes, stride):
    columns = [2, 1, 0, 3] + list(range(4, gt_boxes.shape[1]))
    return fcos_get_deltas_from_locations(locations, gt_boxes[:, columns], stride)


def decoded_without_the_stride(deltas, locations, stride):
    return fcos_apply_deltas_to_locations(deltas, locations, 1)


def _centerness(deltas, ratio):
    left_right, top_bottom = deltas[:, 0::2], deltas[:, 1::2]
    return ratio(left_right.amin(1) * top_bottom.amin(1), left_right.amax(1) * top_bottom.amax(1))


def centerness_min_max_swapped(deltas):
    centerness = _centerness(deltas, lambda small, large: (large / small).sqrt())
    return centerness.masked_fill((deltas == -1).all(1), -1.0)


def centerness_without_square_root(deltas):
    centerness = _centerness(deltas, lambda small, large: small / large)
    return centerness.masked_fill((deltas == -1).all(1), -1.0)


def centerness_of_background_too(deltas):
    return _centerness(deltas, lambda small, large: (small / large).sqrt())


def iou_with(plus_one=0.0, clamp=True):
    """IoU with widths ``x2 - x1 + plus_one``, and the intersection's sides clamped at 0 or not."""

    def pairwise(boxes1, boxes2):
        def area(boxes):
            return (boxes[:, 2] - boxes[:, 0] + plus_one) * (boxes[:, 3] - boxes[:, 1] + plus_one)

        top_left = torch.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
        bottom_right = torch.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
        sides = bottom_right - top_left + plus_one
        sides = sides.clamp(min=0) if clamp else sides
        intersection = sides[..., 0] * sides[..., 1]
        return intersection / (area(boxes1)[:, None] + area(boxes2)[None, :] - intersection)

    return pairwise


def nms_from_the_lowest_score(boxes, scores, iou_threshold=0.5):
    return nms(boxes, -scores, iou_threshold)


def nms_keeping_overlaps(boxes, scores, iou_threshold=0.5):
    """Greedy NMS that drops the boxes that overlap a kept one by less than the threshold."""
    overlaps = iou(boxes, boxes)
    suppressed = torch.zeros(len(boxes), dtype=torch.bool)
    keep = []
    for index in scores.argsort(descending=True).tolist():
        if not suppressed[index]:
            keep.append(index)
            suppressed |= overlaps[index] < iou_threshold
    return torch.tensor(keep)


def nms_across_classes(boxes, scores, class_ids, iou_threshold=0.5):
    return nms(boxes, scores, iou_threshold)


def class_nms_from_the_lowest_score(boxes, scores, class_ids, iou_threshold=0.5):
    return common.class_spec_nms(boxes, -scores, class_ids, iou_threshold)


def rcnn_deltas_scaled_by_the_box(anchors, gt_boxes):
    """The box's size where the anchor's belongs."""
    deltas = rcnn_get_deltas_from_anchors(anchors, gt_boxes)
    anchor_size, box_size = anchors[:, 2:4] - anchors[:, :2], gt_boxes[:, 2:4] - gt_boxes[:, :2]
    return torch.cat([deltas[:, :2] * anchor_size / box_size, deltas[:, 2:]], dim=1)


BOX_BUGS = [
    Bug(
        "fcos_deltas",
        "not-divided-by-the-stride",
        bind("fcos_get_deltas_from_locations", deltas_not_divided_by_the_stride),
    ),
    Bug("fcos_deltas", "x1-and-x2-swapped", bind("fcos_get_deltas_from_locations", deltas_with_x1_and_x2_swapped)),
    Bug("fcos_deltas", "decoder-not-the-inverse", bind("fcos_apply_deltas_to_locations", decoded_without_the_stride)),
    Bug("fcos_centerness", "min-and-max-swapped", bind("fcos_make_centerness_targets", centerness_min_max_swapped)),
    Bug("fcos_centerness", "no-square-root", bind("fcos_make_centerness_targets", centerness_without_square_root)),
    Bug("fcos_centerness", "background-target", bind("fcos_make_centerness_targets", centerness_of_background_too)),
    Bug("fcos_iou", "plus-one", bind("iou", iou_with(plus_one=1.0))),
    Bug("fcos_iou", "unclamped-intersection", bind("iou", iou_with(clamp=False))),
    Bug("rcnn_iou", "plus-one", bind("iou", iou_with(plus_one=1.0))),
    Bug("rcnn_iou", "unclamped-intersection", bind("iou", iou_with(clamp=False))),
    Bug("fcos_nms", "wrong-order", bind("nms", nms_from_the_lowest_score)),
    Bug("fcos_nms", "threshold-the-wrong-way", bind("nms", nms_keeping_overlaps)),
    Bug("fcos_nms", "across-classes", bind("class_spec_nms", nms_across_classes)),
    Bug("rcnn_nms", "across-classes", bind("class_spec_nms", nms_across_classes)),
    Bug("rcnn_nms", "wrong-order", bind("class_spec_nms", class_nms_from_the_lowest_score)),
    Bug("rcnn_deltas", "scaled-by-the-box", bind("rcnn_get_deltas_from_anchors", rcnn_deltas_scaled_by_the_box)),
]


# Losses and proposals ---------------------------------------------------------------------------------------


def fcos_losses_over_the_raw_count(matched_gt_boxes, *args, **kwargs):
    """Divided by the number of foreground locations even when it is 0."""
    losses = fcos_losses(matched_gt_boxes, *args, **kwargs)
    count = (matched_gt_boxes[..., 4] >= 0).sum()
    return {name: value * count.clamp(min=1) / count for name, value in losses.items()}


def fcos_losses_with_background_boxes(matched_gt_boxes, target_deltas, cls_logits, box_deltas, ctr_logits, **kwargs):
    """The box loss summed over every location, background rows (targets -1) included."""
    losses = fcos_losses(matched_gt_boxes, target_deltas, cls_logits, box_deltas, ctr_logits, **kwargs)
    count = (matched_gt_boxes[..., 4] >= 0).sum().clamp(min=1)
    losses["loss_box"] = fcos_l1_loss(box_deltas.flatten(0, 1), target_deltas.flatten(0, 1)).sum() / count
    return losses


_rpn_losses = RPN._losses


def rpn_losses_over_the_positives(self, obj_logits, boxreg_deltas, anchors, gt_boxes):
    """Divided by the number of sampled positives instead of all sampled anchors (0 on an image without objects)."""
    losses = _rpn_losses(self, obj_logits, boxreg_deltas, anchors, gt_boxes)
    matched = rcnn_match_anchors_to_gt(anchors, gt_boxes, self.anchor_iou_thresholds, self.allow_low_quality_matches)
    positives = (matched[..., 4] >= 0).sum(1).clamp(max=int(self.batch_size_per_image * self.fg_fraction))
    negatives = (matched[..., 4] == -1).sum(1).clamp(max=self.batch_size_per_image - positives)
    sampled, positives = (positives + negatives).sum().clamp(min=1), positives.sum()
    return {name: value * sampled / positives for name, value in losses.items()}


def proposals_selected(change=lambda proposals: proposals, **arguments):
    """``select_proposals`` called with some of its arguments replaced, its proposals passed through ``change``."""
    select = two_stage_detector.select_proposals

    def selected(level_boxes, level_scores, image_size, nms_thresh, pre_nms_topk, post_nms_topk, nms_per_level=True):
        given = dict(image_size=image_size, nms_thresh=nms_thresh, pre_nms_topk=pre_nms_topk)
        given.update(post_nms_topk=post_nms_topk, nms_per_level=nms_per_level)
        proposals = select(level_boxes, level_scores, **{**given, **arguments})
        return [change(boxes) for boxes in proposals]

    return selected


LOSS_BUGS = [
    Bug(
        "fcos_losses",
        "divided-by-zero-foreground",
        patch(one_stage_detector, "fcos_losses", fcos_losses_over_the_raw_count),
    ),
    Bug(
        "fcos_losses",
        "background-box-terms",
        patch(one_stage_detector, "fcos_losses", fcos_losses_with_background_boxes),
    ),
    Bug("rcnn_rpn", "divided-by-zero-positives", patch(RPN, "_losses", rpn_losses_over_the_positives)),
    Bug(
        "rcnn_rpn",
        "unclipped-proposals",
        patch(two_stage_detector, "select_proposals", proposals_selected(image_size=(10**6, 10**6))),
    ),
    Bug(
        "rcnn_rpn",
        "x1-after-x2",
        patch(two_stage_detector, "select_proposals", proposals_selected(lambda boxes: boxes[:, [2, 3, 0, 1]])),
    ),
    Bug(
        "rcnn_rpn",
        "more-than-post-nms-topk",
        patch(two_stage_detector, "select_proposals", proposals_selected(post_nms_topk=400)),
    ),
]


# Overfitting runs -------------------------------------------------------------------------------------------


def overfit_for(iterations: int) -> Callable:
    """An overfitting run cut to ``iterations``: enough for a mistake that shows from its first steps."""
    return bind("OVERFIT_ITERS", iterations)


def fcos_losses_over_every_location(matched_gt_boxes, *args, **kwargs):
    """Divided by the number of locations instead of the foreground ones."""
    losses = fcos_losses(matched_gt_boxes, *args, **kwargs)
    count = (matched_gt_boxes[..., 4] >= 0).sum().clamp(min=1)
    return {name: value * count / matched_gt_boxes[..., 4].numel() for name, value in losses.items()}


def fcos_deltas_with_a_sign_flipped(locations, gt_boxes, stride):
    """(x1 - x, y1 - y, ...) where (x - x1, y - y1, ...) belongs; background rows stay -1."""
    deltas = fcos_get_deltas_from_locations(locations, gt_boxes, stride)
    flipped = deltas * deltas.new_tensor([-1.0, -1.0, 1.0, 1.0])
    return torch.where((deltas == -1).all(1, keepdim=True), deltas, flipped)


_fcos_make_targets = one_stage_detector.fcos_make_targets


def fcos_targets_of_another_image(locations_per_fpn_level, strides_per_fpn_level, gt_boxes, matcher):
    """Each image of the batch gets the targets of the image before it."""
    return _fcos_make_targets(locations_per_fpn_level, strides_per_fpn_level, gt_boxes.roll(1, dims=0), matcher)


OVERFIT_BUGS = [
    Bug(
        "fcos_overfit",
        "divided-by-the-wrong-count",
        both(overfit_for(2), patch(one_stage_detector, "fcos_losses", fcos_losses_over_every_location)),
    ),
    Bug(
        "fcos_overfit",
        "sign-flipped-in-the-deltas",
        both(
            overfit_for(10),
            patch(one_stage_detector, "fcos_get_deltas_from_locations", fcos_deltas_with_a_sign_flipped),
        ),
    ),
    Bug(
        "fcos_overfit",
        "targets-of-another-image",
        patch(one_stage_detector, "fcos_make_targets", fcos_targets_of_another_image),
        slow=True,
    ),
]


def rpn_losses_of_another_image(self, obj_logits, boxreg_deltas, anchors, gt_boxes):
    """Each image's anchors matched to the objects of the image before it in the batch."""
    return _rpn_losses(self, obj_logits, boxreg_deltas, anchors, gt_boxes.roll(1, dims=0))


_rcnn_apply_deltas = two_stage_detector.rcnn_apply_deltas_to_anchors


def rcnn_decoder_moving_the_wrong_way(deltas, anchors, weights=None):
    """Centre shifts applied with the wrong sign: not the inverse of the encoding."""
    return _rcnn_apply_deltas(deltas * deltas.new_tensor([-1.0, -1.0, 1.0, 1.0]), anchors, weights)


OVERFIT_BUGS += [
    Bug(
        "rcnn_first_stage",
        "another-images-objects",
        patch(RPN, "_losses", rpn_losses_of_another_image),
        slow=True,
    ),
    Bug(
        "rcnn_first_stage",
        "decoder-not-the-inverse",
        patch(two_stage_detector, "rcnn_apply_deltas_to_anchors", rcnn_decoder_moving_the_wrong_way),
        slow=True,
    ),
]


_sample_rois = FasterRCNN.sample_rois


def rois_with_their_neighbours_targets(self, proposals, gt_boxes):
    """Each RoI paired with the target of the RoI next to it."""
    rois, matched_gt_boxes = _sample_rois(self, proposals, gt_boxes)
    return rois, matched_gt_boxes.roll(1, dims=0)


OVERFIT_BUGS.append(
    Bug(
        "rcnn_overfit",
        "neighbours-targets",
        patch(FasterRCNN, "sample_rois", rois_with_their_neighbours_targets),
        slow=True,
    )
)


# The second stage's RoIs ------------------------------------------------------------------------------------


def roi_features_gathered_level_by_level(self, feats_per_fpn_level, rois):
    """The original course's gather: the RoIs of p3, then those of p4, then p5, whatever order they came in."""
    strides = self.backbone.fpn_strides
    levels = rcnn_assign_rois_to_fpn_levels(rois[:, 1:], strides, self.roi_canonical_level)
    features = []
    for level in range(len(strides)):
        mine = levels == level
        features.append(
            multi_level_roi_align(
                feats_per_fpn_level, strides, rois[mine], levels[mine], self.roi_size, self.roi_sampling_ratio
            )
        )
    return torch.cat(features)


def rois_with_another_images_objects(self, proposals, gt_boxes):
    """Each image's proposals matched to the objects of the image before it in the batch."""
    return _sample_rois(self, proposals, gt_boxes.roll(1, dims=0))


def rois_without_foreground_cap(self, proposals, gt_boxes):
    self.fg_fraction = 1.0
    return _sample_rois(self, proposals, gt_boxes)


ROI_BUGS = [
    Bug(
        "rcnn_roi_labels", "misaligned-gather", patch(FasterRCNN, "roi_features", roi_features_gathered_level_by_level)
    ),
    Bug(
        "rcnn_roi_labels", "another-images-targets", patch(FasterRCNN, "sample_rois", rois_with_another_images_objects)
    ),
    Bug("rcnn_roi_labels", "too-many-foreground", patch(FasterRCNN, "sample_rois", rois_without_foreground_cap)),
]


# Training runs, exported files, checkpoints -----------------------------------------------------------------


def fresh_run_dirs(namespace, monkeypatch, notebook, tmp_path):
    """Run folders of the test's own, so that a training cell trains instead of resuming the prefix's run."""

    def run_dir(model):
        folder = tmp_path / model
        folder.mkdir(exist_ok=True)
        return folder

    namespace["run_dir"] = run_dir


def a4_helper_training_with(train_detector) -> Callable:
    def inject(namespace, *_):
        namespace["a4_helper"] = types.SimpleNamespace(
            **{**vars(namespace["a4_helper"]), "train_detector": train_detector}
        )

    return inject


def diverging(namespace, *_):
    """A learning rate so large that the weights overflow to infinity, and the loss to NaN, within a few steps."""
    namespace["LEARNING_RATE"] = 1e36


def trainer_logging_nan(detector, train_loader, max_iters, **options):
    """A training loop that logs a NaN loss and goes on, where ``train_detector`` would stop."""
    history = training.train_detector(detector, train_loader, max_iters=2, **{**options, "checkpoint_path": None})
    return {name: values + [math.nan] * (max_iters - 2) for name, values in history.items()}


def trainer_for_one_epoch(detector, train_loader, max_iters, **options):
    """A training loop that stops when the loader runs dry."""
    return training.train_detector(detector, train_loader, max_iters=min(max_iters, len(train_loader)), **options)


def two_batch_train_loader(namespace, *_):
    """A training loader of two batches, shorter than the run."""
    images = notebook_kit.subset(namespace["train_set"], 2 * namespace["BATCH_SIZE"])
    namespace["make_train_loader"] = lambda: torch.utils.data.DataLoader(images, batch_size=namespace["BATCH_SIZE"])


class NothingOnTheFirstImage(torch.nn.Module):
    """A detector that finds nothing on the first image of every batch, so that some image has no detection."""

    def __init__(self, detector):
        super().__init__()
        self.detector = detector

    def predict(self, images, **thresholds):
        predictions = self.detector.predict(images, **thresholds)
        predictions[0] = {key: value[:0] for key, value in predictions[0].items()}
        return predictions


_write_map_tool_files = evaluation._write_map_tool_files


def writer_skipping_images_without_detections(output_dir, image_id, target, pred, idx_to_class):
    if len(pred["boxes"]):
        _write_map_tool_files(output_dir, image_id, target, pred, idx_to_class)


def writer_in_yxyx_order(output_dir, image_id, target, pred, idx_to_class):
    target, pred = ({**rows, "boxes": rows["boxes"][:, [1, 0, 3, 2]]} for rows in (target, pred))
    _write_map_tool_files(output_dir, image_id, target, pred, idx_to_class)


def detector_with_an_empty_image(detector_name, map_cell) -> Callable:
    """The trained detector behind ``NothingOnTheFirstImage``, and the notebook's mAP cell run again on it."""

    def inject(namespace, monkeypatch, notebook, *_):
        namespace[detector_name] = NothingOnTheFirstImage(namespace[detector_name])
        notebook.run_shortened(map_cell, namespace)

    return inject


def loader_of(load_weights) -> Callable:
    """An injection whose ``experiment.load_detector`` rebuilds the stored configuration's detector (or the other
    variant's, with ``variant``) and hands it to ``load_weights(detector, checkpoint)``."""

    def load_detector(checkpoint_path):
        checkpoint = training.read_checkpoint(checkpoint_path)
        config = experiment.RunConfig.from_dict(checkpoint["metadata"]["config"])
        detector = load_weights(config, checkpoint)
        return detector, config

    return bind("experiment", types.SimpleNamespace(load_detector=load_detector))


def without_batchnorm_statistics(config, checkpoint):
    """Saved without the BatchNorm running statistics, loaded leniently."""
    detector = experiment.build_detector(config)
    weights = {name: value for name, value in checkpoint["model"].items() if "running_" not in name}
    detector.load_state_dict(weights, strict=False)
    return detector


def without_the_backbone(config, checkpoint):
    """Saved without the backbone's weights (only what was trained on top of it), loaded leniently."""
    detector = experiment.build_detector(config)
    weights = {name: value for name, value in checkpoint["model"].items() if not name.startswith("backbone.")}
    detector.load_state_dict(weights, strict=False)
    return detector


def another_model(config, checkpoint):
    """Another model rebuilt, loaded leniently: FCOS's other variant (the course's for the improved one, or the other
    way round), Faster R-CNN with FCOS as its first stage (its two variants share every weight's name and shape)."""
    if config.model == "fcos":
        other = dataclasses.replace(config, variant="course" if config.variant == "improved" else "improved")
    else:
        other = dataclasses.replace(config, first_stage="fcos")
    detector = experiment.build_detector(other)
    own = detector.state_dict()
    fitting = {name: value for name, value in checkpoint["model"].items() if own.get(name, value).shape == value.shape}
    detector.load_state_dict(fitting, strict=False)
    return detector


def run_bugs(prefix: str, detector: str, map_cell: str) -> List[Bug]:
    """The mistakes of one notebook's training, export and reload cells."""
    return [
        Bug(f"{prefix}_training", "diverges", both(fresh_run_dirs, diverging), raises=training.NonFiniteLossError),
        Bug(f"{prefix}_training", "logs-nan", both(fresh_run_dirs, a4_helper_training_with(trainer_logging_nan))),
        Bug(
            f"{prefix}_training",
            "stops-after-one-epoch",
            both(fresh_run_dirs, two_batch_train_loader, a4_helper_training_with(trainer_for_one_epoch)),
        ),
        Bug(
            f"{prefix}_export",
            "skips-images-without-detections",
            both(
                detector_with_an_empty_image(detector, map_cell),
                patch(evaluation, "_write_map_tool_files", writer_skipping_images_without_detections),
            ),
        ),
        Bug(
            f"{prefix}_export", "boxes-in-yxyx-order", patch(evaluation, "_write_map_tool_files", writer_in_yxyx_order)
        ),
        Bug(f"{prefix}_reload", "batchnorm-statistics-missing", loader_of(without_batchnorm_statistics)),
        Bug(f"{prefix}_reload", "backbone-missing", loader_of(without_the_backbone)),
        Bug(f"{prefix}_reload", "another-model", loader_of(another_model)),
    ]


RUN_BUGS = [
    *run_bugs("fcos", "fcos", "fcos_voc = a4_helper.evaluate_detector("),
    *run_bugs("rcnn", "faster_rcnn", "rcnn_voc = a4_helper.evaluate_detector("),
]

BUGS = (
    DATA_BUGS + NETWORK_BUGS + GEOMETRY_BUGS + MATCHING_BUGS + BOX_BUGS + LOSS_BUGS + OVERFIT_BUGS + ROI_BUGS + RUN_BUGS
)


def _params(bugs):
    order = list(CHECKS)  # the notebooks' order, so that the prefixes run forward
    for bug in sorted(bugs, key=lambda bug: order.index(bug.check)):
        marks = [pytest.mark.slow] if bug.slow else []
        yield pytest.param(bug, id=f"{bug.check}-{bug.name}", marks=marks)


def _cell_namespace(notebooks, check):
    notebook_name, marker = CHECKS[check]
    notebook = notebooks[notebook_name]
    namespace = notebook.before(marker)
    if "RUN" in namespace:  # a copy, which the data cell may open its data into without changing the prefix's
        namespace["RUN"] = dataclasses.replace(namespace["RUN"])
    return notebook, marker, namespace


# The overfitting runs, whole (the quick mode's 150 iterations): tens of seconds each.
LONG_CHECKS = ("fcos_overfit", "rcnn_first_stage", "rcnn_overfit")


@pytest.mark.parametrize(
    "check", [pytest.param(check, marks=[pytest.mark.slow] if check in LONG_CHECKS else []) for check in CHECKS]
)
def test_the_check_passes_on_the_library(check, notebooks, monkeypatch, tmp_path):
    notebook, marker, namespace = _cell_namespace(notebooks, check)
    notebook.run(marker, namespace)  # a training cell resumes the prefix's finished run: its checks, no training


@pytest.mark.parametrize("bug", list(_params(BUGS)))
def test_the_check_fails_on_the_mistake(bug, notebooks, monkeypatch, tmp_path):
    notebook, marker, namespace = _cell_namespace(notebooks, bug.check)
    bug.inject(namespace, monkeypatch, notebook, tmp_path)
    try:
        with pytest.raises(bug.raises):
            notebook.run(marker, namespace)
    finally:
        common._cached_locations.cache_clear()  # locations a patched function may have left in the cache

"""Property-based tests of the box functions over random boxes, degenerate ones included.

Boxes have integer or half-pixel corners, so ties, shared edges, zero widths and inverted sides
come up often. Hypothesis runs derandomized (the same examples on every run) so CI is reproducible.
"""

import math

import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from common import FPN_STRIDES, box_area, get_fpn_location_coords, iou, nms
from one_stage_detector import (
    _fcos_size_range,
    fcos_apply_deltas_to_locations,
    fcos_get_deltas_from_locations,
    fcos_make_centerness_targets,
    fcos_match_locations_to_gt,
)
from two_stage_detector import (
    BACKGROUND,
    NEUTRAL,
    rcnn_apply_deltas_to_anchors,
    rcnn_get_deltas_from_anchors,
    rcnn_match_anchors_to_gt,
)

PROPERTY = settings(max_examples=80, deadline=None, derandomize=True, database=None)

HALF_PIXELS = st.integers(-64, 320).map(lambda v: v / 2)  # corners from -32 to 160 in steps of 0.5


def box_rows(side):
    """(x1, y1, x2, y2) from a corner and two sides drawn from ``side`` (negative sides invert the box)."""
    return st.builds(lambda x, y, w, h: [x, y, x + w, y + h], HALF_PIXELS, HALF_PIXELS, side, side)


ANY_SIDE = st.integers(-20, 400).map(lambda v: v / 2)  # zero and negative sides included
NON_NEGATIVE_SIDE = st.integers(0, 400).map(lambda v: v / 2)
POSITIVE_SIDE = st.integers(1, 240).map(lambda v: v / 2)
# 2 to 100 px: a box is at most 50 times its anchor per side, inside the clamp of 1000 / 16 = 62.5.
ANCHOR_SIDE = st.integers(4, 200).map(lambda v: v / 2)


def boxes(side=ANY_SIDE, min_size=0, max_size=12):
    rows = st.lists(box_rows(side), min_size=min_size, max_size=max_size)
    return rows.map(lambda r: torch.tensor(r, dtype=torch.float32).reshape(-1, 4))


@st.composite
def scored_boxes(draw, side=ANY_SIDE, distinct_scores=False):
    """(N, 4) boxes and (N,) scores; without ``distinct_scores`` ties in score are common."""
    box_tensor = draw(boxes(side, max_size=30))
    values = st.integers(0, 1000) if distinct_scores else st.integers(0, 8)
    scores = draw(st.lists(values, min_size=len(box_tensor), max_size=len(box_tensor), unique=distinct_scores))
    return box_tensor, torch.tensor(scores, dtype=torch.float32)


@st.composite
def ground_truth(draw, max_size=10):
    """(M, 5) rows: boxes of any shape with classes 0..4, and padding rows of -1."""
    rows = draw(st.lists(st.one_of(box_rows(ANY_SIDE), st.just(None)), max_size=max_size))
    classes = draw(st.lists(st.integers(0, 4), min_size=len(rows), max_size=len(rows)))
    gt = [[-1.0] * 5 if row is None else [*row, float(c)] for row, c in zip(rows, classes)]
    return torch.tensor(gt, dtype=torch.float32).reshape(-1, 5)


def _is_real(gt):
    """Rows that may be matched: a class and a box with area."""
    return (gt[:, 4] >= 0) & (gt[:, 2] > gt[:, 0]) & (gt[:, 3] > gt[:, 1])


def _rows_in(rows, table):
    """(N,) True where the row equals some row of ``table``."""
    return (rows[:, None, :] == table[None, :, :]).all(-1).any(-1)


# ---------------------------------------------------------------------------------------------
# IoU and NMS
# ---------------------------------------------------------------------------------------------


@PROPERTY
@given(boxes(), boxes())
def test_iou_is_symmetric_finite_and_in_0_1(boxes1, boxes2):
    ious = iou(boxes1, boxes2)
    assert ious.shape == (len(boxes1), len(boxes2))
    assert torch.isfinite(ious).all() and (ious >= 0).all() and (ious <= 1).all()
    assert torch.equal(ious, iou(boxes2, boxes1).T)


@PROPERTY
@given(boxes(min_size=1))
def test_iou_of_a_box_with_itself_is_one_unless_it_is_empty(box_tensor):
    has_area = box_area(box_tensor) > 0
    assert_close(iou(box_tensor, box_tensor).diagonal(), has_area.float())


@PROPERTY
@given(boxes(NON_NEGATIVE_SIDE), boxes(NON_NEGATIVE_SIDE))
def test_iou_equals_torchvision_for_boxes_that_are_not_inverted(boxes1, boxes2):
    # torchvision divides 0 by 0 for two empty boxes; ours gives 0 there.
    assert_close(iou(boxes1, boxes2), torchvision.ops.box_iou(boxes1, boxes2).nan_to_num(0.0))


@PROPERTY
@given(scored_boxes(), st.sampled_from([0.0, 0.3, 0.5, 0.7, 1.0]))
def test_nms_keeps_a_subset_by_score_with_no_kept_pair_above_the_threshold(box_and_scores, threshold):
    box_tensor, scores = box_and_scores
    keep = nms(box_tensor, scores, threshold)
    assert keep.dtype == torch.long and len(set(keep.tolist())) == len(keep)
    assert ((keep >= 0) & (keep < len(box_tensor))).all()
    assert (scores[keep].diff() <= 0).all()
    overlaps = iou(box_tensor[keep], box_tensor[keep]).fill_diagonal_(0)
    assert (overlaps <= threshold).all()
    # Greedy: a dropped box overlaps some kept box that scores at least as high.
    dropped = torch.ones(len(box_tensor), dtype=torch.bool)
    dropped[keep] = False
    suppressors = (iou(box_tensor[dropped], box_tensor[keep]) > threshold) & (
        scores[keep][None, :] >= scores[dropped][:, None]
    )
    assert suppressors.any(dim=1).all()


@PROPERTY
@given(scored_boxes(NON_NEGATIVE_SIDE, distinct_scores=True), st.sampled_from([0.3, 0.5, 0.7]))
def test_nms_equals_torchvision_for_distinct_scores(box_and_scores, threshold):
    box_tensor, scores = box_and_scores
    assert torch.equal(nms(box_tensor, scores, threshold), torchvision.ops.nms(box_tensor, scores, threshold))


# ---------------------------------------------------------------------------------------------
# Box deltas: FCOS's LTRB distances and R-CNN's (dx, dy, dw, dh)
# ---------------------------------------------------------------------------------------------


@st.composite
def boxes_with_inner_points(draw):
    """Boxes with area and a point strictly inside each."""
    box_tensor = draw(boxes(POSITIVE_SIDE, min_size=1))
    fractions = draw(st.lists(st.integers(1, 99), min_size=2 * len(box_tensor), max_size=2 * len(box_tensor)))
    fractions = torch.tensor(fractions, dtype=torch.float32).view(-1, 2) / 100
    points = box_tensor[:, :2] + fractions * (box_tensor[:, 2:] - box_tensor[:, :2])
    return box_tensor, points


@PROPERTY
@given(boxes_with_inner_points(), st.sampled_from([8, 16, 32]))
def test_fcos_deltas_round_trip_and_centerness_in_0_1(box_and_points, stride):
    box_tensor, locations = box_and_points
    deltas = fcos_get_deltas_from_locations(locations, box_tensor, stride)
    assert (deltas >= 0).all()
    assert_close(fcos_apply_deltas_to_locations(deltas, locations, stride), box_tensor, rtol=1e-5, atol=1e-4)
    centerness = fcos_make_centerness_targets(deltas)
    assert (centerness >= 0).all() and (centerness <= 1).all()
    background = torch.full((len(locations), 5), -1.0)
    assert (fcos_get_deltas_from_locations(locations, background, stride) == -1).all()


@PROPERTY
@given(st.data(), st.sampled_from([None, (10.0, 10.0, 5.0, 5.0)]))
def test_rcnn_deltas_round_trip(data, weights):
    anchors = data.draw(boxes(ANCHOR_SIDE, min_size=1))
    gt_boxes = data.draw(boxes(ANCHOR_SIDE, min_size=len(anchors), max_size=len(anchors)))
    deltas = rcnn_get_deltas_from_anchors(anchors, gt_boxes, weights)
    assert torch.isfinite(deltas).all()
    assert_close(rcnn_apply_deltas_to_anchors(deltas, anchors, weights), gt_boxes, rtol=1e-5, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# Matching
# ---------------------------------------------------------------------------------------------

_LOCATIONS = get_fpn_location_coords({level: (128 // s, 128 // s) for level, s in FPN_STRIDES.items()}, FPN_STRIDES)


@PROPERTY
@given(ground_truth())
def test_fcos_matching_invariants(gt):
    matched = fcos_match_locations_to_gt(_LOCATIONS, FPN_STRIDES, gt)
    real = gt[_is_real(gt)]
    for level_index, (level, locations) in enumerate(_LOCATIONS.items()):
        lower, upper = _fcos_size_range(level_index, len(_LOCATIONS), FPN_STRIDES[level])
        x, y = locations[:, None, 0], locations[:, None, 1]
        ltrb = torch.stack([x - real[:, 0], y - real[:, 1], real[:, 2] - x, real[:, 3] - y], dim=-1)  # (HlWl, R, 4)
        largest = ltrb.amax(-1)
        qualifies = (ltrb.amin(-1) > 0) & (largest > lower) & (largest < upper)  # (HlWl, R)
        rows = matched[level]
        foreground = rows[:, 4] >= 0
        assert (rows[~foreground] == -1).all()
        assert torch.equal(foreground, qualifies.any(dim=1))  # background exactly where no box qualifies
        # A foreground location has a qualifying real box, and the smallest one.
        assert _rows_in(rows[foreground], real).all()
        own = (rows[foreground][:, None, :] == real[None]).all(-1) & qualifies[foreground]
        assert own.any(dim=1).all()
        if foreground.any():
            smallest = torch.where(qualifies[foreground], box_area(real[:, :4]), math.inf).amin(dim=1)
            assert torch.equal(box_area(rows[foreground][:, :4]), smallest)


@PROPERTY
@given(
    boxes(POSITIVE_SIDE, min_size=1, max_size=30),
    ground_truth(),
    st.tuples(st.sampled_from([0.0, 0.3, 0.5]), st.sampled_from([0.0, 0.5, 0.7])).filter(lambda t: t[0] <= t[1]),
)
def test_rcnn_matching_invariants(anchors, gt, thresholds):
    low, high = thresholds
    matched = rcnn_match_anchors_to_gt(anchors, gt, thresholds)
    real = gt[_is_real(gt)]
    best_iou = iou(anchors, real[:, :4]).amax(dim=1) if len(real) else torch.full((len(anchors),), -1.0)
    foreground = matched[:, 4] >= 0
    background = (matched == BACKGROUND).all(dim=1)
    neutral = (matched == NEUTRAL).all(dim=1)
    assert (foreground.int() + background.int() + neutral.int() == 1).all()  # exactly one kind each
    assert torch.equal(foreground, best_iou >= high)
    assert torch.equal(background, best_iou < low)
    # Foreground rows are real GT rows (never padding nor an empty box), the best-overlapping one.
    assert _rows_in(matched[foreground], real).all()
    own_iou = iou(anchors[foreground], matched[foreground, :4]).diagonal()
    assert torch.equal(own_iou, best_iou[foreground])


@PROPERTY
@given(boxes(POSITIVE_SIDE, min_size=1, max_size=30), ground_truth())
def test_rcnn_low_quality_matches_give_every_overlapped_box_its_best_anchors(anchors, gt):
    matched = rcnn_match_anchors_to_gt(anchors, gt, (0.3, 0.99), allow_low_quality_matches=True)
    real = gt[_is_real(gt)]
    ious = iou(anchors, real[:, :4])  # (N, R)
    is_best_for_a_box = ((ious == ious.amax(dim=0, keepdim=True)) & (ious > 0)).any(dim=1)
    foreground = matched[:, 4] >= 0
    assert foreground[is_best_for_a_box].all()
    assert _rows_in(matched[foreground], real).all()

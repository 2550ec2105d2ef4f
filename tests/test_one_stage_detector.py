"""Tests for one_stage_detector.py (FCOS)."""

import math
import os
import re

import pytest
import torch
import torchvision
from torch.testing import assert_close

import one_stage_detector
from a4_helper import SyntheticDetection, compute_map, gt_boxes_to_targets
from common import P2_LEVELS, DetectorBackboneWithFPN, get_fpn_location_coords
from one_stage_detector import (
    FCOS,
    IMPROVED_MATCHER,
    FCOSMatcher,
    FCOSPredictionNetwork,
    course_fcos,
    fcos_apply_deltas_to_locations,
    fcos_get_deltas_from_locations,
    fcos_giou_loss,
    fcos_l1_loss,
    fcos_level_candidates,
    fcos_losses,
    fcos_make_centerness_targets,
    fcos_make_targets,
    fcos_match_locations_to_gt,
    fcos_object_balance_weights,
    improved_fcos,
    sigmoid_focal_loss,
)

STRIDES = {"p3": 8, "p4": 16, "p5": 32}
SANITY_BOXES = torch.tensor([[10, 15, 100, 115, 1], [30, 20, 40, 30, 1], [120, 100, 200, 200, 1]], dtype=torch.float32)
SANITY_LOCATIONS = torch.tensor([[30, 40], [32, 29], [125, 150]], dtype=torch.float32)


def _rel_error(x, y):
    return ((x - y).abs().max() / (x.abs() + y.abs()).max().clamp(min=1e-10)).item()


def _padded(rows, pad_to=40):
    gt = torch.full((pad_to, 5), -1.0)
    if rows:
        gt[: len(rows)] = torch.tensor(rows, dtype=torch.float32)
    return gt


def test_deltas_round_trip_sanity_values():
    deltas = fcos_get_deltas_from_locations(SANITY_LOCATIONS, SANITY_BOXES, stride=8)
    # First row: location (30, 40) in [10, 15, 100, 115] -> (20, 25, 70, 75) / 8.
    assert_close(deltas[0], torch.tensor([2.5, 3.125, 8.75, 9.375]))
    boxes = fcos_apply_deltas_to_locations(deltas, SANITY_LOCATIONS, stride=8)
    assert _rel_error(boxes, SANITY_BOXES[:, :4]) == 0


def test_background_deltas_and_box():
    location = torch.tensor([[100.0, 200.0]])
    background = torch.full((1, 5), -1.0)
    deltas = fcos_get_deltas_from_locations(location, background, stride=8)
    assert deltas.tolist() == [[-1.0, -1.0, -1.0, -1.0]]
    assert fcos_apply_deltas_to_locations(deltas, location, stride=8).tolist() == [[100.0, 200.0, 100.0, 200.0]]


def test_apply_deltas_treats_negative_distances_as_zero():
    deltas = torch.tensor([[-2.0, 1.0, 0.5, -0.1]])
    boxes = fcos_apply_deltas_to_locations(deltas, torch.tensor([[40.0, 40.0]]), stride=16)
    # (l, t, r, b) -> (0, 16, 8, 0) pixels around (40, 40).
    assert boxes.tolist() == [[40.0, 24.0, 48.0, 40.0]]


def test_centerness_sanity_values():
    deltas = fcos_get_deltas_from_locations(SANITY_LOCATIONS, SANITY_BOXES, stride=8)[:2]
    deltas = torch.cat([deltas, torch.full((1, 4), -1.0)])
    # Row 0: sqrt(min(20,70) min(25,75) / (max(20,70) max(25,75))) = sqrt(500 / 5250) = 0.30860671.
    # Row 1: LTRB (2, 9, 8, 1): sqrt(2 * 1 / (8 * 9)) = sqrt(1/36) = 0.16666667.
    expected = torch.tensor([0.30860671401, 0.1666666716, -1.0])
    assert_close(fcos_make_centerness_targets(deltas), expected)


def test_prediction_network_shapes_and_bias():
    head = FCOSPredictionNetwork(num_classes=20, in_channels=64, stem_channels=[64, 64])
    feats = {"p3": torch.randn(2, 64, 28, 28), "p4": torch.randn(2, 64, 14, 14), "p5": torch.randn(2, 64, 7, 7)}
    class_logits, boxreg_deltas, centerness_logits = head(feats)
    assert class_logits["p3"].shape == (2, 784, 20)
    assert boxreg_deltas["p4"].shape == (2, 196, 4)
    assert centerness_logits["p5"].shape == (2, 49, 1)
    assert_close(head.pred_cls.bias, torch.full((20,), -math.log(99)))


def test_prediction_network_flattens_row_major():
    head = FCOSPredictionNetwork(num_classes=3, in_channels=8, stem_channels=[8])
    feats = {"p3": torch.randn(1, 8, 3, 5)}
    class_logits = head(feats)[0]["p3"]
    full_map = head.pred_cls(head.stem_cls(feats["p3"]))  # (1, 3, 3, 5)
    # Location index i * Wl + j is row i, column j: index 7 = row 1, column 2.
    assert_close(class_logits[0, 7], full_map[0, :, 1, 2])


@pytest.fixture
def small_fcos():  # built in each test, after the grader's stand-ins are in place (tests/parts_from_data.py)
    torch.manual_seed(0)
    return FCOS(num_classes=5, fpn_channels=32, stem_channels=[32, 32], pretrained=False)


def test_fcos_head_shapes_for_non_square_input(small_fcos):
    small_fcos.train()
    _, class_logits, boxreg_deltas, centerness_logits = small_fcos._run_network(torch.randn(1, 3, 96, 160))
    assert class_logits["p3"].shape == (1, 12 * 20, 5)
    assert boxreg_deltas["p4"].shape == (1, 6 * 10, 4)
    assert centerness_logits["p5"].shape == (1, 3 * 5, 1)


def _locations_for(image_size):
    shapes = {level: (1, 1, image_size // s, image_size // s) for level, s in STRIDES.items()}
    return get_fpn_location_coords(shapes, STRIDES)


def test_match_strictly_inside_and_level_ranges():
    locations = {
        "p3": torch.tensor([[20.0, 20.0], [40.0, 20.0], [4.0, 4.0]]),
        "p4": torch.tensor([[100.0, 50.0]]),
        "p5": torch.tensor([[100.0, 50.0], [150.0, 50.0]]),
    }
    gt = _padded([[0, 0, 40, 40, 3], [0, 0, 200, 100, 1]])
    matched = fcos_match_locations_to_gt(locations, STRIDES, gt)
    # p3: (20, 20) has LTRB (20,20,20,20) in box 0, max 20 in (0, 64) -> box 0.
    # (40, 20) lies on box 0's right edge (r = 0, not strictly inside); in box 1 its max is 160 -> not p3.
    # (4, 4): box 0 max 36 -> box 0 (box 1 also contains it, but max 196 is out of p3's range).
    assert matched["p3"][:, 4].tolist() == [3, -1, 3]
    # p4 (64, 128): (100, 50) in box 1 has LTRB (100, 50, 100, 50), max 100 -> box 1.
    assert matched["p4"].tolist() == [[0, 0, 200, 100, 1]]
    # p5 (128, inf): (100, 50) max 100 is too small; (150, 50) has l = 150 -> box 1.
    assert matched["p5"][:, 4].tolist() == [-1, 1]
    assert matched["p5"][0].tolist() == [-1, -1, -1, -1, -1]


def test_center_sampling_keeps_the_locations_near_the_centre():
    locations = _locations_for(64)  # p3: 8 x 8 locations at 4, 12, ..., 60
    gt = _padded([[0, 0, 64, 64, 2], [40, 40, 50, 50, 1]])
    everywhere = fcos_match_locations_to_gt(locations, STRIDES, gt)
    # Without center sampling every p3 location strictly inside [0, 0, 64, 64] matches it (all 64; the
    # small box takes the 1 location inside it, (44, 44), as the smaller box).
    assert (everywhere["p3"][:, 4] == 2).sum() == 63 and (everywhere["p3"][:, 4] == 1).sum() == 1
    sampled = fcos_match_locations_to_gt(locations, STRIDES, gt, center_sampling_radius=1.5)
    # Radius 1.5 * 8 = 12 px around the centre (32, 32): |x - 32| < 12 keeps x = 28 and 36 (20 and 44
    # are exactly 12 away), so the 2 x 2 locations (28|36, 28|36). The 10-px box keeps (44, 44): it is
    # 1 px from its centre (45, 45).
    expected = {(28.0, 28.0): 2, (36.0, 28.0): 2, (28.0, 36.0): 2, (36.0, 36.0): 2, (44.0, 44.0): 1}
    positive = sampled["p3"][:, 4] >= 0
    found = {tuple(xy.tolist()): int(c) for xy, c in zip(locations["p3"][positive], sampled["p3"][positive, 4])}
    assert found == expected
    assert (sampled["p4"][:, 4] == -1).all() and (sampled["p5"][:, 4] == -1).all()


def test_prediction_network_group_norm_and_learnable_scales():
    torch.manual_seed(0)
    head = FCOSPredictionNetwork(3, 16, [16, 16], group_norm=True, learnable_scales=True)
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in head.modules()) == 4  # 2 stems x 2 convs
    assert_close(head.scales.detach(), torch.ones(3))
    feats = {level: torch.randn(2, 16, 8 // (2**i), 8 // (2**i)) for i, level in enumerate(STRIDES)}
    before = head(feats)[1]
    with torch.no_grad():
        head.scales[1] = 2.5  # the p4 scale
    after = head(feats)[1]
    assert_close(after["p4"], 2.5 * before["p4"])
    assert_close(after["p3"], before["p3"])
    # The course's head has neither, and its deltas may be negative; nonnegative_deltas clamps them at 0.
    plain = FCOSPredictionNetwork(3, 16, [16, 16])
    assert plain.scales is None and not any(isinstance(m, torch.nn.GroupNorm) for m in plain.modules())
    raw = plain(feats)[1]["p3"]
    plain.nonnegative_deltas = True
    assert (raw < 0).any()
    assert_close(plain(feats)[1]["p3"], raw.clamp(min=0))


def test_boxes_start_one_stride_wide_so_that_the_box_loss_has_a_gradient():
    # With a ReLU on the box output, the bias starts at 1: each side one stride from the location.
    relu_head = FCOSPredictionNetwork(3, 16, [16], nonnegative_deltas=True)
    assert_close(relu_head.pred_box.bias.detach(), torch.ones(4))
    assert_close(FCOSPredictionNetwork(3, 16, [16]).pred_box.bias.detach(), torch.zeros(4))  # the course's head
    # A fresh default FCOS: a 16-px box around each location of a 24-px object overlaps it, so the GIoU
    # loss is well under 1 and its gradient reaches the box bias. With the bias at 0 the boxes start as
    # points and the same batch gives 0.9997 (the dead box head of docs/data.md).
    torch.manual_seed(0)
    fcos = FCOS(3, 16, [16, 16], pretrained=False)
    losses = fcos(torch.rand(1, 3, 64, 64), torch.tensor([[[20.0, 20, 44, 44, 1]]]))
    assert losses["loss_box"] < 0.9
    losses["loss_box"].backward()
    assert fcos.pred_net.pred_box.bias.grad.abs().sum() > 1e-3


def test_fcos_defaults_are_the_improved_parts_and_course_fcos_the_original():
    improved = FCOS(3, 16, [16], pretrained=False)
    assert (improved.box_loss, improved.matcher, improved.object_balance) == (fcos_giou_loss, FCOSMatcher(1.5), 0.5)
    assert improved.matcher is IMPROVED_MATCHER and improved.backbone.fine_p3
    assert improved.pred_net.scales is not None and improved.pred_net.nonnegative_deltas
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in improved.pred_net.modules()) == 2  # 2 stems x 1 conv
    course = course_fcos(3, 16, [16], pretrained=False)
    assert (course.box_loss, course.matcher, course.object_balance) == (fcos_l1_loss, FCOSMatcher(None), 0.0)
    assert course.pred_net.scales is None and not course.pred_net.nonnegative_deltas and not course.backbone.fine_p3
    # The course's state dict has no GroupNorm and no scales, so checkpoints of it still load.
    assert not any("scales" in key or "c2_to_p3" in key for key in course.state_dict())


def test_fcos_from_parts_uses_the_parts_it_is_given():
    backbone = DetectorBackboneWithFPN(16, pretrained=False, levels=P2_LEVELS)
    head = FCOSPredictionNetwork(4, 16, [16], num_levels=4)
    matcher = FCOSMatcher(center_sampling_radius=2.0)
    fcos = FCOS(4, backbone=backbone, head=head, matcher=matcher, box_loss=fcos_l1_loss, channels_last=False)
    assert fcos.backbone is backbone and fcos.pred_net is head and fcos.matcher is matcher
    # Only the given parts are used: no FPN or stem channels are needed, and the losses come out finite.
    losses = fcos(torch.rand(1, 3, 64, 64), torch.tensor([[[8.0, 8, 40, 30, 2]]]))
    assert all(torch.isfinite(value) for value in losses.values())
    # A part that is not given needs the number it is built from.
    with pytest.raises(ValueError, match="stem_channels"):
        FCOS(4, backbone=DetectorBackboneWithFPN(16, pretrained=False))
    with pytest.raises(ValueError, match="fpn_channels"):
        FCOS(4, head=FCOSPredictionNetwork(4, 16, [16]))
    with pytest.raises(TypeError):  # options are keyword-only: no flag by position
        FCOSPredictionNetwork(4, 16, [16], True)


def test_improved_fcos_with_p2_builds_a_scale_per_level():
    fcos = improved_fcos(3, 16, [16], pretrained=False, fpn_levels=P2_LEVELS)
    assert fcos.backbone.levels == P2_LEVELS and fcos.pred_net.scales.shape == (4,)
    assert fcos.backbone.fine_p3 and fcos.object_balance == 0.5


def test_matcher_is_fcos_matching_with_its_radius():
    locations = _locations_for(64)
    gt = _padded([[0, 0, 64, 64, 2], [40, 40, 50, 50, 1]])
    for radius in (None, 1.5):
        expected = fcos_match_locations_to_gt(locations, STRIDES, gt, center_sampling_radius=radius)
        found = FCOSMatcher(radius)(locations, STRIDES, gt)
        assert all(torch.equal(found[level], expected[level]) for level in STRIDES)


def test_a_matcher_with_half_size_ranges_moves_objects_one_level_coarser_and_keeps_its_centre_region():
    # A location 50 px from its box's farthest side: p3 under the paper's ranges (0, 64), p4 under half
    # of them (32, 64). A location 1.4 strides from a box's centre stays inside radius 1.5 either way.
    centre = {"p3": torch.tensor([[60.0, 60.0]]), "p4": torch.tensor([[60.0, 60.0]]), "p5": torch.zeros(0, 2)}
    box = _padded([[10, 10, 110, 110, 3]])
    paper, half = FCOSMatcher(1.5)(centre, STRIDES, box), FCOSMatcher(1.5, size_range_scale=0.5)(centre, STRIDES, box)
    assert (paper["p3"][0, 4].item(), paper["p4"][0, 4].item()) == (3, -1)
    assert (half["p3"][0, 4].item(), half["p4"][0, 4].item()) == (-1, 3)
    off_centre = {"p3": torch.tensor([[47.0, 36.0]]), "p4": torch.zeros(0, 2), "p5": torch.zeros(0, 2)}
    small_box = _padded([[28, 28, 52, 52, 1]])  # centre (40, 40): 7 px = 0.9 strides in x, 4 px in y
    for scale in (1.0, 0.5):  # its farthest side is 19 px away: inside p3's range at both scales
        matched = FCOSMatcher(1.5, size_range_scale=scale)(off_centre, STRIDES, small_box)
        assert matched["p3"][0, 4].item() == 1, scale
    far = {"p3": torch.tensor([[51.0, 40.0]]), "p4": torch.zeros(0, 2), "p5": torch.zeros(0, 2)}  # 1.4 strides
    for scale in (1.0, 0.5):
        assert FCOSMatcher(1.0, size_range_scale=scale)(far, STRIDES, small_box)["p3"][0, 4].item() == -1, scale


def test_match_boundary_of_level_ranges_is_exclusive():
    # Location (64, 64) in [0, 0, 128, 128]: LTRB all 64, exactly the p3/p4 boundary -> neither level.
    locations = {"p3": torch.tensor([[64.0, 64.0]]), "p4": torch.tensor([[64.0, 64.0]]), "p5": torch.zeros(0, 2)}
    matched = fcos_match_locations_to_gt(locations, STRIDES, _padded([[0, 0, 128, 128, 2]]))
    assert matched["p3"][:, 4].tolist() == [-1]
    assert matched["p4"][:, 4].tolist() == [-1]
    assert matched["p5"].shape == (0, 5)


@pytest.mark.parametrize("order", [[0, 1], [1, 0]])
def test_match_ties_go_to_smallest_box(order):
    rows = [[0, 0, 60, 60, 0], [10, 10, 50, 50, 2]]  # areas 3600 and 1600
    locations = {"p3": torch.tensor([[30.0, 30.0]]), "p4": torch.zeros(0, 2), "p5": torch.zeros(0, 2)}
    matched = fcos_match_locations_to_gt(locations, STRIDES, _padded([rows[i] for i in order]))
    assert matched["p3"].tolist() == [[10, 10, 50, 50, 2]]


def test_match_padding_never_matches_even_when_it_covers_locations():
    locations = _locations_for(64)
    gt = _padded([[0, 0, 64, 64, -1]])  # class -1 marks padding, whatever its coordinates say
    matched = fcos_match_locations_to_gt(locations, STRIDES, gt)
    for level_matched in matched.values():
        assert (level_matched == -1).all()


def test_match_batch_equals_per_image_and_handles_empty_gt():
    locations = _locations_for(128)
    gt = torch.stack(
        [
            _padded([[8, 8, 60, 50, 1], [30, 20, 120, 126, 4], [0, 0, 128, 128, 0]]),
            _padded([]),
            _padded([[50, 60, 70, 90, 3]]),
        ]
    )
    batched = fcos_match_locations_to_gt(locations, STRIDES, gt)
    for b in range(3):
        single = fcos_match_locations_to_gt(locations, STRIDES, gt[b])
        for level in STRIDES:
            assert torch.equal(batched[level][b], single[level])
    assert all((batched[level][1] == -1).all() for level in STRIDES)
    # The full-image box (max distance 64..124 at most locations) lands on p4 and p5, never p3.
    assert (batched["p3"][0][:, 4] == 0).sum() == 0
    assert (batched["p4"][0][:, 4] == 0).sum() > 0
    no_rows = fcos_match_locations_to_gt(locations, STRIDES, torch.zeros(0, 5))
    assert (no_rows["p3"] == -1).all() and no_rows["p3"].shape == (256, 5)


def test_giou_loss_equals_torchvision_for_valid_boxes():
    generator = torch.Generator().manual_seed(0)
    pred = torch.rand(50, 4, generator=generator) * 5
    target = torch.rand(50, 4, generator=generator) * 5 + 0.1
    location = torch.rand(50, 2, generator=generator) * 100
    pred_boxes = fcos_apply_deltas_to_locations(pred, location, stride=8)
    target_boxes = fcos_apply_deltas_to_locations(target, location, stride=8)
    expected = torchvision.ops.generalized_box_iou_loss(pred_boxes, target_boxes)
    assert_close(fcos_giou_loss(pred, target), expected, rtol=1e-5, atol=1e-5)
    assert_close(fcos_giou_loss(target, target), torch.zeros(50), rtol=0, atol=1e-6)


@pytest.mark.parametrize("box_loss", [fcos_l1_loss, fcos_giou_loss])
def test_losses_finite_with_and_without_boxes(small_fcos, box_loss):
    small_fcos.train()
    small_fcos.box_loss = box_loss
    images = torch.randn(2, 3, 64, 64)
    gt = torch.stack([_padded([[8, 8, 40, 48, 1]]), _padded([])])
    losses = small_fcos(images, gt)
    assert set(losses) == {"loss_cls", "loss_box", "loss_ctr"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())

    no_boxes = small_fcos(images, torch.stack([_padded([]), _padded([])]))
    assert torch.isfinite(no_boxes["loss_cls"]) and no_boxes["loss_cls"] > 0
    assert no_boxes["loss_box"].item() == 0 and no_boxes["loss_ctr"].item() == 0
    sum(no_boxes.values()).backward()  # gradients flow even with no foreground
    small_fcos.zero_grad()
    small_fcos.box_loss = fcos_l1_loss


@pytest.mark.parametrize("box_loss", [fcos_l1_loss, fcos_giou_loss])
def test_losses_equal_the_terms_of_the_foreground_locations_alone(box_loss):
    """The dense, masked loss equals the textbook version that first gathers the foreground."""
    locations = get_fpn_location_coords({"p3": (8, 8), "p4": (4, 4), "p5": (2, 2)}, STRIDES)
    gt = torch.stack([_padded([[4, 6, 40, 50, 1], [20, 2, 60, 30, 0]]), _padded([[10, 10, 60, 62, 2]])])
    matched, targets = fcos_make_targets(locations, STRIDES, gt)
    generator = torch.Generator().manual_seed(0)
    cls_logits, box_deltas, ctr_logits = (
        torch.randn(2, 84, n, generator=generator).squeeze(-1).requires_grad_() for n in (3, 4, 1)
    )
    losses = fcos_losses(matched, targets, cls_logits, box_deltas, ctr_logits, box_loss=box_loss)
    fg = matched[..., 4] >= 0
    num_fg = fg.sum()
    assert num_fg > 10
    box_terms = (
        fcos_giou_loss(box_deltas[fg], targets[fg])
        if box_loss is fcos_giou_loss
        else 0.25 * (box_deltas[fg] - targets[fg]).abs().sum(dim=1)
    )
    expected_box = box_terms.sum() / num_fg
    ctr = torch.nn.functional.binary_cross_entropy_with_logits(
        ctr_logits[fg], fcos_make_centerness_targets(targets[fg]), reduction="sum"
    )
    assert_close(losses["loss_box"], expected_box)
    assert_close(losses["loss_ctr"], ctr / num_fg)
    grads = torch.autograd.grad(losses["loss_box"] + losses["loss_ctr"], (box_deltas, ctr_logits))
    expected_grads = torch.autograd.grad(expected_box + ctr / num_fg, (box_deltas, ctr_logits))
    for grad, expected in zip(grads, expected_grads):
        assert_close(grad, expected)
    assert grads[0][~fg].abs().max() == 0  # background locations get no box gradient


def test_l1_box_loss_and_fcos_losses_hand_computed():
    # One image, two foreground locations at stride 8 and one background location.
    # Location A, deltas (1, 1, 1, 1): centerness sqrt(1 * 1 / (1 * 1)) = 1.
    # Location B, deltas (1, 3, 3, 1): centerness sqrt(1 * 1 / (3 * 3)) = 1/3.
    targets = torch.tensor([[[1.0, 1, 1, 1], [1.0, 3, 3, 1], [-1.0, -1, -1, -1]]])
    matched = torch.tensor([[[0.0, 0, 16, 16, 0], [0.0, 0, 32, 32, 0], [-1.0, -1, -1, -1, -1]]])
    pred = torch.tensor([[[1.0, 1, 1, 1], [1.0, 3, 3, 3], [5.0, 5, 5, 5]]])  # B is off by 2 on one side
    cls_logits, ctr_logits = torch.zeros(1, 3, 1), torch.zeros(1, 3)
    # L1 terms, 0.25 x the summed absolute differences: A 0, B 0.25 * 2 = 0.5.
    assert_close(fcos_l1_loss(pred[0, :2], targets[0, :2]), torch.tensor([0.0, 0.5]))
    losses = fcos_losses(matched, targets, cls_logits, pred, ctr_logits, box_loss=fcos_l1_loss)
    # Box: (0 + 0.5) / 2 foreground locations = 0.25; the background's (5, 5, 5, 5) is not counted.
    assert_close(losses["loss_box"], torch.tensor(0.25))
    # Centerness: BCE at logit 0 is ln 2 for any target, so (ln 2 + ln 2) / 2 = ln 2.
    assert_close(losses["loss_ctr"], torch.tensor(math.log(2)))
    # Class: at logit 0, p = 1/2, so each focal term is alpha_t * (1/2)^2 * ln 2, alpha_t 0.25 for the two
    # foreground locations (target 1) and 0.75 for the background one: (0.25 + 0.25 + 0.75) / 4 * ln 2
    # = 0.3125 ln 2 in all, over 2 foreground locations: 0.15625 ln 2.
    assert_close(losses["loss_cls"], torch.tensor(0.15625 * math.log(2)))
    empty = fcos_losses(matched[:, 2:], targets[:, 2:], cls_logits[:, 2:], pred[:, 2:], ctr_logits[:, 2:])
    assert empty["loss_box"] == 0 and empty["loss_ctr"] == 0  # no foreground at all: zero, not NaN


@pytest.mark.parametrize("label", [5.0, 7.0, -2.0, -1.0, 1.5])
def test_bad_class_label_raises_value_error(small_fcos, label):
    small_fcos.train()
    gt = _padded([[8, 8, 40, 48, label]])[None]
    with pytest.raises(ValueError, match=f"{label:g}.*K = 5"):
        small_fcos(torch.randn(1, 3, 64, 64), gt)


def test_predict_batch_and_inference_triple(small_fcos):
    small_fcos.eval()

    def spread(module, inputs, outputs):
        # Spread the untrained scores apart so that no two candidates tie: the class logits as if pred_cls's weights
        # were 300 times larger (its bias is -log 99).
        class_logits, boxreg_deltas, centerness_logits = outputs
        class_logits = {level: 300 * logits + 299 * math.log(99) for level, logits in class_logits.items()}
        return class_logits, boxreg_deltas, centerness_logits

    small_fcos.pred_net.register_forward_hook(spread)
    images = torch.randn(3, 3, 64, 96)
    detections = small_fcos.predict(images, score_thresh=0.0, nms_thresh=0.5)
    assert len(detections) == 3
    for detection in detections:
        assert set(detection) == {"boxes", "labels", "scores"}
        assert 0 < len(detection["boxes"]) <= small_fcos.max_detections
        assert detection["labels"].dtype == torch.long
        assert (detection["scores"][:-1] >= detection["scores"][1:]).all()
        boxes = detection["boxes"]
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 96).all() and (boxes[:, 3] <= 64).all()
    # One image through predict equals the same image inside the batch.
    single = small_fcos.predict(images[1:2], score_thresh=0.0, nms_thresh=0.5)[0]
    assert_close(single["boxes"], detections[1]["boxes"])
    assert_close(single["scores"], detections[1]["scores"])

    boxes, classes, scores = small_fcos(images[:1], test_score_thresh=0.0, test_nms_thresh=0.5)
    assert boxes.shape[1] == 4 and classes.shape == scores.shape == (len(boxes),)
    with pytest.raises(ValueError, match="predict"):
        small_fcos(images)


def test_level_candidates_hand_computed():
    # Three p3 locations of a 16 x 16 image, K = 2, centerness logit 100 (probability 1), so each
    # score is sqrt(class probability): loc 0 (0.5, 0.2), loc 1 (0.8, 0.3), loc 2 (0.1, 0.7).
    probs = torch.tensor([[[0.25, 0.04], [0.64, 0.09], [0.01, 0.49]]])
    locations = torch.tensor([[4.0, 4.0], [12.0, 4.0], [20.0, 4.0]])
    boxes, labels, scores = fcos_level_candidates(
        torch.logit(probs), torch.ones(1, 3, 4), torch.full((1, 3, 1), 100.0), locations, 8, (16, 16), topk=3
    )
    assert_close(scores, torch.tensor([[0.8, 0.7, 0.5]]))
    assert labels.tolist() == [[0, 1, 0]]
    # Deltas of 1 stride: location +- 8 px, then clipped to the 16 x 16 image, e.g. (12, 4) -> (4, -4, 20, 12)
    # -> (4, 0, 16, 12).
    assert boxes.tolist() == [[[4.0, 0.0, 16.0, 12.0], [12.0, 0.0, 16.0, 12.0], [0.0, 0.0, 12.0, 12.0]]]
    # topk past the level's HlWl * K = 6 pairs keeps all six.
    assert fcos_level_candidates(
        torch.logit(probs), torch.ones(1, 3, 4), torch.zeros(1, 3, 1), locations, 8, (16, 16), topk=100
    )[0].shape == (1, 6, 4)


def test_predict_respects_score_threshold(small_fcos):
    small_fcos.eval()
    # The class bias starts at -log(99), so untrained scores are about sqrt(0.01 * 0.5) = 0.07.
    detections = small_fcos.predict(torch.randn(1, 3, 64, 64), score_thresh=0.5)
    assert len(detections[0]["scores"]) == 0


def test_hello(capsys):
    one_stage_detector.hello_one_stage_detector()
    assert capsys.readouterr().out.strip() == "Hello from one_stage_detector.py!"


def test_fcos_overfits_a_handful_of_synthetic_images():
    """Learning test: from random weights, FCOS memorises 4 tiny images (21 objects, 6 classes)."""
    torch.manual_seed(0)
    data = SyntheticDetection("train", num_images=4, image_size=64, seed=0)
    images = torch.stack([data[i][1] for i in range(len(data))])
    gt_boxes = torch.stack([data[i][2] for i in range(len(data))])
    detector = FCOS(data.num_classes, fpn_channels=32, stem_channels=[32, 32], pretrained=False)
    iterations = 400
    optimizer = torch.optim.AdamW(detector.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, [int(0.7 * iterations), int(0.9 * iterations)], 0.1)
    totals = []
    detector.train()
    for _ in range(iterations):
        total = sum(detector(images, gt_boxes).values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        schedule.step()
        totals.append(total.item())

    detector.eval()
    predictions = detector.predict(images, score_thresh=0.05, nms_thresh=0.5)
    result = compute_map(predictions, gt_boxes_to_targets(gt_boxes), data.num_classes)
    print(f"FCOS overfit: loss {totals[0]:.3f} -> {totals[-1]:.3f}, mAP@0.5 {result['map']:.3f}")
    assert totals[-1] < 0.5 * totals[0]
    assert result["map"] >= 0.9


def test_p2_size_ranges_hand_worked():
    """With p2 (stride 4) in front, p2 takes largest distances in (0, 32) and p3 (32, 64)."""
    strides = {"p2": 4, **STRIDES}
    shapes = {level: (1, 1, 128 // s, 128 // s) for level, s in strides.items()}
    locations = get_fpn_location_coords(shapes, strides)
    # A 10 x 10 box (largest distance < 10) and a 50 x 50 one centred on (90, 90): largest distance 25
    # at the centre, up to 50 towards the corners, so it lands on p2 near its centre and p3 farther out.
    gt = _padded([[20, 20, 30, 30, 1], [65, 65, 115, 115, 2]])
    matched = fcos_match_locations_to_gt(locations, strides, gt)
    small_on = {level: int((m[:, 4] == 1).sum()) for level, m in matched.items()}
    # p2 centres at 4k + 2: x, y in {22, 26} lie inside (20, 30): 2 x 2 locations; p3's 20 and 28: 20 is
    # on the border (not strictly inside), so only 28: 1 location, but p3 starts at distance 32.
    assert small_on == {"p2": 4, "p3": 0, "p4": 0, "p5": 0}
    large = {level: m[m[:, 4] == 2] for level, m in matched.items()}
    assert len(large["p2"]) > 0 and len(large["p3"]) > 0 and len(large["p4"]) == 0
    for level, lower, upper in (("p2", 0, 32), ("p3", 32, 64)):
        in_box = matched[level][:, 4] == 2
        x, y = locations[level][in_box].unbind(dim=1)
        largest = torch.stack([x - 65, y - 65, 115 - x, 115 - y]).amax(dim=0)
        assert ((largest > lower) & (largest < upper)).all()
    # Without p2 the same small box lives on p3, at its one location inside: (28, 28).
    course = fcos_match_locations_to_gt(_locations_for(128), STRIDES, gt)
    assert int((course["p3"][:, 4] == 1).sum()) == 1


def test_fcos_with_p2_trains_and_predicts_at_stride_4():
    fcos = improved_fcos(5, 16, [16], pretrained=False, fpn_levels=("p2", "p3", "p4", "p5"))
    assert fcos.pred_net.scales.shape == (4,)  # one learnable scale per level
    images = torch.rand(2, 3, 64, 64)
    gt = torch.stack([_padded([[8, 8, 18, 20, 1], [20, 12, 60, 60, 3]], 2), _padded([], 2)])
    losses = fcos(images, gt)
    assert all(torch.isfinite(v) and v >= 0 for v in losses.values())
    sum(losses.values()).backward()
    assert fcos.backbone.fpn_params["lateral_p2"].weight.grad.abs().sum() > 0
    fcos.eval()
    with torch.no_grad():  # spread the untrained scores apart so that candidates exist on every level
        fcos.pred_net.pred_cls.weight.mul_(300)
    locations, *_ = fcos._run_network(images)
    assert [len(v) for v in locations.values()] == [256, 64, 16, 4]
    detections = fcos.predict(images, score_thresh=0.0)
    assert all(0 < len(d["boxes"]) <= fcos.max_detections for d in detections)


def test_object_balance_weights_hand_worked():
    # Image 0: object a has 1 location, object b 4, one location is background. Image 1: object c has 2;
    # a second copy of c's row (annotated twice) is the same object; the padding row matches nothing.
    a, b, c, bg = [0.0, 0, 8, 8, 0], [0.0, 0, 40, 40, 1], [8.0, 8, 30, 30, 2], [-1.0] * 5
    matched = torch.tensor([[a, b, b, b, b, bg, bg], [c, c, bg, bg, bg, bg, bg]])
    gt = torch.tensor([[a, b, bg], [c, c, bg]])
    # power 1: every object counts once. 3 objects share the 7 foreground locations: 7/3 each, so
    # a's location gets 7/3, b's four 7/12 each, c's two 7/6 each.
    weights = fcos_object_balance_weights(matched, gt, 1.0)
    expected = torch.tensor([[7 / 3, *[7 / 12] * 4, 0, 0], [7 / 6, 7 / 6, 0, 0, 0, 0, 0]])
    assert_close(weights, expected)
    # power 1/2: raw weights 1, 1/2 (x4), 1/sqrt(2) (x2), sum 3 + sqrt(2), scaled to add up to 7.
    half = fcos_object_balance_weights(matched, gt, 0.5)
    scale = 7 / (3 + math.sqrt(2))
    assert_close(half[0, :5], scale * torch.tensor([1, 0.5, 0.5, 0.5, 0.5]))
    assert_close(half[1, :2], scale * torch.tensor([1 / math.sqrt(2)] * 2))
    assert_close(fcos_object_balance_weights(matched, gt, 0.0), (matched[..., 4] >= 0).float())  # FCOS's
    no_rows = fcos_object_balance_weights(torch.full((2, 7, 5), -1.0), gt[:, :0], 1.0)  # no rows at all
    assert no_rows.shape == (2, 7) and (no_rows == 0).all()


@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (0.6, 1.5), (0.5, 0.0)])
def test_sigmoid_focal_loss_equals_torchvision_values_and_gradients(alpha, gamma):
    generator = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(2, 300, 5, generator=generator)).requires_grad_()
    targets = (torch.rand(2, 300, 5, generator=generator) < 0.2).float()
    ours = sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma)
    theirs = torchvision.ops.sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="none")
    assert ours.shape == logits.shape
    assert_close(ours, theirs)
    upstream = torch.rand(ours.shape, generator=generator)  # a weighted sum, so every element's gradient counts
    (ours_grad,) = torch.autograd.grad(ours, logits, upstream)
    (theirs_grad,) = torch.autograd.grad(theirs, logits, upstream)
    assert_close(ours_grad, theirs_grad)


def test_foreground_weights_scale_each_foreground_term_hand_computed():
    # Two foreground locations (L1 box terms 0 and 0.5, as in the L1 test) and one background
    # location. Weights 0.5 and 1.5 (they add up to the 2 foreground locations).
    targets = torch.tensor([[[1.0, 1, 1, 1], [1.0, 3, 3, 1], [-1.0, -1, -1, -1]]])
    matched = torch.tensor([[[0.0, 0, 16, 16, 0], [0.0, 0, 32, 32, 0], [-1.0, -1, -1, -1, -1]]])
    pred = torch.tensor([[[1.0, 1, 1, 1], [1.0, 3, 3, 3], [5.0, 5, 5, 5]]])
    cls_logits, ctr_logits = torch.tensor([[[2.0], [-1.0], [0.5]]]), torch.zeros(1, 3)
    weights = torch.tensor([[0.5, 1.5, 0.0]])
    plain = fcos_losses(matched, targets, cls_logits, pred, ctr_logits, box_loss=fcos_l1_loss)
    weighted = fcos_losses(
        matched, targets, cls_logits, pred, ctr_logits, box_loss=fcos_l1_loss, foreground_weights=weights
    )
    # Box: (0.5 * 0 + 1.5 * 0.5) / 2 = 0.375 (unweighted 0.25).
    assert_close(weighted["loss_box"], torch.tensor(0.375))
    # Centerness targets 1 and 1/3 at logit 0: BCE is ln 2 for both, so (0.5 + 1.5) ln 2 / 2 = ln 2, as unweighted.
    assert_close(weighted["loss_ctr"], plain["loss_ctr"])
    assert_close(weighted["loss_ctr"], torch.tensor(math.log(2)))
    # Class: the focal terms of the two foreground locations are scaled, the background one is not.
    focal = torchvision.ops.sigmoid_focal_loss(cls_logits, torch.tensor([[[1.0], [1.0], [0.0]]]), reduction="none")
    expected = (0.5 * focal[0, 0] + 1.5 * focal[0, 1] + focal[0, 2]).sum() / 2
    assert_close(weighted["loss_cls"], expected)


def test_fcos_defaults_balance_objects_and_feed_c2_into_p3():
    fcos = FCOS(5, 16, [16], pretrained=False)
    assert fcos.object_balance == 0.5 and fcos.backbone.fine_p3
    assert "backbone.fpn_params.c2_to_p3.weight" in fcos.state_dict()
    course = course_fcos(5, 16, [16], pretrained=False)
    assert course.object_balance == 0.0 and "fpn_params.c2_to_p3.weight" not in course.backbone.state_dict()


def test_the_docs_example_of_fcos_from_parts_builds_the_default_twice():
    """docs/python_api.md, 'FCOS from parts': the hand-built parts are today's default."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    section = open(os.path.join(root, "docs", "python_api.md")).read().split("## FCOS from parts", 1)[1]
    namespace = {}
    exec(compile(re.search(r"```python\n(.*?)```", section, re.S).group(1), "docs/python_api.md", "exec"), namespace)
    default, same = namespace["default"], namespace["same"]
    assert default.state_dict().keys() == same.state_dict().keys()
    assert (default.matcher, default.box_loss, default.object_balance) == (same.matcher, same.box_loss, 0.5)
    assert namespace["course"].box_loss is fcos_l1_loss and len(namespace["with_p2"].backbone.levels) == 4

"""Instructor-only tests: more hand-worked cases for the parts a student writes. tools/make_assignment.py
leaves this folder out of the student release; tools/grade.py runs it when it is there (tools/parts.json
names which test grades which part)."""

import math

import torch
import torchvision
from conftest import gt_batch
from torch import nn
from torch.testing import assert_close

from common import get_fpn_location_coords, iou, nms
from one_stage_detector import (
    FCOS,
    FCOSPredictionNetwork,
    fcos_apply_deltas_to_locations,
    fcos_get_deltas_from_locations,
    fcos_giou_loss,
    fcos_l1_loss,
    fcos_level_candidates,
    fcos_losses,
    fcos_make_centerness_targets,
    fcos_match_locations_to_gt,
    sigmoid_focal_loss,
)
from two_stage_detector import (
    RPN,
    FasterRCNN,
    RPNPredictionNetwork,
    _sample_fg_bg_masks,
    generate_fpn_anchors,
    rcnn_apply_deltas_to_anchors,
    rcnn_get_deltas_from_anchors,
    rcnn_match_anchors_to_gt,
    sample_rpn_training,
)

STRIDES = {"p3": 8, "p4": 16, "p5": 32}
BG = [-1.0] * 5
NEUTRAL = [-1e8] * 5


class _StubBackbone(nn.Module):
    """What FasterRCNN reads from a backbone (channels and strides); its features are zeros of the right shapes."""

    out_channels = 4
    fpn_strides = dict(STRIDES)

    def forward(self, images):
        height, width = images.shape[-2:]
        return {level: images.new_zeros(len(images), 4, height // s, width // s) for level, s in STRIDES.items()}


def test_locations_of_a_non_square_level():
    # A 2 x 3 level of stride 16 (an input 32 high and 48 wide): row-major, x along the width.
    locations = get_fpn_location_coords({"p4": (1, 8, 2, 3)}, {"p4": 16})["p4"]
    expected = torch.tensor([[8.0, 8.0], [24.0, 8.0], [40.0, 8.0], [8.0, 24.0], [24.0, 24.0], [40.0, 24.0]])
    assert torch.equal(locations, expected)


def test_iou_of_touching_and_nested_boxes():
    boxes1 = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    boxes2 = torch.tensor(
        [
            [10.0, 0.0, 20.0, 10.0],  # touches along an edge: no overlap
            [2.0, 2.0, 7.0, 7.0],  # nested: 25 / 100
            [5.0, 0.0, 15.0, 10.0],  # half overlapping: 50 / 150
        ]
    )
    torch.testing.assert_close(iou(boxes1, boxes2), torch.tensor([[0.0, 0.25, 1.0 / 3.0]]))


# ----------------------------------------------------------------------------------------------
# iou
# ----------------------------------------------------------------------------------------------


def test_iou_of_wide_and_tall_boxes_is_m_by_n():
    boxes1 = torch.tensor([[0.0, 0, 20, 10], [5.0, 2, 15, 4]])  # areas 200 and 20: neither is square
    boxes2 = torch.tensor([[10.0, 0, 30, 10], [0.0, 0, 10, 40], [0.0, 5, 20, 10]])  # areas 200, 400, 100
    # Row 0: 10*10 / (200+200-100) = 1/3; 10*10 / (200+400-100) = 1/5; 20*5 / (200+100-100) = 1/2.
    # Row 1: 5*2 / (20+200-10) = 1/21; 5*2 / (20+400-10) = 1/41; no overlap (y 2..4 vs 5..10) = 0.
    expected = torch.tensor([[1 / 3, 1 / 5, 1 / 2], [1 / 21, 1 / 41, 0.0]])
    assert_close(iou(boxes1, boxes2), expected)
    assert_close(iou(boxes2, boxes1), expected.T)


# ----------------------------------------------------------------------------------------------
# fcos_head
# ----------------------------------------------------------------------------------------------


def test_fcos_head_flattens_box_and_centerness_of_both_images_row_major_on_non_square_levels():
    head = FCOSPredictionNetwork(num_classes=3, in_channels=8, stem_channels=[8, 8])
    # Two different images; levels of 2 x 5 and 1 x 3 locations.
    feats = {"p3": torch.randn(2, 8, 2, 5), "p4": torch.randn(2, 8, 1, 3)}
    class_logits, boxreg_deltas, centerness_logits = head(feats)
    # Two stems of their own (no shared weights); box and centerness share the box stem; 3x3 output convs.
    assert head.stem_cls is not head.stem_box
    assert not {id(p) for p in head.stem_cls.parameters()} & {id(p) for p in head.stem_box.parameters()}
    assert [m.kernel_size for m in head.stem_box if isinstance(m, nn.Conv2d)] == [(3, 3), (3, 3)]
    for conv, channels in ((head.pred_cls, 3), (head.pred_box, 4), (head.pred_ctr, 1)):
        assert conv.kernel_size == (3, 3) and conv.out_channels == channels
    for level, f in feats.items():
        H, W = f.shape[-2:]
        cls_map = head.pred_cls(head.stem_cls(f))
        box_features = head.stem_box(f)
        box_map, ctr_map = head.pred_box(box_features), head.pred_ctr(box_features)
        assert class_logits[level].shape == (2, H * W, 3)
        assert boxreg_deltas[level].shape == (2, H * W, 4)
        assert centerness_logits[level].shape == (2, H * W, 1)
        for b in range(2):
            for i in range(H):
                for j in range(W):
                    index = i * W + j  # row i, column j
                    assert_close(class_logits[level][b, index], cls_map[b, :, i, j])
                    assert_close(boxreg_deltas[level][b, index], box_map[b, :, i, j])
                    assert_close(centerness_logits[level][b, index], ctr_map[b, :, i, j])


# ----------------------------------------------------------------------------------------------
# fcos_matching
# ----------------------------------------------------------------------------------------------


def test_fcos_matching_checks_the_range_of_each_box_before_picking_the_smallest_in_a_batch_of_three():
    locations = {
        "p3": torch.tensor([[20.0, 30.0], [4.0, 4.0], [12.0, 20.0], [100.0, 4.0], [76.0, 20.0]]),
        "p4": torch.tensor([[20.0, 30.0], [56.0, 8.0]]),
        "p5": torch.tensor([[20.0, 30.0]]),
    }
    S, L = [10.0, 10, 30, 50, 2], [0.0, 0, 100, 120, 0]  # image 0: a small tall box inside a large one
    Wd, Sq, E = [0.0, 0, 60, 10, 1], [0.0, 0, 30, 30, 2], [8.0, 20, 40, 44, 0]  # image 1: areas 600, 900, 768
    T, Q = [70.0, 0, 80, 60, 1], [64.0, 10, 94, 30, 2]  # image 1: two boxes of equal area, 600 each
    gt = gt_batch([[S, L], [Wd, Sq, E, T, Q], []], M=6)  # image 2 has no box at all
    matched = fcos_match_locations_to_gt(locations, STRIDES, gt)
    assert {level: tuple(m.shape) for level, m in matched.items()} == {
        "p3": (3, 5, 5),
        "p4": (3, 2, 5),
        "p5": (3, 1, 5),
    }
    # Image 0, p3: (20, 30) in S has LTRB (10, 20, 10, 20), max 20 -> S; in L max 90, not p3's.
    # (4, 4) is outside S and L's max 116 is too large; (12, 20) in S: (2, 10, 18, 30) -> S;
    # (100, 4) lies on L's right edge; (76, 20) is in L only, max 100.
    assert_close(matched["p3"][0], torch.tensor([S, BG, S, BG, BG]))
    # p4 (64, 128): (20, 30) lies in both, but S's max 20 is out of p4's range, so the larger L (max 90) is
    # the smallest box *that qualifies*. (56, 8) is in L only: (56, 8, 44, 112), max 112 -> L.
    assert_close(matched["p4"][0], torch.tensor([L, L]))
    assert_close(matched["p5"][0], torch.tensor([BG]))  # L's max 90 is not > 128
    # Image 1, p3: (20, 30) is on Sq's bottom edge and below Wd; in E: (12, 10, 20, 14) -> E.
    # (4, 4) is in Wd (max 56) and Sq (max 26): area 600 < 900 -> the wide box Wd (not by width or height).
    # (12, 20) is on E's top edge (t = 0, not inside, though E is smaller); in Sq: max 20 -> Sq.
    assert_close(matched["p3"][1, :4], torch.tensor([E, Wd, Sq, BG]))
    # (76, 20): T (6, 20, 4, 40) and Q (12, 10, 18, 10) both qualify with equal areas: either one, whole.
    assert matched["p3"][1, 4].tolist() in (T, Q)
    assert_close(matched["p4"][1], torch.tensor([BG, BG]))  # E's max 20 and Wd's max 56 are below 64
    assert (matched["p3"][2] == -1).all() and (matched["p4"][2] == -1).all() and (matched["p5"][2] == -1).all()


# ----------------------------------------------------------------------------------------------
# fcos_deltas
# ----------------------------------------------------------------------------------------------


def test_fcos_deltas_with_four_column_boxes_background_in_between_an_edge_and_stride_32():
    locations = torch.tensor([[48.0, 80.0], [16.0, 16.0], [100.0, 20.0]])
    boxes = torch.tensor([[40.0, 8, 120, 200], [-1.0, -1, -1, -1], [36.0, 4, 100, 68]])  # (N, 4): no class column
    deltas = fcos_get_deltas_from_locations(locations, boxes, stride=32)
    # Row 0: (48-40, 80-8, 120-48, 200-80) / 32 = (8, 72, 72, 120) / 32. Row 1: background.
    # Row 2: the location is on the right edge: (64, 16, 0, 48) / 32.
    expected = torch.tensor([[0.25, 2.25, 2.25, 3.75], [-1.0, -1, -1, -1], [2.0, 0.5, 0.0, 1.5]])
    assert torch.equal(deltas, expected)
    # With the class column (class 0 is an object, not background) the deltas are the same.
    with_class = torch.cat([boxes, torch.tensor([[0.0], [-1.0], [3.0]])], dim=1)
    assert torch.equal(fcos_get_deltas_from_locations(locations, with_class, stride=32), expected)
    # Back to boxes at stride 32: the boxes again, and the background row shrinks to its location.
    back = fcos_apply_deltas_to_locations(deltas, locations, stride=32)
    assert torch.equal(back, torch.tensor([[40.0, 8, 120, 200], [16.0, 16, 16, 16], [36.0, 4, 100, 68]]))


# ----------------------------------------------------------------------------------------------
# centerness
# ----------------------------------------------------------------------------------------------


def test_centerness_of_a_centre_an_edge_and_background_among_foreground_rows():
    deltas = torch.tensor(
        [
            [3.0, 3, 3, 3],  # at the centre: sqrt(3 * 3 / (3 * 3)) = 1
            [0.5, 2, 4, 2],  # sqrt(min(0.5, 4) min(2, 2) / (max(0.5, 4) max(2, 2))) = sqrt(1 / 8)
            [-1.0, -1, -1, -1],  # background, between foreground rows
            [0.0, 2, 4, 3],  # on the left edge: sqrt(0 * 2 / (4 * 3)) = 0, an object's row, not background
            [2.0, 1, 2, 4],  # sqrt(2 * 1 / (2 * 4)) = 1/2
        ]
    )
    expected = torch.tensor([1.0, math.sqrt(1 / 8), -1.0, 0.0, 0.5])
    centerness = fcos_make_centerness_targets(deltas)
    assert_close(centerness, expected)
    # The same boxes in pixels of stride 8: centerness is a ratio, so only the background row changes.
    assert_close(fcos_make_centerness_targets(deltas[[0, 1, 3, 4]] * 8), expected[[0, 1, 3, 4]])
    assert fcos_make_centerness_targets(torch.zeros(0, 4)).shape == (0,)


# ----------------------------------------------------------------------------------------------
# nms
# ----------------------------------------------------------------------------------------------


def test_nms_keeps_tied_scores_in_index_order_and_a_pair_at_exactly_the_threshold():
    boxes = torch.tensor(
        [
            [0.0, 0, 10, 10],  # 0: A, 0.9
            [50.0, 50, 60, 60],  # 1: F, 0.95, far from the others
            [2.0, 0, 12, 10],  # 2: B, 0.9: IoU with A 80/120 = 2/3
            [100.0, 100, 104, 104],  # 3: D, 0.5
            [4.0, 0, 14, 10],  # 4: C, 0.9: IoU with B 2/3, with A 60/140 = 0.43
            [100.0, 100, 104, 102],  # 5: E, 0.4: IoU with D 8/16 = 0.5 exactly
        ]
    )
    scores = torch.tensor([0.9, 0.95, 0.9, 0.5, 0.9, 0.4])
    # A, B and C tie at 0.9; torchvision takes tied boxes in index order: A is kept and suppresses B; C only
    # overlaps B (suppressed, so it suppresses nothing) and A at 0.43 <= 0.5, so C is kept. E's IoU with D is
    # 0.5, not > 0.5: both kept.
    kept = nms(boxes, scores, 0.5)
    assert kept.tolist() == [1, 0, 4, 3, 5]
    assert torch.equal(kept, torchvision.ops.nms(boxes, scores, 0.5))
    # All six tied: index order again: A, F, D (B goes to A), C (0.43 with A) and E (0.5 with D) are kept.
    same = torch.full((6,), 0.7)
    assert nms(boxes, same, 0.5).tolist() == torchvision.ops.nms(boxes, same, 0.5).tolist() == [0, 1, 3, 4, 5]


# ----------------------------------------------------------------------------------------------
# fcos_losses
# ----------------------------------------------------------------------------------------------


def test_focal_loss_of_very_confident_logits_is_finite_and_linear():
    logits = torch.tensor([-200.0, 200.0, 0.0, 0.0], requires_grad=True)
    targets = torch.tensor([1.0, 0.0, 1.0, 0.0])
    loss = sigmoid_focal_loss(logits, targets)
    # A wrong logit of -200 (target 1): p_t = sigmoid(-200) = 0, so the modulating factor (1 - p_t)^2 is 1 and
    # -log(p_t) = 200: 0.25 * 200 = 50. Logit 200 with target 0: 0.75 * 200 = 150.
    # Logit 0: p_t = 1/2, 0.25 * (1/2)^2 * ln 2 and 0.75 * (1/2)^2 * ln 2.
    expected = torch.tensor([50.0, 150.0, 0.0625 * math.log(2), 0.1875 * math.log(2)])
    assert_close(loss, expected)
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    reference = logits.detach().clone().requires_grad_()
    torchvision.ops.sigmoid_focal_loss(reference, targets, reduction="sum").backward()
    assert torch.isfinite(grad).all()
    assert_close(grad, reference.grad)


def test_giou_loss_of_disjoint_touching_inverted_and_partly_overlapping_predictions():
    # All at one location, target LTRB (1, 1, 1, 1): the 2 x 2 box around it (area 4).
    target = torch.ones(5, 4)
    pred = torch.tensor(
        [
            [-2.0, -2, 3, 3],  # the 1 x 1 box 2..3 right of and below the location: disjoint
            [-1.0, 1, 2, 1],  # 1 x 2, from x + 1 to x + 2: touches the target's right edge
            [-3.0, 1, 1, 1],  # l + r = -2: an inverted box, area 0
            [-0.5, 1, 2, 1],  # 1.5 x 2, from x + 0.5: overlaps the target by 0.5 x 2
            [1.0, 1, 1, 1],  # the target itself
        ]
    )
    # Disjoint: intersection 0 (not (-1) * (-1) = 1), union 1 + 4 = 5, enclosing 4 x 4 = 16:
    #   GIoU = 0 - (16 - 5) / 16 = -11/16, loss 27/16.
    # Touching: intersection 0, union 2 + 4 = 6, enclosing 3 x 2 = 6: GIoU 0, loss 1.
    # Inverted: intersection 0, union 0 + 4, enclosing 2 x 2 = 4: GIoU 0, loss 1.
    # Overlapping: intersection 1, union 3 + 4 - 1 = 6, enclosing 3 x 2 = 6: GIoU 1/6, loss 5/6.
    expected = torch.tensor([27 / 16, 1.0, 1.0, 5 / 6, 0.0])
    assert_close(fcos_giou_loss(pred, target), expected)
    # The valid boxes as torchvision sees them, around the location (10, 10).
    pred_boxes = torch.tensor([[12.0, 12, 13, 13], [11.0, 9, 12, 11], [10.5, 9, 12, 11]])
    target_boxes = torch.tensor([[9.0, 9, 11, 11]]).expand(3, 4)
    assert_close(torchvision.ops.generalized_box_iou_loss(pred_boxes, target_boxes), expected[[0, 1, 3]])


def test_fcos_losses_divide_by_the_foreground_of_the_whole_batch_when_the_second_image_is_empty():
    # K = 2 classes, 3 locations per image. Image 0: location 0 is class 1, location 1 class 0, location 2
    # background. Image 1 has no object: all three locations are background.
    matched = torch.tensor(
        [[[0.0, 0, 16, 16, 1], [0.0, 0, 32, 32, 0], BG], [BG, BG, BG]],
    )
    targets = torch.tensor([[[1.0, 1, 1, 1], [1.0, 3, 3, 1], [-1.0] * 4], [[-1.0] * 4] * 3])
    pred = torch.tensor([[[1.0, 1, 1, 3], [1.0, 3, 3, 1], [5.0] * 4], [[5.0] * 4] * 3])
    cls_logits, ctr_logits = torch.zeros(2, 3, 2), torch.zeros(2, 3)
    losses = fcos_losses(matched, targets, cls_logits, pred, ctr_logits, box_loss=fcos_l1_loss)
    # Class terms at logit 0 (p = 1/2): a positive one is 0.25 * 1/4 * ln 2, a negative one 0.75 * 1/4 * ln 2.
    # Image 0: 2 positive and 4 negative terms = 0.875 ln 2; image 1: 6 negative terms = 1.125 ln 2.
    # Together 2 ln 2, over the batch's 2 foreground locations: ln 2 (not image by image: 0.875/2 + 1.125/1).
    assert_close(losses["loss_cls"], torch.tensor(math.log(2)))
    # Box: L1 terms 0.25 * 2 = 0.5 and 0, over 2: 0.25. Centerness: BCE at logit 0 is ln 2 for both, over 2.
    assert_close(losses["loss_box"], torch.tensor(0.25))
    assert_close(losses["loss_ctr"], torch.tensor(math.log(2)))


# ----------------------------------------------------------------------------------------------
# fcos_inference
# ----------------------------------------------------------------------------------------------


def test_fcos_level_candidates_of_two_different_non_square_images_weigh_centerness():
    # A 16 x 32 image (H x W), four p3 locations, K = 2. Scores sqrt(class probability * centerness).
    locations = torch.tensor([[4.0, 4.0], [28.0, 4.0], [12.0, 12.0], [28.0, 12.0]])
    class_probs = torch.tensor(
        [
            [[0.81, 0.04], [0.25, 0.64], [0.09, 0.01], [0.49, 0.36]],
            [[0.01, 0.02], [0.36, 0.04], [0.64, 0.81], [0.25, 0.16]],
        ]
    )
    ctr_probs = torch.tensor([[1.0, 0.25, 1.0, 1.0], [1.0, 1.0, 0.64, 1.0]])
    ctr_logits = torch.where(ctr_probs == 1, torch.tensor(100.0), torch.logit(ctr_probs))[..., None]
    deltas = torch.tensor(
        [
            [[1.0, 1, 1, 1], [3.0, 3, 3, 3], [2.0, 2, 2, 2], [0.5, 0.5, 1, 1]],
            [[3.0, 3, 3, 3], [2.0, 1, 0.25, 0.25], [1.0, 0.5, 3, 1], [2.0, 2, 2, 2]],
        ]
    )
    boxes, labels, scores = fcos_level_candidates(
        torch.logit(class_probs), deltas, ctr_logits, locations, 8, (16, 32), topk=3
    )
    # Image 0: scores (0.9, 0.2), (0.25, 0.4), (0.3, 0.1), (0.7, 0.6): location 1's class 1 (probability 0.64)
    # scores only sqrt(0.64 * 0.25) = 0.4. Image 1: (0.1, 0.14), (0.6, 0.2), (0.64, 0.72), (0.5, 0.4).
    assert_close(scores, torch.tensor([[0.9, 0.7, 0.6], [0.72, 0.64, 0.6]]))
    assert labels.tolist() == [[0, 0, 1], [1, 0, 0]]
    # Boxes: location +- deltas * 8, clipped to x in [0, 32] and y in [0, 16]:
    # (4, 4) + (8, 8, 8, 8) -> (-4, -4, 12, 12) -> (0, 0, 12, 12); (28, 12) + (4, 4, 8, 8) -> (24, 8, 36, 20)
    # -> (24, 8, 32, 16); image 1: (12, 12) + (8, 4, 24, 8) -> (4, 8, 36, 20) -> (4, 8, 32, 16);
    # (28, 4) + (16, 8, 2, 2) -> (12, -4, 30, 6) -> (12, 0, 30, 6).
    expected = torch.tensor(
        [
            [[0.0, 0, 12, 12], [24.0, 8, 32, 16], [24.0, 8, 32, 16]],
            [[4.0, 8, 32, 16], [4.0, 8, 32, 16], [12.0, 0, 30, 6]],
        ]
    )
    assert_close(boxes, expected)


def test_fcos_predict_hand_made_head_outputs_on_a_non_square_batch_of_two_different_images():
    fcos = FCOS(num_classes=2, fpn_channels=16, stem_channels=[16], pretrained=False).eval()
    # A 32 x 64 image: p3 has 4 x 8 locations, p4 2 x 4, p5 1 x 2 (row-major: index = row * width + column).
    cells = {
        # (image, level, index): (class, class logit, centerness logit, deltas)
        (0, "p3", 14): (1, 20.0, 0.0, [1.0, 1, 2, 3]),  # centre (52, 12): score sqrt(1 * 1/2) = 0.7071
        (0, "p4", 1): (0, 20.0, 20.0, [0.5, 0.25, 0.5, 1]),  # centre (24, 8): score 1
        (0, "p3", 10): (0, 20.0, math.log(0.64 / 0.36), [0.5, 1, 1.5, 1]),  # centre (20, 12): score 0.8
        (0, "p3", 11): (1, 20.0, math.log(0.36 / 0.64), [1.5, 1, 0.5, 1]),  # centre (28, 12): score 0.6
        (0, "p5", 0): (1, 20.0, -20.0, [0.5, 0.5, 0.5, 0.5]),  # centerness ~0: score 4.5e-5
        (1, "p5", 1): (1, 20.0, 2.0, [1.0, 0.5, 0.5, 0.5]),  # centre (48, 16): score sqrt(sigmoid(2)) = 0.9385
        (1, "p3", 0): (0, 0.0, 0.0, [1.0, 1, 1, 1]),  # score sqrt(1/2 * 1/2) = 0.5 exactly: not above 0.5
        (1, "p4", 7): (0, 20.0, 0.0, [0.25, 0.5, 1, 0.25]),  # centre (56, 24): score 0.7071
    }

    def hand_made(module, inputs, outputs):
        # Zero deltas and centerness logits, class logits -20 (probability ~2e-9) except in the cells above.
        logits, boxes, centerness = ({level: torch.zeros_like(x) for level, x in output.items()} for output in outputs)
        for level in logits:
            logits[level] -= 20.0
        for (b, level, index), (label, cls, ctr, deltas) in cells.items():
            logits[level][b, index, label] = cls
            centerness[level][b, index, 0] = ctr
            boxes[level][b, index] = torch.tensor(deltas)
        return [logits, boxes, centerness]

    fcos.pred_net.register_forward_hook(hand_made)
    detections = fcos.predict(torch.randn(2, 3, 32, 64), score_thresh=0.5, nms_thresh=0.5)
    assert len(detections) == 2
    # Image 0: p4's (24, 8) + (8, 4, 8, 16) = (16, 4, 32, 24), score 1. p3's (52, 12) + (8, 8, 16, 24) =
    # (44, 4, 68, 36), clipped to the 64 x 32 image: (44, 4, 64, 32). p3's (20, 12) gives (16, 4, 32, 20), class 0,
    # IoU 256 / 320 = 0.8 with the score-1 box of its class: suppressed. p3's (28, 12) gives the same box as
    # class 1: another class, kept.
    assert detections[0]["labels"].tolist() == [0, 1, 1]
    assert_close(detections[0]["scores"], torch.tensor([1.0, math.sqrt(0.5), 0.6]))
    assert_close(detections[0]["boxes"], torch.tensor([[16.0, 4, 32, 24], [44.0, 4, 64, 32], [16.0, 4, 32, 20]]))
    # Image 1: p5's (48, 16) + (32, 16, 16, 16) = (16, 0, 64, 32); p4's (56, 24) + (4, 8, 16, 4) = (52, 16, 72, 28)
    # -> (52, 16, 64, 28). The pair scoring exactly 0.5 is not above the threshold.
    assert detections[1]["labels"].tolist() == [1, 0]
    assert_close(detections[1]["scores"], torch.tensor([math.sqrt(torch.sigmoid(torch.tensor(2.0)).item()), 0.5**0.5]))
    assert_close(detections[1]["boxes"], torch.tensor([[16.0, 0, 64, 32], [52.0, 16, 64, 28]]))


# ----------------------------------------------------------------------------------------------
# rpn_head
# ----------------------------------------------------------------------------------------------


def test_rpn_head_without_a_stem_with_two_anchors_on_non_square_levels():
    head = RPNPredictionNetwork(in_channels=6, stem_channels=[], num_anchors=2)
    assert head.num_anchors == 2
    # Two 1x1 convs straight on the features: A = 2 logits and 4A = 8 deltas.
    assert (head.pred_obj.kernel_size, head.pred_obj.in_channels, head.pred_obj.out_channels) == ((1, 1), 6, 2)
    assert (head.pred_box.kernel_size, head.pred_box.in_channels, head.pred_box.out_channels) == ((1, 1), 6, 8)
    feats = {"p3": torch.randn(2, 6, 2, 3), "p4": torch.randn(2, 6, 1, 2)}  # two different images
    obj_logits, boxreg_deltas = head(feats)
    for level, f in feats.items():
        H, W = f.shape[-2:]
        stem = head.stem_rpn(f)
        obj_map, box_map = head.pred_obj(stem), head.pred_box(stem)
        assert obj_logits[level].shape == (2, H * W * 2) and boxreg_deltas[level].shape == (2, H * W * 2, 4)
        for b in range(2):
            for i in range(H):
                for j in range(W):
                    for a in range(2):
                        index = (i * W + j) * 2 + a
                        assert_close(obj_logits[level][b, index], obj_map[b, a, i, j])
                        assert_close(boxreg_deltas[level][b, index], box_map[b, 4 * a : 4 * a + 4, i, j])
    # With a stem: 3x3 convs of the given widths, and the outputs take the last width.
    deep = RPNPredictionNetwork(in_channels=6, stem_channels=[5, 7], num_anchors=4)
    convs = [m for m in deep.stem_rpn if isinstance(m, nn.Conv2d)]
    assert [(c.kernel_size, c.out_channels) for c in convs] == [((3, 3), 5), ((3, 3), 7)]
    assert (deep.pred_obj.in_channels, deep.pred_obj.out_channels, deep.pred_box.out_channels) == (7, 4, 16)


# ----------------------------------------------------------------------------------------------
# anchors
# ----------------------------------------------------------------------------------------------


def test_anchors_follow_the_given_ratio_order_with_a_fractional_stride_scale():
    locations = {
        "p3": torch.zeros(0, 2),
        "p4": torch.tensor([[8.0, 8.0], [24.0, 8.0]]),
        "p5": torch.tensor([[16.0, 16]]),
    }
    anchors = generate_fpn_anchors(locations, STRIDES, stride_scale=1.5, aspect_ratios=(4.0, 1.0, 0.25))
    assert anchors["p3"].shape == (0, 4)  # a level without locations has no anchors
    # p4: side 1.5 * 16 = 24, area 576. Ratio h/w = 4: w = sqrt(576 / 4) = 12, h = 48; ratio 1: 24 x 24;
    # ratio 1/4: w = 48, h = 12. Anchor a of location l at row l * 3 + a.
    expected_p4 = torch.tensor(
        [
            [2.0, -16, 14, 32],
            [-4.0, -4, 20, 20],
            [-16.0, 2, 32, 14],
            [18.0, -16, 30, 32],
            [12.0, -4, 36, 20],
            [0.0, 2, 48, 14],
        ]
    )
    assert_close(anchors["p4"], expected_p4)
    # p5: side 48, area 2304: 24 x 96, 48 x 48, 96 x 24 around (16, 16).
    assert_close(anchors["p5"], torch.tensor([[4.0, -32, 28, 64], [-8.0, -8, 40, 40], [-32.0, 4, 64, 28]]))
    # One ratio: one anchor per location.
    single = generate_fpn_anchors({"p4": locations["p4"]}, {"p4": 16}, stride_scale=1.5, aspect_ratios=(1.0,))
    assert_close(single["p4"], expected_p4[[1, 4]])


# ----------------------------------------------------------------------------------------------
# anchor_matching
# ----------------------------------------------------------------------------------------------


def test_anchor_matching_low_quality_anchor_keeps_the_box_it_overlaps_most_and_a_padded_image_is_background():
    anchors = torch.tensor([[0.0, 0, 10, 20], [0.0, 0, 10, 25], [50.0, 50, 60, 60]])
    A, B, C = [0.0, 0, 10, 10, 1], [0.0, 0, 10, 25, 2], [50.0, 50, 60, 70, 0]
    gt = gt_batch([[A, B], [], [C]], M=3)  # image 1 is all padding
    # Image 0: anchor 0 has IoU 100/200 = 0.5 with A and 200/250 = 0.8 with B; anchor 1 0.4 with A and 1 with B.
    # Image 2: anchor 2 has IoU 100/200 = 0.5 with C (class 0).
    plain = rcnn_match_anchors_to_gt(anchors, gt, (0.3, 0.9))
    expected_plain = torch.tensor([[NEUTRAL, B, BG], [BG, BG, BG], [BG, BG, NEUTRAL]])
    assert_close(plain, expected_plain)
    # Low-quality rule: anchor 0 is A's best anchor (0.5 > 0.4), so it becomes positive; its row is the box it
    # overlaps most, B (0.8), not A. Anchor 2 is C's best. The padded image stays background.
    promoted = rcnn_match_anchors_to_gt(anchors, gt, (0.3, 0.9), allow_low_quality_matches=True)
    expected_promoted = torch.tensor([[B, B, BG], [BG, BG, BG], [BG, BG, C]])
    assert_close(promoted, expected_promoted)


def test_anchor_sampling_counts_each_image_of_a_batch_on_its_own_and_rounds_the_foreground_down():
    def rows(num_fg, num_bg, num_neutral):
        return torch.tensor([[0.0, 0, 10, 10, 0]] * num_fg + [BG] * num_bg + [NEUTRAL] * num_neutral)

    # Three images of 20 rows: 6 fg + 10 bg + 4 neutral; 0 fg + 10 bg + 10 neutral; 2 fg + 3 bg + 15 neutral.
    matched = torch.stack([rows(6, 10, 4), rows(0, 10, 10), rows(2, 3, 15)])
    fg_mask, bg_mask = _sample_fg_bg_masks(matched, num_samples=7, fg_fraction=0.5)
    assert fg_mask.shape == bg_mask.shape == (3, 20)
    # At most int(7 * 0.5) = 3 foreground, background fills each image's own 7: 3 + 4, 0 + 7, 2 + 3 (all there is).
    assert fg_mask.sum(dim=1).tolist() == [3, 0, 2]
    assert bg_mask.sum(dim=1).tolist() == [4, 7, 3]
    assert (matched[..., 4][fg_mask] >= 0).all() and (matched[..., 4][bg_mask] == -1).all()  # never neutral
    fg_idx, bg_idx = sample_rpn_training(matched[0], num_samples=7, fg_fraction=0.5)
    assert (len(fg_idx), len(bg_idx)) == (3, 4)


# ----------------------------------------------------------------------------------------------
# rcnn_deltas
# ----------------------------------------------------------------------------------------------


def test_rcnn_deltas_weighted_with_background_neutral_and_class_0_rows_and_clamped_after_the_weights():
    weights = (10.0, 10.0, 5.0, 5.0)
    anchors = torch.tensor([[0.0, 0, 10, 20], [10.0, 10, 30, 30], [0.0, 0, 8, 8], [5.0, 5, 15, 25]])
    rows = torch.tensor([[2.0, 4, 12, 24, 0], BG, NEUTRAL, [5.0, 5, 15, 25, 2]])
    # Row 0 (class 0 is an object): centres (5, 10) -> (7, 14), sizes equal:
    # (2/10, 4/20, 0, 0) * weights = (2, 2, 0, 0).
    # Background and neutral rows are -1e8 whatever the weights; row 3 is its anchor: 0.
    expected = torch.tensor([[2.0, 2, 0, 0], [-1e8] * 4, [-1e8] * 4, [0.0] * 4])
    assert_close(rcnn_get_deltas_from_anchors(anchors, rows, weights), expected)
    assert_close(rcnn_get_deltas_from_anchors(anchors, rows[:, :4], weights), expected)  # 4 columns
    assert_close(rcnn_apply_deltas_to_anchors(expected[[0, 3]], anchors[[0, 3]], weights), rows[[0, 3], :4])
    # Clamped after the weights: dw = 25 / 5 = 5 > log(1000/16), so the width is 10 * 62.5 = 625 around x = 5;
    # dh = -5 / 5 = -1: height 20 / e around y = 10.
    boxes = rcnn_apply_deltas_to_anchors(torch.tensor([[0.0, 0, 25, -5]]), anchors[:1], weights)
    h = 20 * math.exp(-1)
    assert_close(boxes, torch.tensor([[5 - 312.5, 10 - h / 2, 5 + 312.5, 10 + h / 2]]))


# ----------------------------------------------------------------------------------------------
# rpn
# ----------------------------------------------------------------------------------------------


def test_rpn_losses_hand_computed_count_only_the_sampled_anchors_of_both_images():
    rpn = RPN(4, [], batch_size_per_image=8, anchor_iou_thresholds=(0.3, 0.6), fg_fraction=0.5)
    anchors = torch.tensor([[0.0, 0, 16, 16], [32.0, 32, 48, 48], [0.0, 32, 16, 48], [0.0, 0, 16, 8]])
    gt = gt_batch([[[0, 0, 16, 16, 1]], []], M=2)  # image 1 has no box
    # Image 0: anchor 0 is the box (IoU 1, foreground), anchors 1 and 2 miss it (background), anchor 3 has IoU
    # 128/256 = 0.5 (neutral: not the box's best anchor either, so never sampled). Image 1: all four are background.
    # At most 8 per image, so every candidate is sampled: 1 + 2 + 4 = 7 anchors.
    obj_logits = torch.tensor([[2.0, 0.0, 0.0, 5.0], [0.0, 0.0, 0.0, -1.0]], requires_grad=True)
    deltas = torch.tensor(
        [[[0.5, -0.25, 0.0, 0.1], [9.0] * 4, [9.0] * 4, [9.0] * 4], [[9.0] * 4] * 4], requires_grad=True
    )
    losses = rpn._losses(obj_logits, deltas, anchors, gt)
    # Objectness BCE: log(1 + e^-2) for the foreground anchor at logit 2, ln 2 for the five background anchors at
    # logit 0, log(1 + e^-1) for image 1's anchor 3 at logit -1; the neutral anchor's logit 5 does not count.
    expected_obj = (math.log(1 + math.exp(-2)) + 5 * math.log(2) + math.log(1 + math.exp(-1))) / 7
    assert_close(losses["loss_rpn_obj"], torch.tensor(expected_obj))
    # Box: the foreground anchor is its box (target deltas 0): L1 0.5 + 0.25 + 0 + 0.1 = 0.85, also over 7.
    assert_close(losses["loss_rpn_box"], torch.tensor(0.85 / 7))
    (obj_grad, box_grad) = torch.autograd.grad(losses["loss_rpn_obj"] + losses["loss_rpn_box"], (obj_logits, deltas))
    assert obj_grad[0, 3] == 0 and (box_grad[0, 1:] == 0).all() and (box_grad[1] == 0).all()


def test_rpn_forward_proposals_of_two_different_images_of_a_non_square_input():
    rpn = RPN(4, [], batch_size_per_image=8, anchor_stride_scale=1, anchor_aspect_ratios=(1.0,), pre_nms_topk=2)
    rpn.eval()
    strides = {"p3": 8, "p4": 16}
    feats = {"p3": torch.zeros(2, 4, 2, 4), "p4": torch.zeros(2, 4, 1, 2)}  # a 16 x 32 input (H x W)
    # One anchor per location, one stride wide: p3's 8 anchors are their centre +- 4 (index = row * 4 + column),
    # p4's two are [0, 0, 16, 16] and [16, 0, 32, 16].
    logits = {"p3": torch.full((2, 8), -10.0), "p4": torch.full((2, 2), -10.0)}
    deltas = {"p3": torch.zeros(2, 8, 4), "p4": torch.zeros(2, 2, 4)}
    logits["p3"][0, 3], deltas["p3"][0, 3] = 5.0, torch.tensor([0.5, 0, math.log(2), 0])  # (28, 4) -> x 24..40
    logits["p3"][0, 4] = 4.0  # (4, 12): [0, 8, 8, 16]
    logits["p4"][0, 1] = 3.0  # [16, 0, 32, 16]
    logits["p3"][1, 6], deltas["p3"][1, 6] = 6.0, torch.tensor([0, 0, 0, math.log(2)])  # (20, 12) -> y 4..20
    logits["p3"][1, 0] = 1.0  # [0, 0, 8, 8]
    logits["p4"][1, 0] = 2.0  # [0, 0, 16, 16]
    rpn.pred_net.register_forward_hook(lambda module, inputs, outputs: [logits, deltas])
    output = rpn(feats, strides)  # no image_size: the first level's size times its stride, 16 x 32
    assert set(output) == {"proposals"}
    first, second = output["proposals"]
    # The best 2 anchors of each level of each image, decoded, clipped to x in [0, 32], y in [0, 16], NMS per level
    # (nothing overlaps), by decreasing objectness; the last of each image is a -10 anchor of p4.
    assert_close(first, torch.tensor([[24.0, 0, 32, 8], [0.0, 8, 8, 16], [16.0, 0, 32, 16], [0.0, 0, 16, 16]]))
    assert_close(second, torch.tensor([[16.0, 4, 24, 16], [0.0, 0, 16, 16], [0.0, 0, 8, 8], [16.0, 0, 32, 16]]))


# ----------------------------------------------------------------------------------------------
# roi_sampling
# ----------------------------------------------------------------------------------------------


def test_roi_sampling_leaves_out_empty_gt_boxes_and_samples_each_image_when_one_has_no_boxes():
    # At most 4 RoIs per image, of them at most 2 foreground; background fills the rest.
    model = FasterRCNN(
        _StubBackbone(), RPN(4, [], 8), num_classes=3, stem_channels=[], batch_size_per_image=4, fg_fraction=0.5
    )
    G0, empty, G2 = [10.0, 10, 50, 50, 1], [30.0, 30, 30, 50, 2], [100.0, 100, 140, 180, 0]
    gt = gt_batch([[G0, empty], [], [G2]], M=3)
    fg_proposals = [[100.0, 100, 140, 170], [104.0, 100, 140, 180], [100.0, 110, 140, 180]]  # IoU 0.875, 0.9, 0.875
    proposals = [
        torch.zeros(0, 4),  # image 0: no proposal; its RoIs can only be its real GT box
        torch.tensor(
            [[0.0, 0, 10, 10], [20, 20, 40, 40], [60, 0, 90, 30], [0, 50, 30, 90], [5, 5, 9, 9], [1, 1, 2, 2]]
        ),
        torch.tensor([*fg_proposals, [0.0, 0, 20, 20]]),
    ]
    rois, matched = model.sample_rois(proposals, gt)
    assert rois.shape[1] == 5 and matched.shape == (len(rois), 5)
    image = rois[:, 0].long()
    assert image.tolist() == sorted(image.tolist())
    # Image 0: only G0; the zero-width GT row is not a RoI (nor is padding).
    assert_close(rois[image == 0], torch.tensor([[0.0, 10, 10, 50, 50]]))
    assert_close(matched[image == 0], torch.tensor([G0]))
    # Image 1: no object, so 4 of its 6 proposals, all background, no box twice.
    second = rois[image == 1, 1:]
    assert len(second) == 4 and (matched[image == 1] == -1).all()
    assert len({tuple(box) for box in second.tolist()}) == 4
    assert all(box in proposals[1].tolist() for box in second.tolist())
    # Image 2: 2 of its 4 foreground candidates (3 proposals and G2, class 0) and its 1 background proposal.
    third, third_matched = rois[image == 2, 1:], matched[image == 2]
    is_fg = third_matched[:, 4] >= 0
    assert int(is_fg.sum()) == 2 and int((~is_fg).sum()) == 1
    assert all(box in [*fg_proposals, G2[:4]] for box in third[is_fg].tolist())
    assert_close(third_matched[is_fg], torch.tensor([G2, G2]))
    assert_close(third[~is_fg], torch.tensor([[0.0, 0, 20, 20]]))


# ----------------------------------------------------------------------------------------------
# second_stage
# ----------------------------------------------------------------------------------------------


def test_second_stage_roi_losses_divide_by_all_sampled_rois_and_are_zero_without_any():
    model = FasterRCNN(_StubBackbone(), RPN(4, [], 8), num_classes=2, stem_channels=[])  # weights (10, 10, 5, 5)
    rois = torch.tensor([[0.0, 0, 0, 10, 10], [1.0, 20, 20, 40, 40], [1.0, 0, 0, 20, 40]])
    matched = torch.tensor([[1.0, 0, 11, 10, 1], BG, [0.0, 0, 20, 40, 0]])  # labels 1, background (2), 0
    # Softmax rows (3/8, 4/8, 1/8), (1/8, 1/8, 6/8), (2/4, 1/4, 1/4): each RoI's own label has probability
    # 1/2, 3/4 and 1/2, so cross-entropy ln 2 + ln(4/3) + ln 2, summed and divided by the 3 RoIs.
    cls_logits = torch.tensor([[3.0, 4, 1], [1.0, 1, 6], [2.0, 1, 1]]).log()
    # Box targets: RoI 0 is 1 px left of its box of the same size: (1/10, 0, 0, 0) * (10, 10, 5, 5) = (1, 0, 0, 0);
    # RoI 2 is its box: 0. Predictions of the GT class: 0 for RoI 0 (L1 1), (0.5, 0, 0, -0.5) for RoI 2 (L1 1);
    # the other class's deltas and the background RoI's count for nothing.
    box_deltas = torch.tensor(
        [[7.0, 7, 7, 7, 0, 0, 0, 0], [7.0] * 8, [0.5, 0, 0, -0.5, 7, 7, 7, 7]],
    )
    losses = model._roi_losses(cls_logits, box_deltas, rois, matched)
    assert_close(losses["loss_cls"], torch.tensor((2 * math.log(2) + math.log(4 / 3)) / 3))
    assert_close(losses["loss_box"], torch.tensor(2 / 3))  # over all 3 sampled RoIs, not the 2 foreground
    nothing = model._roi_losses(torch.zeros(0, 3), torch.zeros(0, 8), torch.zeros(0, 5), torch.zeros(0, 5))
    assert nothing["loss_cls"].item() == 0 and nothing["loss_box"].item() == 0


class _FixedProposals(nn.Module):
    """A first stage that proposes the same boxes whatever the features."""

    def __init__(self, proposals):
        super().__init__()
        self.proposals = proposals

    def forward(self, feats_per_fpn_level, strides_per_fpn_level, gt_boxes=None, image_size=None):
        return {"proposals": [p.clone() for p in self.proposals]}


def test_second_stage_predict_hand_made_scores_and_boxes_on_a_non_square_batch_of_two_images():
    proposals = [
        torch.tensor([[4.0, 4, 20, 20], [40.0, 8, 60, 30]]),  # image 0: P0, P1
        torch.tensor([[10.0, 10, 30, 30], [12.0, 10, 32, 30]]),  # image 1: P2, P3
    ]
    model = FasterRCNN(_StubBackbone(), _FixedProposals(proposals), num_classes=2, stem_channels=[]).eval()
    ln2 = math.log(2)
    # Per proposal: class probabilities up to a factor (K + 1 = 3, background last; their logs are the logits) and
    # the weighted deltas of class 0 and of class 1.
    head = {
        (0, 4.0, 4.0, 20.0, 20.0): ([6.0, 3, 1], [0, 0, 0, 0], [5.0, 0, 0, 0]),  # P0: (0.6, 0.3, bg 0.1)
        (0, 40.0, 8.0, 60.0, 30.0): ([1.0, 8, 1], [0, 0, 0, 0], [0.0, 0, 5 * ln2, 0]),  # P1: (0.1, 0.8, bg 0.1)
        (1, 10.0, 10.0, 30.0, 30.0): ([7.0, 2, 1], [0, 0, 0, 0], [0, 0, 0, 0]),  # P2: (0.7, 0.2, bg 0.1)
        (1, 12.0, 10.0, 32.0, 30.0): ([5.0, 4, 1], [0, 0, 0, 0], [0.0, 0, 0, 5 * ln2]),  # P3: (0.5, 0.4, bg 0.1)
    }

    # The head sees each RoI's own row (image, box) as its "feature" and answers that RoI's outputs.
    def hand_made_head(roi_feats):
        outputs = [head[tuple(row.tolist())] for row in roi_feats[:, :, 0, 0]]
        cls_logits = torch.tensor([probabilities for probabilities, _, _ in outputs]).log()
        box_deltas = torch.tensor([[*class_0, *class_1] for _, class_0, class_1 in outputs])
        return cls_logits, box_deltas

    model.roi_features = lambda feats, rois: rois[:, :, None, None]
    model._head = hand_made_head
    detections = model.predict(torch.zeros(2, 3, 32, 64), score_thresh=0.25, nms_thresh=0.5, max_detections=2)
    assert len(detections) == 2
    # Image 0 above 0.25: P1 class 1 (0.8): dw = 5 ln 2 / 5 doubles the width to 40 around x = 50: (30, 8, 70, 30),
    # clipped to the 64-wide image: (30, 8, 64, 30); P0 class 0 (0.6), P0 itself; P0 class 1 (0.3): dx = 5/10 moves
    # P0 by half its width, (12, 4, 28, 20). At most 2 per image: the 0.3 one goes.
    assert detections[0]["labels"].tolist() == [1, 0]
    assert_close(detections[0]["scores"], torch.tensor([0.8, 0.6]))
    assert_close(detections[0]["boxes"], torch.tensor([[30.0, 8, 64, 30], [4.0, 4, 20, 20]]))
    # Image 1: P2 class 0 (0.7); P3 class 0 (0.5) overlaps it with IoU 360/440 = 0.82: suppressed; P3 class 1 (0.4):
    # height doubled to 40 around y = 20, clipped to the 32-high image: (12, 0, 32, 32); it overlaps P2 by 0.53, but
    # is another class. P2 class 1 (0.2) is below the threshold.
    assert detections[1]["labels"].tolist() == [0, 1]
    assert_close(detections[1]["scores"], torch.tensor([0.7, 0.4]))
    assert_close(detections[1]["boxes"], torch.tensor([[10.0, 10, 30, 30], [12.0, 0, 32, 32]]))

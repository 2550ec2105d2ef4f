"""FCOS: Fully Convolutional One-Stage object detection (Tian et al., ICCV 2019).

Shapes use the dimension letters and box conventions of ``common.py``'s docstring.
"""

import dataclasses
import math
import os
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.nn import functional as F

from common import (
    BACKGROUND,
    FPN_LEVELS,
    FPN_STRIDES,
    NMS_THRESH,
    SCORE_THRESH,
    DetectorBackboneWithFPN,
    TensorDict,
    batched_class_nms,
    cat_across_fpn_levels,
    check_gt_classes,
    clip_boxes_to_image,
    conv_stem,
    fpn_locations_of,
    is_background,
    single_image_inference,
)
from distributed import mean_over_ranks


def hello_one_stage_detector():
    print("Hello from one_stage_detector.py!")


def _flatten_head_output(x: torch.Tensor) -> torch.Tensor:
    B, C, Hl, Wl = x.shape
    return x.permute(0, 2, 3, 1).reshape(B, Hl * Wl, C)  # (B, C, Hl, Wl) -> (B, HlWl, C), row-major


class FCOSPredictionNetwork(nn.Module):
    """FCOS head shared by all FPN levels: class logits, LTRB box deltas and centerness logits.

    Box regression and centerness share one stem (the FCOS paper's later placement of the
    centerness branch, which works better than putting it next to classification). The defaults
    are the course's head; ``improved_fcos_head`` turns the three options on.

    Attributes (the tests and the notebook look for these names): ``stem_cls`` and ``stem_box``, the
    two stems (``nn.Sequential`` of 3x3 convs); ``pred_cls``, ``pred_box`` and ``pred_ctr``, the 3x3
    output convs (K, 4 and 1 channels); ``scales``, the per-level scales or ``None``.

    Args:
        num_classes: K, without background.
        in_channels: FPN channels C.
        stem_channels: channels of each 3x3 conv of the two stems, e.g. ``[64, 64]``.
        group_norm: GroupNorm after each stem conv (FCOS journal version, Tian et al. TPAMI 2022,
            4.1; see ``common.conv_stem``). One head serves all levels, whose features differ in
            scale; GroupNorm evens them out.
        learnable_scales: multiply each level's box deltas by a trainable scalar, initially 1
            (FCOS 3.2, last paragraph): the head is shared by all levels, and the scalar lets each
            level choose its own output range.
        nonnegative_deltas: pass the box deltas through a ReLU, as the FCOS authors' code does with
            stride-normalised targets (and torchvision): distances to the sides are never negative,
            so every predicted box contains its location, in training as at test time. Off in the
            course's head, whose L1 loss would get no gradient from a negative output.
        num_levels: how many FPN levels the head serves (one learnable scale each).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        stem_channels: Sequence[int],
        *,
        group_norm: bool = False,
        learnable_scales: bool = False,
        nonnegative_deltas: bool = False,
        num_levels: int = len(FPN_STRIDES),
    ):
        # BEGIN SOLUTION
        super().__init__()
        self.nonnegative_deltas = nonnegative_deltas
        self.stem_cls, stem_out = conv_stem(in_channels, stem_channels, group_norm)
        self.stem_box, _ = conv_stem(in_channels, stem_channels, group_norm)
        self.scales = nn.Parameter(torch.ones(num_levels)) if learnable_scales else None
        self.pred_cls = nn.Conv2d(stem_out, num_classes, 3, padding=1)
        self.pred_box = nn.Conv2d(stem_out, 4, 3, padding=1)
        self.pred_ctr = nn.Conv2d(stem_out, 1, 3, padding=1)
        for conv in (self.pred_cls, self.pred_box, self.pred_ctr):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        # RetinaNet 4.1 / FCOS 3.1: start every class at probability 0.01 so that the many
        # background locations do not swamp the focal loss in the first iterations.
        nn.init.constant_(self.pred_cls.bias, -math.log(99))
        if nonnegative_deltas:
            # Every box starts one stride from its location on each side, not as a point. A point-sized
            # box gets no gradient from an IoU loss (its area is a product of two zero lengths), and
            # once an update pushes the outputs below zero the ReLU passes none either: the box head
            # would stay dead for the whole run (seen with AdamW and augmentation, docs/data.md).
            nn.init.constant_(self.pred_box.bias, 1.0)
        # END SOLUTION

    def forward(self, feats_per_fpn_level: TensorDict) -> List[TensorDict]:
        """Args: {level: (B, C, Hl, Wl)}.

        Returns:
            ``[class_logits, boxreg_deltas, centerness_logits]``, each ``{level: (B, Hl*Wl, K | 4 | 1)}``.
        """
        # BEGIN SOLUTION
        class_logits, boxreg_deltas, centerness_logits = {}, {}, {}
        for level_index, (level, feats) in enumerate(feats_per_fpn_level.items()):
            box_feats = self.stem_box(feats)
            class_logits[level] = _flatten_head_output(self.pred_cls(self.stem_cls(feats)))
            deltas = self.pred_box(box_feats)
            if self.scales is not None:
                deltas = deltas * self.scales[level_index]
            if self.nonnegative_deltas:
                deltas = F.relu(deltas)
            boxreg_deltas[level] = _flatten_head_output(deltas)
            centerness_logits[level] = _flatten_head_output(self.pred_ctr(box_feats))
        return [class_logits, boxreg_deltas, centerness_logits]
        # END SOLUTION


def improved_fcos_head(
    num_classes: int, in_channels: int, stem_channels: Sequence[int], num_levels: int = len(FPN_STRIDES)
) -> FCOSPredictionNetwork:
    """The head of the improved FCOS (and of ``FCOSProposalNetwork``): GroupNorm, a learnable scale per
    level and non-negative deltas, as in the FCOS authors' later code and torchvision. On
    ``benchmarks/bench_accuracy_vs_torchvision.py`` GroupNorm alone triples the course's mAP
    (docs/accuracy.md)."""
    return FCOSPredictionNetwork(
        num_classes,
        in_channels,
        stem_channels,
        group_norm=True,
        learnable_scales=True,
        nonnegative_deltas=True,
        num_levels=num_levels,
    )


def _fcos_size_range(level_index: int, num_levels: int, stride: int) -> Tuple[float, float]:
    """FCOS 3.2: level l regresses objects whose largest LTRB distance is in (4 s_l, 8 s_l);
    the finest level takes everything smaller and the coarsest everything larger.
    With strides 8, 16, 32: p3 (0, 64), p4 (64, 128), p5 (128, inf); with p2 in front (stride 4)
    p2 takes (0, 32) and p3 (32, 64)."""
    lower = 0.0 if level_index == 0 else 4.0 * stride
    upper = math.inf if level_index == num_levels - 1 else 8.0 * stride
    return lower, upper


@torch.no_grad()
def fcos_match_locations_to_gt(
    locations_per_fpn_level: TensorDict,
    strides_per_fpn_level: Mapping[str, int],
    gt_boxes: torch.Tensor,
    center_sampling_radius: Optional[float] = None,
) -> TensorDict:
    """Assign each location to the ground-truth box it regresses (FCOS 3.1 and 3.2).

    A location matches a box when it lies strictly inside it and its largest LTRB distance falls
    in its level's size range (see ``_fcos_size_range``). When several boxes qualify, the one with
    the smallest area wins. Padding rows (class -1) never match.

    Args:
        locations_per_fpn_level: {level: (Hl*Wl, 2)} ``(x, y)`` centres.
        strides_per_fpn_level: {level: stride}.
        gt_boxes: (M, 5) for one image or (B, M, 5) for a batch.
        center_sampling_radius: ``None`` (the course's rule: anywhere inside the box), or ``r``:
            a location must also lie within ``r`` strides of the box's centre along x and along y
            (FCOS journal version, Tian et al. TPAMI 2022, 3.4 "center sampling"; 1.5 there and in
            torchvision). Locations near a box's border see mostly background and regress poorly;
            leaving them out gives cleaner positives, and a small box still keeps the locations
            near its centre.
    Returns:
        {level: (Hl*Wl, 5)} (or (B, Hl*Wl, 5) for a batch): the matched GT row of each location,
        ``(-1, -1, -1, -1, -1)`` for background.
    """
    # BEGIN SOLUTION
    single_image = gt_boxes.dim() == 2
    batched_gt = gt_boxes[None] if single_image else gt_boxes  # (B, M, 5)
    if batched_gt.shape[1] == 0:  # no rows at all: one padding row keeps the shapes simple
        batched_gt = batched_gt.new_full((batched_gt.shape[0], 1, 5), BACKGROUND)
    is_real = batched_gt[:, :, 4] >= 0  # (B, M)
    gt_area = (batched_gt[:, :, 2] - batched_gt[:, :, 0]) * (batched_gt[:, :, 3] - batched_gt[:, :, 1])
    background = batched_gt.new_full((5,), BACKGROUND)

    matched = {}
    for level_index, (level, locations) in enumerate(locations_per_fpn_level.items()):
        lower, upper = _fcos_size_range(level_index, len(locations_per_fpn_level), strides_per_fpn_level[level])
        x = locations[None, :, None, 0]  # (1, HlWl, 1), broadcast against (B, 1, M)
        y = locations[None, :, None, 1]
        ltrb = torch.stack(
            [
                x - batched_gt[:, None, :, 0],
                y - batched_gt[:, None, :, 1],
                batched_gt[:, None, :, 2] - x,
                batched_gt[:, None, :, 3] - y,
            ],
            dim=-1,
        )  # (B, HlWl, M, 4)
        largest = ltrb.amax(dim=-1)
        candidate = (ltrb.amin(dim=-1) > 0) & (largest > lower) & (largest < upper) & is_real[:, None, :]
        if center_sampling_radius is not None:
            centre_x = (batched_gt[:, None, :, 0] + batched_gt[:, None, :, 2]) / 2  # (B, 1, M)
            centre_y = (batched_gt[:, None, :, 1] + batched_gt[:, None, :, 3]) / 2
            radius = center_sampling_radius * strides_per_fpn_level[level]
            candidate &= ((x - centre_x).abs() < radius) & ((y - centre_y).abs() < radius)
        cost = torch.where(candidate, gt_area[:, None, :], torch.full_like(largest, math.inf))
        best_cost, best_gt = cost.min(dim=-1)  # (B, HlWl)
        level_matched = torch.gather(batched_gt, 1, best_gt[..., None].expand(-1, -1, 5))
        level_matched[torch.isinf(best_cost)] = background
        matched[level] = level_matched[0] if single_image else level_matched
    return matched
    # END SOLUTION


@dataclasses.dataclass(frozen=True)
class FCOSMatcher:
    """FCOS's matching rule as a part of the detector: ``fcos_match_locations_to_gt`` with its
    center sampling radius fixed where the detector is built.

    ``FCOSMatcher()`` is the course's rule (anywhere inside the box), ``FCOSMatcher(1.5)`` the improved
    one (``IMPROVED_MATCHER``). Calling it takes and returns what ``fcos_match_locations_to_gt`` does.

    ``size_range_scale`` multiplies every level's size range, (4 s, 8 s) for stride s: the paper's ranges
    suit its 800-pixel images, and at 128 pixels no distance reaches p5's 128. 0.5 gives p3 (0, 32), p4
    (32, 64) and p5 (64, inf). The center sampling region stays ``center_sampling_radius`` strides. On the
    accuracy benchmark's 128-pixel scenes 0.5 learned worse than 1, the default (docs/accuracy.md).
    """

    center_sampling_radius: Optional[float] = None
    size_range_scale: float = 1.0

    def __call__(
        self, locations_per_fpn_level: TensorDict, strides_per_fpn_level: Mapping[str, int], gt_boxes: torch.Tensor
    ) -> TensorDict:
        radius, scale = self.center_sampling_radius, self.size_range_scale
        if scale != 1.0:  # the ranges follow the strides: scale those, and the radius inversely
            strides_per_fpn_level = {level: stride * scale for level, stride in strides_per_fpn_level.items()}
            radius = None if radius is None else radius / scale
        return fcos_match_locations_to_gt(
            locations_per_fpn_level, strides_per_fpn_level, gt_boxes, center_sampling_radius=radius
        )


# The improved FCOS's matching: 1.5 strides, as in the FCOS authors' code and torchvision.
IMPROVED_MATCHER = FCOSMatcher(center_sampling_radius=1.5)


def fcos_get_deltas_from_locations(locations: torch.Tensor, gt_boxes: torch.Tensor, stride: int) -> torch.Tensor:
    """LTRB distances from each location to the sides of its box, divided by the stride (FCOS eq. 1).

    Args:
        locations: (N, 2) ``(x, y)``; gt_boxes: (N, 4 | 5), background rows all -1; stride: int.
    Returns:
        (N, 4) deltas ``(l, t, r, b) / stride``; background rows give ``-1``.
    """
    # BEGIN SOLUTION
    x, y = locations[:, 0], locations[:, 1]
    deltas = (
        torch.stack([x - gt_boxes[:, 0], y - gt_boxes[:, 1], gt_boxes[:, 2] - x, gt_boxes[:, 3] - y], dim=1) / stride
    )
    return deltas.masked_fill(is_background(gt_boxes)[:, None], BACKGROUND)
    # END SOLUTION


def fcos_apply_deltas_to_locations(deltas: torch.Tensor, locations: torch.Tensor, stride: int) -> torch.Tensor:
    """Inverse of ``fcos_get_deltas_from_locations``: LTRB deltas back to boxes.

    Negative deltas (including the background's -1) count as 0, so a box always contains its
    location and never inverts.

    Args:
        deltas: (N, 4); locations: (N, 2); stride: int.
    Returns:
        (N, 4) boxes ``(x1, y1, x2, y2)``.
    """
    # BEGIN SOLUTION
    distances = deltas.clamp(min=0) * stride
    x, y = locations[:, 0], locations[:, 1]
    return torch.stack([x - distances[:, 0], y - distances[:, 1], x + distances[:, 2], y + distances[:, 3]], dim=1)
    # END SOLUTION


def fcos_make_centerness_targets(deltas: torch.Tensor) -> torch.Tensor:
    """FCOS eq. 3: ``sqrt(min(l, r) min(t, b) / (max(l, r) max(t, b)))``.

    Args:
        deltas: (N, 4) LTRB deltas, background rows all -1.
    Returns:
        (N,) centerness in [0, 1]; background rows give -1.
    """
    # BEGIN SOLUTION
    left_right, top_bottom = deltas[:, 0::2], deltas[:, 1::2]
    ratio = (left_right.amin(dim=1) * top_bottom.amin(dim=1)) / (left_right.amax(dim=1) * top_bottom.amax(dim=1)).clamp(
        min=torch.finfo(deltas.dtype).tiny
    )
    centerness = ratio.clamp(min=0).sqrt()
    return centerness.masked_fill(is_background(deltas), BACKGROUND)
    # END SOLUTION


def _ltrb_area(deltas: torch.Tensor) -> torch.Tensor:
    """(N, 4) LTRB distances -> (N,) area of the box they span; an inverted side counts as 0."""
    return (deltas[:, 0] + deltas[:, 2]).clamp(min=0) * (deltas[:, 1] + deltas[:, 3]).clamp(min=0)


def fcos_giou_loss(pred_deltas: torch.Tensor, target_deltas: torch.Tensor) -> torch.Tensor:
    """Generalised IoU loss (Rezatofighi et al. 2019) between boxes that share one location.

    Both boxes are given as LTRB distances from the same point, so intersections and enclosing
    boxes are sums of per-side minima and maxima (as in UnitBox / FCOS's IoU loss). Negative
    predicted distances are allowed and simply shrink the predicted box.

    Args:
        pred_deltas, target_deltas: (N, 4) LTRB.
    Returns:
        (N,) ``1 - GIoU``.
    """
    # BEGIN SOLUTION
    inner = torch.minimum(pred_deltas, target_deltas)
    outer = torch.maximum(pred_deltas, target_deltas)
    pred_area, target_area = _ltrb_area(pred_deltas), _ltrb_area(target_deltas)
    intersection, enclosing = _ltrb_area(inner), _ltrb_area(outer)
    union = pred_area + target_area - intersection
    tiny = torch.finfo(pred_deltas.dtype).tiny
    giou = intersection / union.clamp(min=tiny) - (enclosing - union) / enclosing.clamp(min=tiny)
    return 1.0 - giou
    # END SOLUTION


def fcos_l1_loss(pred_deltas: torch.Tensor, target_deltas: torch.Tensor) -> torch.Tensor:
    """The course's box loss: L1 on the four LTRB deltas, summed and weighted 0.25 (their mean).

    Args:
        pred_deltas, target_deltas: (N, 4) LTRB.
    Returns:
        (N,) loss of each pair.
    """
    # BEGIN SOLUTION
    return 0.25 * (pred_deltas - target_deltas).abs().sum(dim=1)
    # END SOLUTION


def sigmoid_focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Sigmoid focal loss (RetinaNet, Lin et al. 2017, eq. 5, the alpha-balanced form) of every element.

    With ``p = sigmoid(logit)``, ``p_t = p`` where the target is 1 and ``1 - p`` where it is 0, and
    ``alpha_t = alpha`` where it is 1 and ``1 - alpha`` where it is 0::

        FL(p_t) = -alpha_t * (1 - p_t) ** gamma * log(p_t)

    ``-log(p_t)`` is the binary cross-entropy of the logit, computed from the logit (stable for large
    ones). The factor ``(1 - p_t) ** gamma`` shrinks the loss of the many easy, well-classified
    elements (background locations); ``gamma = 0`` and ``alpha = 0.5`` give half the cross-entropy.
    Equal to ``torchvision.ops.sigmoid_focal_loss(..., reduction="none")`` (values and gradients).

    Args:
        logits: any shape; targets: the same shape, 1 for the class present and 0 elsewhere.
        alpha: weight of the positive (target 1) terms, ``1 - alpha`` of the others.
        gamma: the focusing exponent.
    Returns:
        The loss of each element, the shape of ``logits`` (no reduction).
    """
    # BEGIN SOLUTION
    p = torch.sigmoid(logits)
    cross_entropy = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")  # -log(p_t)
    p_t = p * targets + (1 - p) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return alpha_t * (cross_entropy * (1 - p_t) ** gamma)
    # END SOLUTION


# A box loss: (N, 4) predicted and (N, 4) target LTRB deltas -> (N,) loss of each pair.
BoxLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# A matching rule: (locations per level, strides per level, gt_boxes) -> matched GT row per level.
Matcher = Callable[[TensorDict, Mapping[str, int], torch.Tensor], TensorDict]


@torch.no_grad()
def fcos_make_targets(
    locations_per_fpn_level: TensorDict,
    strides_per_fpn_level: Mapping[str, int],
    gt_boxes: torch.Tensor,
    matcher: Matcher = FCOSMatcher(),
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Training targets of every location of a batch, levels concatenated in order p3, p4, p5.

    Args:
        locations_per_fpn_level: {level: (Hl*Wl, 2)}; strides_per_fpn_level: {level: stride};
        gt_boxes: (B, M, 5); matcher: the matching rule (``FCOSMatcher``; the course's by default).
    Returns:
        matched_gt_boxes (B, HW, 5) (``fcos_match_locations_to_gt``) and target_deltas (B, HW, 4)
        (``fcos_get_deltas_from_locations``; background -1).
    """
    B = gt_boxes.shape[0]
    matched = matcher(locations_per_fpn_level, strides_per_fpn_level, gt_boxes)
    target_deltas = {
        level: fcos_get_deltas_from_locations(
            locations_per_fpn_level[level].repeat(B, 1), matched[level].flatten(0, 1), strides_per_fpn_level[level]
        ).view(B, -1, 4)  # (B*HlWl, 4) -> (B, HlWl, 4)
        for level in matched
    }
    return cat_across_fpn_levels(matched), cat_across_fpn_levels(target_deltas)


@torch.no_grad()
def fcos_object_balance_weights(matched_gt_boxes: torch.Tensor, gt_boxes: torch.Tensor, power: float) -> torch.Tensor:
    """Loss weights of the foreground locations that make objects with few locations count more.

    FCOS weighs every foreground location alike, so an object counts as often as it has locations:
    at stride 8 with center sampling, a 40-px box has 9 of them and a 10-px box one or two, which then
    barely moves the loss. Here a location of an object with ``n`` locations (in this batch) gets a
    weight proportional to ``n ** -power``: ``0`` is FCOS, ``1`` makes every object count once, as
    each object does in set-prediction detectors (DETR, Carion et al. 2020, where it has one match),
    ``0.5`` is in between. The weights are scaled to add up to the number of foreground locations,
    so the loss keeps FCOS's size. Under DDP the scale is that of the global batch (sums over all
    ranks), so that the ranks together weigh as one process with all their images would.

    Args:
        matched_gt_boxes: (B, HW, 5) from ``fcos_make_targets``; gt_boxes: (B, M, 5), the rows they came
            from (a location's object is the GT row equal to its match); power: as above.
    Returns:
        (B, HW) weights; 0 at background locations.
    """
    foreground = matched_gt_boxes[..., 4] >= 0  # (B, HW)
    if gt_boxes.shape[1] == 0:  # no rows: one padding row keeps the shapes (no early return: under DDP
        gt_boxes = gt_boxes.new_full((gt_boxes.shape[0], 1, 5), BACKGROUND)  # every rank joins the all-reduce)
    # Which GT row each foreground location copies: compared on the four coordinates and the class. Equal
    # rows (a box annotated twice) count as one object; padding rows never equal a foreground match.
    same = (matched_gt_boxes[:, :, None, :] == gt_boxes[:, None, :, :]).all(dim=-1) & foreground[..., None]
    per_object = same.sum(dim=1, dtype=matched_gt_boxes.dtype)  # (B, M) locations of each row
    per_location = torch.where(same, per_object[:, None, :], 0.0).amax(dim=-1)  # (B, HW); 0 = background
    raw = torch.where(foreground, per_location.clamp(min=1) ** -power, 0.0)
    count, total = mean_over_ranks(torch.stack([foreground.sum().to(raw.dtype), raw.sum()]))  # one all-reduce
    return raw * (count / total.clamp(min=torch.finfo(raw.dtype).tiny)).to(raw.dtype)


def fcos_losses(
    matched_gt_boxes: torch.Tensor,
    target_deltas: torch.Tensor,
    pred_cls_logits: torch.Tensor,
    pred_boxreg_deltas: torch.Tensor,
    pred_ctr_logits: torch.Tensor,
    box_loss: BoxLoss = fcos_l1_loss,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
    foreground_weights: Optional[torch.Tensor] = None,
) -> TensorDict:
    """FCOS eq. 2 on all locations of the batch, each term divided by the number of foreground
    locations (at least 1, so that images without any box give a finite, positive class loss and
    zero box and centerness losses). Under DDP with several processes that number is the mean over
    the ranks (``distributed.mean_over_ranks``).

    Args:
        matched_gt_boxes: (B, HW, 5); target_deltas: (B, HW, 4); pred_cls_logits: (B, HW, K);
        pred_boxreg_deltas: (B, HW, 4); pred_ctr_logits: (B, HW).
        box_loss: the loss of each foreground location's box, ``fcos_l1_loss`` (the course's) or
            ``fcos_giou_loss``.
        focal_alpha, focal_gamma: ``sigmoid_focal_loss`` parameters (RetinaNet's defaults).
        foreground_weights: (B, HW) weights of each foreground location's class, box and centerness
            terms (``fcos_object_balance_weights``), or ``None`` for 1 each. Background terms keep weight 1.
    Returns:
        ``{"loss_cls", "loss_box", "loss_ctr"}`` scalars.
    """
    # BEGIN SOLUTION
    labels = matched_gt_boxes[..., 4]
    foreground = labels >= 0  # (B, HW)
    # Under DDP, the mean count over ranks: the ranks' averaged gradient is then that of one process
    # with the whole global batch (as detectron2 and mmdetection normalise).
    num_foreground = mean_over_ranks(foreground.sum()).clamp(min=1)
    num_classes = pred_cls_logits.shape[-1]
    class_targets = F.one_hot(labels.clamp(min=0).long(), num_classes).to(pred_cls_logits.dtype)
    class_targets = class_targets * foreground[..., None]

    # Box and centerness terms are computed at every location and the background ones zeroed, rather
    # than gathering the foreground first: same sums, but no data-dependent shapes, so no wait for
    # the device to count them. Background targets (-1) become a harmless unit box first.
    safe_targets = torch.where(foreground[..., None], target_deltas, 1.0).flatten(0, 1)  # (B*HW, 4)
    weights = foreground.to(pred_cls_logits.dtype) if foreground_weights is None else foreground_weights
    cls_weights = torch.where(foreground, weights, 1.0)[..., None]  # (B, HW, 1): background terms count once
    cls_terms = sigmoid_focal_loss(pred_cls_logits, class_targets, alpha=focal_alpha, gamma=focal_gamma)
    box_terms = box_loss(pred_boxreg_deltas.flatten(0, 1), safe_targets)  # (B*HW,)
    ctr_targets = fcos_make_centerness_targets(safe_targets)
    ctr_terms = F.binary_cross_entropy_with_logits(pred_ctr_logits.flatten(), ctr_targets, reduction="none")
    is_fg, fg_weights = foreground.flatten(), weights.flatten()
    return {
        "loss_cls": (cls_terms * cls_weights).sum() / num_foreground,
        "loss_box": torch.where(is_fg, box_terms * fg_weights, 0.0).sum() / num_foreground,
        "loss_ctr": torch.where(is_fg, ctr_terms * fg_weights, 0.0).sum() / num_foreground,
    }
    # END SOLUTION


def fcos_level_candidates(
    cls_logits: torch.Tensor,
    boxreg_deltas: torch.Tensor,
    ctr_logits: torch.Tensor,
    locations: torch.Tensor,
    stride: int,
    image_size: Tuple[int, int],
    topk: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FCOS 3.3 on one level for the whole batch: the ``topk`` (location, class) pairs by
    ``sqrt(class prob * centerness)``, with their boxes decoded and clipped to the image.

    ``FCOS.predict`` calls it with K classes; ``two_stage_detector.FCOSProposalNetwork`` with its one
    "object" class, to pick proposal candidates.

    Args:
        cls_logits: (B, HlWl, K); boxreg_deltas: (B, HlWl, 4); ctr_logits: (B, HlWl, 1);
        locations: (HlWl, 2); stride: the level's stride; image_size: ``(H, W)``;
        topk: pairs kept per image (fewer when the level has fewer).
    Returns:
        boxes (B, T, 4), labels (B, T) ``long``, scores (B, T), T = ``min(topk, HlWl * K)``, by decreasing score.
    """
    # BEGIN SOLUTION
    B, HlWl, K = cls_logits.shape
    scores = torch.sqrt(cls_logits.sigmoid() * ctr_logits.sigmoid()).flatten(1)  # (B, HlWl*K)
    top_scores, top_index = scores.topk(min(topk, HlWl * K), dim=1)
    location_index, labels = top_index // K, top_index % K
    deltas = torch.gather(boxreg_deltas, 1, location_index[..., None].expand(-1, -1, 4))
    boxes = fcos_apply_deltas_to_locations(deltas.flatten(0, 1), locations[location_index.flatten()], stride)
    return clip_boxes_to_image(boxes.view(B, -1, 4), image_size), labels, top_scores  # (B*T, 4) -> (B, T, 4)
    # END SOLUTION


def _required(value, name: str):
    if value is None:
        raise ValueError(f"FCOS needs {name} to build its default parts; pass it, or pass the built parts.")
    return value


class FCOS(nn.Module):
    """FCOS built from parts: a backbone with FPN, a head, a matching rule and a box loss.

    ``FCOS(num_classes, fpn_channels, stem_channels)`` builds the improved FCOS (``improved_fcos``):
    FCOS as its authors later improved it (the journal version, Tian et al., TPAMI 2022, and their
    released code, which torchvision's FCOS follows too), plus two changes for small objects. Any part
    passed in replaces the one that would be built; the course's original FCOS is ``course_fcos(...)``.
    What each part and number measured on ``benchmarks/bench_accuracy_vs_torchvision.py`` is in
    docs/accuracy.md.

    Args:
        num_classes: K.
        fpn_channels: channels of the FPN levels; needed only when ``backbone`` is not given.
        stem_channels: channels of the head's 3x3 convs, e.g. ``[64, 64]``; needed only when ``head``
            is not given.
        pretrained: the built backbone's weights, as ``DetectorBackboneWithFPN``'s ``pretrained``.
        backbone: a ``DetectorBackboneWithFPN`` (its ``levels`` say which FPN levels FCOS predicts on),
            or ``None`` for one with ``fine_p3`` (the trunk's stride-4 stage fed into p3: finer
            features for the objects that p3 holds, for one small conv).
        head: an ``FCOSPredictionNetwork`` with one scale per backbone level, or ``None`` for
            ``improved_fcos_head``.
        matcher: the matching rule, ``FCOSMatcher(center_sampling_radius)``; the default samples
            positives within 1.5 strides of a box's centre (``IMPROVED_MATCHER``).
        box_loss: ``fcos_giou_loss`` (FCOS uses an IoU loss; GIoU, Rezatofighi et al. 2019, also gives
            gradients to boxes that do not overlap yet) or ``fcos_l1_loss`` (the course's).
        object_balance: weigh each foreground location by ``n ** -object_balance``, ``n`` the number of
            locations of its object (``fcos_object_balance_weights``), so that a small object with one
            location is not outweighed nine to one by a larger neighbour. ``0`` is FCOS, ``1`` makes
            every object count once. On the benchmark ``0.5`` raised mAP@0.5 with ``fine_p3`` from 0.588
            to 0.624; ``1`` gave about the same mAP@0.5 but a lower COCO mAP.
        focal_alpha, focal_gamma: ``sigmoid_focal_loss`` parameters (RetinaNet's defaults).
        topk_candidates: per level, the most confident (location, class) pairs kept before NMS
            (1000 in the FCOS paper).
        max_detections: detections per image after NMS (100 as in COCO evaluation).
        channels_last: keep weights and activations in the channels-last layout, which makes the
            convolutions faster on GPUs with mixed precision and on most CPUs (``benchmarks/``); the
            results are the same up to float rounding.
    """

    def __init__(
        self,
        num_classes: int,
        fpn_channels: Optional[int] = None,
        stem_channels: Optional[Sequence[int]] = None,
        *,
        pretrained: Union[bool, str, os.PathLike] = True,
        backbone: Optional[DetectorBackboneWithFPN] = None,
        head: Optional[FCOSPredictionNetwork] = None,
        matcher: Matcher = IMPROVED_MATCHER,
        box_loss: BoxLoss = fcos_giou_loss,
        object_balance: float = 0.5,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        topk_candidates: int = 1000,
        max_detections: int = 100,
        channels_last: bool = True,
    ):
        super().__init__()
        if backbone is None:
            backbone = DetectorBackboneWithFPN(_required(fpn_channels, "fpn_channels"), pretrained, fine_p3=True)
        if head is None:
            stem_channels = _required(stem_channels, "stem_channels")
            head = improved_fcos_head(num_classes, backbone.out_channels, stem_channels, len(backbone.levels))
        self.num_classes = num_classes
        self.backbone = backbone
        self.pred_net = head
        self.matcher = matcher
        self.box_loss = box_loss
        self.object_balance = object_balance
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.topk_candidates = topk_candidates
        self.max_detections = max_detections
        if channels_last:  # the backbone then lays out its input images the same way
            self.to(memory_format=torch.channels_last)

    def _run_network(self, images: torch.Tensor):
        feats = self.backbone(images)
        class_logits, boxreg_deltas, centerness_logits = self.pred_net(feats)
        locations = fpn_locations_of(feats, self.backbone.fpn_strides, torch.promote_types(images.dtype, torch.float32))
        return locations, class_logits, boxreg_deltas, centerness_logits

    def forward(
        self,
        images: torch.Tensor,
        gt_boxes: Optional[torch.Tensor] = None,
        test_score_thresh: Optional[float] = None,
        test_nms_thresh: Optional[float] = None,
    ):
        """Training: losses for a batch. Evaluation: detections for one image.

        Args:
            images: (B, 3, H, W).
            gt_boxes: (B, M, 5), needed in training mode.
            test_score_thresh, test_nms_thresh: evaluation thresholds (``None``: ``common.SCORE_THRESH``
                and ``common.NMS_THRESH``, as ``predict``).
        Returns:
            Training: ``{"loss_cls", "loss_box", "loss_ctr"}`` scalars.
            Evaluation (B = 1): ``(pred_boxes (N, 4), pred_classes (N,), pred_scores (N,))``.
        """
        if not self.training:
            return self.inference(images, test_score_thresh, test_nms_thresh)
        if gt_boxes is None:
            raise ValueError("FCOS needs gt_boxes in training mode; call detector.eval() for inference.")
        check_gt_classes(gt_boxes, self.num_classes)
        locations, class_logits, boxreg_deltas, centerness_logits = self._run_network(images)
        matched_gt_boxes, target_deltas = fcos_make_targets(
            locations, self.backbone.fpn_strides, gt_boxes, self.matcher
        )
        weights = None
        if self.object_balance:
            weights = fcos_object_balance_weights(matched_gt_boxes, gt_boxes, self.object_balance)
        return fcos_losses(
            matched_gt_boxes,
            target_deltas,
            cat_across_fpn_levels(class_logits),
            cat_across_fpn_levels(boxreg_deltas),
            cat_across_fpn_levels(centerness_logits).squeeze(-1),
            box_loss=self.box_loss,
            focal_alpha=self.focal_alpha,
            focal_gamma=self.focal_gamma,
            foreground_weights=weights,
        )

    @torch.no_grad()
    def inference(
        self,
        images: torch.Tensor,
        test_score_thresh: Optional[float] = None,
        test_nms_thresh: Optional[float] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Detections for one image as the course's triple ``(boxes (N,4), classes (N,), scores (N,))``."""
        return single_image_inference(self, images, test_score_thresh, test_nms_thresh)

    @torch.no_grad()
    def predict(
        self, images: torch.Tensor, score_thresh: float = SCORE_THRESH, nms_thresh: float = NMS_THRESH
    ) -> List[Dict[str, torch.Tensor]]:
        """Batched inference (FCOS 3.3): score = sqrt(class prob * centerness), the top
        ``topk_candidates`` (location, class) pairs per level above ``score_thresh``, boxes clipped
        to the image, class-specific NMS, at most ``max_detections`` per image.

        Args:
            images: (B, 3, H, W).
        Returns:
            B dicts ``{"boxes": (N, 4), "labels": (N,) long, "scores": (N,)}``.
        """
        # BEGIN SOLUTION
        B, _, H, W = images.shape
        locations, *head_outputs = self._run_network(images)
        # Scores and boxes in float32 even when the network ran in bf16 (8 bits are too coarse for pixels).
        class_logits, boxreg_deltas, centerness_logits = (
            {level: x.float() for level, x in output.items()} for output in head_outputs
        )
        candidates = [
            fcos_level_candidates(
                class_logits[level],
                boxreg_deltas[level],
                centerness_logits[level],
                locations[level],
                self.backbone.fpn_strides[level],
                (H, W),
                self.topk_candidates,
            )
            for level in class_logits
        ]
        boxes, labels, scores = (torch.cat(parts, dim=1).flatten(0, 1) for parts in zip(*candidates))  # (B * LT, ...)
        image_ids = torch.arange(B, device=images.device).repeat_interleave(boxes.shape[0] // B)
        keep = scores > score_thresh
        boxes, labels, scores, image_ids = boxes[keep], labels[keep], scores[keep], image_ids[keep]
        parts = batched_class_nms(
            boxes, scores, labels, image_ids, B, self.num_classes, nms_thresh, self.max_detections
        )
        return [{"boxes": boxes[part], "labels": labels[part], "scores": scores[part]} for part in parts]
        # END SOLUTION


def improved_fcos(
    num_classes: int,
    fpn_channels: int,
    stem_channels: Sequence[int],
    *,
    pretrained: Union[bool, str, os.PathLike] = True,
    fpn_levels: Sequence[str] = FPN_LEVELS,
    fine_p3: bool = True,
    object_balance: float = 0.5,
    **options,
) -> FCOS:
    """Today's default FCOS, what ``FCOS(num_classes, fpn_channels, stem_channels)`` builds: the
    improved head (``improved_fcos_head``), center sampling (``IMPROVED_MATCHER``), the GIoU loss,
    ``fine_p3`` and ``object_balance=0.5``. On the accuracy benchmark it reaches 1.13x torchvision's
    FCOS mAP@0.5 (docs/accuracy.md).

    Args:
        num_classes, fpn_channels, stem_channels, pretrained: as ``FCOS``'s.
        fpn_levels: ``FPN_LEVELS`` (p3-p5, as in the paper) or ``P2_LEVELS``: a level of stride 4 in
            front takes the objects whose largest distance from a location is under 32 px. On the
            benchmark p2 raised mAP@0.5 by about a third, mostly on objects under 16 px; it is not the
            default because the head then runs on four times as many locations, which doubles a
            training step at 224 px with 64 channels on a CPU.
        fine_p3: the backbone's ``fine_p3``; object_balance: as ``FCOS``'s.
        options: any other keyword argument of ``FCOS`` (``topk_candidates``, ``channels_last``, ...).
    """
    backbone = DetectorBackboneWithFPN(fpn_channels, pretrained, levels=fpn_levels, fine_p3=fine_p3)
    return FCOS(num_classes, stem_channels=stem_channels, backbone=backbone, object_balance=object_balance, **options)


def course_fcos_parts(
    num_classes: int, in_channels: int, stem_channels: Sequence[int], num_levels: int = len(FPN_STRIDES)
) -> Dict[str, object]:
    """The course's head, matching rule and box loss, as keyword arguments of ``FCOS`` (``course_fcos``)
    or of ``FCOSProposalNetwork``: the plain head (``FCOSPredictionNetwork`` without options), positives
    anywhere inside a box (``FCOSMatcher()``) and the L1 box loss (``fcos_l1_loss``)."""
    head = FCOSPredictionNetwork(num_classes, in_channels, stem_channels, num_levels=num_levels)
    return {"head": head, "matcher": FCOSMatcher(), "box_loss": fcos_l1_loss}


def course_fcos(
    num_classes: int,
    fpn_channels: int,
    stem_channels: Sequence[int],
    *,
    pretrained: Union[bool, str, os.PathLike] = True,
    fpn_levels: Sequence[str] = FPN_LEVELS,
    fine_p3: bool = False,
    object_balance: float = 0.0,
    **options,
) -> FCOS:
    """The course's original FCOS, which the notebook builds step by step (``course_fcos_parts``),
    without ``fine_p3`` and without the object balance.

    Args: as ``improved_fcos``'s, with the course's values as defaults.
    """
    backbone = DetectorBackboneWithFPN(fpn_channels, pretrained, levels=fpn_levels, fine_p3=fine_p3)
    parts = course_fcos_parts(num_classes, fpn_channels, stem_channels, len(backbone.levels))
    return FCOS(num_classes, backbone=backbone, object_balance=object_balance, **parts, **options)

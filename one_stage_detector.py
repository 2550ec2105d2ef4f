"""FCOS: Fully Convolutional One-Stage object detection (Tian et al., ICCV 2019).

Shapes use the dimension letters and box conventions of ``common.py``'s docstring.
"""

import math
import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import sigmoid_focal_loss

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
    iou,
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
    centerness branch, which works better than putting it next to classification).

    Args:
        num_classes: K, without background.
        in_channels: FPN channels C.
        stem_channels: channels of each 3x3 conv of the two stems, e.g. ``[64, 64]``.
        group_norm: GroupNorm after each stem conv (FCOS journal version, Tian et al. TPAMI 2022,
            4.1; see ``common.conv_stem``). Off in the course's head.
        learnable_scales: multiply each level's box deltas by a trainable scalar, initially 1
            (FCOS 3.2, last paragraph): the head is shared by all levels, and the scalar lets each
            level choose its own output range. Off in the course's head.
        nonnegative_deltas: pass the box deltas through a ReLU, as the FCOS authors' code does with
            stride-normalised targets (and torchvision): distances to the sides are never negative,
            so every predicted box contains its location, in training as at test time. Off in the
            course's head, whose L1 loss would get no gradient from a negative output.
        exp_deltas: box deltas ``exp(x)`` (after the level's scale, as in FCOS 3.2) instead of ``x``
            or ``relu(x)``: positive too, and the network's output is then the logarithm of the
            distance, so an error of a given size costs a small box as much as a large one, relative
            to its size. With ``relu`` the same additive error that is harmless for a 60-px box
            doubles a 10-px one. ``nonnegative_deltas`` then has no effect.
        num_levels: how many FPN levels the head serves (one learnable scale each).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        stem_channels: Sequence[int],
        group_norm: bool = False,
        learnable_scales: bool = False,
        nonnegative_deltas: bool = False,
        exp_deltas: bool = False,
        num_levels: int = len(FPN_STRIDES),
    ):
        # BEGIN SOLUTION
        super().__init__()
        self.nonnegative_deltas = nonnegative_deltas
        self.exp_deltas = exp_deltas
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
        if nonnegative_deltas and not exp_deltas:
            # Every box starts one stride from its location on each side, not as a point. A point-sized
            # box gets no gradient from an IoU loss (its area is a product of two zero lengths), and
            # once an update pushes the outputs below zero the ReLU passes none either: the box head
            # would stay dead for the whole run (seen with AdamW and augmentation, README).
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
            if self.exp_deltas:  # at most e^10 strides: no overflow, even in half precision
                deltas = deltas.clamp(max=10.0).exp()
            elif self.nonnegative_deltas:
                deltas = F.relu(deltas)
            boxreg_deltas[level] = _flatten_head_output(deltas)
            centerness_logits[level] = _flatten_head_output(self.pred_ctr(box_feats))
        return [class_logits, boxreg_deltas, centerness_logits]
        # END SOLUTION


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


@torch.no_grad()
def atss_match_locations_to_gt(
    locations_per_fpn_level: TensorDict,
    strides_per_fpn_level: Mapping[str, int],
    gt_boxes: torch.Tensor,
    topk: int = 9,
    anchor_scale: float = 8.0,
) -> TensorDict:
    """Adaptive training sample selection (ATSS; Zhang et al., CVPR 2020, 3.2), a drop-in
    replacement for ``fcos_match_locations_to_gt`` that needs no size ranges.

    Each location stands for a square "anchor" of side ``anchor_scale * stride``. For each box,
    the ``topk`` locations of every level closest to its centre are candidates; those whose
    anchor's IoU with the box reaches the mean plus the standard deviation of the candidates'
    IoUs, and that lie strictly inside the box, are positives. A location positive for several
    boxes takes the one with the highest IoU. The threshold adapts to each box: a box that fits one
    level well gets its positives there, and a box between two levels gets them on both.

    Args:
        locations_per_fpn_level, strides_per_fpn_level, gt_boxes: as ``fcos_match_locations_to_gt``.
        topk: candidates per level and box (9 in the paper).
        anchor_scale: anchor side in strides (8 in the paper, as RetinaNet's smallest anchor).
    Returns:
        As ``fcos_match_locations_to_gt``.
    """
    single_image = gt_boxes.dim() == 2
    batched_gt = gt_boxes[None] if single_image else gt_boxes  # (B, M, 5)
    if batched_gt.shape[1] == 0:  # no rows at all: one padding row keeps the shapes simple
        batched_gt = batched_gt.new_full((batched_gt.shape[0], 1, 5), BACKGROUND)
    B, M, _ = batched_gt.shape
    levels = list(locations_per_fpn_level)
    sizes = [locations_per_fpn_level[level].shape[0] for level in levels]
    locations = torch.cat([locations_per_fpn_level[level] for level in levels])  # (N, 2)
    half_side = torch.cat(
        [locations.new_full((n,), anchor_scale * strides_per_fpn_level[level] / 2) for level, n in zip(levels, sizes)]
    )
    anchors = torch.cat([locations - half_side[:, None], locations + half_side[:, None]], dim=1)  # (N, 4)
    overlaps = iou(anchors, batched_gt[:, :, :4].flatten(0, 1)).view(-1, B, M).transpose(0, 1)  # (N, BM) -> (B, N, M)

    gt_centres = (batched_gt[:, :, :2] + batched_gt[:, :, 2:4]) / 2  # (B, M, 2)
    distance = torch.cdist(locations[None].expand(B, -1, -1), gt_centres)  # (B, N, M)
    candidate = torch.zeros_like(overlaps, dtype=torch.bool)
    start = 0
    for n in sizes:  # the topk nearest of each level
        nearest = distance[:, start : start + n].topk(min(topk, n), dim=1, largest=False).indices  # (B, k, M)
        candidate[:, start : start + n].scatter_(1, nearest, True)
        start += n
    candidate_iou = torch.where(candidate, overlaps, torch.nan)
    threshold = candidate_iou.nanmean(dim=1) + _nanstd(candidate_iou)  # (B, M)

    x, y = locations[None, :, None, 0], locations[None, :, None, 1]  # (1, N, 1)
    inside = (
        (x > batched_gt[:, None, :, 0])
        & (y > batched_gt[:, None, :, 1])
        & (x < batched_gt[:, None, :, 2])
        & (y < batched_gt[:, None, :, 3])
    )  # (B, N, M)
    is_real = batched_gt[:, None, :, 4] >= 0
    positive = candidate & (overlaps >= threshold[:, None, :]) & inside & is_real
    best_iou, best_gt = torch.where(positive, overlaps, -1.0).max(dim=-1)  # (B, N)
    matched = torch.gather(batched_gt, 1, best_gt[..., None].expand(-1, -1, 5))
    matched[best_iou < 0] = batched_gt.new_full((5,), BACKGROUND)
    per_level = dict(zip(levels, matched.split(sizes, dim=1)))
    return {level: m[0] for level, m in per_level.items()} if single_image else per_level


def _nanstd(x: torch.Tensor) -> torch.Tensor:
    """Sample standard deviation over dim 1, ignoring NaNs (torch has ``nanmean`` but no ``nanstd``)."""
    count = (~torch.isnan(x)).sum(dim=1)
    variance = ((x - x.nanmean(dim=1, keepdim=True)) ** 2).nansum(dim=1) / (count - 1).clamp(min=1)
    return variance.sqrt()


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


def fcos_ltrb_iou(pred_deltas: torch.Tensor, target_deltas: torch.Tensor) -> torch.Tensor:
    """IoU of boxes that share one location, given as LTRB distances from it.

    Args:
        pred_deltas, target_deltas: (N, 4) LTRB.
    Returns:
        (N,) IoU in [0, 1].
    """
    intersection = _ltrb_area(torch.minimum(pred_deltas, target_deltas))
    union = _ltrb_area(pred_deltas) + _ltrb_area(target_deltas) - intersection
    return intersection / union.clamp(min=torch.finfo(pred_deltas.dtype).tiny)


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


@torch.no_grad()
def fcos_make_targets(
    locations_per_fpn_level: TensorDict,
    strides_per_fpn_level: Mapping[str, int],
    gt_boxes: torch.Tensor,
    center_sampling_radius: Optional[float] = None,
    matching: str = "fcos",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Training targets of every location of a batch, levels concatenated in order p3, p4, p5.

    Args:
        locations_per_fpn_level: {level: (Hl*Wl, 2)}; strides_per_fpn_level: {level: stride};
        gt_boxes: (B, M, 5); center_sampling_radius: as ``fcos_match_locations_to_gt``'s.
        matching: ``"fcos"`` (``fcos_match_locations_to_gt``) or ``"atss"`` (``atss_match_locations_to_gt``,
            which ignores ``center_sampling_radius``).
    Returns:
        matched_gt_boxes (B, HW, 5) (``fcos_match_locations_to_gt``) and target_deltas (B, HW, 4)
        (``fcos_get_deltas_from_locations``; background -1).
    """
    B = gt_boxes.shape[0]
    if matching == "atss":
        matched = atss_match_locations_to_gt(locations_per_fpn_level, strides_per_fpn_level, gt_boxes)
    elif matching == "fcos":
        matched = fcos_match_locations_to_gt(
            locations_per_fpn_level, strides_per_fpn_level, gt_boxes, center_sampling_radius
        )
    else:
        raise ValueError(f"matching must be 'fcos' or 'atss', got {matching!r}")
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
    box_loss: str = "l1",
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
    centerness_weighted_box_loss: bool = False,
    quality_focal: bool = False,
    foreground_weights: Optional[torch.Tensor] = None,
) -> TensorDict:
    """FCOS eq. 2 on all locations of the batch, each term divided by the number of foreground
    locations (at least 1, so that images without any box give a finite, positive class loss and
    zero box and centerness losses). Under DDP with several processes that number is the mean over
    the ranks (``distributed.mean_over_ranks``).

    Args:
        matched_gt_boxes: (B, HW, 5); target_deltas: (B, HW, 4); pred_cls_logits: (B, HW, K);
        pred_boxreg_deltas: (B, HW, 4); pred_ctr_logits: (B, HW).
        box_loss, focal_alpha, focal_gamma: as ``FCOS``'s arguments.
        centerness_weighted_box_loss: weight each foreground location's box term by its centerness
            target and divide by their sum instead of the count (the FCOS authors' released code
            and mmdetection's FCOS): locations near a box's centre, whose boxes the centerness
            branch ranks first at test time, weigh most, and off-centre ones, which see little of
            the object, weigh little.
        quality_focal: the class target of a foreground location is the IoU of its predicted box
            with its ground truth instead of 1, under the quality focal loss
            ``|target - p|^gamma * BCE(p, target)`` (Li et al., Generalized Focal Loss, NeurIPS 2020, 3):
            the class score then also says how good the box is, so that NMS keeps the best boxes.
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
    pred_deltas = pred_boxreg_deltas.flatten(0, 1)  # (B*HW, 4)
    safe_targets = torch.where(foreground[..., None], target_deltas, 1.0).flatten(0, 1)
    weights = foreground.to(pred_cls_logits.dtype) if foreground_weights is None else foreground_weights
    cls_weights = torch.where(foreground, weights, 1.0)[..., None]  # (B, HW, 1): background terms count once
    if quality_focal:
        quality = fcos_ltrb_iou(pred_deltas.detach(), safe_targets).view_as(labels)  # (B*HW,) -> (B, HW)
        class_targets = class_targets * quality[..., None]
        modulation = (pred_cls_logits.sigmoid() - class_targets).abs().pow(focal_gamma)
        bce = F.binary_cross_entropy_with_logits(pred_cls_logits, class_targets, reduction="none")
        cls_terms = modulation * bce
    else:
        cls_terms = sigmoid_focal_loss(pred_cls_logits, class_targets, alpha=focal_alpha, gamma=focal_gamma)
    loss_cls = (cls_terms * cls_weights).sum()
    if box_loss == "giou":
        box_terms = fcos_giou_loss(pred_deltas, safe_targets)
    elif box_loss == "l1":
        box_terms = 0.25 * F.l1_loss(pred_deltas, safe_targets, reduction="none").sum(dim=1)
    else:
        raise ValueError(f"box_loss must be 'l1' or 'giou', got {box_loss!r}")
    ctr_targets = fcos_make_centerness_targets(safe_targets)
    ctr_terms = F.binary_cross_entropy_with_logits(pred_ctr_logits.flatten(), ctr_targets, reduction="none")
    is_fg, fg_weights = foreground.flatten(), weights.flatten()
    loss_ctr = torch.where(is_fg, ctr_terms * fg_weights, 0.0).sum()
    if centerness_weighted_box_loss:
        box_weights = torch.where(is_fg, ctr_targets * fg_weights, 0.0)
        box_normaliser = mean_over_ranks(box_weights.sum()).clamp(min=torch.finfo(box_weights.dtype).tiny)
        loss_box = (box_weights * box_terms).sum() / box_normaliser
    else:
        loss_box = torch.where(is_fg, box_terms * fg_weights, 0.0).sum() / num_foreground
    return {
        "loss_cls": loss_cls / num_foreground,
        "loss_box": loss_box,
        "loss_ctr": loss_ctr / num_foreground,
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


# The course's original FCOS: FCOS(num_classes, fpn_channels, stem_channels, **COURSE_FCOS).
COURSE_FCOS = dict(
    box_loss="l1",
    group_norm=False,
    center_sampling_radius=None,
    learnable_scales=False,
    nonnegative_deltas=False,
    centerness_weighted_box_loss=False,
    fine_p3=False,
    object_balance=0.0,
)


class FCOS(nn.Module):
    """FCOS with a RegNetX-400MF + FPN backbone.

    The defaults are FCOS as its authors later improved it (the journal version, Tian et al.,
    TPAMI 2022, and their released code, which torchvision's FCOS follows too): GroupNorm in the
    head, center sampling, a GIoU box loss on non-negative deltas, and a learnable scale per level.
    On ``benchmarks/bench_accuracy_vs_torchvision.py`` (the README's ablation table) GroupNorm
    alone triples the course's mAP, and the others together add a little more; the
    centerness-weighted box loss of the authors' code did not help, so it is off. With these, FCOS
    learned as well as torchvision's; two changes for small objects (``fine_p3``, ``object_balance``)
    make it learn better (1.13x torchvision's mAP@0.5 there). The course's original FCOS is
    ``FCOS(..., **COURSE_FCOS)``.

    Args:
        num_classes: K.
        fpn_channels: channels of the FPN levels.
        stem_channels: channels of the head's 3x3 convs, e.g. ``[64, 64]``.
        pretrained: backbone weights, as ``DetectorBackboneWithFPN``'s ``pretrained``.
        box_loss: ``"giou"`` (FCOS uses an IoU loss; GIoU, Rezatofighi et al. 2019, also gives
            gradients to boxes that do not overlap yet) or ``"l1"`` (the course's L1 on LTRB
            deltas, weighted 0.25).
        group_norm: GroupNorm in the head's stems (``FCOSPredictionNetwork``).
        center_sampling_radius: positives only within this many strides of a box's centre, or
            ``None`` for anywhere inside it (``fcos_match_locations_to_gt``).
        learnable_scales: a trainable scale of each level's box deltas (``FCOSPredictionNetwork``).
        nonnegative_deltas: box deltas through a ReLU (``FCOSPredictionNetwork``).
        exp_deltas: box deltas through ``exp`` (``FCOSPredictionNetwork``). Off: on the benchmark it
            moved mAP@0.5 within the spread over seeds (0.545 against 0.539, README).
        centerness_weighted_box_loss: weight the box loss by the centerness targets (``fcos_losses``).
        quality_focal: IoU-aware class targets under the quality focal loss (``fcos_losses``). Off: on
            the benchmark it lowered mAP@0.5 from 0.539 to 0.517 (README).
        matching: ``"fcos"`` (size ranges and center sampling, ``fcos_match_locations_to_gt``) or
            ``"atss"`` (``atss_match_locations_to_gt``). ``"fcos"``: ATSS gave 0.525 on the benchmark.
        fine_p3: feed the trunk's stride-4 stage into p3 (``DetectorBackboneWithFPN``): finer features
            for the objects that p3 holds, for one small conv.
        object_balance: weigh each foreground location by ``n ** -object_balance``, ``n`` the number of
            locations of its object (``fcos_object_balance_weights``), so that a small object with one
            location is not outweighed nine to one by a larger neighbour. ``0`` is FCOS, ``1`` makes
            every object count once. On the benchmark ``0.5`` raised mAP@0.5 with ``fine_p3`` from 0.588
            to 0.624; ``1`` gave about the same mAP@0.5 but a lower COCO mAP (README).
        fpn_levels: ``("p3", "p4", "p5")`` as in the paper, or ``("p2", "p3", "p4", "p5")``: a level of
            stride 4 in front (``DetectorBackboneWithFPN``) takes the objects whose largest distance
            from a location is under 32 px. At stride 8 a 10-px object covers one or two locations
            and p3 barely resolves it; at the course's small images (128-224 px, where the paper
            used 800) that is a large share of the objects. On the benchmark p2 raised mAP@0.5 by
            about a third, mostly by finding objects under 16 px (README, Accuracy). It is off by
            default because it costs: the head then runs on four times as many locations, which
            doubles a training step at 224 px with 64 channels on a CPU.
        focal_alpha, focal_gamma: sigmoid focal loss parameters (RetinaNet's defaults).
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
        fpn_channels: int,
        stem_channels: Sequence[int],
        pretrained: Union[bool, str, os.PathLike] = True,
        box_loss: str = "giou",
        group_norm: bool = True,
        center_sampling_radius: Optional[float] = 1.5,
        learnable_scales: bool = True,
        nonnegative_deltas: bool = True,
        exp_deltas: bool = False,
        centerness_weighted_box_loss: bool = False,
        quality_focal: bool = False,
        matching: str = "fcos",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        topk_candidates: int = 1000,
        max_detections: int = 100,
        channels_last: bool = True,
        fine_p3: bool = True,
        object_balance: float = 0.5,
        fpn_levels: Sequence[str] = FPN_LEVELS,
    ):
        super().__init__()
        if box_loss not in ("l1", "giou"):
            raise ValueError(f"box_loss must be 'l1' or 'giou', got {box_loss!r}")
        if matching not in ("fcos", "atss"):
            raise ValueError(f"matching must be 'fcos' or 'atss', got {matching!r}")
        self.num_classes = num_classes
        self.backbone = DetectorBackboneWithFPN(fpn_channels, pretrained=pretrained, levels=fpn_levels, fine_p3=fine_p3)
        self.pred_net = FCOSPredictionNetwork(
            num_classes,
            fpn_channels,
            stem_channels,
            group_norm,
            learnable_scales,
            nonnegative_deltas,
            exp_deltas,
            num_levels=len(self.backbone.levels),
        )
        self.box_loss = box_loss
        self.center_sampling_radius = center_sampling_radius
        self.centerness_weighted_box_loss = centerness_weighted_box_loss
        self.quality_focal = quality_focal
        self.object_balance = object_balance
        self.matching = matching
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
            locations, self.backbone.fpn_strides, gt_boxes, self.center_sampling_radius, self.matching
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
            centerness_weighted_box_loss=self.centerness_weighted_box_loss,
            quality_focal=self.quality_focal,
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

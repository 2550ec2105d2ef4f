"""Faster R-CNN (Ren et al., NeurIPS 2015) with an FPN backbone (Lin et al., CVPR 2017).

First stage: a Region Proposal Network scores A anchors at every FPN location and refines them
into proposals. Second stage: RoI Align (He et al., Mask R-CNN, 2017; ``roi_align.py``) cuts a fixed-size
feature from each proposal's FPN level, and a small head classifies it (K classes + background)
and regresses one box per class.

Shapes use the dimension letters and box conventions of ``common.py``'s docstring.
"""

import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from common import (
    BACKGROUND,
    NEUTRAL,
    NMS_THRESH,
    SCORE_THRESH,
    TensorDict,
    batched_class_nms,
    box_area,
    cat_across_fpn_levels,
    check_gt_classes,
    clip_boxes_to_image,
    conv_stem,
    get_fpn_location_coords,
    iou,
    is_matched,
    single_image_inference,
)
from first_stage import (
    FCOSProposalNetwork,
    FirstStage,
    _has_area,
    _image_size_of,
    first_stage_metrics,
    init_from_fcos,
    select_proposals,
)
from roi_align import multi_level_roi_align, roi_align

# Re-exported names that others import from here: ``roi_align`` (docs/benchmarks.md, tests/test_gpu.py), the
# sentinels ``BACKGROUND``, ``NEUTRAL`` (tests/test_properties.py), which live in roi_align.py and common.py,
# and the first stages' shared code and the FCOS first stage, which live in first_stage.py.

__all__ = [
    "COURSE_FASTER_RCNN",
    "COURSE_RPN",
    "FCOSProposalNetwork",
    "FasterRCNN",
    "FirstStage",
    "RPN",
    "RPNPredictionNetwork",
    "first_stage_metrics",
    "generate_fpn_anchors",
    "hello_two_stage_detector",
    "init_from_fcos",
    "iou",
    "rcnn_apply_deltas_to_anchors",
    "rcnn_assign_rois_to_fpn_levels",
    "rcnn_get_deltas_from_anchors",
    "rcnn_match_anchors_to_gt",
    "roi_align",
    "sample_rpn_training",
    "select_proposals",
]

# torchvision's and detectron2's ceiling on dw, dh: a box may grow at most 1000/16 = 62.5 times
# per side, so that exp() cannot overflow on an early, wild prediction.
_MAX_LOG_SCALE = math.log(1000.0 / 16)


def hello_two_stage_detector():
    print("Hello from two_stage_detector.py!")


class RPNPredictionNetwork(nn.Module):
    """RPN head shared by all FPN levels (Faster R-CNN 3.1): a conv stem, then two 1x1 convs that
    give one objectness logit and four box deltas per anchor.

    Attributes (the tests and the RPN's checkpoints look for these names): ``stem_rpn``, the stem
    (``nn.Sequential`` of 3x3 convs, each with its ReLU: ``common.conv_stem``); ``pred_obj``, the 1x1
    conv of the objectness logits (A channels, anchor ``a`` on channel ``a``); ``pred_box``, the 1x1
    conv of the box deltas (4A channels, anchor ``a``'s four on channels ``4a`` to ``4a + 3``);
    ``num_anchors``, A.

    Args:
        in_channels: FPN channels C.
        stem_channels: channels of each 3x3 conv of the stem, e.g. ``[64, 64]``.
        num_anchors: A, anchors per location.
    """

    def __init__(self, in_channels: int, stem_channels: Sequence[int], num_anchors: int = 3):
        # BEGIN SOLUTION
        super().__init__()
        self.num_anchors = num_anchors
        self.stem_rpn, stem_out = conv_stem(in_channels, stem_channels)
        self.pred_obj = nn.Conv2d(stem_out, num_anchors, 1)
        self.pred_box = nn.Conv2d(stem_out, num_anchors * 4, 1)
        for conv in (self.pred_obj, self.pred_box):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        # END SOLUTION

    def forward(self, feats_per_fpn_level: TensorDict) -> List[TensorDict]:
        """Args: {level: (B, C, Hl, Wl)}.

        Returns:
            ``[obj_logits {level: (B, Hl*Wl*A)}, boxreg_deltas {level: (B, Hl*Wl*A, 4)}]``; anchor
            ``a`` of row-major location ``loc`` is at index ``loc * A + a``.
        """
        # BEGIN SOLUTION
        obj_logits, boxreg_deltas = {}, {}
        for level, feats in feats_per_fpn_level.items():
            B, _, Hl, Wl = feats.shape
            stem = self.stem_rpn(feats)
            obj_logits[level] = self.pred_obj(stem).permute(0, 2, 3, 1).reshape(B, Hl * Wl * self.num_anchors)
            deltas = self.pred_box(stem).permute(0, 2, 3, 1)  # (B, A*4, Hl, Wl) -> (B, Hl, Wl, A*4)
            boxreg_deltas[level] = deltas.reshape(B, Hl * Wl * self.num_anchors, 4)
        return [obj_logits, boxreg_deltas]
        # END SOLUTION


def generate_fpn_anchors(
    locations_per_fpn_level: TensorDict,
    strides_per_fpn_level: Mapping[str, int],
    stride_scale: float,
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
) -> TensorDict:
    """Anchor boxes centred on every FPN location (Faster R-CNN 3.1.1, one scale per level as in FPN 4.1).

    Every anchor of a level has area ``(stride_scale * stride)^2``; aspect ratio ``r`` is height / width,
    so ``w = sqrt(area / r)`` and ``h = r * w``.

    Args:
        locations_per_fpn_level: {level: (Hl*Wl, 2)} ``(x, y)`` centres.
        strides_per_fpn_level: {level: stride}.
        stride_scale: anchor side (at ratio 1) in units of the level's stride.
        aspect_ratios: the A ratios; anchor ``a`` of every location has ratio ``aspect_ratios[a]``.
    Returns:
        {level: (Hl*Wl*A, 4)}, anchor ``a`` of location ``loc`` at index ``loc * A + a``.
    """
    # BEGIN SOLUTION
    anchors = {}
    for level, locations in locations_per_fpn_level.items():
        area = (stride_scale * strides_per_fpn_level[level]) ** 2
        # Sides in float64 Python math, so anchors do not depend on the tensor dtype's rounding.
        half_sizes = [(math.sqrt(area / r) / 2, math.sqrt(area * r) / 2) for r in aspect_ratios]
        half_wh = locations.new_tensor(half_sizes)  # (A, 2)
        centres = locations[:, None, :]  # (Hl*Wl, 1, 2)
        level_anchors = torch.cat([centres - half_wh, centres + half_wh], dim=-1)  # (Hl*Wl, A, 4)
        anchors[level] = level_anchors.reshape(-1, 4)  # (Hl*Wl, A, 4) -> (Hl*Wl*A, 4)
    return anchors
    # END SOLUTION


def _is_real_gt(gt_boxes: torch.Tensor) -> torch.Tensor:
    """(..., 5) -> (...) True for GT rows that may be matched: not padding (class >= 0) and not empty."""
    return (gt_boxes[..., 4] >= 0) & _has_area(gt_boxes)


@torch.no_grad()
def rcnn_match_anchors_to_gt(
    anchor_boxes: torch.Tensor,
    gt_boxes: torch.Tensor,
    iou_thresholds: Tuple[float, float],
    allow_low_quality_matches: bool = False,
) -> torch.Tensor:
    """Match each anchor (or proposal) to the ground-truth box it overlaps most (Faster R-CNN 3.1.2).

    With ``(low, high) = iou_thresholds``: an anchor whose best IoU is >= high gets that GT row; one
    whose IoUs are all < low is background (-1 row); the rest are neutral (-1e8 row) and never
    trained on. Padding GT rows (class -1) and empty ones (``x2 <= x1`` or ``y2 <= y1``) never
    match; without such real GT every anchor is background. A batch is matched image by image, so
    that the largest tensor is one image's (M, N) IoU matrix whatever the batch size (see
    ``benchmarks/bench_matching_memory.py``).

    Args:
        anchor_boxes: (N, 4), or (B, N, 4) with its own boxes for each image.
        gt_boxes: (M, 5) for one image or (B, M, 5) for a batch.
        iou_thresholds: ``(low, high)``, low <= high.
        allow_low_quality_matches: the paper's second rule: the anchor(s) with the highest IoU for
            a GT box are positive even below ``high``, so that every GT box gets an anchor (such an
            anchor keeps the GT row it overlaps most, as in torchvision and detectron2). A GT box
            whose best IoU is 0 promotes nothing (otherwise it would turn every anchor positive).
    Returns:
        (N, 5) matched GT rows, or (B, N, 5) for a batch.
    """
    # BEGIN SOLUTION
    if gt_boxes.dim() == 3:
        anchors_per_image = anchor_boxes.expand(len(gt_boxes), -1, -1)  # (B, N, 4), a view when shared
        return torch.stack(
            [
                rcnn_match_anchors_to_gt(anchors, gt, iou_thresholds, allow_low_quality_matches)
                for anchors, gt in zip(anchors_per_image, gt_boxes)
            ]
        )
    if len(gt_boxes) == 0:  # no rows at all: one padding row keeps max() well defined
        gt_boxes = gt_boxes.new_full((1, 5), BACKGROUND)
    ious = iou(gt_boxes[:, :4], anchor_boxes)  # (M, N)
    ious = ious.masked_fill(~_is_real_gt(gt_boxes)[:, None], -1.0)  # below every real IoU
    best_iou, best_gt = ious.max(dim=0)  # (N,)
    if allow_low_quality_matches:
        gt_best_iou = ious.amax(dim=1, keepdim=True)  # (M, 1)
        is_gt_best = (ious == gt_best_iou) & (gt_best_iou > 0)  # ties all count, as in the paper
        best_iou = torch.where(is_gt_best.any(dim=0), math.inf, best_iou)
    low, high = iou_thresholds
    matched = gt_boxes[best_gt]  # (N, 5)
    matched = torch.where((best_iou >= high)[:, None], matched, NEUTRAL)
    return torch.where((best_iou < low)[:, None], BACKGROUND, matched)
    # END SOLUTION


def _centres_and_sizes(boxes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(N, 4) boxes -> centres (N, 2) and sizes (N, 2) as ``(x, y)`` and ``(w, h)``."""
    return (boxes[:, :2] + boxes[:, 2:4]) / 2, boxes[:, 2:4] - boxes[:, :2]


def rcnn_get_deltas_from_anchors(
    anchors: torch.Tensor, gt_boxes: torch.Tensor, weights: Optional[Sequence[float]] = None
) -> torch.Tensor:
    """Box regression targets of R-CNN (Girshick et al. 2014, appendix C; Faster R-CNN eq. 2).

    ``(dx, dy, dw, dh) = ((bx - px) / pw, (by - py) / ph, log(bw / pw), log(bh / ph))`` for centres
    ``(px, py)``, ``(bx, by)`` and sizes ``(pw, ph)``, ``(bw, bh)`` of anchor and box.

    Args:
        anchors: (N, 4); gt_boxes: (N, 4 | 5) matched rows, background (-1) or neutral (-1e8) allowed.
        weights: optional ``(wx, wy, ww, wh)`` that multiply the four deltas. Fast R-CNN heads use
            (10, 10, 5, 5) so that the small deltas of good proposals weigh like the class loss.
    Returns:
        (N, 4) deltas; background and neutral rows give ``-1e8``.
    """
    # BEGIN SOLUTION
    anchor_xy, anchor_wh = _centres_and_sizes(anchors)
    box_xy, box_wh = _centres_and_sizes(gt_boxes[:, :4])
    deltas = torch.cat([(box_xy - anchor_xy) / anchor_wh, torch.log(box_wh / anchor_wh)], dim=1)
    if weights is not None:
        deltas = deltas * deltas.new_tensor(weights)
    return deltas.masked_fill(~is_matched(gt_boxes)[:, None], NEUTRAL)
    # END SOLUTION


def rcnn_apply_deltas_to_anchors(
    deltas: torch.Tensor, anchors: torch.Tensor, weights: Optional[Sequence[float]] = None
) -> torch.Tensor:
    """Inverse of ``rcnn_get_deltas_from_anchors``; never modifies its inputs.

    ``dw`` and ``dh`` are clamped above at ``log(1000 / 16)`` so that a wild prediction cannot
    overflow ``exp``.

    Args:
        deltas: (N, 4); anchors: (N, 4); weights: the same weights the deltas were made with.
    Returns:
        (N, 4) boxes ``(x1, y1, x2, y2)``.
    """
    # BEGIN SOLUTION
    if weights is not None:
        deltas = deltas / deltas.new_tensor(weights)
    anchor_xy, anchor_wh = _centres_and_sizes(anchors)
    box_xy = anchor_xy + deltas[:, :2] * anchor_wh
    box_wh = anchor_wh * torch.exp(deltas[:, 2:].clamp(max=_MAX_LOG_SCALE))
    return torch.cat([box_xy - box_wh / 2, box_xy + box_wh / 2], dim=1)
    # END SOLUTION


def _sample_fg_bg_masks(
    matched_gt_boxes: torch.Tensor, num_samples: int, fg_fraction: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Random foreground / background sample of every image at once (Faster R-CNN 3.1.3).

    Up to ``int(num_samples * fg_fraction)`` foreground rows; background rows fill the rest; neutral
    rows are never drawn. Each row gets a uniform random key and the candidates with the smallest
    keys are taken, which is sampling without replacement (a random permutation) done per image.

    Args:
        matched_gt_boxes: (..., N, 5) matched rows.
    Returns:
        fg_mask, bg_mask: (..., N) bool.
    """
    # BEGIN SOLUTION
    labels = matched_gt_boxes[..., 4]
    is_fg, is_bg = labels >= 0, labels == BACKGROUND
    fg_mask = is_fg & (_random_rank(is_fg) < int(num_samples * fg_fraction))
    num_bg = num_samples - fg_mask.sum(dim=-1, keepdim=True)  # (..., 1)
    bg_mask = is_bg & (_random_rank(is_bg) < num_bg)
    return fg_mask, bg_mask
    # END SOLUTION


def _random_rank(candidates: torch.Tensor) -> torch.Tensor:
    """(..., N) bool -> (..., N) long: candidates get the ranks 0, 1, ... in a random order, the others larger."""
    keys = torch.rand(candidates.shape, device=candidates.device).masked_fill(~candidates, 2.0)
    order = keys.argsort(dim=-1)
    ranks = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, ranks)


def sample_rpn_training(
    gt_boxes: torch.Tensor, num_samples: int, fg_fraction: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Indices of a random training sample of anchors of one image (Faster R-CNN 3.1.3).

    Args:
        gt_boxes: (N, 5) matched rows of the anchors (background -1, neutral -1e8).
        num_samples: total anchors to sample.
        fg_fraction: at most ``int(num_samples * fg_fraction)`` of them foreground; background
            fills the rest (fewer when there is not enough background).
    Returns:
        fg_idx, bg_idx: ``long`` indices into the N rows, disjoint, never a neutral row.
    """
    # BEGIN SOLUTION
    fg_mask, bg_mask = _sample_fg_bg_masks(gt_boxes, num_samples, fg_fraction)
    return fg_mask.nonzero().squeeze(1), bg_mask.nonzero().squeeze(1)
    # END SOLUTION


# The course's original RPN: RPN(fpn_channels, stem_channels, batch_size_per_image, **COURSE_RPN).
COURSE_RPN = dict(allow_low_quality_matches=False, nms_per_level=False)
# ... and its second stage: FasterRCNN(backbone, rpn, num_classes, ..., **COURSE_FASTER_RCNN).
COURSE_FASTER_RCNN = dict(roi_stem_he_init=False)


class RPN(nn.Module):
    """Region Proposal Network (Faster R-CNN 3.1) on FPN levels (FPN 4.1).

    Args:
        fpn_channels: channels C of the FPN levels.
        stem_channels: channels of each 3x3 conv of the head's stem.
        batch_size_per_image: anchors sampled per image for the losses.
        anchor_stride_scale: anchor side (at ratio 1) in strides; 8 gives 64/128/256-px anchors on
            p3/p4/p5, which covers the object sizes of 224-px VOC images.
        anchor_aspect_ratios: height / width of the A anchors of a location.
        anchor_iou_thresholds: ``(low, high)`` of ``rcnn_match_anchors_to_gt``; the paper uses (0.3, 0.7),
            0.6 gives small images a few more positives.
        nms_thresh: NMS IoU threshold of proposals (0.7, the paper's value).
        pre_nms_topk: anchors kept by objectness on each level before NMS (and, without
            ``nms_per_level``, over all levels).
        post_nms_topk: proposals kept per image after NMS.
        fg_fraction: at most this fraction of the sampled anchors is foreground (1:1, paper 3.1.3).
        allow_low_quality_matches: the paper's second rule (3.1.2) that each GT box's best anchors
            are positive too (see ``rcnn_match_anchors_to_gt``), as in torchvision and detectron2.
            Without it a box smaller or thinner than every anchor gets no positive anchor at all
            and can only be found by chance; the course's RPN leaves it out.
        nms_per_level: NMS within each FPN level, as ``select_proposals`` explains (the course's
            RPN: one NMS over the best anchors of all levels).
    """

    def __init__(
        self,
        fpn_channels: int,
        stem_channels: Sequence[int],
        batch_size_per_image: int,
        anchor_stride_scale: float = 8,
        anchor_aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        anchor_iou_thresholds: Tuple[float, float] = (0.3, 0.6),
        nms_thresh: float = 0.7,
        pre_nms_topk: int = 400,
        post_nms_topk: int = 100,
        fg_fraction: float = 0.5,
        allow_low_quality_matches: bool = True,
        nms_per_level: bool = True,
    ):
        super().__init__()
        self.pred_net = RPNPredictionNetwork(fpn_channels, stem_channels, num_anchors=len(anchor_aspect_ratios))
        self.batch_size_per_image = batch_size_per_image
        self.anchor_stride_scale = anchor_stride_scale
        self.anchor_aspect_ratios = tuple(anchor_aspect_ratios)
        self.anchor_iou_thresholds = tuple(anchor_iou_thresholds)
        self.nms_thresh = nms_thresh
        self.pre_nms_topk = pre_nms_topk
        self.post_nms_topk = post_nms_topk
        self.fg_fraction = fg_fraction
        self.allow_low_quality_matches = allow_low_quality_matches
        self.nms_per_level = nms_per_level
        self.training_metrics: TensorDict = {}
        self._anchor_cache: Optional[Tuple[tuple, TensorDict]] = None

    def forward(
        self,
        feats_per_fpn_level: TensorDict,
        strides_per_fpn_level: Mapping[str, int],
        gt_boxes: Optional[torch.Tensor] = None,
        image_size: Optional[Tuple[int, int]] = None,
    ) -> Dict[str, object]:
        """Proposals for every image, and the RPN losses in training.

        Args:
            feats_per_fpn_level: {level: (B, C, Hl, Wl)}.
            strides_per_fpn_level: {level: stride}.
            gt_boxes: (B, M, 5); the losses are computed when given in training mode.
            image_size: ``(H, W)`` that proposals are clipped to; by default the first level's
                size times its stride.
        Returns:
            ``{"proposals": list of B (P, 4) tensors, detached}``, plus ``"loss_rpn_obj"`` and
            ``"loss_rpn_box"`` in training, which also leaves ``first_stage_metrics`` in
            ``self.training_metrics``.
        """
        # BEGIN SOLUTION
        obj_logits, boxreg_deltas = self.pred_net(feats_per_fpn_level)
        anchors = self._anchors(feats_per_fpn_level, strides_per_fpn_level)
        image_size = image_size or _image_size_of(feats_per_fpn_level, strides_per_fpn_level)
        output = {"proposals": self._propose(obj_logits, boxreg_deltas, anchors, image_size)}
        if self.training and gt_boxes is not None:
            output.update(
                self._losses(
                    cat_across_fpn_levels(obj_logits),
                    cat_across_fpn_levels(boxreg_deltas),
                    cat_across_fpn_levels(anchors, dim=0),
                    gt_boxes,
                )
            )
        return output
        # END SOLUTION

    def _anchors(self, feats_per_fpn_level: TensorDict, strides_per_fpn_level: Mapping[str, int]) -> TensorDict:
        """Anchors of these feature shapes, computed once and reused while the shapes stay the same."""
        first = next(iter(feats_per_fpn_level.values()))
        dtype = torch.promote_types(first.dtype, torch.float32)  # half precision is too coarse for pixels
        shapes = tuple((level, tuple(feats.shape[-2:])) for level, feats in feats_per_fpn_level.items())
        key = (shapes, tuple(strides_per_fpn_level.items()), first.device, dtype)
        if self._anchor_cache is None or self._anchor_cache[0] != key:
            locations = get_fpn_location_coords(feats_per_fpn_level, strides_per_fpn_level, dtype, first.device)
            anchors = generate_fpn_anchors(
                locations, strides_per_fpn_level, self.anchor_stride_scale, self.anchor_aspect_ratios
            )
            self._anchor_cache = (key, anchors)
        return self._anchor_cache[1]

    def _losses(
        self, obj_logits: torch.Tensor, boxreg_deltas: torch.Tensor, anchors: torch.Tensor, gt_boxes: torch.Tensor
    ) -> TensorDict:
        """Faster R-CNN eq. 1 on ``batch_size_per_image`` sampled anchors per image.

        Objectness: binary cross-entropy on every sampled anchor. Box: L1 on the deltas of the sampled
        foreground. Both are summed and divided by the number of sampled anchors (at least 1), so an
        image without boxes gives a positive objectness loss and adds nothing to the box loss.

        Args:
            obj_logits: (B, HWA); boxreg_deltas: (B, HWA, 4); anchors: (HWA, 4); gt_boxes: (B, M, 5).
        """
        # BEGIN SOLUTION
        B = obj_logits.shape[0]
        matched = rcnn_match_anchors_to_gt(
            anchors, gt_boxes, self.anchor_iou_thresholds, self.allow_low_quality_matches
        )  # (B, HWA, 5)
        fg_mask, bg_mask = _sample_fg_bg_masks(matched, self.batch_size_per_image, self.fg_fraction)
        sampled = fg_mask | bg_mask
        num_sampled = sampled.sum().clamp(min=1)
        loss_obj = F.binary_cross_entropy_with_logits(
            obj_logits[sampled], fg_mask[sampled].to(obj_logits.dtype), reduction="sum"
        )
        target_deltas = rcnn_get_deltas_from_anchors(anchors.expand(B, -1, -1)[fg_mask], matched[fg_mask])
        loss_box = F.l1_loss(boxreg_deltas[fg_mask], target_deltas, reduction="sum")
        self.training_metrics = first_stage_metrics(
            obj_logits[sampled], fg_mask[sampled], boxreg_deltas[fg_mask], target_deltas
        )
        return {"loss_rpn_obj": loss_obj / num_sampled, "loss_rpn_box": loss_box / num_sampled}
        # END SOLUTION

    @torch.no_grad()
    def _propose(
        self, obj_logits: TensorDict, boxreg_deltas: TensorDict, anchors: TensorDict, image_size: Tuple[int, int]
    ) -> List[torch.Tensor]:
        """Faster R-CNN 3.3 / FPN 4.1: the ``pre_nms_topk`` best anchors of each level, decoded,
        then ``select_proposals``.

        Args:
            obj_logits: {level: (B, Hl*Wl*A)}; boxreg_deltas: {level: (B, Hl*Wl*A, 4)};
            anchors: {level: (Hl*Wl*A, 4)}; image_size: ``(H, W)``.
        Returns:
            B tensors (P, 4) of proposals, by decreasing objectness; no gradient flows through them.
        """
        # BEGIN SOLUTION
        level_boxes, level_scores = [], []
        for level, logits in obj_logits.items():
            B, HWA = logits.shape
            scores, index = logits.topk(min(self.pre_nms_topk, HWA), dim=1)  # (B, k)
            deltas = boxreg_deltas[level].gather(1, index[..., None].expand(-1, -1, 4)).float()  # (B, k, 4)
            boxes = rcnn_apply_deltas_to_anchors(deltas.flatten(0, 1), anchors[level][index.flatten()])
            level_boxes.append(boxes.view(B, -1, 4))  # (B*k, 4) -> (B, k, 4)
            level_scores.append(scores)
        return select_proposals(
            level_boxes,
            level_scores,
            image_size,
            self.nms_thresh,
            self.pre_nms_topk,
            self.post_nms_topk,
            self.nms_per_level,
        )
        # END SOLUTION


def rcnn_assign_rois_to_fpn_levels(
    roi_boxes: torch.Tensor, strides_per_fpn_level: Mapping[str, int], canonical_level: int = 4
) -> torch.Tensor:
    """The FPN level each RoI is pooled from (FPN paper, eq. 1).

    ``k = floor(k0 + log2(sqrt(w h) / 224))``, clamped to the levels there are (p3..p5, level k has
    stride 2^k). With the paper's ``k0 = 4`` a RoI covers the same number of feature cells as in
    the paper (a 224-px RoI spans 14 cells of p4); on 224-px images this puts almost every RoI
    on p3 and a whole-image RoI on p4, and only RoIs of 448 px and more reach p5.

    Args:
        roi_boxes: (R, 4); strides_per_fpn_level: {level: stride}, consecutive powers of two.
        canonical_level: ``k0``, the level of a 224 x 224 RoI.
    Returns:
        (R,) ``long`` position of the RoI's level in ``strides_per_fpn_level`` (0 for p3 here).
    """
    level_ks = [round(math.log2(stride)) for stride in strides_per_fpn_level.values()]
    size = box_area(roi_boxes).sqrt()
    # The small epsilon keeps a size of exactly 112, 224, ... on the level above despite log2 rounding.
    k = torch.floor(canonical_level + torch.log2(size / 224) + 1e-6)
    return (k.clamp(min(level_ks), max(level_ks)) - min(level_ks)).long()


class FasterRCNN(nn.Module):
    """Faster R-CNN: backbone with FPN, RPN, and a RoI head that classifies and regresses each proposal.

    The head's class index K is background (as in detectron2), so GT classes 0..K-1 are used as
    they are. Box deltas are class specific, (R, K*4), and weighted by ``box_reg_weights``.

    Attributes (the tests and the checkpoints look for these names): ``backbone`` and ``rpn``, the
    modules passed in (the RPN's head is ``rpn.pred_net``); the second stage's ``roi_stem`` (3x3
    convs on the RoI features), ``roi_fc`` (the fully connected layers, empty in the course's head),
    ``cls_pred`` (``nn.Linear`` to the K + 1 class logits, background last) and ``box_pred``
    (``nn.Linear`` to the K * 4 class-specific box deltas); ``_head`` runs these four on RoI features.

    Args:
        backbone: a ``common.DetectorBackboneWithFPN`` (``.out_channels``, ``.fpn_strides``).
        rpn: the first stage on the same FPN channels: an ``RPN`` or an ``FCOSProposalNetwork``
            (any module with ``RPN.forward``'s signature and output contract).
        num_classes: K, without background.
        roi_size: ``(h, w)`` of the RoI Align output.
        stem_channels: channels of each 3x3 conv of the head, applied to the RoI features.
        roi_stem_he_init: start the RoI stem's convs from He's init (``common.conv_stem``), as
            detectron2's and torchvision's conv heads do; the course's N(0, 0.01) leaves a 2-conv
            stem with almost no output at first.
        fc_channels: widths of fully connected layers (each with a ReLU) after the stem, before
            the class and box outputs; torchvision's and detectron2's ``TwoMLPHead`` is
            ``stem_channels=(), fc_channels=(1024, 1024)``. The course's head has none.
        batch_size_per_image: RoIs sampled per image for the losses (the course's 32; Fast R-CNN
            used 64 per image with 2 images per batch).
        fg_fraction: at most this fraction of the sampled RoIs is foreground (Fast R-CNN 2.3: 25%).
        roi_iou_thresholds: ``(low, high)`` for matching proposals to GT: IoU >= 0.5 is foreground
            and everything below background (Fast R-CNN 2.3, without its 0.1 lower bound, as in detectron2).
        box_reg_weights: weights of ``(dx, dy, dw, dh)`` (Fast R-CNN / detectron2: 10, 10, 5, 5).
        roi_sampling_ratio: sampling points per RoI Align bin side (2, as torchvision's MultiScaleRoIAlign).
        roi_canonical_level: ``k0`` of ``rcnn_assign_rois_to_fpn_levels``; 4 is the FPN paper's value,
            5 would spread the RoIs of 224-px images over p3, p4 and p5.
        channels_last: keep weights and activations (backbone and first stage included) in the
            channels-last layout, which makes the convolutions faster on GPUs with mixed precision and
            on most CPUs (``benchmarks/``); the results are the same up to float rounding.
    """

    def __init__(
        self,
        backbone: nn.Module,
        rpn: nn.Module,
        num_classes: int,
        roi_size: Tuple[int, int] = (7, 7),
        stem_channels: Sequence[int] = (64, 64),
        roi_stem_he_init: bool = True,
        fc_channels: Sequence[int] = (),
        batch_size_per_image: int = 32,
        fg_fraction: float = 0.25,
        roi_iou_thresholds: Tuple[float, float] = (0.5, 0.5),
        box_reg_weights: Tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0),
        roi_sampling_ratio: int = 2,
        roi_canonical_level: int = 4,
        channels_last: bool = True,
    ):
        super().__init__()
        self.backbone = backbone
        self.rpn = rpn
        self.num_classes = num_classes
        self.roi_size = tuple(roi_size)
        self.batch_size_per_image = batch_size_per_image
        self.fg_fraction = fg_fraction
        self.roi_iou_thresholds = tuple(roi_iou_thresholds)
        self.box_reg_weights = tuple(box_reg_weights)
        if roi_sampling_ratio < 1:
            raise ValueError(f"roi_sampling_ratio must be at least 1 (points per bin side), got {roi_sampling_ratio}")
        self.roi_sampling_ratio = roi_sampling_ratio
        self.roi_canonical_level = roi_canonical_level
        self.roi_stem, stem_out = conv_stem(backbone.out_channels, stem_channels, he_init=roi_stem_he_init)
        flat = stem_out * self.roi_size[0] * self.roi_size[1]
        fc_layers = []
        for width in fc_channels:
            fc_layers += [nn.Linear(flat, width), nn.ReLU(inplace=True)]
            flat = width
        self.roi_fc = nn.Sequential(*fc_layers)
        self.cls_pred = nn.Linear(flat, num_classes + 1)
        self.box_pred = nn.Linear(flat, num_classes * 4)
        # detectron2's FastRCNNOutputLayers: small initial outputs, boxes start near the proposals.
        nn.init.normal_(self.cls_pred.weight, std=0.01)
        nn.init.normal_(self.box_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_pred.bias)
        nn.init.zeros_(self.box_pred.bias)
        if channels_last:  # the backbone then lays out its input images the same way
            self.to(memory_format=torch.channels_last)

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
            test_score_thresh, test_nms_thresh: evaluation thresholds (``None``: ``predict``'s defaults).
        Returns:
            Training: the first stage's losses (``RPN``: ``"loss_rpn_obj"``, ``"loss_rpn_box"``;
            ``FCOSProposalNetwork`` adds ``"loss_rpn_ctr"``), then ``"loss_cls"``, ``"loss_box"``; all
            scalars. The first stage's ``training_metrics`` are then in ``self.training_metrics``.
            Evaluation (B = 1): ``(pred_boxes (N, 4), pred_classes (N,) long, pred_scores (N,))``.
        """
        if not self.training:
            return self.inference(images, test_score_thresh, test_nms_thresh)
        if gt_boxes is None:
            raise ValueError("FasterRCNN needs gt_boxes in training mode; call detector.eval() for inference.")
        check_gt_classes(gt_boxes, self.num_classes)
        feats = self.backbone(images)
        rpn_output = self.rpn(feats, self.backbone.fpn_strides, gt_boxes, image_size=tuple(images.shape[-2:]))
        rois, matched_gt_boxes = self.sample_rois(rpn_output["proposals"], gt_boxes)
        cls_logits, box_deltas = self._head(self.roi_features(feats, rois))
        losses = self._roi_losses(cls_logits, box_deltas, rois, matched_gt_boxes)
        first_stage = {name: value for name, value in rpn_output.items() if name != "proposals"}
        return {**first_stage, **losses}

    @property
    def training_metrics(self) -> Dict[str, torch.Tensor]:
        """The first stage's ``first_stage_metrics`` of the last training step (logged, never trained on)."""
        return getattr(self.rpn, "training_metrics", {})

    @torch.no_grad()
    def sample_rois(self, proposals: List[torch.Tensor], gt_boxes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The RoIs the second stage trains on, each with its own matched GT row (Fast R-CNN 2.3).

        GT boxes join each image's proposals (as in detectron2 and torchvision), so the head sees
        foreground from the first iteration; padding and empty GT rows do not (an empty box would
        be a RoI without features). All images are sampled at once; the RoIs and their targets
        come out of the same index, so they belong together by construction.

        Args:
            proposals: B tensors (P, 4); gt_boxes: (B, M, 5).
        Returns:
            rois: (R, 5) ``(image index, x1, y1, x2, y2)``, image by image;
            matched_gt_boxes: (R, 5), the GT row of each RoI or the background row.
        """
        # BEGIN SOLUTION
        B, M, _ = gt_boxes.shape
        padded = nn.utils.rnn.pad_sequence(list(proposals), batch_first=True)  # (B, Pmax, 4)
        lengths = torch.tensor([len(p) for p in proposals], device=padded.device)
        is_proposal = torch.arange(padded.shape[1], device=padded.device) < lengths[:, None]  # (B, Pmax)
        boxes = torch.cat([padded.to(gt_boxes), gt_boxes[..., :4]], dim=1)  # (B, Pmax + M, 4)
        is_real = torch.cat([is_proposal, _is_real_gt(gt_boxes)], dim=1)
        matched = rcnn_match_anchors_to_gt(boxes, gt_boxes, self.roi_iou_thresholds)  # (B, Pmax + M, 5)
        matched = matched.masked_fill(~is_real[..., None], NEUTRAL)  # padding is never sampled
        fg_mask, bg_mask = _sample_fg_bg_masks(matched, self.batch_size_per_image, self.fg_fraction)
        image_index, box_index = (fg_mask | bg_mask).nonzero(as_tuple=True)
        rois = torch.cat([image_index[:, None].to(boxes), boxes[image_index, box_index]], dim=1)
        return rois, matched[image_index, box_index]
        # END SOLUTION

    def roi_features(self, feats_per_fpn_level: TensorDict, rois: torch.Tensor) -> torch.Tensor:
        """RoI Align (Mask R-CNN 3) of each RoI on its FPN level, returned in the order of ``rois``.

        Args:
            feats_per_fpn_level: {level: (B, C, Hl, Wl)}; rois: (R, 5) ``(image index, x1, y1, x2, y2)``.
        Returns:
            (R, C, h, w) with ``(h, w) = roi_size``: row r is the feature of RoI r.
        """
        strides = self.backbone.fpn_strides
        levels = rcnn_assign_rois_to_fpn_levels(rois[:, 1:], strides, self.roi_canonical_level)  # (R,)
        return multi_level_roi_align(
            feats_per_fpn_level,
            strides,
            rois,
            levels,
            self.roi_size,
            self.roi_sampling_ratio,
            aligned=True,  # pixel centres at +0.5, as our boxes (Mask R-CNN's misalignment fix)
        )

    def _head(self, roi_feats: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(R, C, h, w) -> class logits (R, K + 1), background last, and box deltas (R, K * 4)."""
        flat = self.roi_fc(self.roi_stem(roi_feats).flatten(1))
        return self.cls_pred(flat), self.box_pred(flat)

    def _roi_losses(
        self, cls_logits: torch.Tensor, box_deltas: torch.Tensor, rois: torch.Tensor, matched_gt_boxes: torch.Tensor
    ) -> TensorDict:
        """Fast R-CNN eq. 1: cross-entropy over K + 1 classes on every sampled RoI, L1 on the weighted
        deltas of the GT class for foreground RoIs only; both summed and divided by the number of
        sampled RoIs (at least 1), as detectron2 does.

        Args:
            cls_logits: (R, K + 1); box_deltas: (R, K * 4); rois: (R, 5); matched_gt_boxes: (R, 5).
        """
        # BEGIN SOLUTION
        R, K = cls_logits.shape[0], self.num_classes
        is_fg = matched_gt_boxes[:, 4] >= 0
        labels = torch.where(is_fg, matched_gt_boxes[:, 4].long(), K)  # background is class K
        num_rois = max(R, 1)
        loss_cls = F.cross_entropy(cls_logits, labels, reduction="sum") / num_rois
        target_deltas = rcnn_get_deltas_from_anchors(rois[is_fg, 1:], matched_gt_boxes[is_fg], self.box_reg_weights)
        pred_deltas = box_deltas.view(R, K, 4)[is_fg, labels[is_fg]]  # (F, 4): the GT class's box
        loss_box = F.l1_loss(pred_deltas, target_deltas, reduction="sum") / num_rois
        return {"loss_cls": loss_cls, "loss_box": loss_box}
        # END SOLUTION

    @torch.no_grad()
    def inference(
        self,
        images: torch.Tensor,
        test_score_thresh: Optional[float] = None,
        test_nms_thresh: Optional[float] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Detections for one image as the course's triple ``(boxes (N, 4), classes (N,), scores (N,))``."""
        return single_image_inference(self, images, test_score_thresh, test_nms_thresh)

    @torch.no_grad()
    def predict(
        self,
        images: torch.Tensor,
        score_thresh: float = SCORE_THRESH,
        nms_thresh: float = NMS_THRESH,
        max_detections: int = 100,
    ) -> List[Dict[str, torch.Tensor]]:
        """Batched inference (Faster R-CNN 3.3 / Fast R-CNN 2.4): per-class softmax scores and
        class-specific boxes of every proposal, clipped to the image, those above ``score_thresh``,
        class-specific NMS per image, at most ``max_detections`` per image.

        Args:
            images: (B, 3, H, W).
        Returns:
            B dicts ``{"boxes": (N, 4), "labels": (N,) long, "scores": (N,)}``, by decreasing score.
        """
        # BEGIN SOLUTION
        B, _, H, W = images.shape
        feats = self.backbone(images)
        proposals = self.rpn(feats, self.backbone.fpn_strides, image_size=(H, W))["proposals"]
        image_ids = torch.cat([torch.full((len(p),), i, device=images.device) for i, p in enumerate(proposals)])
        rois = torch.cat([image_ids[:, None].to(images.dtype), torch.cat(proposals)], dim=1)  # (R, 5)
        cls_logits, box_deltas = (x.float() for x in self._head(self.roi_features(feats, rois)))  # bf16 -> fp32 boxes
        R, K = cls_logits.shape[0], self.num_classes
        scores = cls_logits.softmax(dim=1)[:, :K].flatten()  # (R, K + 1) -> (R * K,), background dropped
        boxes = rcnn_apply_deltas_to_anchors(
            box_deltas.reshape(R * K, 4), rois[:, 1:].repeat_interleave(K, dim=0), self.box_reg_weights
        )
        boxes = clip_boxes_to_image(boxes, (H, W))
        labels = torch.arange(K, device=images.device).repeat(R)  # (R * K,)
        image_ids = image_ids.repeat_interleave(K)
        keep = (scores > score_thresh) & _has_area(boxes)
        boxes, scores, labels, image_ids = boxes[keep], scores[keep], labels[keep], image_ids[keep]
        parts = batched_class_nms(boxes, scores, labels, image_ids, B, K, nms_thresh, max_detections)
        return [{"boxes": boxes[part], "labels": labels[part], "scores": scores[part]} for part in parts]
        # END SOLUTION

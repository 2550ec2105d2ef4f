"""Faster R-CNN's first stages, what they share, and the first stage on its own.

Both first stages (``two_stage_detector.RPN`` and the anchor-free ``FCOSProposalNetwork`` here) end in
the same proposal tail, ``select_proposals``, and report the textbook's ``first_stage_metrics``.
``FCOSProposalNetwork`` is FCOS with one "object" class as a region proposal network (the mmdetection
"FCOS as RPN" recipe); ``init_from_fcos`` starts it from a trained FCOS; ``FirstStage`` wraps a backbone
and either first stage, to train and inspect proposals before adding RoI heads.

Imports: ``common`` and ``one_stage_detector``. ``two_stage_detector`` imports from here and re-exports
every public name, so the course's imports keep working.
"""

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from torchvision.ops import batched_nms

from common import (
    TensorDict,
    cat_across_fpn_levels,
    clip_boxes_to_image,
    fpn_locations_of,
    split_by_image,
)
from one_stage_detector import (
    IMPROVED_MATCHER,
    BoxLoss,
    FCOSPredictionNetwork,
    Matcher,
    fcos_giou_loss,
    fcos_level_candidates,
    fcos_losses,
    fcos_make_targets,
    improved_fcos_head,
)


def _has_area(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4 | 5) -> (...) True where the box is not empty (zero-width, inverted and clipped-away boxes are)."""
    return (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])


def first_stage_metrics(
    obj_logits: torch.Tensor, is_fg: torch.Tensor, pred_deltas: torch.Tensor, target_deltas: torch.Tensor
) -> TensorDict:
    """The textbook's first-stage measures, to log beside the losses (no gradient, not losses).

    ``metric_rpn_cls_error``: fraction of the N anchors (or locations) whose objectness, thresholded
    at probability 0.5, disagrees with its label. ``metric_rpn_box_mae``: mean absolute error of the
    F foreground box deltas (0 without foreground). The first stages keep them in their
    ``training_metrics`` attribute, not in the losses they return; ``a4_helper.train_detector`` logs
    them in the history.

    Args:
        obj_logits: (N,); is_fg: (N,) bool; pred_deltas, target_deltas: (F, 4).
    """
    with torch.no_grad():
        cls_error = ((obj_logits > 0) != is_fg).float().mean() if len(is_fg) else obj_logits.new_zeros(())
        box_mae = (pred_deltas - target_deltas).abs().mean() if len(pred_deltas) else pred_deltas.new_zeros(())
    return {"metric_rpn_cls_error": cls_error, "metric_rpn_box_mae": box_mae.float()}


def _image_size_of(feats_per_fpn_level: TensorDict, strides_per_fpn_level: Mapping[str, int]) -> Tuple[int, int]:
    """``(H, W)`` of the input, as the first level's size times its stride (exact for multiples of 32)."""
    level, feats = next(iter(feats_per_fpn_level.items()))
    return tuple(side * strides_per_fpn_level[level] for side in feats.shape[-2:])


@torch.no_grad()
def select_proposals(
    level_boxes: List[torch.Tensor],
    level_scores: List[torch.Tensor],
    image_size: Tuple[int, int],
    nms_thresh: float,
    pre_nms_topk: int,
    post_nms_topk: int,
    nms_per_level: bool = True,
) -> List[torch.Tensor]:
    """The proposal tail of both first stages, after each level's best candidates are decoded.

    Boxes are clipped to the image and empty ones dropped. With ``nms_per_level`` (torchvision,
    detectron2) NMS runs within each level of each image, and the ``post_nms_topk`` best survivors
    of all levels are kept: a small box on p3 is never suppressed by a large, overlapping box of
    p5, and no level's candidates crowd out another's before NMS. Without it (the course's tail),
    the ``pre_nms_topk`` best candidates over all levels go through one NMS per image.

    Args:
        level_boxes: L tensors (B, k_l, 4), a level's candidates; level_scores: L tensors (B, k_l).
        image_size: ``(H, W)``; nms_thresh: NMS IoU threshold.
        pre_nms_topk: candidates over all levels kept before NMS when not ``nms_per_level``.
        post_nms_topk: proposals kept per image.
    Returns:
        B tensors (P, 4) of proposals, by decreasing score.
    """
    boxes, scores = torch.cat(level_boxes, dim=1), torch.cat(level_scores, dim=1).float()  # (B, N, 4), (B, N)
    B, N = scores.shape
    level_ids = torch.cat([torch.full((s.shape[1],), i, device=scores.device) for i, s in enumerate(level_scores)])
    if not nms_per_level:
        scores, best = scores.topk(min(pre_nms_topk, N), dim=1)  # (B, k)
        boxes = boxes.gather(1, best[..., None].expand(-1, -1, 4))
        level_ids = torch.zeros_like(best[0])
    boxes, scores = clip_boxes_to_image(boxes.flatten(0, 1).float(), image_size), scores.flatten()
    image_ids = torch.arange(B, device=boxes.device).repeat_interleave(scores.shape[0] // B)
    groups = image_ids * len(level_scores) + level_ids.repeat(B)  # NMS never crosses a group
    keep = _has_area(boxes).nonzero().squeeze(1)
    keep = keep[batched_nms(boxes[keep], scores[keep], groups[keep], nms_thresh)]  # by decreasing score
    return [boxes[part] for part in split_by_image(keep, image_ids, B, post_nms_topk)]


class FCOSProposalNetwork(nn.Module):
    """FCOS (Tian et al., ICCV 2019) as the first stage of Faster R-CNN: one "object" class.

    Any one-stage detector's boxes can serve as proposals; this one is anchor-free, so there is no
    anchor size or aspect ratio to tune. It keeps FCOS's head (with one class), matching, targets and
    centerness, and follows ``RPN``'s interface, so ``FasterRCNN(backbone, FCOSProposalNetwork(...), K)``
    trains end to end. Ground-truth classes collapse to 0; padding rows stay padding. Its parts are
    FCOS's and default to the improved FCOS's (``one_stage_detector.improved_fcos_head``,
    ``IMPROVED_MATCHER``, ``fcos_giou_loss``).

    Args:
        fpn_channels: channels C of the FPN levels.
        stem_channels: channels of each 3x3 conv of the head's two stems.
        nms_thresh: NMS IoU threshold of proposals (0.7, as ``RPN``).
        pre_nms_topk: locations kept by score on each level before NMS.
        post_nms_topk: proposals kept per image after NMS.
        nms_per_level: as ``RPN``'s (``select_proposals``).
        head: an ``FCOSPredictionNetwork`` with one class, or ``None`` for ``improved_fcos_head``.
        matcher, box_loss: as ``FCOS``'s.
        focal_alpha, focal_gamma: sigmoid focal loss of the objectness (RetinaNet's defaults, as FCOS).
    """

    def __init__(
        self,
        fpn_channels: int,
        stem_channels: Sequence[int],
        *,
        nms_thresh: float = 0.7,
        pre_nms_topk: int = 400,
        post_nms_topk: int = 100,
        nms_per_level: bool = True,
        head: Optional[FCOSPredictionNetwork] = None,
        matcher: Matcher = IMPROVED_MATCHER,
        box_loss: BoxLoss = fcos_giou_loss,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ):
        super().__init__()
        self.pred_net = head if head is not None else improved_fcos_head(1, fpn_channels, stem_channels)
        self.nms_thresh = nms_thresh
        self.pre_nms_topk = pre_nms_topk
        self.post_nms_topk = post_nms_topk
        self.nms_per_level = nms_per_level
        self.matcher = matcher
        self.box_loss = box_loss
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.training_metrics: TensorDict = {}

    def forward(
        self,
        feats_per_fpn_level: TensorDict,
        strides_per_fpn_level: Mapping[str, int],
        gt_boxes: Optional[torch.Tensor] = None,
        image_size: Optional[Tuple[int, int]] = None,
    ) -> Dict[str, object]:
        """Proposals for every image, and the first-stage losses in training (``RPN.forward``'s contract).

        Args:
            feats_per_fpn_level: {level: (B, C, Hl, Wl)}; strides_per_fpn_level: {level: stride}.
            gt_boxes: (B, M, 5); the losses are computed when given in training mode.
            image_size: ``(H, W)`` that proposals are clipped to; by default the first level's size times its stride.
        Returns:
            ``{"proposals": list of B (P, 4) tensors, detached}``, plus ``"loss_rpn_obj"`` (focal),
            ``"loss_rpn_box"``, ``"loss_rpn_ctr"`` in training, which also leaves ``first_stage_metrics``
            in ``self.training_metrics``.
        """
        obj_logits, boxreg_deltas, ctr_logits = self.pred_net(feats_per_fpn_level)
        dtype = torch.promote_types(next(iter(feats_per_fpn_level.values())).dtype, torch.float32)
        locations = fpn_locations_of(feats_per_fpn_level, strides_per_fpn_level, dtype)
        image_size = image_size or _image_size_of(feats_per_fpn_level, strides_per_fpn_level)
        output = {
            "proposals": self._propose(
                obj_logits, boxreg_deltas, ctr_logits, locations, strides_per_fpn_level, image_size
            )
        }
        if self.training and gt_boxes is not None:
            output.update(
                self._losses(obj_logits, boxreg_deltas, ctr_logits, locations, strides_per_fpn_level, gt_boxes)
            )
        return output

    def _losses(self, obj_logits, boxreg_deltas, ctr_logits, locations, strides, gt_boxes) -> TensorDict:
        """``FCOS``'s losses (``fcos_losses``) with one "object" class, renamed as first-stage losses:
        focal objectness on all locations, GIoU (or L1) on the LTRB deltas and BCE on the centerness
        of the foreground ones, each divided by the number of foreground locations.

        Args: the head's outputs {level: (B, HlWl, 1 | 4 | 1)}, locations {level: (HlWl, 2)},
        strides {level: stride}, gt_boxes (B, M, 5).
        """
        object_gt = torch.cat([gt_boxes[..., :4], gt_boxes[..., 4:].clamp(max=0)], dim=-1)  # classes -> 0
        matched_gt_boxes, target_deltas = fcos_make_targets(
            locations, strides, object_gt, self.matcher
        )  # (B, HW, 5 | 4)
        obj_logits = cat_across_fpn_levels(obj_logits)
        boxreg_deltas = cat_across_fpn_levels(boxreg_deltas)
        losses = fcos_losses(
            matched_gt_boxes,
            target_deltas,
            obj_logits,
            boxreg_deltas,
            cat_across_fpn_levels(ctr_logits).squeeze(-1),
            box_loss=self.box_loss,
            focal_alpha=self.focal_alpha,
            focal_gamma=self.focal_gamma,
        )
        foreground = matched_gt_boxes[..., 4] >= 0  # (B, HW)
        self.training_metrics = first_stage_metrics(
            obj_logits.flatten(), foreground.flatten(), boxreg_deltas[foreground], target_deltas[foreground]
        )
        return {
            "loss_rpn_obj": losses["loss_cls"],
            "loss_rpn_box": losses["loss_box"],
            "loss_rpn_ctr": losses["loss_ctr"],
        }

    @torch.no_grad()
    def _propose(self, obj_logits, boxreg_deltas, ctr_logits, locations, strides, image_size) -> List[torch.Tensor]:
        """FCOS 3.3 with one class: the ``pre_nms_topk`` best locations of each level by
        ``sqrt(objectness * centerness)``, decoded (``fcos_level_candidates``), then ``select_proposals``.

        Returns:
            B tensors (P, 4) of proposals, by decreasing score; no gradient flows through them.
        """
        level_boxes, level_scores = [], []
        for level, logits in obj_logits.items():
            boxes, _, scores = fcos_level_candidates(
                logits,
                boxreg_deltas[level].float(),  # boxes in float32 even when the head ran in bf16
                ctr_logits[level],
                locations[level],
                strides[level],
                image_size,
                self.pre_nms_topk,
            )  # (B, k, 4), (B, k)
            level_boxes.append(boxes)
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


class FirstStage(nn.Module):
    """The first stage on its own: backbone + RPN, to train and inspect proposals before adding RoI heads.

    It follows the detectors' interface, so ``a4_helper.train_detector`` trains it.

    Args:
        backbone: a ``common.DetectorBackboneWithFPN``.
        rpn: an ``RPN`` or an ``FCOSProposalNetwork``.
    """

    def __init__(self, backbone: nn.Module, rpn: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.rpn = rpn

    def forward(self, images: torch.Tensor, gt_boxes: Optional[torch.Tensor] = None):
        """Training: the first stage's losses. Evaluation: B proposal tensors (P, 4)."""
        H, W = images.shape[-2:]
        output = self.rpn(self.backbone(images), self.backbone.fpn_strides, gt_boxes, image_size=(H, W))
        if self.training:
            return {name: value for name, value in output.items() if name != "proposals"}
        return output["proposals"]

    @property
    def training_metrics(self) -> Dict[str, torch.Tensor]:
        """The first stage's ``first_stage_metrics`` of the last training step (logged, never trained on)."""
        return getattr(self.rpn, "training_metrics", {})


def init_from_fcos(detector: nn.Module, fcos_state_dict: Mapping[str, torch.Tensor]) -> List[str]:
    """Start a two-stage detector (or a ``FirstStage``) from a trained FCOS (mmdetection's recipe of a
    pre-trained FCOS as RPN, which shortens the two-stage training).

    The backbone (``backbone.*``) is copied. If ``detector.rpn`` is an ``FCOSProposalNetwork``, FCOS's
    head is copied too (both stems, box and centerness convs), and its K-class conv collapses to the
    one "object" class: the filter is the mean of the K class filters and the bias the largest class
    bias, so an untouched location starts near FCOS's prior (p = 0.01) and the object filter
    responds to what all classes share. The second stage keeps its own initialisation.

    Args:
        detector: a ``FasterRCNN`` or ``FirstStage`` with the FCOS's FPN and stem channels.
        fcos_state_dict: ``FCOS.state_dict()``, e.g. ``checkpoint["model"]`` of ``detect.py train --model fcos``.
    Returns:
        The names (in ``detector.state_dict()``) of the tensors that were set.
    Raises:
        ValueError: the state dict is not an FCOS's, or a tensor's shape does not fit.
    """
    if "pred_net.pred_cls.weight" not in fcos_state_dict:
        raise ValueError("init_from_fcos needs an FCOS state dict (it has no 'pred_net.pred_cls.weight').")
    source = {name: value for name, value in fcos_state_dict.items() if name.startswith("backbone.")}
    if isinstance(detector.rpn, FCOSProposalNetwork):
        for name, value in fcos_state_dict.items():
            if name.startswith("pred_net.") and not name.startswith("pred_net.pred_cls."):
                source["rpn." + name] = value
        source["rpn.pred_net.pred_cls.weight"] = fcos_state_dict["pred_net.pred_cls.weight"].mean(dim=0, keepdim=True)
        source["rpn.pred_net.pred_cls.bias"] = fcos_state_dict["pred_net.pred_cls.bias"].amax(dim=0, keepdim=True)
    own = detector.state_dict()
    wrong = [name for name, value in source.items() if name not in own or own[name].shape != value.shape]
    if wrong:
        raise ValueError(
            f"{len(wrong)} FCOS tensors do not fit this {type(detector).__name__} (e.g. {wrong[:3]}); "
            "build it with the FCOS's FPN and stem channels, head options (group_norm, learnable_scales) and "
            "backbone (DetectorBackboneWithFPN's fine_p3; detect.py: the same --variant as the FCOS run)."
        )
    with torch.no_grad():
        for name, value in source.items():
            own[name].copy_(value)
    return sorted(source)

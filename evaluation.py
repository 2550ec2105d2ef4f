"""Evaluation: the mAP evaluator ``compute_map`` (VOC 2007 11-point, VOC all-point, COCO),
``evaluate_detector`` and ``inference_with_detector`` (which also exports files for the mAP tool),
first-stage ``proposal_recall``, the precision-recall and recall plots, and ``rel_error``.

Detectors are passed in: in eval mode ``detector.predict(images, score_thresh=..., nms_thresh=...)``
returns a list of B dicts ``{"boxes": (N, 4), "labels": (N,) long, "scores": (N,)}`` in input pixels.
Imports: ``common``, ``detection_data``, ``drawing`` and ``training``; no detector.
"""

import contextlib
import math
import os
import time
from collections import defaultdict
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from common import NMS_THRESH, SCORE_THRESH, iou
from detection_data import PathLike, _to_numpy, prepare_images
from drawing import _pyplot, _show, detection_visualizer
from training import _autocast_dtype


def rel_error(x: Any, y: Any, eps: float = 1e-10) -> float:
    """Relative error ``max|x - y| / max(|x| + |y|, eps)``, maxima over all elements (tensors or arrays)."""
    x = torch.as_tensor(x, dtype=torch.float64)
    y = torch.as_tensor(y, dtype=torch.float64)
    return (x - y).abs().max().item() / (x.abs() + y.abs()).clamp(min=eps).max().item()


_COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # built as pycocotools builds them


_COCO_RECALL_POINTS = np.linspace(0.0, 1.0, 101)


_COCO_MAX_DETECTIONS = 100


def _detections(pred: Mapping[str, Any]) -> Dict[str, np.ndarray]:
    return {
        "boxes": _to_numpy(pred["boxes"], np.float64).reshape(-1, 4),
        "scores": _to_numpy(pred["scores"], np.float64).reshape(-1),
        "labels": _to_numpy(pred["labels"], np.int64).reshape(-1),
    }


def _ground_truth(gt: Mapping[str, Any]) -> Dict[str, np.ndarray]:
    labels = _to_numpy(gt["labels"], np.int64).reshape(-1)
    difficult = gt.get("difficult")
    difficult = np.zeros(len(labels), bool) if difficult is None else _to_numpy(difficult, bool).reshape(-1)
    return {"boxes": _to_numpy(gt["boxes"], np.float64).reshape(-1, 4), "labels": labels, "difficult": difficult}


def _iou_matrix(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    """(D, 4), (G, 4) -> (D, G) in float64, with the project's one IoU (continuous coordinates)."""
    return iou(torch.from_numpy(boxes1), torch.from_numpy(boxes2)).numpy()


def _voc_outcomes(
    preds: List[Dict], gts: List[Dict], iou_threshold: float, iou_matrix=_iou_matrix
) -> Tuple[np.ndarray, np.ndarray]:
    """Label every detection the PASCAL VOC way, all images at once.

    VOC walks a class's detections by decreasing score (stable on ties). Each one looks only at
    the same-class box it overlaps most in its image; with IoU >= threshold it is ignored if that
    box is difficult, a true positive if the box is still unclaimed, else a false positive
    (a duplicate). Since the box choice does not depend on earlier claims, the first detection
    (in score order) to pick a box is its true positive.
    ``iou_matrix`` ((D, 4), (G, 4) -> (D, G)) is the project's IoU unless the opening's figures, drawn
    before a learner has written ``common.iou``, pass torchvision's.

    Returns:
        labels (D,) and outcomes (D,) with 1 TP, 0 FP, -1 ignored, sorted by decreasing score.
    """
    scores, labels, best_gt, best_iou, best_difficult = [], [], [], [], []
    offset = 0
    for pred, gt in zip(preds, gts):
        D, G = len(pred["scores"]), len(gt["labels"])
        ious = np.full((D, G + 1), -1.0)  # a last column "no box" for images without a same-class box
        same_class = pred["labels"][:, None] == gt["labels"][None, :]
        ious[:, :G] = np.where(same_class, iou_matrix(pred["boxes"], gt["boxes"]), -1.0)
        best = ious.argmax(1)  # the first box on ties, as the devkit's max()
        scores.append(pred["scores"])
        labels.append(pred["labels"])
        best_gt.append(offset + best)
        best_iou.append(ious[np.arange(D), best])
        best_difficult.append(np.append(gt["difficult"], False)[best])
        offset += G + 1
    order = np.argsort(-np.concatenate(scores), kind="stable")
    labels, best_gt, best_iou, best_difficult = (
        np.concatenate(x)[order] for x in (labels, best_gt, best_iou, best_difficult)
    )
    hit = best_iou >= iou_threshold
    candidates = np.flatnonzero(hit & ~best_difficult)
    _, first = np.unique(best_gt[candidates], return_index=True)
    outcomes = np.zeros(len(labels), np.int64)
    outcomes[candidates[first]] = 1
    outcomes[hit & best_difficult] = -1
    return labels, outcomes


def _voc_pr_curves(
    preds: List[Dict], gts: List[Dict], num_classes: int, iou_threshold: float, iou_matrix=_iou_matrix
) -> Dict[int, Tuple[np.ndarray, np.ndarray]]:
    """{class: (recall (Dc,), precision (Dc,))} over its non-ignored detections by decreasing score,
    for every class with at least one non-difficult ground-truth object."""
    if not preds:
        return {}
    labels, outcomes = _voc_outcomes(preds, gts, iou_threshold, iou_matrix)
    curves = {}
    for c in range(num_classes):
        num_gt = sum(int(((gt["labels"] == c) & ~gt["difficult"]).sum()) for gt in gts)
        if num_gt == 0:
            continue
        hits = outcomes[(labels == c) & (outcomes >= 0)] == 1
        tp, fp = np.cumsum(hits), np.cumsum(~hits)
        curves[c] = (tp / num_gt, tp / (tp + fp))
    return curves


def _ap_all_point(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC 2010+ AP: area under the precision envelope (max precision at any higher recall)."""
    recall = np.concatenate([[0.0], recall, [1.0]])
    envelope = np.maximum.accumulate(np.concatenate([[0.0], precision, [0.0]])[::-1])[::-1]
    return float(np.sum((recall[1:] - recall[:-1]) * envelope[1:]))


def _ap_11_point(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC 2007 AP: mean over recall t = 0, 0.1, ..., 1 of the best precision at recall >= t.
    The points are ``k * 0.1`` as in the devkit (so 0.3 is 0.30000000000000004)."""
    total = 0.0
    for t in np.arange(11) * 0.1:
        reached = precision[recall >= t]
        total += reached.max() if len(reached) else 0.0
    return float(total / 11)


def _coco_match(ious: np.ndarray, gt_ignore: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """COCOeval.evaluateImg's greedy matching for one image and class, at all IoU thresholds.

    Args:
        ious: (D, G), detections by decreasing score, boxes with the non-ignored ones first.
        gt_ignore: (G,) bool.
    Returns:
        matched (T, D) and ignored (T, D) bool: a detection is ignored when it matched an
        ignored box. Each detection takes the unclaimed box of highest IoU >= threshold (the
        later box on ties, as COCOeval's loop does), an ignored box only when no regular one fits.
    """
    T, (D, G) = len(_COCO_IOU_THRESHOLDS), ious.shape
    matched, ignored = np.zeros((T, D), bool), np.zeros((T, D), bool)
    if G == 0:
        return matched, ignored
    claimed = np.zeros((T, G), bool)
    thresholds = np.minimum(_COCO_IOU_THRESHOLDS, 1 - 1e-10)[:, None]
    for d in np.flatnonzero((ious >= thresholds[0]).any(1)):  # the others match at no threshold
        fits = ~claimed & (ious[d] >= thresholds)  # (T, G)
        regular = fits & ~gt_ignore
        fits = np.where(regular.any(1, keepdims=True), regular, fits)
        best = G - 1 - np.argmax(np.where(fits, ious[d], -np.inf)[:, ::-1], axis=1)
        found = np.flatnonzero(fits.any(1))
        claimed[found, best[found]] = True
        matched[found, d] = True
        ignored[found, d] = gt_ignore[best[found]]
    return matched, ignored


def _coco_ap(scores: np.ndarray, matched: np.ndarray, ignored: np.ndarray, num_gt: int) -> np.ndarray:
    """COCOeval.accumulate for one class: (T,) AP with 101-point interpolated precision."""
    order = np.argsort(-scores, kind="mergesort")
    matched, ignored = matched[:, order], ignored[:, order]
    tp = np.cumsum(matched & ~ignored, axis=1).astype(float)
    fp = np.cumsum(~matched & ~ignored, axis=1).astype(float)
    recall = tp / num_gt
    precision = tp / (tp + fp + np.spacing(1))
    envelope = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
    ap = np.zeros(len(_COCO_IOU_THRESHOLDS))
    for t in range(len(ap)):
        index = np.searchsorted(recall[t], _COCO_RECALL_POINTS, side="left")
        reached = index < recall.shape[1]
        ap[t] = envelope[t, index[reached]].sum() / len(_COCO_RECALL_POINTS)
    return ap


def _coco_map(preds: List[Dict], gts: List[Dict], num_classes: int) -> Dict[str, Any]:
    """mAP@[.5:.95] as pycocotools computes it (area "all", 100 detections per image and class)."""
    per_class: Dict[int, List[Tuple]] = defaultdict(list)  # (scores, matched, ignored) per image
    num_gt = np.zeros(num_classes, np.int64)
    for pred, gt in zip(preds, gts):
        ious = _iou_matrix(pred["boxes"], gt["boxes"])
        for c in np.union1d(pred["labels"], gt["labels"]):
            if not 0 <= c < num_classes:
                continue
            d = np.flatnonzero(pred["labels"] == c)
            d = d[np.argsort(-pred["scores"][d], kind="mergesort")][:_COCO_MAX_DETECTIONS]
            g = np.flatnonzero(gt["labels"] == c)
            g = g[np.argsort(gt["difficult"][g], kind="mergesort")]  # regular boxes first
            per_class[c].append((pred["scores"][d], *_coco_match(ious[np.ix_(d, g)], gt["difficult"][g])))
            num_gt[c] += int((~gt["difficult"][g]).sum())
    ap = {}
    for c in np.flatnonzero(num_gt):
        scores, matched, ignored = zip(*per_class[c])
        ap[int(c)] = _coco_ap(np.concatenate(scores), np.concatenate(matched, 1), np.concatenate(ignored, 1), num_gt[c])
    if not ap:
        return {"map": 0.0, "map_50": 0.0, "map_75": 0.0, "ap_per_class": {}}
    table = np.stack(list(ap.values()))  # (classes, T)
    return {
        "map": float(table.mean()),
        "map_50": float(table[:, 0].mean()),
        "map_75": float(table[:, 5].mean()),
        "ap_per_class": {c: float(v.mean()) for c, v in ap.items()},
    }


def compute_map(
    predictions: Sequence[Mapping[str, Any]],
    ground_truths: Sequence[Mapping[str, Any]],
    num_classes: int,
    method: str = "voc",
    iou_threshold: float = 0.5,
) -> Dict[str, Any]:
    """Mean average precision over classes, written out so that it can be read (and trusted).

    Args:
        predictions: one dict per image, ``{"boxes" (N, 4), "scores" (N,), "labels" (N,)}``
            (tensors or arrays, any order).
        ground_truths: one dict per image (same order), ``{"boxes" (M, 4), "labels" (M,)}`` and
            optionally ``"difficult" (M,) bool``; no padding rows (see ``gt_boxes_to_targets``).
        num_classes: K; classes are ``0..K-1``.
        method: ``"voc"``: PASCAL VOC AP at ``iou_threshold`` (IoU >= threshold matches), all-point
            interpolation, greedy matching by score, difficult objects neither TP nor FP,
            continuous coordinates (no +1). ``"voc07"``: the same with 11-point interpolation.
            ``"coco"``: mAP@[.50:.05:.95] with 101-point interpolation, as pycocotools computes it
            for area "all" and maxDets 100 (which pycocotools applies per image *and class*);
            ``iou_threshold`` is unused, difficult objects act as pycocotools' ignored boxes.
            Boxes with ``x2 < x1`` or ``y2 < y1`` count as empty in every method.
    Returns:
        ``{"map": float in [0, 1], "ap_per_class": {class: AP}}``; classes without a
        non-difficult ground-truth object are left out of both (no ground truth at all gives
        ``map`` 0). ``"coco"`` adds ``"map_50"`` and ``"map_75"``.
    """
    if len(predictions) != len(ground_truths):
        raise ValueError(f"{len(predictions)} predictions for {len(ground_truths)} ground truths")
    preds = [_detections(p) for p in predictions]
    gts = [_ground_truth(g) for g in ground_truths]
    if method == "coco":
        return _coco_map(preds, gts, num_classes)
    if method not in ("voc", "voc07"):
        raise ValueError(f"method must be 'voc', 'voc07' or 'coco', got {method!r}")
    average_precision = _ap_all_point if method == "voc" else _ap_11_point
    curves = _voc_pr_curves(preds, gts, num_classes, iou_threshold)
    ap = {c: average_precision(recall, precision) for c, (recall, precision) in curves.items()}
    return {"map": float(np.mean(list(ap.values()))) if ap else 0.0, "ap_per_class": ap}


def plot_precision_recall(
    predictions: Sequence[Mapping[str, Any]],
    ground_truths: Sequence[Mapping[str, Any]],
    num_classes: int,
    idx_to_class: Optional[Mapping[int, str]] = None,
    iou_threshold: float = 0.5,
    path: Optional[PathLike] = None,
):
    """One precision-recall panel per class with ground truth (VOC matching, as ``compute_map``).

    Each panel shows the raw curve and its envelope, whose area is the all-point AP.
    Arguments are those of ``compute_map``; ``path`` saves the figure too. Returns the figure.
    """
    preds = [_detections(p) for p in predictions]
    gts = [_ground_truth(g) for g in ground_truths]
    curves = _voc_pr_curves(preds, gts, num_classes, iou_threshold)
    columns = min(4, max(1, len(curves)))
    rows = max(1, math.ceil(len(curves) / columns))
    figure, axes = _pyplot().subplots(rows, columns, figsize=(3 * columns, 2.8 * rows), squeeze=False)
    for ax in axes.flat[len(curves) :]:
        ax.axis("off")
    for ax, (c, (recall, precision)) in zip(axes.flat, curves.items()):
        envelope = np.maximum.accumulate(precision[::-1])[::-1]
        ax.plot(recall, precision, color="0.6", linewidth=1)
        ax.step(recall, envelope, where="post", color="C0")
        name = idx_to_class[c] if idx_to_class else str(c)
        ax.set_title(f"{name}  AP={_ap_all_point(recall, precision):.3f}", fontsize=9)
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision")
    figure.tight_layout()
    if path is not None:
        figure.savefig(path, dpi=100)
    return figure


def proposal_recall(
    proposals: Sequence[Any],
    ground_truths: Sequence[Any],
    iou_thresholds: Sequence[float] = _COCO_IOU_THRESHOLDS,
    max_proposals: Sequence[int] = (10, 100, 300),
) -> Dict[str, Any]:
    """Recall of region proposals at several IoU thresholds, and their average recall (AR).

    A ground-truth box is recalled at threshold t by the first N proposals of its image when one of
    them overlaps it with IoU >= t (Hosang et al., "What makes for effective detection proposals?",
    PAMI 2016; a proposal may cover several boxes). AR@N is the mean recall over IoU 0.5:0.05:0.95,
    which tracks the final detector's mAP better than recall at 0.5 alone. Difficult objects are
    left out. A tolerance of 1e-6 keeps a box at IoU exactly t from missing t through rounding.

    Args:
        proposals: per image, (P, 4) boxes by decreasing score (tensors or arrays).
        ground_truths: per image, a dict with ``"boxes"`` (M, 4) (and optionally ``"difficult"``),
            as ``gt_boxes_to_targets`` gives, or the (M, 4) boxes themselves.
        iou_thresholds: the T thresholds.
        max_proposals: the numbers N of best proposals per image to evaluate.
    Returns:
        ``{"iou_thresholds": (T,) array, "recall": {N: (T,) array}, "ar": {N: float}, "num_gt": int}``;
        with no ground truth at all every recall is 0.
    """
    thresholds = np.asarray(iou_thresholds, dtype=np.float64)
    best = {n: [] for n in max_proposals}  # per N, the best IoU of every GT box
    for boxes, gt in zip(proposals, ground_truths):
        gt_boxes = _to_numpy(gt["boxes"] if isinstance(gt, Mapping) else gt, np.float64).reshape(-1, 4)
        if isinstance(gt, Mapping) and gt.get("difficult") is not None:
            gt_boxes = gt_boxes[~_to_numpy(gt["difficult"], bool).reshape(-1)]
        ious = _iou_matrix(_to_numpy(boxes, np.float64).reshape(-1, 4), gt_boxes)  # (P, M)
        for n in max_proposals:
            best[n].append(ious[:n].max(axis=0) if len(ious[:n]) else np.zeros(len(gt_boxes)))
    num_gt = sum(len(b) for b in best[max_proposals[0]]) if max_proposals else 0
    recall = {}
    for n in max_proposals:
        best_ious = np.concatenate(best[n]) if best[n] else np.zeros(0)
        recall[n] = (best_ious[None, :] >= thresholds[:, None] - 1e-6).sum(axis=1) / max(num_gt, 1)
    return {
        "iou_thresholds": thresholds,
        "recall": recall,
        "ar": {n: float(np.mean(r)) for n, r in recall.items()},
        "num_gt": num_gt,
    }


def plot_proposal_recall(
    results: Mapping[str, Mapping[str, Any]], num_proposals: int = 100, path: Optional[PathLike] = None, ax=None
):
    """Recall against IoU threshold, one curve per first stage, with AR@N in the legend.

    Args:
        results: {name: ``proposal_recall``'s dict}.
        num_proposals: which N of their ``max_proposals`` to draw.
        path: save the figure there too.
        ax: draw into this matplotlib axis instead of a new figure.
    Returns:
        The matplotlib figure.
    """
    if ax is None:
        _, ax = _pyplot().subplots(figsize=(9, 4))  # room for the legend beside the curves
    for name, result in results.items():
        label = f"{name} (AR@{num_proposals} = {result['ar'][num_proposals]:.3f})"
        ax.plot(result["iou_thresholds"], result["recall"][num_proposals], marker="o", label=label)
    ax.set_xlabel("IoU threshold")
    ax.set_ylabel(f"recall of {num_proposals} proposals per image")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the curves, never on them
    ax.grid(alpha=0.3)
    ax.figure.tight_layout()
    if path is not None:
        ax.figure.savefig(path, dpi=100, bbox_inches="tight")
    return ax.figure


def gt_boxes_to_targets(
    gt_boxes: torch.Tensor, difficult: Optional[torch.Tensor] = None
) -> List[Dict[str, torch.Tensor]]:
    """Padded ground truth -> ``compute_map``'s per-image dicts.

    Args:
        gt_boxes: (B, M, 5) rows ``(x1, y1, x2, y2, C)``; padding rows (C < 0) are dropped.
        difficult: (B, M) bool flags, e.g. from ``VOC2007DetectionTiny(return_difficult=True)``.
    Returns:
        B dicts ``{"boxes" (Mi, 4), "labels" (Mi,) long, "difficult" (Mi,) bool}`` on the CPU.
    """
    gt_boxes = gt_boxes.detach().cpu()
    if difficult is None:
        difficult = torch.zeros(gt_boxes.shape[:2], dtype=torch.bool)
    targets = []
    for rows, flags in zip(gt_boxes, difficult.cpu().bool()):
        real = rows[:, 4] >= 0
        targets.append({"boxes": rows[real, :4], "labels": rows[real, 4].long(), "difficult": flags[real]})
    return targets


@contextlib.contextmanager
def _eval_mode(detector: nn.Module):
    """Switch to eval mode and back to whatever mode the detector was in."""
    was_training = detector.training
    detector.eval()
    try:
        yield
    finally:
        detector.train(was_training)


@contextlib.contextmanager
def _cast(detector: nn.Module, dtype: torch.dtype):
    """Cast the detector's floating-point weights and buffers to ``dtype``, then give each its own dtype back."""

    def named_tensors():  # looked up again afterwards, since ``to`` replaces buffers with new tensors
        return [*detector.named_parameters(), *detector.named_buffers()]

    dtypes = {name: tensor.dtype for name, tensor in named_tensors()}
    detector.to(dtype=dtype)
    try:
        yield
    finally:
        for name, tensor in named_tensors():
            tensor.data = tensor.data.to(dtypes[name])
            if tensor.grad is not None:  # ``to`` cast it too; training on would otherwise fail
                tensor.grad = tensor.grad.to(dtypes[name])


def _predict_batches(
    detector: nn.Module,
    loader: Any,
    score_thresh: float,
    nms_thresh: float,
    device: torch.device,
    dtype: torch.dtype,
    autocast_dtype: Optional[torch.dtype] = None,
) -> Iterator[Tuple]:
    """Yield ``(image_ids, images, targets, predictions)`` per batch, everything on the CPU."""
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    for batch in loader:
        image_ids, images, gt_boxes = batch[:3]
        difficult = batch[3] if len(batch) > 3 else None
        with autocast:
            outputs = detector.predict(
                prepare_images(images, device).to(dtype), score_thresh=score_thresh, nms_thresh=nms_thresh
            )
        predictions = [{key: value.detach().cpu() for key, value in output.items()} for output in outputs]
        yield list(image_ids), images, gt_boxes_to_targets(gt_boxes, difficult), predictions


def evaluate_detector(
    detector: nn.Module,
    loader: Any,
    score_thresh: float = SCORE_THRESH,
    nms_thresh: float = NMS_THRESH,
    device: Union[str, torch.device] = "cpu",
    method: str = "voc",
    iou_threshold: float = 0.5,
    num_classes: Optional[int] = None,
    amp: str = "fp32",
    keep_predictions: bool = False,
) -> Dict[str, Any]:
    """Run batched ``predict`` over a loader and compute the mAP.

    The detector is moved to ``device`` and run in eval mode under ``torch.inference_mode``;
    its training mode is restored afterwards. ``amp`` is ``train_detector``'s: "auto" runs the
    network in bf16 (or fp16) on a GPU; boxes are always decoded in float32. A low ``score_thresh`` (0.05) keeps the
    low-confidence tail that AP rewards; loaders with a ``difficult`` fourth entry get VOC's
    difficult handling. ``num_classes`` defaults to the size of the data set's ``idx_to_class``
    (looked up through ``Subset`` wrappers).

    Returns:
        ``compute_map``'s dict plus ``"num_images"``, ``"seconds"`` (wall time of the whole
        loop, data loading included) and ``"images_per_second"``; with ``keep_predictions`` also
        ``"predictions"`` and ``"ground_truths"`` (``compute_map``'s inputs, e.g. to score them again
        with another method).
    """
    device = torch.device(device)
    detector.to(device)
    predictions, ground_truths = [], []
    start = time.perf_counter()
    with _eval_mode(detector), torch.inference_mode():
        batches = _predict_batches(
            detector, loader, score_thresh, nms_thresh, device, torch.float32, _autocast_dtype(amp, device)
        )
        for _, _, targets, preds in batches:
            predictions += preds
            ground_truths += targets
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    num_classes = _num_classes(loader) if num_classes is None else num_classes
    result = compute_map(predictions, ground_truths, num_classes, method=method, iou_threshold=iou_threshold)
    result.update(num_images=len(predictions), seconds=seconds, images_per_second=len(predictions) / max(seconds, 1e-9))
    if keep_predictions:
        result.update(predictions=predictions, ground_truths=ground_truths)
    return result


def _num_classes(loader: Any) -> int:
    dataset = getattr(loader, "dataset", None)
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    idx_to_class = getattr(dataset, "idx_to_class", None)
    if idx_to_class is None:
        raise ValueError("Pass num_classes: the loader's data set has no idx_to_class.")
    return len(idx_to_class)


def _image_stem(image_id: str) -> str:
    """``.../JPEGImages/000005.jpg`` -> ``000005``: the per-image file name of the mAP tools."""
    return os.path.splitext(os.path.basename(str(image_id)))[0]


def _class_name(idx_to_class: Mapping[int, str], label: Any) -> str:
    return idx_to_class[int(label)].replace(" ", "_")  # the mAP tools split lines on spaces


def _write_map_tool_files(
    output_dir: PathLike,
    image_id: str,
    target: Mapping[str, torch.Tensor],
    pred: Mapping[str, torch.Tensor],
    idx_to_class: Mapping[int, str],
) -> None:
    """Write ``ground-truth/<id>.txt`` and ``detection-results/<id>.txt`` (possibly empty)."""
    gt_lines = []
    for box, label, difficult in zip(*(target[key].tolist() for key in ("boxes", "labels", "difficult"))):
        flag = " difficult" if difficult else ""
        gt_lines.append(" ".join([_class_name(idx_to_class, label)] + [f"{v:.2f}" for v in box]) + flag)
    det_lines = []
    for box, label, score in zip(*(pred[key].tolist() for key in ("boxes", "labels", "scores"))):
        det_lines.append(" ".join([_class_name(idx_to_class, label), f"{score:.6f}"] + [f"{v:.2f}" for v in box]))
    for folder, lines in (("ground-truth", gt_lines), ("detection-results", det_lines)):
        with open(os.path.join(output_dir, folder, _image_stem(image_id) + ".txt"), "w") as file:
            file.write("".join(line + "\n" for line in lines))


def inference_with_detector(
    detector: nn.Module,
    test_loader: Any,
    idx_to_class: Mapping[int, str],
    score_thresh: float,
    nms_thresh: float,
    output_dir: Optional[PathLike] = None,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
) -> List[Dict[str, Any]]:
    """Predict on every image of a loader, then draw the results or write them for mAP tools.

    The detector runs in ``dtype`` and eval mode; afterwards, also after an error, it has its own
    dtypes and mode back. Like ``evaluate_detector``, it is moved to ``device`` and stays there.

    Args:
        output_dir: ``None``: draw each image with its ground truth and predictions (shown when
            a display exists). A folder: write ``output_dir/ground-truth/<id>.txt`` with lines
            ``class x1 y1 x2 y2`` (plus `` difficult`` for difficult objects) and
            ``output_dir/detection-results/<id>.txt`` with ``class score x1 y1 x2 y2``, one file
            per image even when it has no detection; ``<id>`` is the image file's stem.
    Returns:
        One dict per image: ``{"image_id", "boxes", "labels", "scores"}`` (CPU tensors).
    """
    device = torch.device(device)
    detector.to(device)
    if output_dir is not None:
        for folder in ("ground-truth", "detection-results"):
            os.makedirs(os.path.join(output_dir, folder), exist_ok=True)
    results = []
    # _cast outermost: casting back inside inference_mode would leave inference tensors as weights.
    with _cast(detector, dtype), _eval_mode(detector), torch.inference_mode():
        batches = _predict_batches(detector, test_loader, score_thresh, nms_thresh, device, dtype)
        for image_ids, images, targets, preds in batches:
            for image_id, image, target, pred in zip(image_ids, images, targets, preds):
                if output_dir is not None:
                    _write_map_tool_files(output_dir, image_id, target, pred, idx_to_class)
                else:
                    gt_rows = torch.cat([target["boxes"], target["labels"][:, None].float()], dim=1)
                    _show(detection_visualizer(image, idx_to_class, bbox=gt_rows, pred=pred))
                results.append({"image_id": image_id, **pred})
    return results

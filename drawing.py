"""Pictures: ground truth and predictions drawn on an image, the loss curves of a training run, and the
figures of the notebooks' opening (what a detector outputs, IoU, average precision). A detector's block
diagram is ``architecture_figure.py``'s.

The opening's figures compute every number they show: IoU with torchvision's ``box_iou`` (the reference
that ``common.iou`` must equal; the opening comes before a learner writes ``common.iou``), true and false
positives and AP with ``evaluation``'s VOC rules, so that a picture never shows a number the code would not give.

matplotlib is imported on first use, so that the rest of the project runs without a display.
Imports: ``common`` (box areas), ``detection_data`` (to undo the normalisation), torchvision's ``box_iou`` and
matplotlib; ``evaluation`` on first use (it imports this module). No detector module: detectors are passed in.
"""

from collections import Counter
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torchvision.ops import box_iou

from common import box_area
from detection_data import PathLike, _to_numpy, denormalize_image


def _pyplot():
    """matplotlib.pyplot, imported on first use; without a display matplotlib falls back to Agg."""
    from matplotlib import pyplot

    return pyplot


def _show(figure) -> None:
    """Show a figure where a display exists; in a headless run (Agg) just release it."""
    plt = _pyplot()
    if plt.get_backend().lower() in ("agg", "pdf", "ps", "svg", "pgf", "cairo", "template"):
        plt.close(figure)
    else:
        plt.show()


def _class_colour(label: int):
    """The colour of class ``label``: tab20's ten strong colours for classes 0-9, then its ten light ones.

    tab20 pairs a strong and a light shade of each hue; in its own order classes 0 and 1 would get two
    blues that are hard to tell apart on a small picture."""
    from matplotlib import colormaps

    index = int(label) % 20
    return colormaps["tab20"](2 * (index % 10) + index // 10)


def _text_colour(colour) -> str:
    """Black or white, whichever contrasts more with a background of ``colour``: WCAG 2's relative
    luminance of the linearised sRGB channels, above which black gives the higher contrast ratio."""
    from matplotlib.colors import to_rgb

    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in to_rgb(colour)]
    luminance = 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]
    return "black" if luminance > 0.179 else "white"


def _dark_outline(linewidth: float) -> list:
    """Path effects that draw a line over a slightly wider dark one, so that a box of any colour shows on
    any background (a red box on a red shape included)."""
    from matplotlib import patheffects

    return [patheffects.Stroke(linewidth=linewidth + 1.5, foreground="0.1"), patheffects.Normal()]


def _prediction_rows(pred: Any) -> np.ndarray:
    """A ``predict`` dict or (N, 6) rows -> (N, 6) array ``(x1, y1, x2, y2, C, score)``."""
    if isinstance(pred, Mapping):
        boxes = _to_numpy(pred["boxes"]).reshape(-1, 4)
        return np.concatenate([boxes, _to_numpy(pred["labels"])[:, None], _to_numpy(pred["scores"])[:, None]], 1)
    return _to_numpy(pred).reshape(-1, 6)


def _label_slot(
    ax, x: float, y: float, text: str, taken: List[Tuple[float, float, float, float]]
) -> Tuple[float, float]:
    """Where (data units) a label meant for ``(x, y)`` overprints no label already placed and fits the view.

    A box's label sits on its top-left corner, so a prediction right on its ground truth, or two boxes
    with the same corner, would write one label over the other; such a label moves down a line at a time
    until it is clear. Label sizes are estimated from the font size, which is enough to keep them apart.
    """
    height_px = ax.get_window_extent().height or 1.0
    per_px = abs(ax.get_ylim()[0] - ax.get_ylim()[1]) / height_px  # data units per display pixel
    points_to_px = ax.figure.dpi / 72
    line, width = 11 * points_to_px * per_px, (0.7 * len(text) + 0.5) * _LABEL_POINTS * points_to_px * per_px
    x = max(0.0, min(x, ax.get_xlim()[1] - width))  # a box at the right or top edge keeps its label inside
    y = max(y, line)
    while any(x < right and left < x + width and y - line < bottom and top < y for left, top, right, bottom in taken):
        y += line
    taken.append((x, y - line, x + width, y))
    return x, y


_LABEL_POINTS = 8


def _draw_box(ax, box: Sequence[float], colour, dashed: bool = False, linewidth: float = 2.0):
    """Outline ``(x1, y1, x2, y2)`` in ``colour`` over a thin dark line; returns the patch."""
    from matplotlib.patches import Rectangle

    x1, y1, x2, y2 = (float(v) for v in box[:4])
    patch = Rectangle(
        (x1, y1),
        x2 - x1,
        y2 - y1,
        fill=False,
        edgecolor=colour,
        linewidth=linewidth,
        linestyle="--" if dashed else "-",
        path_effects=_dark_outline(linewidth),
    )
    ax.add_patch(patch)
    return patch


def _write_label(ax, x: float, y: float, text: str, colour, taken: List[Tuple[float, float, float, float]]):
    """``text`` on a patch of ``colour`` at a box's top-left corner ``(x, y)``, black or white by the
    colour's luminance, moved down where it would cover a label already written (``_label_slot``)."""
    return ax.text(
        *_label_slot(ax, x, max(y, 0), text, taken),
        text,
        fontsize=_LABEL_POINTS,
        color=_text_colour(colour),
        verticalalignment="bottom",
        bbox={"facecolor": colour, "alpha": 0.9, "pad": 1, "edgecolor": "0.1", "linewidth": 0.5},
        clip_on=True,
    )


def _unlabelled_summary(names: Sequence[str], most: int = 3) -> str:
    """``"+5 unlabelled: 3 circle, 2 square"``: the boxes left without a label, counted by class."""
    counts = Counter(names).most_common()
    parts = [f"{count} {name}" for name, count in counts[:most]]
    if len(counts) > most:
        parts.append(f"{sum(count for _, count in counts[most:])} other")
    return f"+{len(names)} unlabelled: " + ", ".join(parts)


def detection_visualizer(
    img: Any,
    idx_to_class: Mapping[int, str],
    bbox: Any = None,
    pred: Any = None,
    points: Any = None,
    ax: Any = None,
    *,
    max_labels: Optional[int] = 4,
    point_boxes: Any = None,
):
    """Draw an image with its ground truth (solid boxes) and predictions (dashed, with scores).

    Every box is drawn, each line over a thin dark one so that it shows on any background. At most
    ``max_labels`` boxes are labelled, the best-scoring predictions first, then the ground truth in row
    order; a label is a patch in the box's colour with black or white text, whichever reads better. One
    line at the panel's bottom counts the boxes left unlabelled by class ("+5 unlabelled: 3 circle, 2 square").

    Args:
        img: (3, H, W) ImageNet-normalised tensor, or an (H, W, 3) uint8 / [0, 1] float array.
        idx_to_class: {class index: name}.
        bbox: ground truth (M, 5) rows ``(x1, y1, x2, y2, C)``; padding rows (C < 0) are skipped.
        pred: a ``predict`` dict ``{"boxes", "labels", "scores"}`` or (N, 6) rows
            ``(x1, y1, x2, y2, C, score)``.
        points: (P, 2) ``(x, y)`` points to mark, e.g. FPN locations; white without ``point_boxes``.
        ax: matplotlib axes to draw into; a new figure when ``None``.
        max_labels: the most labels written on the panel; ``None`` labels every box.
        point_boxes: (P,) for each point the row of ``bbox`` it belongs to (e.g. the ground-truth box a
            location was matched to), or -1 for none. With it, colours mark boxes instead of classes:
            ground-truth row i, its label and its points all take colour i (``_class_colour(i)``), so that
            two boxes of one class stay apart; points of -1 stay white, predictions keep their class colours.
    Returns:
        The matplotlib figure (not shown; notebooks display it, scripts may save it).
    """
    if torch.is_tensor(img) and img.dim() == 3 and img.shape[0] == 3:
        img = denormalize_image(img)
    if ax is None:
        _, ax = _pyplot().subplots(figsize=(5, 5))
    img = _to_numpy(img) if torch.is_tensor(img) else img
    # extent puts pixel j over [j, j + 1], the continuous coordinates that boxes use.
    ax.imshow(img, extent=(0, img.shape[1], img.shape[0], 0))
    ax.axis("off")
    ax.set_xlim(0, img.shape[1])  # the view is the image, whatever lies outside it
    ax.set_ylim(img.shape[0], 0)
    gt = np.zeros((0, 5)) if bbox is None else _to_numpy(bbox, np.float64)
    gt = gt.reshape(-1, gt.shape[-1])
    rows = np.zeros((0, 6)) if pred is None else _prediction_rows(pred)

    def gt_colour(i: int):
        return _class_colour(i if point_boxes is not None else gt[i, 4])

    # (row, colour, label, class name, dashed), in the order labels are handed out; padding rows are skipped
    boxes = []
    for row in rows[np.argsort(-rows[:, 5], kind="stable")]:
        name = idx_to_class[int(row[4])]
        boxes.append((row, _class_colour(row[4]), f"{name} {row[5]:.2f}", name, True))
    for i in np.flatnonzero(gt[:, 4] >= 0):
        name = idx_to_class[int(gt[i, 4])]
        boxes.append((gt[i], gt_colour(i), name, name, False))
    labelled = len(boxes) if max_labels is None else max_labels
    taken = []  # labels placed so far, so that none is written over another
    for k, (row, colour, text, _, dashed) in enumerate(boxes):
        _draw_box(ax, row, colour, dashed)
        if k < labelled:
            _write_label(ax, row[0], row[1], text, colour, taken)
    if len(boxes) > labelled:
        ax.text(
            0.01,
            0.01,
            _unlabelled_summary([name for _, _, _, name, _ in boxes[labelled:]]),
            transform=ax.transAxes,
            fontsize=7,
            verticalalignment="bottom",
            bbox={"facecolor": "white", "alpha": 0.85, "pad": 1.5, "edgecolor": "none"},
        )
    if points is not None:
        points = _to_numpy(points).reshape(-1, 2)
        colours = np.ones((len(points), 4))  # white
        if point_boxes is not None:
            owner = _to_numpy(point_boxes).astype(np.int64).reshape(-1)
            for i in np.unique(owner[owner >= 0]):
                colours[owner == i] = gt_colour(int(i))
        size = 6 if point_boxes is None else 12
        ax.scatter(points[:, 0], points[:, 1], s=size, c=colours, edgecolors="black", linewidths=0.5, zorder=3)
    return ax.figure


def plot_loss_history(history: Mapping[str, Sequence[float]], path: Optional[PathLike] = None):
    """Plot one curve per loss term (and the total) against the iteration; logged metrics (names starting
    with ``metric_``) get a panel of their own, since they are no losses and have their own scale.

    Args:
        history: ``train_detector``'s return value, {name: per-iteration values}.
        path: save the figure there too (any format matplotlib knows, e.g. ``.png``).
    Returns:
        The matplotlib figure.
    """
    losses = {name: values for name, values in history.items() if not name.startswith("metric_")}
    metrics = {name: values for name, values in history.items() if name.startswith("metric_")}
    figure, axes = _pyplot().subplots(1, 2 if metrics else 1, figsize=(13 if metrics else 7, 4), squeeze=False)
    _plot_curves(axes[0, 0], losses, "loss", "Training losses")
    if metrics:  # the first stage's error and MAE: measured on the training samples, never trained on
        _plot_curves(axes[0, 1], metrics, "value", "First-stage metrics (logged, not trained on)")
    figure.tight_layout()
    if path is not None:
        figure.savefig(path, dpi=100, bbox_inches="tight")
    return figure


def _plot_curves(ax, curves: Mapping[str, Sequence[float]], ylabel: str, title: str) -> None:
    """One line per entry against the iteration, the legend outside the axes so that it hides no curve."""
    for name, values in curves.items():
        ax.plot(np.arange(1, len(values) + 1), values, label=name, linewidth=2 if name == "total" else 1)
    ax.set(xlabel="iteration", ylabel=ylabel, title=title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    ax.grid(alpha=0.3)


# ---------------------------------------------------------------------------------------------------------------
# The notebooks' opening: what a detector outputs, IoU, average precision.

_TP_COLOUR, _FP_COLOUR, _GT_COLOUR = "#2ca02c", "#d62728", "0.15"


def _count(n: int, noun: str) -> str:
    """``"1 box"``, ``"2 boxes"``, ``"3 detections"``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}{'es' if noun.endswith(('s', 'x')) else 's'}"


def _reference_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """(N, 4), (M, 4) -> (N, M) IoU by torchvision's ``box_iou``: the reference that ``common.iou`` must equal.
    The opening's figures come before a learner writes ``common.iou``, so they cannot use it."""
    return box_iou(boxes1, boxes2)


def _iou_matrix(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    """``_reference_iou`` on (D, 4), (G, 4) float64 arrays, as ``evaluation``'s VOC matching takes it."""
    return _reference_iou(torch.from_numpy(boxes1), torch.from_numpy(boxes2)).numpy()


def _best_same_class_iou(rows: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """(N,) the best IoU (``_reference_iou``) of each (N, 5+) detection row with a (M, 5) ground-truth row of
    its class; 0 where there is none."""
    if not len(rows) or not len(gt):
        return np.zeros(len(rows))
    ious = _reference_iou(torch.from_numpy(rows[:, :4]), torch.from_numpy(gt[:, :4])).numpy()  # (N, M)
    return np.where(rows[:, None, 4] == gt[None, :, 4], ious, 0.0).max(1)


def _table(ax, cells: List[List[str]], labels: Sequence[str], widths: Sequence[float], note: str, colours=None):
    """A table at the top of ``ax`` (turned off), a row per entry of ``cells``, and ``note`` just under it."""
    ax.axis("off")
    height = min(0.075 * (len(cells) + 1), 0.8)
    table = ax.table(
        cellText=cells,
        cellColours=colours,
        colLabels=list(labels),
        colWidths=list(widths),
        cellLoc="center",
        bbox=(0.0, 1.0 - height, sum(widths), height),
    )
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    for (row, _), cell in table.get_celld().items():
        cell.set_edgecolor("0.75")
        if row == 0:
            cell.set_text_props(weight="bold")
            cell.set_facecolor("0.92")
    ax.text(0.0, 0.97 - height, note, transform=ax.transAxes, va="top", fontsize=9, color="0.25", linespacing=1.4)
    return table


def draw_detector_outputs(
    image: Any,
    idx_to_class: Mapping[int, str],
    gt_boxes: Any,
    predictions: Any,
    *,
    max_rows: int = 8,
    max_labels: Optional[int] = 4,
):
    """What a detector is asked for and what it answers, side by side: the ground truth on the image, the
    detector's boxes with their classes and scores, and the same answer as the table ``predict`` returns,
    each box with its best IoU (torchvision's ``box_iou``) with a ground-truth box of its class.

    Args:
        image: (3, H, W) normalised tensor or (H, W, 3) array, as ``detection_visualizer``'s ``img``.
        idx_to_class: {class index: name}.
        gt_boxes: (M, 5) rows ``(x1, y1, x2, y2, C)``; padding rows (C < 0) are skipped.
        predictions: one image's ``predict`` dict ``{"boxes" (N, 4), "labels" (N,), "scores" (N,)}``, or
            (N, 6) rows ``(x1, y1, x2, y2, C, score)``.
        max_rows: detections listed in the table, best first.
        max_labels: labels written per image panel (``detection_visualizer``'s).
    Returns:
        The matplotlib figure.
    """
    gt = _to_numpy(gt_boxes, np.float64).reshape(-1, 5)
    gt = gt[gt[:, 4] >= 0]
    rows = _prediction_rows(predictions).astype(np.float64)
    rows = rows[np.argsort(-rows[:, 5], kind="stable")]
    best_iou = _best_same_class_iou(rows, gt)
    figure, axes = _pyplot().subplots(1, 3, figsize=(14, 5.2), gridspec_kw={"width_ratios": (1, 1, 1.35)})
    detection_visualizer(image, idx_to_class, bbox=gt, ax=axes[0], max_labels=max_labels)
    axes[0].set_title(f"Ground truth: {_count(len(gt), 'box')}\nsolid: (x1, y1, x2, y2) and a class", fontsize=10)
    detection_visualizer(image, idx_to_class, pred=rows, ax=axes[1], max_labels=max_labels)
    axes[1].set_title(
        f"Detector output: {_count(len(rows), 'box')}\ndashed: a box, a class, a score in [0, 1]", fontsize=10
    )
    shown = rows[:max_rows]
    cells = [
        [str(k + 1), idx_to_class[int(row[4])], f"{row[5]:.2f}", "(" + ", ".join(f"{v:.0f}" for v in row[:4]) + ")"]
        + [f"{best_iou[k]:.2f}"]
        for k, row in enumerate(shown)
    ]
    note = (
        "predict() returns, per image, boxes (N, 4), labels (N,) and scores (N,).\n"
        "IoU: overlap with the best ground-truth box of the same class;\n"
        "1 is a perfect box, 0 no overlap."
    )
    labels = ["rank", "class", "score", "box (x1, y1, x2, y2)", "IoU"]
    table = _table(axes[2], cells or [["", "", "", "no detections", ""]], labels, [0.1, 0.27, 0.13, 0.38, 0.12], note)
    for k, row in enumerate(shown):
        colour = _class_colour(row[4])
        table[k + 1, 1].set_facecolor(colour)
        table[k + 1, 1].get_text().set_color(_text_colour(colour))
    more = f" ({len(rows) - len(shown)} more not listed)" if len(rows) > len(shown) else ""
    axes[2].set_title(f"The same output as numbers, by decreasing score{more}", fontsize=10)
    figure.tight_layout()
    return figure


def _cut(span: Tuple[float, float], hole: Optional[Tuple[float, float]]) -> List[Tuple[float, float]]:
    """The parts of the interval ``span`` outside the open interval ``hole`` (all of it when ``hole`` is None)."""
    start, end = span
    if hole is None or hole[1] <= start or hole[0] >= end:
        return [(start, end)]
    parts = [(start, hole[0])] if hole[0] > start else []
    return parts + ([(hole[1], end)] if hole[1] < end else [])


def _union_outline(a: Sequence[float], b: Sequence[float]) -> List[Tuple[Tuple[float, float], Tuple[float, float]]]:
    """Segments of the outline of the union of two boxes: every side of each box, less its part inside the other."""
    segments = []
    for (x1, y1, x2, y2), (ox1, oy1, ox2, oy2) in ((a, b), (b, a)):
        for y in (y1, y2):
            hole = (ox1, ox2) if oy1 < y < oy2 else None
            segments += [((s, y), (e, y)) for s, e in _cut((x1, x2), hole)]
        for x in (x1, x2):
            hole = (oy1, oy2) if ox1 < x < ox2 else None
            segments += [((x, s), (x, e)) for s, e in _cut((y1, y2), hole)]
    return segments


def _box_canvas(ax, boxes: Sequence[Sequence[float]], margin: float = 0.2) -> None:
    """Pixel axes (y downwards, as in an image) around ``boxes`` with a margin, equal scales, a light grid."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    low, high = boxes[:, :2].min(0), boxes[:, 2:].max(0)
    pad = margin * (high - low).max()
    ax.set_xlim(low[0] - pad, high[0] + pad)
    ax.set_ylim(high[1] + pad, low[1] - pad)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.set_xlabel("x (pixels)")
    ax.set_ylabel("y (pixels)")


def draw_iou_example(box_a: Sequence[float], box_b: Sequence[float], *, iou_threshold: float = 0.5):
    """Intersection over union in two panels.

    Left: boxes A and B, their intersection shaded and their union outlined; the title divides the two
    areas and gives the IoU (torchvision's ``box_iou``, which ``common.iou`` must equal). Right: A as a
    ground-truth box and two detections of its size, one shifted to an IoU above ``iou_threshold`` (a true
    positive) and one to an IoU below it (a false positive); their IoUs come from ``box_iou`` too.

    Args:
        box_a, box_b: ``(x1, y1, x2, y2)`` in pixels, y downwards as in an image.
        iou_threshold: the IoU a detection needs with a box of its class to find it (PASCAL VOC: 0.5).
    Returns:
        The matplotlib figure.
    """
    from matplotlib.collections import LineCollection
    from matplotlib.patches import Patch, Rectangle

    a = torch.as_tensor(box_a, dtype=torch.float64).reshape(4)
    b = torch.as_tensor(box_b, dtype=torch.float64).reshape(4)
    value = float(_reference_iou(a[None], b[None])[0, 0])
    corner, far = torch.maximum(a[:2], b[:2]), torch.minimum(a[2:], b[2:])
    intersection = float(box_area(torch.cat([corner, far])))
    union = float(box_area(a) + box_area(b)) - intersection
    figure, axes = _pyplot().subplots(1, 2, figsize=(13, 5.8))
    ax = axes[0]
    _box_canvas(ax, [a.tolist(), b.tolist()])
    for box, colour, name, place in ((a, "C0", "A", "top left"), (b, "C1", "B", "bottom right")):
        x1, y1, x2, y2 = box.tolist()
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, facecolor=colour, alpha=0.15, edgecolor=colour, lw=1.5))
        x, y, ha, va = (x1 + 1, y1 + 1, "left", "top") if place == "top left" else (x2 - 1, y2 - 1, "right", "bottom")
        ax.text(x, y, name, color=colour, fontsize=14, weight="bold", ha=ha, va=va)
    if intersection > 0:
        (x1, y1), (x2, y2) = corner.tolist(), far.tolist()
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, facecolor="#7b3294", alpha=0.55, hatch="//", lw=0))
    ax.add_collection(LineCollection(_union_outline(a.tolist(), b.tolist()), colors="black", linewidths=2.5))
    ax.legend(
        handles=[
            Patch(facecolor="#7b3294", alpha=0.55, hatch="//", label=f"intersection: {intersection:,.0f} px²"),
            Patch(facecolor="none", edgecolor="black", linewidth=2.5, label=f"union (outlined): {union:,.0f} px²"),
        ],
        loc="lower right",
        fontsize=9,
        framealpha=0.9,
    )
    ax.set_title(
        f"IoU = intersection / union = {intersection:,.0f} / {union:,.0f} px²\nIoU = {value:.3f}",
        fontsize=11,
    )
    _draw_iou_threshold(axes[1], a, iou_threshold)
    figure.tight_layout()
    return figure


def _shifted_to_iou(box: torch.Tensor, target: float, direction: Tuple[int, int]) -> torch.Tensor:
    """``box`` moved by the same distance s along x and y (signs from ``direction``) so that the two overlap
    with IoU ``target``: the overlap is (w - s)(h - s) = 2 w h r / (1 + r), a quadratic in s."""
    w, h = float(box[2] - box[0]), float(box[3] - box[1])
    overlap = 2 * w * h * target / (1 + target)
    s = ((w + h) - ((w + h) ** 2 - 4 * (w * h - overlap)) ** 0.5) / 2
    dx, dy = direction[0] * s, direction[1] * s
    return box + box.new_tensor([dx, dy, dx, dy])


def _draw_iou_threshold(ax, gt: torch.Tensor, iou_threshold: float) -> None:
    """A ground-truth box and two same-size detections, one either side of ``iou_threshold``."""
    from matplotlib.lines import Line2D

    above, below = (1 + iou_threshold) / 2, iou_threshold / 2  # target IoUs either side of the threshold
    detections = torch.stack([_shifted_to_iou(gt, above, (1, -1)), _shifted_to_iou(gt, below, (-1, 1))])
    values = _reference_iou(detections, gt[None])[:, 0].tolist()
    _box_canvas(ax, [gt.tolist(), *detections.tolist()], margin=0.3)
    _draw_box(ax, gt.tolist(), _GT_COLOUR, linewidth=3)
    centre = ((gt[0] + gt[2]) / 2).item(), ((gt[1] + gt[3]) / 2).item()
    ax.text(*centre, "ground truth", ha="center", va="center", fontsize=9, bbox={"facecolor": "white", "pad": 1.5})
    for box, value, corner in zip(detections.tolist(), values, ("top right", "bottom left")):
        hit = value >= iou_threshold
        colour = _TP_COLOUR if hit else _FP_COLOUR
        _draw_box(ax, box, colour, dashed=True, linewidth=2.5)
        verdict = f"TP: IoU {value:.2f} >= {iou_threshold:g}" if hit else f"FP: IoU {value:.2f} < {iou_threshold:g}"
        x, y, ha, va = (box[2], box[1], "right", "bottom") if corner == "top right" else (box[0], box[3], "left", "top")
        bbox = {"facecolor": colour, "pad": 2, "edgecolor": "none"}
        ax.text(x, y, verdict, ha=ha, va=va, fontsize=10, color="white", weight="bold", bbox=bbox)
    handles = [
        Line2D([], [], color=_GT_COLOUR, lw=3, label="ground-truth box"),
        Line2D([], [], color=_TP_COLOUR, lw=2.5, ls="--", label="detection: true positive"),
        Line2D([], [], color=_FP_COLOUR, lw=2.5, ls="--", label="detection: false positive"),
    ]
    ax.legend(handles=handles, loc="lower right", fontsize=9, framealpha=0.9)
    ax.set_title(
        f"A detection finds a box when their IoU >= {iou_threshold:g}\n(PASCAL VOC's rule)",
        fontsize=11,
    )


# One class in one 128-px image: three boxes, and seven detections among which a duplicate (rank 3), a box
# placed too far off (rank 5) and three on background. Their TP / FP marks are computed, never written here.
_AP_EXAMPLE_GT = ((10, 10, 50, 50), (70, 15, 115, 60), (30, 75, 80, 120))
_AP_EXAMPLE_DETECTIONS = (
    (12, 8, 52, 48, 0.95),
    (68, 18, 112, 62, 0.90),
    (8, 12, 48, 54, 0.80),
    (88, 80, 120, 112, 0.70),
    (50, 90, 100, 125, 0.60),
    (28, 72, 82, 118, 0.45),
    (2, 100, 24, 124, 0.30),
)


def draw_average_precision_example(
    gt_boxes: Any = None, detections: Any = None, *, iou_threshold: float = 0.5, image_size: int = 128
):
    """Average precision (AP), step by step, for one class in one image.

    Left: the ground truth (solid) and the detections (dashed), numbered by decreasing score. Middle: the
    ranked list, each detection a true positive (TP) or a false positive (FP) by PASCAL VOC's matching
    (``evaluation``'s), with the precision and recall of the detections down to it.
    Right: the precision-recall curve, its envelope (the best precision at that recall or higher) and the
    area under the envelope shaded: that area is the AP that ``compute_map`` gives, a fraction from 0 to 1.

    Args:
        gt_boxes: (M, 4) boxes of one class, M >= 1; ``None`` for a built-in example of three.
        detections: (N, 5) rows ``(x1, y1, x2, y2, score)``; ``None`` for the built-in seven.
        iou_threshold: the IoU a detection needs with a box to find it.
        image_size: the side of the square canvas, in pixels.
    Returns:
        The matplotlib figure.
    """
    from evaluation import _ap_all_point, _detections, _ground_truth, _voc_outcomes, _voc_pr_curves

    gt = _to_numpy(_AP_EXAMPLE_GT if gt_boxes is None else gt_boxes, np.float64).reshape(-1, 4)
    rows = _to_numpy(_AP_EXAMPLE_DETECTIONS if detections is None else detections, np.float64).reshape(-1, 5)
    if not len(gt):
        raise ValueError("average precision needs at least one ground-truth box")
    rows = rows[np.argsort(-rows[:, 4], kind="stable")]  # the order in which VOC walks them
    prediction = {"boxes": rows[:, :4], "scores": rows[:, 4], "labels": np.zeros(len(rows), np.int64)}
    target = {"boxes": gt, "labels": np.zeros(len(gt), np.int64)}
    preds, gts = [_detections(prediction)], [_ground_truth(target)]
    outcomes = _voc_outcomes(preds, gts, iou_threshold, _iou_matrix)[1]  # (N,) 1 TP, 0 FP, by decreasing score
    recall, precision = _voc_pr_curves(preds, gts, 1, iou_threshold, _iou_matrix)[0]
    ap = _ap_all_point(recall, precision)  # what compute_map gives for this one class
    ious = _reference_iou(torch.from_numpy(rows[:, :4]), torch.from_numpy(gt)).numpy()  # (N, M)
    figure, axes = _pyplot().subplots(1, 3, figsize=(15, 5.3), gridspec_kw={"width_ratios": (1, 1.25, 1.1)})
    _draw_ranked_boxes(axes[0], gt, rows, outcomes, image_size)
    _draw_ranked_table(axes[1], rows, outcomes, ious, precision, recall, iou_threshold)
    _draw_pr_envelope(axes[2], recall, precision, ap, len(gt))
    figure.tight_layout()
    return figure


def _draw_ranked_boxes(ax, gt: np.ndarray, rows: np.ndarray, outcomes: np.ndarray, image_size: int) -> None:
    ax.imshow(np.full((image_size, image_size, 3), 0.95), extent=(0, image_size, image_size, 0))
    ax.set_xlim(0, image_size)
    ax.set_ylim(image_size, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    taken = []
    for g, box in enumerate(gt):
        _draw_box(ax, box, _GT_COLOUR, linewidth=2.5)
        bbox = {"facecolor": "white", "alpha": 0.85, "pad": 1, "edgecolor": "none"}
        ax.text(box[0] + 2, box[3] - 2, f"GT {g + 1}", fontsize=8, weight="bold", va="bottom", bbox=bbox)
    for k, (row, hit) in enumerate(zip(rows, outcomes)):
        colour = _TP_COLOUR if hit == 1 else _FP_COLOUR
        _draw_box(ax, row, colour, dashed=True)
        _write_label(ax, row[0], row[1], f"#{k + 1}", colour, taken)
    title = (
        f"{_count(len(gt), 'ground-truth box')} (solid), {_count(len(rows), 'detection')}\n(dashed: green TP, red FP)"
    )
    ax.set_title(title, fontsize=10)


def _draw_ranked_table(ax, rows, outcomes, ious, precision, recall, iou_threshold: float) -> None:
    cells, colours = [], []
    for k, (row, hit) in enumerate(zip(rows, outcomes)):
        best = int(ious[k].argmax())
        if hit == 1:
            verdict = f"TP (GT {best + 1})"
        elif ious[k, best] >= iou_threshold:
            verdict = f"FP: duplicate (GT {best + 1})"  # a better-scored detection took the box
        else:
            verdict = f"FP: IoU < {iou_threshold:g}"
        cells.append([f"#{k + 1}", f"{row[4]:.2f}", f"{ious[k, best]:.2f}", verdict, f"{precision[k]:.2f}"])
        cells[-1].append(f"{recall[k]:.2f}")
        colours.append(["#e3f4e0" if hit == 1 else "#fbe0e0"] * 6)
    note = (
        "IoU: with the ground-truth box it overlaps most.\n"
        "precision = TP so far / detections so far\n"
        "recall = TP so far / ground-truth boxes\n"
        "A second detection of a box already found is a duplicate:\n"
        "a false positive, however well it overlaps."
    )
    labels = ["rank", "score", "IoU", "outcome", "precision", "recall"]
    _table(ax, cells, labels, [0.1, 0.12, 0.11, 0.33, 0.17, 0.14], note, colours)
    ax.set_title("Ranked by score: each detection takes the box it overlaps most", fontsize=10)


def _draw_pr_envelope(ax, recall: np.ndarray, precision: np.ndarray, ap: float, num_gt: int) -> None:
    envelope = np.maximum.accumulate(precision[::-1])[::-1]  # best precision at this recall or higher
    steps_r = np.concatenate([[0.0], recall])
    steps_p = np.concatenate([envelope[:1], envelope])
    # step "pre": envelope[i] spans the recall interval (recall[i - 1], recall[i]], the all-point AP's sum.
    ax.fill_between(steps_r, steps_p, step="pre", color="C0", alpha=0.2, label=f"shaded area = AP = {ap:.3f}")
    ax.step(steps_r, steps_p, where="pre", color="C0", linewidth=2, label="envelope")
    ax.plot(recall, precision, "o-", color="0.45", markersize=5, linewidth=1, label="after each detection")
    for k, (r, p) in enumerate(zip(recall, precision)):
        left = r > 0.9
        ax.annotate(
            f"#{k + 1}",
            (r, p),
            xytext=(-6 if left else 6, 0),
            textcoords="offset points",
            fontsize=8,
            ha="right" if left else "left",
            va="center",
        )
    ax.set(xlim=(0, 1.03), ylim=(0, 1.08))
    ax.set_xlabel(f"recall (fraction of the {num_gt} GT boxes found)")
    ax.set_ylabel("precision (fraction of detections correct)")
    ax.legend(loc="lower left", fontsize=9)
    ax.grid(alpha=0.3)
    ax.set_title(f"AP = {ap:.3f}  (area under the envelope,\na fraction from 0 to 1)", fontsize=10)

"""Pictures: ground truth and predictions drawn on an image, and the loss curves of a training run.

matplotlib is imported on first use, so that the rest of the project runs without a display.
Imports: ``detection_data`` (to undo the normalisation) and matplotlib.
"""

from typing import Any, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

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
    from matplotlib import colormaps

    return colormaps["tab20"](int(label) % 20)


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


def _draw_box(ax, row: np.ndarray, text: str, dashed: bool, taken: List[Tuple[float, float, float, float]]) -> None:
    from matplotlib.patches import Rectangle

    x1, y1, x2, y2, label = row[:5]
    colour = _class_colour(label)
    linestyle = "--" if dashed else "-"
    ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=2, linestyle=linestyle))
    ax.text(
        *_label_slot(ax, x1, max(y1, 0), text, taken),
        text,
        fontsize=_LABEL_POINTS,
        color="black",
        verticalalignment="bottom",
        bbox={"facecolor": colour, "alpha": 0.7, "pad": 1, "edgecolor": "none"},
        clip_on=True,
    )


def detection_visualizer(
    img: Any,
    idx_to_class: Mapping[int, str],
    bbox: Any = None,
    pred: Any = None,
    points: Any = None,
    ax: Any = None,
):
    """Draw an image with its ground truth (solid boxes) and predictions (dashed, with scores).

    Args:
        img: (3, H, W) ImageNet-normalised tensor, or an (H, W, 3) uint8 / [0, 1] float array.
        idx_to_class: {class index: name}.
        bbox: ground truth (M, 5) rows ``(x1, y1, x2, y2, C)``; padding rows (C < 0) are skipped.
        pred: a ``predict`` dict ``{"boxes", "labels", "scores"}`` or (N, 6) rows
            ``(x1, y1, x2, y2, C, score)``.
        points: (P, 2) ``(x, y)`` points to mark, e.g. FPN locations.
        ax: matplotlib axes to draw into; a new figure when ``None``.
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
    taken = []  # labels placed so far, so that none is written over another
    if bbox is not None:
        bbox = _to_numpy(bbox)
        for row in bbox.reshape(-1, bbox.shape[-1]):
            if row[4] >= 0:
                _draw_box(ax, row, idx_to_class[int(row[4])], dashed=False, taken=taken)
    if pred is not None:
        for row in _prediction_rows(pred):
            _draw_box(ax, row, f"{idx_to_class[int(row[4])]} {row[5]:.2f}", dashed=True, taken=taken)
    if points is not None:
        points = _to_numpy(points).reshape(-1, 2)
        ax.scatter(points[:, 0], points[:, 1], s=6, c="white", edgecolors="black", linewidths=0.5)
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

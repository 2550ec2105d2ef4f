"""Tests of drawing: detection_visualizer (ground truth, predictions and points on an image; legible
labels, at most ``max_labels`` of them, points in their box's colour), plot_loss_history (one curve per
loss term, saved to a file), the opening's figures (draw_detector_outputs, draw_iou_example,
draw_average_precision_example: their numbers are those of common.iou and compute_map, the solution's)."""

import re

import numpy as np
import pytest
import torch
from conftest import close_figure as _close
from matplotlib import patheffects
from matplotlib.colors import to_rgba

import drawing
from common import iou
from drawing import (
    detection_visualizer,
    draw_average_precision_example,
    draw_detector_outputs,
    draw_iou_example,
    plot_loss_history,
)
from evaluation import compute_map

NAMES = {0: "circle", 1: "square", 2: "triangle"}


def _texts(figure):
    """Every string written on the figure: axes texts, titles, table cells and figure texts."""
    texts = [text.get_text() for text in figure.texts]
    for ax in figure.axes:
        texts += [text.get_text() for text in ax.texts] + [ax.get_title()]
        for table in ax.tables:
            texts += [cell.get_text().get_text() for cell in table.get_celld().values()]
    return texts


def test_detection_visualizer_draws_ground_truth_predictions_and_points():
    image = torch.zeros(3, 32, 32)
    gt = torch.tensor([[1.0, 2.0, 10.0, 12.0, 0], [-1, -1, -1, -1, -1]])
    pred = {"boxes": torch.tensor([[3.0, 3.0, 20.0, 20.0]]), "labels": torch.tensor([1]), "scores": torch.tensor([0.9])}
    figure = detection_visualizer(image, {0: "cat", 1: "dog"}, bbox=gt, pred=pred, points=torch.rand(5, 2) * 32)
    ax = figure.axes[0]
    assert len(ax.patches) == 2  # the padding row is skipped
    assert sorted(text.get_text() for text in ax.texts) == ["cat", "dog 0.90"]
    assert len(ax.collections) == 1
    _close(figure)


def _crowded_scene():
    """Seven ground-truth boxes (classes 0, 0, 0, 1, 1, 2, 2) and two predictions, on a 64-px image."""
    gt = torch.tensor([[4.0 + 8 * i, 4.0, 10.0 + 8 * i, 20.0, c] for i, c in enumerate([0, 0, 0, 1, 1, 2, 2])])
    pred = {
        "boxes": torch.tensor([[5.0, 30.0, 20.0, 50.0], [30.0, 30.0, 50.0, 50.0]]),
        "labels": torch.tensor([0, 1]),
        "scores": torch.tensor([0.8, 0.9]),
    }
    return np.zeros((64, 64, 3)), gt, pred


def test_detection_visualizer_labels_the_best_predictions_first_and_summarises_the_rest():
    image, gt, pred = _crowded_scene()
    figure = detection_visualizer(image, NAMES, bbox=gt, pred=pred, max_labels=3)
    ax = figure.axes[0]
    assert len(ax.patches) == 9  # every box is drawn
    labels = [text.get_text() for text in ax.texts if not text.get_text().startswith("+")]
    assert labels == ["square 0.90", "circle 0.80", "circle"]  # by score, then the first ground-truth row
    # Unlabelled: ground-truth rows 1-6, classes 0, 0, 1, 1, 2, 2 (ties in row order).
    assert [text.get_text() for text in ax.texts if text.get_text().startswith("+")] == [
        "+6 unlabelled: 2 circle, 2 square, 2 triangle"
    ]
    _close(figure)
    figure = detection_visualizer(image, NAMES, bbox=gt, pred=pred, max_labels=None)
    assert len(figure.axes[0].texts) == 9 and not any(t.get_text().startswith("+") for t in figure.axes[0].texts)
    _close(figure)


def test_labels_contrast_with_their_patch_and_boxes_have_a_dark_outline():
    assert drawing._text_colour("yellow") == "black" and drawing._text_colour("navy") == "white"
    assert drawing._text_colour((0.5, 0.5, 0.5)) == "black"  # luminance 0.214 > 0.179
    assert drawing._text_colour((0.4, 0.4, 0.4)) == "white"  # luminance 0.133
    image, gt, pred = _crowded_scene()
    figure = detection_visualizer(image, NAMES, bbox=gt, pred=pred, max_labels=None)
    ax = figure.axes[0]
    for text in ax.texts:
        patch = text.get_bbox_patch()
        assert to_rgba(text.get_color()) == to_rgba(drawing._text_colour(patch.get_facecolor()))
    for patch in ax.patches:
        stroke = patch.get_path_effects()[0]
        assert isinstance(stroke, patheffects.Stroke)
        assert stroke._gc["linewidth"] > patch.get_linewidth()  # wider than the box line, under it
        assert max(to_rgba(stroke._gc["foreground"])[:3]) < 0.2  # and dark
    _close(figure)


def test_class_colours_keep_the_first_ten_classes_apart():
    colours = [drawing._class_colour(c)[:3] for c in range(10)]
    assert len(set(colours)) == 10
    # tab20's own order would give classes 0 and 1 a strong and a light blue; here they differ in hue.
    assert np.abs(np.subtract(colours[0], colours[1])).max() > 0.4


def test_points_take_the_colour_of_their_box():
    image = np.zeros((32, 32, 3))
    gt = torch.tensor([[1.0, 1.0, 15.0, 15.0, 0], [-1, -1, -1, -1, -1], [16.0, 16.0, 31.0, 31.0, 0]])
    points = torch.tensor([[5.0, 5.0], [8.0, 8.0], [20.0, 20.0], [2.0, 30.0], [25.0, 25.0]])
    owners = torch.tensor([0, 0, 2, -1, 2])  # rows of gt; row 1 is padding
    figure = detection_visualizer(image, NAMES, bbox=gt, points=points, point_boxes=owners)
    ax = figure.axes[0]
    box_colours = [to_rgba(patch.get_edgecolor()) for patch in ax.patches]  # gt rows 0 and 2
    assert box_colours[0] != box_colours[1]  # the same class, two boxes, two colours
    dots = [tuple(colour) for colour in ax.collections[0].get_facecolors()]
    assert dots == [box_colours[0], box_colours[0], box_colours[1], to_rgba("white"), box_colours[1]]
    labels = [text for text in ax.texts]
    assert [to_rgba(text.get_bbox_patch().get_facecolor(), 1.0) for text in labels] == box_colours
    _close(figure)
    figure = detection_visualizer(image, NAMES, bbox=gt, points=points)  # without point_boxes: white dots
    assert {tuple(colour) for colour in figure.axes[0].collections[0].get_facecolors()} == {to_rgba("white")}
    _close(figure)


def test_plot_loss_history_draws_one_curve_per_term(tmp_path):
    history = {"loss_cls": [3.0, 2.0, 1.0], "loss_box": [1.0, 0.5, 0.2], "total": [4.0, 2.5, 1.2]}
    figure = plot_loss_history(history, path=tmp_path / "loss.png")
    assert [line.get_label() for line in figure.axes[0].lines] == list(history)
    assert (tmp_path / "loss.png").stat().st_size > 0
    _close(figure)


def test_draw_detector_outputs_lists_the_detections_with_their_iou():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0, 0], [-1, -1, -1, -1, -1]])
    pred = {
        "boxes": torch.tensor([[5.0, 0.0, 15.0, 10.0], [0.0, 0.0, 10.0, 5.0], [0.0, 0.0, 10.0, 10.0]]),
        "labels": torch.tensor([0, 0, 1]),
        "scores": torch.tensor([0.7, 0.9, 0.8]),
    }
    figure = draw_detector_outputs(np.zeros((16, 16, 3)), NAMES, gt, pred)
    table = figure.axes[2].tables[0]
    rows = [[table[r, c].get_text().get_text() for c in range(5)] for r in range(1, 4)]
    # By score: (0, 0, 10, 5) overlaps 50 of 100 px² -> 0.50; the square of class 1 has no box of its class
    # -> 0.00 although it covers the box exactly; (5, 0, 15, 10): 50 / (100 + 100 - 50) = 0.33.
    assert rows == [
        ["1", "circle", "0.90", "(0, 0, 10, 5)", "0.50"],
        ["2", "square", "0.80", "(0, 0, 10, 10)", "0.00"],
        ["3", "circle", "0.70", "(5, 0, 15, 10)", "0.33"],
    ]
    expected = iou(pred["boxes"][[1, 0]], gt[:1, :4])[:, 0]
    assert [float(rows[0][4]), float(rows[2][4])] == [round(v, 2) for v in expected.tolist()]
    assert figure.axes[0].get_title().startswith("Ground truth: 1 box\n")
    assert figure.axes[1].get_title().startswith("Detector output: 3 boxes\n")
    _close(figure)


def test_draw_iou_example_writes_common_iou_and_outlines_the_union():
    a, b = (0.0, 0.0, 4.0, 4.0), (2.0, 2.0, 6.0, 6.0)
    figure = draw_iou_example(a, b)
    title = figure.axes[0].get_title()
    value = iou(torch.tensor([a]), torch.tensor([b])).item()
    assert value == pytest.approx(4 / 28)  # intersection 2 x 2 = 4, union 16 + 16 - 4 = 28
    assert "4 / 28 px²" in title and f"IoU = {value:.3f}" in title and "0.143" in title
    # The union's outline: two 4 x 4 squares less the 2 + 2 of each that lies inside the other: 32 - 8 = 24.
    segments = figure.axes[0].collections[0].get_segments()
    assert sum(np.linalg.norm(s[1] - s[0]) for s in segments) == pytest.approx(24.0)
    # Right: the two detections' IoUs, written on them, are common.iou's of the boxes drawn.
    ax = figure.axes[1]
    boxes = torch.tensor(
        [[p.get_x(), p.get_y(), p.get_x() + p.get_width(), p.get_y() + p.get_height()] for p in ax.patches]
    )
    drawn = iou(boxes[1:], boxes[:1])[:, 0]  # the first patch is the ground truth
    verdicts = [t.get_text() for t in ax.texts if t.get_text().startswith(("TP", "FP"))]
    assert verdicts == [f"TP: IoU {drawn[0]:.2f} >= 0.5", f"FP: IoU {drawn[1]:.2f} < 0.5"]
    assert drawn[0] >= 0.5 > drawn[1]
    assert drawn.tolist() == pytest.approx([0.75, 0.25])  # the targets either side of the threshold
    _close(figure)


def _polygon_area(vertices: np.ndarray) -> float:
    x, y = vertices[:, 0], vertices[:, 1]
    return 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))


def test_draw_average_precision_example_draws_compute_maps_ap():
    # Two boxes; detections by score: a hit, a duplicate of it, a hit on the second box.
    gt = np.array([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    detections = np.array([[0, 0, 10, 10, 0.9], [1, 1, 10, 10, 0.8], [20, 20, 30, 31, 0.7]], dtype=float)
    figure = draw_average_precision_example(gt, detections, image_size=32)
    # precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1: AP = 1/2 * 1 + 1/2 * 2/3 = 0.833
    expected = compute_map(
        [{"boxes": detections[:, :4], "scores": detections[:, 4], "labels": np.zeros(3)}],
        [{"boxes": gt, "labels": np.zeros(2)}],
        num_classes=1,
    )["map"]
    assert expected == pytest.approx(5 / 6)
    ax = figure.axes[2]
    assert re.search(r"AP = (\d\.\d+)", ax.get_title()).group(1) == f"{expected:.3f}"
    assert _polygon_area(ax.collections[0].get_paths()[0].vertices) == pytest.approx(expected)  # the shaded area
    table = figure.axes[1].tables[0]
    outcomes = [table[r, 3].get_text().get_text() for r in range(1, 4)]
    assert outcomes == ["TP (GT 1)", "FP: duplicate (GT 1)", "TP (GT 2)"]
    assert [table[r, 4].get_text().get_text() for r in range(1, 4)] == ["1.00", "0.50", "0.67"]  # precision
    _close(figure)


def test_draw_average_precision_example_built_in_example():
    figure = draw_average_precision_example()
    rows = np.array(drawing._AP_EXAMPLE_DETECTIONS)
    expected = compute_map(
        [{"boxes": rows[:, :4], "scores": rows[:, 4], "labels": np.zeros(len(rows))}],
        [{"boxes": np.array(drawing._AP_EXAMPLE_GT, float), "labels": np.zeros(3)}],
        num_classes=1,
    )["map"]
    # TP TP FP FP FP TP FP: the envelope is 1 up to recall 2/3, then 1/2 up to 1: 2/3 + 1/6 = 0.833.
    assert expected == pytest.approx(5 / 6)
    assert f"AP = {expected:.3f}" in figure.axes[2].get_title()
    outcomes = [figure.axes[1].tables[0][r, 3].get_text().get_text()[:2] for r in range(1, 8)]
    assert outcomes == ["TP", "TP", "FP", "FP", "FP", "TP", "FP"]
    _close(figure)


def _all_text(figure) -> str:
    return "\n".join(_texts(figure))


def test_the_openings_figures_need_no_student_code(monkeypatch):
    # In the student release common.iou is a stub until its step; the opening comes before it.
    import common
    import evaluation

    def stub(boxes1, boxes2):
        raise NotImplementedError("iou is yours to write")

    monkeypatch.setattr(common, "iou", stub)
    monkeypatch.setattr(evaluation, "iou", stub)
    image = torch.zeros(3, 64, 64)
    gt = torch.tensor([[4.0, 4.0, 40.0, 40.0, 0.0]])
    for figure in (
        draw_detector_outputs(image, NAMES, gt, torch.tensor([[6.0, 4.0, 42.0, 40.0, 0.0, 0.9]])),
        draw_iou_example((0, 0, 10, 10), (5, 0, 15, 10)),
        draw_average_precision_example(),
    ):
        _close(figure)

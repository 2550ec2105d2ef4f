"""Tests of drawing: detection_visualizer (ground truth, predictions and points on an image) and
plot_loss_history (one curve per loss term, saved to a file)."""

import torch
from conftest import close_figure as _close

from drawing import detection_visualizer, plot_loss_history


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


def test_plot_loss_history_draws_one_curve_per_term(tmp_path):
    history = {"loss_cls": [3.0, 2.0, 1.0], "loss_box": [1.0, 0.5, 0.2], "total": [4.0, 2.5, 1.2]}
    figure = plot_loss_history(history, path=tmp_path / "loss.png")
    assert [line.get_label() for line in figure.axes[0].lines] == list(history)
    assert (tmp_path / "loss.png").stat().st_size > 0
    _close(figure)

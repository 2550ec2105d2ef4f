"""architecture_figure.draw_architecture: the shapes it writes are those of a real forward pass, for FCOS and
both Faster R-CNNs, and a part not written yet stops the pass but keeps what ran."""

import re

import torch
from conftest import close_figure as _close
from test_drawing import _all_text

from architecture_figure import draw_architecture
from experiment import RunConfig, build_detector
from one_stage_detector import course_fcos


@torch.no_grad()
def test_draw_architecture_writes_the_shapes_of_an_fcos_forward():
    detector = course_fcos(5, 32, [32, 32], pretrained=False)
    detector.train()
    figure = draw_architecture(detector, 96)
    assert detector.training  # the mode is restored
    text = _all_text(figure)
    detector.eval()
    images = torch.zeros(1, 3, 96, 96)
    trunk = detector.backbone.backbone(images)
    feats = detector.backbone(images)
    class_logits, boxreg_deltas, centerness = detector.pred_net(feats)
    assert tuple(feats["p3"].shape) == (1, 32, 12, 12)  # 96 / 8 = 12
    expected = [(1, 3, 96, 96)] + [tuple(x.shape) for x in trunk.values()] + [tuple(x.shape) for x in feats.values()]
    for level in feats:
        expected += [tuple(output[level].shape) for output in (class_logits, boxreg_deltas, centerness)]
    for shape in expected:
        assert str(shape) in text, shape
    assert "(1, 144, 5)" in text and "(1, 400, 3, 3)" in text  # p3's class logits: 12 * 12 = 144 locations; c5
    detections = detector.predict(images)[0]
    assert f"boxes {tuple(detections['boxes'].shape)}" in text
    _close(figure)


@torch.no_grad()
def test_draw_architecture_writes_the_shapes_of_a_faster_rcnn_forward():
    detector = build_detector(RunConfig(model="faster_rcnn", variant="course", fpn_channels=16, num_classes=3))
    figure = draw_architecture(detector, 64)
    text = _all_text(figure)
    detector.eval()
    images = torch.zeros(1, 3, 64, 64)
    feats = detector.backbone(images)
    obj_logits, boxreg_deltas = detector.rpn.pred_net(feats)
    proposals = detector.rpn(feats, detector.backbone.fpn_strides, image_size=(64, 64))["proposals"]
    R = sum(len(p) for p in proposals)
    assert R > 0
    for shape in [tuple(x.shape) for x in feats.values()] + [tuple(x.shape) for x in obj_logits.values()]:
        assert str(shape) in text, shape
    assert "(1, 192)" in text  # p3: 8 x 8 locations x 3 anchors
    assert str(tuple(proposals[0].shape)) in text
    assert str((R, 16, 7, 7)) in text  # RoI Align: (R, C, 7, 7)
    assert str((R, 4)) in text and str((R, 12)) in text  # K + 1 = 4 class logits, 4K = 12 box deltas
    assert "First stage: RPN" in text and "A anchors per location" in text
    _close(figure)


@torch.no_grad()
def test_draw_architecture_of_a_faster_rcnn_with_the_fcos_first_stage():
    detector = build_detector(RunConfig(model="faster_rcnn", first_stage="fcos", fpn_channels=16, num_classes=3))
    figure = draw_architecture(detector, 64)
    text = _all_text(figure)
    assert "FCOSProposalNetwork" in text
    # p3 of a 64-px image: 8 x 8 = 64 locations, one objectness, four deltas and one centerness each.
    assert "(1, 64, 1)" in text and "(1, 64, 4)" in text and "8x8 locations" in text
    assert "(1, 16, 7, 7)" not in text and re.search(r"\(\d+, 16, 7, 7\)", text)
    _close(figure)


def test_draw_architecture_stops_at_a_stub_and_keeps_what_ran(monkeypatch):
    detector = course_fcos(5, 16, [16], pretrained=False)

    def stub(feats):
        raise NotImplementedError("FCOSPredictionNetwork.forward is yours to write")

    monkeypatch.setattr(detector.pred_net, "forward", stub)
    figure = draw_architecture(detector, 64)
    text = _all_text(figure)
    assert "Stopped at a part not written yet: FCOSPredictionNetwork.forward is yours to write" in text
    assert "(1, 16, 8, 8)" in text  # p3 ran
    assert "class logits not run" in text
    _close(figure)

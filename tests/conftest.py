"""Shared fixtures and helpers. Every test runs on the CPU, offline and seeded.

The helpers below are used by more than one test file; import them with ``from conftest import ...``
(pytest puts this folder on ``sys.path`` before it imports the test files).
"""

import os
import sys
from xml.etree import ElementTree

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def gt_batch(rows_per_image, M: int = 5) -> torch.Tensor:
    """(B, M, 5) ground truth padded with -1 rows."""
    gt = torch.full((len(rows_per_image), M, 5), -1.0)
    for b, rows in enumerate(rows_per_image):
        if rows:
            gt[b, : len(rows)] = torch.tensor(rows, dtype=torch.float)
    return gt


def small_faster_rcnn(num_classes: int = 3, fpn_channels: int = 16, **rpn_kwargs):
    """A small ``FasterRCNN`` with the anchor RPN (random weights)."""
    from common import DetectorBackboneWithFPN
    from two_stage_detector import RPN, FasterRCNN

    backbone = DetectorBackboneWithFPN(fpn_channels, pretrained=False)
    rpn_kwargs = {"anchor_stride_scale": 4, "pre_nms_topk": 100, "post_nms_topk": 30, **rpn_kwargs}
    rpn = RPN(fpn_channels, [fpn_channels], batch_size_per_image=16, **rpn_kwargs)
    return FasterRCNN(backbone, rpn, num_classes, stem_channels=[fpn_channels], batch_size_per_image=16)


def write_voc_annotation(path, size, objects):
    """A VOC annotation file: ``size`` is (width, height), ``objects`` (name, x1, y1, x2, y2, difficult)
    in VOC's 1-based inclusive pixels."""
    root = ElementTree.Element("annotation")
    ElementTree.SubElement(root, "filename").text = os.path.basename(path).replace(".xml", ".jpg")
    size_node = ElementTree.SubElement(root, "size")
    for tag, value in zip(("width", "height", "depth"), (*size, 3)):
        ElementTree.SubElement(size_node, tag).text = str(value)
    for name, x1, y1, x2, y2, difficult in objects:
        node = ElementTree.SubElement(root, "object")
        ElementTree.SubElement(node, "name").text = name
        ElementTree.SubElement(node, "difficult").text = str(difficult)
        box = ElementTree.SubElement(node, "bndbox")
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), (x1, y1, x2, y2)):
            ElementTree.SubElement(box, tag).text = str(value)
    ElementTree.ElementTree(root).write(path)


def close_figure(figure):
    """Close a matplotlib figure a test drew, so that figures do not pile up over the test run."""
    from matplotlib import pyplot

    pyplot.close(figure)

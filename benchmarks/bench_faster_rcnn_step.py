"""Time one training step of our Faster R-CNN next to torchvision's, at the course's settings.

Both detectors use the same RegNetX-400MF + FPN backbone (``common.DetectorBackboneWithFPN``, 64
channels, random weights), 224 x 224 images in batches of 16, 3 anchors per location of 64/128/256
px, RPN and head stems of two 3x3 convs of 64 channels, 16 anchors and 32 RoIs sampled per image,
400 / 80 proposals before / after NMS. Steps of the two alternate so that both see the same
machine load; the script prints the median of the timed steps.

Run from the repository root:  python benchmarks/bench_faster_rcnn_step.py [--steps 5] [--threads N]
"""

import argparse
import os
import statistics
import sys
import time
from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN as TorchvisionFasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from a4_helper import SyntheticDetection  # noqa: E402
from common import DetectorBackboneWithFPN  # noqa: E402
from two_stage_detector import RPN, FasterRCNN  # noqa: E402

NUM_CLASSES, FPN_CHANNELS, IMAGE_SIZE = 20, 64, 224


class _OrderedFPN(nn.Module):
    """Our backbone as torchvision's detectors want it: an OrderedDict and ``out_channels``."""

    def __init__(self):
        super().__init__()
        self.body = DetectorBackboneWithFPN(FPN_CHANNELS, pretrained=False)
        self.out_channels = FPN_CHANNELS

    def forward(self, images):
        return OrderedDict(self.body(images))


def build_ours() -> nn.Module:
    backbone = DetectorBackboneWithFPN(FPN_CHANNELS, pretrained=False)
    rpn = RPN(FPN_CHANNELS, [64, 64], batch_size_per_image=16, pre_nms_topk=400, post_nms_topk=80)
    return FasterRCNN(backbone, rpn, NUM_CLASSES, roi_size=(7, 7), stem_channels=[64, 64], batch_size_per_image=32)


def build_torchvision() -> nn.Module:
    return TorchvisionFasterRCNN(
        _OrderedFPN(),
        min_size=IMAGE_SIZE,
        max_size=IMAGE_SIZE,
        image_mean=[0.0, 0.0, 0.0],  # the images are normalised already
        image_std=[1.0, 1.0, 1.0],
        rpn_anchor_generator=AnchorGenerator(((64,), (128,), (256,)), ((0.5, 1.0, 2.0),) * 3),
        rpn_head=RPNHead(FPN_CHANNELS, 3, conv_depth=2),
        rpn_pre_nms_top_n_train=400,
        rpn_post_nms_top_n_train=80,
        rpn_fg_iou_thresh=0.6,
        rpn_bg_iou_thresh=0.3,
        rpn_batch_size_per_image=16,
        box_roi_pool=MultiScaleRoIAlign(["p3", "p4", "p5"], 7, sampling_ratio=2),
        box_head=FastRCNNConvFCHead((FPN_CHANNELS, 7, 7), [64, 64], []),
        box_predictor=FastRCNNPredictor(64 * 7 * 7, NUM_CLASSES + 1),
        box_batch_size_per_image=32,
    )


def training_batch(batch_size: int):
    data = SyntheticDetection("train", num_images=batch_size, image_size=IMAGE_SIZE, seed=0)
    images = torch.stack([data[i][1] for i in range(batch_size)])
    gt_boxes = torch.stack([data[i][2] for i in range(batch_size)])
    # torchvision: a list of per-image targets without padding, with class 0 for background.
    targets = [{"boxes": gt[gt[:, 4] >= 0, :4], "labels": gt[gt[:, 4] >= 0, 4].long() + 1} for gt in gt_boxes]
    return images, gt_boxes, targets


def timed_step(model: nn.Module, optimizer: torch.optim.Optimizer, *inputs) -> float:
    start = time.perf_counter()
    losses = model(*inputs)
    optimizer.zero_grad()
    sum(losses.values()).backward()
    optimizer.step()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each detector (after 2 warm-up steps)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images, gt_boxes, targets = training_batch(args.batch_size)
    runs = {
        "ours (two_stage_detector.FasterRCNN)": (build_ours(), (images, gt_boxes)),
        "torchvision.models.detection.FasterRCNN": (build_torchvision(), (list(images), targets)),
    }
    times = {name: [] for name in runs}
    optimizers = {name: torch.optim.SGD(model.parameters(), lr=5e-3, momentum=0.9) for name, (model, _) in runs.items()}
    for step in range(2 + args.steps):
        for name, (model, inputs) in runs.items():
            model.train()
            elapsed = timed_step(model, optimizers[name], *inputs)
            if step >= 2:
                times[name].append(elapsed)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.batch_size} images of {IMAGE_SIZE} x {IMAGE_SIZE}")
    for name, values in times.items():
        print(f"{name:42s} median {statistics.median(values) * 1000:7.0f} ms/step  (min {min(values) * 1000:.0f})")


if __name__ == "__main__":
    main()

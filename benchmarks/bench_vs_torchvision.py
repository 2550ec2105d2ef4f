"""Our FCOS and Faster R-CNN next to torchvision's, on the same backbone and settings, in one run.

Every detector is built on ``common.DetectorBackboneWithFPN`` (RegNetX-400MF + FPN, 64 channels,
random weights) with the course's standard settings: 224 x 224 images, training batches of 16,
heads with 2-conv stems of 64 channels; for Faster R-CNN 3 anchors per location (64/128/256 px),
16 anchors sampled per image in the RPN, 400 / 80 proposals before / after NMS and 32 RoIs per
image. torchvision's detectors get the same numbers through their constructor arguments; their
own resizing is pinned to 224 and their normalisation switched off (the images are normalised
already). Both FCOS heads have GroupNorm after each stem conv; ours, with its defaults, also has a
learnable scale per level and feeds c2 into p3 (``fine_p3``, one more conv); everything else is alike.

Rows:
  * a training step: forward, backward and an SGD update on one batch;
  * batch-1 inference: one image in, detections out (thresholds below, equal for both);
  * the backbone + FPN alone (forward, or forward + backward of a dummy loss + update): the
    floor that no detector on this backbone can beat, in torchvision's NCHW layout and in the
    channels-last layout that our detectors use by default (``channels_last=True``);
  * with --torchvision-channels-last, torchvision's detectors converted to channels-last too, to
    tell how much of the difference is the layout alone;
  * with --p2, both FCOS with the FPN level of stride 4 as well (``improved_fcos(..., fpn_levels=...)``);
  * with --compile, our detectors under ``torch.compile`` as well (``training.compile_detector``), and
    how long their first training step and first inference took (the compilation);
  * with --profile, what a training step of ours spends above the floor: ``torch.profiler``'s self CPU
    time per operator, ours minus the channels-last backbone + FPN's, largest first.
The detectors take turns step by step, so that all see the same machine load; the table gives
medians and ratios ours / torchvision. Peak memory is the peak of the CUDA allocator on a GPU;
on the CPU it is how far the process's resident memory rises above its level before two steps
(Linux's VmHWM, reset first), each detector measured in a fresh process of its own.

Run from the repository root:
    python benchmarks/bench_vs_torchvision.py                # CPU, torch's default threads
    python benchmarks/bench_vs_torchvision.py --device cuda  # on a GPU
"""

import argparse
import multiprocessing
import os
import statistics
import sys
import time
from collections import OrderedDict
from typing import Callable, Dict, List

import torch
from torch import nn
from torchvision.models.detection import FCOS as TorchvisionFCOS
from torchvision.models.detection import FasterRCNN as TorchvisionFasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from a4_helper import SyntheticDetection  # noqa: E402
from common import FPN_LEVELS, P2_LEVELS, DetectorBackboneWithFPN  # noqa: E402
from one_stage_detector import improved_fcos  # noqa: E402
from training import compile_detector  # noqa: E402
from two_stage_detector import RPN, FasterRCNN  # noqa: E402

NUM_CLASSES, FPN_CHANNELS, IMAGE_SIZE, STEM = 20, 64, 224, [64, 64]
# Inference thresholds, the same for both implementations (torchvision's FasterRCNN defaults; for
# FCOS the FCOS paper's 0.05 score threshold with torchvision's 0.6 NMS and 1000 candidates per level).
FCOS_SCORE, FCOS_NMS, RCNN_SCORE, RCNN_NMS, DETECTIONS = 0.05, 0.6, 0.05, 0.5, 100
CHANNELS_LAST = " channels_last"  # a row whose model is converted to that memory layout
P2 = " +p2"  # a row whose FCOS has the FPN level of stride 4
COMPILED = " compiled"  # a row whose detector runs under torch.compile
FLOOR = "backbone+FPN" + CHANNELS_LAST  # what --profile subtracts


class _OrderedFPN(nn.Module):
    """Our backbone as torchvision's detectors want it: an OrderedDict and ``out_channels``."""

    def __init__(self, levels=FPN_LEVELS):
        super().__init__()
        self.body = DetectorBackboneWithFPN(FPN_CHANNELS, pretrained=False, levels=levels)
        self.out_channels = FPN_CHANNELS

    def forward(self, images):
        return OrderedDict(self.body(images))


def _no_resize() -> dict:
    return dict(min_size=IMAGE_SIZE, max_size=IMAGE_SIZE, image_mean=[0.0] * 3, image_std=[1.0] * 3)


def build_our_fcos(levels=FPN_LEVELS) -> nn.Module:
    return improved_fcos(
        NUM_CLASSES,
        FPN_CHANNELS,
        STEM,
        pretrained=False,
        topk_candidates=1000,
        max_detections=DETECTIONS,
        fpn_levels=levels,
    )


def build_torchvision_fcos(levels=FPN_LEVELS) -> nn.Module:
    """torchvision's FCOS on our backbone with these FPN levels (its size ranges follow the strides)."""
    backbone = _OrderedFPN(levels)
    strides = tuple((stride,) for stride in backbone.body.fpn_strides.values())
    return TorchvisionFCOS(
        backbone,
        NUM_CLASSES,
        anchor_generator=AnchorGenerator(strides, ((1.0,),) * len(strides)),  # one "anchor" = a location
        head=FCOSHead(FPN_CHANNELS, 1, NUM_CLASSES, num_convs=len(STEM)),
        score_thresh=FCOS_SCORE,
        nms_thresh=FCOS_NMS,
        detections_per_img=DETECTIONS,
        topk_candidates=1000,
        **_no_resize(),
    )


def build_our_faster_rcnn() -> nn.Module:
    backbone = DetectorBackboneWithFPN(FPN_CHANNELS, pretrained=False)
    rpn = RPN(FPN_CHANNELS, STEM, batch_size_per_image=16, pre_nms_topk=400, post_nms_topk=80)
    return FasterRCNN(backbone, rpn, NUM_CLASSES, roi_size=(7, 7), stem_channels=STEM, batch_size_per_image=32)


def build_torchvision_faster_rcnn() -> nn.Module:
    return TorchvisionFasterRCNN(
        _OrderedFPN(),
        rpn_anchor_generator=AnchorGenerator(((64,), (128,), (256,)), ((0.5, 1.0, 2.0),) * 3),
        rpn_head=RPNHead(FPN_CHANNELS, 3, conv_depth=len(STEM)),
        rpn_pre_nms_top_n_train=400,
        rpn_post_nms_top_n_train=80,
        rpn_pre_nms_top_n_test=400,
        rpn_post_nms_top_n_test=80,
        rpn_fg_iou_thresh=0.6,
        rpn_bg_iou_thresh=0.3,
        rpn_batch_size_per_image=16,
        box_roi_pool=MultiScaleRoIAlign(["p3", "p4", "p5"], 7, sampling_ratio=2),
        box_head=FastRCNNConvFCHead((FPN_CHANNELS, 7, 7), STEM, []),
        box_predictor=FastRCNNPredictor(STEM[-1] * 7 * 7, NUM_CLASSES + 1),
        box_batch_size_per_image=32,
        box_score_thresh=RCNN_SCORE,
        box_nms_thresh=RCNN_NMS,
        box_detections_per_img=DETECTIONS,
        **_no_resize(),
    )


class _FloorLoss(nn.Module):
    """The backbone + FPN alone, with a dummy loss, so that it trains like a detector."""

    def __init__(self):
        super().__init__()
        self.backbone = DetectorBackboneWithFPN(FPN_CHANNELS, pretrained=False)

    def forward(self, images, gt_boxes=None):
        feats = self.backbone(images)
        return {"loss": sum(level.float().mean() for level in feats.values())}


class Runner:
    """One detector with its inputs: ``train_step()`` and ``infer(image)`` in its own calling convention."""

    def __init__(self, name: str, model: nn.Module, train_inputs: tuple, infer: Callable, device: torch.device):
        self.name, self.model, self.train_inputs, self._infer = name, model.to(device), train_inputs, infer
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)

    def train_step(self) -> None:
        self.model.train()
        losses = self.model(*self.train_inputs)
        self.optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        self.optimizer.step()

    @torch.inference_mode()
    def infer(self, image: torch.Tensor):
        self.model.eval()
        return self._infer(self.model, image)


def make_runners(names: List[str], batch_size: int, device: torch.device) -> Dict[str, Runner]:
    data = SyntheticDetection("train", num_images=batch_size, image_size=IMAGE_SIZE, seed=0)
    items = [data[i] for i in range(batch_size)]
    images = torch.stack([item[1] for item in items]).to(device)
    gt_boxes = torch.stack([item[2] for item in items]).to(device)
    # torchvision: a list of targets without padding rows; FasterRCNN's class 0 is background.
    real = [gt[gt[:, 4] >= 0] for gt in gt_boxes]
    fcos_targets = [{"boxes": gt[:, :4], "labels": gt[:, 4].long()} for gt in real]
    rcnn_targets = [{"boxes": gt[:, :4], "labels": gt[:, 4].long() + 1} for gt in real]
    image_list = list(images)
    specs = {
        "backbone+FPN": (_FloorLoss, (images,), lambda m, x: m.backbone(x[None])),
        "FCOS ours": (build_our_fcos, (images, gt_boxes), lambda m, x: m.predict(x[None], FCOS_SCORE, FCOS_NMS)),
        "FCOS torchvision": (build_torchvision_fcos, (image_list, fcos_targets), lambda m, x: m([x])),
        "Faster R-CNN ours": (
            build_our_faster_rcnn,
            (images, gt_boxes),
            lambda m, x: m.predict(x[None], RCNN_SCORE, RCNN_NMS, DETECTIONS),
        ),
        "Faster R-CNN torchvision": (build_torchvision_faster_rcnn, (image_list, rcnn_targets), lambda m, x: m([x])),
    }
    for fcos in ("FCOS ours", "FCOS torchvision"):  # the same with the FPN level of stride 4 (--p2)
        build, inputs, infer = specs[fcos]
        specs[fcos + P2] = (lambda build=build: build(P2_LEVELS), inputs, infer)
    runners = {}
    for name in names:
        torch.manual_seed(0)
        build, inputs, infer = specs[name.removesuffix(CHANNELS_LAST).removesuffix(COMPILED)]
        model = build()
        if name.endswith(CHANNELS_LAST):  # our backbone then lays out the images the same way
            model.to(memory_format=torch.channels_last)
        runners[name] = Runner(name, model, inputs, infer, device)
        if name.endswith(COMPILED):
            compile_detector(runners[name].model)
    return runners


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(runners: Dict[str, Runner], steps: int, warmup: int, device: torch.device):
    """Median seconds of a training step and of batch-1 inference per detector, runs interleaved, and the
    seconds of each detector's first training step and first inference (``{name: (train, infer)}``)."""
    train = {name: [] for name in runners}
    infer = {name: [] for name in runners}
    first = {name: [0.0, 0.0] for name in runners}
    images = next(iter(runners.values())).train_inputs[0]
    for step in range(warmup + steps):
        for name, runner in runners.items():
            _sync(device)
            start = time.perf_counter()
            runner.train_step()
            _sync(device)
            if step == 0:
                first[name][0] = time.perf_counter() - start
            if step >= warmup:
                train[name].append(time.perf_counter() - start)
    for step in range(warmup + steps):
        image = images[step % len(images)]
        for name, runner in runners.items():
            _sync(device)
            start = time.perf_counter()
            runner.infer(image)
            _sync(device)
            if step == 0:
                first[name][1] = time.perf_counter() - start
            if step >= warmup:
                infer[name].append(time.perf_counter() - start)
    medians = [{name: statistics.median(t) for name, t in times.items()} for times in (train, infer)]
    return (*medians, first)


def self_time_per_step(runner: Runner, steps: int) -> Dict[str, float]:
    """``torch.profiler``'s self CPU seconds per training step of each operator (after one untimed step)."""
    runner.train_step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        for _ in range(steps):
            runner.train_step()
    return {event.key: event.self_cpu_time_total / 1e6 / steps for event in profiler.key_averages()}


def profile_above_floor(runners: Dict[str, Runner], steps: int = 3, top: int = 8) -> Dict[str, List[tuple]]:
    """For each of our detectors, the ``top`` operators whose self CPU time per training step exceeds the
    floor's (the channels-last backbone + FPN) the most: ``[(operator, extra seconds), ...]``."""
    floor = self_time_per_step(runners[FLOOR], steps)
    above = {}
    for name in (name for name in runners if "ours" in name and not name.endswith(COMPILED)):
        ours = self_time_per_step(runners[name], steps)
        extra = {op: ours.get(op, 0.0) - floor.get(op, 0.0) for op in set(ours) | set(floor)}
        above[name] = sorted(extra.items(), key=lambda item: -item[1])[:top]
    return above


def _status_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status (Linux), e.g. VmRSS or VmHWM (its peak)."""
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # given in kB
    raise RuntimeError(f"/proc/self/status has no {field}; peak memory on the CPU needs Linux")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as file:  # "5" resets VmHWM to the current VmRSS
        file.write("5")


def measure_memory(name: str, batch_size: int, device_name: str, threads: int) -> Dict[str, float]:
    """Peak memory (bytes) of two training steps and of two inferences of one detector."""
    torch.set_num_threads(threads)
    device = torch.device(device_name)
    runner = make_runners([name], batch_size, device)[name]
    image = runner.train_inputs[0][0]
    peaks = {}
    for phase, work in (("infer", lambda: runner.infer(image)), ("train", runner.train_step)):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        else:
            _reset_peak_rss()
            base = _status_bytes("VmRSS")
        for _ in range(2):
            work()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            peaks[phase] = torch.cuda.max_memory_allocated(device) - base
        else:
            peaks[phase] = _status_bytes("VmHWM") - base
    return peaks


def memory_in_fresh_processes(names: List[str], batch_size: int, device: str, threads: int):
    context = multiprocessing.get_context("spawn")
    results = {}
    for name in names:  # one at a time, each in a new process, so that peaks do not mix
        with context.Pool(1) as pool:
            results[name] = pool.apply(measure_memory, (name, batch_size, device, threads))
    return results


def _ratio(ours: float, theirs: float) -> str:
    return f"{ours / theirs:.2f}x"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=7, help="timed steps per detector, after the warm-up")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument(
        "--torchvision-channels-last",
        action="store_true",
        help="also time torchvision's detectors with the backbone and heads in channels-last layout",
    )
    parser.add_argument("--p2", action="store_true", help="also time both FCOS with the FPN level of stride 4")
    parser.add_argument("--compile", action="store_true", help="also time our detectors under torch.compile")
    parser.add_argument(
        "--profile", action="store_true", help="also print what our training steps spend above the floor, by operator"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    # Our detectors are channels-last by default; torchvision's run as torchvision builds them (NCHW).
    names = ["backbone+FPN", "backbone+FPN" + CHANNELS_LAST]
    names += ["FCOS ours", "FCOS torchvision", "Faster R-CNN ours", "Faster R-CNN torchvision"]
    if args.torchvision_channels_last:
        names += ["FCOS torchvision" + CHANNELS_LAST, "Faster R-CNN torchvision" + CHANNELS_LAST]
    if args.p2:
        names += ["FCOS ours" + P2, "FCOS torchvision" + P2]
    if args.compile:
        names += ["FCOS ours" + COMPILED, "Faster R-CNN ours" + COMPILED]
    runners = make_runners(names, args.batch_size, device)
    train, infer, first = time_interleaved(runners, args.steps, args.warmup, device)
    memory = {} if args.no_memory else memory_in_fresh_processes(names, args.batch_size, args.device, args.threads)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    print(
        f"torch {torch.__version__}; {where}; batch {args.batch_size} x {IMAGE_SIZE} px for training, 1 image "
        f"for inference; medians of {args.steps} steps after {args.warmup} warm-up steps"
    )
    header = f"{'':38s}{'train step':>12s}{'vs tv':>8s}{'batch-1 infer':>15s}{'vs tv':>8s}"
    if memory:
        header += f"{'peak MiB train':>16s}{'infer':>8s}"
    print(header)
    for name in names:
        theirs = name.replace("ours", "torchvision").removesuffix(COMPILED)
        compare = "ours" in name
        row = f"{name:38s}{train[name] * 1e3:9.0f} ms{_ratio(train[name], train[theirs]) if compare else '':>8s}"
        row += f"{infer[name] * 1e3:12.1f} ms{_ratio(infer[name], infer[theirs]) if compare else '':>8s}"
        if memory:
            row += f"{memory[name]['train'] / 2**20:16.0f}{memory[name]['infer'] / 2**20:8.0f}"
        print(row)
    for name in (name for name in names if name.endswith(COMPILED)):
        seconds = first[name]
        print(f"{name}: first training step {seconds[0]:.1f} s, first inference {seconds[1]:.1f} s (compiling)")
    if args.profile:
        for name, ops in profile_above_floor(runners).items():
            print(f"{name}, a training step above the floor ({FLOOR}), self CPU time by operator:")
            for op, seconds in ops:
                print(f"  {op:44s}{seconds * 1e3:+8.1f} ms")


if __name__ == "__main__":
    main()

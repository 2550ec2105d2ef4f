"""Peak memory of ground-truth matching with many boxes: FCOS locations, RPN anchors and RoIs.

Matching compares every location (or anchor) with every GT row of every image, so its memory
grows as B x HWA x M. This script measures the peak resident memory that each matching call adds,
for the course's batch (16 images of 224 px, 40 boxes each) and a large one (2 images of 800 px,
300 boxes each). Each case runs in a fresh Python process, so that the process's peak resident set
size (``ru_maxrss``) before and after the call tells what the call itself needed on top.

The RPN's anchors are those of ``RPN``'s defaults (3 per location, 64/128/256 px); RoI matching
uses 100 proposals per image plus the GT boxes, as ``FasterRCNN.sample_rois`` does in training.

Run from the repository root:  python benchmarks/bench_matching_memory.py
"""

import argparse
import os
import resource
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import FPN_STRIDES, get_fpn_location_coords  # noqa: E402
from one_stage_detector import fcos_match_locations_to_gt  # noqa: E402
from two_stage_detector import RPN, FasterRCNN, generate_fpn_anchors, rcnn_match_anchors_to_gt  # noqa: E402

SIZES = {"224px": (16, 224, 40), "800px": (2, 800, 300)}  # (B, image side S, GT boxes M per image)
MATCHERS = ("fcos", "rpn", "rpn_low_quality", "roi")
PROPOSALS_PER_IMAGE = 100


def random_gt_boxes(B: int, S: int, M: int, num_classes: int = 20) -> torch.Tensor:
    """(B, M, 5) boxes inside an S x S image, sides log-uniform from 8 px to half the image."""
    sides = torch.exp(torch.empty(B, M, 2).uniform_(torch.tensor(8.0).log().item(), torch.tensor(S / 2).log().item()))
    corners = torch.rand(B, M, 2) * (S - sides)
    labels = torch.randint(0, num_classes, (B, M, 1)).float()
    return torch.cat([corners, corners + sides, labels], dim=2)


def locations_for(S: int):
    shapes = {level: (S // stride, S // stride) for level, stride in FPN_STRIDES.items()}
    return get_fpn_location_coords(shapes, FPN_STRIDES)


def matching_call(matcher: str, B: int, S: int, M: int):
    """The inputs of one matching case and a function that runs it."""
    gt_boxes = random_gt_boxes(B, S, M)
    locations = locations_for(S)
    if matcher == "fcos":
        return lambda: fcos_match_locations_to_gt(locations, FPN_STRIDES, gt_boxes), sum(map(len, locations.values()))
    if matcher in ("rpn", "rpn_low_quality"):
        anchors = torch.cat(list(generate_fpn_anchors(locations, FPN_STRIDES, 8).values()))
        low_quality = matcher == "rpn_low_quality"
        return lambda: rcnn_match_anchors_to_gt(anchors, gt_boxes, (0.3, 0.6), low_quality), len(anchors)
    model = FasterRCNN(_ChannelsOnly(), RPN(8, [], 8), num_classes=20, stem_channels=[])
    proposals = [random_gt_boxes(1, S, PROPOSALS_PER_IMAGE)[0, :, :4] for _ in range(B)]
    return lambda: model.sample_rois(proposals, gt_boxes), PROPOSALS_PER_IMAGE + M


class _ChannelsOnly(torch.nn.Module):
    """All that ``FasterRCNN.sample_rois`` needs of a backbone is its channel count."""

    out_channels = 8
    fpn_strides = dict(FPN_STRIDES)


def peak_mib() -> float:
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def measure_one(matcher: str, size: str) -> None:
    """Run one case in this process and print ``matcher size rows peak_added_mib``."""
    torch.manual_seed(0)
    B, S, M = SIZES[size]
    call, rows_per_image = matching_call(matcher, B, S, M)
    before = peak_mib()
    call()
    print(f"{matcher} {size} {rows_per_image} {peak_mib() - before:.1f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", nargs=2, metavar=("MATCHER", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        measure_one(*args.one)
        return
    print(f"torch {torch.__version__}; peak resident memory added by one matching call (fresh process each)")
    print(f"{'matcher':16s} {'batch':>22s} {'rows/image':>10s} {'B*rows*M*4 B':>13s} {'peak added':>11s}")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    for size, (B, S, M) in SIZES.items():
        for matcher in MATCHERS:
            result = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--one", matcher, size],
                capture_output=True,
                text=True,
                check=True,
                env=env,
            )
            _, _, rows, added = result.stdout.split()
            one_tensor = B * int(rows) * M * 4 / 2**20
            batch = f"{B} x {S}px x {M} boxes"
            print(f"{matcher:16s} {batch:>22s} {rows:>10s} {one_tensor:10.1f} MiB {float(added):7.1f} MiB")


if __name__ == "__main__":
    main()

"""How far a notebook's quick-mode training run gets: held-out mAP@0.5 before and after, and the time it took.

Trains one detector the way the notebooks' main run does (``notebook_kit``'s sizes, AdamW, the synthetic
shapes, random weights) and evaluates it on the held-out split; the figures behind ``QUICK_SIZES`` in
``notebook_kit.py`` (docs/notebooks.md). Every option overrides one of the quick sizes, so that a row of
the table is one change::

    python benchmarks/bench_notebook_quick_mode.py --model fcos --variant improved
    python benchmarks/bench_notebook_quick_mode.py --model fcos --variant course
    python benchmarks/bench_notebook_quick_mode.py --model faster_rcnn --first-stage rpn --seeds 0 1 2
"""

import argparse
import dataclasses
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import a4_helper  # noqa: E402
import experiment  # noqa: E402
from detection_data import SyntheticDetection  # noqa: E402
from notebook_kit import QUICK_SIZES  # noqa: E402


def run(model: str, variant: str, sizes, seed: int, first_stage=None) -> dict:
    """Train one detector from ``seed``; its held-out mAP@0.5 untrained and trained, and the training time."""
    train_set = SyntheticDetection("train", num_images=sizes.num_train, image_size=sizes.image_size)
    val_set = SyntheticDetection("val", num_images=sizes.num_val, image_size=sizes.image_size)
    config = experiment.RunConfig(
        model=model,
        variant=variant,
        image_size=sizes.image_size,
        batch_size=sizes.batch_size,
        fpn_channels=sizes.fpn_channels,
        iters=sizes.train_iters,
        optimizer=sizes.optimizer,
        lr=sizes.learning_rate,
        num_classes=len(train_set.idx_to_class),
        first_stage=first_stage,
    )
    a4_helper.reset_seed(seed)
    detector = experiment.build_detector(config)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=sizes.batch_size)
    before = a4_helper.evaluate_detector(detector, val_loader)["map"]
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_size=sizes.batch_size, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0)
    )
    start = time.perf_counter()
    a4_helper.train_detector(
        detector,
        train_loader,
        learning_rate=sizes.learning_rate,
        max_iters=sizes.train_iters,
        log_period=sizes.train_iters,
        optimizer=sizes.optimizer,
        progress=False,
    )
    seconds = time.perf_counter() - start
    return {"before": before, "after": a4_helper.evaluate_detector(detector, val_loader)["map"], "seconds": seconds}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["fcos", "faster_rcnn"], default="fcos")
    parser.add_argument("--variant", choices=["improved", "course"], default="improved")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--first-stage", choices=["rpn", "fcos"], help="Faster R-CNN's first stage (default: the variant's)"
    )
    for field in ("image_size", "batch_size", "fpn_channels", "num_train", "num_val", "train_iters"):
        parser.add_argument("--" + field.replace("_", "-"), type=int, default=getattr(QUICK_SIZES, field))
    parser.add_argument("--learning-rate", type=float, default=QUICK_SIZES.learning_rate)
    args = parser.parse_args(argv)
    fields = ("image_size", "batch_size", "fpn_channels", "num_train", "num_val", "train_iters", "learning_rate")
    sizes = dataclasses.replace(QUICK_SIZES, **{field: getattr(args, field) for field in fields})
    stage = f", first stage {args.first_stage}" if args.first_stage else ""
    print(f"{args.model} ({args.variant}{stage}), {sizes}, {torch.get_num_threads()} threads")
    rows = [run(args.model, args.variant, sizes, seed, args.first_stage) for seed in args.seeds]
    for seed, row in zip(args.seeds, rows):
        before, after, seconds = row["before"], row["after"], row["seconds"]
        print(f"seed {seed}: held-out mAP@0.5 {before:.3f} -> {after:.3f}, training {seconds:.0f} s")
    if len(rows) > 1:
        after = [row["after"] for row in rows]
        print(f"mean {statistics.mean(after):.3f}, spread (max - min) {max(after) - min(after):.3f}")


if __name__ == "__main__":
    main()

"""Does training augmentation pay off at the VOC recipe's length? Held-out mAP with and without it.

The ``voc2007`` recipe runs 9000 iterations of batch 16 over 2501 images: about 58 passes over its
training set, long enough for a detector to learn its training images by heart. This benchmark trains
as many passes on a small synthetic set and scores each variant on held-out images:

* data: ``SyntheticDetection`` standard scenes, 128 px, ``--train-images`` (128) training images and
  256 held-out ones (the ``val`` split);
* detector: ``experiment.build_detector`` (FCOS by default, ``--model``), the quick-start recipe's
  sizes (FPN 64, random backbone weights), AdamW lr 1e-3, warm-up and LR steps of ``train_detector``;
* length: ``--iters`` iterations of batch 8; the default 930 is 930 x 8 / 128 = 58 passes;
* variants: ``none`` (no augmentation), ``flip``, ``flip+scale`` (scale jitter 0.75-1.33 with crop or
  pad) and ``flip+scale+photo`` (brightness, contrast and saturation within +-20%), all
  ``augmentation.BatchAugmentation``; every variant of a seed starts from the same weights and sees
  the same batch order;
* score: VOC mAP@0.5 (``evaluate_detector``), the mean over ``--seeds`` and the spread (sample
  standard deviation).

Run from the repository root (7-12 minutes a run on one thread of a shared 2-core CPU):
    python benchmarks/bench_augmentation.py --seeds 0 1 2 --variants none flip+scale+photo
"""

import argparse
import dataclasses
import os
import statistics
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from augmentation import BatchAugmentation  # noqa: E402
from detection_data import SyntheticDetection  # noqa: E402
from evaluation import evaluate_detector  # noqa: E402
from experiment import RECIPES, build_detector  # noqa: E402
from training import train_detector  # noqa: E402

VARIANTS = {
    "none": None,
    "flip": dict(flip=True, scale_range=(1.0, 1.0), photometric=0.0),
    "flip+scale": dict(flip=True, scale_range=(0.75, 1.33), photometric=0.0),
    "flip+scale+photo": dict(flip=True, scale_range=(0.75, 1.33), photometric=0.2),
}


def run(variant: str, seed: int, iters: int, train_images: int, model: str) -> Tuple[float, float]:
    """Train one variant from the seed's weights and batch order; returns the held-out VOC mAP and the
    mean box loss of the last 50 iterations (FCOS's stays at 1.0 when its box head never learned)."""
    config = dataclasses.replace(RECIPES["synthetic"], model=model, num_classes=6)  # 128 px, batch 8
    train_set = SyntheticDetection("train", num_images=train_images, image_size=128)
    eval_set = SyntheticDetection("val", num_images=256, image_size=128)
    torch.manual_seed(seed)
    detector = build_detector(config, pretrained=False)
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=8, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(seed)
    )
    settings = VARIANTS[variant]
    augmentation = BatchAugmentation(**settings, seed=seed) if settings is not None else None
    history = train_detector(
        detector, loader, learning_rate=config.lr, max_iters=iters, optimizer=config.optimizer,
        augmentation=augmentation, progress=False,
    )  # fmt: skip
    eval_loader = torch.utils.data.DataLoader(eval_set, batch_size=16)
    box_loss = statistics.mean(history["loss_box"][-50:])
    return evaluate_detector(detector, eval_loader, num_classes=6)["map"], box_loss


def table(results: Dict[str, List[float]]) -> str:
    """Mean, spread and each seed's mAP for every variant, as text."""
    lines = [f"{'variant':<18} {'mAP mean':>9} {'spread':>7}  per seed"]
    for variant, maps in results.items():
        spread = statistics.stdev(maps) if len(maps) > 1 else 0.0
        seeds = " ".join(f"{m:.3f}" for m in maps)
        lines.append(f"{variant:<18} {statistics.mean(maps):>9.3f} {spread:>7.3f}  {seeds}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> Dict[str, List[float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    parser.add_argument("--iters", type=int, default=930, help="iterations of batch 8 (default: 930 = 58 passes)")
    parser.add_argument("--train-images", type=int, default=128, help="synthetic training images (default: 128)")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS), help="variants")
    parser.add_argument("--model", choices=["fcos", "faster_rcnn"], default="fcos", help="detector (default: fcos)")
    args = parser.parse_args(argv)
    passes = args.iters * 8 / args.train_images
    print(f"{args.model}, {args.train_images} images, {args.iters} iterations of batch 8 = {passes:.0f} passes")
    results: Dict[str, List[float]] = {variant: [] for variant in args.variants}
    for seed in args.seeds:
        for variant in args.variants:
            start = time.perf_counter()
            held_out_map, box_loss = run(variant, seed, args.iters, args.train_images, args.model)
            results[variant].append(held_out_map)
            elapsed = time.perf_counter() - start
            line = f"seed {seed} {variant}: mAP {held_out_map:.3f}, box loss {box_loss:.3f} ({elapsed:.0f} s)"
            print(line, flush=True)
    print(table(results))
    return results


if __name__ == "__main__":
    main()

"""How well our FCOS and Faster R-CNN learn, next to torchvision's, under identical conditions.

Every detector trains from scratch on the same data with the same backbone, initialisation,
optimizer, schedule and batches, and is scored on the same held-out images with ``compute_map``:

* data (``--scene``): ``SyntheticDetection`` at 128 px, 1024 training and 256 held-out images, drawn from
  data seed 2026, of one of two scenes:

  - ``crowded`` (the default): ``CROWDED_SCENE``, 1-12 objects of 8 px to half the image, overlapping, on
    cluttered backgrounds; every object is under 64 px, so every positive of FCOS lands on p3. Recall
    per size: small under 16 px, medium 16-32, large from 32.
  - ``voc-like``: ``VOC_LIKE_SCENE``, shaped like PASCAL VOC: 1-4 objects, most of them large (about half
    wider than 64 px), partly hidden by each other and by bars in front of them, classes told apart by
    shape and fill (square, disc, triangle, filled or outlined, in any colour), distractor shapes of no
    class. It trains 1000 iterations instead of 500: with about 2 objects an image instead of 6 there are
    fewer positives per step, and shape is a slower cue to learn than colour. Recall per size: small
    under 32 px, medium 32-64, large from 64 (half the image);
* backbone: ``common.DetectorBackboneWithFPN`` (RegNetX-400MF + FPN, 32 channels), random weights
  drawn from the run's seed, so that all detectors of a seed start from the same backbone;
* heads: 2-conv stems of width 32; Faster R-CNN with the course's settings (anchors 64/128/256 px
  x 3 ratios, 16 RPN samples per image, 400 / 80 proposals, 32 RoIs per image, 7 x 7 RoI Align);
  torchvision's detectors get the same numbers through their constructor arguments (see
  ``bench_vs_torchvision.py``), their resizing pinned and their normalisation switched off;
* training: ``a4_helper.train_detector``, 500 iterations of batch 8 (about 4 passes over the
  images; 1000 on the VOC-shaped scene), SGD (lr 0.01, momentum 0.9, weight decay 1e-4), 50 warm-up
  iterations, x0.1 at 60% and 90%, gradient norm clipped at 10, the batch order drawn from the seed;
* evaluation: score threshold 0.05, NMS 0.5, at most 100 detections, VOC mAP@0.5 and COCO mAP.

Variants of our detectors (``--variants``; ``--ablation`` adds the course's detector with one
improvement at a time):

* ``default``: what ``experiment.build_detector`` builds: ``FCOS(...)`` with its defaults, and
  ``FasterRCNN(...)`` with its defaults on an ``FCOSProposalNetwork(...)`` first stage;
* ``RPN first stage`` (Faster R-CNN): ``RPN(...)`` with its defaults instead, the structure of
  torchvision's ``FasterRCNN``; a run without ``--variants`` trains it too;
* ``previous`` (FCOS): the default before ``fine_p3`` and ``object_balance``; ``previous +...``
  add one option to it;
* ``tv-rules`` (FCOS): ours with torchvision's rules: GroupNorm head, center sampling, GIoU loss,
  and none of the extras (for Faster R-CNN torchvision's rules are our defaults);
* ``course``: the course's original detector (``course_fcos``, ``COURSE_RPN``);
* ``default +p2`` (FCOS): with the FPN level of stride 4 (``improved_fcos(..., fpn_levels=P2_LEVELS)``), and
  ``torchvision +p2``: torchvision's FCOS on the same four levels, to compare like with like.

Each (detector, variant, seed) is one job; ``--jobs`` runs them side by side, each with
``--threads`` threads. The table gives the mean over seeds, the spread (sample standard
deviation) and each seed's figure, and the ratio of each row's mean to torchvision's.

Run from the repository root:
    python benchmarks/bench_accuracy_vs_torchvision.py                  # about 15-20 min on 2 CPU cores
    python benchmarks/bench_accuracy_vs_torchvision.py --ablation --detectors fcos
    python benchmarks/bench_accuracy_vs_torchvision.py --scene voc-like --variants default   # about 25 min
"""

import argparse
import dataclasses
import multiprocessing
import os
import statistics
import sys
import time
from typing import Dict, List, Optional

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench_vs_torchvision as tv_builders  # noqa: E402

from a4_helper import (  # noqa: E402
    CROWDED_SCENE,
    VOC_LIKE_SCENE,
    SyntheticDetection,
    compute_map,
    evaluate_detector,
    train_detector,
)
from common import FPN_LEVELS, P2_LEVELS, DetectorBackboneWithFPN, iou, nms  # noqa: E402
from one_stage_detector import FCOS, FCOSMatcher, FCOSPredictionNetwork, fcos_giou_loss, fcos_l1_loss  # noqa: E402
from two_stage_detector import COURSE_FASTER_RCNN, COURSE_RPN, RPN, FasterRCNN, FCOSProposalNetwork  # noqa: E402

# The scenes (``--scene``): the scene options, the training iterations, and the object sides (px) that
# split small from medium and medium from large in the recall per size.
SCENES = {
    "crowded": dict(options=CROWDED_SCENE, iters=500, size_edges=(16, 32)),
    "voc-like": dict(options=VOC_LIKE_SCENE, iters=1000, size_edges=(32, 64)),
}


@dataclasses.dataclass(frozen=True)
class Settings:
    scene: str = "crowded"
    image_size: int = 128
    train_images: int = 1024
    eval_images: int = 256
    fpn_channels: int = 32
    stem: tuple = (32, 32)
    batch_size: int = 8
    iters: int = 500
    lr: float = 0.01
    weight_decay: float = 1e-4
    warmup: int = 50
    grad_clip: float = 10.0
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    data_seed: int = 2026


NUM_CLASSES = SyntheticDetection().num_classes

# Our FCOS's variants: the parts in which each differs from the improved FCOS (``improved_fcos``):
# ``head``, the options of ``FCOSPredictionNetwork``; ``radius`` and ``size_range_scale``, ``FCOSMatcher``'s;
# ``box_loss``; ``fine_p3`` (the backbone's); ``object_balance``; ``fpn_levels``. ``build_our_fcos`` builds them.
IMPROVED_PARTS = dict(
    head=dict(group_norm=True, learnable_scales=True, nonnegative_deltas=True),
    radius=1.5,
    box_loss=fcos_giou_loss,
    fine_p3=True,
    object_balance=0.5,
    fpn_levels=FPN_LEVELS,
    size_range_scale=1.0,
)
COURSE_PARTS = dict(head={}, radius=None, box_loss=fcos_l1_loss, fine_p3=False, object_balance=0.0)
# The default before fine_p3 and object_balance (docs/accuracy.md: the earlier ablation rows were measured on it).
PREVIOUS_PARTS = {"fine_p3": False, "object_balance": 0.0}
# Options measured here and then retired from the library (exp deltas, quality focal loss, ATSS, the
# centerness-weighted box loss): their rows and the commit that trains them are in docs/accuracy.md.
FCOS_VARIANTS = {
    "default": {},
    "tv-rules": dict(head=dict(group_norm=True, nonnegative_deltas=True), **PREVIOUS_PARTS),
    "course": COURSE_PARTS,
    "course +group norm": {**COURSE_PARTS, "head": dict(group_norm=True)},
    "course +center sampling": {**COURSE_PARTS, "radius": 1.5},
    "course +GIoU": {**COURSE_PARTS, "box_loss": fcos_giou_loss},
    "course +scales": {**COURSE_PARTS, "head": dict(learnable_scales=True)},
    "course +nonnegative deltas": {**COURSE_PARTS, "head": dict(nonnegative_deltas=True)},
    "previous": PREVIOUS_PARTS,
    "previous +fine p3": {**PREVIOUS_PARTS, "fine_p3": True},
    "previous +object balance 0.5": {**PREVIOUS_PARTS, "object_balance": 0.5},
    "previous +object balance 1": {**PREVIOUS_PARTS, "object_balance": 1.0},
    "default +object balance 1": {"object_balance": 1.0},
    "previous -nonnegative deltas": {**PREVIOUS_PARTS, "head": dict(group_norm=True, learnable_scales=True)},
    "default -object balance": {"object_balance": 0.0},
    "default -center sampling": {"radius": None},
    "default +size ranges x0.5": {"size_range_scale": 0.5},
    "default +p2": {"fpn_levels": P2_LEVELS},
    "torchvision +p2": {},  # torchvision's FCOS on p2-p5 (built in ``build``), to compare like with like
}
COURSE_HEAD = {**COURSE_FASTER_RCNN, "fc_channels": ()}
# None instead of RPN options: FCOSProposalNetwork with its defaults as the first stage.
RCNN_VARIANTS = {
    "default": (None, {}),  # what experiment.build_detector builds: an FCOS first stage (docs/accuracy.md)
    "RPN first stage": ({}, {}),  # RPN(...) and FasterRCNN(...) with their defaults: torchvision's structure
    "course": (COURSE_RPN, COURSE_HEAD),
    "course +low-quality matches": ({**COURSE_RPN, "allow_low_quality_matches": True}, COURSE_HEAD),
    "course +NMS per level": ({**COURSE_RPN, "nms_per_level": True}, COURSE_HEAD),
    "course +He init": (COURSE_RPN, {**COURSE_HEAD, "roi_stem_he_init": True}),
    "course +2 FC layers": (COURSE_RPN, {**COURSE_HEAD, "fc_channels": (256, 256)}),
    "RPN first stage -NMS per level": ({"nms_per_level": False}, {}),
    "default +RoI level k0=5": (None, {"roi_canonical_level": 5}),
    "default +2 FC layers": (None, {"fc_channels": (256, 256)}),
    "default +size ranges x0.5": ({"matcher": FCOSMatcher(1.5, size_range_scale=0.5)}, {}),
    "default -fine p3": (None, {"fine_p3": False}),  # the default before fine_p3 (docs/accuracy.md)
}
# What a run without --variants trains: for Faster R-CNN also the RPN, which compares like with like.
DEFAULT_VARIANTS = {"fcos": ["default"], "faster_rcnn": ["default", "RPN first stage"]}
ABLATION = {
    "fcos": [v for v in FCOS_VARIANTS if v.startswith("course +")],
    "faster_rcnn": [v for v in RCNN_VARIANTS if v.startswith("course +")],
}


class TorchvisionAdapter(nn.Module):
    """A torchvision detector with our calling convention, so that ``train_detector`` and
    ``evaluate_detector`` treat it like ours: ``forward(images, gt_boxes)`` -> losses and
    ``predict(images, score_thresh, nms_thresh)`` -> per-image dicts with labels 0..K-1."""

    def __init__(self, model: nn.Module, background_first: bool):
        super().__init__()
        self.model = model
        self.label_offset = 1 if background_first else 0  # torchvision's FasterRCNN: class 0 is background

    def forward(self, images: torch.Tensor, gt_boxes: torch.Tensor) -> Dict[str, torch.Tensor]:
        targets = [
            {"boxes": gt[gt[:, 4] >= 0, :4], "labels": gt[gt[:, 4] >= 0, 4].long() + self.label_offset}
            for gt in gt_boxes
        ]
        return self.model(list(images), targets)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, score_thresh: float, nms_thresh: float) -> List[Dict[str, torch.Tensor]]:
        heads = getattr(self.model, "roi_heads", self.model)  # FasterRCNN keeps them in roi_heads
        heads.score_thresh, heads.nms_thresh = score_thresh, nms_thresh
        outputs = self.model(list(images))
        return [{**out, "labels": out["labels"] - self.label_offset} for out in outputs]


def _configure_tv_builders(settings: Settings) -> None:
    """``bench_vs_torchvision``'s torchvision builders, at this benchmark's sizes."""
    tv_builders.NUM_CLASSES, tv_builders.FPN_CHANNELS = NUM_CLASSES, settings.fpn_channels
    tv_builders.IMAGE_SIZE, tv_builders.STEM = settings.image_size, list(settings.stem)
    tv_builders.FCOS_NMS = tv_builders.RCNN_NMS = settings.nms_thresh
    tv_builders.FCOS_SCORE = tv_builders.RCNN_SCORE = settings.score_thresh


def build_our_fcos(variant: str, fpn_channels: int, stem_channels: List[int]) -> FCOS:
    """Our FCOS of one variant of ``FCOS_VARIANTS``, from its parts, backbone first."""
    parts = {**IMPROVED_PARTS, **FCOS_VARIANTS[variant]}
    backbone = DetectorBackboneWithFPN(
        fpn_channels, pretrained=False, levels=parts["fpn_levels"], fine_p3=parts["fine_p3"]
    )
    head = FCOSPredictionNetwork(
        NUM_CLASSES, fpn_channels, stem_channels, num_levels=len(backbone.levels), **parts["head"]
    )
    return FCOS(
        NUM_CLASSES,
        backbone=backbone,
        head=head,
        matcher=FCOSMatcher(parts["radius"], parts["size_range_scale"]),
        box_loss=parts["box_loss"],
        object_balance=parts["object_balance"],
    )


def build(detector: str, variant: str, settings: Settings) -> nn.Module:
    """One detector; the backbone is built first, so that a seed gives every detector the same backbone."""
    _configure_tv_builders(settings)
    C, stem = settings.fpn_channels, list(settings.stem)
    if detector == "fcos":
        if variant.startswith("torchvision"):
            levels = P2_LEVELS if variant == "torchvision +p2" else FPN_LEVELS
            return TorchvisionAdapter(tv_builders.build_torchvision_fcos(levels), background_first=False)
        return build_our_fcos(variant, C, stem)
    if variant == "torchvision":
        return TorchvisionAdapter(tv_builders.build_torchvision_faster_rcnn(), background_first=True)
    rpn_options, head_options = RCNN_VARIANTS[variant]
    head_options = dict(head_options)  # fine_p3 is the backbone's: on, as experiment.RCNN_FINE_P3, but in the course's
    fine_p3 = head_options.pop("fine_p3", not variant.startswith("course"))
    backbone = DetectorBackboneWithFPN(C, pretrained=False, fine_p3=fine_p3)
    if rpn_options is None or "matcher" in rpn_options:  # an FCOS first stage
        rpn = FCOSProposalNetwork(C, stem, pre_nms_topk=400, post_nms_topk=80, **(rpn_options or {}))
    else:
        rpn = RPN(C, stem, batch_size_per_image=16, pre_nms_topk=400, post_nms_topk=80, **rpn_options)
    return FasterRCNN(backbone, rpn, NUM_CLASSES, stem_channels=stem, batch_size_per_image=32, **head_options)


def backbone_of(model: nn.Module) -> nn.Module:
    return model.model.backbone.body if isinstance(model, TorchvisionAdapter) else model.backbone


def data(settings: Settings, split: str) -> List[tuple]:
    """The items of one split, drawn once (drawing a crowded scene costs about as much as a tenth
    of a training step)."""
    num_images = settings.train_images if split == "train" else settings.eval_images
    scene = SCENES[settings.scene]["options"]
    dataset = SyntheticDetection(split, num_images, settings.image_size, seed=settings.data_seed, scene=scene)
    return [dataset[i] for i in range(len(dataset))]


def where_it_fails(predictions: List[dict], ground_truths: List[dict], size_edges=(16, 32)) -> Dict[str, float]:
    """Two views of the errors: mAP@0.5 with classes ignored (each image's detections through one NMS
    at 0.5; close to the mAP when classes are rarely confused), and the recall at IoU 0.5 (a detection
    of the right class, any score kept) of small (side under ``size_edges[0]`` px), medium and large
    objects (side at least ``size_edges[1]``)."""
    small, large = size_edges
    any_class = []
    found, total = {"small": 0, "medium": 0, "large": 0}, {"small": 0, "medium": 0, "large": 0}
    for pred, gt in zip(predictions, ground_truths):
        keep = nms(pred["boxes"], pred["scores"], 0.5)[:100]
        any_class.append({"boxes": pred["boxes"][keep], "scores": pred["scores"][keep], "labels": 0 * keep})
        boxes, labels = torch.as_tensor(gt["boxes"]).float(), torch.as_tensor(gt["labels"])
        hit = ((iou(boxes, pred["boxes"]) >= 0.5) & (labels[:, None] == pred["labels"][None])).any(dim=1)
        side = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sqrt()
        buckets = {"small": side < small, "medium": (side >= small) & (side < large), "large": side >= large}
        for name, in_bucket in buckets.items():
            found[name] += int(hit[in_bucket].sum())
            total[name] += int(in_bucket.sum())
    agnostic_truths = [{"boxes": g["boxes"], "labels": 0 * torch.as_tensor(g["labels"])} for g in ground_truths]
    figures = {"map50_any_class": compute_map(any_class, agnostic_truths, 1)["map"]}
    figures.update({f"recall_{name}": found[name] / max(total[name], 1) for name in found})
    return figures


def run_one(job: tuple) -> dict:
    """Train and score one (detector, variant, seed); returns its figures."""
    detector, variant, seed, settings, threads = job
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = build(detector, variant, settings)
    train_loader = torch.utils.data.DataLoader(
        data(settings, "train"),
        batch_size=settings.batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )
    start = time.perf_counter()
    train_detector(
        model,
        train_loader,
        learning_rate=settings.lr,
        weight_decay=settings.weight_decay,
        max_iters=settings.iters,
        warmup_iters=settings.warmup,
        grad_clip=settings.grad_clip,
        progress=False,
    )
    train_seconds = time.perf_counter() - start
    eval_loader = torch.utils.data.DataLoader(data(settings, "val"), batch_size=16)
    result = evaluate_detector(
        model, eval_loader, settings.score_thresh, settings.nms_thresh, num_classes=NUM_CLASSES, keep_predictions=True
    )
    coco = compute_map(result["predictions"], result["ground_truths"], NUM_CLASSES, method="coco")
    return dict(
        detector=detector,
        variant=variant,
        seed=seed,
        map50=result["map"],
        coco=coco["map"],
        train_seconds=train_seconds,
        **where_it_fails(result["predictions"], result["ground_truths"], SCENES[settings.scene]["size_edges"]),
    )


def check_same_start(variants: Dict[str, List[str]], settings: Settings) -> None:
    """Every detector of a seed starts from the same backbone weights (or the comparison is unfair)."""
    for detector, names in variants.items():
        first = None
        for variant in names:
            torch.manual_seed(0)
            weights = backbone_of(build(detector, variant, settings)).state_dict()
            first = first or weights
            shared = weights.keys() & first.keys()  # a p2 level only adds weights, drawn after the others
            if not (first.keys() <= weights.keys() or weights.keys() <= first.keys()) or any(
                not torch.equal(weights[k], first[k]) for k in shared
            ):
                raise RuntimeError(f"{detector} {variant} does not start from the same backbone as the others")


def _row(name: str, values: List[float], reference: Optional[float]) -> str:
    mean = statistics.mean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    seeds = ", ".join(f"{v:.3f}" for v in values)
    ratio = f"{mean / reference:.2f}x" if reference else "-"
    return f"| {name} | {mean:.3f} ± {spread:.3f} ({seeds}) | {ratio} |"


def print_table(results: List[dict], variants: Dict[str, List[str]]) -> None:
    titles = {"fcos": "FCOS", "faster_rcnn": "Faster R-CNN"}
    for metric, label in (("map50", "VOC mAP@0.5"), ("coco", "COCO mAP@[.5:.95]")):
        print(f"\n| {label}: detector, variant | mean ± spread (per seed) | vs torchvision |")
        print("|---|---|---|")
        for detector, names in variants.items():
            by_variant = {
                v: [
                    r[metric]
                    for r in sorted(results, key=lambda r: r["seed"])
                    if r["detector"] == detector and r["variant"] == v
                ]
                for v in names
            }
            reference = statistics.mean(by_variant["torchvision"]) if by_variant.get("torchvision") else None
            for variant, values in by_variant.items():
                name = f"{titles[detector]}, {'torchvision' if variant == 'torchvision' else 'ours ' + variant}"
                print(_row(name, values, reference))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="runs per detector, seeds 0..N-1 (default 3)")
    parser.add_argument("--detectors", default="fcos,faster_rcnn", help="comma-separated: fcos, faster_rcnn")
    parser.add_argument(
        "--variants", help="our variants, comma-separated (default: default, and 'RPN first stage' for faster_rcnn)"
    )
    parser.add_argument("--ablation", action="store_true", help="also the course's detector plus one change at a time")
    parser.add_argument("--no-torchvision", action="store_true", help="train our variants only (no ratios)")
    parser.add_argument("--scene", choices=sorted(SCENES), default="crowded", help="the data (default crowded)")
    parser.add_argument("--iters", type=int, help="training iterations (default: the scene's, 500 or 1000)")
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    args = parser.parse_args()
    settings = Settings(scene=args.scene, iters=args.iters or SCENES[args.scene]["iters"])
    variants = {}
    for detector in args.detectors.split(","):
        if detector not in ABLATION:
            parser.error(f"unknown detector {detector!r}; choose from {sorted(ABLATION)}")
        known = FCOS_VARIANTS if detector == "fcos" else RCNN_VARIANTS
        names = args.variants.split(",") if args.variants else DEFAULT_VARIANTS[detector]
        names = names + (["course"] + ABLATION[detector] if args.ablation else [])
        unknown = [v for v in names if v not in known]
        if unknown:
            parser.error(f"unknown variants for {detector}: {unknown}; choose from {sorted(known)}")
        variants[detector] = ([] if args.no_torchvision else ["torchvision"]) + list(dict.fromkeys(names))
    check_same_start(variants, settings)
    jobs = [
        (d, v, seed, settings, args.threads)
        for seed in range(args.seeds)
        for d, names in variants.items()
        for v in names
    ]
    start = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        results = []
        for result in pool.imap_unordered(run_one, jobs):
            results.append(result)
            print(
                f"{result['detector']} {result['variant']} seed {result['seed']}: mAP@0.5 {result['map50']:.3f}, "
                f"COCO {result['coco']:.3f} ({result['train_seconds']:.0f} s training); classes ignored "
                f"{result['map50_any_class']:.3f}; recall@0.5 of small / medium / large objects "
                f"{result['recall_small']:.2f} / {result['recall_medium']:.2f} / {result['recall_large']:.2f}",
                flush=True,
            )
        pool.close()
        pool.join()
    print(f"\n{len(jobs)} runs in {(time.perf_counter() - start) / 60:.1f} min; {settings}")
    print_table(results, variants)


if __name__ == "__main__":
    main()

"""Command line: train, evaluate and run the detectors.

    python detect.py train --model fcos --data synthetic --out runs/demo
    python detect.py eval --checkpoint runs/demo/checkpoint.pt
    python detect.py predict --checkpoint runs/demo/checkpoint.pt photo.jpg

``python detect.py COMMAND --help`` lists every option. Without options ``train`` runs a short FCOS
recipe on the built-in synthetic data (no download, a few minutes on a laptop CPU); with
``--data voc2007`` it runs the course's full recipe (meant for a GPU).

``torchrun --nproc_per_node=N detect.py train ...`` trains on N processes (one per GPU) with
DistributedDataParallel; ``--batch-size`` stays the global batch, and rank 0 writes every file.
"""

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

import a4_helper
import distributed
from common import NMS_THRESH, SCORE_THRESH, DetectorBackboneWithFPN
from one_stage_detector import COURSE_FCOS, FCOS
from two_stage_detector import (
    COURSE_FASTER_RCNN,
    COURSE_RPN,
    RPN,
    FasterRCNN,
    FCOSProposalNetwork,
    FirstStage,
    init_from_fcos,
)

# Defaults of each data set's recipe; any command-line option overrides its entry.
RECIPES = {
    # Sized for about five minutes on two CPU cores, starting from random weights.
    # AdamW, because SGD barely moves a randomly initialised backbone in so few iterations.
    "synthetic": dict(
        image_size=128,
        batch_size=8,
        iters=700,
        fpn_channels=64,
        optimizer="adamw",
        lr=1e-3,
        train_images=512,
        eval_images=128,
    ),
    # The course's standard recipe: 224 px, batch 16, FPN 128, 9000 iterations (a GPU run).
    # The preprocessed uint8 cache keeps a GPU fed (JPEG decoding would be the bottleneck).
    "voc2007": dict(image_size=224, batch_size=16, iters=9000, fpn_channels=128, optimizer="sgd", lr=8e-3, cache=True),
}
CHECKPOINT_NAME = "checkpoint.pt"


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _resolve_weights(weights: str):
    """``--weights`` -> the backbone's ``pretrained`` argument.

    ``auto`` uses the ImageNet weights when they are cached or can be downloaded, and otherwise
    says so once and starts from random weights.
    """
    if weights == "none":
        return False
    if weights == "imagenet":
        return True
    if weights != "auto":
        return weights  # a path to a saved state dict
    try:
        DetectorBackboneWithFPN(8, pretrained=True)
    except RuntimeError as error:
        print(f"--weights auto: ImageNet weights unavailable, training from random weights.\n{error}", file=sys.stderr)
        return False
    return True


# Faster R-CNN's first stage when --first-stage is not given: FCOS's head proposes better boxes than the
# anchor RPN (README, Accuracy), the course teaches the RPN.
DEFAULT_FIRST_STAGE = {"improved": "fcos", "course": "rpn"}


def build_detector(config: Dict[str, Any], pretrained=False) -> nn.Module:
    """The detector that ``config`` (stored in every checkpoint) describes, with the course's sizes.

    ``config["variant"]`` is ``"improved"`` (the constructors' defaults: what learned best on
    ``benchmarks/bench_accuracy_vs_torchvision.py``) or ``"course"`` (the course's original rules,
    ``COURSE_FCOS``, ``COURSE_RPN``, ``COURSE_FASTER_RCNN``). Checkpoints written before the variant
    existed have no such entry and hold course detectors. ``config["first_stage"]`` (Faster R-CNN) is
    ``"rpn"`` or ``"fcos"``; ``train`` always writes it, and a config without it means the RPN.
    """
    fpn_channels, num_classes = config["fpn_channels"], config["num_classes"]
    stem_channels = [fpn_channels, fpn_channels]
    course = config.get("variant", "course") == "course"
    if config["model"] == "fcos":
        return FCOS(num_classes, fpn_channels, stem_channels, pretrained=pretrained, **(COURSE_FCOS if course else {}))
    backbone = DetectorBackboneWithFPN(fpn_channels, pretrained=pretrained)
    proposal_counts = dict(pre_nms_topk=400, post_nms_topk=80)
    if config.get("first_stage", "rpn") == "fcos":
        first_stage_options = {**COURSE_FCOS, "nms_per_level": False} if course else {}
        rpn = FCOSProposalNetwork(fpn_channels, stem_channels, **proposal_counts, **first_stage_options)
    else:
        rpn_options = COURSE_RPN if course else {}
        rpn = RPN(fpn_channels, stem_channels, batch_size_per_image=16, **proposal_counts, **rpn_options)
    return FasterRCNN(
        backbone,
        rpn,
        num_classes,
        roi_size=(7, 7),
        stem_channels=stem_channels,
        batch_size_per_image=32,
        **(COURSE_FASTER_RCNN if course else {}),
    )


def make_dataset(
    data: str,
    split: str,
    image_size: int,
    data_dir: str,
    num_images: Optional[int],
    download=False,
    training=False,
    cache=False,
    workers: int = 0,
    return_difficult=False,
):
    """The synthetic set (``num_images`` of them) or VOC 2007 (all images of ``split``).

    For training, VOC images that cannot be read are skipped with a warning, so that one bad file does
    not end a run hours in; evaluation stays strict, since a replacement would count an image twice.
    ``return_difficult`` keeps VOC's difficult objects, flagged in a fourth item entry, so that an
    evaluation ignores them as the VOC devkit does; training leaves them out (the synthetic set has none).
    With ``cache``, the images come from a ``a4_helper.PreprocessedCache`` in ``data_dir/cache``
    (built on first use), so that a GPU does not wait for JPEG decoding.
    """
    if data == "synthetic":
        dataset = a4_helper.SyntheticDetection(split, num_images=num_images, image_size=image_size)
        key = f"synthetic seed {dataset.seed}"
    else:
        dataset = a4_helper.VOC2007DetectionTiny(
            data_dir,
            split=split,
            download=download,
            image_size=image_size,
            return_difficult=return_difficult,
            skip_bad_images=training,
        )
        # Part of the key and the name, so that a cache without the flags never stands in for one with them.
        key = f"VOC2007 {os.path.abspath(data_dir)} return_difficult={return_difficult}"
    if not cache:
        return dataset
    difficult = "_difficult" if data != "synthetic" and return_difficult else ""
    path = os.path.join(data_dir, "cache", f"{data}_{split}{difficult}_{image_size}px_{len(dataset)}.pt")
    return a4_helper.PreprocessedCache(dataset, path, source_key=f"{key} {split}", workers=workers)


def _loader(dataset, batch_size: int, shuffle: bool, workers: int, seed: int = 0):
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        generator=torch.Generator().manual_seed(seed) if shuffle else None,
        pin_memory=torch.cuda.is_available(),
        drop_last=shuffle,
    )


def _train_loader(dataset, batch_size: int, workers: int, seed: int):
    """This process's share of shuffled global batches of ``batch_size`` images.

    ``DistributedSampler`` draws each epoch's permutation from ``(seed, epoch)`` alone and deals it to
    the ranks in turn, so at every step the ranks' batches together hold exactly the images of the
    global batch that one process would train on; with one process it is a plain shuffle. The
    incomplete last batch of an epoch is dropped.
    """
    world_size, rank = distributed.world_size(), distributed.rank()
    sampler = torch.utils.data.DistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size // world_size,
        sampler=sampler,
        num_workers=workers,
        generator=torch.Generator().manual_seed(seed + rank),  # the workers' seeds
        pin_memory=torch.cuda.is_available(),
        drop_last=True,
    )


def _evaluate(detector, config, args, out_dir: str) -> Dict[str, Any]:
    """mAP on the held-out split; writes metrics.json and a picture of predictions into out_dir."""
    dataset = make_dataset(
        config["data"],
        args.eval_split,
        config["image_size"],
        args.data_dir,
        config.get("eval_images"),
        args.download,
        cache=_use_cache(args, config),
        workers=args.workers,
        return_difficult=True,  # VOC's: detections of difficult objects count neither way
    )
    loader = _loader(dataset, config["batch_size"], shuffle=False, workers=args.workers)
    device = _resolve_device(args.device)
    result = a4_helper.evaluate_detector(
        detector,
        loader,
        score_thresh=args.score_thresh,
        nms_thresh=args.nms_thresh,
        device=device,
        amp="auto",
        keep_predictions=True,
    )  # COCO's mAP from the same predictions:
    coco = a4_helper.compute_map(
        result.pop("predictions"), result.pop("ground_truths"), len(dataset.idx_to_class), method="coco"
    )
    names = dataset.idx_to_class
    metrics = {
        "map": result["map"],
        "map_50_95": coco["map"],
        "ap_per_class": {names[k]: v for k, v in result["ap_per_class"].items()},
        "split": args.eval_split,
        "num_images": result["num_images"],
        "images_per_second": result["images_per_second"],
        "config": config,
    }
    with open(os.path.join(out_dir, "metrics.json"), "w") as file:
        json.dump(metrics, file, indent=2)
    _save_prediction_picture(detector, dataset, device, args, os.path.join(out_dir, "predictions.png"))
    print(
        f"mAP@0.5 on {result['num_images']} {args.eval_split} images: {result['map']:.4f} "
        f"(mAP@[.5:.95] {coco['map']:.4f}); wrote {out_dir}/metrics.json"
    )
    return metrics


def _save_prediction_picture(detector, dataset, device, args, path: str, count: int = 6) -> None:
    from matplotlib import pyplot as plt

    images = torch.stack([dataset[i][1] for i in range(min(count, len(dataset)))])
    detector.eval()
    with torch.inference_mode():
        predictions = detector.predict(
            a4_helper.prepare_images(images, device), score_thresh=0.2, nms_thresh=args.nms_thresh
        )
    predictions = [{key: value[:8] for key, value in p.items()} for p in predictions]  # the 8 most confident
    figure, axes = plt.subplots(2, (len(images) + 1) // 2, figsize=(4 * ((len(images) + 1) // 2), 8), squeeze=False)
    for ax, index, prediction in zip(axes.flat, range(len(images)), predictions):
        a4_helper.detection_visualizer(images[index], dataset.idx_to_class, dataset[index][2], prediction, ax=ax)
    for ax in axes.flat[len(images) :]:
        ax.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def _use_cache(args, config: Dict[str, Any]) -> bool:
    return RECIPES[config["data"]].get("cache", False) if getattr(args, "cache", None) is None else args.cache


def _check_resumable(checkpoint_path: str, config: Dict[str, Any]) -> None:
    """A rerun resumes from ``checkpoint_path``; refuse one whose run had other settings."""
    if not os.path.exists(checkpoint_path):
        return
    saved = (a4_helper.read_checkpoint(checkpoint_path).get("metadata") or {}).get("config")
    if saved != config:
        changed = sorted(key for key in config if saved is None or saved.get(key) != config[key])
        raise SystemExit(
            f"{checkpoint_path} holds a run with other settings ({', '.join(changed)} differ), so it cannot "
            "be resumed. Pass another --out, or delete that file to start over."
        )
    if distributed.is_main_process():
        print(f"Resuming from {checkpoint_path}.")


def cmd_train(args) -> Dict[str, Any]:
    """Train, then evaluate. Under ``torchrun`` every process runs this (see ``_train``); the process
    group is destroyed at the end, also on an error."""
    with distributed.process_group_from_environment(_resolve_device(args.device)) as device:
        return _train(args, device)


def _train(args, device: torch.device) -> Dict[str, Any]:
    """One process's training run. With several processes, each trains on ``batch_size / N`` images
    of every global batch; rank 0 alone then plots, evaluates and writes ``metrics.json``, while the
    other ranks return ``{"final_loss", "train_seconds"}``."""
    recipe = RECIPES[args.data]
    config = {
        "model": args.model,
        "variant": args.variant,
        "data": args.data,
        "image_size": args.image_size or recipe["image_size"],
        "batch_size": args.batch_size or recipe["batch_size"],
        "fpn_channels": args.fpn_channels or recipe["fpn_channels"],
        "iters": args.iters or recipe["iters"],
        "optimizer": args.optimizer or recipe["optimizer"],
        "lr": args.lr or recipe["lr"],
        "train_images": args.train_images or recipe.get("train_images"),
        "eval_images": args.eval_images or recipe.get("eval_images"),
    }
    if args.model == "faster_rcnn":
        config["first_stage"] = args.first_stage or DEFAULT_FIRST_STAGE[args.variant]
    elif args.first_stage or args.init_from:
        raise SystemExit("--first-stage and --init-from apply to --model faster_rcnn only.")
    if args.init_from:
        config["init_from"] = args.init_from
    world_size, main = distributed.world_size(), distributed.is_main_process()
    if config["batch_size"] % world_size:
        raise SystemExit(
            f"--batch-size {config['batch_size']} is the global batch of all {world_size} processes, so it must "
            f"be divisible by {world_size}; pass a multiple of {world_size}."
        )
    os.makedirs(args.out, exist_ok=True)
    a4_helper.reset_seed(args.seed)
    with distributed.rank_zero_first():  # rank 0 downloads what is missing, the other ranks then read it
        train_set = make_dataset(
            args.data,
            args.train_split,
            config["image_size"],
            args.data_dir,
            config["train_images"],
            args.download,
            training=True,
            cache=_use_cache(args, config),
            workers=args.workers,
        )
        pretrained = _resolve_weights(args.weights)
    config["num_classes"] = len(train_set.idx_to_class)
    config["idx_to_class"] = train_set.idx_to_class
    checkpoint_path = os.path.join(args.out, CHECKPOINT_NAME)
    _check_resumable(checkpoint_path, config)
    detector = build_detector(config, pretrained=pretrained)
    if args.init_from:  # a resumed run then loads its own checkpoint over these weights
        copied = init_from_fcos(detector, a4_helper.read_checkpoint(args.init_from)["model"])
        if main:
            print(f"Initialised {len(copied)} tensors (backbone and first stage) from {args.init_from}.")
    if args.compile:
        a4_helper.compile_detector(detector)
    a4_helper.reset_seed(args.seed + distributed.rank())  # each rank its own random draws (e.g. anchor sampling)
    loader = _train_loader(train_set, config["batch_size"], workers=args.workers, seed=args.seed)
    start = time.perf_counter()
    history = a4_helper.train_detector(
        detector,
        loader,
        learning_rate=config["lr"],
        max_iters=config["iters"],
        log_period=args.log_period,
        device=device,
        checkpoint_path=checkpoint_path,
        grad_clip=args.grad_clip or None,
        metadata={"config": config},
        optimizer=config["optimizer"],
    )
    train_seconds = time.perf_counter() - start
    if not main:
        return {"final_loss": history["total"][-1], "train_seconds": train_seconds}
    a4_helper.plot_loss_history(history, os.path.join(args.out, "losses.png"))
    metrics = _evaluate(detector, config, args, args.out)
    metrics["train_seconds"] = train_seconds
    metrics["final_loss"] = history["total"][-1]
    with open(os.path.join(args.out, "metrics.json"), "w") as file:
        json.dump(metrics, file, indent=2)
    print(f"Training took {train_seconds:.0f} s; checkpoint: {checkpoint_path}")
    return metrics


def load_detector(checkpoint_path: str) -> Tuple[nn.Module, Dict[str, Any]]:
    """Rebuild a detector from a checkpoint written by ``detect.py train``."""
    checkpoint = a4_helper.read_checkpoint(checkpoint_path)
    config = (checkpoint.get("metadata") or {}).get("config")
    if config is None:
        raise ValueError(
            f"{checkpoint_path!r} holds no detector configuration; it was not written by 'detect.py train'."
        )
    config["idx_to_class"] = {int(k): v for k, v in config["idx_to_class"].items()}
    detector = build_detector(config, pretrained=False)
    detector.load_state_dict(checkpoint["model"])
    return detector, config


def cmd_eval(args) -> Dict[str, Any]:
    detector, config = load_detector(args.checkpoint)
    if args.data:
        config["data"] = args.data
    out_dir = args.out or os.path.dirname(os.path.abspath(args.checkpoint))
    os.makedirs(out_dir, exist_ok=True)
    metrics = _evaluate(detector, config, args, out_dir)
    if args.proposals:
        metrics["proposals"] = _evaluate_proposals(detector, config, args, out_dir)
        with open(os.path.join(out_dir, "metrics.json"), "w") as file:
            json.dump(metrics, file, indent=2)
    return metrics


def _evaluate_proposals(detector, config, args, out_dir: str, max_proposals=(10, 100, 300)) -> Dict[str, Any]:
    """Average recall of the first stage's proposals (up to 300 per image) on the held-out split;
    prints AR@N and draws recall against IoU into out_dir/proposal_recall.png."""
    if not hasattr(detector, "rpn"):
        raise SystemExit("--proposals needs a two-stage detector (--model faster_rcnn).")
    dataset = make_dataset(
        config["data"], args.eval_split, config["image_size"], args.data_dir, config.get("eval_images"), args.download
    )
    device = _resolve_device(args.device)
    was_training = detector.rpn.training
    first_stage = FirstStage(detector.backbone, detector.rpn).to(device).eval()
    post_nms_topk, detector.rpn.post_nms_topk = detector.rpn.post_nms_topk, max(max_proposals)
    proposals, ground_truths = [], []
    try:  # the detector's own count and mode come back, also on an error, for whoever uses it next
        with torch.inference_mode():
            for batch in _loader(dataset, config["batch_size"], shuffle=False, workers=args.workers):
                _, images, gt_boxes = batch[:3]
                proposals += [p.cpu() for p in first_stage(images.to(device))]
                ground_truths += a4_helper.gt_boxes_to_targets(gt_boxes)
    finally:
        detector.rpn.post_nms_topk = post_nms_topk
        first_stage.train(was_training)
    result = a4_helper.proposal_recall(proposals, ground_truths, max_proposals=max_proposals)
    name = config.get("first_stage", "rpn")
    a4_helper.plot_proposal_recall({name: result}, 100, os.path.join(out_dir, "proposal_recall.png"))
    print(f"{name} proposals: " + ", ".join(f"AR@{n} {ar:.4f}" for n, ar in result["ar"].items()))
    summary = {f"ar_{n}": ar for n, ar in result["ar"].items()}
    thresholds = [f"{t:.2f}" for t in result["iou_thresholds"]]
    summary["recall_100_per_iou"] = dict(zip(thresholds, result["recall"][100].tolist()))
    return summary


def cmd_predict(args) -> List[Dict[str, Any]]:
    detector, config = load_detector(args.checkpoint)
    device = _resolve_device(args.device)
    detector.to(device).eval()
    names = config["idx_to_class"]
    results = []
    for path in args.images:
        image = a4_helper.load_image(path, config["image_size"])
        with torch.inference_mode():
            prediction = detector.predict(image[None].to(device), args.score_thresh, args.nms_thresh)[0]
        detections = [
            {"class": names[int(label)], "score": round(float(score), 4), "box": [round(v, 1) for v in box.tolist()]}
            for box, label, score in zip(prediction["boxes"], prediction["labels"], prediction["scores"])
        ]
        results.append({"image": path, "detections": detections})
        print(json.dumps(results[-1]))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "predictions.json"), "w") as file:
            json.dump(results, file, indent=2)
    return results


def _add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default="data", help="folder that holds VOCdevkit/VOC2007 (default: data)")
    parser.add_argument("--download", action="store_true", help="download VOC 2007 into --data-dir if missing")
    parser.add_argument("--eval-split", default="val", help="held-out split to evaluate on (default: val)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--workers", type=int, default=0, help="data loader worker processes (default: 0)")
    parser.add_argument(
        "--cache",
        action=argparse.BooleanOptionalAction,
        help="read images from a uint8 cache in DATA_DIR/cache, built on first use (default: on for voc2007)",
    )
    parser.add_argument(
        "--score-thresh", type=float, default=SCORE_THRESH, help=f"score threshold for detections ({SCORE_THRESH})"
    )
    parser.add_argument(
        "--nms-thresh", type=float, default=NMS_THRESH, help=f"IoU threshold of class-specific NMS ({NMS_THRESH})"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a detector, then evaluate it on the held-out split")
    train.add_argument("--model", choices=["fcos", "faster_rcnn"], default="fcos", help="detector (default: fcos)")
    train.add_argument(
        "--variant",
        choices=["improved", "course"],
        default="improved",
        help="improved: the detectors' defaults, which learn best (README, Accuracy); course: the course's "
        "original rules (default: improved)",
    )
    train.add_argument("--data", choices=sorted(RECIPES), default="synthetic", help="data set (default: synthetic)")
    train.add_argument("--out", default="runs/train", help="output folder (default: runs/train)")
    train.add_argument("--iters", type=int, help="training iterations (recipe default)")
    train.add_argument(
        "--batch-size", type=int, help="images per batch, over all processes under torchrun (recipe default)"
    )
    train.add_argument("--image-size", type=int, help="side of the square input images (recipe default)")
    train.add_argument("--fpn-channels", type=int, help="FPN channels (recipe default)")
    train.add_argument("--optimizer", choices=["sgd", "adamw"], help="optimizer (recipe default)")
    train.add_argument("--lr", type=float, help="peak learning rate (recipe default)")
    train.add_argument("--train-images", type=int, help="synthetic training images (recipe default)")
    train.add_argument("--eval-images", type=int, help="synthetic held-out images (recipe default)")
    train.add_argument("--train-split", default="train", help="split to train on (default: train)")
    train.add_argument(
        "--weights",
        default="auto",
        help="backbone weights: auto (ImageNet if cached or downloadable, else random), imagenet, none, or a path",
    )
    train.add_argument(
        "--first-stage",
        choices=["rpn", "fcos"],
        help="faster_rcnn's first stage (default: fcos with --variant improved, rpn with --variant course)",
    )
    train.add_argument("--init-from", help="start faster_rcnn's backbone and FCOS first stage from an FCOS checkpoint")
    train.add_argument(
        "--grad-clip",
        type=float,
        default=a4_helper.GRAD_CLIP,
        help=f"clip the global gradient norm to this value; 0 does not clip (default: {a4_helper.GRAD_CLIP:g})",
    )
    train.add_argument("--log-period", type=int, default=20, help="iterations between logs and checkpoints")
    train.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    train.add_argument(
        "--compile", action="store_true", help="torch.compile the backbone and heads (slow start, faster steps)"
    )
    _add_common_options(train)
    train.set_defaults(func=cmd_train)

    evaluate = commands.add_parser("eval", help="evaluate a checkpoint written by 'train'")
    evaluate.add_argument("--checkpoint", required=True, help="path of checkpoint.pt")
    evaluate.add_argument("--data", choices=sorted(RECIPES), help="data set (default: the one it was trained on)")
    evaluate.add_argument("--out", help="where to write metrics.json (default: the checkpoint's folder)")
    evaluate.add_argument(
        "--proposals", action="store_true", help="also report the first stage's AR@10/100/300 (faster_rcnn)"
    )
    _add_common_options(evaluate)
    evaluate.set_defaults(func=cmd_eval)

    predict = commands.add_parser("predict", help="detect objects in image files")
    predict.add_argument("--checkpoint", required=True, help="path of checkpoint.pt")
    predict.add_argument("images", nargs="+", help="image files")
    predict.add_argument("--out", help="folder for predictions.json (default: print only)")
    _add_common_options(predict)
    predict.set_defaults(func=cmd_predict, score_thresh=0.3)
    return parser


def main(argv: Optional[Sequence[str]] = None):
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    main()

"""Command line: train, evaluate and run the detectors.

    python detect.py train --model fcos --data synthetic --out runs/demo
    python detect.py eval --checkpoint runs/demo/checkpoint.pt
    python detect.py predict --checkpoint runs/demo/checkpoint.pt photo.jpg

``python detect.py COMMAND --help`` lists every option. Without options ``train`` runs a short FCOS
recipe on the built-in synthetic data (no download, a few minutes on a laptop CPU); with
``--data voc2007`` it runs the course's full recipe (meant for a GPU).

``torchrun --nproc_per_node=N detect.py train ...`` trains on N processes (one per GPU) with
DistributedDataParallel; ``--batch-size`` stays the global batch, and rank 0 writes every file.

A mistake the user can fix (a bad option value, a missing or unreadable file, a missing data set or
weights file, a refused resume, a NaN loss) ends the command with one ``error:`` line that names the
file or value and the flag that fixes it: exit status 2 for a bad option (argparse), 1 otherwise;
``--debug`` shows the traceback instead. The Python functions here raise their usual exceptions.
"""

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

import a4_helper
import distributed
import photos
from common import NMS_THRESH, PICTURE_SCORE_THRESH, SCORE_THRESH, DetectorBackboneWithFPN
from experiment import (  # noqa: F401  (build_detector, load_detector, make_dataset: also detect.X, as before)
    CACHED_BY_DEFAULT,
    RECIPES,
    RetiredOptionError,
    RunConfig,
    build_detector,
    load_detector,
    make_augmentation,
    make_dataset,
)
from one_stage_detector import FCOS  # noqa: F401  (detect.FCOS, as before)
from two_stage_detector import RPN, FCOSProposalNetwork, FirstStage, init_from_fcos  # noqa: F401

CHECKPOINT_NAME = "checkpoint.pt"


class CommandError(Exception):
    """A mistake the user can fix; ``main`` prints its message as one ``error:`` line and exits with 1."""


# Option types: argparse turns their ArgumentTypeError into its usual "argument --x: ..." error (status 2).
def _number(text: str, kind: type):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole number' if kind is int else 'number'}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _checked(kind: type, holds, requirement: str):
    """An option type: ``text`` as ``kind``, refused with "must be <requirement>" unless ``holds(value)``."""

    def parse(text: str):
        value = _number(text, kind)
        if not holds(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value

    return parse


positive_int = _checked(int, lambda value: value > 0, "a positive whole number")
nonnegative_int = _checked(int, lambda value: value >= 0, "0 or more")
positive_float = _checked(float, lambda value: value > 0, "greater than 0")
nonnegative_float = _checked(float, lambda value: value >= 0, "0 or more")
probability = _checked(float, lambda value: 0 <= value <= 1, "between 0 and 1")
# A side the backbone takes: a positive multiple of its largest stride.
image_side = _checked(
    int, lambda value: value > 0 and value % photos.SIZE_DIVISOR == 0, f"a positive multiple of {photos.SIZE_DIVISOR}"
)


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
    if weights not in ("auto", "imagenet"):  # a path to a saved state dict
        if not os.path.isfile(weights):
            raise CommandError(
                f"no weights file {weights}; pass --weights with a state dict saved from torchvision's "
                "regnet_x_400mf, --weights imagenet, or --weights none for random weights."
            )
        try:
            DetectorBackboneWithFPN(8, pretrained=weights)
        except Exception as error:  # not a state dict, or another network's
            raise CommandError(
                f"{weights} holds no RegNetX-400MF weights ({type(error).__name__}); pass another file with "
                "--weights, or --weights none for random weights."
            ) from error
        return weights
    if weights == "imagenet":
        try:
            DetectorBackboneWithFPN(8, pretrained=True)
        except RuntimeError as error:
            raise CommandError(
                f"the ImageNet weights of RegNetX-400MF are neither cached in {torch.hub.get_dir()} nor "
                "downloadable here; pass --weights PATH with a saved state dict, or --weights none (or auto) to "
                "train from random weights."
            ) from error
        return True
    try:
        DetectorBackboneWithFPN(8, pretrained=True)
    except RuntimeError as error:
        print(f"--weights auto: ImageNet weights unavailable, training from random weights.\n{error}", file=sys.stderr)
        return False
    return True


def _open_data(data: str, split: str, image_size: int, data_dir: str, *args, **kwargs):
    """``make_dataset`` for a command: a missing VOC 2007 becomes a ``CommandError`` naming the flags."""
    try:
        return make_dataset(data, split, image_size, data_dir, *args, **kwargs)
    except FileNotFoundError as error:
        if data != "voc2007":
            raise
        voc = os.path.join(os.path.abspath(data_dir), "VOCdevkit", "VOC2007")
        raise CommandError(
            f"PASCAL VOC 2007 ({split!r} split) not found in {voc}; pass --download to fetch it there "
            "(about 450 MB), or --data-dir with the folder that holds VOCdevkit."
        ) from error


def _reason(error: BaseException, path: str) -> str:
    """A short why for a one-line message about ``path``: the underlying error's type, or the first
    sentence of the error's message with the path (which the message names already) left out."""
    if error.__cause__ is not None:
        return type(error.__cause__).__name__
    first = str(error).replace(repr(path), "it").replace(path, "it").split(". ")[0].split("\n")[0]
    return first if len(first) <= 160 else first[:157] + "..."


def _checkpoint_file(path: str, flag: str) -> str:
    """The checkpoint file an option names: the path itself, or checkpoint.pt in the folder it names."""
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, CHECKPOINT_NAME)):
        path = os.path.join(path, CHECKPOINT_NAME)
    if not os.path.isfile(path):
        raise CommandError(
            f"no checkpoint {path}; pass {flag} with the {CHECKPOINT_NAME} that 'detect.py train' wrote "
            "(e.g. runs/quickstart/checkpoint.pt)."
        )
    return path


def _load_checkpoint_arg(path: str, flag: str, load=None):
    """``load(file)`` (default ``load_detector``) for the checkpoint an option names (``_checkpoint_file``);
    what cannot be loaded becomes a ``CommandError`` naming ``flag``."""
    path = _checkpoint_file(path, flag)
    try:
        return (load or load_detector)(path)
    except RetiredOptionError as error:
        raise CommandError(f"{path}: {error}") from error
    except (RuntimeError, ValueError, KeyError) as error:
        raise CommandError(
            f"{path} is not a checkpoint written by 'detect.py train' ({_reason(error, path)}); "
            f"pass another file with {flag}."
        ) from error


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
    dataset = _open_data(
        config.data,
        args.eval_split,
        config.image_size,
        args.data_dir,
        config.eval_images,
        args.download,
        cache=_use_cache(args, config),
        workers=args.workers,
        return_difficult=True,  # VOC's: detections of difficult objects count neither way
    )
    loader = _loader(dataset, config.batch_size, shuffle=False, workers=args.workers)
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
        "config": config.to_dict(),
    }
    os.makedirs(out_dir, exist_ok=True)
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
            a4_helper.prepare_images(images, device), score_thresh=PICTURE_SCORE_THRESH, nms_thresh=args.nms_thresh
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


def _use_cache(args, config: RunConfig) -> bool:
    return config.data in CACHED_BY_DEFAULT if getattr(args, "cache", None) is None else args.cache


def _check_resumable(checkpoint_path: str, config: RunConfig) -> None:
    """A rerun resumes from ``checkpoint_path``; refuse one whose run had other settings."""
    if not os.path.exists(checkpoint_path):
        return
    try:
        saved = (a4_helper.read_checkpoint(checkpoint_path).get("metadata") or {}).get("config")
    except RuntimeError as error:
        raise CommandError(
            f"{checkpoint_path} cannot be resumed: it is not a readable checkpoint "
            f"({_reason(error, checkpoint_path)}). It was left untouched; pass another --out, or delete that "
            "file to start over."
        ) from error
    saved = RunConfig.from_dict(saved) if saved is not None else None
    if saved != config:
        fields = [field.name for field in dataclasses.fields(RunConfig)]
        changed = [name for name in fields if saved is None or getattr(saved, name) != getattr(config, name)]
        raise CommandError(
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


_OVERRIDES = (
    "image_size",
    "batch_size",
    "fpn_channels",
    "iters",
    "optimizer",
    "lr",
    "train_images",
    "eval_images",
    "augment",
    "p2",
)


def _config_from_args(args) -> RunConfig:
    """The recipe of ``--data`` with the options given on the command line (classes still unknown)."""
    if args.model != "faster_rcnn" and (args.first_stage or args.init_from):
        raise CommandError("--first-stage and --init-from apply to --model faster_rcnn only.")
    if args.model != "fcos" and args.p2:
        raise CommandError("--p2 applies to --model fcos only.")
    given = {name: getattr(args, name) for name in _OVERRIDES if getattr(args, name) is not None}
    config = dataclasses.replace(
        RECIPES[args.data], model=args.model, variant=args.variant, init_from=args.init_from, **given
    )
    config = config.resolved()  # as a checkpoint stores it, so that it says what it holds
    world_size = distributed.world_size()
    if config.batch_size % world_size:
        raise CommandError(
            f"--batch-size {config.batch_size} is the global batch of all {world_size} processes, so it must "
            f"be divisible by {world_size}; pass a multiple of {world_size}."
        )
    return config


def _read_init_state(args) -> Optional[Dict[str, torch.Tensor]]:
    """The weights of ``--init-from``'s FCOS checkpoint, or ``None`` without that flag."""
    if not args.init_from:
        return None
    read_weights = lambda path: a4_helper.read_checkpoint(path)["model"]  # noqa: E731
    return _load_checkpoint_arg(args.init_from, "--init-from", read_weights)


def _build_for_training(args, config: RunConfig, pretrained, init_state) -> nn.Module:
    """The detector to train, started from ``--init-from``'s FCOS (``init_state``) when given, compiled
    with ``--compile``."""
    detector = build_detector(config, pretrained=pretrained)
    if args.init_from:  # a resumed run then loads its own checkpoint over these weights
        try:
            copied = init_from_fcos(detector, init_state)
        except (RuntimeError, ValueError) as error:
            raise CommandError(f"--init-from {args.init_from}: {error}") from error
        if distributed.is_main_process():
            print(f"Initialised {len(copied)} tensors (backbone and first stage) from {args.init_from}.")
    if args.compile:
        a4_helper.compile_detector(detector)
    return detector


def _non_finite_error(error: a4_helper.NonFiniteLossError, checkpoint_path: str, lr: float) -> CommandError:
    bad = ", ".join(f"{name} {value}" for name, value in error.values.items() if not math.isfinite(value))
    kept = (
        f"the last good checkpoint, {checkpoint_path} (iteration {error.last_saved}), is kept"
        if error.last_saved is not None
        else "no checkpoint had been written yet"
    )
    return CommandError(
        f"training stopped at iteration {error.iteration}: the loss is not finite ({bad}); {kept}. Train "
        f"again with a lower --lr than {lr:g} or a smaller --grad-clip, with another --out."
    )


def _train(args, device: torch.device) -> Dict[str, Any]:
    """One process's training run. With several processes, each trains on ``batch_size / N`` images
    of every global batch; rank 0 alone then plots, evaluates and writes ``metrics.json``, while the
    other ranks return ``{"final_loss", "train_seconds"}``."""
    config = _config_from_args(args)
    a4_helper.reset_seed(args.seed)
    with distributed.rank_zero_first():  # rank 0 downloads what is missing, the other ranks then read it
        train_set = _open_data(
            config.data,
            args.train_split,
            config.image_size,
            args.data_dir,
            config.train_images,
            args.download,
            training=True,
            cache=_use_cache(args, config),
            workers=args.workers,
        )
        pretrained = _resolve_weights(args.weights)
    classes = train_set.idx_to_class
    config = dataclasses.replace(config, num_classes=len(classes), idx_to_class=dict(classes))
    init_state = _read_init_state(args)
    if init_state is not None:  # the backbone as the FCOS built it
        config = dataclasses.replace(config, fine_p3=DetectorBackboneWithFPN.options_of(init_state)["fine_p3"])
    checkpoint_path = os.path.join(args.out, CHECKPOINT_NAME)
    _check_resumable(checkpoint_path, config)
    detector = _build_for_training(args, config, pretrained, init_state)
    a4_helper.reset_seed(args.seed + distributed.rank())  # each rank its own random draws (e.g. anchor sampling)
    loader = _train_loader(train_set, config.batch_size, workers=args.workers, seed=args.seed)
    os.makedirs(args.out, exist_ok=True)  # only now: a refused run writes nothing
    start = time.perf_counter()
    try:
        history = a4_helper.train_detector(
            detector,
            loader,
            learning_rate=config.lr,
            max_iters=config.iters,
            log_period=args.log_period,
            device=device,
            checkpoint_path=checkpoint_path,
            grad_clip=args.grad_clip or None,
            metadata={"config": config.to_dict()},
            optimizer=config.optimizer,
            augmentation=make_augmentation(config, seed=args.seed + distributed.rank()),
        )
    except a4_helper.NonFiniteLossError as error:
        raise _non_finite_error(error, checkpoint_path, config.lr) from error
    train_seconds = time.perf_counter() - start
    if not distributed.is_main_process():
        return {"final_loss": history["total"][-1], "train_seconds": train_seconds}
    a4_helper.plot_loss_history(history, os.path.join(args.out, "losses.png"))
    metrics = _evaluate(detector, config, args, args.out)
    metrics.update(train_seconds=train_seconds, final_loss=history["total"][-1])
    with open(os.path.join(args.out, "metrics.json"), "w") as file:
        json.dump(metrics, file, indent=2)
    print(f"Training took {train_seconds:.0f} s; checkpoint: {checkpoint_path}")
    return metrics


def cmd_eval(args) -> Dict[str, Any]:
    checkpoint = _checkpoint_file(args.checkpoint, "--checkpoint")
    detector, config = _load_checkpoint_arg(checkpoint, "--checkpoint")
    if args.data:
        config = dataclasses.replace(config, data=args.data)
    if args.proposals and not hasattr(detector, "rpn"):
        raise CommandError(f"--proposals needs a two-stage detector; {checkpoint} holds a {config.model}.")
    out_dir = args.out or os.path.dirname(os.path.abspath(checkpoint))
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
        raise ValueError("Proposals need a two-stage detector (--model faster_rcnn).")
    dataset = _open_data(
        config.data, args.eval_split, config.image_size, args.data_dir, config.eval_images, args.download
    )
    device = _resolve_device(args.device)
    was_training = detector.rpn.training
    first_stage = FirstStage(detector.backbone, detector.rpn).to(device).eval()
    post_nms_topk, detector.rpn.post_nms_topk = detector.rpn.post_nms_topk, max(max_proposals)
    proposals, ground_truths = [], []
    try:  # the detector's own count and mode come back, also on an error, for whoever uses it next
        with torch.inference_mode():
            for batch in _loader(dataset, config.batch_size, shuffle=False, workers=args.workers):
                _, images, gt_boxes = batch[:3]
                proposals += [p.cpu() for p in first_stage(images.to(device))]
                ground_truths += a4_helper.gt_boxes_to_targets(gt_boxes)
    finally:
        detector.rpn.post_nms_topk = post_nms_topk
        first_stage.train(was_training)
    result = a4_helper.proposal_recall(proposals, ground_truths, max_proposals=max_proposals)
    name = config.resolved_first_stage
    a4_helper.plot_proposal_recall({name: result}, 100, os.path.join(out_dir, "proposal_recall.png"))
    print(f"{name} proposals: " + ", ".join(f"AR@{n} {ar:.4f}" for n, ar in result["ar"].items()))
    summary = {f"ar_{n}": ar for n, ar in result["ar"].items()}
    thresholds = [f"{t:.2f}" for t in result["iou_thresholds"]]
    summary["recall_100_per_iou"] = dict(zip(thresholds, result["recall"][100].tolist()))
    return summary


def cmd_predict(args) -> List[Dict[str, Any]]:
    """Detections on whole photos, in each photo's own pixels (see ``photos``): one JSON line per photo;
    with ``--out``, also predictions.json and one picture per photo with its detections drawn."""
    detector, config = _load_checkpoint_arg(args.checkpoint, "--checkpoint")
    try:
        paths = photos.find_photos(args.images)
        for path in paths:  # a file that is no image fails here, cheaply, before any work
            photos.check_photo(path)
    except (OSError, ValueError) as error:
        raise CommandError(f"{error} Pass image files or folders of them.") from error
    short_side = args.size or config.image_size
    max_side = args.max_size or 2 * short_side
    device = _resolve_device(args.device)
    detector.to(device).eval()
    names = config.idx_to_class
    with torch.inference_mode():
        predictions = photos.predict_photos(
            detector, paths, short_side, max_side, args.score_thresh, args.nms_thresh, args.batch_size, device
        )
    results = []
    for prediction in predictions:
        rows = zip(prediction["boxes"].tolist(), prediction["labels"].tolist(), prediction["scores"].tolist())
        detections = [
            {"class": names[int(label)], "score": round(score, 4), "box": [round(v, 1) for v in box]}
            for box, label, score in rows
        ]
        results.append(
            {
                "image": prediction["path"],
                "width": prediction["width"],
                "height": prediction["height"],
                "detections": detections,
            }
        )
        print(json.dumps(results[-1]))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        taken = set()
        for result, prediction in zip(results, predictions):
            stem = os.path.splitext(os.path.basename(result["image"]))[0]
            name, copy = f"{stem}.jpg", 1
            while name in taken:  # photos of the same name from different folders
                copy += 1
                name = f"{stem}_{copy}.jpg"
            taken.add(name)
            result["picture"] = name
            photos.draw_detections(result["image"], prediction, names).save(os.path.join(args.out, name), quality=90)
        with open(os.path.join(args.out, "predictions.json"), "w") as file:
            json.dump(results, file, indent=2)
        print(f"Wrote {args.out}/predictions.json and {len(results)} pictures.")
    return results


def _add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default="data", help="folder that holds VOCdevkit/VOC2007 (default: data)")
    parser.add_argument("--download", action="store_true", help="download VOC 2007 into --data-dir if missing")
    parser.add_argument("--eval-split", default="val", help="held-out split to evaluate on (default: val)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--workers", type=nonnegative_int, default=0, help="data loader worker processes (default: 0)")
    parser.add_argument(
        "--cache",
        action=argparse.BooleanOptionalAction,
        help="read images from a uint8 cache in DATA_DIR/cache, built on first use (default: on for voc2007)",
    )
    parser.add_argument(
        "--score-thresh",
        type=probability,
        default=SCORE_THRESH,
        help=f"score threshold for detections ({SCORE_THRESH})",
    )
    parser.add_argument(
        "--nms-thresh", type=probability, default=NMS_THRESH, help=f"IoU threshold of class-specific NMS ({NMS_THRESH})"
    )
    parser.add_argument("--debug", action="store_true", help="on an error, show the full traceback")


def _add_train_command(commands) -> None:
    train = commands.add_parser("train", help="train a detector, then evaluate it on the held-out split")
    train.add_argument("--model", choices=["fcos", "faster_rcnn"], default="fcos", help="detector (default: fcos)")
    train.add_argument(
        "--variant",
        choices=["improved", "course"],
        default="improved",
        help="improved: the detectors' defaults, which learn best (docs/accuracy.md); course: the course's "
        "original rules (default: improved)",
    )
    train.add_argument("--data", choices=sorted(RECIPES), default="synthetic", help="data set (default: synthetic)")
    train.add_argument("--out", default="runs/train", help="output folder (default: runs/train)")
    train.add_argument("--iters", type=positive_int, help="training iterations (recipe default)")
    train.add_argument(
        "--batch-size", type=positive_int, help="images per batch, over all processes under torchrun (recipe default)"
    )
    train.add_argument(
        "--image-size", type=image_side, help="side of the square input images, a multiple of 32 (recipe default)"
    )
    train.add_argument("--fpn-channels", type=positive_int, help="FPN channels (recipe default)")
    train.add_argument("--optimizer", choices=["sgd", "adamw"], help="optimizer (recipe default)")
    train.add_argument("--lr", type=positive_float, help="peak learning rate (recipe default)")
    train.add_argument("--train-images", type=positive_int, help="synthetic training images (recipe default)")
    train.add_argument("--eval-images", type=positive_int, help="synthetic held-out images (recipe default)")
    train.add_argument("--train-split", default="train", help="split to train on (default: train)")
    train.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        help="random flips, scale jitter and colour changes of the training batches (docs/data.md, Augmentation; "
        "recipe default)",
    )
    train.add_argument(
        "--p2",
        action="store_true",
        default=None,
        help="fcos: add the FPN level of stride 4, which finds small objects far better and doubles the "
        "compute (docs/accuracy.md)",
    )
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
        type=nonnegative_float,
        default=a4_helper.GRAD_CLIP,
        help=f"clip the global gradient norm to this value; 0 does not clip (default: {a4_helper.GRAD_CLIP:g})",
    )
    train.add_argument(
        "--log-period", type=positive_int, default=20, help="iterations between logs and checkpoints (default: 20)"
    )
    train.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    train.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the backbone and heads; for GPUs (on a CPU: a minute to compile, no faster)",
    )
    _add_common_options(train)
    train.set_defaults(func=cmd_train)


def _add_eval_command(commands) -> None:
    evaluate = commands.add_parser("eval", help="evaluate a checkpoint written by 'train'")
    evaluate.add_argument("--checkpoint", required=True, help="path of checkpoint.pt")
    evaluate.add_argument("--data", choices=sorted(RECIPES), help="data set (default: the one it was trained on)")
    evaluate.add_argument("--out", help="where to write metrics.json (default: the checkpoint's folder)")
    evaluate.add_argument(
        "--proposals", action="store_true", help="also report the first stage's AR@10/100/300 (faster_rcnn)"
    )
    _add_common_options(evaluate)
    evaluate.set_defaults(func=cmd_eval)


def _add_predict_command(commands) -> None:
    predict = commands.add_parser("predict", help="detect objects in whole photos; boxes in each photo's own pixels")
    predict.add_argument("--checkpoint", required=True, help="path of checkpoint.pt (or the folder that holds it)")
    predict.add_argument("images", nargs="+", help="image files, or folders of them")
    predict.add_argument(
        "--out", help="folder for predictions.json and one picture per photo with its detections (default: print only)"
    )
    predict.add_argument("--batch-size", type=positive_int, default=8, help="photos per batch (default: 8)")
    predict.add_argument(
        "--size", type=positive_int, help="short side of a photo at the network's input (default: the training size)"
    )
    predict.add_argument(
        "--max-size", type=positive_int, help="largest long side at the network's input (default: twice --size)"
    )
    _add_common_options(predict)
    predict.set_defaults(func=cmd_predict, score_thresh=PICTURE_SCORE_THRESH)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for add_command in (_add_train_command, _add_eval_command, _add_predict_command):
        add_command(commands)
    return parser


def main(argv: Optional[Sequence[str]] = None):
    """Run one command. A ``CommandError``, or an ``OSError`` (a file that cannot be read or written),
    ends it with ``SystemExit("detect.py COMMAND: error: ...")``: one line on stderr, exit status 1;
    with ``--debug`` the exception itself propagates, with its traceback."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CommandError, OSError) as error:
        if args.debug:
            raise
        raise SystemExit(f"detect.py {args.command}: error: {error}") from None


if __name__ == "__main__":
    main()

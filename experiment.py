"""One run's configuration, and what is built from it: the detector and the data.

``RunConfig`` is the one configuration type: ``detect.py``'s recipes are made of it, the notebooks
use it, and every checkpoint stores it (as ``metadata["config"]``, a plain dict from ``to_dict``;
``from_dict`` also reads the dicts of checkpoints written before it existed). ``build_detector`` is
the one function that builds a detector from a configuration, ``make_dataset`` the one that opens
its data, and ``load_detector`` rebuilds a trained detector from its checkpoint.

Imports: the detector modules, ``common``, ``detection_data`` and ``training``; no command line.
"""

import dataclasses
import inspect
import os
from typing import Any, Dict, Mapping, Optional, Tuple, Union

from torch import nn

from augmentation import BatchAugmentation
from common import P2_LEVELS, DetectorBackboneWithFPN
from detection_data import PreprocessedCache, SyntheticDetection, VOC2007DetectionTiny
from one_stage_detector import course_fcos, course_fcos_parts, improved_fcos
from training import read_checkpoint
from two_stage_detector import COURSE_FASTER_RCNN, COURSE_RPN, RPN, FasterRCNN, FCOSProposalNetwork

# Faster R-CNN's first stage when none is named: FCOS's head proposes better boxes than the anchor RPN
# (docs/accuracy.md); the course teaches the RPN.
DEFAULT_FIRST_STAGE = {"improved": "fcos", "course": "rpn"}
# Each variant's FCOS builder; the RunConfig fields that are options of both, and each builder's defaults.
FCOS_BUILDERS = {"improved": improved_fcos, "course": course_fcos}
_FCOS_FIELDS = ("fine_p3", "object_balance")
_FCOS_DEFAULTS = {
    variant: {name: inspect.signature(builder).parameters[name].default for name in _FCOS_FIELDS}
    for variant, builder in FCOS_BUILDERS.items()
}
# Whether each variant's Faster R-CNN feeds the backbone's c2 into p3 (``DetectorBackboneWithFPN``'s
# ``fine_p3``), which every RoI of a small image reads: improved, it learned better on both of the accuracy
# benchmark's scenes (docs/accuracy.md).
RCNN_FINE_P3 = {"improved": True, "course": False}
# FCOS options that measured no better and were removed (docs/accuracy.md), with the value that meant
# "off" and the last commit whose library trains them. A stored configuration that turns one on is refused.
RETIRED_FCOS_OPTIONS = {
    "exp_deltas": False,
    "quality_focal": False,
    "centerness_weighted_box_loss": False,
    "matching": "fcos",
}
RETIRED_AT = "3e0958e"


class RetiredOptionError(ValueError):
    """A stored configuration turns on an FCOS option that the library no longer has."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What a training run is: the detector, its data and its schedule.

    ``variant`` is ``"improved"`` (the constructors' defaults: what learned best on
    ``benchmarks/bench_accuracy_vs_torchvision.py``) or ``"course"`` (the course's original rules,
    ``course_fcos``, ``COURSE_RPN``, ``COURSE_FASTER_RCNN``). ``first_stage`` (Faster R-CNN only) is
    ``"rpn"`` or ``"fcos"``; ``None`` means the variant's default (``DEFAULT_FIRST_STAGE``).
    ``train_images`` / ``eval_images`` size the synthetic set (VOC uses its whole splits).
    ``augment`` trains with ``augmentation.BatchAugmentation``'s defaults (``make_augmentation``).
    ``p2`` (FCOS only) adds the FPN level of stride 4 (``improved_fcos``'s ``fpn_levels``): better on small
    objects, about twice the compute (docs/accuracy.md). ``fine_p3`` and ``object_balance`` are the FCOS
    builders' options of those names; ``None`` means the variant's value, and a checkpoint stores
    the value it was built with, so that it keeps its meaning when the defaults move on (a stored FCOS
    configuration without them predates them: off). Faster R-CNN's backbone has ``fine_p3`` as its variant
    says (``RCNN_FINE_P3``: improved, yes), or as the FCOS it starts from has it (``detect.py train
    --init-from``); a stored Faster R-CNN configuration without it predates it: off.
    ``num_classes`` and ``idx_to_class`` come from the training data once it is open.
    """

    model: str = "fcos"
    variant: str = "improved"
    data: str = "synthetic"
    image_size: int = 128
    batch_size: int = 8
    fpn_channels: int = 64
    iters: int = 700
    optimizer: str = "adamw"
    lr: float = 1e-3
    train_images: Optional[int] = None
    eval_images: Optional[int] = None
    first_stage: Optional[str] = None
    init_from: Optional[str] = None
    augment: bool = False
    p2: bool = False
    fine_p3: Optional[bool] = None
    object_balance: Optional[float] = None
    num_classes: Optional[int] = None
    idx_to_class: Optional[Dict[int, str]] = None

    @property
    def resolved_first_stage(self) -> Optional[str]:
        """Faster R-CNN's first stage, the variant's default filled in; ``None`` for FCOS."""
        if self.model != "faster_rcnn":
            return None
        return self.first_stage or DEFAULT_FIRST_STAGE[self.variant]

    def fcos_options(self) -> Dict[str, Any]:
        """The keyword arguments of the variant's FCOS builder (``FCOS_BUILDERS``) that this run sets."""
        if self.model != "fcos":
            return {}
        options = {name: getattr(self, name) for name in _FCOS_FIELDS if getattr(self, name) is not None}
        if self.p2:
            options["fpn_levels"] = P2_LEVELS
        return options

    def resolved(self) -> "RunConfig":
        """This configuration with the variant's defaults filled in (Faster R-CNN's first stage, FCOS's
        options): what is built, and what a checkpoint stores."""
        values = {"first_stage": self.resolved_first_stage}
        if self.model == "faster_rcnn":
            values["fine_p3"] = RCNN_FINE_P3[self.variant] if self.fine_p3 is None else self.fine_p3
        if self.model == "fcos":
            options = self.fcos_options()
            values.update({name: options.get(name, _FCOS_DEFAULTS[self.variant][name]) for name in _FCOS_FIELDS})
        return dataclasses.replace(self, **values)

    def to_dict(self) -> Dict[str, Any]:
        """The dict a checkpoint stores: every field, resolved (``resolved``), and no empty optional
        fields (so that it has the keys checkpoints have always had)."""
        config = dataclasses.asdict(self.resolved())
        for optional in ("first_stage", "init_from", *_FCOS_FIELDS):
            if config[optional] is None:
                del config[optional]
        return config

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "RunConfig":
        """A stored configuration, also one written before this type existed: without ``variant``
        it holds a course detector, a Faster R-CNN without ``first_stage`` has the RPN, and class
        indices that JSON turned into strings become integers again. Unknown keys are ignored, but one that
        turns on a retired FCOS option (``RETIRED_FCOS_OPTIONS``) is refused with a ``ValueError``."""
        for name, off in RETIRED_FCOS_OPTIONS.items():
            if config.get(name, off) != off:
                raise RetiredOptionError(
                    f"this configuration sets {name}={config[name]!r}, an FCOS option retired after commit "
                    f"{RETIRED_AT} (docs/accuracy.md); train or load it at that commit: git checkout {RETIRED_AT}"
                )
        known = {field.name for field in dataclasses.fields(cls)}
        values = {key: value for key, value in config.items() if key in known}
        values.setdefault("variant", "course")
        if values.get("model") == "faster_rcnn":
            values.setdefault("first_stage", "rpn")
            values.setdefault("fine_p3", False)  # written before Faster R-CNN had it by default
        if values.get("model", cls.model) == "fcos":  # written before these options: they were off
            values.setdefault("fine_p3", False)
            values.setdefault("object_balance", 0.0)
        if values.get("idx_to_class") is not None:
            values["idx_to_class"] = {int(k): v for k, v in values["idx_to_class"].items()}
        return cls(**values)


# Each data set's recipe; the command line's options override its fields.
RECIPES = {
    # Sized for about five minutes on two CPU cores, starting from random weights.
    # AdamW, because SGD barely moves a randomly initialised backbone in so few iterations. No augmentation:
    # about 11 passes over the images, and it would make each step slower (docs/data.md, Augmentation).
    "synthetic": RunConfig(data="synthetic", train_images=512, eval_images=128),
    # The course's standard recipe: 224 px, batch 16, FPN 128, 9000 iterations (a GPU run). About 58 passes
    # over the training images: with augmentation, because at that length it raised the held-out mAP of the
    # synthetic benchmark (docs/data.md, Augmentation).
    "voc2007": RunConfig(
        data="voc2007",
        image_size=224,
        batch_size=16,
        iters=9000,
        fpn_channels=128,
        optimizer="sgd",
        lr=8e-3,
        augment=True,
    ),
}
# Data sets read through the uint8 image cache unless told otherwise: on a GPU, JPEG decoding would
# be the bottleneck.
CACHED_BY_DEFAULT = {"voc2007"}


def build_detector(config: Union[RunConfig, Mapping[str, Any]], pretrained=False) -> nn.Module:
    """The detector that ``config`` describes (a ``RunConfig``, or a stored dict: see ``from_dict``),
    with the course's sizes: 2-conv stems as wide as the FPN, 400 / 80 proposals, 16 RPN samples and
    32 RoIs per image, 7 x 7 RoI Align."""
    config = config if isinstance(config, RunConfig) else RunConfig.from_dict(config)
    fpn_channels, num_classes = config.fpn_channels, config.num_classes
    stem_channels = [fpn_channels, fpn_channels]
    course = config.variant == "course"
    if config.model == "fcos":
        builder = FCOS_BUILDERS[config.variant]
        return builder(num_classes, fpn_channels, stem_channels, pretrained=pretrained, **config.fcos_options())
    for name in ("p2", "object_balance"):
        if getattr(config, name):
            raise ValueError(f"{name} is an option of FCOS only, not of Faster R-CNN.")
    backbone = DetectorBackboneWithFPN(fpn_channels, pretrained=pretrained, fine_p3=config.resolved().fine_p3)
    proposal_counts = dict(pre_nms_topk=400, post_nms_topk=80)
    if config.resolved_first_stage == "fcos":
        course_parts = {**course_fcos_parts(1, fpn_channels, stem_channels), "nms_per_level": False}
        rpn = FCOSProposalNetwork(fpn_channels, stem_channels, **proposal_counts, **(course_parts if course else {}))
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


def make_augmentation(config: RunConfig, seed: int = 0) -> Optional[BatchAugmentation]:
    """The training augmentation ``config`` asks for (``train_detector``'s ``augmentation``), or ``None``.

    Args:
        config: the run; ``config.augment`` switches the augmentation on.
        seed: seeds its random stream (give each process of a DDP run its own).
    """
    return BatchAugmentation(seed=seed) if config.augment else None


def load_detector(checkpoint_path: str) -> Tuple[nn.Module, RunConfig]:
    """Rebuild a detector, with its trained weights, from a checkpoint written by ``detect.py train``
    (or by ``training.train_detector`` with ``metadata={"config": config.to_dict()}``)."""
    checkpoint = read_checkpoint(checkpoint_path)
    stored = (checkpoint.get("metadata") or {}).get("config")
    if stored is None:
        raise ValueError(
            f"{checkpoint_path!r} holds no detector configuration; it was not written by 'detect.py train'."
        )
    config = RunConfig.from_dict(stored)
    detector = build_detector(config, pretrained=False)
    detector.load_state_dict(checkpoint["model"])
    return detector, config


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
    With ``cache``, the images come from a ``detection_data.PreprocessedCache`` in ``data_dir/cache``
    (built on first use), so that a GPU does not wait for JPEG decoding.
    """
    if data == "synthetic":
        dataset = SyntheticDetection(split, num_images=num_images, image_size=image_size)
        key = f"synthetic seed {dataset.seed}"
    else:
        dataset = VOC2007DetectionTiny(
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
    return PreprocessedCache(dataset, path, source_key=f"{key} {split}", workers=workers)

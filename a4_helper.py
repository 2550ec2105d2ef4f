"""Data, training, evaluation and drawing for the detectors; no model code lives here.

Box, ground-truth and dimension conventions are those of ``common.py``'s docstring. Detectors are
passed in and must follow one small interface:

- train mode: ``losses = detector(images (B, 3, H, W), gt_boxes (B, M, 5))`` returns a dict of
  scalar loss tensors whose sum is the total loss;
- eval mode: ``detector.predict(images, score_thresh=..., nms_thresh=...)`` returns a list of B
  dicts ``{"boxes": (N, 4), "labels": (N,) long, "scores": (N,)}`` in input-image pixels.

Every data set here yields ``(image_id, image (3, S, S) float32 ImageNet-normalised, gt_boxes (40, 5))``,
so the default ``DataLoader`` collate works (ids become a tuple of strings).

Contents: data sets (``VOC2007DetectionTiny``, ``SyntheticDetection``), image helpers, drawing,
``train_detector`` with exact resume (on one process, or on several with DDP), the mAP evaluator
``compute_map``, ``evaluate_detector`` and ``inference_with_detector``.
"""

import contextlib
import dataclasses
import functools
import math
import os
import random
import tempfile
import time
import warnings
from collections import defaultdict
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union
from xml.etree import ElementTree

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel
from torchvision.datasets import VOCDetection
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

import distributed
from common import NMS_THRESH, SCORE_THRESH, iou

PathLike = Union[str, os.PathLike]

# ImageNet statistics that torchvision's pretrained RegNet expects (RGB, images in [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Every data set pads its ground truth to this many rows, so that batches stack.
MAX_GT_BOXES = 40

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)
VOC_SPLITS = ("train", "val", "trainval", "test")


def hello_helper():
    print("Hello from a4_helper.py!")


def reset_seed(seed: int) -> None:
    """Seed Python's ``random``, NumPy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rel_error(x: Any, y: Any, eps: float = 1e-10) -> float:
    """Relative error ``max|x - y| / max(|x| + |y|, eps)``, maxima over all elements (tensors or arrays)."""
    x = torch.as_tensor(x, dtype=torch.float64)
    y = torch.as_tensor(y, dtype=torch.float64)
    return (x - y).abs().max().item() / (x.abs() + y.abs()).clamp(min=eps).max().item()


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def normalize_image(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) uint8 or float in [0, 1] -> (3, H, W) float32 ImageNet-normalised."""
    if image.dtype == torch.uint8:
        image = image.float() / 255
    mean = torch.tensor(IMAGENET_MEAN, device=image.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=image.device)[:, None, None]
    return (image.float() - mean) / std


def denormalize_image(image: torch.Tensor) -> np.ndarray:
    """Undo the ImageNet normalisation for display: (3, H, W) normalised -> (H, W, 3) uint8.

    A uint8 image (``PreprocessedCache``) is already in display values and only transposed."""
    if image.dtype == torch.uint8:
        return image.detach().cpu().permute(1, 2, 0).numpy()
    image = image.detach().float().cpu()
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    rgb = (image * std + mean).clamp(0, 1)
    return (rgb * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()  # (3, H, W) -> (H, W, 3)


def _read_rgb(path: PathLike) -> torch.Tensor:
    """Read an image file as (3, H, W) uint8 RGB, with an error that names the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Image file {os.fspath(path)!r} does not exist.")
    try:
        with Image.open(path) as image:
            array = np.array(image.convert("RGB"))
    except (OSError, ValueError) as error:  # PIL reports truncated and unknown files as OSError
        raise OSError(
            f"Could not read image {os.fspath(path)!r} ({error}); the file is corrupt. "
            "Delete the data set folder and download it again."
        ) from error
    return torch.from_numpy(array).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)


def _resize_center_crop(image: torch.Tensor, image_size: int) -> Tuple[torch.Tensor, Tuple[float, ...]]:
    """Resize the short side to ``image_size`` and cut the central square.

    Args:
        image: (3, H, W) uint8.
    Returns:
        (3, S, S) uint8 and ``(scale_x, scale_y, left, top)``: an input point ``(x, y)`` lands at
        ``(x * scale_x - left, y * scale_y - top)``. The scales are the exact ratios of the
        resized to the original sides, so boxes and pixels move alike.
    """
    _, H, W = image.shape
    S = image_size
    new_w, new_h = max(S, round(W * S / min(W, H))), max(S, round(H * S / min(W, H)))
    resized = TF.resize(image, [new_h, new_w], antialias=True)
    left, top = (new_w - S) // 2, (new_h - S) // 2
    return resized[:, top : top + S, left : left + S], (new_w / W, new_h / H, left, top)


def load_image(path: PathLike, image_size: int = 224) -> torch.Tensor:
    """Read an image the way the data sets do: resize short side, centre crop, normalise.

    Returns:
        (3, S, S) float32 ImageNet-normalised.
    """
    image, _ = _resize_center_crop(_read_rgb(path), image_size)
    return normalize_image(image)


def _pad_rows(rows: torch.Tensor, fill: Any = -1.0) -> torch.Tensor:
    """(M, ...) -> (40, ...) filled with ``fill``; rows past 40 are dropped."""
    padded = rows.new_full((MAX_GT_BOXES, *rows.shape[1:]), fill)
    kept = rows[:MAX_GT_BOXES]
    padded[: len(kept)] = kept
    return padded


def _crop_boxes(
    gt_boxes: torch.Tensor, transform: Tuple[float, ...], image_size: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Move (M, 5) boxes as ``_resize_center_crop`` moved the pixels and clip them to the image.

    Returns:
        The moved boxes (M, 5) and a (M,) mask of those still at least 1 pixel wide and high.
    """
    scale_x, scale_y, left, top = transform
    moved = gt_boxes.clone()
    moved[:, [0, 2]] = (gt_boxes[:, [0, 2]] * scale_x - left).clamp(0, image_size)
    moved[:, [1, 3]] = (gt_boxes[:, [1, 3]] * scale_y - top).clamp(0, image_size)
    inside = ((moved[:, 2] - moved[:, 0]) >= 1) & ((moved[:, 3] - moved[:, 1]) >= 1)
    return moved, inside


# ---------------------------------------------------------------------------------------------
# PASCAL VOC 2007
# ---------------------------------------------------------------------------------------------


class VOC2007DetectionTiny(torch.utils.data.Dataset):
    """PASCAL VOC 2007 detection at a small square size, read from the official layout.

    The data lives in ``dataset_dir/VOCdevkit/VOC2007/{JPEGImages, Annotations, ImageSets/Main}``
    (torchvision's layout). Splits: train (2501 images), val (2510), trainval (5011) come from the
    archive ``VOCtrainval_06-Nov-2007.tar``, test (4952) from ``VOCtest_06-Nov-2007.tar``.

    Each image is resized so that its short side is ``image_size`` and centre-cropped to a square;
    boxes move the same way and are clipped to the square. A box is dropped when its clipped width
    or height is under 1 pixel (it was cropped away). VOC's 1-based inclusive pixel indices become
    continuous coordinates: ``xmin..xmax`` covers ``[xmin - 1, xmax]``.

    Args:
        dataset_dir: folder that holds (or will hold) ``VOCdevkit``.
        split: one of ``"train", "val", "trainval", "test"``.
        download: fetch and extract the official archive of ``split`` with torchvision's
            MD5-checked download when its split file is missing.
        image_size: side S of the square images.
        return_difficult: ``False`` (default): objects marked ``difficult`` are dropped and items
            are ``(image_path, image (3, S, S), gt_boxes (40, 5))``. ``True``: difficult objects
            are kept and items gain a fourth entry ``difficult (40,) bool`` (padding rows False),
            so that an evaluation can ignore them as VOC does (see ``compute_map``).
        skip_bad_images: ``False`` (default): an unreadable image or annotation raises an error that
            names the file. ``True``: such an item is replaced by the next readable one, with one
            warning per bad file (per loader worker), so that a long training run does not die on a
            damaged file; the paths skipped so far are in ``bad_paths``. Meant for training: an
            evaluation would count the replacement image twice.
    Item:
        ``image_path`` (str), ``image`` float32 ImageNet-normalised, ``gt_boxes`` float32 rows
        ``(x1, y1, x2, y2, C)`` in annotation order, padded with -1 (the first 40 rows are kept).
    """

    def __init__(
        self,
        dataset_dir: PathLike,
        split: str = "train",
        download: bool = False,
        image_size: int = 224,
        return_difficult: bool = False,
        skip_bad_images: bool = False,
    ):
        if split not in VOC_SPLITS:
            raise ValueError(f"split must be one of {VOC_SPLITS}, got {split!r}")
        self.dataset_dir = os.fspath(dataset_dir)
        self.split = split
        self.image_size = image_size
        self.return_difficult = return_difficult
        self.skip_bad_images = skip_bad_images
        self.bad_paths: List[str] = []
        self.idx_to_class = dict(enumerate(VOC_CLASSES))
        self.class_to_idx = {name: idx for idx, name in self.idx_to_class.items()}
        voc = self._open_voc(download)
        self.image_paths: List[str] = list(voc.images)
        self.annotation_paths: List[str] = list(voc.annotations)

    def _open_voc(self, download: bool) -> VOCDetection:
        voc_root = os.path.join(self.dataset_dir, "VOCdevkit", "VOC2007")
        split_file = os.path.join(voc_root, "ImageSets", "Main", f"{self.split}.txt")
        if download and not os.path.isfile(split_file):
            # torchvision picks the archive (trainval or test) from the split and checks its MD5.
            VOCDetection(self.dataset_dir, year="2007", image_set=self.split, download=True)
        if not os.path.isfile(split_file):
            archive = "VOCtest_06-Nov-2007.tar" if self.split == "test" else "VOCtrainval_06-Nov-2007.tar"
            raise FileNotFoundError(
                f"PASCAL VOC 2007 ({self.split!r} split) not found: looked for {split_file} in "
                f"{os.path.abspath(self.dataset_dir)!r}. Pass download=True to fetch and extract the "
                f"official archive {archive} (about 450 MB) there, or extract it yourself so that "
                "VOCdevkit/VOC2007 sits in that folder."
            )
        return VOCDetection(self.dataset_dir, year="2007", image_set=self.split)

    def __len__(self) -> int:
        return len(self.image_paths)

    def read_annotation(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Objects of one image in original pixels: ``(boxes (M, 5), difficult (M,) bool)``."""
        path = self.annotation_paths[index]
        try:
            root = ElementTree.parse(path).getroot()
        except (OSError, ElementTree.ParseError) as error:
            raise OSError(f"Could not read annotation {path!r} ({error}).") from error
        objects = VOCDetection.parse_voc_xml(root)["annotation"].get("object", [])
        rows, difficult = [], []
        for obj in objects:
            if obj["name"] not in self.class_to_idx:
                raise ValueError(f"{path!r} names the class {obj['name']!r}, which is not one of {VOC_CLASSES}.")
            box = obj["bndbox"]
            x1, y1 = float(box["xmin"]) - 1, float(box["ymin"]) - 1
            rows.append([x1, y1, float(box["xmax"]), float(box["ymax"]), self.class_to_idx[obj["name"]]])
            difficult.append(obj.get("difficult", "0") == "1")
        return torch.tensor(rows, dtype=torch.float32).reshape(-1, 5), torch.tensor(difficult, dtype=torch.bool)

    def __getitem__(self, index: int):
        if not self.skip_bad_images:
            return self._load_item(index)
        for offset in range(len(self)):
            candidate = (index + offset) % len(self)
            if self.image_paths[candidate] in self.bad_paths:
                continue
            try:
                return self._load_item(candidate)
            except OSError as error:  # _read_rgb and read_annotation name the file
                self.bad_paths.append(self.image_paths[candidate])
                warnings.warn(f"Skipping VOC item {candidate}: {error}", stacklevel=2)
        raise OSError(f"No readable image left in the {self.split!r} split of {self.dataset_dir!r}.")

    def _load_item(self, index: int):
        path = self.image_paths[index]
        image, transform = _resize_center_crop(_read_rgb(path), self.image_size)
        gt_boxes, difficult = self.read_annotation(index)
        gt_boxes, inside = _crop_boxes(gt_boxes, transform, self.image_size)
        keep = inside if self.return_difficult else inside & ~difficult
        item = (path, normalize_image(image), _pad_rows(gt_boxes[keep]))
        return (*item, _pad_rows(difficult[keep], False)) if self.return_difficult else item


# ---------------------------------------------------------------------------------------------
# Synthetic shapes
# ---------------------------------------------------------------------------------------------

# Classes differ by shape and by colour, so both cues can be learned.
SYNTHETIC_CLASSES = ("red_square", "green_disc", "blue_triangle", "yellow_diamond", "magenta_ring", "cyan_cross")
_SYNTHETIC_COLOURS = torch.tensor(
    [[0.90, 0.12, 0.10], [0.10, 0.72, 0.18], [0.12, 0.28, 0.95],
     [0.95, 0.85, 0.10], [0.85, 0.15, 0.85], [0.10, 0.85, 0.90]]
)
_SYNTHETIC_SPLITS = {"train": 0, "val": 1, "test": 2}
_MIN_VISIBLE_FRACTION = 0.5  # an object hidden more than this by later ones is not labelled


def _shape_mask(shape: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Pixels of a shape in its box's normalised coordinates ``u, v`` in [-1, 1] (v down)."""
    inside = (u.abs() <= 1) & (v.abs() <= 1)
    radius2 = u**2 + v**2
    masks = (
        inside,  # square
        radius2 <= 1,  # disc
        inside & (u.abs() <= (v + 1) / 2),  # triangle, apex up
        u.abs() + v.abs() <= 1,  # diamond
        (radius2 <= 1) & (radius2 >= 0.55**2),  # ring
        inside & ((u.abs() <= 0.3) | (v.abs() <= 0.3)),  # cross
    )
    return masks[shape]


def _textured_background(S: int, generator: torch.Generator) -> torch.Tensor:
    """(3, S, S) in about [0, 1]: a greyish base, smooth blotches and faint stripes."""
    rand = functools.partial(torch.rand, generator=generator)
    base = 0.3 + 0.35 * rand(1) + 0.08 * (rand(3) - 0.5)
    cells = int(torch.randint(2, 9, (1,), generator=generator))
    # Mostly luminance so that the class colours stay the strongest colour cue.
    blotches = 0.35 * (rand(1, cells, cells) - 0.5) + 0.08 * (rand(3, cells, cells) - 0.5)
    smooth = F.interpolate(blotches[None], size=(S, S), mode="bilinear", align_corners=False)[0]
    ys, xs = torch.meshgrid(torch.arange(S) + 0.5, torch.arange(S) + 0.5, indexing="ij")
    angle, period, phase = math.pi * rand(1), 6 + 34 * rand(1), 2 * math.pi * rand(1)
    stripes = 0.1 * rand(1) * torch.sin(2 * math.pi * (xs * angle.cos() + ys * angle.sin()) / period + phase)
    return base[:, None, None] + smooth + stripes


def _sample_objects(S: int, generator: torch.Generator, scene: "SceneOptions") -> Dict[str, torch.Tensor]:
    """Classes, centres and sizes of the objects, largest first (small ones end up on top)."""
    rand = functools.partial(torch.rand, generator=generator)
    n = int(torch.randint(1, scene.max_objects + 1, (1,), generator=generator))
    labels = torch.randint(0, len(SYNTHETIC_CLASSES), (n,), generator=generator)
    min_side, max_side = scene.min_object_side, scene.max_object_fraction * S
    # Log-uniform sides spread the objects over all three FPN levels.
    sides = torch.exp(math.log(min_side) + rand(n) * math.log(max_side / min_side))
    aspect = torch.exp(0.6 * (rand(n) - 0.5))
    w, h = (sides * aspect).clamp(min_side, max_side), (sides / aspect).clamp(min_side, max_side)
    cx, cy = w / 2 + rand(n) * (S - w), h / 2 + rand(n) * (S - h)
    order = (w * h).argsort(descending=True)
    colours = (_SYNTHETIC_COLOURS[labels] + 0.05 * torch.randn(n, 3, generator=generator)).clamp(0, 1)
    return {"labels": labels[order], "cx": cx[order], "cy": cy[order], "w": w[order], "h": h[order],
            "colours": colours[order], "shade_angle": 2 * math.pi * rand(n)}


def _draw_strokes(image: torch.Tensor, count: int, generator: torch.Generator) -> None:
    """Paint ``count`` straight strokes, 1-3 px wide, in class colours or grey, onto ``image`` (3, S, S)."""
    S = image.shape[-1]
    rand = functools.partial(torch.rand, generator=generator)
    ys, xs = torch.meshgrid(torch.arange(S) + 0.5, torch.arange(S) + 0.5, indexing="ij")
    for _ in range(count):
        start, end = rand(2) * S, rand(2) * S
        width = 1 + 2 * rand(1)
        colour = _SYNTHETIC_COLOURS[int(torch.randint(0, len(SYNTHETIC_CLASSES), (1,), generator=generator))]
        colour = torch.where(rand(1) < 0.5, colour, rand(1).expand(3))
        direction = (end - start) / (end - start).norm().clamp(min=1e-6)
        along = ((xs - start[0]) * direction[0] + (ys - start[1]) * direction[1]).clamp(0, (end - start).norm())
        distance = torch.hypot(xs - start[0] - along * direction[0], ys - start[1] - along * direction[1])
        image[:] = torch.where(distance <= width / 2, colour[:, None, None], image)


def _draw_scene(
    S: int, generator: torch.Generator, scene: Optional["SceneOptions"] = None
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw one synthetic image (``scene``: ``SceneOptions()`` by default).

    Returns:
        image (3, S, S) in [0, 1]; gt_boxes (N, 5) tight around each labelled object's visible
        pixels (continuous: pixel column j spans [j, j + 1]); owner (S, S) long, the index into
        the drawn objects of the object each pixel shows, -1 for background.
    """
    scene = scene or SceneOptions()
    image = _textured_background(S, generator)
    if scene.max_strokes > 0:  # no draws otherwise, so that the default scenes stay what they were
        _draw_strokes(image, int(torch.randint(0, scene.max_strokes + 1, (1,), generator=generator)), generator)
    objects = _sample_objects(S, generator, scene)
    ys, xs = torch.meshgrid(torch.arange(S) + 0.5, torch.arange(S) + 0.5, indexing="ij")
    owner = torch.full((S, S), -1, dtype=torch.long)
    drawn_pixels = []
    for k, shape in enumerate(objects["labels"].tolist()):
        cx, cy, w, h = (objects[key][k].item() for key in ("cx", "cy", "w", "h"))
        # Only the object's box can change, so work on that window (objects lie inside the image).
        window = (slice(int(cy - h / 2), math.ceil(cy + h / 2)), slice(int(cx - w / 2), math.ceil(cx + w / 2)))
        u, v = (xs[window] - cx) / (w / 2), (ys[window] - cy) / (h / 2)
        mask = _shape_mask(shape, u, v)
        angle = objects["shade_angle"][k]
        shading = 0.85 + 0.15 * (u * angle.cos() + v * angle.sin()).clamp(-1, 1)  # a soft light direction
        image[:, window[0], window[1]] = torch.where(mask, objects["colours"][k][:, None, None] * shading,
                                                     image[:, window[0], window[1]])
        owner[window][mask] = k
        drawn_pixels.append(mask.sum())
    image = (image + 0.02 * torch.randn(3, S, S, generator=generator)).clamp(0, 1)
    visible = owner[None] == torch.arange(len(drawn_pixels))[:, None, None]  # (N, S, S)
    labelled = visible.sum((1, 2)) >= _MIN_VISIBLE_FRACTION * torch.stack(drawn_pixels)
    columns, rows = visible.any(1)[labelled], visible.any(2)[labelled]  # (N, S) each
    x1, x2 = columns.int().argmax(1), S - columns.flip(1).int().argmax(1)
    y1, y2 = rows.int().argmax(1), S - rows.flip(1).int().argmax(1)
    gt_boxes = torch.stack([x1, y1, x2, y2, objects["labels"][labelled]], dim=1).float()
    return image, gt_boxes, owner


@dataclasses.dataclass(frozen=True)
class SceneOptions:
    """What a synthetic scene may hold; the defaults are ``SyntheticDetection``'s standard scenes.

    Attributes:
        min_object_side: pixels; 10 by default, so that every object covers a p3 location (stride 8).
        max_object_fraction: largest object side as a fraction of the image side; big objects
            give the p5 level work.
        max_objects: objects per image are drawn uniformly from 1..max_objects.
        max_strokes: unlabelled straight strokes (clutter) per image, 0..max_strokes, painted under
            the objects in class colours or grey.
    """

    min_object_side: float = 10.0
    max_object_fraction: float = 0.75
    max_objects: int = 8
    max_strokes: int = 0


# A harder scene for accuracy benchmarks: more and smaller objects, so more overlaps, and clutter.
CROWDED_SCENE = SceneOptions(min_object_side=8.0, max_object_fraction=0.5, max_objects=12, max_strokes=6)


class SyntheticDetection(torch.utils.data.Dataset):
    """Coloured shapes on textured backgrounds: a detection set that needs no download.

    Six classes (``SYNTHETIC_CLASSES``) differ by shape and colour. Each image holds 1-8 objects
    with sides from 10 pixels to 75% of the image side (log-uniform, so all FPN levels get
    work); objects overlap, smaller ones drawn on top. An object less than half visible is drawn
    but not labelled. Boxes are tight around the visible pixels.

    Every image is drawn on the fly from its own seed, derived from ``(seed, split, index)``: the
    set is deterministic, and each split draws its own images.

    Args:
        split: ``"train"``, ``"val"`` (held out) or ``"test"``.
        num_images: length of the set.
        image_size: side S of the square images (64..512 tested).
        seed: a non-negative int; different seeds give different sets.
        scene: a ``SceneOptions`` (e.g. ``CROWDED_SCENE``); ``None`` for the standard scenes.
    Item:
        ``(image_id, image (3, S, S) float32 ImageNet-normalised, gt_boxes (40, 5))`` with ids
        like ``"synthetic_train_000012"``.
    """

    def __init__(
        self,
        split: str = "train",
        num_images: int = 256,
        image_size: int = 224,
        seed: int = 0,
        scene: Optional[SceneOptions] = None,
    ):
        if split not in _SYNTHETIC_SPLITS:
            raise ValueError(f"split must be one of {tuple(_SYNTHETIC_SPLITS)}, got {split!r}")
        self.split = split
        self.num_images = num_images
        self.image_size = image_size
        self.seed = seed
        self.scene = scene or SceneOptions()
        self.num_classes = len(SYNTHETIC_CLASSES)
        self.idx_to_class = dict(enumerate(SYNTHETIC_CLASSES))
        self.class_to_idx = {name: idx for idx, name in self.idx_to_class.items()}

    def __len__(self) -> int:
        return self.num_images

    def image_generator(self, index: int) -> torch.Generator:
        """The generator that draws image ``index``; SeedSequence mixes (seed, split, index) well."""
        words = np.random.SeedSequence([self.seed, _SYNTHETIC_SPLITS[self.split], index]).generate_state(2)
        return torch.Generator().manual_seed(int(words[0]) << 32 | int(words[1]))

    def __getitem__(self, index: int):
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        image, gt_boxes, _ = _draw_scene(self.image_size, self.image_generator(index), self.scene)
        return f"synthetic_{self.split}_{index:06d}", normalize_image(image), _pad_rows(gt_boxes)


# ---------------------------------------------------------------------------------------------
# Preprocessed image cache
# ---------------------------------------------------------------------------------------------

_CACHE_FORMAT = 1


def _to_uint8(image: torch.Tensor) -> torch.Tensor:
    """Inverse of ``normalize_image`` rounded to bytes: (..., 3, H, W) normalised float -> uint8."""
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return ((image.float() * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)


def prepare_images(images: torch.Tensor, device: Union[str, torch.device]) -> torch.Tensor:
    """A loader's batch of images on ``device`` as the detectors take them.

    Float images (already normalised) are only moved; uint8 images (``PreprocessedCache``) are moved
    as bytes, four times fewer than floats, and normalised on the device.
    """
    images = images.to(device, non_blocking=True)
    return normalize_image(images) if images.dtype == torch.uint8 else images


class PreprocessedCache(torch.utils.data.Dataset):
    """Another data set's images, resized and cropped once and kept as uint8 tensors in one file.

    Decoding and resizing JPEGs costs more CPU time per image than a GPU needs to train on it, so a
    fast GPU waits for its loader. This cache does that work once: the first use reads every item
    of ``source`` (with ``workers`` processes) and saves all images as one (N, 3, S, S) uint8 tensor,
    with the ground truth, to ``path``; later uses memory-map the file. Images are rounded to whole
    8-bit values, which is what the JPEGs held before resizing anyway.

    A cache file is reused only if it was built from a source with the same length, image size,
    classes, number of item entries (so a cache without ``difficult`` flags never serves a source
    with them) and ``source_key``; otherwise (or if it cannot be read) it is built again.

    Args:
        source: a data set whose items are ``(image_id, image (3, S, S) normalised, gt_boxes (M, 5))``,
            optionally followed by per-box flags (VOC's ``difficult`` with ``return_difficult=True``),
            e.g. ``VOC2007DetectionTiny`` or ``SyntheticDetection``.
        path: the cache file (``.pt``); its folder is created.
        source_key: anything that tells sources apart beyond their length and size (e.g. the split
            and data folder), stored and compared as a string.
        workers: loader processes used to build the cache.
    Item:
        ``(image_id, image (3, S, S) uint8, gt_boxes (M, 5)[, flags])``; ``prepare_images`` (used by
        ``train_detector`` and ``evaluate_detector``) normalises a batch of them on the device, and
        ``normalize_image`` one of them.
    """

    def __init__(self, source: torch.utils.data.Dataset, path: PathLike, source_key: str = "", workers: int = 0):
        self.path = os.fspath(path)
        self.idx_to_class = dict(source.idx_to_class)
        self.num_classes = len(self.idx_to_class)
        first = source[0]
        self.image_size = first[1].shape[-1]
        self.meta = {
            "format": _CACHE_FORMAT,
            "length": len(source),
            "image_shape": list(first[1].shape),
            "item_entries": len(first),
            "classes": [self.idx_to_class[i] for i in range(self.num_classes)],
            "source": f"{type(source).__name__}:{source_key}",
        }
        data = self._load()
        if data is None:
            data = self._build(source, workers)
            _save_atomically(data, self.path)
        self.image_ids: List[str] = data["image_ids"]
        self.images: torch.Tensor = data["images"]  # (N, 3, S, S) uint8
        self.extras: List[torch.Tensor] = data["extras"]  # gt_boxes (N, M, 5), then any flags

    def _load(self) -> Optional[Dict[str, Any]]:
        if not os.path.exists(self.path):
            return None
        try:
            data = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as error:  # a truncated or foreign file: build a new one
            warnings.warn(f"Rebuilding the image cache {self.path!r}: it could not be read ({error}).", stacklevel=3)
            return None
        if not isinstance(data, dict) or data.get("meta") != self.meta:
            warnings.warn(f"Rebuilding the image cache {self.path!r}: it was made from another data set.", stacklevel=3)
            return None
        return data

    def _build(self, source: torch.utils.data.Dataset, workers: int) -> Dict[str, Any]:
        count = len(source)
        images = torch.empty((count, *self.meta["image_shape"]), dtype=torch.uint8)
        image_ids: List[str] = []
        extras: List[torch.Tensor] = []
        loader = torch.utils.data.DataLoader(source, batch_size=32, num_workers=workers)
        position = 0
        for batch in tqdm(loader, desc=f"caching {os.path.basename(self.path)}", leave=False):
            ids, batch_images, *batch_extras = batch
            images[position : position + len(ids)] = _to_uint8(batch_images)
            image_ids.extend(os.fspath(i) for i in ids)
            if not extras:
                extras = [torch.empty((count, *extra.shape[1:]), dtype=extra.dtype) for extra in batch_extras]
            for stored, extra in zip(extras, batch_extras):
                stored[position : position + len(ids)] = extra
            position += len(ids)
        return {"meta": self.meta, "image_ids": image_ids, "images": images, "extras": extras}

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int):
        return (self.image_ids[index], self.images[index], *(extra[index] for extra in self.extras))


# ---------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------


def _pyplot():
    """matplotlib.pyplot, imported on first use; without a display matplotlib falls back to Agg."""
    from matplotlib import pyplot

    return pyplot


def _show(figure) -> None:
    """Show a figure where a display exists; in a headless run (Agg) just release it."""
    plt = _pyplot()
    if plt.get_backend().lower() in ("agg", "pdf", "ps", "svg", "pgf", "cairo", "template"):
        plt.close(figure)
    else:
        plt.show()


def _class_colour(label: int):
    from matplotlib import colormaps

    return colormaps["tab20"](int(label) % 20)


def _prediction_rows(pred: Any) -> np.ndarray:
    """A ``predict`` dict or (N, 6) rows -> (N, 6) array ``(x1, y1, x2, y2, C, score)``."""
    if isinstance(pred, Mapping):
        boxes = _to_numpy(pred["boxes"]).reshape(-1, 4)
        return np.concatenate([boxes, _to_numpy(pred["labels"])[:, None], _to_numpy(pred["scores"])[:, None]], 1)
    return _to_numpy(pred).reshape(-1, 6)


def _draw_box(ax, row: np.ndarray, text: str, dashed: bool) -> None:
    from matplotlib.patches import Rectangle

    x1, y1, x2, y2, label = row[:5]
    colour = _class_colour(label)
    linestyle = "--" if dashed else "-"
    ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=2, linestyle=linestyle))
    ax.text(x1, y1, text, fontsize=8, color="black", verticalalignment="bottom",
            bbox={"facecolor": colour, "alpha": 0.7, "pad": 1, "edgecolor": "none"}, clip_on=True)


def detection_visualizer(
    img: Any,
    idx_to_class: Mapping[int, str],
    bbox: Any = None,
    pred: Any = None,
    points: Any = None,
    ax: Any = None,
):
    """Draw an image with its ground truth (solid boxes) and predictions (dashed, with scores).

    Args:
        img: (3, H, W) ImageNet-normalised tensor, or an (H, W, 3) uint8 / [0, 1] float array.
        idx_to_class: {class index: name}.
        bbox: ground truth (M, 5) rows ``(x1, y1, x2, y2, C)``; padding rows (C < 0) are skipped.
        pred: a ``predict`` dict ``{"boxes", "labels", "scores"}`` or (N, 6) rows
            ``(x1, y1, x2, y2, C, score)``.
        points: (P, 2) ``(x, y)`` points to mark, e.g. FPN locations.
        ax: matplotlib axes to draw into; a new figure when ``None``.
    Returns:
        The matplotlib figure (not shown; notebooks display it, scripts may save it).
    """
    if torch.is_tensor(img) and img.dim() == 3 and img.shape[0] == 3:
        img = denormalize_image(img)
    if ax is None:
        _, ax = _pyplot().subplots(figsize=(5, 5))
    img = _to_numpy(img) if torch.is_tensor(img) else img
    # extent puts pixel j over [j, j + 1], the continuous coordinates that boxes use.
    ax.imshow(img, extent=(0, img.shape[1], img.shape[0], 0))
    ax.axis("off")
    if bbox is not None:
        bbox = _to_numpy(bbox)
        for row in bbox.reshape(-1, bbox.shape[-1]):
            if row[4] >= 0:
                _draw_box(ax, row, idx_to_class[int(row[4])], dashed=False)
    if pred is not None:
        for row in _prediction_rows(pred):
            _draw_box(ax, row, f"{idx_to_class[int(row[4])]} {row[5]:.2f}", dashed=True)
    if points is not None:
        points = _to_numpy(points).reshape(-1, 2)
        ax.scatter(points[:, 0], points[:, 1], s=6, c="white", edgecolors="black", linewidths=0.5)
    ax.set_xlim(0, img.shape[1])  # the view is the image, whatever lies outside it
    ax.set_ylim(img.shape[0], 0)
    return ax.figure


def plot_loss_history(history: Mapping[str, Sequence[float]], path: Optional[PathLike] = None):
    """Plot one curve per loss term (and the total) against the iteration.

    Args:
        history: ``train_detector``'s return value, {name: per-iteration values}.
        path: save the figure there too (any format matplotlib knows, e.g. ``.png``).
    Returns:
        The matplotlib figure.
    """
    figure, ax = _pyplot().subplots(figsize=(7, 4))
    for name, values in history.items():
        style = "--" if name.startswith("metric_") else "-"  # the first stage's error and MAE, not losses
        ax.plot(np.arange(1, len(values) + 1), values, style, label=name, linewidth=2 if name == "total" else 1)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title("Training losses")
    ax.legend()
    ax.grid(alpha=0.3)
    if path is not None:
        figure.savefig(path, dpi=100, bbox_inches="tight")
    return figure


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

_CHECKPOINT_FORMAT = 1
_CHECKPOINT_KEYS = ("format", "iteration", "max_iters", "model", "optimizer", "scheduler", "scaler", "loss_history",
                    "rng", "data")  # and, when saved by several processes, "rank_states"


GRAD_CLIP = 10.0  # train_detector's default bound on the global gradient norm (see its docstring)


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or infinite; training stopped before using it and saved nothing.

    Attributes: ``iteration`` (1-based) where it happened, ``values`` (every loss and metric of that
    step), ``checkpoint_path`` and ``last_saved`` (the iteration the kept checkpoint holds, or None).
    """

    def __init__(self, values: Mapping[str, float], iteration: int, checkpoint_path: Optional[PathLike],
                 last_saved: Optional[int]):
        super().__init__(_non_finite_message(values, iteration, checkpoint_path, last_saved))
        self.values, self.iteration = dict(values), iteration
        self.checkpoint_path, self.last_saved = checkpoint_path, last_saved


def _lr_factor(iteration: int, max_iters: int, warmup_iters: int) -> float:
    """LR multiplier at a 0-based iteration: linear warm-up, then x0.1 at 60% and 90% of training."""
    warmup = min(1.0, (iteration + 1) / warmup_iters) if warmup_iters > 0 else 1.0
    steps = (iteration >= 0.6 * max_iters) + (iteration >= 0.9 * max_iters)
    return warmup * 0.1**steps


def _autocast_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for ``amp`` ("auto", "bf16", "fp16", "fp32"); ``None`` means fp32."""
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    choices = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if amp not in choices:
        raise ValueError(f"amp must be 'auto', 'bf16', 'fp16' or 'fp32', got {amp!r}")
    return choices[amp]


def _loader_generators(loader: torch.utils.data.DataLoader) -> List[torch.Generator]:
    """The loader's and its sampler's own generators (they draw the shuffle when they are set)."""
    generators: List[torch.Generator] = []
    for owner in (loader, getattr(loader, "sampler", None)):
        generator = getattr(owner, "generator", None)
        if isinstance(generator, torch.Generator) and all(generator is not g for g in generators):
            generators.append(generator)
    return generators


class _ResumableBatches:
    """Endless batches from a DataLoader, epoch after epoch, with a position that can be saved.

    A loader draws its shuffle (and its workers' seeds) when an epoch's iterator starts, from
    torch's global RNG or from its own generator. We capture those states at the start of every
    epoch; resuming restores them, re-creates the iterator (same order) and skips the batches
    already used. Exact for data sets that are deterministic per index, like the ones here.
    A sampler with ``set_epoch`` (``DistributedSampler``) is told the epoch before each one
    starts; its order depends on its seed and the epoch only.
    """

    def __init__(self, loader: torch.utils.data.DataLoader):
        self.loader = loader
        self.epoch = 0
        self.batch = 0
        self._epoch_rng: Optional[Dict[str, Any]] = None
        self._iterator: Optional[Iterator] = None

    def _start_epoch(self, epoch_rng: Optional[Dict[str, Any]] = None) -> None:
        generators = _loader_generators(self.loader)
        if epoch_rng is None:
            epoch_rng = {"torch": torch.get_rng_state(), "generators": [g.get_state() for g in generators]}
        else:
            torch.set_rng_state(epoch_rng["torch"])
            for generator, state in zip(generators, epoch_rng["generators"]):
                generator.set_state(state)
        self._epoch_rng, self.batch = epoch_rng, 0
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        self._iterator = iter(self.loader)

    def __next__(self):
        if self._iterator is None:
            self._start_epoch()
        batch = next(self._iterator, None)
        if batch is None:
            self.epoch += 1
            self._start_epoch()
            batch = next(self._iterator, None)
            if batch is None:
                raise ValueError("The training loader yields no batches.")
        self.batch += 1
        return batch

    def state_dict(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "batch": self.batch, "epoch_rng": self._epoch_rng}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Go back to a saved position (this resets torch's RNG to the epoch's start state)."""
        self.epoch = state["epoch"]
        self._start_epoch(state["epoch_rng"])
        for _ in range(state["batch"]):
            next(self._iterator)
        self.batch = state["batch"]


def _rng_states() -> Dict[str, Any]:
    """Every RNG state, as tensors and plain Python values (loadable with ``weights_only``)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: Mapping[str, Any]) -> None:
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    numpy_state = states["numpy"]
    keys = numpy_state["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, numpy_state["pos"], numpy_state["has_gauss"], numpy_state["gauss"]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _save_atomically(state: Dict[str, Any], path: PathLike) -> None:
    """torch.save to a temporary file in the same folder, then rename: a crash leaves the old file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def read_checkpoint(path: PathLike) -> Dict[str, Any]:
    """Load a ``train_detector`` checkpoint onto the CPU (safely: ``weights_only``).

    Returns:
        The checkpoint dict (see ``train_detector``); its ``"model"`` entry is the detector's
        state dict and ``"metadata"`` whatever the training run passed.
    Raises:
        RuntimeError naming the file when it cannot be read or is not such a checkpoint; the
        file is never modified.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, garbage bytes, foreign pickles: all end here
        raise RuntimeError(
            f"Could not read the training checkpoint {os.fspath(path)!r} ({type(error).__name__}: {error}). "
            "It was left untouched; move or delete it to start training from scratch."
        ) from error
    missing = [key for key in _CHECKPOINT_KEYS if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise RuntimeError(f"{os.fspath(path)!r} is not a train_detector checkpoint: it lacks {missing}.")
    return checkpoint


def _non_finite_message(values: Mapping[str, float], iteration: int, checkpoint_path: Optional[PathLike],
                        last_saved: Optional[int]) -> str:
    bad = ", ".join(f"{name}={value}" for name, value in values.items() if not math.isfinite(value))
    message = f"Loss is not finite at iteration {iteration}: {bad}. Training stopped before this update."
    if checkpoint_path is not None and last_saved is not None:
        message += f" The last good checkpoint {os.fspath(checkpoint_path)!r} (iteration {last_saved}) is kept."
    return message + " Try a lower learning_rate, a longer warm-up or grad_clip."


def _loss_values(losses: Mapping[str, torch.Tensor], metrics: Mapping[str, torch.Tensor]) -> Dict[str, float]:
    """Loss terms, their total and the detector's metrics as Python floats, averaged over the ranks
    under DDP, so that every rank sees the same values (one all-reduce and one device sync per iteration)."""
    stacked = torch.stack([value.detach().float() for value in [*losses.values(), *metrics.values()]])
    floats = distributed.mean_over_ranks(stacked).tolist()
    values = dict(zip([*losses, *metrics], floats))
    values["total"] = math.fsum(values[name] for name in losses)
    return values


def train_detector(
    detector: nn.Module,
    train_loader: torch.utils.data.DataLoader,
    learning_rate: float = 5e-3,
    weight_decay: float = 1e-4,
    max_iters: int = 5000,
    log_period: int = 20,
    device: Union[str, torch.device] = "cpu",
    checkpoint_path: Optional[PathLike] = None,
    warmup_iters: Optional[int] = None,
    grad_clip: Optional[float] = GRAD_CLIP,
    amp: str = "auto",
    progress: bool = True,
    metadata: Optional[Mapping[str, Any]] = None,
    optimizer: str = "sgd",
) -> Dict[str, List[float]]:
    """Train a detector with SGD, a warm-up and two LR steps; resumable exactly from a checkpoint.

    SGD with momentum 0.9 (or AdamW) and weight decay; the LR rises linearly over ``warmup_iters`` (to keep
    early, large gradients of a fresh head from blowing up) and drops x0.1 at 60% and 90% of
    ``max_iters``. The loader is re-iterated for as many epochs as needed.

    Several processes (DDP): when the default process group is initialised with more than one
    process (``torchrun``; see ``distributed.process_group_from_environment``), every rank calls
    this function with the same arguments and a loader over its own share of each batch
    (``DistributedSampler``). The detector's ``nn.BatchNorm2d`` layers become
    ``distributed.SyncBatchNorm2d`` (same state dict) and it is wrapped in
    ``DistributedDataParallel``, which averages the ranks' gradients; a detector that is already
    wrapped is used as it is. The logged losses are averaged over the ranks, so all ranks see the
    same values and a non-finite loss stops all of them. Rank 0 alone shows the progress bar and
    writes the checkpoint, whose ``"model"`` is the plain detector's state dict (no ``module.``
    prefix), loadable by one process or by any number of them; it also holds the RNG and data states
    of every rank (``"rank_states"``), so that a resumed run with as many processes continues exactly.

    Args:
        detector: a module whose train-mode call ``detector(images, gt_boxes)`` returns a dict of
            scalar losses (summed for the update). If it has a ``training_metrics`` dict of scalars
            (e.g. the first stage's classification error), those are logged in the history too,
            never added to the loss. It may come wrapped in ``DistributedDataParallel``.
        train_loader: yields ``(image_ids, images (B, 3, H, W), gt_boxes (B, M, 5), ...)``.
        learning_rate, weight_decay: optimizer settings.
        max_iters: number of updates in total (a resumed run counts the ones already done).
        log_period: every ``log_period`` iterations the progress bar shows the mean losses and
            the checkpoint (if any) is saved; it is also saved after the last iteration.
        device: where to train.
        checkpoint_path: file for the full training state, written atomically: a dict with
            ``"format"`` (1), ``"iteration"`` (updates done), ``"max_iters"``, ``"model"``,
            ``"optimizer"``, ``"scheduler"``, ``"scaler"`` (state dicts), ``"loss_history"``,
            ``"rng"`` (python, numpy, torch, cuda), ``"data"`` (epoch, batch within it, RNG
            states at the epoch's start), ``"model_class"`` and ``"optimizer_class"`` (class names) and
            ``"metadata"``. If it exists when training starts, training resumes from it and ends
            exactly as an uninterrupted run would.
        warmup_iters: length of the linear warm-up; ``None`` = ``min(100, max_iters // 10)``.
        grad_clip: clip the global gradient norm to this value (``GRAD_CLIP``, 10, by default); ``None``
            does not clip. A randomly initialised backbone receives gradients with norms in the
            hundreds in its first steps once a head passes them on undamped (an untrained Faster
            R-CNN with a He-initialised RoI head: about 230), and a single SGD step at lr 0.01 then
            wrecks its first layers; clipping shortens such steps and leaves their direction.
        amp: "auto" = bf16 autocast on CUDA where supported, else fp16 with a gradient scaler,
            and fp32 on CPU; or force "bf16", "fp16" or "fp32".
        progress: show a tqdm progress bar with the current losses.
        metadata: plain Python values (e.g. the detector's configuration) stored as is under
            ``"metadata"`` in every checkpoint, so that the checkpoint can rebuild its detector.
        optimizer: ``"sgd"`` (momentum 0.9, the course's choice for ImageNet-initialised backbones)
            or ``"adamw"``, which trains a randomly initialised backbone much faster.
    Returns:
        Loss history ``{loss or metric name: [value per iteration], ..., "total": [...]}`` over all
        ``max_iters`` iterations (including those before a resume).
    Raises:
        NonFiniteLossError (a FloatingPointError): a loss was NaN or infinite; its message names
            the iteration (1-based) and the terms. Nothing is saved for that iteration.
        RuntimeError: ``checkpoint_path`` exists but cannot be read, or holds weights that do not
            fit ``detector`` (e.g. the other detector type); the file is left untouched.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    # The plain detector holds the weights and metrics; ``detector`` is what the forward pass calls.
    model = detector.module if isinstance(detector, DistributedDataParallel) else detector
    several = distributed.world_size() > 1 and model is detector
    if several:
        distributed.convert_sync_batchnorm(model)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _make_optimizer(optimizer, params, learning_rate, weight_decay)
    warmup_iters = min(100, max_iters // 10) if warmup_iters is None else warmup_iters
    lr_lambda = functools.partial(_lr_factor, max_iters=max_iters, warmup_iters=warmup_iters)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    autocast_dtype = _autocast_dtype(amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
    batches = _ResumableBatches(train_loader)
    parts = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler, "data": batches}
    start, history = 0, defaultdict(list)
    if checkpoint_path is not None and os.path.exists(checkpoint_path):
        start, history = _resume(checkpoint_path, parts, max_iters)
    if several:  # after the resume: every rank has loaded the same weights (DDP checks they agree)
        detector = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    main = distributed.is_main_process()
    bar = tqdm(range(start, max_iters), initial=start, total=max_iters, desc="train", disable=not (progress and main))
    last_saved = start if start > 0 else None
    for iteration in bar:
        losses = _forward(detector, next(batches), device, autocast_dtype)
        values = _loss_values(losses, getattr(model, "training_metrics", {}))
        if not all(math.isfinite(value) for value in values.values()):
            bar.close()
            raise NonFiniteLossError(values, iteration + 1, checkpoint_path, last_saved)
        _update(sum(losses.values()), optimizer, scaler, params, grad_clip)
        scheduler.step()
        for name, value in values.items():
            history[name].append(value)
        if (iteration + 1) % log_period == 0 or iteration + 1 == max_iters:
            bar.set_postfix({name: f"{np.mean(v[-log_period:]):.3f}" for name, v in history.items()}, refresh=False)
            if checkpoint_path is not None:
                state = _checkpoint(iteration + 1, max_iters, parts, history)  # every rank takes part
                if main:
                    _save_atomically({**state, "metadata": metadata}, checkpoint_path)
                last_saved = iteration + 1
    bar.close()
    distributed.barrier()  # no rank returns before the last checkpoint is written
    return dict(history)


def _make_optimizer(name: str, params: List[nn.Parameter], learning_rate: float, weight_decay: float):
    if name == "sgd":
        return torch.optim.SGD(params, lr=learning_rate, momentum=0.9, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {name!r}")


def compile_detector(detector: nn.Module, **compile_options: Any) -> nn.Module:
    """``torch.compile`` the detector's backbone and heads, in place.

    The convolutional parts (``backbone``, every ``pred_net`` head, FasterRCNN's ``roi_stem``) are
    compiled; matching, sampling and NMS, whose shapes change with the data, stay eager. The
    modules are compiled in place (``nn.Module.compile``), so state-dict names and checkpoints do
    not change. The first steps take longer (about a minute on a CPU) while the code is compiled.

    Args:
        detector: an ``FCOS``, ``FasterRCNN`` or ``FirstStage``.
        compile_options: passed to ``torch.compile`` (e.g. ``mode="max-autotune"``).
    Returns:
        The same detector.
    """
    if not hasattr(nn.Module, "compile"):
        raise RuntimeError(f"Compiling needs torch 2.2 or newer (this is {torch.__version__}); train without it.")
    compiled: List[str] = []
    for name, module in detector.named_modules():
        inside_compiled = any(name.startswith(done + ".") for done in compiled)
        if name.split(".")[-1] in ("backbone", "pred_net", "roi_stem") and not inside_compiled:
            module.compile(**compile_options)
            compiled.append(name)
    if not compiled:
        raise ValueError(f"{type(detector).__name__} has no backbone or head to compile.")
    return detector


def _forward(detector: nn.Module, batch: Sequence, device: torch.device,
             autocast_dtype: Optional[torch.dtype]) -> Dict[str, torch.Tensor]:
    _, images, gt_boxes = batch[:3]
    images = prepare_images(images, device)
    gt_boxes = gt_boxes.to(device, non_blocking=True)
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with autocast:
        return detector(images, gt_boxes)


def _update(total_loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
            params: List[nn.Parameter], grad_clip: Optional[float]) -> None:
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total_loss).backward()
    if grad_clip is not None:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()


def _checkpoint(iteration: int, max_iters: int, parts: Mapping[str, Any], history: Mapping[str, List[float]]) -> Dict:
    """The training state to save. Under DDP every rank must call this (it gathers the ranks' RNG and
    data states); "rng" and "data" are rank 0's, "rank_states" lists every rank's."""
    state = {name: part.state_dict() for name, part in parts.items()}
    ranks = distributed.all_gather_objects({"rng": _rng_states(), "data": state["data"]})
    state.update(format=_CHECKPOINT_FORMAT, iteration=iteration, max_iters=max_iters, rng=ranks[0]["rng"],
                 data=ranks[0]["data"], loss_history={name: list(values) for name, values in history.items()},
                 model_class=type(parts["model"]).__name__, optimizer_class=type(parts["optimizer"]).__name__)
    if len(ranks) > 1:
        state["rank_states"] = ranks
    return state


def _check_model_fits(path: PathLike, checkpoint: Mapping[str, Any], detector: nn.Module) -> None:
    """Raise a RuntimeError naming the file when its weights do not fit ``detector`` (before any is loaded)."""
    saved, own = checkpoint["model"], detector.state_dict()
    missing = [key for key in own if key not in saved]
    unexpected = [key for key in saved if key not in own]
    reshaped = [key for key in own if key in saved and saved[key].shape != own[key].shape]
    if missing or unexpected or reshaped:
        holds = checkpoint.get("model_class", "an unnamed model")
        raise RuntimeError(
            f"{os.fspath(path)!r} holds weights of {holds}, which do not fit this {type(detector).__name__}: "
            f"{len(missing)} missing (e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}), "
            f"{len(reshaped)} of another shape (e.g. {reshaped[:2]}). It was left untouched; pass another "
            "checkpoint_path, or delete the file to start training from scratch."
        )


def _resume(path: PathLike, parts: Mapping[str, Any], max_iters: int) -> Tuple[int, Dict[str, List[float]]]:
    """Restore every part from a checkpoint; returns (iterations done, loss history)."""
    checkpoint = read_checkpoint(path)
    _check_model_fits(path, checkpoint, parts["model"])
    saved_optimizer, optimizer = checkpoint.get("optimizer_class"), type(parts["optimizer"]).__name__
    if saved_optimizer not in (None, optimizer):
        raise RuntimeError(
            f"{os.fspath(path)!r} was trained with {saved_optimizer}, this run uses {optimizer}. It was left "
            "untouched; resume with the same optimizer, or pass another checkpoint_path."
        )
    if checkpoint["max_iters"] != max_iters:
        warnings.warn(
            f"{os.fspath(path)!r} was saved for max_iters={checkpoint['max_iters']}, now {max_iters}: "
            "the LR steps move, so the run will differ from an uninterrupted one.",
            stacklevel=3,
        )
    for name, part in parts.items():
        if name != "data":
            part.load_state_dict(checkpoint[name])
    own = _own_rank_state(path, checkpoint, max_iters)
    parts["data"].load_state_dict(own["data"])
    # Last, because restoring the data position replays the start of its epoch on torch's RNG.
    _set_rng_states(own["rng"])
    return checkpoint["iteration"], defaultdict(list, checkpoint["loss_history"])


def _own_rank_state(path: PathLike, checkpoint: Mapping[str, Any], max_iters: int) -> Dict[str, Any]:
    """This rank's saved ``{"rng", "data"}``; rank 0's when the checkpoint was saved by another number of
    processes. The data order then still goes on exactly with a ``DistributedSampler`` as in detect.py,
    where a step takes the same global batch with any number of processes."""
    saved = checkpoint.get("rank_states") or [{"rng": checkpoint["rng"], "data": checkpoint["data"]}]
    if len(saved) == distributed.world_size():
        return saved[distributed.rank()]
    if checkpoint["iteration"] < max_iters:
        warnings.warn(
            f"{os.fspath(path)!r} was saved by {len(saved)} process(es) and is resumed by {distributed.world_size()}: "
            "the data order goes on exactly, but random draws (e.g. anchor sampling) differ from an uninterrupted run.",
            stacklevel=4,
        )
    return saved[0]


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------

_COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # built as pycocotools builds them
_COCO_RECALL_POINTS = np.linspace(0.0, 1.0, 101)
_COCO_MAX_DETECTIONS = 100


def _to_numpy(x: Any, dtype: Any = None) -> np.ndarray:
    if torch.is_tensor(x):
        x = x.detach().cpu()
        x = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
        x = x.numpy()
    return np.asarray(x, dtype=dtype)


def _detections(pred: Mapping[str, Any]) -> Dict[str, np.ndarray]:
    return {"boxes": _to_numpy(pred["boxes"], np.float64).reshape(-1, 4),
            "scores": _to_numpy(pred["scores"], np.float64).reshape(-1),
            "labels": _to_numpy(pred["labels"], np.int64).reshape(-1)}


def _ground_truth(gt: Mapping[str, Any]) -> Dict[str, np.ndarray]:
    labels = _to_numpy(gt["labels"], np.int64).reshape(-1)
    difficult = gt.get("difficult")
    difficult = np.zeros(len(labels), bool) if difficult is None else _to_numpy(difficult, bool).reshape(-1)
    return {"boxes": _to_numpy(gt["boxes"], np.float64).reshape(-1, 4), "labels": labels, "difficult": difficult}


def _iou_matrix(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    """(D, 4), (G, 4) -> (D, G) in float64, with the project's one IoU (continuous coordinates)."""
    return iou(torch.from_numpy(boxes1), torch.from_numpy(boxes2)).numpy()


def _voc_outcomes(preds: List[Dict], gts: List[Dict], iou_threshold: float) -> Tuple[np.ndarray, np.ndarray]:
    """Label every detection the PASCAL VOC way, all images at once.

    VOC walks a class's detections by decreasing score (stable on ties). Each one looks only at
    the same-class box it overlaps most in its image; with IoU >= threshold it is ignored if that
    box is difficult, a true positive if the box is still unclaimed, else a false positive
    (a duplicate). Since the box choice does not depend on earlier claims, the first detection
    (in score order) to pick a box is its true positive.

    Returns:
        labels (D,) and outcomes (D,) with 1 TP, 0 FP, -1 ignored, sorted by decreasing score.
    """
    scores, labels, best_gt, best_iou, best_difficult = [], [], [], [], []
    offset = 0
    for pred, gt in zip(preds, gts):
        D, G = len(pred["scores"]), len(gt["labels"])
        ious = np.full((D, G + 1), -1.0)  # a last column "no box" for images without a same-class box
        same_class = pred["labels"][:, None] == gt["labels"][None, :]
        ious[:, :G] = np.where(same_class, _iou_matrix(pred["boxes"], gt["boxes"]), -1.0)
        best = ious.argmax(1)  # the first box on ties, as the devkit's max()
        scores.append(pred["scores"])
        labels.append(pred["labels"])
        best_gt.append(offset + best)
        best_iou.append(ious[np.arange(D), best])
        best_difficult.append(np.append(gt["difficult"], False)[best])
        offset += G + 1
    order = np.argsort(-np.concatenate(scores), kind="stable")
    labels, best_gt, best_iou, best_difficult = (
        np.concatenate(x)[order] for x in (labels, best_gt, best_iou, best_difficult)
    )
    hit = best_iou >= iou_threshold
    candidates = np.flatnonzero(hit & ~best_difficult)
    _, first = np.unique(best_gt[candidates], return_index=True)
    outcomes = np.zeros(len(labels), np.int64)
    outcomes[candidates[first]] = 1
    outcomes[hit & best_difficult] = -1
    return labels, outcomes


def _voc_pr_curves(preds: List[Dict], gts: List[Dict], num_classes: int,
                   iou_threshold: float) -> Dict[int, Tuple[np.ndarray, np.ndarray]]:
    """{class: (recall (Dc,), precision (Dc,))} over its non-ignored detections by decreasing score,
    for every class with at least one non-difficult ground-truth object."""
    if not preds:
        return {}
    labels, outcomes = _voc_outcomes(preds, gts, iou_threshold)
    curves = {}
    for c in range(num_classes):
        num_gt = sum(int(((gt["labels"] == c) & ~gt["difficult"]).sum()) for gt in gts)
        if num_gt == 0:
            continue
        hits = outcomes[(labels == c) & (outcomes >= 0)] == 1
        tp, fp = np.cumsum(hits), np.cumsum(~hits)
        curves[c] = (tp / num_gt, tp / (tp + fp))
    return curves


def _ap_all_point(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC 2010+ AP: area under the precision envelope (max precision at any higher recall)."""
    recall = np.concatenate([[0.0], recall, [1.0]])
    envelope = np.maximum.accumulate(np.concatenate([[0.0], precision, [0.0]])[::-1])[::-1]
    return float(np.sum((recall[1:] - recall[:-1]) * envelope[1:]))


def _ap_11_point(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC 2007 AP: mean over recall t = 0, 0.1, ..., 1 of the best precision at recall >= t.
    The points are ``k * 0.1`` as in the devkit (so 0.3 is 0.30000000000000004)."""
    total = 0.0
    for t in np.arange(11) * 0.1:
        reached = precision[recall >= t]
        total += reached.max() if len(reached) else 0.0
    return float(total / 11)


def _coco_match(ious: np.ndarray, gt_ignore: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """COCOeval.evaluateImg's greedy matching for one image and class, at all IoU thresholds.

    Args:
        ious: (D, G), detections by decreasing score, boxes with the non-ignored ones first.
        gt_ignore: (G,) bool.
    Returns:
        matched (T, D) and ignored (T, D) bool: a detection is ignored when it matched an
        ignored box. Each detection takes the unclaimed box of highest IoU >= threshold (the
        later box on ties, as COCOeval's loop does), an ignored box only when no regular one fits.
    """
    T, (D, G) = len(_COCO_IOU_THRESHOLDS), ious.shape
    matched, ignored = np.zeros((T, D), bool), np.zeros((T, D), bool)
    if G == 0:
        return matched, ignored
    claimed = np.zeros((T, G), bool)
    thresholds = np.minimum(_COCO_IOU_THRESHOLDS, 1 - 1e-10)[:, None]
    for d in np.flatnonzero((ious >= thresholds[0]).any(1)):  # the others match at no threshold
        fits = ~claimed & (ious[d] >= thresholds)  # (T, G)
        regular = fits & ~gt_ignore
        fits = np.where(regular.any(1, keepdims=True), regular, fits)
        best = G - 1 - np.argmax(np.where(fits, ious[d], -np.inf)[:, ::-1], axis=1)
        found = np.flatnonzero(fits.any(1))
        claimed[found, best[found]] = True
        matched[found, d] = True
        ignored[found, d] = gt_ignore[best[found]]
    return matched, ignored


def _coco_ap(scores: np.ndarray, matched: np.ndarray, ignored: np.ndarray, num_gt: int) -> np.ndarray:
    """COCOeval.accumulate for one class: (T,) AP with 101-point interpolated precision."""
    order = np.argsort(-scores, kind="mergesort")
    matched, ignored = matched[:, order], ignored[:, order]
    tp = np.cumsum(matched & ~ignored, axis=1).astype(float)
    fp = np.cumsum(~matched & ~ignored, axis=1).astype(float)
    recall = tp / num_gt
    precision = tp / (tp + fp + np.spacing(1))
    envelope = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
    ap = np.zeros(len(_COCO_IOU_THRESHOLDS))
    for t in range(len(ap)):
        index = np.searchsorted(recall[t], _COCO_RECALL_POINTS, side="left")
        reached = index < recall.shape[1]
        ap[t] = envelope[t, index[reached]].sum() / len(_COCO_RECALL_POINTS)
    return ap


def _coco_map(preds: List[Dict], gts: List[Dict], num_classes: int) -> Dict[str, Any]:
    """mAP@[.5:.95] as pycocotools computes it (area "all", 100 detections per image and class)."""
    per_class: Dict[int, List[Tuple]] = defaultdict(list)  # (scores, matched, ignored) per image
    num_gt = np.zeros(num_classes, np.int64)
    for pred, gt in zip(preds, gts):
        ious = _iou_matrix(pred["boxes"], gt["boxes"])
        for c in np.union1d(pred["labels"], gt["labels"]):
            if not 0 <= c < num_classes:
                continue
            d = np.flatnonzero(pred["labels"] == c)
            d = d[np.argsort(-pred["scores"][d], kind="mergesort")][:_COCO_MAX_DETECTIONS]
            g = np.flatnonzero(gt["labels"] == c)
            g = g[np.argsort(gt["difficult"][g], kind="mergesort")]  # regular boxes first
            per_class[c].append((pred["scores"][d], *_coco_match(ious[np.ix_(d, g)], gt["difficult"][g])))
            num_gt[c] += int((~gt["difficult"][g]).sum())
    ap = {}
    for c in np.flatnonzero(num_gt):
        scores, matched, ignored = zip(*per_class[c])
        ap[int(c)] = _coco_ap(np.concatenate(scores), np.concatenate(matched, 1), np.concatenate(ignored, 1), num_gt[c])
    if not ap:
        return {"map": 0.0, "map_50": 0.0, "map_75": 0.0, "ap_per_class": {}}
    table = np.stack(list(ap.values()))  # (classes, T)
    return {"map": float(table.mean()), "map_50": float(table[:, 0].mean()), "map_75": float(table[:, 5].mean()),
            "ap_per_class": {c: float(v.mean()) for c, v in ap.items()}}


def compute_map(
    predictions: Sequence[Mapping[str, Any]],
    ground_truths: Sequence[Mapping[str, Any]],
    num_classes: int,
    method: str = "voc",
    iou_threshold: float = 0.5,
) -> Dict[str, Any]:
    """Mean average precision over classes, written out so that it can be read (and trusted).

    Args:
        predictions: one dict per image, ``{"boxes" (N, 4), "scores" (N,), "labels" (N,)}``
            (tensors or arrays, any order).
        ground_truths: one dict per image (same order), ``{"boxes" (M, 4), "labels" (M,)}`` and
            optionally ``"difficult" (M,) bool``; no padding rows (see ``gt_boxes_to_targets``).
        num_classes: K; classes are ``0..K-1``.
        method: ``"voc"``: PASCAL VOC AP at ``iou_threshold`` (IoU >= threshold matches), all-point
            interpolation, greedy matching by score, difficult objects neither TP nor FP,
            continuous coordinates (no +1). ``"voc07"``: the same with 11-point interpolation.
            ``"coco"``: mAP@[.50:.05:.95] with 101-point interpolation, as pycocotools computes it
            for area "all" and maxDets 100 (which pycocotools applies per image *and class*);
            ``iou_threshold`` is unused, difficult objects act as pycocotools' ignored boxes.
            Boxes with ``x2 < x1`` or ``y2 < y1`` count as empty in every method.
    Returns:
        ``{"map": float in [0, 1], "ap_per_class": {class: AP}}``; classes without a
        non-difficult ground-truth object are left out of both (no ground truth at all gives
        ``map`` 0). ``"coco"`` adds ``"map_50"`` and ``"map_75"``.
    """
    if len(predictions) != len(ground_truths):
        raise ValueError(f"{len(predictions)} predictions for {len(ground_truths)} ground truths")
    preds = [_detections(p) for p in predictions]
    gts = [_ground_truth(g) for g in ground_truths]
    if method == "coco":
        return _coco_map(preds, gts, num_classes)
    if method not in ("voc", "voc07"):
        raise ValueError(f"method must be 'voc', 'voc07' or 'coco', got {method!r}")
    average_precision = _ap_all_point if method == "voc" else _ap_11_point
    curves = _voc_pr_curves(preds, gts, num_classes, iou_threshold)
    ap = {c: average_precision(recall, precision) for c, (recall, precision) in curves.items()}
    return {"map": float(np.mean(list(ap.values()))) if ap else 0.0, "ap_per_class": ap}


def plot_precision_recall(
    predictions: Sequence[Mapping[str, Any]],
    ground_truths: Sequence[Mapping[str, Any]],
    num_classes: int,
    idx_to_class: Optional[Mapping[int, str]] = None,
    iou_threshold: float = 0.5,
    path: Optional[PathLike] = None,
):
    """One precision-recall panel per class with ground truth (VOC matching, as ``compute_map``).

    Each panel shows the raw curve and its envelope, whose area is the all-point AP.
    Arguments are those of ``compute_map``; ``path`` saves the figure too. Returns the figure.
    """
    preds = [_detections(p) for p in predictions]
    gts = [_ground_truth(g) for g in ground_truths]
    curves = _voc_pr_curves(preds, gts, num_classes, iou_threshold)
    columns = min(4, max(1, len(curves)))
    rows = max(1, math.ceil(len(curves) / columns))
    figure, axes = _pyplot().subplots(rows, columns, figsize=(3 * columns, 2.8 * rows), squeeze=False)
    for ax in axes.flat[len(curves) :]:
        ax.axis("off")
    for ax, (c, (recall, precision)) in zip(axes.flat, curves.items()):
        envelope = np.maximum.accumulate(precision[::-1])[::-1]
        ax.plot(recall, precision, color="0.6", linewidth=1)
        ax.step(recall, envelope, where="post", color="C0")
        name = idx_to_class[c] if idx_to_class else str(c)
        ax.set_title(f"{name}  AP={_ap_all_point(recall, precision):.3f}", fontsize=9)
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision")
    figure.tight_layout()
    if path is not None:
        figure.savefig(path, dpi=100)
    return figure


def proposal_recall(
    proposals: Sequence[Any],
    ground_truths: Sequence[Any],
    iou_thresholds: Sequence[float] = _COCO_IOU_THRESHOLDS,
    max_proposals: Sequence[int] = (10, 100, 300),
) -> Dict[str, Any]:
    """Recall of region proposals at several IoU thresholds, and their average recall (AR).

    A ground-truth box is recalled at threshold t by the first N proposals of its image when one of
    them overlaps it with IoU >= t (Hosang et al., "What makes for effective detection proposals?",
    PAMI 2016; a proposal may cover several boxes). AR@N is the mean recall over IoU 0.5:0.05:0.95,
    which tracks the final detector's mAP better than recall at 0.5 alone. Difficult objects are
    left out. A tolerance of 1e-6 keeps a box at IoU exactly t from missing t through rounding.

    Args:
        proposals: per image, (P, 4) boxes by decreasing score (tensors or arrays).
        ground_truths: per image, a dict with ``"boxes"`` (M, 4) (and optionally ``"difficult"``),
            as ``gt_boxes_to_targets`` gives, or the (M, 4) boxes themselves.
        iou_thresholds: the T thresholds.
        max_proposals: the numbers N of best proposals per image to evaluate.
    Returns:
        ``{"iou_thresholds": (T,) array, "recall": {N: (T,) array}, "ar": {N: float}, "num_gt": int}``;
        with no ground truth at all every recall is 0.
    """
    thresholds = np.asarray(iou_thresholds, dtype=np.float64)
    best = {n: [] for n in max_proposals}  # per N, the best IoU of every GT box
    for boxes, gt in zip(proposals, ground_truths):
        gt_boxes = _to_numpy(gt["boxes"] if isinstance(gt, Mapping) else gt, np.float64).reshape(-1, 4)
        if isinstance(gt, Mapping) and gt.get("difficult") is not None:
            gt_boxes = gt_boxes[~_to_numpy(gt["difficult"], bool).reshape(-1)]
        ious = _iou_matrix(_to_numpy(boxes, np.float64).reshape(-1, 4), gt_boxes)  # (P, M)
        for n in max_proposals:
            best[n].append(ious[:n].max(axis=0) if len(ious[:n]) else np.zeros(len(gt_boxes)))
    num_gt = sum(len(b) for b in best[max_proposals[0]]) if max_proposals else 0
    recall = {}
    for n in max_proposals:
        best_ious = np.concatenate(best[n]) if best[n] else np.zeros(0)
        recall[n] = (best_ious[None, :] >= thresholds[:, None] - 1e-6).sum(axis=1) / max(num_gt, 1)
    return {
        "iou_thresholds": thresholds,
        "recall": recall,
        "ar": {n: float(np.mean(r)) for n, r in recall.items()},
        "num_gt": num_gt,
    }


def plot_proposal_recall(results: Mapping[str, Mapping[str, Any]], num_proposals: int = 100,
                         path: Optional[PathLike] = None, ax=None):
    """Recall against IoU threshold, one curve per first stage, with AR@N in the legend.

    Args:
        results: {name: ``proposal_recall``'s dict}.
        num_proposals: which N of their ``max_proposals`` to draw.
        path: save the figure there too.
        ax: draw into this matplotlib axis instead of a new figure.
    Returns:
        The matplotlib figure.
    """
    if ax is None:
        _, ax = _pyplot().subplots(figsize=(6, 4))
    for name, result in results.items():
        label = f"{name} (AR@{num_proposals} = {result['ar'][num_proposals]:.3f})"
        ax.plot(result["iou_thresholds"], result["recall"][num_proposals], marker="o", label=label)
    ax.set_xlabel("IoU threshold")
    ax.set_ylabel(f"recall of {num_proposals} proposals per image")
    ax.set_ylim(0, 1.02)
    ax.legend()
    ax.grid(alpha=0.3)
    if path is not None:
        ax.figure.savefig(path, dpi=100, bbox_inches="tight")
    return ax.figure


def gt_boxes_to_targets(
    gt_boxes: torch.Tensor, difficult: Optional[torch.Tensor] = None
) -> List[Dict[str, torch.Tensor]]:
    """Padded ground truth -> ``compute_map``'s per-image dicts.

    Args:
        gt_boxes: (B, M, 5) rows ``(x1, y1, x2, y2, C)``; padding rows (C < 0) are dropped.
        difficult: (B, M) bool flags, e.g. from ``VOC2007DetectionTiny(return_difficult=True)``.
    Returns:
        B dicts ``{"boxes" (Mi, 4), "labels" (Mi,) long, "difficult" (Mi,) bool}`` on the CPU.
    """
    gt_boxes = gt_boxes.detach().cpu()
    if difficult is None:
        difficult = torch.zeros(gt_boxes.shape[:2], dtype=torch.bool)
    targets = []
    for rows, flags in zip(gt_boxes, difficult.cpu().bool()):
        real = rows[:, 4] >= 0
        targets.append({"boxes": rows[real, :4], "labels": rows[real, 4].long(), "difficult": flags[real]})
    return targets


@contextlib.contextmanager
def _eval_mode(detector: nn.Module):
    """Switch to eval mode and back to whatever mode the detector was in."""
    was_training = detector.training
    detector.eval()
    try:
        yield
    finally:
        detector.train(was_training)


@contextlib.contextmanager
def _cast(detector: nn.Module, dtype: torch.dtype):
    """Cast the detector's floating-point weights and buffers to ``dtype``, then give each its own dtype back."""

    def named_tensors():  # looked up again afterwards, since ``to`` replaces buffers with new tensors
        return [*detector.named_parameters(), *detector.named_buffers()]

    dtypes = {name: tensor.dtype for name, tensor in named_tensors()}
    detector.to(dtype=dtype)
    try:
        yield
    finally:
        for name, tensor in named_tensors():
            tensor.data = tensor.data.to(dtypes[name])
            if tensor.grad is not None:  # ``to`` cast it too; training on would otherwise fail
                tensor.grad = tensor.grad.to(dtypes[name])


def _predict_batches(detector: nn.Module, loader: Any, score_thresh: float, nms_thresh: float,
                     device: torch.device, dtype: torch.dtype,
                     autocast_dtype: Optional[torch.dtype] = None) -> Iterator[Tuple]:
    """Yield ``(image_ids, images, targets, predictions)`` per batch, everything on the CPU."""
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    for batch in loader:
        image_ids, images, gt_boxes = batch[:3]
        difficult = batch[3] if len(batch) > 3 else None
        with autocast:
            outputs = detector.predict(
                prepare_images(images, device).to(dtype), score_thresh=score_thresh, nms_thresh=nms_thresh
            )
        predictions = [{key: value.detach().cpu() for key, value in output.items()} for output in outputs]
        yield list(image_ids), images, gt_boxes_to_targets(gt_boxes, difficult), predictions


def evaluate_detector(
    detector: nn.Module,
    loader: Any,
    score_thresh: float = SCORE_THRESH,
    nms_thresh: float = NMS_THRESH,
    device: Union[str, torch.device] = "cpu",
    method: str = "voc",
    iou_threshold: float = 0.5,
    num_classes: Optional[int] = None,
    amp: str = "fp32",
    keep_predictions: bool = False,
) -> Dict[str, Any]:
    """Run batched ``predict`` over a loader and compute the mAP.

    The detector is moved to ``device`` and run in eval mode under ``torch.inference_mode``;
    its training mode is restored afterwards. ``amp`` is ``train_detector``'s: "auto" runs the
    network in bf16 (or fp16) on a GPU; boxes are always decoded in float32. A low ``score_thresh`` (0.05) keeps the
    low-confidence tail that AP rewards; loaders with a ``difficult`` fourth entry get VOC's
    difficult handling. ``num_classes`` defaults to the size of the data set's ``idx_to_class``
    (looked up through ``Subset`` wrappers).

    Returns:
        ``compute_map``'s dict plus ``"num_images"``, ``"seconds"`` (wall time of the whole
        loop, data loading included) and ``"images_per_second"``; with ``keep_predictions`` also
        ``"predictions"`` and ``"ground_truths"`` (``compute_map``'s inputs, e.g. to score them again
        with another method).
    """
    device = torch.device(device)
    detector.to(device)
    predictions, ground_truths = [], []
    start = time.perf_counter()
    with _eval_mode(detector), torch.inference_mode():
        batches = _predict_batches(
            detector, loader, score_thresh, nms_thresh, device, torch.float32, _autocast_dtype(amp, device)
        )
        for _, _, targets, preds in batches:
            predictions += preds
            ground_truths += targets
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    num_classes = _num_classes(loader) if num_classes is None else num_classes
    result = compute_map(predictions, ground_truths, num_classes, method=method, iou_threshold=iou_threshold)
    result.update(num_images=len(predictions), seconds=seconds, images_per_second=len(predictions) / max(seconds, 1e-9))
    if keep_predictions:
        result.update(predictions=predictions, ground_truths=ground_truths)
    return result


def _num_classes(loader: Any) -> int:
    dataset = getattr(loader, "dataset", None)
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    idx_to_class = getattr(dataset, "idx_to_class", None)
    if idx_to_class is None:
        raise ValueError("Pass num_classes: the loader's data set has no idx_to_class.")
    return len(idx_to_class)


def _image_stem(image_id: str) -> str:
    """``.../JPEGImages/000005.jpg`` -> ``000005``: the per-image file name of the mAP tools."""
    return os.path.splitext(os.path.basename(str(image_id)))[0]


def _class_name(idx_to_class: Mapping[int, str], label: Any) -> str:
    return idx_to_class[int(label)].replace(" ", "_")  # the mAP tools split lines on spaces


def _write_map_tool_files(output_dir: PathLike, image_id: str, target: Mapping[str, torch.Tensor],
                          pred: Mapping[str, torch.Tensor], idx_to_class: Mapping[int, str]) -> None:
    """Write ``ground-truth/<id>.txt`` and ``detection-results/<id>.txt`` (possibly empty)."""
    gt_lines = []
    for box, label, difficult in zip(*(target[key].tolist() for key in ("boxes", "labels", "difficult"))):
        flag = " difficult" if difficult else ""
        gt_lines.append(" ".join([_class_name(idx_to_class, label)] + [f"{v:.2f}" for v in box]) + flag)
    det_lines = []
    for box, label, score in zip(*(pred[key].tolist() for key in ("boxes", "labels", "scores"))):
        det_lines.append(" ".join([_class_name(idx_to_class, label), f"{score:.6f}"] + [f"{v:.2f}" for v in box]))
    for folder, lines in (("ground-truth", gt_lines), ("detection-results", det_lines)):
        with open(os.path.join(output_dir, folder, _image_stem(image_id) + ".txt"), "w") as file:
            file.write("".join(line + "\n" for line in lines))


def inference_with_detector(
    detector: nn.Module,
    test_loader: Any,
    idx_to_class: Mapping[int, str],
    score_thresh: float,
    nms_thresh: float,
    output_dir: Optional[PathLike] = None,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
) -> List[Dict[str, Any]]:
    """Predict on every image of a loader, then draw the results or write them for mAP tools.

    The detector runs in ``dtype`` and eval mode; afterwards, also after an error, it has its own
    dtypes and mode back. Like ``evaluate_detector``, it is moved to ``device`` and stays there.

    Args:
        output_dir: ``None``: draw each image with its ground truth and predictions (shown when
            a display exists). A folder: write ``output_dir/ground-truth/<id>.txt`` with lines
            ``class x1 y1 x2 y2`` (plus `` difficult`` for difficult objects) and
            ``output_dir/detection-results/<id>.txt`` with ``class score x1 y1 x2 y2``, one file
            per image even when it has no detection; ``<id>`` is the image file's stem.
    Returns:
        One dict per image: ``{"image_id", "boxes", "labels", "scores"}`` (CPU tensors).
    """
    device = torch.device(device)
    detector.to(device)
    if output_dir is not None:
        for folder in ("ground-truth", "detection-results"):
            os.makedirs(os.path.join(output_dir, folder), exist_ok=True)
    results = []
    # _cast outermost: casting back inside inference_mode would leave inference tensors as weights.
    with _cast(detector, dtype), _eval_mode(detector), torch.inference_mode():
        batches = _predict_batches(detector, test_loader, score_thresh, nms_thresh, device, dtype)
        for image_ids, images, targets, preds in batches:
            for image_id, image, target, pred in zip(image_ids, images, targets, preds):
                if output_dir is not None:
                    _write_map_tool_files(output_dir, image_id, target, pred, idx_to_class)
                else:
                    gt_rows = torch.cat([target["boxes"], target["labels"][:, None].float()], dim=1)
                    _show(detection_visualizer(image, idx_to_class, bbox=gt_rows, pred=pred))
                results.append({"image_id": image_id, **pred})
    return results

"""Data for the detectors: image helpers, the PASCAL VOC 2007 loader, the synthetic shapes and the
uint8 image cache.

Every data set here yields ``(image_id, image (3, S, S) float32 ImageNet-normalised, gt_boxes (40, 5))``
(VOC's with ``return_difficult=True`` adds ``difficult (40,)``), so the default ``DataLoader`` collate
works (ids become a tuple of strings). Boxes and ground truth follow ``common.py``'s conventions.
``synthetic_photo`` draws one synthetic scene of any shape, (3, H, W) in [0, 1], as a stand-in photo, and
``save_image`` writes it to a file.

Imports: torch, torchvision, numpy, PIL; nothing of this project (every other module may import it).
"""

import dataclasses
import functools
import math
import os
import tempfile
import warnings
from typing import Any, Dict, List, Optional, Tuple, Union
from xml.etree import ElementTree

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F
from torchvision import tv_tensors
from torchvision.datasets import VOCDetection
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF
from tqdm.auto import tqdm  # a single-line widget in a notebook, a text bar in a terminal

PathLike = Union[str, os.PathLike]


# ImageNet statistics that torchvision's pretrained RegNet expects (RGB, images in [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)


IMAGENET_STD = (0.229, 0.224, 0.225)


# Every data set pads its ground truth to this many rows, so that batches stack.
MAX_GT_BOXES = 40


VOC_CLASSES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)


VOC_SPLITS = ("train", "val", "trainval", "test")


# Images


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


def save_image(image: torch.Tensor, path: PathLike) -> None:
    """Write an image to a file in the format its suffix names (e.g. ``.png``), e.g. for ``photos.predict_photos``.

    Args:
        image: (3, H, W) float in [0, 1] (``synthetic_photo``'s) or uint8; floats are rounded to bytes,
            so a PNG read back gives ``round(255 * image)``.
        path: the file to write; its folder must exist.
    """
    if image.dtype != torch.uint8:
        image = (image.detach().float().cpu() * 255).round().clamp(0, 255).to(torch.uint8)
    Image.fromarray(image.cpu().permute(1, 2, 0).numpy()).save(path)  # (3, H, W) -> (H, W, 3)


class ResizeShortSideCenterCrop(v2.Transform):
    """Resize the short side to ``size`` and cut the central square: a ``transforms.v2`` transform.

    The pixels and the ``tv_tensors.BoundingBoxes`` of a sample move together through v2's ``resize``
    and ``crop`` kernels. It differs from ``v2.Resize(size)`` followed by ``v2.CenterCrop(size)`` in two
    roundings, kept so that the data sets' items stay what they have always been: the long side is
    rounded to the nearest pixel (``Resize`` truncates: a 500 x 375 VOC image becomes 299 x 224 here,
    298 x 224 there) and the crop offset is rounded down (``CenterCrop`` rounds half to even).
    Boxes are then scaled by the exact ratio of the resized to the original sides.
    """

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def make_params(self, flat_inputs: List[Any]) -> Dict[str, Any]:
        images = [inpt for inpt in flat_inputs if isinstance(inpt, tv_tensors.Image)]
        if not images:
            raise TypeError("ResizeShortSideCenterCrop needs a tv_tensors.Image in its input.")
        H, W = images[0].shape[-2:]
        S = self.size
        new_w, new_h = max(S, round(W * S / min(W, H))), max(S, round(H * S / min(W, H)))
        return {"resized": [new_h, new_w], "top": (new_h - S) // 2, "left": (new_w - S) // 2}

    def transform(self, inpt: Any, params: Dict[str, Any]) -> Any:
        resized = TF.resize(inpt, params["resized"], antialias=True)
        return TF.crop(resized, params["top"], params["left"], self.size, self.size)

    # torchvision 0.16-0.20 call these by their old, private names.
    _get_params = make_params
    _transform = transform


def _square_pipeline(image_size: int) -> v2.Compose:
    """Resize and centre-crop to ``image_size``, then clip the boxes and drop those under 1 pixel wide or high.

    Its input is a dict with ``"image"`` (a ``tv_tensors.Image``), ``"boxes"`` (``tv_tensors.BoundingBoxes``)
    and ``"labels"`` (a tensor with a row per box, dropped along with them).
    """
    return v2.Compose(
        [ResizeShortSideCenterCrop(image_size), v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(min_size=1)]
    )


def load_image(path: PathLike, image_size: int = 224) -> torch.Tensor:
    """Read an image the way the data sets do: resize short side, centre crop, normalise.

    Returns:
        (3, S, S) float32 ImageNet-normalised.
    """
    image = ResizeShortSideCenterCrop(image_size)(tv_tensors.Image(_read_rgb(path)))
    return normalize_image(image.as_subclass(torch.Tensor))


def _pad_rows(rows: torch.Tensor, fill: Any = -1.0) -> torch.Tensor:
    """(M, ...) -> (40, ...) filled with ``fill``; rows past 40 are dropped."""
    padded = rows.new_full((MAX_GT_BOXES, *rows.shape[1:]), fill)
    kept = rows[:MAX_GT_BOXES]
    padded[: len(kept)] = kept
    return padded


# PASCAL VOC 2007


class VOC2007DetectionTiny(torch.utils.data.Dataset):
    """PASCAL VOC 2007 detection at a small square size, read from the official layout.

    The data lives in ``dataset_dir/VOCdevkit/VOC2007/{JPEGImages, Annotations, ImageSets/Main}``
    (torchvision's layout). Splits: train (2501 images), val (2510), trainval (5011) come from the
    archive ``VOCtrainval_06-Nov-2007.tar``, test (4952) from ``VOCtest_06-Nov-2007.tar``.

    Each image is resized so that its short side is ``image_size`` and centre-cropped to a square;
    boxes move the same way and are clipped to the square. A box is dropped when its clipped width
    or height is under 1 pixel (it was cropped away). All of this is one ``transforms.v2`` pipeline,
    ``self.transform`` (``ResizeShortSideCenterCrop``, ``ClampBoundingBoxes``, ``SanitizeBoundingBoxes``),
    applied to a dict of ``tv_tensors.Image``, ``tv_tensors.BoundingBoxes`` and labels. VOC's 1-based
    inclusive pixel indices become continuous coordinates: ``xmin..xmax`` covers ``[xmin - 1, xmax]``.

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
        self.transform = _square_pipeline(image_size)
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
        image = tv_tensors.Image(_read_rgb(path))
        gt_boxes, difficult = self.read_annotation(index)
        if not self.return_difficult:
            gt_boxes, difficult = gt_boxes[~difficult], difficult[~difficult]
        sample = {
            "image": image,
            "boxes": tv_tensors.BoundingBoxes(gt_boxes[:, :4], format="XYXY", canvas_size=tuple(image.shape[-2:])),
            # One tensor for the class and the flag, so that SanitizeBoundingBoxes drops both with their box.
            "labels": torch.stack([gt_boxes[:, 4], difficult.float()], dim=1),
        }
        sample = self.transform(sample)
        boxes, labels = sample["boxes"].as_subclass(torch.Tensor), sample["labels"]
        image = normalize_image(sample["image"].as_subclass(torch.Tensor))
        item = (path, image, _pad_rows(torch.cat([boxes, labels[:, :1]], dim=1)))
        return (*item, _pad_rows(labels[:, 1].bool(), False)) if self.return_difficult else item


# Synthetic shapes

# Classes differ by shape and by colour, so both cues can be learned.
SYNTHETIC_CLASSES = ("red_square", "green_disc", "blue_triangle", "yellow_diamond", "magenta_ring", "cyan_cross")
# The VOC-shaped scene's classes (``VOC_LIKE_SCENE``): three shapes, each filled or outlined, in any colour,
# so that shape and fill tell them apart, not colour.
VOC_LIKE_CLASSES = ("square", "disc", "triangle", "square_outline", "disc_outline", "triangle_outline")


_SYNTHETIC_COLOURS = torch.tensor(
    [
        [0.90, 0.12, 0.10],
        [0.10, 0.72, 0.18],
        [0.12, 0.28, 0.95],
        [0.95, 0.85, 0.10],
        [0.85, 0.15, 0.85],
        [0.10, 0.85, 0.90],
    ]
)


_SYNTHETIC_SPLITS = {"train": 0, "val": 1, "test": 2}


_PHOTO_STREAM = 3  # synthetic_photo's seed stream: no photo is an image of a split


_MIN_VISIBLE_FRACTION = 0.5  # an object hidden more than this by later ones is not labelled

# Shapes (indices of ``_shape_mask``) and fills of each class, by ``SceneOptions.classes_by``.
_SQUARE, _DISC, _TRIANGLE, _DIAMOND, _RING, _CROSS = range(6)
_CLASS_SHAPES = {
    "shape and colour": (torch.arange(6), torch.zeros(6, dtype=torch.bool)),
    "shape and fill": (torch.tensor([_SQUARE, _DISC, _TRIANGLE] * 2), torch.arange(6) >= 3),
}
# Distractors (``SceneOptions.max_distractors``) take the shapes that no class of the scene has.
_DISTRACTOR_SHAPES = torch.tensor([_DIAMOND, _CROSS])
_OUTLINE_INNER_SCALE = 0.6  # an outlined shape is the shape minus the same shape at 60% of its size


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


def _textured_background(H: int, W: int, generator: torch.Generator) -> torch.Tensor:
    """(3, H, W) in about [0, 1]: a greyish base, smooth blotches and faint stripes."""
    rand = functools.partial(torch.rand, generator=generator)
    base = 0.3 + 0.35 * rand(1) + 0.08 * (rand(3) - 0.5)
    cells = int(torch.randint(2, 9, (1,), generator=generator))
    # `cells` blotches across the short side, so that they stay round on a wide image.
    rows, cols = round(cells * H / min(H, W)), round(cells * W / min(H, W))
    # Mostly luminance so that the class colours stay the strongest colour cue.
    blotches = 0.35 * (rand(1, rows, cols) - 0.5) + 0.08 * (rand(3, rows, cols) - 0.5)
    smooth = F.interpolate(blotches[None], size=(H, W), mode="bilinear", align_corners=False)[0]
    ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    angle, period, phase = math.pi * rand(1), 6 + 34 * rand(1), 2 * math.pi * rand(1)
    stripes = 0.1 * rand(1) * torch.sin(2 * math.pi * (xs * angle.cos() + ys * angle.sin()) / period + phase)
    return base[:, None, None] + smooth + stripes


def _sample_boxes(
    n: int, H: int, W: int, generator: torch.Generator, scene: "SceneOptions"
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centres and sizes ``(cx, cy, w, h)`` of ``n`` shapes, sides following the short side."""
    rand = functools.partial(torch.rand, generator=generator)
    min_side, max_side = scene.min_object_side, scene.max_object_fraction * min(H, W)
    # Log-uniform sides spread the objects over all three FPN levels; a size bias above 1 favours large ones.
    fraction = rand(n) if scene.size_bias == 1 else rand(n) ** (1 / scene.size_bias)
    sides = torch.exp(math.log(min_side) + fraction * math.log(max_side / min_side))
    aspect = torch.exp(0.6 * (rand(n) - 0.5))
    w, h = (sides * aspect).clamp(min_side, max_side), (sides / aspect).clamp(min_side, max_side)
    cx, cy = w / 2 + rand(n) * (W - w), h / 2 + rand(n) * (H - h)
    return cx, cy, w, h


def _sample_objects(H: int, W: int, generator: torch.Generator, scene: "SceneOptions") -> Dict[str, torch.Tensor]:
    """Classes, shapes, fills, centres, sizes and colours of the objects and distractors (label -1), largest
    first (small ones end up on top).

    Sizes follow the short side, so that a wide scene holds the objects of a square one of its height;
    centres spread over the whole image."""
    n = int(torch.randint(1, scene.max_objects + 1, (1,), generator=generator))
    labels = torch.randint(0, len(SYNTHETIC_CLASSES), (n,), generator=generator)
    cx, cy, w, h = _sample_boxes(n, H, W, generator, scene)
    by_colour = scene.classes_by == "shape and colour"
    palette = labels if by_colour else torch.randint(0, len(_SYNTHETIC_COLOURS), (n,), generator=generator)
    colours = (_SYNTHETIC_COLOURS[palette] + 0.05 * torch.randn(n, 3, generator=generator)).clamp(0, 1)
    class_shapes, class_outlined = _CLASS_SHAPES[scene.classes_by]
    objects = {"labels": labels, "shapes": class_shapes[labels], "outlined": class_outlined[labels]}
    objects.update(cx=cx, cy=cy, w=w, h=h, colours=colours)
    if scene.max_distractors > 0:  # no draws otherwise, so that the other scenes stay what they were
        m = int(torch.randint(0, scene.max_distractors + 1, (1,), generator=generator))
        kinds = torch.randint(0, len(_DISTRACTOR_SHAPES), (m,), generator=generator)
        outlined = torch.rand(m, generator=generator) < 0.5
        palette = torch.randint(0, len(_SYNTHETIC_COLOURS), (m,), generator=generator)
        noise = 0.05 * torch.randn(m, 3, generator=generator)
        extra = dict(zip(("cx", "cy", "w", "h"), _sample_boxes(m, H, W, generator, scene)))
        extra.update(labels=torch.full((m,), -1), shapes=_DISTRACTOR_SHAPES[kinds], outlined=outlined)
        extra["colours"] = (_SYNTHETIC_COLOURS[palette] + noise).clamp(0, 1)
        objects = {key: torch.cat([value, extra[key]]) for key, value in objects.items()}
    order = (objects["w"] * objects["h"]).argsort(descending=True)
    objects = {key: value[order] for key, value in objects.items()}
    objects["shade_angle"] = 2 * math.pi * torch.rand(len(order), generator=generator)
    return objects


def _draw_strokes(
    image: torch.Tensor,
    count: int,
    generator: torch.Generator,
    widths: Tuple[float, float] = (1.0, 3.0),
    owner: Optional[torch.Tensor] = None,
) -> None:
    """Paint ``count`` straight strokes, ``widths`` px wide (from, to), in class colours or grey, onto
    ``image`` (3, H, W); where ``owner`` (H, W) is given, the pixels they cover show no object any more."""
    H, W = image.shape[-2:]
    rand = functools.partial(torch.rand, generator=generator)
    ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    size = torch.tensor([W, H], dtype=torch.float32)  # ends are (x, y)
    for _ in range(count):
        start, end = rand(2) * size, rand(2) * size
        width = widths[0] + (widths[1] - widths[0]) * rand(1)
        colour = _SYNTHETIC_COLOURS[int(torch.randint(0, len(SYNTHETIC_CLASSES), (1,), generator=generator))]
        colour = torch.where(rand(1) < 0.5, colour, rand(1).expand(3))
        direction = (end - start) / (end - start).norm().clamp(min=1e-6)
        along = ((xs - start[0]) * direction[0] + (ys - start[1]) * direction[1]).clamp(0, (end - start).norm())
        distance = torch.hypot(xs - start[0] - along * direction[0], ys - start[1] - along * direction[1])
        image[:] = torch.where(distance <= width / 2, colour[:, None, None], image)
        if owner is not None:
            owner[distance <= width / 2] = -1


def _draw_scene(
    H: int, W: int, generator: torch.Generator, scene: Optional["SceneOptions"] = None
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw one synthetic image, H high and W wide (``scene``: ``SceneOptions()`` by default).

    Returns:
        image (3, H, W) in [0, 1]; gt_boxes (N, 5) tight around each labelled object's visible
        pixels (continuous: pixel column j spans [j, j + 1]); owner (H, W) long, the index into
        the drawn objects of the object each pixel shows, -1 for background.
    """
    scene = scene or SceneOptions()
    image = _textured_background(H, W, generator)
    if scene.max_strokes > 0:  # no draws otherwise, so that the default scenes stay what they were
        _draw_strokes(image, int(torch.randint(0, scene.max_strokes + 1, (1,), generator=generator)), generator)
    objects = _sample_objects(H, W, generator, scene)
    ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    owner = torch.full((H, W), -1, dtype=torch.long)
    drawn_pixels = []
    for k, shape in enumerate(objects["shapes"].tolist()):
        cx, cy, w, h = (objects[key][k].item() for key in ("cx", "cy", "w", "h"))
        # Only the object's box can change, so work on that window (objects lie inside the image).
        window = (slice(int(cy - h / 2), math.ceil(cy + h / 2)), slice(int(cx - w / 2), math.ceil(cx + w / 2)))
        u, v = (xs[window] - cx) / (w / 2), (ys[window] - cy) / (h / 2)
        mask = _shape_mask(shape, u, v)
        if objects["outlined"][k]:
            mask &= ~_shape_mask(shape, u / _OUTLINE_INNER_SCALE, v / _OUTLINE_INNER_SCALE)
        angle = objects["shade_angle"][k]
        shading = 0.85 + 0.15 * (u * angle.cos() + v * angle.sin()).clamp(-1, 1)  # a soft light direction
        image[:, window[0], window[1]] = torch.where(
            mask, objects["colours"][k][:, None, None] * shading, image[:, window[0], window[1]]
        )
        owner[window][mask] = k
        drawn_pixels.append(mask.sum())
    if scene.max_occluders > 0:  # bars in front of the objects: poles, fences, a table's edge
        side = min(H, W)
        count = int(torch.randint(0, scene.max_occluders + 1, (1,), generator=generator))
        _draw_strokes(image, count, generator, widths=(0.04 * side, 0.1 * side), owner=owner)
    image = (image + 0.02 * torch.randn(3, H, W, generator=generator)).clamp(0, 1)
    visible = owner[None] == torch.arange(len(drawn_pixels))[:, None, None]  # (N, H, W)
    labelled = visible.sum((1, 2)) >= _MIN_VISIBLE_FRACTION * torch.stack(drawn_pixels)
    labelled &= objects["labels"] >= 0  # distractors are never labelled
    columns, rows = visible.any(1)[labelled], visible.any(2)[labelled]  # (N, W), (N, H)
    x1, x2 = columns.int().argmax(1), W - columns.flip(1).int().argmax(1)
    y1, y2 = rows.int().argmax(1), H - rows.flip(1).int().argmax(1)
    gt_boxes = torch.stack([x1, y1, x2, y2, objects["labels"][labelled]], dim=1).float()
    return image, gt_boxes, owner


@dataclasses.dataclass(frozen=True)
class SceneOptions:
    """What a synthetic scene may hold; the defaults are ``SyntheticDetection``'s standard scenes.

    Attributes:
        min_object_side: pixels; 10 by default, so that every object covers a p3 location (stride 8).
        max_object_fraction: largest object side as a fraction of the image's (short) side; big
            objects give the p5 level work.
        max_objects: objects per image are drawn uniformly from 1..max_objects.
        max_strokes: unlabelled straight strokes (clutter) per image, 0..max_strokes, painted under
            the objects in class colours or grey.
        size_bias: 1 draws object sides log-uniformly between the smallest and the largest; above 1
            the log-side's fraction of that range is ``u ** (1 / size_bias)``, so most objects are large.
        classes_by: ``"shape and colour"`` (``SYNTHETIC_CLASSES``: each class has its own shape and
            colour) or ``"shape and fill"`` (``VOC_LIKE_CLASSES``: square, disc and triangle, filled or
            outlined, each object in any of the six colours).
        max_distractors: unlabelled shapes of no class (diamonds and crosses, filled or outlined) per
            image, 0..max_distractors, drawn among the objects with the same sizes.
        max_occluders: unlabelled bars 4-10% of the short side wide per image, 0..max_occluders, drawn
            in front of the objects, so that objects are partly hidden (one more than half hidden is not
            labelled, as everywhere).
    """

    min_object_side: float = 10.0
    max_object_fraction: float = 0.75
    max_objects: int = 8
    max_strokes: int = 0
    size_bias: float = 1.0
    classes_by: str = "shape and colour"
    max_distractors: int = 0
    max_occluders: int = 0

    def __post_init__(self):
        if self.classes_by not in _CLASS_SHAPES:
            raise ValueError(f"classes_by must be one of {tuple(_CLASS_SHAPES)}, got {self.classes_by!r}")
        if self.size_bias <= 0:
            raise ValueError(f"size_bias must be positive, got {self.size_bias}")

    @property
    def classes(self) -> Tuple[str, ...]:
        """The class names of this scene, by label."""
        return SYNTHETIC_CLASSES if self.classes_by == "shape and colour" else VOC_LIKE_CLASSES


# A harder scene for accuracy benchmarks: more and smaller objects, so more overlaps, and clutter.
CROWDED_SCENE = SceneOptions(min_object_side=8.0, max_object_fraction=0.5, max_objects=12, max_strokes=6)
# Shaped like PASCAL VOC: one to four objects, most of them large (at 128 px, about half are wider than
# 64 px, a tenth narrower than 32), partly hidden by each other and by bars in front of them, classes told
# apart by shape and fill rather than colour, and distractor shapes of no class among them.
VOC_LIKE_SCENE = SceneOptions(
    min_object_side=12.0,
    max_object_fraction=0.95,
    max_objects=4,
    max_strokes=4,
    size_bias=2.5,
    classes_by="shape and fill",
    max_distractors=2,
    max_occluders=2,
)


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
        cache: keep each item once drawn (about 0.2 MB per 128-pixel image) and hand out copies of it.
            The items are deterministic, so only speed changes: drawing one takes about 2 ms, a tenth
            of a small training step's time per image. For small sets, such as the notebooks' quick mode.
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
        cache: bool = False,
    ):
        if split not in _SYNTHETIC_SPLITS:
            raise ValueError(f"split must be one of {tuple(_SYNTHETIC_SPLITS)}, got {split!r}")
        self.split = split
        self.num_images = num_images
        self.image_size = image_size
        self.seed = seed
        self.scene = scene or SceneOptions()
        self.num_classes = len(self.scene.classes)
        self.idx_to_class = dict(enumerate(self.scene.classes))
        self.class_to_idx = {name: idx for idx, name in self.idx_to_class.items()}
        self._drawn: Optional[dict] = {} if cache else None

    def __len__(self) -> int:
        return self.num_images

    def image_generator(self, index: int) -> torch.Generator:
        """The generator that draws image ``index``."""
        return _scene_generator(self.seed, _SYNTHETIC_SPLITS[self.split], index)

    def __getitem__(self, index: int):
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        if self._drawn is not None and index in self._drawn:
            image_id, image, gt_boxes = self._drawn[index]
            return image_id, image.clone(), gt_boxes.clone()  # copies: a caller may change its item in place
        S = self.image_size
        image, gt_boxes, _ = _draw_scene(S, S, self.image_generator(index), self.scene)
        item = f"synthetic_{self.split}_{index:06d}", normalize_image(image), _pad_rows(gt_boxes)
        if self._drawn is not None:
            self._drawn[index] = (item[0], item[1].clone(), item[2].clone())
        return item


def _scene_generator(seed: int, stream: int, index: int) -> torch.Generator:
    """The generator of one scene; SeedSequence mixes (seed, stream, index) well, so streams never meet."""
    words = np.random.SeedSequence([seed, stream, index]).generate_state(2)
    return torch.Generator().manual_seed(int(words[0]) << 32 | int(words[1]))


def synthetic_photo(
    width: int, height: int, seed: int = 0, scene: Optional[SceneOptions] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """A synthetic scene of any shape with its ground truth: a stand-in photo whose answer is known.

    It is drawn as ``SyntheticDetection`` draws its square images, with object sides set by the short
    side (a 384 x 256 scene holds the objects of a 256 x 256 image, spread over the whole width), the
    same number of objects and the same labelling: an object less than half visible is not labelled.
    Its seed has a stream of its own ("photo"), so a photo is never an image of the train, val or test
    split, whatever their seeds.

    Args:
        width, height: W and H in pixels.
        seed: a non-negative int; different seeds give different scenes.
        scene: a ``SceneOptions`` (e.g. ``CROWDED_SCENE``); ``None`` for the standard scenes.
    Returns:
        image (3, H, W) float32 in [0, 1], not normalised (``save_image`` writes it to a file,
        ``normalize_image`` readies it for a detector); gt_boxes (N, 5) float32 rows
        ``(x1, y1, x2, y2, C)`` in pixels, tight around each labelled object's visible pixels, unpadded.
    """
    image, gt_boxes, _ = _draw_scene(height, width, _scene_generator(seed, _PHOTO_STREAM, 0), scene)
    return image, gt_boxes


# Preprocessed image cache

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


def _to_numpy(x: Any, dtype: Any = None) -> np.ndarray:
    if torch.is_tensor(x):
        x = x.detach().cpu()
        x = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
        x = x.numpy()
    return np.asarray(x, dtype=dtype)

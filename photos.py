"""Detecting objects in photos of any size and shape, and drawing what was found on them.

The data sets feed the detectors square crops; a photo is used whole instead. ``read_photo`` scales
it so that its short side has the size the detector was trained at (objects then look as large as
in training), unless its long side would pass ``max_side``; ``predict_photos`` pads a batch of such
images to a common size that is a multiple of 32 (the backbone's largest stride), runs the
detector's own batched ``predict`` (the one place where network outputs become boxes), and maps the
boxes back to each photo's own pixels, clipped to the photo. ``draw_detections`` draws them on the
original photo at its full resolution.

Imports: ``detection_data`` (normalisation), ``drawing`` (class colours), torch and PIL.
"""

import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps
from torch import nn
from torch.nn import functional as F
from torchvision.transforms.v2 import functional as TF

from common import NMS_THRESH, PICTURE_SCORE_THRESH
from detection_data import normalize_image
from drawing import _class_colour

PathLike = Union[str, os.PathLike]

# Files that a folder contributes; a file named explicitly is read whatever its extension.
PHOTO_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
SIZE_DIVISOR = 32  # the coarsest FPN level's stride: padded sides are multiples of it


def find_photos(paths: Sequence[PathLike]) -> List[str]:
    """Files as given, and the image files directly inside each folder (sorted by name).

    Raises:
        FileNotFoundError naming a path that does not exist; ValueError naming a folder that holds
        no image file.
    """
    found = []
    for path in map(os.fspath, paths):
        if os.path.isdir(path):
            inside = sorted(
                os.path.join(path, name)
                for name in os.listdir(path)
                if name.lower().endswith(PHOTO_EXTENSIONS) and os.path.isfile(os.path.join(path, name))
            )
            if not inside:
                raise ValueError(f"The folder {path!r} holds no image file ({', '.join(PHOTO_EXTENSIONS)}).")
            found += inside
        elif os.path.isfile(path):
            found.append(path)
        else:
            raise FileNotFoundError(f"No file or folder {path!r}.")
    return found


def check_photo(path: PathLike) -> None:
    """Raise OSError naming the file unless PIL recognises it as an image (reads the header only)."""
    try:
        with Image.open(path):
            pass
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise OSError(f"{os.fspath(path)!r} is not an image file that can be read ({error}).") from error


def open_photo(path: PathLike) -> Image.Image:
    """The photo as an RGB PIL image, turned upright as its EXIF orientation says (as cameras and
    phones store it). Raises OSError naming the file when it is not an image PIL can read."""
    try:
        with Image.open(path) as image:
            return ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise OSError(f"Could not read {os.fspath(path)!r} as an image ({error}).") from error


def network_size(width: int, height: int, short_side: int, max_side: Optional[int] = None) -> Tuple[int, int]:
    """``(width, height)`` of the detector's input for a photo: the short side becomes ``short_side``,
    or less when the long side would pass ``max_side``; the aspect ratio is kept."""
    scale = short_side / min(width, height)
    if max_side is not None:
        scale = min(scale, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def read_photo(
    path: PathLike, short_side: int, max_side: Optional[int] = None
) -> Tuple[torch.Tensor, Tuple[int, int], Tuple[float, float]]:
    """One photo as the detector takes it.

    Returns:
        ``image`` (3, h, w) float32 ImageNet-normalised (see ``network_size``); the photo's
        ``(width, height)``; and ``(scale_x, scale_y)``, the exact ratios of the network's sides to
        the photo's: a network point ``(x, y)`` is the photo point ``(x / scale_x, y / scale_y)``.
    """
    photo = open_photo(path)
    width, height = photo.size
    new_w, new_h = network_size(width, height, short_side, max_side)
    pixels = torch.from_numpy(np.array(photo)).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
    image = TF.resize(pixels, [new_h, new_w], antialias=True)
    return normalize_image(image), (width, height), (new_w / width, new_h / height)


def pad_to_batch(images: Sequence[torch.Tensor], divisor: int = SIZE_DIVISOR) -> torch.Tensor:
    """Stack (3, h_i, w_i) images into (B, 3, H, W), padded at the right and bottom with zeros (the
    ImageNet mean colour after normalisation) to the largest sides rounded up to ``divisor``."""
    height = -(-max(image.shape[1] for image in images) // divisor) * divisor
    width = -(-max(image.shape[2] for image in images) // divisor) * divisor
    return torch.stack([F.pad(image, (0, width - image.shape[2], 0, height - image.shape[1])) for image in images])


def boxes_to_photo(
    boxes: torch.Tensor, scale: Tuple[float, float], photo_size: Tuple[int, int]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Network-input boxes (N, 4) -> the photo's pixels, clipped to the photo.

    Returns:
        ``(boxes (K, 4), keep (N,) bool)``: the boxes that keep a positive area inside the photo (a
        box that lay wholly in the padding is dropped) and which of the N they were.
    """
    scale_x, scale_y = scale
    width, height = photo_size
    # In float64, so that the network's edge lands on the photo's edge exactly after the division.
    photo_boxes = boxes.double() / boxes.new_tensor([scale_x, scale_y, scale_x, scale_y], dtype=torch.float64)
    photo_boxes[:, 0::2] = photo_boxes[:, 0::2].clamp(0, width)
    photo_boxes[:, 1::2] = photo_boxes[:, 1::2].clamp(0, height)
    photo_boxes = photo_boxes.to(boxes.dtype)
    keep = (photo_boxes[:, 2] > photo_boxes[:, 0]) & (photo_boxes[:, 3] > photo_boxes[:, 1])
    return photo_boxes[keep], keep


@torch.no_grad()
def predict_photos(
    detector: nn.Module,
    paths: Sequence[PathLike],
    short_side: int,
    max_side: Optional[int] = None,
    score_thresh: float = PICTURE_SCORE_THRESH,
    nms_thresh: float = NMS_THRESH,
    batch_size: int = 8,
    device: Union[str, torch.device] = "cpu",
) -> List[Dict[str, object]]:
    """Detect objects in whole photos, ``batch_size`` at a time.

    Args:
        detector: a detector in eval mode on ``device`` with the batched ``predict`` of this project.
        paths: image files (see ``find_photos`` for folders).
        short_side, max_side: the network size of each photo (``network_size``); ``short_side`` is
            normally the size the detector was trained at.
    Returns:
        One dict per photo, in order: ``{"path", "width", "height", "boxes" (N, 4) in the photo's
        pixels, "labels" (N,), "scores" (N,)}``, on the CPU, highest score first.
    """
    results = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        read = [read_photo(path, short_side, max_side) for path in chunk]
        images = pad_to_batch([image for image, _, _ in read]).to(device)
        predictions = detector.predict(images, score_thresh=score_thresh, nms_thresh=nms_thresh)
        for path, (_, photo_size, scale), prediction in zip(chunk, read, predictions):
            boxes, keep = boxes_to_photo(prediction["boxes"].float().cpu(), scale, photo_size)
            results.append(
                {
                    "path": os.fspath(path),
                    "width": photo_size[0],
                    "height": photo_size[1],
                    "boxes": boxes,
                    "labels": prediction["labels"].cpu()[keep],
                    "scores": prediction["scores"].float().cpu()[keep],
                }
            )
    return results


def upload_photo() -> str:
    """On Colab: open the browser's file picker and return the path of the uploaded photo (Colab saves
    it in the working folder). Elsewhere there is nothing to upload to: pass a path instead."""
    try:
        from google.colab import files
    except ImportError:
        raise RuntimeError("Uploading works on Colab only; elsewhere pass the path of a photo.") from None
    uploaded = files.upload()
    if not uploaded:
        raise RuntimeError("No photo was uploaded; run the cell again and choose a file.")
    return next(iter(uploaded))


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow before 10.1 has one bitmap font of one size
        return ImageFont.load_default()


def draw_detections(
    photo: Union[PathLike, Image.Image], prediction: Mapping[str, torch.Tensor], idx_to_class: Mapping[int, str]
) -> Image.Image:
    """The photo (a path or a PIL image) with each detection drawn at full resolution: a box in its
    class's colour and ``"class 0.87"`` above it. Line width and text grow with the photo."""
    image = open_photo(photo) if not isinstance(photo, Image.Image) else photo.convert("RGB")
    draw = ImageDraw.Draw(image)
    line = max(2, round(min(image.size) / 200))
    font = _font(max(10, round(min(image.size) / 30)))
    rows = zip(prediction["boxes"].tolist(), prediction["labels"].tolist(), prediction["scores"].tolist())
    taken = []  # label rectangles drawn so far: a label that would cover one moves down a line
    for box, label, score in sorted(rows, key=lambda row: row[2]):  # the most confident drawn last, on top
        colour = tuple(round(255 * c) for c in _class_colour(label)[:3])
        draw.rectangle(box, outline=colour, width=line)
        text = f"{idx_to_class.get(int(label), int(label))} {score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        width, height = right - left + 2 * line, bottom - top + 2 * line
        x, y = box[0], max(0, box[1] - height)
        while any(x < x2 and x1 < x + width and y < y2 and y1 < y + height for x1, y1, x2, y2 in taken):
            y += height
        taken.append((x, y, x + width, y + height))
        draw.rectangle((x, y, x + width, y + height), fill=colour)
        draw.text((x + line - left, y + line - top), text, fill=(0, 0, 0), font=font)
    return image

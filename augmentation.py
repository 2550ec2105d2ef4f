"""Training augmentation on whole batches: random horizontal flip, scale jitter with crop or pad, and a
mild photometric distortion, drawn from a generator of its own so that a checkpoint can hold its state.

It works on a batch as the detectors take it (after ``detection_data.prepare_images``): images
ImageNet-normalised on their device, ground truth ``(B, M, 5)`` padded with -1 rows. So it runs after the
uint8 image cache (the cache keeps serving the unaugmented images) and on the GPU where there is one. The
geometry goes through ``torchvision.transforms.v2``'s kernels on ``tv_tensors.BoundingBoxes`` (boxes follow
the pixels; ``ClampBoundingBoxes`` and ``SanitizeBoundingBoxes`` clip them and drop the degenerate ones).

Imports: torch, torchvision and ``detection_data``; no detector.
"""

from typing import Any, Dict, Mapping, Tuple

import torch
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from detection_data import IMAGENET_MEAN, IMAGENET_STD

# Drops boxes under 1 pixel wide or high after the geometry, as the data sets do.
_CLIP_AND_DROP = v2.Compose([v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(min_size=1)])


class BatchAugmentation:
    """Random flip, scale jitter and photometric distortion of a training batch, each image its own draw.

    Every random number comes from ``self.generator`` (a CPU ``torch.Generator``), drawn on the CPU
    whatever the batch's device, so that the same seed gives the same batch on any device and from the
    cache or the files; ``state_dict`` / ``load_state_dict`` carry it through a checkpoint.

    Args:
        flip: mirror each image left-right with probability 1/2.
        scale_range: ``(low, high)``: each image is scaled about its centre by a factor drawn
            log-uniformly from this range and shifted at random; above 1 it is cropped to the frame,
            below 1 padded with the mean colour (0 after normalisation). ``(1, 1)`` switches it off.
        photometric: brightness, contrast and saturation factors are drawn from
            ``[1 - photometric, 1 + photometric]``; 0 switches it off.
        seed: seeds the generator.
    """

    def __init__(
        self,
        flip: bool = True,
        scale_range: Tuple[float, float] = (0.75, 1.33),
        photometric: float = 0.2,
        seed: int = 0,
    ):
        low, high = scale_range
        if not 0 < low <= high:
            raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {scale_range}")
        if not 0 <= photometric < 1:
            raise ValueError(f"photometric must be in [0, 1), got {photometric}")
        self.flip, self.scale_range, self.photometric = flip, (float(low), float(high)), float(photometric)
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, images: torch.Tensor, gt_boxes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Augment a batch.

        Args:
            images: (B, 3, H, W) float ImageNet-normalised, on any device.
            gt_boxes: (B, M, 5) rows ``(x1, y1, x2, y2, C)``, padding rows -1, on the same device.
        Returns:
            images (B, 3, H, W) and gt_boxes (B, M, 5): boxes moved with the pixels, those cut off the
            image dropped, the kept rows first and padding after.
        """
        B = images.shape[0]
        # Always the same draws per batch, whatever is switched off, so that the stream stays aligned.
        draws = torch.rand(B, 7, generator=self.generator).to(images.device)
        flip = (draws[:, 0] < 0.5) & self.flip
        images, gt_boxes = _flip_batch(images, gt_boxes, flip)
        images, gt_boxes = self._scale_jitter(images, gt_boxes, draws[:, 1:4].cpu())
        images = self._photometric_batch(images, 1 + self.photometric * (2 * draws[:, 4:7] - 1))
        return images, gt_boxes

    def _scale_jitter(
        self, images: torch.Tensor, gt_boxes: torch.Tensor, draws: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Scale each image about its centre and shift it, with v2's affine kernels.

        One image at a time: the kernels take one set of parameters. The loop runs over the 8-16 images
        of a batch, and every kernel runs on the batch's device.
        """
        low, high = self.scale_range
        if low == high == 1:
            return images, gt_boxes
        _, _, H, W = images.shape
        scales = low * (high / low) ** draws[:, 0]  # log-uniform, so x0.75 and x1.33 are equally likely
        # Shifts that keep the frame inside the scaled image (zoom in) or the image inside the frame (out).
        shifts = (2 * draws[:, 1:] - 1) * (scales[:, None] - 1).abs() / 2 * torch.tensor([W, H])
        out_images, out_boxes = torch.empty_like(images), torch.full_like(gt_boxes, -1.0)
        for b, (scale, (dx, dy)) in enumerate(zip(scales.tolist(), shifts.tolist())):
            affine = dict(angle=0.0, translate=[dx, dy], scale=scale, shear=[0.0, 0.0])
            out_images[b] = TF.affine(images[b], **affine, interpolation=InterpolationMode.BILINEAR, fill=0.0)
            real = gt_boxes[b, :, 4] >= 0
            boxes = tv_tensors.BoundingBoxes(gt_boxes[b, real, :4], format="XYXY", canvas_size=(H, W))
            moved = _CLIP_AND_DROP({"boxes": TF.affine(boxes, **affine), "labels": gt_boxes[b, real, 4]})
            kept = len(moved["labels"])
            out_boxes[b, :kept] = torch.cat([moved["boxes"].as_subclass(torch.Tensor), moved["labels"][:, None]], 1)
        return out_images, out_boxes

    def _photometric_batch(self, images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
        """Brightness, contrast, saturation with one factor each per image: (B, 3, H, W), factors (B, 3)."""
        if self.photometric == 0:
            return images
        mean = torch.tensor(IMAGENET_MEAN, device=images.device)[:, None, None]
        std = torch.tensor(IMAGENET_STD, device=images.device)[:, None, None]
        rgb = images * std + mean  # back to [0, 1], where the factors mean what they say
        brightness, contrast, saturation = (factors[:, k, None, None, None] for k in range(3))
        rgb = rgb * brightness
        gray = _luma(rgb)
        rgb = gray.mean((2, 3), keepdim=True) + contrast * (rgb - gray.mean((2, 3), keepdim=True))
        gray = _luma(rgb)
        rgb = (gray + saturation * (rgb - gray)).clamp(0, 1)
        return (rgb - mean) / std

    def state_dict(self) -> Dict[str, Any]:
        """The generator's state and the settings (tensors and plain values: loadable with ``weights_only``)."""
        return {
            "generator": self.generator.get_state(),
            "flip": self.flip,
            "scale_range": list(self.scale_range),
            "photometric": self.photometric,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the saved random stream; the settings must be the saved ones."""
        self.check_settings(state)
        self.generator.set_state(state["generator"])

    def check_settings(self, state: Mapping[str, Any]) -> None:
        """Raise a ValueError when ``state`` (from ``state_dict``) was saved with other settings."""
        saved = (state["flip"], tuple(state["scale_range"]), state["photometric"])
        if saved != (self.flip, self.scale_range, self.photometric):
            raise ValueError(
                f"the checkpoint's augmentation was flip={saved[0]}, scale_range={saved[1]}, photometric={saved[2]}, "
                f"this one is flip={self.flip}, scale_range={self.scale_range}, photometric={self.photometric}; "
                "resume with the same settings."
            )


def _luma(rgb: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) grey values, ITU-R 601-2 weights as torchvision's ``rgb_to_grayscale``."""
    weights = torch.tensor([0.2989, 0.587, 0.114], device=rgb.device)[:, None, None]
    return (rgb * weights).sum(1, keepdim=True)


def _flip_batch(images: torch.Tensor, gt_boxes: torch.Tensor, flip: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mirror the images where ``flip`` (B,) bool is set, and their real boxes with them (one v2 call each)."""
    B, M, _ = gt_boxes.shape
    H, W = images.shape[-2:]
    boxes = tv_tensors.BoundingBoxes(gt_boxes[..., :4].reshape(B * M, 4), format="XYXY", canvas_size=(H, W))
    mirrored = TF.horizontal_flip(boxes).as_subclass(torch.Tensor).reshape(B, M, 4)
    moved = flip[:, None] & (gt_boxes[..., 4] >= 0)  # (B, M): padding rows stay -1
    gt_boxes = torch.where(moved[..., None], torch.cat([mirrored, gt_boxes[..., 4:]], -1), gt_boxes)
    return torch.where(flip[:, None, None, None], TF.horizontal_flip(images), images), gt_boxes

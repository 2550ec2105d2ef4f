"""Tests of augmentation.BatchAugmentation: boxes follow the pixels, cut-off boxes are dropped, the random
stream is reproducible and resumable, and the uint8 cache and the image files give the same augmented batch."""

import pytest
import torch
from torch import nn
from torch.testing import assert_close
from torch.utils.data import DataLoader

from augmentation import BatchAugmentation
from detection_data import IMAGENET_STD, PreprocessedCache, SyntheticDetection
from training import train_detector


def _rectangles(B=8, H=64, W=64):
    """B images, each black with one bright rectangle at (20, 10, 50, 30), its box and three padding rows."""
    images = torch.zeros(B, 3, H, W)
    images[:, :, 10:30, 20:50] = 5.0
    gt_boxes = torch.full((B, 4, 5), -1.0)
    gt_boxes[:, 0] = torch.tensor([20.0, 10.0, 50.0, 30.0, 1.0])
    return images, gt_boxes


def _bright_extent(image):
    """(x1, y1, x2, y2) of the pixels brighter than half the rectangle, continuous coordinates."""
    bright = image[0] > 2.5
    xs, ys = bright.any(0).nonzero()[:, 0], bright.any(1).nonzero()[:, 0]
    return torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()


def test_flip_mirrors_pixels_and_boxes_of_about_half_the_images():
    images, gt_boxes = _rectangles()
    out_images, out_boxes = BatchAugmentation(scale_range=(1, 1), photometric=0.0, seed=0)(images, gt_boxes)
    flipped = out_boxes[:, 0, 0] != 20
    assert 0 < flipped.sum() < 8
    # W = 64: x1' = 64 - 50 = 14, x2' = 64 - 20 = 44; y and the class stay.
    assert_close(out_boxes[flipped, 0], torch.tensor([14.0, 10.0, 44.0, 30.0, 1.0]).expand(int(flipped.sum()), 5))
    assert torch.equal(out_images[flipped], images[flipped].flip(-1))
    assert torch.equal(out_images[~flipped], images[~flipped]) and (out_boxes[:, 1:] == -1).all()


def test_scale_jitter_moves_boxes_with_the_pixels():
    images, gt_boxes = _rectangles()
    out_images, out_boxes = BatchAugmentation(scale_range=(0.6, 1.6), photometric=0.0, seed=1)(images, gt_boxes)
    assert not torch.equal(out_boxes[:, 0], gt_boxes[:, 0])
    for b in range(8):  # bilinear edges blur by up to a pixel
        assert_close(_bright_extent(out_images[b]), out_boxes[b, 0, :4], rtol=0, atol=1.0)


def test_boxes_cut_off_by_the_crop_are_dropped_and_the_kept_rows_come_first():
    images, gt_boxes = _rectangles(B=16)
    gt_boxes[:, 1] = gt_boxes[:, 0]  # row 1: the rectangle again, row 2: a 16 x 16 box in the top-left corner
    gt_boxes[:, 0] = -1  # a padding row before the real ones
    gt_boxes[:, 2] = torch.tensor([0.0, 0.0, 16.0, 16.0, 4.0])
    _, out_boxes = BatchAugmentation(flip=False, scale_range=(2.0, 2.0), photometric=0.0, seed=0)(images, gt_boxes)
    real = out_boxes[..., 4] >= 0
    assert (real[:, :-1] >= real[:, 1:]).all()  # no padding before a real row
    widths, heights = (out_boxes[..., 2] - out_boxes[..., 0]), (out_boxes[..., 3] - out_boxes[..., 1])
    assert ((widths >= 1) & (heights >= 1))[real].all() and (out_boxes[..., :4][real] >= 0).all()
    assert (out_boxes[..., :4][real] <= 64).all()
    corner_kept = (out_boxes[..., 4] == 4).any(1)
    # x2 about the centre and a shift dx in [-32, 32]: x2 = 16 lands at 2 * 16 - 32 + dx = dx, so the corner
    # box stays when both shifts are >= 1 (about a quarter of the images) and is cut off otherwise.
    assert 0 < corner_kept.sum() < 16


def test_photometric_changes_colours_only_and_stays_in_range():
    images, gt_boxes = _rectangles()
    images = images.clamp(-2, 2)  # normalised values that are inside [0, 1] once denormalised
    out_images, out_boxes = BatchAugmentation(flip=False, scale_range=(1, 1), photometric=0.2, seed=0)(images, gt_boxes)
    assert torch.equal(out_boxes, gt_boxes) and not torch.equal(out_images, images)
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    rgb = out_images * std + torch.tensor((0.485, 0.456, 0.406))[:, None, None]
    assert rgb.min() >= -1e-6 and rgb.max() <= 1 + 1e-6


def test_same_seed_same_batch_and_the_state_continues_the_stream():
    images, gt_boxes = _rectangles()
    first, second = BatchAugmentation(seed=5), BatchAugmentation(seed=5)
    assert all(torch.equal(a, b) for a, b in zip(first(images, gt_boxes), second(images, gt_boxes)))
    state = first.state_dict()
    expected = first(images, gt_boxes)
    other = BatchAugmentation(seed=99)
    other.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(other(images, gt_boxes), expected))
    with pytest.raises(ValueError, match="resume with the same settings"):
        BatchAugmentation(photometric=0.0).load_state_dict(state)


@pytest.mark.parametrize("settings", [dict(scale_range=(1.2, 0.8)), dict(photometric=1.0)])
def test_bad_settings_are_refused_with_the_rule(settings):
    with pytest.raises(ValueError, match="must be"):
        BatchAugmentation(**settings)


class _Recorder(nn.Module):
    """Keeps the batches train_detector gives it; one weight so that there is something to update."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))
        self.batches = []

    def forward(self, images, gt_boxes):
        self.batches.append((images.clone(), gt_boxes.clone()))
        return {"loss": self.weight**2 + images.mean() * 0}


def test_cache_and_files_give_the_same_augmented_batches(tmp_path):
    source = SyntheticDetection("train", num_images=6, image_size=48, seed=2)
    cache = PreprocessedCache(source, tmp_path / "cache.pt")
    recorded = []
    for dataset, augment in ((source, False), (source, True), (cache, True)):
        recorder = _Recorder()
        loader = DataLoader(dataset, batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(0))
        augmentation = BatchAugmentation(seed=7) if augment else None
        train_detector(recorder, loader, max_iters=4, progress=False, augmentation=augmentation)
        recorded.append(recorder.batches)
    plain, from_files, from_cache = recorded
    assert any(not torch.equal(boxes, plain_boxes) for (_, boxes), (_, plain_boxes) in zip(from_files, plain))
    for (file_images, file_boxes), (cache_images, cache_boxes) in zip(from_files, from_cache):
        assert torch.equal(file_boxes, cache_boxes)
        # The cache holds whole 8-bit values: 0.5 / 255 / std <= 0.0089 per pixel before augmentation, at
        # most doubled by the photometric factors (each within 1 +- 0.2).
        assert_close(cache_images, file_images, rtol=0, atol=0.02)

"""Tests of detection_data: image normalisation, VOC 2007 read from a small data set in the official layout
(resize, centre crop, boxes moved, clipped and dropped, difficult flags, errors, download), the uint8 image cache,
the synthetic shapes and the synthetic photo.

Hand-computed values carry their arithmetic in a comment.
"""

import dataclasses
import functools
import os

import numpy as np
import pytest
import torch
from conftest import write_voc_annotation
from PIL import Image
from torch.testing import assert_close
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import functional as TF

import detection_data
from detection_data import (
    CROWDED_SCENE,
    SYNTHETIC_CLASSES,
    PreprocessedCache,
    SyntheticDetection,
    VOC2007DetectionTiny,
    denormalize_image,
    load_image,
    normalize_image,
    save_image,
    synthetic_photo,
)

# ---------------------------------------------------------------------------------------------
# Image normalisation
# ---------------------------------------------------------------------------------------------


def test_normalize_then_denormalize_gives_back_the_pixels():
    pixels = torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8)
    back = denormalize_image(normalize_image(pixels))
    assert back.shape == (5, 7, 3) and back.dtype == np.uint8
    np.testing.assert_array_equal(back, pixels.permute(1, 2, 0).numpy())


# ---------------------------------------------------------------------------------------------
# VOC 2007 on a small data set written in the official layout
# ---------------------------------------------------------------------------------------------

# (name, xmin, ymin, xmax, ymax, difficult) in VOC's 1-based inclusive pixels.
_VOC_FIXTURE = {
    # 300 wide x 200 high: left half red, right half blue.
    "000001": (
        (300, 200),
        [
            ("dog", 11, 21, 110, 120, 0),
            ("cat", 291, 51, 300, 100, 0),
            ("person", 101, 101, 200, 180, 1),
            ("bird", 1, 1, 60, 30, 0),
            ("boat", 1, 151, 50.8, 170, 0),
        ],
    ),
    "000002": ((150, 333), [("car", 31, 201, 120, 300, 0)]),  # portrait, odd height
    "000003": ((193, 257), []),  # no objects at all
    # VOC's most common size: its long side 500 * 224 / 375 = 298.67 rounds to 299 (v2.Resize would truncate
    # to 298) and the crop offset (299 - 224) / 2 = 37.5 is floored to 37 (v2.CenterCrop would round to 38).
    "000004": (
        (500, 375),
        [("horse", 1, 1, 500, 375, 0), ("sheep", 40, 300, 80, 370, 1), ("train", 480, 10, 500, 200, 0)],
    ),
}
_VOC_SPLIT_FILES = {
    "train": ["000001", "000002"],
    "val": ["000003"],
    "trainval": ["000001", "000002", "000003"],
    "test": ["000001", "000002", "000003", "000004"],
}


def _write_voc_fixture(dataset_dir, splits=_VOC_SPLIT_FILES):
    voc = os.path.join(dataset_dir, "VOCdevkit", "VOC2007")
    for folder in ("JPEGImages", "Annotations", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(voc, folder), exist_ok=True)
    for image_id, ((width, height), objects) in _VOC_FIXTURE.items():
        pixels = np.zeros((height, width, 3), np.uint8)
        pixels[:, : width // 2, 0] = 255
        pixels[:, width // 2 :, 2] = 255
        Image.fromarray(pixels).save(os.path.join(voc, "JPEGImages", f"{image_id}.jpg"), quality=95)
        write_voc_annotation(os.path.join(voc, "Annotations", f"{image_id}.xml"), (width, height), objects)
    for split, ids in splits.items():
        with open(os.path.join(voc, "ImageSets", "Main", f"{split}.txt"), "w") as file:
            file.write("".join(i + "\n" for i in ids))
    return voc


@pytest.fixture(scope="module")
def voc_dir(tmp_path_factory):
    dataset_dir = tmp_path_factory.mktemp("voc")
    _write_voc_fixture(dataset_dir)
    return dataset_dir


def test_voc_classes_are_the_20_names_in_alphabetical_order(voc_dir):
    dataset = VOC2007DetectionTiny(voc_dir, "train")
    names = [dataset.idx_to_class[i] for i in range(20)]
    assert names == sorted(names) and names[0] == "aeroplane" and names[19] == "tvmonitor"
    assert dataset.class_to_idx["dog"] == 11 and len(dataset) == 2


def test_voc_landscape_image_boxes_resized_cropped_clipped_and_dropped(voc_dir):
    path, image, gt_boxes = VOC2007DetectionTiny(voc_dir, "train")[0]
    assert path.endswith(os.path.join("JPEGImages", "000001.jpg"))
    assert image.shape == (3, 224, 224) and image.dtype == torch.float32 and gt_boxes.shape == (40, 5)
    # 300x200 -> short side 224: scale 224/200 = 1.12, resized 336x224, crop left (336-224)//2 = 56.
    # dog (11,21,110,120) -> continuous (10,20,110,120) -> x: 10*1.12-56 = -44.8 -> 0, 110*1.12-56 = 67.2;
    #   y: 20*1.12 = 22.4, 120*1.12 = 134.4.
    # cat (290..300 continuous) -> x 268.8..280 -> clipped to 224..224: cropped away.
    # person is difficult: dropped.
    # bird (0,0,60,30) -> x -56 -> 0, 60*1.12-56 = 11.2; y 0, 33.6.
    # boat (0,150,50.8,170) -> x2 = 50.8*1.12-56 = 0.896: narrower than 1 pixel, dropped.
    expected = torch.tensor([[0.0, 22.4, 67.2, 134.4, 11], [0.0, 0.0, 11.2, 33.6, 2]])
    assert_close(gt_boxes[:2], expected, rtol=0, atol=1e-4)
    assert (gt_boxes[2:] == -1).all()


def test_voc_portrait_image_box_arithmetic(voc_dir):
    _, _, gt_boxes = VOC2007DetectionTiny(voc_dir, "train")[1]
    # 150x333 -> scale_x 224/150; height round(333*224/150) = round(497.28) = 497, so scale_y = 497/333;
    # crop top (497-224)//2 = 136. car (30,200,120,300) -> x 44.8, 179.2;
    # y 200*497/333-136 = 162.4985, 300*497/333-136 = 311.75 -> 224.
    expected = torch.tensor([[30 * 224 / 150, 200 * 497 / 333 - 136, 120 * 224 / 150, 224.0, 6]])
    assert_close(gt_boxes[:1], expected, rtol=0, atol=1e-4)
    assert (gt_boxes[1:] == -1).all()


def test_voc_pixels_move_like_the_boxes(voc_dir):
    _, image, _ = VOC2007DetectionTiny(voc_dir, "train")[0]
    # The red/blue edge at x = 150 moves to 150*1.12 - 56 = 112 after resize and crop.
    rgb = denormalize_image(image).astype(int)
    assert rgb[100, 100, 0] > 200 and rgb[100, 100, 2] < 50
    assert rgb[100, 124, 2] > 200 and rgb[100, 124, 0] < 50


def _items_as_before_transforms_v2(voc_dir, image_id, image_size, keep_difficult):
    """A frozen copy of the data set's arithmetic before it moved to ``transforms.v2``: the long side
    rounded, the crop offset floored, boxes scaled by the exact side ratios, shifted, clipped to [0, S]
    and dropped under 1 pixel. Returns (image (3, S, S) normalised, gt rows (N, 5), difficult (N,))."""
    S, ((W, H), objects) = image_size, _VOC_FIXTURE[image_id]
    path = os.path.join(voc_dir, "VOCdevkit", "VOC2007", "JPEGImages", f"{image_id}.jpg")
    pixels = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
    new_w, new_h = max(S, round(W * S / min(W, H))), max(S, round(H * S / min(W, H)))
    left, top = (new_w - S) // 2, (new_h - S) // 2
    image = TF.resize(pixels, [new_h, new_w], antialias=True)[:, top : top + S, left : left + S]
    rows, flags = [], []
    for name, x1, y1, x2, y2, difficult in objects:
        x1, x2 = (min(max(x * new_w / W - left, 0), S) for x in (x1 - 1, x2))
        y1, y2 = (min(max(y * new_h / H - top, 0), S) for y in (y1 - 1, y2))
        if x2 - x1 >= 1 and y2 - y1 >= 1 and (keep_difficult or not difficult):
            rows.append([x1, y1, x2, y2, detection_data.VOC_CLASSES.index(name)])
            flags.append(bool(difficult))
    return normalize_image(image), torch.tensor(rows).reshape(-1, 5), torch.tensor(flags, dtype=torch.bool)


@pytest.mark.parametrize("keep_difficult", [False, True], ids=["training", "evaluation"])
@pytest.mark.parametrize("image_size", [224, 96])
def test_voc_items_through_transforms_v2_are_the_items_of_before(voc_dir, image_size, keep_difficult):
    dataset = VOC2007DetectionTiny(voc_dir, "test", image_size=image_size, return_difficult=keep_difficult)
    for index, image_id in enumerate(_VOC_SPLIT_FILES["test"]):
        image, rows, flags = _items_as_before_transforms_v2(voc_dir, image_id, image_size, keep_difficult)
        item = dataset[index]
        assert_close(item[1], image, rtol=0, atol=1e-4)
        assert_close(item[2][: len(rows)], rows, rtol=0, atol=1e-3)
        assert (item[2][len(rows) :] == -1).all()
        if keep_difficult:
            assert torch.equal(item[3][: len(rows)], flags) and not item[3][len(rows) :].any()


def test_voc_transform_is_a_v2_pipeline_that_load_image_shares(voc_dir):
    dataset = VOC2007DetectionTiny(voc_dir, "test")
    names = [type(step).__name__ for step in dataset.transform.transforms]
    assert names == ["ResizeShortSideCenterCrop", "ClampBoundingBoxes", "SanitizeBoundingBoxes"]
    assert_close(load_image(dataset.image_paths[3]), dataset[3][1], rtol=0, atol=0)
    assert not hasattr(detection_data, "_resize_center_crop") and not hasattr(detection_data, "_crop_boxes")


def test_voc_image_without_objects_is_all_padding(voc_dir):
    _, image, gt_boxes = VOC2007DetectionTiny(voc_dir, "val")[0]
    assert image.shape == (3, 224, 224) and (gt_boxes == -1).all()


def test_voc_return_difficult_keeps_difficult_objects_flagged(voc_dir):
    path, image, gt_boxes, difficult = VOC2007DetectionTiny(voc_dir, "train", return_difficult=True)[0]
    # person (100,100,200,180) -> x 100*1.12-56 = 56, 200*1.12-56 = 168; y 112, 201.6
    assert_close(gt_boxes[1], torch.tensor([56.0, 112.0, 168.0, 201.6, 14]), rtol=0, atol=1e-4)
    assert difficult.dtype == torch.bool and difficult.shape == (40,)
    assert difficult[:3].tolist() == [False, True, False] and not difficult[3:].any()
    assert (gt_boxes[3:] == -1).all()


def test_image_cache_without_difficult_flags_is_rebuilt_for_a_source_with_them(voc_dir, tmp_path):
    path = tmp_path / "train.pt"
    PreprocessedCache(VOC2007DetectionTiny(voc_dir, "train", image_size=64), path, source_key="train")
    flagged = VOC2007DetectionTiny(voc_dir, "train", image_size=64, return_difficult=True)
    with pytest.warns(UserWarning, match="another data set"):  # same source_key, but items with flags
        cache = PreprocessedCache(flagged, path, source_key="train")
    _, _, gt_boxes, difficult = cache[0]
    assert torch.equal(gt_boxes, flagged[0][2]) and torch.equal(difficult, flagged[0][3]) and difficult.any()


def test_voc_batches_with_the_default_collate(voc_dir):
    paths, images, gt_boxes = next(iter(DataLoader(VOC2007DetectionTiny(voc_dir, "trainval", image_size=96), 2)))
    assert len(paths) == 2 and all(isinstance(p, str) for p in paths)
    assert images.shape == (2, 3, 96, 96) and gt_boxes.shape == (2, 40, 5)


def test_voc_without_data_names_the_folder_and_how_to_download(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        VOC2007DetectionTiny(tmp_path / "nowhere", "test")
    assert str(tmp_path / "nowhere") in str(error.value) and "download=True" in str(error.value)
    assert "VOCtest_06-Nov-2007.tar" in str(error.value)


def test_voc_corrupt_image_error_names_the_file(tmp_path):
    voc = _write_voc_fixture(tmp_path)
    broken = os.path.join(voc, "JPEGImages", "000002.jpg")
    with open(broken, "wb") as file:
        file.write(b"\xff\xd8\xff\xe0 this is not a JPEG")
    dataset = VOC2007DetectionTiny(tmp_path, "train")
    with pytest.raises(OSError, match="000002.jpg"):
        dataset[1]


def test_voc_download_fetches_the_checksummed_official_archive(tmp_path, monkeypatch):
    calls = []

    def fake_download(url, download_root, filename=None, md5=None, **kwargs):
        calls.append((url, filename, md5))
        _write_voc_fixture(download_root, {"test": ["000001", "000003"]})

    monkeypatch.setattr("torchvision.datasets.voc.download_and_extract_archive", fake_download)
    dataset = VOC2007DetectionTiny(tmp_path, "test", download=True)
    assert len(dataset) == 2 and len(calls) == 1
    url, filename, md5 = calls[0]
    assert filename == "VOCtest_06-Nov-2007.tar" and url.endswith(filename)
    assert md5 == "b6e924de25625d8de591ea690078ad9f"
    VOC2007DetectionTiny(tmp_path, "test", download=True)  # present now: no second download
    assert len(calls) == 1


# ---------------------------------------------------------------------------------------------
# Synthetic shapes
# ---------------------------------------------------------------------------------------------


def test_synthetic_items_are_deterministic_and_splits_differ():
    train = SyntheticDetection("train", num_images=4, image_size=64, seed=1)
    again = SyntheticDetection("train", num_images=4, image_size=64, seed=1)
    assert_close(train[2][1], again[2][1], rtol=0, atol=0)
    assert_close(train[2][2], again[2][2], rtol=0, atol=0)
    assert train[2][0] == "synthetic_train_000002"
    val = SyntheticDetection("val", num_images=4, image_size=64, seed=1)
    other_seed = SyntheticDetection("train", num_images=4, image_size=64, seed=2)
    assert not torch.equal(train[2][1], val[2][1]) and not torch.equal(train[2][1], other_seed[2][1])
    with pytest.raises(IndexError):
        train[4]


@pytest.mark.parametrize("image_size", [64, 224, 512])
def test_synthetic_item_format(image_size):
    dataset = SyntheticDetection("train", num_images=3, image_size=image_size)
    assert dataset.num_classes == len(SYNTHETIC_CLASSES) == len(dataset.idx_to_class)
    assert dataset.class_to_idx[dataset.idx_to_class[2]] == 2
    for index in range(3):
        _, image, gt_boxes = dataset[index]
        assert image.shape == (3, image_size, image_size) and image.dtype == torch.float32
        assert gt_boxes.shape == (40, 5) and gt_boxes.dtype == torch.float32
        real = gt_boxes[:, 4] >= 0
        assert 1 <= real.sum() <= 8 and (gt_boxes[~real] == -1).all()
        boxes = gt_boxes[real]
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:4] <= image_size).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert (boxes[:, 4] < dataset.num_classes).all() and (boxes[:, 4] == boxes[:, 4].round()).all()


@pytest.mark.parametrize("height, width", [(96, 96), (64, 112)], ids=["square", "wide"])
def test_synthetic_boxes_are_tight_around_visible_pixels(height, width):
    # A wide scene catches x and y swapped anywhere between the drawing and the boxes.
    for seed in range(20):
        image, gt_boxes, owner = detection_data._draw_scene(height, width, torch.Generator().manual_seed(seed))
        assert image.shape == (3, height, width) and owner.shape == (height, width)
        extents = set()
        for k in owner.unique()[1:].tolist():  # skip the background (-1)
            ys, xs = torch.nonzero(owner == k, as_tuple=True)
            extents.add((xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1))
        for box in gt_boxes[:, :4].int().tolist():
            assert tuple(box) in extents


def test_synthetic_object_sizes_reach_every_fpn_level():
    dataset = SyntheticDetection("train", num_images=40, image_size=224)
    boxes = torch.cat([dataset[i][2] for i in range(40)])
    boxes = boxes[boxes[:, 4] >= 0]
    sides = torch.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    # p3 wants objects below ~64 px, p5 above ~128 px (FCOS ranges on max(l, t, r, b)).
    assert (sides < 20).any() and ((sides > 64) & (sides < 128)).any() and (sides > 140).any()
    assert len(boxes[:, 4].unique()) == len(SYNTHETIC_CLASSES)


# Pinned before the drawing helpers took a height and a width (they took one side S): the square data sets
# must stay what they were, to the bit. If a change to the drawing moves these, the data sets have changed.
_PINNED_SQUARE_ITEMS = {
    ("train", None, 0): (
        13927.372286068428,
        [[46, 53, 118, 122, 1], [20, 53, 46, 94, 2], [89, 27, 125, 56, 0], [44, 22, 64, 38, 2], [5, 55, 17, 74, 4]]
        + [[73, 117, 85, 127, 3]],
    ),
    ("train", None, 5): (
        735.0329793287729,
        [[68, 8, 126, 104, 0], [28, 65, 109, 123, 4], [19, 30, 100, 82, 1], [68, 27, 121, 58, 2], [68, 32, 99, 52, 2]]
        + [[87, 116, 98, 125, 2], [69, 51, 80, 62, 1]],
    ),
    ("val", CROWDED_SCENE, 0): (  # strokes and a crowd
        11043.614711299131,
        [[9, 65, 63, 111, 1], [57, 31, 84, 71, 2], [32, 94, 57, 125, 2], [56, 66, 67, 85, 5], [41, 34, 51, 50, 1]]
        + [[74, 55, 87, 68, 0], [12, 111, 24, 124, 4], [112, 76, 123, 87, 1], [113, 45, 127, 53, 4]],
    ),
}


@pytest.mark.parametrize("split, scene, index", list(_PINNED_SQUARE_ITEMS), ids=["train0", "train5", "crowded_val0"])
def test_synthetic_square_items_are_the_pinned_ones(split, scene, index):
    image_sum, boxes = _PINNED_SQUARE_ITEMS[(split, scene, index)]
    _, image, gt_boxes = SyntheticDetection(split, num_images=8, image_size=128, scene=scene)[index]
    # The sum of the normalised image, in float64; any redrawn pixel moves it by far more than 1e-3.
    assert_close(image.double().sum().item(), image_sum, rtol=0, atol=1e-3)
    assert_close(gt_boxes[: len(boxes)], torch.tensor(boxes, dtype=torch.float32), rtol=0, atol=0)
    assert (gt_boxes[len(boxes) :] == -1).all()


# ---------------------------------------------------------------------------------------------
# Synthetic photo
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("width, height", [(384, 256), (160, 240)], ids=["landscape", "portrait"])
def test_synthetic_photo_shapes_and_boxes_inside(width, height):
    for seed in range(5):
        image, gt_boxes = synthetic_photo(width, height, seed=seed)
        assert image.shape == (3, height, width) and image.dtype == torch.float32
        assert image.min() >= 0 and image.max() <= 1  # not normalised
        assert gt_boxes.ndim == 2 and gt_boxes.shape[1] == 5 and gt_boxes.dtype == torch.float32
        assert 1 <= len(gt_boxes) <= 8  # unpadded
        assert (gt_boxes[:, :2] >= 0).all() and (gt_boxes[:, 2] <= width).all() and (gt_boxes[:, 3] <= height).all()
        assert (gt_boxes[:, 2] > gt_boxes[:, 0]).all() and (gt_boxes[:, 3] > gt_boxes[:, 1]).all()
        assert ((gt_boxes[:, 4] >= 0) & (gt_boxes[:, 4] < len(SYNTHETIC_CLASSES))).all()


def test_synthetic_photo_is_deterministic_per_seed_and_differs_across_seeds():
    image, gt_boxes = synthetic_photo(192, 128, seed=7)
    again, again_boxes = synthetic_photo(192, 128, seed=7)
    assert torch.equal(image, again) and torch.equal(gt_boxes, again_boxes)
    assert not torch.equal(image, synthetic_photo(192, 128, seed=8)[0])


def test_synthetic_photo_at_width_equal_height_is_the_data_sets_drawing(monkeypatch):
    dataset = SyntheticDetection("train", num_images=1, image_size=96, scene=CROWDED_SCENE)
    photo_generator = functools.partial(detection_data._scene_generator, 3, detection_data._PHOTO_STREAM, 0)
    monkeypatch.setattr(dataset, "image_generator", lambda index: photo_generator())
    _, image, gt_boxes = dataset[0]
    photo, photo_boxes = synthetic_photo(96, 96, seed=3, scene=CROWDED_SCENE)
    assert_close(normalize_image(photo), image, rtol=0, atol=0)
    assert_close(photo_boxes, gt_boxes[: len(photo_boxes)], rtol=0, atol=0)
    assert (gt_boxes[len(photo_boxes) :] == -1).all()


def test_synthetic_photo_is_no_image_of_a_split():
    # The photo's seed stream is its own: seed 0 is neither train, val nor test image 0 of seed 0.
    photo, _ = synthetic_photo(96, 96, seed=0)
    for split in ("train", "val", "test"):
        _, image, _ = SyntheticDetection(split, num_images=1, image_size=96, seed=0)[0]
        assert not torch.equal(normalize_image(photo), image)


def test_synthetic_photo_objects_follow_the_short_side_and_fill_the_width():
    boxes = torch.cat([synthetic_photo(384, 128, seed=seed)[1] for seed in range(30)])
    sides = torch.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    # Sides up to 0.75 * 128 = 96 px (the short side's), plus at most 1 px of rounding to whole pixels;
    # a scene sized by its long side would reach 0.75 * 384 = 288.
    assert sides.max() <= 97 and (sides > 64).any()
    # Centres spread over the whole width, not only over its first 128 px.
    centres = (boxes[:, 0] + boxes[:, 2]) / 2
    assert (centres < 128).any() and ((centres > 128) & (centres < 256)).any() and (centres > 256).any()


def test_save_image_then_read_gives_back_the_bytes(tmp_path):
    image, _ = synthetic_photo(48, 32, seed=1)
    save_image(image, tmp_path / "photo.png")
    read = detection_data._read_rgb(tmp_path / "photo.png")
    assert read.shape == (3, 32, 48) and read.dtype == torch.uint8
    assert torch.equal(read, (image * 255).round().to(torch.uint8))
    save_image(read, tmp_path / "again.png")  # uint8 is written as it is
    assert torch.equal(detection_data._read_rgb(tmp_path / "again.png"), read)


def test_a_cached_synthetic_set_draws_each_image_once_and_hands_out_copies(monkeypatch):
    plain = SyntheticDetection("train", num_images=3, image_size=64)
    cached = SyntheticDetection("train", num_images=3, image_size=64, cache=True)
    draws = []
    drawer = detection_data._draw_scene
    monkeypatch.setattr(detection_data, "_draw_scene", lambda *args: draws.append(args) or drawer(*args))
    first = cached[1]
    first[1].zero_()  # a caller that changes its item in place must not change the cache
    first[2].fill_(-1)
    second = cached[1]
    assert len(draws) == 1, "drawn once, then read from memory"
    for want, got in zip(plain[1], second):
        assert want == got if isinstance(want, str) else torch.equal(want, got)


# ---------------------------------------------------------------------------------------------
# The VOC-shaped scene
# ---------------------------------------------------------------------------------------------


def test_the_voc_like_scene_holds_few_objects_mostly_large_named_by_shape_and_fill():
    dataset = SyntheticDetection("train", num_images=200, image_size=128, seed=5, scene=detection_data.VOC_LIKE_SCENE)
    assert dataset.idx_to_class == dict(enumerate(detection_data.VOC_LIKE_CLASSES)) and dataset.num_classes == 6
    boxes = torch.cat([gt[gt[:, 4] >= 0] for _, _, gt in (dataset[i] for i in range(len(dataset)))])
    sides = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sqrt()
    assert 1.5 <= len(boxes) / len(dataset) <= 2.5, "one to four objects drawn, some hidden by others"
    assert (sides >= 64).float().mean() >= 0.4 and (sides < 32).float().mean() <= 0.2, "most objects are large"
    assert set(boxes[:, 4].int().tolist()) == set(range(6))


def test_in_the_voc_like_scene_colour_does_not_tell_the_class():
    palette = detection_data._SYNTHETIC_COLOURS
    colours_of = {label: set() for label in range(6)}
    for seed in range(60):
        objects = detection_data._sample_objects(
            128, 128, torch.Generator().manual_seed(seed), detection_data.VOC_LIKE_SCENE
        )
        for label, colour in zip(objects["labels"].tolist(), objects["colours"]):
            if label >= 0:
                colours_of[label].add(int((palette - colour).norm(dim=1).argmin()))
    assert all(len(colours) >= 4 for colours in colours_of.values()), colours_of
    # In the standard scenes each class keeps its own colour.
    objects = detection_data._sample_objects(128, 128, torch.Generator().manual_seed(0), detection_data.SceneOptions())
    nearest = (palette[None] - objects["colours"][:, None]).norm(dim=2).argmin(1)
    assert torch.equal(nearest, objects["labels"])


def test_distractors_are_drawn_but_never_labelled():
    scene = detection_data.SceneOptions(max_objects=1, max_distractors=3, classes_by="shape and fill")
    distractors = 0
    for seed in range(30):
        objects = detection_data._sample_objects(96, 96, torch.Generator().manual_seed(seed), scene)
        is_distractor = objects["labels"] < 0
        distractors += int(is_distractor.sum())
        assert set(objects["shapes"][is_distractor].tolist()) <= {3, 5}, "diamonds and crosses: no class's shape"
        _, gt_boxes, owner = detection_data._draw_scene(96, 96, torch.Generator().manual_seed(seed), scene)
        assert len(gt_boxes) <= 1 and (gt_boxes[:, 4] >= 0).all()
    assert distractors >= 20


def test_occluders_hide_parts_of_the_objects_and_leave_them_where_they_were():
    plain = detection_data.SceneOptions(min_object_side=60, max_object_fraction=0.9, max_objects=2)
    occluded = dataclasses.replace(plain, max_occluders=3)
    hidden = 0
    for seed in range(20):
        image, boxes, owner = detection_data._draw_scene(96, 96, torch.Generator().manual_seed(seed), plain)
        image2, boxes2, owner2 = detection_data._draw_scene(96, 96, torch.Generator().manual_seed(seed), occluded)
        assert ((owner2 == owner) | (owner2 == -1)).all(), "bars only hide pixels, they move nothing"
        hidden += int(((owner >= 0) & (owner2 == -1)).sum())
        # A box shrinks or disappears when a bar hides an edge or more than half of the object; it never grows.
        for box in boxes2:
            same_object = boxes[boxes[:, 4] == box[4]]
            assert (
                len(same_object) and ((box[:2] >= same_object[:, :2]) & (box[2:4] <= same_object[:, 2:4])).all(1).any()
            )
    assert hidden > 0


@pytest.mark.parametrize(
    "options, message", [({"classes_by": "colour"}, "classes_by"), ({"size_bias": 0}, "size_bias")]
)
def test_scene_options_name_a_wrong_value(options, message):
    with pytest.raises(ValueError, match=message):
        detection_data.SceneOptions(**options)

"""Detection on whole photos (photos.py and 'detect.py predict'): sizes, padding, boxes back in the
photo's own pixels, folders, pictures."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import detect
import photos


class WholeInputDetector(nn.Module):
    """Finds one object that covers its whole (padded) input, and remembers the inputs it saw."""

    def __init__(self):
        super().__init__()
        self.inputs = []

    def predict(self, images, score_thresh, nms_thresh):
        self.inputs.append(images.clone())
        B, _, H, W = images.shape
        box = torch.tensor([[0.0, 0.0, W, H]])
        return [{"boxes": box, "labels": torch.tensor([1]), "scores": torch.tensor([0.9])} for _ in range(B)]


def _photo(path, width, height, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


@pytest.mark.parametrize(
    "width, height, short_side, max_side, expected",
    [
        (500, 375, 128, 256, (171, 128)),  # short side to 128
        (300, 800, 128, 256, (96, 256)),  # the long side would be 341: capped at 256
        (4000, 300, 128, 256, (256, 19)),
        (128, 128, 128, None, (128, 128)),
        (64, 48, 128, None, (171, 128)),  # small photos are enlarged
    ],
)
def test_network_size_keeps_the_aspect_ratio_within_the_limits(width, height, short_side, max_side, expected):
    assert photos.network_size(width, height, short_side, max_side) == expected


def test_a_batch_is_padded_at_the_right_and_bottom_to_multiples_of_32():
    a, b = torch.ones(3, 128, 171), torch.full((3, 40, 256), 2.0)
    batch = photos.pad_to_batch([a, b])
    assert batch.shape == (2, 3, 128, 256)
    assert torch.equal(batch[0, :, :, :171], a) and (batch[0, :, :, 171:] == 0).all()
    assert torch.equal(batch[1, :, :40], b) and (batch[1, :, 40:] == 0).all()


def test_boxes_come_back_in_the_photos_pixels_and_clipped_to_it():
    # A 500 x 375 photo at 171 x 128: scale 171/500 across and 128/375 down.
    scale = (171 / 500, 128 / 375)
    network_boxes = torch.tensor(
        [
            [17.1, 12.8, 85.5, 64.0],  # inside
            [150.0, 100.0, 250.0, 160.0],  # reaches into the padding
            [200.0, 10.0, 250.0, 50.0],  # wholly in the padding: dropped
        ]
    )
    boxes, keep = photos.boxes_to_photo(network_boxes, scale, (500, 375))
    assert keep.tolist() == [True, True, False]
    torch.testing.assert_close(boxes[0], torch.tensor([50.0, 37.5, 250.0, 187.5]))
    torch.testing.assert_close(boxes[1], torch.tensor([150 * 500 / 171, 100 * 375 / 128, 500.0, 375.0]))


@pytest.mark.parametrize("size", [(500, 375), (300, 800), (4000, 300)])
def test_a_box_over_the_whole_network_input_is_the_whole_photo(tmp_path, size):
    path = _photo(tmp_path / "photo.png", *size)
    detector = WholeInputDetector()
    [result] = photos.predict_photos(detector, [path], short_side=128, max_side=256)
    assert (result["width"], result["height"]) == size
    assert result["boxes"].tolist() == [[0.0, 0.0, float(size[0]), float(size[1])]]
    [network_input] = detector.inputs
    assert network_input.shape[-2] % 32 == 0 and network_input.shape[-1] % 32 == 0


def test_photos_are_read_whole_upright_and_batched(tmp_path):
    wide, tall = _photo(tmp_path / "wide.png", 200, 100), _photo(tmp_path / "tall.png", 100, 200, seed=1)
    # A camera's portrait photo: stored 200 x 100 with EXIF orientation 6 (rotate 90 degrees to show).
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(wide).save(tmp_path / "portrait.jpg", exif=exif)
    assert photos.open_photo(tmp_path / "portrait.jpg").size == (100, 200)

    detector = WholeInputDetector()
    paths = [wide, tall, str(tmp_path / "portrait.jpg")]
    results = photos.predict_photos(detector, paths, short_side=64, max_side=128, batch_size=2)
    assert [r["path"] for r in results] == paths
    assert [(r["width"], r["height"]) for r in results] == [(200, 100), (100, 200), (100, 200)]
    assert [len(batch) for batch in detector.inputs] == [2, 1]
    # The wide photo (128 x 64 at the input) fills the top of the first batch's 128 x 128 canvas; below is padding.
    first = detector.inputs[0][0]
    assert first.shape == (3, 128, 128) and (first[:, 64:] == 0).all() and (first[:, :64] != 0).any()


def test_find_photos_takes_files_and_folders(tmp_path):
    folder = tmp_path / "album"
    folder.mkdir()
    b, a = _photo(folder / "b.JPG", 8, 8), _photo(folder / "a.png", 8, 8)
    (folder / "notes.txt").write_text("not a photo")
    single = _photo(tmp_path / "single.webp", 8, 8)
    assert photos.find_photos([single, str(folder)]) == [single, a, b]
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        photos.find_photos([str(tmp_path / "missing.jpg")])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no image file"):
        photos.find_photos([str(empty)])


def test_draw_detections_draws_on_the_photo_at_its_size(tmp_path):
    path = _photo(tmp_path / "photo.png", 300, 200)
    prediction = {"boxes": torch.tensor([[10.0, 50.0, 120.0, 150.0]]), "labels": torch.tensor([2])}
    prediction["scores"] = torch.tensor([0.87])
    picture = photos.draw_detections(path, prediction, {2: "circle"})
    assert picture.size == (300, 200)
    changed = np.asarray(picture) != np.asarray(Image.open(path).convert("RGB"))
    assert changed[100, 10].any() and not changed[100, 200].any()  # the box's left side drawn, elsewhere untouched


def _fake_checkpoint(tmp_path, monkeypatch):
    """'detect.py predict' on WholeInputDetector: a checkpoint file that load_detector is patched to read."""
    checkpoint = tmp_path / "checkpoint.pt"
    checkpoint.write_bytes(b"stand-in")
    config = detect.RunConfig(image_size=128, idx_to_class={0: "square", 1: "circle"})
    monkeypatch.setattr(detect, "load_detector", lambda path: (WholeInputDetector(), config))
    return str(checkpoint)


def test_predict_answers_in_each_photos_pixels_and_draws_pictures(tmp_path, monkeypatch, capsys):
    checkpoint = _fake_checkpoint(tmp_path, monkeypatch)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = _photo(tmp_path / "a" / "photo.png", 500, 375)
    second = _photo(tmp_path / "b" / "photo.png", 300, 800)
    out = tmp_path / "out"
    results = detect.main(["predict", "--checkpoint", checkpoint, first, str(tmp_path / "b"), "--out", str(out)])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [p["image"] for p in printed] == [first, second]
    assert printed[0]["detections"] == [{"class": "circle", "score": 0.9, "box": [0.0, 0.0, 500.0, 375.0]}]
    assert printed[1]["detections"][0]["box"] == [0.0, 0.0, 300.0, 800.0]
    written = json.loads((out / "predictions.json").read_text())
    assert written == results and [r["picture"] for r in written] == ["photo.jpg", "photo_2.jpg"]
    assert Image.open(out / "photo.jpg").size == (500, 375) and Image.open(out / "photo_2.jpg").size == (300, 800)

"""Tests for the speed features: the uint8 image cache, channels-last layout, mixed-precision
inference, compiling, and the batched NMS of the detectors."""

import os

import pytest
import torch
from torch.testing import assert_close

import a4_helper
import detect
import detection_data
from common import DetectorBackboneWithFPN
from one_stage_detector import FCOS
from two_stage_detector import RPN, FasterRCNN


def _small_detectors():
    torch.manual_seed(0)
    fcos = FCOS(6, 16, [16, 16], pretrained=False)
    backbone = DetectorBackboneWithFPN(16, pretrained=False)
    rpn = RPN(16, [16], batch_size_per_image=16, pre_nms_topk=50, post_nms_topk=20)
    rcnn = FasterRCNN(backbone, rpn, 6, stem_channels=[16], batch_size_per_image=16)
    return {"fcos": fcos, "faster_rcnn": rcnn}


def test_cache_keeps_the_source_items_rounded_to_bytes_and_is_reused(tmp_path):
    source = a4_helper.SyntheticDetection("val", num_images=5, image_size=64)
    path = tmp_path / "cache" / "val.pt"
    cache = a4_helper.PreprocessedCache(source, path, source_key="val")
    assert path.is_file() and len(cache) == 5 and cache.idx_to_class == source.idx_to_class
    for index in range(5):
        image_id, image, gt_boxes = cache[index]
        source_id, source_image, source_gt = source[index]
        assert image_id == source_id and image.dtype == torch.uint8 and image.shape == (3, 64, 64)
        assert torch.equal(gt_boxes, source_gt)
        # Back to the float input: within half a byte step of the source, in normalised units.
        assert (a4_helper.normalize_image(image) - source_image).abs().max() <= 0.5 / 255 / 0.224 + 1e-5
        assert torch.equal(torch.from_numpy(a4_helper.denormalize_image(image)), image.permute(1, 2, 0))

    modified = os.path.getmtime(path)
    again = a4_helper.PreprocessedCache(source, path, source_key="val")  # read back, not rebuilt
    assert os.path.getmtime(path) == modified and torch.equal(again.images, cache.images)


def test_cache_of_another_source_or_a_corrupt_file_is_rebuilt(tmp_path):
    path = tmp_path / "cache.pt"
    a4_helper.PreprocessedCache(a4_helper.SyntheticDetection("val", 3, 64), path, source_key="val")
    other = a4_helper.SyntheticDetection("train", 3, 64)
    with pytest.warns(UserWarning, match="another data set"):
        cache = a4_helper.PreprocessedCache(other, path, source_key="train")
    assert cache[0][0] == other[0][0]
    path.write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="could not be read"):
        cache = a4_helper.PreprocessedCache(other, path, source_key="train")
    assert len(cache) == 3


def test_cache_keeps_difficult_flags(tmp_path):
    class WithFlags(torch.utils.data.Dataset):
        idx_to_class = {0: "a"}

        def __len__(self):
            return 2

        def __getitem__(self, index):
            flags = torch.tensor([index == 1, False])
            return f"im{index}", torch.zeros(3, 32, 32), torch.full((2, 5), float(index)), flags

    cache = a4_helper.PreprocessedCache(WithFlags(), tmp_path / "flags.pt")
    assert cache[1][3].tolist() == [True, False] and cache[0][3].tolist() == [False, False]


@pytest.mark.parametrize("model", ["fcos", "faster_rcnn"])
def test_uint8_batches_train_and_evaluate_like_float_batches(model):
    source = a4_helper.SyntheticDetection("train", num_images=4, image_size=64)
    items = [source[i] for i in range(4)]
    ids = [item[0] for item in items]
    gt_boxes = torch.stack([item[2] for item in items])
    uint8 = torch.stack([detection_data._to_uint8(item[1]) for item in items])  # as the cache stores them
    floats = a4_helper.normalize_image(uint8)
    assert torch.equal(a4_helper.prepare_images(uint8, "cpu"), floats)

    losses = {}
    for name, images in (("uint8", uint8), ("float", floats)):
        detector = _small_detectors()[model].train()
        torch.manual_seed(1)
        losses[name] = detector(a4_helper.prepare_images(images, "cpu"), gt_boxes)
        result = a4_helper.evaluate_detector(detector, [(ids, images, gt_boxes)], num_classes=6, keep_predictions=True)
        losses[name]["map"] = torch.tensor(result["map"])
        assert len(result["predictions"]) == len(result["ground_truths"]) == 4
    for key in losses["float"]:
        assert_close(losses["uint8"][key], losses["float"][key])


def _network_outputs(detector, images):
    """Every float the detector's convolutions and heads compute for these images (NMS aside, whose
    choice between near-equal random scores would flip on rounding)."""
    feats = detector.backbone(images)
    outputs = list(feats.values())
    if isinstance(detector, FCOS):
        heads = detector.pred_net(feats)
    else:
        heads = detector.rpn.pred_net(feats)
        rois = torch.tensor([[0, 4.0, 4.0, 40.0, 50.0], [1, 10.0, 0.0, 60.0, 30.0]])
        outputs += list(detector._head(detector.roi_features(feats, rois)))
    return outputs + [x for head in heads for x in head.values()]


@pytest.mark.parametrize("model", ["fcos", "faster_rcnn"])
def test_channels_last_is_the_default_and_computes_the_same_outputs(model):
    detector = _small_detectors()[model].eval()
    convs = [m for m in detector.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    images = torch.randn(2, 3, 64, 96)
    with torch.inference_mode():
        assert detector.backbone(images)["p3"].is_contiguous(memory_format=torch.channels_last)
        fast = _network_outputs(detector, images)
        detector.to(memory_format=torch.contiguous_format)
        assert not detector.backbone(images)["p3"].is_contiguous(memory_format=torch.channels_last)
        plain = _network_outputs(detector, images)
    for a, b in zip(fast, plain):
        assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("model", ["fcos", "faster_rcnn"])
def test_bf16_inference_decodes_boxes_in_float32(model):
    detector = _small_detectors()[model].eval()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        detections = detector.predict(torch.randn(2, 3, 64, 64), score_thresh=0.0, nms_thresh=0.5)
    for output in detections:
        assert output["boxes"].dtype == output["scores"].dtype == torch.float32 and len(output["boxes"]) > 0


def test_command_line_trains_and_evaluates_from_the_cache(tmp_path):
    data_dir, out = tmp_path / "data", tmp_path / "run"
    argv = ["--iters", "2", "--train-images", "8", "--eval-images", "4", "--image-size", "64", "--batch-size", "4"]
    metrics = detect.main(
        ["train", "--weights", "none", "--out", str(out), "--data-dir", str(data_dir), "--cache", *argv]
    )
    cached = sorted(os.listdir(data_dir / "cache"))
    assert cached == ["synthetic_train_64px_8.pt", "synthetic_val_64px_4.pt"]
    without = detect.main(
        ["eval", "--checkpoint", str(out / "checkpoint.pt"), "--out", str(tmp_path / "eval"), "--no-cache"]
    )
    assert 0 <= metrics["map"] <= 1 and abs(without["map"] - metrics["map"]) < 0.05  # bytes vs floats


@pytest.mark.slow
def test_compiled_detector_trains_with_unchanged_state_dict_names():
    for detector in _small_detectors().values():
        names = list(detector.state_dict())
        a4_helper.compile_detector(detector)
        assert list(detector.state_dict()) == names
        detector.train()
        gt = torch.tensor([[[8.0, 8.0, 40.0, 48.0, 1.0]]]).expand(2, -1, -1)
        losses = detector(torch.randn(2, 3, 64, 64), gt)
        sum(losses.values()).backward()
        assert all(torch.isfinite(value) for value in losses.values())

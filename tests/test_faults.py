"""The fault matrix: every bad input and fault gets a clear answer, and nothing is lost.

Rows held by tests in other files:
- class labels outside 0..K-1: test_one_stage_detector.py::test_bad_class_label_raises_value_error,
  test_two_stage_detector.py::test_faster_rcnn_rejects_labels_outside_0_to_K_minus_1 (the loader: here);
- a NaN loss: test_training.py::test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint;
- a crash mid-training: test_training.py::test_resume_ends_with_the_weights_of_an_uninterrupted_run
  (the command line and a kill during a save: here);
- a corrupt checkpoint: test_training.py::test_corrupt_checkpoint_is_reported_by_name_and_left_untouched;
- a corrupt image: test_detection_data.py::test_voc_corrupt_image_error_names_the_file;
- no data set: test_detection_data.py::test_voc_without_data_names_the_folder_and_how_to_download;
- no weights offline: test_common.py::test_backbone_offline_imagenet_weights_error_names_cache_and_alternatives,
  test_common.py::test_backbone_missing_weights_file_names_the_path;
- wrong command-line arguments: test_detect.py::test_wrong_arguments_exit_with_usage_and_write_nothing;
- a checkpoint of a retired FCOS option:
  test_command_line_errors.py::test_a_checkpoint_that_names_a_retired_option_is_refused_in_one_line;
- no ground-truth rows on one DDP rank:
  test_distributed.py::test_object_balance_with_no_ground_truth_rows_on_one_rank.
Peak memory of matching with many boxes: benchmarks/bench_matching_memory.py.
"""

import copy
import hashlib
import io
import math
import os
import tarfile
import warnings
from xml.etree import ElementTree

import numpy as np
import pytest
import torch
import torchvision
from conftest import gt_batch, small_faster_rcnn
from PIL import Image
from torch.testing import assert_close
from torch.utils.data import DataLoader

import a4_helper
import detect
import training
from a4_helper import VOC2007DetectionTiny, read_checkpoint, train_detector
from common import FPN_STRIDES, get_fpn_location_coords
from one_stage_detector import FCOS, fcos_match_locations_to_gt
from two_stage_detector import generate_fpn_anchors, rcnn_match_anchors_to_gt

NUM_CLASSES = len(a4_helper.SYNTHETIC_CLASSES)


def _fcos(fpn_channels=16):
    return FCOS(NUM_CLASSES, fpn_channels, [fpn_channels], pretrained=False)


def _faster_rcnn(fpn_channels=16):
    return small_faster_rcnn(NUM_CLASSES, fpn_channels)


BUILDERS = {"fcos": _fcos, "faster_rcnn": _faster_rcnn}
BOX_TERMS = {"fcos": ("loss_box", "loss_ctr"), "faster_rcnn": ("loss_rpn_box", "loss_box")}


@pytest.fixture(scope="module")
def detectors():
    torch.manual_seed(0)
    return {kind: build() for kind, build in BUILDERS.items()}


def _all_finite(losses):
    return all(torch.isfinite(value) for value in losses.values())


def _train(detector, loader, checkpoint_path=None, max_iters=2, **kwargs):
    settings = {"learning_rate": 0.01, "log_period": 1, "warmup_iters": 0, "progress": False, **kwargs}
    return train_detector(detector, loader, max_iters=max_iters, checkpoint_path=checkpoint_path, **settings)


# ---------------------------------------------------------------------------------------------
# Ground truth: no boxes, degenerate and out-of-image boxes, any image size
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", BUILDERS)
def test_images_and_batches_without_boxes_train_with_finite_losses_and_no_warning(kind):
    torch.manual_seed(0)
    items = [(f"img{i}", torch.randn(3, 64, 64), gt_batch([[]], M=40)[0]) for i in range(4)]
    items[0][2][0] = torch.tensor([8.0, 8.0, 40.0, 48.0, 1.0])
    # Batch 1: an image with a box and one without; batch 2: no box at all.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        history = _train(BUILDERS[kind](), DataLoader(items, batch_size=2))
    assert all(math.isfinite(value) for values in history.values() for value in values)
    for term in BOX_TERMS[kind]:
        assert history[term][0] > 0 and history[term][1] == 0
    assert history["total"][1] > 0  # the classification terms still learn background


# Zero width, zero height, inverted on both axes, inverted along x only.
DEGENERATE_ROWS = [[20, 10, 20, 40, 0], [5, 30, 50, 30, 2], [40, 40, 10, 10, 1], [50, 5, 30, 60, 2]]


@pytest.mark.parametrize("kind", BUILDERS)
def test_degenerate_gt_rows_are_ignored_like_padding(kind, detectors):
    detector = detectors[kind].train()
    images = torch.randn(2, 3, 64, 64)
    box = [8, 8, 40, 48, 1]
    torch.manual_seed(1)  # the same random samples of anchors and RoIs in both calls
    losses = detector(images, gt_batch([[box, *DEGENERATE_ROWS], DEGENERATE_ROWS], M=8))
    torch.manual_seed(1)
    as_padding = detector(images, gt_batch([[box], []], M=8))
    assert _all_finite(losses) and all(losses[term] > 0 for term in BOX_TERMS[kind])
    assert_close(losses, as_padding, rtol=0, atol=0)


@pytest.mark.parametrize("kind", BUILDERS)
def test_out_of_image_gt_gives_finite_losses_and_gradients(kind, detectors):
    detector = detectors[kind].train()
    # Partly outside, far larger than the image, and entirely outside it.
    rows = [[-30, -20, 40, 50, 0], [50, 40, 200, 90, 1], [-1000, -1000, 5000, 5000, 2], [100, 100, 150, 150, 0]]
    losses = detector(torch.randn(2, 3, 64, 64), gt_batch([rows, rows[-1:]], M=8))
    assert _all_finite(losses)
    sum(losses.values()).backward()
    gradients = [p.grad for p in detector.parameters() if p.grad is not None]
    assert gradients and all(torch.isfinite(g).all() for g in gradients)
    detector.zero_grad(set_to_none=True)


def _push_boxes_past_the_image(detector):
    """Make every predicted box larger than the image, so that only clipping keeps it inside."""
    with torch.no_grad():
        if isinstance(detector, FCOS):
            detector.pred_net.pred_box.bias.fill_(10.0)  # LTRB of 10 strides: 80 px and more
        else:
            detector.box_pred.bias.view(NUM_CLASSES, 4)[:, 2:].fill_(10.0)  # dw = 10 / 5: e^2 = 7.4 times wider


@pytest.mark.parametrize("kind", BUILDERS)
@pytest.mark.parametrize(("batch", "height", "width"), [(1, 100, 150), (2, 70, 45)])
def test_sides_not_multiples_of_32_train_and_predict_within_the_true_image(kind, detectors, batch, height, width):
    detector = copy.deepcopy(detectors[kind]).train()
    images = torch.randn(batch, 3, height, width)
    losses = detector(images, gt_batch([[[5, 6, width - 7, height - 4, 1]]] * batch, M=8))
    assert _all_finite(losses) and sum(losses.values()) > 0
    detector.eval()
    _push_boxes_past_the_image(detector)
    detections = detector.predict(images, score_thresh=0.0)
    assert len(detections) == batch
    for detection in detections:
        boxes = detection["boxes"]
        assert len(boxes) > 0 and (boxes >= 0).all()
        # Clipped to the true size, not to the feature grid (13 * 8 = 104 px for 100) or to 128.
        assert boxes[:, 2].max() == width and boxes[:, 3].max() == height


def test_matching_800px_images_with_300_boxes_each():
    torch.manual_seed(0)
    B, S, M = 2, 800, 300
    corners = torch.rand(B, M, 2) * (S - 100)
    gt = torch.cat([corners, corners + 8 + torch.rand(B, M, 2) * 90, torch.randint(0, 20, (B, M, 1))], dim=2)
    locations = get_fpn_location_coords({level: (S // s, S // s) for level, s in FPN_STRIDES.items()}, FPN_STRIDES)
    anchors = torch.cat(list(generate_fpn_anchors(locations, FPN_STRIDES, 8).values()))
    fcos_matched = torch.cat(list(fcos_match_locations_to_gt(locations, FPN_STRIDES, gt).values()), dim=1)
    rpn_matched = rcnn_match_anchors_to_gt(anchors, gt, (0.3, 0.6))
    assert fcos_matched.shape == (B, 13125, 5) and rpn_matched.shape == (B, 39375, 5)
    for matched in (fcos_matched, rpn_matched):
        for image_matched, image_gt in zip(matched, gt):
            foreground = image_matched[image_matched[:, 4] >= 0]
            assert len(foreground) > 0
            # Every foreground row is one of its own image's GT rows.
            assert (foreground[:, None, :] == image_gt[None]).all(-1).any(-1).all()


# ---------------------------------------------------------------------------------------------
# Training: crashes, kills and checkpoints
# ---------------------------------------------------------------------------------------------

_TINY_COMMAND = (
    "train --model faster_rcnn --weights none --iters 4 --log-period 2 "
    "--train-images 6 --eval-images 2 --image-size 64 --batch-size 2"
).split()


def test_rerunning_a_killed_training_command_ends_with_the_uninterrupted_weights(tmp_path, monkeypatch):
    detect.main([*_TINY_COMMAND, "--out", str(tmp_path / "whole")])
    forward, calls = training._forward, []

    def killed_in_iteration_3(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated kill")
        return forward(*args)

    killed = tmp_path / "killed"
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(training, "_forward", killed_in_iteration_3)
        detect.main([*_TINY_COMMAND, "--out", str(killed)])
    assert read_checkpoint(killed / "checkpoint.pt")["iteration"] == 2
    detect.main([*_TINY_COMMAND, "--out", str(killed)])  # the same command again
    whole, resumed = read_checkpoint(tmp_path / "whole" / "checkpoint.pt"), read_checkpoint(killed / "checkpoint.pt")
    assert resumed["iteration"] == 4 and resumed["loss_history"] == whole["loss_history"]
    assert_close(resumed["model"], whole["model"], rtol=0, atol=0)


def _tiny_loader(image_size=64):
    return DataLoader(a4_helper.SyntheticDetection("train", 4, image_size), batch_size=2)


def test_a_kill_while_saving_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    checkpoint = tmp_path / "checkpoint.pt"
    save, saves = torch.save, []

    def killed_in_the_second_save(state, file):
        saves.append(1)
        if len(saves) == 2:
            file.write(b"half a checkpoint")
            raise KeyboardInterrupt("simulated kill")
        save(state, file)

    monkeypatch.setattr(torch, "save", killed_in_the_second_save)
    with pytest.raises(KeyboardInterrupt):
        _train(_fcos(), _tiny_loader(), checkpoint, max_iters=3)
    assert os.listdir(tmp_path) == ["checkpoint.pt"] and read_checkpoint(checkpoint)["iteration"] == 1


def test_truncated_checkpoint_is_reported_by_name_and_left_untouched(tmp_path):
    checkpoint = tmp_path / "checkpoint.pt"
    _train(_fcos(), _tiny_loader(), checkpoint, max_iters=1)
    truncated = checkpoint.read_bytes()[: checkpoint.stat().st_size // 2]
    checkpoint.write_bytes(truncated)
    with pytest.raises(RuntimeError, match=r"checkpoint\.pt.*left untouched"):
        _train(_fcos(), _tiny_loader(), checkpoint)
    assert checkpoint.read_bytes() == truncated


@pytest.mark.parametrize(
    ("saved", "loading", "message"),
    [
        (_fcos, _faster_rcnn, "holds weights of FCOS, which do not fit this FasterRCNN"),
        (_faster_rcnn, _fcos, "holds weights of FasterRCNN, which do not fit this FCOS"),
        (lambda: _fcos(32), _fcos, "holds weights of FCOS, which do not fit this FCOS.* of another shape"),
    ],
    ids=["fcos-into-faster_rcnn", "faster_rcnn-into-fcos", "wider-fcos-into-fcos"],
)
def test_checkpoint_of_another_detector_is_refused_by_name_and_nothing_changes(tmp_path, saved, loading, message):
    checkpoint = tmp_path / "other.pt"
    _train(saved(), _tiny_loader(), checkpoint, max_iters=1)
    written = checkpoint.read_bytes()
    detector = loading()
    weights = copy.deepcopy(detector.state_dict())
    with pytest.raises(RuntimeError, match=rf"other\.pt.*{message}.*left untouched"):
        _train(detector, _tiny_loader(), checkpoint)
    assert checkpoint.read_bytes() == written
    assert_close(detector.state_dict(), weights, rtol=0, atol=0)  # no weight was loaded


# ---------------------------------------------------------------------------------------------
# Data: VOC files that are damaged, missing, oddly labelled or interrupted in download
# ---------------------------------------------------------------------------------------------

# VOC's 1-based inclusive pixels, on a 128 x 64 image (W x H).
_ODD_BOXES = [
    ("dog", 33, 11, 200, 50),  # past the right edge
    ("cat", 80, 20, 60, 40),  # inverted along x
    ("bird", 71, 5, 70, 30),  # zero width: xmin - 1 = xmax
    ("boat", 1, 1, 20, 20),  # cropped away
]


def _write_voc(dataset_dir, objects_per_image, splits):
    """A VOC 2007 folder in the official layout with 128 x 64 noise images; returns VOC2007's path."""
    voc = os.path.join(dataset_dir, "VOCdevkit", "VOC2007")
    for folder in ("JPEGImages", "Annotations", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(voc, folder), exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 256, (64, 128, 3), dtype=np.uint8)
    for image_id, objects in objects_per_image.items():
        Image.fromarray(pixels).save(os.path.join(voc, "JPEGImages", f"{image_id}.jpg"), quality=90)
        root = ElementTree.Element("annotation")
        for name, *corners in objects:
            node = ElementTree.SubElement(root, "object")
            ElementTree.SubElement(node, "name").text = name
            box = ElementTree.SubElement(node, "bndbox")
            for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), corners):
                ElementTree.SubElement(box, tag).text = str(value)
        ElementTree.ElementTree(root).write(os.path.join(voc, "Annotations", f"{image_id}.xml"))
    for split, ids in splits.items():
        with open(os.path.join(voc, "ImageSets", "Main", f"{split}.txt"), "w") as file:
            file.write("".join(i + "\n" for i in ids))
    return voc


def _truncate(path):
    with open(path, "rb") as file:
        head = file.read(os.path.getsize(path) // 2)
    with open(path, "wb") as file:
        file.write(head)


@pytest.fixture
def damaged_voc(tmp_path):
    """train: 000001 good, 000002 truncated, 000003 missing, 000004 good; val: only the bad two."""
    objects = {f"00000{i}": [("dog", 33, 11, 200, 50)] for i in range(1, 5)}
    voc = _write_voc(tmp_path, objects, {"train": sorted(objects), "val": ["000002", "000003"]})
    _truncate(os.path.join(voc, "JPEGImages", "000002.jpg"))
    os.remove(os.path.join(voc, "JPEGImages", "000003.jpg"))
    return tmp_path


def test_voc_missing_or_truncated_image_error_names_the_file(damaged_voc):
    dataset = VOC2007DetectionTiny(damaged_voc, "train", image_size=64)
    with pytest.raises(OSError, match=r"000002\.jpg.*corrupt"):
        dataset[1]
    with pytest.raises(FileNotFoundError, match=r"000003\.jpg.*does not exist"):
        dataset[2]


def test_voc_skip_bad_images_warns_once_per_file_and_training_goes_on(damaged_voc):
    dataset = VOC2007DetectionTiny(damaged_voc, "train", image_size=64, skip_bad_images=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paths = [path for _ in range(2) for paths, _, _ in DataLoader(dataset, batch_size=2) for path in paths]
        torch.manual_seed(0)
        detector = FCOS(len(a4_helper.VOC_CLASSES), 16, [16], pretrained=False)
        history = _train(detector, DataLoader(dataset, batch_size=2, shuffle=True), max_iters=3)
    # Items 1 and 2 are replaced by the next readable image, 000004, in both epochs.
    assert [os.path.basename(p) for p in paths] == ["000001.jpg"] + ["000004.jpg"] * 3 + ["000001.jpg"] + [
        "000004.jpg"
    ] * 3
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2 and "000002.jpg" in messages[0] and "000003.jpg" in messages[1]
    assert [os.path.basename(p) for p in dataset.bad_paths] == ["000002.jpg", "000003.jpg"]
    assert len(history["total"]) == 3 and all(math.isfinite(v) for v in history["total"])
    only_bad = VOC2007DetectionTiny(damaged_voc, "val", image_size=64, skip_bad_images=True)
    with pytest.warns(UserWarning), pytest.raises(OSError, match="No readable image left"):
        only_bad[0]


def test_voc_boxes_outside_the_crop_are_clipped_and_empty_ones_dropped(tmp_path):
    _write_voc(tmp_path, {"000001": _ODD_BOXES}, {"train": ["000001"]})
    _, _, gt_boxes = VOC2007DetectionTiny(tmp_path, "train", image_size=64)[0]
    # 128 x 64 -> short side 64: scale 1, crop left (128 - 64) // 2 = 32.
    # dog (32, 10, 200, 50) -> x 0..168, clipped to 64. cat: x 79-32 = 47 .. 60-32 = 28, inverted: dropped.
    # bird: x 38..38, empty: dropped. boat: x -32..-12 -> 0..0: dropped.
    assert_close(gt_boxes[0], torch.tensor([0.0, 10.0, 64.0, 50.0, 11.0]))
    assert (gt_boxes[1:] == -1).all()


def test_voc_unknown_class_name_is_reported_with_its_file(tmp_path):
    _write_voc(tmp_path, {"000001": [("unicorn", 1, 1, 20, 20)]}, {"train": ["000001"]})
    with pytest.raises(ValueError, match=r"000001\.xml.*'unicorn'.*aeroplane"):
        VOC2007DetectionTiny(tmp_path, "train")[0]


def test_interrupted_download_is_detected_by_its_checksum_and_fetched_again(tmp_path, monkeypatch):
    staging = tmp_path / "staging"
    _write_voc(staging, {"000001": [("dog", 33, 11, 200, 50)]}, {"test": ["000001"]})
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(staging / "VOCdevkit", arcname="VOCdevkit")
    archive = buffer.getvalue()
    monkeypatch.setitem(
        torchvision.datasets.voc.DATASET_YEAR_DICT["2007-test"], "md5", hashlib.md5(archive).hexdigest()
    )
    fetched = []

    def fetch(url, path, *args, **kwargs):  # stands in for the network
        fetched.append(url)
        with open(path, "wb") as file:
            file.write(archive)

    monkeypatch.setattr(torchvision.datasets.utils, "_urlretrieve", fetch)
    monkeypatch.setattr(torchvision.datasets.utils, "_get_redirect_url", lambda url, max_hops=3: url)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "VOCtest_06-Nov-2007.tar").write_bytes(archive[: len(archive) // 2])  # the interrupted download

    assert len(VOC2007DetectionTiny(data_dir, "test", download=True)) == 1
    assert fetched == ["https://thor.robots.ox.ac.uk/pascal/VOC/voc2007/VOCtest_06-Nov-2007.tar"]
    assert (data_dir / "VOCtest_06-Nov-2007.tar").read_bytes() == archive
    # A complete archive passes the checksum: extracted again without a second fetch.
    os.rename(data_dir / "VOCdevkit", tmp_path / "old")
    assert len(VOC2007DetectionTiny(data_dir, "test", download=True)) == 1 and len(fetched) == 1


def test_command_line_training_skips_bad_images_but_evaluation_does_not(damaged_voc):
    import detect

    train_set = detect.make_dataset("voc2007", "train", 64, str(damaged_voc), None, training=True)
    with pytest.warns(UserWarning) as caught:  # 000002 is truncated and 000003 missing: one warning each
        assert os.path.basename(train_set[1][0]) == "000004.jpg"
    assert ["000002.jpg" in str(w.message) for w in caught] == [True, False]
    eval_set = detect.make_dataset("voc2007", "train", 64, str(damaged_voc), None)
    with pytest.raises(OSError, match="000002.jpg"):
        eval_set[1]

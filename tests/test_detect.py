"""Tests for the command line (detect.py) and for the README's commands."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import write_voc_annotation
from PIL import Image
from torch.testing import assert_close

import a4_helper
import detect
from one_stage_detector import fcos_giou_loss, fcos_l1_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_RUN = ["--iters", "3", "--train-images", "8", "--eval-images", "4", "--image-size", "64", "--batch-size", "4"]


@pytest.mark.parametrize("model", ["fcos", "faster_rcnn"])
def test_train_eval_predict_smoke(tmp_path, model, capsys):
    out = tmp_path / "run"
    metrics = detect.main(["train", "--model", model, "--weights", "none", "--out", str(out), *TINY_RUN])
    for name in ("metrics.json", "checkpoint.pt", "losses.png", "predictions.png"):
        assert (out / name).is_file(), name
    written = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= written["map"] <= 1.0 and written["map"] == metrics["map"]
    assert written["config"]["model"] == model and written["num_images"] == 4
    assert set(written["ap_per_class"]) <= set(a4_helper.SYNTHETIC_CLASSES)
    if model == "faster_rcnn":  # the improved variant proposes with FCOS's head unless told otherwise
        assert written["config"]["first_stage"] == "fcos"

    evaluated = detect.main(["eval", "--checkpoint", str(out / "checkpoint.pt"), "--out", str(tmp_path / "eval")])
    assert evaluated["map"] == pytest.approx(metrics["map"])  # same weights, same held-out images

    image = a4_helper.denormalize_image(a4_helper.SyntheticDetection("val", 1, 64)[0][1])
    image_path = tmp_path / "shapes.png"
    from PIL import Image

    Image.fromarray(image).save(image_path)
    capsys.readouterr()
    checkpoint = str(out / "checkpoint.pt")
    results = detect.main(["predict", "--checkpoint", checkpoint, str(image_path), "--score-thresh", "0"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == results[0] and printed["image"] == str(image_path)
    assert len(printed["detections"]) > 0
    assert set(printed["detections"][0]) == {"class", "score", "box"}


def test_rerun_resumes_and_other_settings_are_refused(tmp_path):
    out = str(tmp_path / "run")
    detect.main(["train", "--weights", "none", "--out", out, *TINY_RUN])
    saved = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert saved["iteration"] == 3

    with pytest.raises(SystemExit, match="iters differ"):
        detect.main(["train", "--weights", "none", "--out", out, *TINY_RUN[:1], "5", *TINY_RUN[2:]])
    # The refused run left the checkpoint as it was.
    assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["iteration"] == 3


def test_augment_option_trains_with_augmentation_and_its_rerun_needs_it(tmp_path):
    out = str(tmp_path / "run")
    detect.main(["train", "--weights", "none", "--out", out, "--augment", *TINY_RUN])
    saved = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert saved["metadata"]["config"]["augment"] is True and saved["augmentation"]["flip"] is True
    with pytest.raises(SystemExit, match="augment differ"):
        detect.main(["train", "--weights", "none", "--out", out, "--no-augment", *TINY_RUN])
    assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["iteration"] == 3


def test_checkpoint_without_configuration_is_refused(tmp_path):
    path = tmp_path / "foreign.pt"
    torch.save({"model": {}}, path)
    with pytest.raises(SystemExit, match="foreign.pt is not a checkpoint written by 'detect.py train' "):
        detect.main(["eval", "--checkpoint", str(path)])
    with pytest.raises((ValueError, RuntimeError), match="foreign.pt"):  # the Python API raises its own error
        detect.load_detector(str(path))


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--model", "yolo"],
        ["train", "--iters", "many"],
        ["predict", "--checkpoint", "x.pt"],  # no image
        ["launch"],
    ],
)
def test_wrong_arguments_exit_with_usage_and_write_nothing(tmp_path, argv):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "detect.py"), *argv], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "usage:" in result.stderr and "error:" in result.stderr
    assert os.listdir(tmp_path) == []


def test_help_documents_every_train_option():
    help_text = detect.build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for option in (
        "--model",
        "--data",
        "--iters",
        "--out",
        "--weights",
        "--batch-size",
        "--image-size",
        "--lr",
        "--augment",
    ):
        assert option in help_text


def test_ci_runs_exactly_the_readme_commands():
    readme = open(os.path.join(ROOT, "README.md")).read()
    quick_start = readme.split("## Quick start", 1)[1]
    readme_commands = re.search(r"```bash\n(.*?)```", quick_start, re.S).group(1).strip().splitlines()
    ci_lines = open(os.path.join(ROOT, ".ci", "run")).read().splitlines()
    ci_commands = [line for line in ci_lines if line and not line.startswith(("#", "set ", "cd "))]
    assert ci_commands == readme_commands


def test_fcos_first_stage_from_an_fcos_checkpoint_and_proposal_evaluation(tmp_path, capsys):
    fcos_out, rcnn_out = tmp_path / "fcos", tmp_path / "rcnn"
    detect.main(["train", "--model", "fcos", "--weights", "none", "--out", str(fcos_out), *TINY_RUN])
    fcos_state = torch.load(fcos_out / "checkpoint.pt", weights_only=True)["model"]
    args = ["--model", "faster_rcnn", "--first-stage", "fcos", "--init-from", str(fcos_out / "checkpoint.pt")]
    # One update at lr 1e-12 leaves the weights the FCOS checkpoint gave them.
    tiny_step = ["--iters", "1", "--lr", "1e-12", *TINY_RUN[2:]]
    detect.main(["train", *args, "--weights", "none", "--out", str(rcnn_out), *tiny_step])
    detector, config = detect.load_detector(str(rcnn_out / "checkpoint.pt"))
    assert config.first_stage == "fcos" and isinstance(detector.rpn, detect.FCOSProposalNetwork)
    own = detector.state_dict()
    assert config.fine_p3  # the FCOS feeds c2 into p3, so its Faster R-CNN does too
    copied_keys = ("backbone.fpn_params.output_p5.weight", "backbone.fpn_params.c2_to_p3.weight")
    for key in (*copied_keys, "pred_net.pred_box.weight", "pred_net.stem_cls.0.weight"):
        own_key = key if key.startswith("backbone.") else "rpn." + key
        assert_close(own[own_key], fcos_state[key], atol=1e-8, rtol=0)

    capsys.readouterr()
    metrics = detect.main(["eval", "--checkpoint", str(rcnn_out / "checkpoint.pt"), "--proposals"])
    assert "fcos proposals: AR@10" in capsys.readouterr().out
    written = json.loads((rcnn_out / "metrics.json").read_text())["proposals"]
    assert written == metrics["proposals"] and set(written) >= {"ar_10", "ar_100", "ar_300"}
    assert 0 <= written["ar_10"] <= written["ar_100"] <= written["ar_300"] <= 1
    assert (rcnn_out / "proposal_recall.png").is_file()
    with pytest.raises(SystemExit, match="faster_rcnn only"):
        detect.main(["train", "--model", "fcos", "--first-stage", "fcos", "--out", str(tmp_path / "x"), *TINY_RUN])


def test_p2_trains_an_fcos_with_a_stride_4_level_that_its_checkpoint_remembers(tmp_path):
    out = tmp_path / "p2"
    detect.main(["train", "--p2", "--weights", "none", "--out", str(out), "--iters", "1", *TINY_RUN[2:]])
    detector, config = detect.load_detector(str(out / "checkpoint.pt"))
    assert config.p2 and detector.backbone.fpn_strides == {"p2": 4, "p3": 8, "p4": 16, "p5": 32}
    with pytest.raises(SystemExit, match="--p2 applies to --model fcos only"):
        detect.main(["train", "--model", "faster_rcnn", "--p2", "--out", str(tmp_path / "x"), *TINY_RUN])
    assert not (tmp_path / "x").exists()


def test_the_course_variant_of_faster_rcnn_keeps_the_anchor_rpn(tmp_path):
    out = tmp_path / "course"
    one_step = ["--iters", "1", *TINY_RUN[2:]]
    argv = ["train", "--model", "faster_rcnn", "--variant", "course", "--weights", "none", "--out", str(out)]
    detect.main([*argv, *one_step])
    detector, config = detect.load_detector(str(out / "checkpoint.pt"))
    assert config.first_stage == "rpn" and isinstance(detector.rpn, detect.RPN)


# (name, xmin, ymin, xmax, ymax, difficult) in VOC's 1-based pixels, on 64 x 64 images (kept as they are at
# --image-size 64). The difficult dog comes first: an evaluation that drops it from the ground truth ranks
# its detection (a tie at score 1) ahead of the real dog's, a false positive: AP(dog) 1/2, mAP (1/2 + 1) / 2.
_DIFFICULT_VOC = {
    "000001": [("dog", 5, 5, 30, 30, 1), ("dog", 33, 33, 60, 60, 0), ("cat", 10, 35, 30, 60, 0)],
    "000002": [("cat", 20, 10, 50, 40, 0), ("cat", 40, 45, 62, 62, 1)],
}


def _write_difficult_voc(dataset_dir):
    voc = os.path.join(dataset_dir, "VOCdevkit", "VOC2007")
    for folder in ("JPEGImages", "Annotations", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(voc, folder))
    for grey, (image_id, objects) in zip((60, 200), _DIFFICULT_VOC.items()):  # told apart by their grey
        Image.fromarray(np.full((64, 64, 3), grey, np.uint8)).save(os.path.join(voc, "JPEGImages", f"{image_id}.jpg"))
        write_voc_annotation(os.path.join(voc, "Annotations", f"{image_id}.xml"), (64, 64), objects)
    with open(os.path.join(voc, "ImageSets", "Main", "train.txt"), "w") as file:
        file.write("".join(f"{image_id}\n" for image_id in _DIFFICULT_VOC))


def _oracle_predict(reference):
    """A ``predict`` that returns every ground-truth box of the image it sees, difficult ones too, with
    score 1; it finds the image among ``reference`` items ``(id, image, gt_boxes, difficult)`` by its pixels."""
    references = torch.stack([item[1] for item in reference])

    def predict(self, images, score_thresh=0.05, nms_thresh=0.5):
        outputs = []
        for image in images.float().cpu():
            gt_boxes = reference[int((references - image).abs().flatten(1).sum(1).argmin())][2]
            gt_boxes = gt_boxes[gt_boxes[:, 4] >= 0]
            outputs.append(
                {"boxes": gt_boxes[:, :4], "labels": gt_boxes[:, 4].long(), "scores": torch.ones(len(gt_boxes))}
            )
        return outputs

    return predict


def test_voc_evaluation_ignores_difficult_objects_with_and_without_the_cache(tmp_path, monkeypatch):
    _write_difficult_voc(tmp_path)
    held_out = a4_helper.VOC2007DetectionTiny(tmp_path, "train", image_size=64, return_difficult=True)
    assert sum(int(held_out[i][3].sum()) for i in range(2)) == 2  # both difficult objects are there
    monkeypatch.setattr(detect.FCOS, "predict", _oracle_predict([held_out[i] for i in range(2)]))
    out = tmp_path / "run"
    tiny = ["--iters", "1", "--batch-size", "2", "--image-size", "64", "--fpn-channels", "16", "--weights", "none"]
    voc = ["--data-dir", str(tmp_path), "--eval-split", "train"]
    # The voc2007 recipe trains and evaluates on images from the cache; the training split's cache,
    # built without difficult objects, must not stand in for the held-out one (here the same split).
    detect.main(["train", "--data", "voc2007", "--out", str(out), *voc, *tiny])
    assert json.loads((out / "metrics.json").read_text())["map"] == 1.0
    checkpoint = str(out / "checkpoint.pt")
    for cache in ("--cache", "--no-cache"):
        eval_out = tmp_path / cache
        detect.main(["eval", "--checkpoint", checkpoint, "--out", str(eval_out), *voc, cache])
        assert json.loads((eval_out / "metrics.json").read_text())["map"] == 1.0, cache


def test_proposal_evaluation_gives_the_first_stage_back_its_proposal_count_and_mode(tmp_path):
    config = {"model": "faster_rcnn", "data": "synthetic", "image_size": 64, "batch_size": 4, "fpn_channels": 16}
    config.update(num_classes=len(a4_helper.SYNTHETIC_CLASSES), eval_images=4)
    detector = detect.build_detector(config).train()
    before = detector.rpn.post_nms_topk
    args = detect.build_parser().parse_args(["eval", "--checkpoint", "unused.pt", "--device", "cpu"])
    summary = detect._evaluate_proposals(detector, detect.RunConfig.from_dict(config), args, str(tmp_path))
    assert set(summary) >= {"ar_10", "ar_300"} and before != 300  # it ranked 300 proposals per image...
    assert detector.rpn.post_nms_topk == before  # ...and the detector keeps its own count
    assert detector.training and detector.rpn.training and detector.backbone.training  # and its mode


def test_build_detector_builds_the_variant_its_config_names_and_old_configs_the_course_one():
    config = {"fpn_channels": 16, "num_classes": 3}
    improved = detect.build_detector({**config, "model": "fcos", "variant": "improved"})
    assert improved.box_loss is fcos_giou_loss and improved.pred_net.scales is not None
    old_fcos = detect.build_detector({**config, "model": "fcos"})  # checkpoints from before the variant
    assert old_fcos.box_loss is fcos_l1_loss and old_fcos.pred_net.scales is None
    assert set(old_fcos.state_dict()) == set(
        detect.build_detector({**config, "model": "fcos", "variant": "course"}).state_dict()
    )
    rcnn = detect.build_detector({**config, "model": "faster_rcnn", "variant": "improved"})
    assert rcnn.rpn.allow_low_quality_matches and rcnn.rpn.nms_per_level
    old_rcnn = detect.build_detector({**config, "model": "faster_rcnn"})
    assert not old_rcnn.rpn.allow_low_quality_matches and not old_rcnn.rpn.nms_per_level
    old_first_stage = detect.build_detector({**config, "model": "faster_rcnn", "first_stage": "fcos"})
    assert old_first_stage.rpn.box_loss is fcos_l1_loss and not old_first_stage.rpn.nms_per_level
    assert detect.build_parser().parse_args(["train"]).variant == "improved"

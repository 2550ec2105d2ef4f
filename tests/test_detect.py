"""Tests for the command line (detect.py) and for the README's commands."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close

import a4_helper
import detect

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


def test_checkpoint_without_configuration_is_refused(tmp_path):
    path = tmp_path / "foreign.pt"
    torch.save({"model": {}}, path)
    with pytest.raises((ValueError, RuntimeError), match="foreign.pt"):
        detect.main(["eval", "--checkpoint", str(path)])


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
    for option in ("--model", "--data", "--iters", "--out", "--weights", "--batch-size", "--image-size", "--lr"):
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
    assert config["first_stage"] == "fcos" and isinstance(detector.rpn, detect.FCOSProposalNetwork)
    own = detector.state_dict()
    for key in ("backbone.fpn_params.output_p5.weight", "pred_net.pred_box.weight", "pred_net.stem_cls.0.weight"):
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

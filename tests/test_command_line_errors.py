"""'detect.py' as users meet it: every option is checked where it is parsed, and a mistake the user can
fix ends in one 'error:' line that names the file or value and the flag that fixes it (exit status 2 for
a bad option, 1 otherwise), with the traceback only under --debug. Nothing is written for a refused run."""

import os
import subprocess
import sys

import pytest
import torch

import detect

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_RUN = ["--iters", "2", "--train-images", "4", "--eval-images", "2", "--image-size", "64", "--batch-size", "2"]


def _fails(argv, capsys):
    """Run detect.main(argv), which must fail; returns (exit status, everything printed to stderr)."""
    with pytest.raises(SystemExit) as failure:
        detect.main(argv)
    code = failure.value.code
    stderr = capsys.readouterr().err
    if isinstance(code, str):  # SystemExit("message"): Python prints it and exits with 1
        return 1, stderr + code
    return code, stderr


BAD_OPTIONS = [
    ("train", "--iters", "-5"),
    ("train", "--iters", "0"),
    ("train", "--iters", "ten"),
    ("train", "--batch-size", "0"),
    ("train", "--image-size", "100"),
    ("train", "--image-size", "0"),
    ("train", "--fpn-channels", "0"),
    ("train", "--lr", "0"),
    ("train", "--lr", "-0.01"),
    ("train", "--lr", "nan"),
    ("train", "--train-images", "0"),
    ("train", "--eval-images", "-1"),
    ("train", "--grad-clip", "-1"),
    ("train", "--log-period", "0"),
    ("train", "--workers", "-1"),
    ("train", "--score-thresh", "1.5"),
    ("train", "--nms-thresh", "-0.1"),
    ("eval", "--score-thresh", "2"),
    ("predict", "--batch-size", "0"),
    ("predict", "--size", "-3"),
    ("predict", "--max-size", "0"),
]


@pytest.mark.parametrize("command, option, value", BAD_OPTIONS, ids=[" ".join(case) for case in BAD_OPTIONS])
def test_a_bad_option_value_is_a_usage_error_naming_it(tmp_path, capsys, command, option, value):
    out = tmp_path / "run"
    argv = {
        "train": ["train", "--out", str(out)],
        "eval": ["eval", "--checkpoint", str(tmp_path / "c.pt"), "--out", str(out)],
        "predict": ["predict", "--checkpoint", str(tmp_path / "c.pt"), "photo.jpg", "--out", str(out)],
    }[command]
    code, stderr = _fails([*argv, f"{option}={value}"], capsys)
    assert code == 2
    assert f"error: argument {option}" in stderr and value in stderr and "Traceback" not in stderr
    assert not out.exists()


def test_a_missing_checkpoint_names_the_file_and_the_flag(tmp_path, capsys):
    code, stderr = _fails(["eval", "--checkpoint", str(tmp_path / "nope.pt")], capsys)
    assert code == 1 and "nope.pt" in stderr and "--checkpoint" in stderr
    assert "left untouched" not in stderr and len(stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("content", [b"", b"hello, I am a text file", b"PK\x03\x04 not really a zip"])
def test_a_file_that_is_not_a_checkpoint_is_named_in_one_line(tmp_path, capsys, content):
    fake = tmp_path / "notes.pt"
    fake.write_bytes(content)
    code, stderr = _fails(["predict", "--checkpoint", str(fake), str(tmp_path)], capsys)
    assert code == 1 and "notes.pt is not a checkpoint written by 'detect.py train'" in stderr
    assert "--checkpoint" in stderr and len(stderr.strip().splitlines()) == 1
    assert fake.read_bytes() == content  # untouched


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "run"
    detect.main(["train", "--weights", "none", "--out", str(out), *TINY_RUN])
    return str(out / "checkpoint.pt")


def test_predict_names_a_file_that_is_no_image_and_writes_nothing(tmp_path, capsys, tiny_checkpoint):
    text = tmp_path / "holiday.jpg"
    text.write_text("not an image")
    out = tmp_path / "out"
    code, stderr = _fails(["predict", "--checkpoint", tiny_checkpoint, str(text), "--out", str(out)], capsys)
    assert code == 1 and "holiday.jpg" in stderr and "is not an image" in stderr
    assert "download" not in stderr and not out.exists()
    code, stderr = _fails(["predict", "--checkpoint", tiny_checkpoint, str(tmp_path / "gone.png")], capsys)
    assert code == 1 and "gone.png" in stderr


def test_a_checkpoint_folder_is_accepted(tmp_path, capsys, tiny_checkpoint):
    from PIL import Image

    photo = tmp_path / "photo.png"
    Image.new("RGB", (96, 64), (120, 30, 200)).save(photo)
    results = detect.main(["predict", "--checkpoint", os.path.dirname(tiny_checkpoint), str(photo)])
    assert results[0]["width"] == 96 and results[0]["height"] == 64
    for detection in results[0]["detections"]:
        x1, y1, x2, y2 = detection["box"]
        assert 0 <= x1 < x2 <= 96 and 0 <= y1 < y2 <= 64


def test_missing_voc_names_the_folder_and_the_download_flag(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--data", "voc2007", "--data-dir", str(tmp_path / "data"), "--out", str(out), "--no-cache"]
    code, stderr = _fails([*argv, "--weights", "none"], capsys)
    assert code == 1 and "VOCdevkit" in stderr and "--download" in stderr and "download=True" not in stderr
    assert not out.exists()


def test_a_missing_or_foreign_weights_file_names_the_file_and_the_flag(tmp_path, capsys):
    out = tmp_path / "run"
    code, stderr = _fails(["train", "--weights", str(tmp_path / "regnet.pth"), "--out", str(out), *TINY_RUN], capsys)
    assert code == 1 and "regnet.pth" in stderr and "--weights none" in stderr and not out.exists()
    foreign = tmp_path / "foreign.pth"
    torch.save({"conv.weight": torch.zeros(1)}, foreign)
    code, stderr = _fails(["train", "--weights", str(foreign), "--out", str(out), *TINY_RUN], capsys)
    assert code == 1 and "foreign.pth holds no RegNetX-400MF weights" in stderr and not out.exists()


def test_a_corrupt_checkpoint_in_out_is_refused_and_kept(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"half a checkpoint")
    code, stderr = _fails(["train", "--weights", "none", "--out", str(out), *TINY_RUN], capsys)
    assert code == 1 and "checkpoint.pt cannot be resumed" in stderr and "--out" in stderr
    assert (out / "checkpoint.pt").read_bytes() == b"half a checkpoint" and os.listdir(out) == ["checkpoint.pt"]


def test_a_non_finite_loss_stops_with_the_flags_to_change(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--weights", "none", "--out", str(out), "--lr", "1e30", "--grad-clip", "0", "--log-period", "1"]
    code, stderr = _fails([*argv, *TINY_RUN[:1], "20", *TINY_RUN[2:]], capsys)
    assert code == 1 and "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]  # after the progress bar's lines
    assert last.startswith("detect.py train: error: training stopped at iteration ")
    assert "the loss is not finite" in last and "is kept" in last and "--lr" in last
    assert (out / "checkpoint.pt").is_file()


def test_debug_shows_the_exception_itself(tmp_path):
    with pytest.raises(detect.CommandError, match="nope.pt"):
        detect.main(["eval", "--checkpoint", str(tmp_path / "nope.pt"), "--debug"])


def test_the_real_command_exits_with_1_and_one_line_on_stderr(tmp_path):
    command = [sys.executable, os.path.join(ROOT, "detect.py"), "eval", "--checkpoint", str(tmp_path / "nope.pt")]
    finished = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert finished.returncode == 1 and finished.stdout == ""
    assert finished.stderr.strip().splitlines() == [
        f"detect.py eval: error: no checkpoint {tmp_path / 'nope.pt'}; pass --checkpoint with the checkpoint.pt "
        "that 'detect.py train' wrote (e.g. runs/quickstart/checkpoint.pt)."
    ]
    usage = subprocess.run([*command[:2], "train", "--iters", "-5"], capture_output=True, text=True, timeout=120)
    assert usage.returncode == 2 and "error: argument --iters: must be a positive whole number, got -5" in usage.stderr


def test_a_checkpoint_that_names_a_retired_option_is_refused_in_one_line(tmp_path, capsys, tiny_checkpoint):
    checkpoint = torch.load(tiny_checkpoint, weights_only=False)
    checkpoint["metadata"]["config"]["quality_focal"] = True  # a configuration that turns a retired option on
    retired = tmp_path / "retired.pt"
    torch.save(checkpoint, retired)
    code, stderr = _fails(["eval", "--checkpoint", str(retired)], capsys)
    assert code == 1 and len(stderr.strip().splitlines()) == 1
    assert "retired.pt" in stderr and "quality_focal" in stderr and "git checkout 3e0958e" in stderr

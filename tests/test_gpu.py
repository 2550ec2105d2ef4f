"""CUDA paths: bf16 training and evaluation, channels-last, the uint8 cache. Run with  pytest -m gpu."""

import pytest
import torch

import detect

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("model", ["fcos", "faster_rcnn"])
def test_command_line_trains_and_evaluates_on_the_gpu_from_the_cache(tmp_path, model):
    argv = ["--iters", "20", "--train-images", "32", "--eval-images", "16", "--image-size", "128"]
    metrics = detect.main(
        ["train", "--model", model, "--weights", "none", "--device", "cuda", "--cache", "--workers", "2"]
        + ["--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "run"), *argv]
    )
    assert 0.0 <= metrics["map"] <= 1.0 and metrics["num_images"] == 16
    assert torch.isfinite(torch.tensor(metrics["final_loss"]))

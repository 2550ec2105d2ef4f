"""CUDA paths: bf16 training and evaluation, channels-last, the uint8 cache. Run with  pytest -m gpu."""

import pytest
import torch
from torchvision.ops import roi_align as torchvision_roi_align

import detect
from two_stage_detector import roi_align

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


def test_roi_align_matches_torchvision_on_the_gpu():
    torch.manual_seed(0)
    features = torch.randn(2, 8, 28, 28, device="cuda", requires_grad=True)
    corner = torch.rand(50, 2, device="cuda") * 200
    rois = torch.cat([torch.randint(0, 2, (50, 1), device="cuda").float(), corner, corner + 40], dim=1)
    ours = roi_align(features, rois, (7, 7), 1 / 8)
    theirs = torchvision_roi_align(features, rois, (7, 7), 1 / 8, 2, True)
    torch.testing.assert_close(ours, theirs)
    grad_out = torch.randn_like(ours)
    (our_grad,) = torch.autograd.grad(ours, features, grad_out)
    (their_grad,) = torch.autograd.grad(theirs, features, grad_out)
    torch.testing.assert_close(our_grad, their_grad)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert roi_align(features.bfloat16(), rois, (7, 7), 1 / 8).dtype == torch.bfloat16

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


def test_augmentation_on_the_gpu_gives_the_batch_of_the_cpu():
    from augmentation import BatchAugmentation
    from detection_data import SyntheticDetection

    items = [SyntheticDetection("train", num_images=8, image_size=64)[i] for i in range(8)]
    images, gt_boxes = torch.stack([item[1] for item in items]), torch.stack([item[2] for item in items])
    on_cpu = BatchAugmentation(seed=3)(images, gt_boxes)
    on_gpu = BatchAugmentation(seed=3)(images.cuda(), gt_boxes.cuda())
    assert on_gpu[0].is_cuda and on_gpu[1].is_cuda
    torch.testing.assert_close(on_gpu[0].cpu(), on_cpu[0], rtol=0, atol=1e-4)
    torch.testing.assert_close(on_gpu[1].cpu(), on_cpu[1], rtol=0, atol=1e-3)

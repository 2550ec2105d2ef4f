"""Tests of training: train_detector (the loss falls, gradient clipping, the LR schedule, AdamW, logged
metrics), its checkpoints and exact resume (also with augmentation), a NaN loss, a corrupt checkpoint, and reset_seed.

Detectors here are tiny stand-ins with the project's interface, so these tests do not depend on
the real models. Hand-computed values carry their arithmetic in a comment.
"""

import os
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.testing import assert_close
from torch.utils.data import DataLoader

import training
from augmentation import BatchAugmentation
from detection_data import SyntheticDetection
from training import read_checkpoint, reset_seed, train_detector

# ---------------------------------------------------------------------------------------------
# reset_seed
# ---------------------------------------------------------------------------------------------


def test_reset_seed_seeds_python_numpy_and_torch():
    reset_seed(3)
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    reset_seed(3)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


class TinyDetector(nn.Module):
    """Regresses the first ground-truth box (in units of the image side) from the mean colour.

    It draws from torch's RNG in every forward, so a resume must restore that RNG exactly.
    """

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 4)

    def forward(self, images, gt_boxes):
        pred = self.linear(images.mean((2, 3)))  # (B, 3) -> (B, 4)
        target = gt_boxes[:, 0, :4] / images.shape[-1]
        jitter = 1e-3 * torch.rand(())
        loss_reg = 0.01 * self.linear.weight.pow(2).mean()
        return {"loss_box": F.smooth_l1_loss(pred, target) + jitter, "loss_reg": loss_reg}


class FailingDetector(TinyDetector):
    """A TinyDetector whose ``fail_at``-th call goes wrong: it raises, or returns a NaN loss."""

    def __init__(self, fail_at, nan=False):
        super().__init__()
        self.fail_at, self.nan, self.calls = fail_at, nan, 0

    def forward(self, images, gt_boxes):
        self.calls += 1
        losses = super().forward(images, gt_boxes)
        if self.calls == self.fail_at and not self.nan:
            raise KeyboardInterrupt("simulated crash")
        if self.calls == self.fail_at:
            losses["loss_box"] = losses["loss_box"] * float("nan")
        return losses


_TRAIN_SET = SyntheticDetection("train", num_images=5, image_size=32, seed=3)  # 3 batches of 2, 2, 1 per epoch


def _loader(own_generator=False, generator_seed=0):
    generator = torch.Generator().manual_seed(generator_seed) if own_generator else None
    return DataLoader(_TRAIN_SET, batch_size=2, shuffle=True, generator=generator)


def _train(detector, loader, checkpoint_path=None, max_iters=12, **kwargs):
    settings = {"learning_rate": 0.5, "log_period": 4, "warmup_iters": 3, "progress": False}
    settings.update(kwargs)
    return train_detector(detector, loader, max_iters=max_iters, checkpoint_path=checkpoint_path, **settings)


def test_lr_schedule_warms_up_then_steps_at_60_and_90_percent():
    factor = training._lr_factor
    # warm-up over 4 iterations: (i + 1) / 4; steps at 0.6 * 100 = 60 and 0.9 * 100 = 90.
    assert [factor(i, 100, 4) for i in (0, 1, 3, 59)] == [0.25, 0.5, 1.0, 1.0]
    assert factor(60, 100, 4) == pytest.approx(0.1) and factor(89, 100, 4) == pytest.approx(0.1)
    assert factor(90, 100, 4) == pytest.approx(0.01) and factor(0, 100, 0) == 1.0


def test_train_detector_returns_the_history_and_the_loss_falls():
    torch.manual_seed(0)
    history = _train(TinyDetector(), _loader(), max_iters=30, learning_rate=1.0)
    assert list(history) == ["loss_box", "loss_reg", "total"] and all(len(v) == 30 for v in history.values())
    assert history["total"][0] == pytest.approx(history["loss_box"][0] + history["loss_reg"][0])
    assert np.mean(history["total"][-5:]) < 0.5 * np.mean(history["total"][:3])


def test_grad_clip_bounds_the_first_update():
    torch.manual_seed(0)
    detector = TinyDetector()
    before = torch.cat([p.detach().flatten() for p in detector.parameters()])
    _train(detector, _loader(), max_iters=1, learning_rate=1.0, weight_decay=0.0, warmup_iters=0, grad_clip=1e-3)
    after = torch.cat([p.detach().flatten() for p in detector.parameters()])
    # First SGD step with momentum: the update is lr * (clipped gradient), whose norm is 1 * 1e-3.
    assert (after - before).norm().item() == pytest.approx(1e-3, rel=1e-4)


@pytest.mark.parametrize("augment", [False, True], ids=["plain", "augmented"])
@pytest.mark.parametrize("own_generator", [False, True], ids=["global-rng-shuffle", "loader-generator-shuffle"])
def test_resume_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, own_generator, augment):
    augmentation = lambda seed: BatchAugmentation(seed=seed) if augment else None  # noqa: E731
    torch.manual_seed(0)
    reference = TinyDetector()
    reference_history = _train(reference, _loader(own_generator), augmentation=augmentation(0))

    torch.manual_seed(0)
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    with pytest.raises(KeyboardInterrupt):  # crash in iteration 7: the checkpoint of iteration 4 stays
        _train(FailingDetector(fail_at=7), _loader(own_generator), checkpoint, augmentation=augmentation(0))
    assert torch.load(checkpoint, weights_only=True)["iteration"] == 4
    assert os.listdir(checkpoint.parent) == ["checkpoint.pt"]  # no temporary file left behind

    reset_seed(123)  # a different RNG, initial weights, loader generator and augmentation stream: the checkpoint
    resumed = TinyDetector()  # must restore them all
    history = _train(resumed, _loader(own_generator, generator_seed=5), checkpoint, augmentation=augmentation(9))
    for name, value in reference.state_dict().items():
        assert_close(resumed.state_dict()[name], value, rtol=0, atol=1e-7)
    assert history == reference_history
    assert torch.load(checkpoint, weights_only=True)["iteration"] == 12


def test_augmented_checkpoint_is_not_resumed_without_augmentation_nor_the_reverse(tmp_path):
    augmented, plain = tmp_path / "augmented.pt", tmp_path / "plain.pt"
    _train(TinyDetector(), _loader(), augmented, max_iters=4, augmentation=BatchAugmentation())
    _train(TinyDetector(), _loader(), plain, max_iters=4)
    before = augmented.read_bytes()
    with pytest.raises(RuntimeError, match="trained with augmentation, this run is without"):
        _train(TinyDetector(), _loader(), augmented, max_iters=4)
    with pytest.raises(RuntimeError, match="trained without augmentation, this run is with"):
        _train(TinyDetector(), _loader(), plain, max_iters=4, augmentation=BatchAugmentation())
    with pytest.raises(RuntimeError, match="resume with the same settings"):
        _train(TinyDetector(), _loader(), augmented, max_iters=4, augmentation=BatchAugmentation(flip=False))
    assert augmented.read_bytes() == before


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path):
    checkpoint = tmp_path / "checkpoint.pt"
    with pytest.raises(FloatingPointError, match=r"iteration 6: loss_box=nan") as error:
        _train(FailingDetector(fail_at=6, nan=True), _loader(), checkpoint)
    assert "total=nan" in str(error.value) and "iteration 4" in str(error.value)
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["iteration"] == 4 and len(saved["loss_history"]["total"]) == 4


def test_corrupt_checkpoint_is_reported_by_name_and_left_untouched(tmp_path):
    checkpoint = tmp_path / "broken.pt"
    checkpoint.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="broken.pt"):
        _train(TinyDetector(), _loader(), checkpoint)
    assert checkpoint.read_bytes() == b"not a checkpoint"
    torch.save({"model": {}}, checkpoint)  # readable, but not a training checkpoint
    with pytest.raises(RuntimeError, match="lacks"):
        read_checkpoint(checkpoint)


def test_checkpoint_holds_the_model_and_the_metadata(tmp_path):
    checkpoint = tmp_path / "checkpoint.pt"
    detector = TinyDetector()
    _train(detector, _loader(), checkpoint, max_iters=2, metadata={"config": {"idx_to_class": {0: "a"}, "lr": 0.1}})
    saved = read_checkpoint(checkpoint)
    assert saved["metadata"] == {"config": {"idx_to_class": {0: "a"}, "lr": 0.1}}
    assert saved["iteration"] == 2 and saved["format"] == 1
    for name, value in detector.state_dict().items():
        assert_close(saved["model"][name], value)


def test_finished_checkpoint_returns_its_history_without_training(tmp_path):
    checkpoint = tmp_path / "checkpoint.pt"
    torch.manual_seed(0)
    history = _train(TinyDetector(), _loader(), checkpoint, max_iters=4)
    detector = FailingDetector(fail_at=1)  # any forward call would raise
    assert _train(detector, _loader(), checkpoint, max_iters=4) == history


def test_amp_setting_is_checked():
    assert training._autocast_dtype("auto", torch.device("cpu")) is None
    with pytest.raises(ValueError, match="amp"):
        _train(TinyDetector(), _loader(), max_iters=1, amp="int8")


def test_adamw_option_trains_and_resumes_with_its_own_state(tmp_path):
    torch.manual_seed(0)
    history = _train(TinyDetector(), _loader(), max_iters=30, learning_rate=0.05, optimizer="adamw")
    assert np.mean(history["total"][-5:]) < 0.5 * np.mean(history["total"][:3])

    path = tmp_path / "adamw.pt"
    _train(TinyDetector(), _loader(), path, max_iters=4, optimizer="adamw")
    state = torch.load(path, weights_only=True)["optimizer"]["state"]
    assert "exp_avg" in state[0]  # AdamW's moment, which SGD does not keep
    with pytest.raises(ValueError, match="'sgd' or 'adamw'"):
        _train(TinyDetector(), _loader(), max_iters=2, optimizer="adam")


class MetricDetector(TinyDetector):
    """A TinyDetector that also reports a metric with a gradient in ``training_metrics`` (never trained on)."""

    def forward(self, images, gt_boxes):
        self.training_metrics = {"metric_weight_sum": 100.0 * self.linear.weight.sum()}
        return super().forward(images, gt_boxes)


def test_train_detector_logs_metrics_without_adding_them_to_the_loss():
    torch.manual_seed(0)
    reference = _train(TinyDetector(), _loader(), max_iters=6)
    torch.manual_seed(0)
    history = _train(MetricDetector(), _loader(), max_iters=6)
    assert list(history) == ["loss_box", "loss_reg", "metric_weight_sum", "total"]
    # The metric is logged, yet the updates, and so the losses, are those of the detector without it.
    assert history["total"] == pytest.approx(reference["total"], rel=1e-6)
    assert history["total"][0] == pytest.approx(history["loss_box"][0] + history["loss_reg"][0])


def test_resume_with_another_optimizer_is_refused_and_the_file_kept(tmp_path):
    path = tmp_path / "sgd.pt"
    _train(TinyDetector(), _loader(), path, max_iters=4)
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="sgd.pt.*SGD.*AdamW"):
        _train(TinyDetector(), _loader(), path, max_iters=8, optimizer="adamw")
    assert path.read_bytes() == before

"""Tests of roi_align.py: hand-computed values, equality with torchvision (values and gradients),
edge cases, and the multi-level gather against one ``roi_align`` per level."""

import pytest
import torch
from torch.testing import assert_close
from torchvision.ops import roi_align as torchvision_roi_align

import two_stage_detector
from common import FPN_STRIDES
from roi_align import multi_level_roi_align, roi_align


def test_roi_align_is_re_exported_by_two_stage_detector():
    assert two_stage_detector.roi_align is roi_align  # one definition, which the docs import from there


def test_roi_align_hand_computed():
    # A 2 x 2 map [[0, 1], [2, 3]]. The box (0, 0, 2, 2) covers it; aligned, its one sampling point
    # is at the box centre, feature coordinates (0.5, 0.5): the mean of the four pixels, 1.5.
    features = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    whole = roi_align(features, torch.tensor([[0.0, 0, 0, 2, 2]]), (1, 1), sampling_ratio=1)
    assert_close(whole, torch.tensor([[[[1.5]]]]))
    # 2 x 2 bins of the same box, one point each at the pixel centres (0, 0), (0, 1), (1, 0), (1, 1).
    cells = roi_align(features, torch.tensor([[0.0, 0, 0, 2, 2]]), (2, 2), sampling_ratio=1)
    assert_close(cells, features)
    # Points past the last pixel centre read the last pixel; more than one pixel outside, nothing.
    # Box (1, 0, 3, 2) has its points at x = 1.5 - 0.5 = 1 (pixel 1) and x = 2.5 - 0.5 = 2 (one pixel
    # outside: pixel 1 alone), in rows 0 and 1; box (3, 0, 5, 2) at x = 3 and 4, outside: 0.
    right = roi_align(features, torch.tensor([[0.0, 1, 0, 3, 2], [0.0, 3, 0, 5, 2]]), (2, 2), sampling_ratio=1)
    assert_close(right[0, 0], torch.tensor([[1.0, 1.0], [3.0, 3.0]]))
    assert_close(right[1], torch.zeros(1, 2, 2))


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [1, 2, 3])
def test_roi_align_equals_torchvision_values_and_gradients(aligned, sampling_ratio):
    torch.manual_seed(0)
    features = torch.randn(3, 5, 9, 13, dtype=torch.float64, requires_grad=True)
    corner = torch.rand(60, 2, dtype=torch.float64) * 140 - 30  # some boxes reach past the border
    size = torch.rand(60, 2, dtype=torch.float64) * 80
    size[:5] = 0  # degenerate boxes
    rois = torch.cat([torch.randint(0, 3, (60, 1)).double(), corner, corner + size], dim=1)
    args = ((7, 5), 1 / 8, sampling_ratio, aligned)
    ours, theirs = roi_align(features, rois, *args), torchvision_roi_align(features, rois, *args)
    assert ours.shape == (60, 5, 7, 5)
    assert_close(ours, theirs)
    grad_out = torch.randn_like(ours)
    (our_grad,) = torch.autograd.grad(ours, features, grad_out)
    (their_grad,) = torch.autograd.grad(theirs, features, grad_out)
    assert_close(our_grad, their_grad)


def test_roi_align_edge_cases():
    torch.manual_seed(0)
    features = torch.randn(2, 4, 6, 6)
    assert roi_align(features, torch.zeros(0, 5), (7, 7)).shape == (0, 4, 7, 7)
    channels_last = features.contiguous(memory_format=torch.channels_last)
    rois = torch.tensor([[1.0, 3, 5, 40, 30]])
    assert_close(roi_align(channels_last, rois, (3, 3), 0.125), roi_align(features, rois, (3, 3), 0.125))
    # bf16 features (mixed precision) are summed in float32: the result is the exact one rounded to
    # bf16, give or take one bf16 step (2^-7 relative) where float32 summation order tips a rounding.
    half = roi_align(features.bfloat16(), rois, (3, 3), 0.125)
    assert half.dtype == torch.bfloat16
    exact = torchvision_roi_align(features.bfloat16().float(), rois, (3, 3), 0.125, 2, True)
    assert_close(half.float(), exact, rtol=2**-7, atol=1e-6)
    with pytest.raises(ValueError, match="sampling_ratio"):
        roi_align(features, rois, (7, 7), sampling_ratio=0)


def test_multi_level_roi_align_equals_roi_align_on_each_rois_own_level():
    """Each RoI, cut from its own level and image of the one shared table, must equal ``roi_align`` on
    that level alone: a wrong first row or map size of a level would read another level's pixels."""
    torch.manual_seed(0)
    S = 64
    feats = {level: torch.randn(2, 3, S // s, S // s, dtype=torch.float64) for level, s in FPN_STRIDES.items()}
    rois = torch.tensor(
        [[0.0, 4, 4, 30, 20], [1.0, 10, 0, 60, 50], [1.0, 0, 0, 64, 64], [0.0, 33, 12, 40, 63], [1.0, 5, 5, 6, 6]],
        dtype=torch.float64,
    )
    levels = torch.tensor([0, 2, 1, 1, 0])
    ours = multi_level_roi_align(feats, FPN_STRIDES, rois, levels, (3, 2), sampling_ratio=2)
    assert ours.shape == (5, 3, 3, 2)
    for r, level_index in enumerate(levels.tolist()):
        level = list(FPN_STRIDES)[level_index]
        expected = roi_align(feats[level], rois[r : r + 1], (3, 2), 1 / FPN_STRIDES[level], 2, True)
        assert_close(ours[r : r + 1], expected)


def test_multi_level_roi_align_without_rois():
    feats = {level: torch.randn(1, 4, 32 // s, 32 // s) for level, s in FPN_STRIDES.items()}
    empty = multi_level_roi_align(feats, FPN_STRIDES, torch.zeros(0, 5), torch.zeros(0, dtype=torch.long), (7, 7))
    assert empty.shape == (0, 4, 7, 7)

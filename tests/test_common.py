"""Tests for common.py: backbone shapes and weights, locations, IoU, NMS."""

import pytest
import torch
import torchvision
from torch.testing import assert_close

import common
from common import (
    BACKGROUND,
    NEUTRAL,
    DetectorBackboneWithFPN,
    batched_class_nms,
    cat_across_fpn_levels,
    class_spec_nms,
    clip_boxes_to_image,
    fpn_locations_of,
    get_fpn_location_coords,
    iou,
    is_background,
    is_matched,
    nms,
)


@pytest.fixture(scope="module")
def backbone():
    return DetectorBackboneWithFPN(out_channels=64, pretrained=False).eval()


@pytest.mark.parametrize(
    ("height", "width"),
    [(224, 224), (160, 256)],  # the course's size and a non-square one
)
def test_backbone_shapes(backbone, height, width):
    with torch.no_grad():
        feats = backbone(torch.randn(2, 3, height, width))
    assert list(feats) == ["p3", "p4", "p5"]
    for level, stride in backbone.fpn_strides.items():
        assert feats[level].shape == (2, 64, height // stride, width // stride)
    assert backbone.fpn_strides == {"p3": 8, "p4": 16, "p5": 32}
    assert backbone.out_channels == 64


def test_backbone_loads_state_dict_from_path(tmp_path):
    trunk = torchvision.models.regnet_x_400mf(weights=None)
    with torch.no_grad():
        trunk.stem[0].weight.fill_(0.125)
    path = tmp_path / "regnet_x_400mf.pth"
    torch.save(trunk.state_dict(), path)

    loaded = DetectorBackboneWithFPN(out_channels=32, pretrained=str(path))
    assert_close(loaded.backbone.stem[0].weight, trunk.stem[0].weight)
    layer = "trunk_output.block4.block4-0.f.b.0.weight"
    assert_close(loaded.backbone.state_dict()[layer], trunk.state_dict()[layer])


def test_backbone_missing_weights_file_names_the_path(tmp_path):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        DetectorBackboneWithFPN(out_channels=32, pretrained=missing)


def test_backbone_offline_imagenet_weights_error_names_cache_and_alternatives(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    with pytest.raises(RuntimeError) as error:
        DetectorBackboneWithFPN(out_channels=32, pretrained=True)
    message = str(error.value)
    assert str(tmp_path / "checkpoints") in message
    assert "pretrained=False" in message and "path" in message


def test_location_coords_are_row_major():
    shapes = {"p3": (2, 64, 28, 28), "p4": (2, 64, 14, 14), "p5": (2, 64, 7, 7)}
    locations = get_fpn_location_coords(shapes, {"p3": 8, "p4": 16, "p5": 32})
    assert {k: tuple(v.shape) for k, v in locations.items()} == {"p3": (784, 2), "p4": (196, 2), "p5": (49, 2)}
    # API.md: x runs fastest; centre of row i, column j is ((j + 0.5) * 8, (i + 0.5) * 8).
    expected_first = torch.tensor([[4.0, 4.0], [12.0, 4.0], [20.0, 4.0], [28.0, 4.0], [36.0, 4.0]])
    assert_close(locations["p3"][:5], expected_first)
    # Index 28 is row 1, column 0 of p3: (0.5 * 8, 1.5 * 8) = (4, 12).
    assert_close(locations["p3"][28], torch.tensor([4.0, 12.0]))
    # Last p5 location: row 6, column 6 -> (6.5 * 32, 6.5 * 32) = (208, 208).
    assert_close(locations["p5"][-1], torch.tensor([208.0, 208.0]))


def test_location_order_matches_head_flattening():
    # A feature whose channels hold each location's own centre must flatten to the coordinates.
    stride, Hl, Wl = 16, 3, 5
    locations = get_fpn_location_coords({"p4": (1, 2, Hl, Wl)}, {"p4": stride})["p4"]
    xs = (torch.arange(Wl) + 0.5) * stride
    ys = (torch.arange(Hl) + 0.5) * stride
    feature = torch.stack([xs[None, :].expand(Hl, Wl), ys[:, None].expand(Hl, Wl)])[None]  # (1, 2, Hl, Wl)
    flattened = feature.permute(0, 2, 3, 1).reshape(1, Hl * Wl, 2)[0]
    assert_close(flattened, locations)


def test_location_coords_accept_feature_tensors_dtype_and_device():
    feats = {"p3": torch.zeros(1, 4, 2, 3)}
    locations = get_fpn_location_coords(feats, {"p3": 8}, dtype=torch.float64)
    assert locations["p3"].dtype == torch.float64
    assert_close(locations["p3"][-1], torch.tensor([20.0, 12.0], dtype=torch.float64))


def test_iou_sanity_values():
    boxes1 = torch.tensor([[10, 10, 90, 90], [20, 20, 40, 40], [60, 60, 80, 80]], dtype=torch.float32)
    boxes2 = torch.tensor([[10, 10, 90, 90], [60, 60, 80, 80], [30, 30, 70, 70]], dtype=torch.float32)
    # [20,20,40,40] vs [30,30,70,70]: intersection 10*10 = 100, union 400 + 1600 - 100 = 1900 -> 1/19.
    expected = torch.tensor([[1, 0.0625, 0.25], [0.0625, 0, 0.052631579], [0.0625, 1, 0.052631579]])
    result = iou(boxes1, boxes2)
    error = (result - expected).abs().max() / expected.abs().max()
    assert error < 1e-7, f"expected {expected.tolist()}, got {result.tolist()}"
    assert_close(result, torchvision.ops.box_iou(boxes1, boxes2))


def test_iou_degenerate_boxes_give_zero_not_nan():
    points = torch.tensor([[5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 0.0, 10.0]])
    inverted = torch.tensor([[10.0, 10.0, 0.0, 0.0]])
    result = iou(torch.cat([points, inverted]), torch.cat([points, inverted]))
    assert not result.isnan().any()
    assert_close(result, torch.zeros(3, 3))
    assert iou(torch.zeros(0, 4), points).shape == (0, 2)


def _random_nms_boxes(seed: int, count: int = 5000):
    generator = torch.Generator().manual_seed(seed)
    boxes = (100 * torch.rand(count, 4, generator=generator)).round()
    boxes[:, 2] += boxes[:, 0] + 1
    boxes[:, 3] += boxes[:, 1] + 1
    return boxes, torch.randn(count, generator=generator)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_nms_equals_torchvision(seed, threshold):
    boxes, scores = _random_nms_boxes(seed)
    kept = nms(boxes, scores, threshold)
    assert kept.dtype == torch.long
    assert torch.equal(kept, torchvision.ops.nms(boxes, scores, threshold))


def test_nms_hand_made_case():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30], [0, 0, 10, 10.0]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    # Box 3 (0.95) suppresses its twin box 0 (IoU 1) and box 1 (IoU 90/110 = 0.82); box 2 is apart.
    assert nms(boxes, scores, 0.5).tolist() == [3, 2]
    # At threshold 0.85 box 1 survives (0.82 is not > 0.85) but box 0 (IoU 1) does not.
    assert nms(boxes, scores, 0.85).tolist() == [3, 1, 2]
    assert nms(torch.zeros(0, 4), torch.zeros(0)).shape == (0,)


def test_class_spec_nms_only_suppresses_within_a_class():
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    class_ids = torch.tensor([0, 1, 0])
    assert class_spec_nms(boxes, scores, class_ids, 0.5).tolist() == [0, 1]
    expected = torchvision.ops.batched_nms(boxes, scores, class_ids, 0.5)
    assert torch.equal(class_spec_nms(boxes, scores, class_ids, 0.5), expected)


def test_class_spec_nms_equals_torchvision_batched_nms():
    boxes, scores = _random_nms_boxes(seed=3, count=2000)
    class_ids = torch.randint(0, 20, (2000,), generator=torch.Generator().manual_seed(3))
    expected = torchvision.ops.batched_nms(boxes, scores, class_ids, 0.5)
    assert torch.equal(class_spec_nms(boxes, scores, class_ids, 0.5), expected)


@pytest.mark.parametrize("limit", [5, 100])
def test_batched_class_nms_equals_class_spec_nms_image_by_image(limit):
    boxes, scores = _random_nms_boxes(seed=4, count=3000)
    generator = torch.Generator().manual_seed(4)
    labels = torch.randint(0, 20, (3000,), generator=generator)
    image_ids = torch.randint(0, 3, (3000,), generator=generator)  # image 3 of 4 has no boxes
    parts = batched_class_nms(boxes, scores, labels, image_ids, 4, 20, 0.5, limit)
    assert len(parts) == 4 and parts[3].numel() == 0
    for image in range(3):
        own = (image_ids == image).nonzero().squeeze(1)
        expected = own[class_spec_nms(boxes[own], scores[own], labels[own], 0.5)][:limit]
        assert torch.equal(parts[image], expected)
    empty = batched_class_nms(
        torch.zeros(0, 4),
        torch.zeros(0),
        torch.zeros(0, dtype=torch.long),
        torch.zeros(0, dtype=torch.long),
        2,
        20,
        0.5,
        limit,
    )
    assert [part.numel() for part in empty] == [0, 0]


def test_fpn_locations_of_are_computed_once_per_size():
    strides = {"p3": 8, "p4": 16}
    feats = {"p3": torch.zeros(2, 4, 6, 5), "p4": torch.zeros(2, 4, 3, 3)}
    first = fpn_locations_of(feats, strides, torch.float32)
    expected = get_fpn_location_coords(feats, strides)
    assert all(torch.equal(first[level], expected[level]) for level in strides)
    assert fpn_locations_of(feats, strides, torch.float32)["p3"] is first["p3"]  # reused, not rebuilt
    other = fpn_locations_of({"p3": torch.zeros(1, 4, 4, 4), "p4": torch.zeros(1, 4, 2, 2)}, strides, torch.float32)
    assert other["p3"].shape == (16, 2)


def test_cat_across_fpn_levels_keeps_level_order():
    per_level = {"p3": torch.zeros(2, 3, 1), "p4": torch.ones(2, 2, 1), "p5": torch.full((2, 1, 1), 2.0)}
    joined = cat_across_fpn_levels(per_level)
    assert joined.shape == (2, 6, 1)
    assert joined[0, :, 0].tolist() == [0, 0, 0, 1, 1, 2]


def test_clip_boxes_to_image_does_not_modify_input():
    boxes = torch.tensor([[-5.0, 3.0, 300.0, 120.0]])
    clipped = clip_boxes_to_image(boxes, (100, 200))  # (H, W)
    assert clipped.tolist() == [[0.0, 3.0, 200.0, 100.0]]
    assert boxes.tolist() == [[-5.0, 3.0, 300.0, 120.0]]


def test_sentinels_and_their_predicates():
    assert (BACKGROUND, NEUTRAL) == (-1.0, -1e8)  # API.md: background rows all -1, neutral rows all -1e8
    rows = torch.tensor([[0.0, 0, 10, 10, 2], [BACKGROUND] * 5, [NEUTRAL] * 5, [-1.0, 0, 5, 5, 0]])
    assert is_background(rows).tolist() == [False, True, False, False]
    assert is_matched(rows).tolist() == [True, False, False, True]
    # Without a class column (boxes or deltas) the coordinates decide.
    assert is_background(rows[:, :4]).tolist() == [False, True, False, False]
    assert is_matched(rows[:, :4]).tolist() == [True, False, False, True]
    assert is_background(rows[None]).shape == (1, 4)  # any leading dimensions


def test_hello_common(capsys):
    common.hello_common()
    assert capsys.readouterr().out.strip() == "Hello from common.py!"


def test_backbone_with_p2_shapes_and_same_start_for_p3_to_p5():
    torch.manual_seed(3)
    course = DetectorBackboneWithFPN(out_channels=16, pretrained=False)
    torch.manual_seed(3)
    with_p2 = DetectorBackboneWithFPN(out_channels=16, pretrained=False, levels=("p2", "p3", "p4", "p5"))
    assert with_p2.fpn_strides == {"p2": 4, "p3": 8, "p4": 16, "p5": 32}
    with torch.no_grad():
        feats = with_p2.eval()(torch.randn(2, 3, 160, 96))
    assert list(feats) == ["p2", "p3", "p4", "p5"]
    for level, stride in with_p2.fpn_strides.items():
        assert feats[level].shape == (2, 16, 160 // stride, 96 // stride)
    # p2 only adds weights: the course's keys are unchanged (old checkpoints load), and p3-p5 start
    # from the same draws, so that the benchmark compares like with like.
    course_weights, p2_weights = course.state_dict(), with_p2.state_dict()
    assert set(p2_weights) - set(course_weights) == {
        f"fpn_params.{k}_p2.{p}" for k in ("lateral", "output") for p in ("weight", "bias")
    }
    assert all(torch.equal(course_weights[k], p2_weights[k]) for k in course_weights)


@pytest.mark.parametrize("levels", [("p3", "p4"), ("p2", "p4", "p5"), (), ("p6",), ("p5", "p4", "p3")])
def test_backbone_refuses_other_levels(levels):
    with pytest.raises(ValueError, match=r"FPN levels must be \('p3', 'p4', 'p5'\) or \('p2'"):
        DetectorBackboneWithFPN(out_channels=16, pretrained=False, levels=levels)


def _with_running_statistics(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every BatchNorm running statistics and an affine map that are far from their start (0, 1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in (m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            channels = bn.num_features
            bn.running_mean.copy_(torch.randn(channels, generator=generator))
            bn.running_var.copy_(torch.rand(channels, generator=generator) * 2 + 0.1)
            if bn.affine:
                bn.weight.copy_(torch.randn(channels, generator=generator))
                bn.bias.copy_(torch.randn(channels, generator=generator))
    return module


@pytest.mark.parametrize(
    ("groups", "bias", "affine"), [(1, False, True), (1, True, True), (2, False, True), (1, True, False)]
)
def test_fold_batchnorm_into_conv_equals_conv_then_batchnorm(groups, bias, affine):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 6, 3, padding=1, groups=groups, bias=bias)
    bn = _with_running_statistics(torch.nn.BatchNorm2d(6, affine=affine)).eval()
    x = torch.randn(2, 8, 9, 7)
    with torch.no_grad():
        assert_close(common.fold_batchnorm_into_conv(conv, bn)(x), bn(conv(x)), rtol=1e-5, atol=1e-5)


def test_fold_batchnorm_folds_every_batchnorm_of_the_trunk_and_leaves_the_original_alone():
    trunk = _with_running_statistics(DetectorBackboneWithFPN(16, pretrained=False).backbone).eval()
    before = {name: tensor.clone() for name, tensor in trunk.state_dict().items()}
    folded = common.fold_batchnorm(trunk)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in trunk.modules()) == 71  # RegNetX-400MF's
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        for stage, expected in trunk(x).items():
            assert_close(folded(x)[stage], expected, rtol=1e-4, atol=1e-4)
    for name, tensor in trunk.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def _backbone_outputs(backbone: DetectorBackboneWithFPN, images: torch.Tensor, fold: bool):
    backbone.fold_batchnorm = fold
    with torch.no_grad():
        return backbone(images)


def _assert_same_up_to_rounding(actual, expected):
    assert_close(actual, expected, rtol=1e-4, atol=1e-4)  # random statistics amplify float32 rounding


def test_backbone_folds_batchnorm_in_eval_only_and_follows_every_weight_change():
    torch.manual_seed(0)
    backbone = _with_running_statistics(DetectorBackboneWithFPN(16, pretrained=False, fine_p3=True))
    keys = list(backbone.state_dict())
    images = torch.randn(2, 3, 64, 64)
    backbone.eval()
    _assert_same_up_to_rounding(_backbone_outputs(backbone, images, True), _backbone_outputs(backbone, images, False))
    assert backbone._folded_trunk is not None and list(backbone.state_dict()) == keys  # the copy is not saved

    # A training step changes weights and running statistics; eval mode must then fold the new ones.
    backbone.train()
    optimizer = torch.optim.SGD(backbone.parameters(), lr=0.1)
    sum(level.square().mean() for level in backbone(images).values()).backward()
    optimizer.step()
    backbone.eval()
    after_step = _backbone_outputs(backbone, images, True)
    _assert_same_up_to_rounding(after_step, _backbone_outputs(backbone, images, False))

    # So must loading other weights while in eval mode, and a change of dtype.
    other = _with_running_statistics(DetectorBackboneWithFPN(16, pretrained=False, fine_p3=True), seed=1)
    backbone.load_state_dict(other.state_dict())
    loaded = _backbone_outputs(backbone, images, True)
    _assert_same_up_to_rounding(loaded, _backbone_outputs(other.eval(), images, False))
    assert not torch.allclose(loaded["p3"], after_step["p3"])
    backbone.double()
    doubled = images.double()
    _assert_same_up_to_rounding(_backbone_outputs(backbone, doubled, True), _backbone_outputs(backbone, doubled, False))
    assert backbone._folded_trunk.module.stem[0].weight.dtype == torch.float64

    # Switching to eval mode after replacing a part of the trunk folds the new part; eval() in eval mode keeps the copy.
    folded = backbone._folded_trunk
    backbone.eval()
    assert backbone._folded_trunk is folded
    backbone.backbone.stem[0] = torch.nn.Conv2d(3, 32, 3, stride=2, padding=1, bias=False).double()
    backbone.train().eval()
    _assert_same_up_to_rounding(_backbone_outputs(backbone, doubled, True), _backbone_outputs(backbone, doubled, False))


def test_backbone_in_eval_runs_a_hooked_trunk_itself():
    backbone = DetectorBackboneWithFPN(16, pretrained=False).eval()
    images = torch.randn(1, 3, 64, 64)
    _backbone_outputs(backbone, images, True)  # the folded copy exists before the hook does
    seen = []
    handle = backbone.backbone.stem.register_forward_hook(lambda *args: seen.append(1))
    _backbone_outputs(backbone, images, True)
    handle.remove()
    _backbone_outputs(backbone, images, True)
    assert seen == [1]

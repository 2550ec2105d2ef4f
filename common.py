"""Pieces that both detectors share: the backbone with FPN, locations, IoU and NMS.

Conventions (every other module points here)
--------------------------------------------
Boxes
    Absolute input-pixel floats ``(x1, y1, x2, y2)``; x runs along the width. A valid box has
    ``x1 < x2`` and ``y1 < y2``. Coordinates are continuous: a box's width is ``x2 - x1`` (no +1).
Ground truth
    One image: ``(M, 5)`` rows ``(x1, y1, x2, y2, C)`` with the class ``C`` in ``0..K-1`` stored as
    a float. A batch: ``(B, M, 5)``. Padding rows are all ``-1``; the datasets pad to ``M = 40``.
Sentinels
    A location or anchor matched to background gets the row ``(-1, -1, -1, -1, -1)``. An anchor that
    R-CNN matching ignores ("neutral") gets all five values ``-1e8``. Both live here once, as
    ``BACKGROUND`` and ``NEUTRAL``, with their predicates ``is_background`` and ``is_matched``.
FPN levels
    ``"p3", "p4", "p5"`` with strides 8, 16, 32. A 224 x 224 image has 28*28 + 14*14 + 7*7 = 1029
    locations. FCOS can add ``"p2"`` (stride 4) in front (``DetectorBackboneWithFPN``'s ``levels``).
Location order
    Row-major: index ``i * Wl + j`` is the location at row ``i``, column ``j``, whose centre is
    ``x = (j + 0.5) * stride``, ``y = (i + 0.5) * stride``. This is exactly the order in which
    ``feature.permute(0, 2, 3, 1).reshape(B, Hl * Wl, C)`` flattens a head's output, so targets
    and predictions line up. (The original course assignment swapped x and y here, which silently
    halved the mAP of everyone who matched it.)

Dimension letters
    B images in a batch, K classes (no background), L FPN levels, Hl x Wl the size of level l,
    HW all locations of an image over all levels, A anchors per location, HWA all anchors of an
    image, M ground-truth rows, P proposals, N any other count of boxes.
"""

import copy
import functools
import math
import os
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torchvision
from torch import nn
from torch.nn import functional as F
from torchvision.models import feature_extraction

TensorDict = Dict[str, torch.Tensor]

FPN_STRIDES = {"p3": 8, "p4": 16, "p5": 32}  # the course's levels, every detector's default
# Every level the backbone can build, and the two sets of levels a detector can use.
ALL_FPN_STRIDES = {"p2": 4, **FPN_STRIDES}
FPN_LEVELS = tuple(FPN_STRIDES)  # ("p3", "p4", "p5")
P2_LEVELS = tuple(ALL_FPN_STRIDES)  # ("p2", "p3", "p4", "p5")

BACKGROUND = -1.0  # every value of the matched row of a background location, anchor or proposal
NEUTRAL = -1e8  # every value of the matched row of an anchor that R-CNN matching ignores

# RegNetX-400MF stages that give c2, c3, c4, c5 (strides 4, 8, 16, 32) and their widths.
_TRUNK_NODES = {
    "trunk_output.block1": "c2",
    "trunk_output.block2": "c3",
    "trunk_output.block3": "c4",
    "trunk_output.block4": "c5",
}
_TRUNK_CHANNELS = {"c2": 32, "c3": 64, "c4": 160, "c5": 400}

# Inference defaults of both detectors (``predict``, the course's ``inference``, the evaluation and the
# command line). A low score threshold keeps the low-confidence tail that average precision rewards
# (FCOS and Faster R-CNN use 0.05 for COCO results); pictures pass a higher one. NMS at IoU 0.5 is
# Fast R-CNN's and the course's value (torchvision's FCOS uses 0.6; on the accuracy benchmark the
# two differ little).
SCORE_THRESH = 0.05
NMS_THRESH = 0.5
# The score threshold of pictures (the command line's, the notebooks' and the photos'): a picture shows
# the boxes a person would act on, not the low-confidence tail that the mAP counts.
PICTURE_SCORE_THRESH = 0.3

# Boxes that NMS settles together; 256 keeps each IoU block small and the Python loop short.
_NMS_BLOCK = 256


def hello_common():
    print("Hello from common.py!")


def _imagenet_regnet_state_dict() -> TensorDict:
    """torchvision's ImageNet weights for RegNetX-400MF, from the torch hub cache or the network."""
    weights = torchvision.models.RegNet_X_400MF_Weights.DEFAULT
    cache_file = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    try:
        return torch.hub.load_state_dict_from_url(weights.url, progress=True, check_hash=True)
    except Exception as error:  # no network, a proxy, a truncated download: all end here
        raise RuntimeError(
            "Could not get the ImageNet weights of RegNetX-400MF "
            f"({type(error).__name__}: {error}).\n"
            f"torchvision looks for them in {cache_file} and downloads them from {weights.url}.\n"
            "To fix this, either put that file there (download it on a machine with internet), "
            "or pass pretrained=<path to a saved state dict of torchvision's regnet_x_400mf>, "
            "or pass pretrained=False to start from random weights."
        ) from error


def _load_trunk_weights(trunk: nn.Module, pretrained: Union[bool, str, os.PathLike]) -> None:
    if pretrained is False:
        return
    if pretrained is True:
        state_dict = _imagenet_regnet_state_dict()
    else:
        path = os.fspath(pretrained)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"No weights file at {path!r}. Pass the path of a state dict saved from torchvision's "
                "regnet_x_400mf, pretrained=True for the ImageNet weights, or pretrained=False."
            )
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    # The classifier ("fc.*") is not part of the trunk; every other key must fit exactly.
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
    trunk.load_state_dict(state_dict, strict=False)
    missing = [k for k in trunk.state_dict() if k not in state_dict and not k.startswith("fc.")]
    if missing:
        raise RuntimeError(f"The weights in {pretrained!r} are not RegNetX-400MF weights: missing {missing[:3]}...")


class DetectorBackboneWithFPN(nn.Module):
    """RegNetX-400MF trunk (c3, c4, c5) followed by a Feature Pyramid Network (p3, p4, p5).

    FPN (Lin et al., 2017, Sec. 3): 1x1 lateral convs bring every stage to ``out_channels``; a
    top-down pathway adds each coarser map, upsampled, to the finer one; a 3x3 conv smooths each
    sum. Inputs of any size work; sides that are multiples of 32 give exact strides.

    Args:
        out_channels: channels C of every FPN level.
        pretrained: ``True`` for torchvision's ImageNet weights, a path to a saved state dict of
            ``torchvision.models.regnet_x_400mf``, or ``False`` for random initialisation.
        levels: the FPN levels to build, consecutive, finest first: the course's ``("p3", "p4", "p5")``,
            or ``("p2", "p3", "p4", "p5")``, which adds a level of stride 4 from the trunk's c2 (the
            FPN paper's finest level, Sec. 4.1). The added weights are drawn after the others, so a seed
            gives p3-p5 the same initial weights either way.
        fine_p3: also feed the trunk's stride-4 stage c2 into p3, through a 3x3 conv of stride 2 added
            to p3's lateral (the first step of PANet's bottom-up path, Liu et al., CVPR 2018, 3.1,
            without building p2). c3 has already pooled away where inside each 8-px cell an edge lies;
            c2 still knows, which is what a box of 10 px needs. It costs one small conv on p3.
        fold_batchnorm: in eval mode, run a copy of the trunk whose BatchNorm layers are folded into the
            convolutions before them (``fold_batchnorm``): the same outputs up to float rounding, with 71 fewer
            passes over the activations. The copy is rebuilt whenever a weight or running statistic changes in
            place or moves (``.to()``), and at every switch from training to eval mode: after replacing a part
            of the trunk, call ``train()`` and ``eval()``. It is never part of ``state_dict()``; training always
            runs the trunk itself, and so does eval mode while a hook is on the trunk, so that the hook sees it
            run.
    """

    def __init__(
        self,
        out_channels: int,
        pretrained: Union[bool, str, os.PathLike] = True,
        *,
        levels: Sequence[str] = FPN_LEVELS,
        fine_p3: bool = False,
        fold_batchnorm: bool = True,
    ):
        super().__init__()
        self.out_channels = out_channels
        self.fold_batchnorm = fold_batchnorm
        self._folded_trunk = None  # a _FoldedTrunk in eval mode: not a submodule, so not in state_dict() or .to()
        self.levels = check_fpn_levels(levels)
        self.fine_p3 = fine_p3
        self._stages = tuple(f"c{level[1:]}" for level in self.levels)  # "p3" is built from "c3"
        trunk_stages = self._stages + (("c2",) if fine_p3 else ())
        trunk = torchvision.models.regnet_x_400mf(weights=None)
        _load_trunk_weights(trunk, pretrained)
        nodes = {node: stage for node, stage in _TRUNK_NODES.items() if stage in trunk_stages}
        self.backbone = feature_extraction.create_feature_extractor(trunk, return_nodes=nodes)
        self.fpn_params = nn.ModuleDict()
        # The course's levels first, p2 last: a seed gives the shared weights the same values with or without it.
        for c_name, level in zip(self._stages, self.levels):
            if level in FPN_STRIDES:
                self._add_level(level, c_name)
        if fine_p3:
            self.fpn_params["c2_to_p3"] = nn.Conv2d(_TRUNK_CHANNELS["c2"], out_channels, 3, stride=2, padding=1)
        if "p2" in self.levels:
            self._add_level("p2", "c2")

    @staticmethod
    def options_of(state_dict: Mapping[str, torch.Tensor], prefix: str = "backbone.") -> Dict[str, object]:
        """The ``levels`` and ``fine_p3`` of the backbone whose weights ``state_dict`` holds (under
        ``prefix``, as a detector's ``state_dict()`` has them), to build one that the weights fit.

        Args:
            state_dict: a detector's (or, with ``prefix=""``, a backbone's) state dict.
        Returns:
            ``{"levels": (...), "fine_p3": bool}``.
        """
        has = lambda name: f"{prefix}fpn_params.{name}.weight" in state_dict  # noqa: E731
        return {"levels": P2_LEVELS if has("lateral_p2") else FPN_LEVELS, "fine_p3": has("c2_to_p3")}

    def _add_level(self, level: str, c_name: str) -> None:
        self.fpn_params[f"lateral_{level}"] = nn.Conv2d(_TRUNK_CHANNELS[c_name], self.out_channels, 1)
        self.fpn_params[f"output_{level}"] = nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1)

    @property
    def fpn_strides(self) -> Dict[str, int]:
        return {level: ALL_FPN_STRIDES[level] for level in self.levels}

    def forward(self, images: torch.Tensor) -> TensorDict:
        """Args: images (B, 3, H, W). Returns: {"p3": (B, C, H/8, W/8), "p4": .../16, "p5": .../32},
        with ``"p2": (B, C, H/4, W/4)`` first when the backbone has that level.

        After ``detector.to(memory_format=torch.channels_last)`` the images are laid out the same way
        here, so every conv runs in that layout (faster on GPUs with mixed precision, and on many CPUs).
        """
        if self.fpn_params[f"output_{self.levels[0]}"].weight.is_contiguous(memory_format=torch.channels_last):
            images = images.contiguous(memory_format=torch.channels_last)
        c_feats = self._trunk_to_run()(images)
        fpn_feats = {}
        top_down = None
        for c_name, level in reversed(list(zip(self._stages, self.levels))):
            lateral = self.fpn_params[f"lateral_{level}"](c_feats[c_name])
            if level == "p3" and self.fine_p3:
                lateral = lateral + self.fpn_params["c2_to_p3"](c_feats["c2"])
            if top_down is not None:
                lateral = lateral + F.interpolate(top_down, size=lateral.shape[-2:], mode="nearest")
            top_down = lateral
            fpn_feats[level] = self.fpn_params[f"output_{level}"](lateral)
        return {level: fpn_feats[level] for level in self.levels}

    def train(self, mode: bool = True):
        if self.training and not mode:  # each switch to eval mode folds anew, parts replaced since included
            self._folded_trunk = None
        return super().train(mode)

    def _trunk_to_run(self) -> nn.Module:
        """The trunk, or in eval mode its copy with BatchNorm folded in, rebuilt when a weight has changed."""
        trunk = self.backbone
        if self.training or not self.fold_batchnorm or torch.compiler.is_compiling():
            return trunk  # (torch.compile traces the trunk itself, and its inductor can fold on its own)
        if self._folded_trunk is None:
            modules = list(trunk.modules())
            tensors = [*trunk.parameters(), *trunk.buffers()]
            self._folded_trunk = _FoldedTrunk(modules, tensors, _fingerprint(tensors), fold_batchnorm(trunk))
        folded = self._folded_trunk
        if any(m._forward_hooks or m._forward_pre_hooks for m in folded.modules):
            return trunk  # hooks see the trunk itself run
        fingerprint = _fingerprint(folded.tensors)
        if fingerprint != folded.fingerprint:
            self._folded_trunk = folded = folded._replace(fingerprint=fingerprint, module=fold_batchnorm(trunk))
        return folded.module


class _FoldedTrunk(NamedTuple):
    modules: List[nn.Module]  # the trunk's modules, and their tensors, when the copy was made
    tensors: List[torch.Tensor]  # (held here, so that no new tensor can take their addresses)
    fingerprint: List[Tuple[int, int]]
    module: nn.Module  # the folded copy


def _fingerprint(tensors: List[torch.Tensor]) -> List[Tuple[int, int]]:
    """Where each tensor's data lives and its version counter, which rises with every in-place change (an
    optimizer step, ``load_state_dict``); ``.to()`` moves the data elsewhere."""
    return [(tensor.data_ptr(), tensor._version) for tensor in tensors]


def fold_batchnorm_into_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """One conv equal to ``bn(conv(x))`` with ``bn`` in eval mode (Ioffe and Szegedy, 2015, 3.1: at test
    time BatchNorm is a fixed affine map per channel, so it folds into the conv before it).

    With ``s = bn.weight / sqrt(bn.running_var + bn.eps)`` per output channel: ``weight' = weight * s``
    and ``bias' = (bias - running_mean) * s + bn.bias``.
    """
    dtype = torch.promote_types(conv.weight.dtype, torch.float32)  # folded in float32 at least, stored as before
    mean, var = bn.running_mean.to(dtype), bn.running_var.to(dtype)
    gamma = bn.weight.to(dtype) if bn.affine else torch.ones_like(mean)
    beta = bn.bias.to(dtype) if bn.affine else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + bn.eps)  # (C_out,)
    bias = conv.bias.to(dtype) if conv.bias is not None else torch.zeros_like(mean)
    folded = copy.deepcopy(conv)
    layout = torch.channels_last if conv.weight.is_contiguous(memory_format=torch.channels_last) else None
    weight = (conv.weight.to(dtype) * scale[:, None, None, None]).to(conv.weight.dtype)
    folded.weight = nn.Parameter(weight.contiguous(memory_format=layout or torch.contiguous_format))
    folded.bias = nn.Parameter(((bias - mean) * scale + beta).to(conv.weight.dtype))
    return folded


@torch.no_grad()
def fold_batchnorm(module: nn.Module) -> nn.Module:
    """A copy of ``module`` for inference in which every ``nn.Sequential``'s (Conv2d, BatchNorm2d) pair is
    one conv (``fold_batchnorm_into_conv``); ``module`` itself is unchanged. In RegNet every BatchNorm
    follows a conv that way (torchvision's ``Conv2dNormActivation``).

    Returns:
        The folded copy, in eval mode, without gradients.
    """
    with torch.inference_mode(False):  # plain tensors, usable outside inference mode too
        folded = copy.deepcopy(module).eval().requires_grad_(False)
        for sequential in [m for m in folded.modules() if isinstance(m, nn.Sequential)]:
            layers = list(sequential.children())
            for index in reversed(range(1, len(layers))):
                conv, bn = layers[index - 1], layers[index]
                if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
                    sequential[index - 1] = fold_batchnorm_into_conv(conv, bn).requires_grad_(False)
                    del sequential[index]
    return folded


def check_fpn_levels(levels: Sequence[str]) -> Tuple[str, ...]:
    """``levels`` as a tuple if they are ``FPN_LEVELS`` or ``P2_LEVELS``; else ``ValueError``."""
    levels = tuple(levels)
    if levels not in (FPN_LEVELS, P2_LEVELS):
        raise ValueError(f"FPN levels must be ('p3', 'p4', 'p5') or ('p2', 'p3', 'p4', 'p5'), got {levels!r}")
    return levels


def conv_stem(
    in_channels: int, stem_channels: Sequence[int], group_norm: bool = False, he_init: bool = False
) -> Tuple[nn.Sequential, int]:
    """3x3 conv (padding 1) + ReLU per entry of ``stem_channels``; weights N(0, 0.01), biases 0.

    The heads of both detectors start with such a stem (FCOS 3.1, Faster R-CNN 3.1).

    Args:
        in_channels: channels of the input.
        stem_channels: output channels of each conv.
        group_norm: GroupNorm (Wu and He, 2018) between each conv and its ReLU, with 32 groups (or
            as many as the channels allow). The FCOS journal version (Tian et al., TPAMI 2022, 4.1)
            puts it in the heads: shared over the FPN levels, a head sees features of very
            different scales, and normalising them makes training faster and steadier.
        he_init: weights from He et al.'s (2015) normal distribution for ReLU networks (std
            ``sqrt(2 / (9 * out_channels))``) instead of N(0, 0.01). Without a norm layer, N(0, 0.01)
            shrinks the signal about tenfold per conv (``0.01 * sqrt(9 * channels / 2)``), so a
            deep stem starts with almost no output and learns slowly; detectron2's and
            torchvision's conv heads of the second stage use He's init for this reason.
    Returns:
        The stem and its number of output channels (``in_channels`` when the stem is empty).
    """
    layers = []
    for out_channels in stem_channels:
        conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        if he_init:
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        else:
            nn.init.normal_(conv.weight, std=0.01)
        nn.init.zeros_(conv.bias)
        layers.append(conv)
        if group_norm:
            layers.append(nn.GroupNorm(math.gcd(32, out_channels), out_channels))
        layers.append(nn.ReLU(inplace=True))
        in_channels = out_channels
    return nn.Sequential(*layers), in_channels


def check_gt_classes(gt_boxes: torch.Tensor, num_classes: int) -> None:
    """Raise ``ValueError`` if a GT row that is not padding (all -1) has a class outside 0..K-1.

    Args:
        gt_boxes: (..., 5) rows ``(x1, y1, x2, y2, C)``; ``C`` must be a whole number.
    """
    labels = gt_boxes[..., 4]
    padding = (gt_boxes == -1).all(dim=-1)
    bad = ~padding & ((labels < 0) | (labels > num_classes - 1) | (labels != labels.round()))
    if bad.any():
        raise ValueError(
            f"Ground-truth class label {labels[bad][0].item():g} is outside 0..{num_classes - 1} "
            f"(num_classes K = {num_classes}); padding rows must be all -1."
        )


def is_background(gt_boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4 | 5) -> (...) True for background rows, whose coordinates are all ``BACKGROUND``
    (FCOS's background deltas are all ``BACKGROUND`` too)."""
    return (gt_boxes[..., :4] == BACKGROUND).all(dim=-1)


def is_matched(gt_boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4 | 5) -> (...) False for background and neutral rows: a class >= 0 when the rows have one,
    otherwise coordinates that are not all ``BACKGROUND`` and not all ``NEUTRAL``."""
    if gt_boxes.shape[-1] == 5:
        return gt_boxes[..., 4] >= 0
    coords = gt_boxes[..., :4]
    return ~(is_background(coords) | (coords == NEUTRAL).all(dim=-1))


def single_image_inference(
    detector: nn.Module, images: torch.Tensor, score_thresh: Optional[float], nms_thresh: Optional[float]
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The course's ``inference`` for both detectors: one image's detections as the triple ``(boxes (N, 4),
    classes (N,), scores (N,))``, from the detector's batched ``predict`` (thresholds ``None``:
    ``SCORE_THRESH`` and ``NMS_THRESH``)."""
    if images.shape[0] != 1:
        raise ValueError(
            f"{type(detector).__name__}.inference takes one image, got a batch of {images.shape[0]}; "
            "use predict() for batches."
        )
    score_thresh = SCORE_THRESH if score_thresh is None else score_thresh
    nms_thresh = NMS_THRESH if nms_thresh is None else nms_thresh
    detections = detector.predict(images, score_thresh=score_thresh, nms_thresh=nms_thresh)[0]
    return detections["boxes"], detections["labels"], detections["scores"]


def get_fpn_location_coords(
    shape_per_fpn_level: Mapping[str, Sequence[int]],
    strides_per_fpn_level: Mapping[str, int],
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
) -> TensorDict:
    """Centres of every feature location, in input-image pixels, in row-major order.

    Args:
        shape_per_fpn_level: {level: shape of that level's features, (B, C, Hl, Wl)}; the
            feature tensors themselves are accepted too.
        strides_per_fpn_level: {level: stride}.
    Returns:
        {level: (Hl*Wl, 2)} of ``(x, y)``; row ``i * Wl + j`` is ``((j + 0.5) * s, (i + 0.5) * s)``.
    """
    # BEGIN SOLUTION
    locations = {}
    for level, shape in shape_per_fpn_level.items():
        stride = strides_per_fpn_level[level]
        Hl, Wl = (shape.shape if torch.is_tensor(shape) else shape)[-2:]
        ys = (torch.arange(Hl, dtype=dtype, device=device) + 0.5) * stride
        xs = (torch.arange(Wl, dtype=dtype, device=device) + 0.5) * stride
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        locations[level] = torch.stack([grid_x, grid_y], dim=-1).reshape(Hl * Wl, 2)  # (Hl, Wl, 2) -> (HlWl, 2)
    return locations
    # END SOLUTION


@functools.lru_cache(maxsize=16)
def _cached_locations(shapes: tuple, strides: tuple, dtype: torch.dtype, device: torch.device) -> TensorDict:
    return get_fpn_location_coords(dict(shapes), dict(strides), dtype, device)


def fpn_locations_of(
    feats_per_fpn_level: TensorDict, strides_per_fpn_level: Mapping[str, int], dtype: torch.dtype
) -> TensorDict:
    """``get_fpn_location_coords`` of these features, computed once per (sizes, strides, dtype, device).

    Training and evaluation see the same image size step after step, so the detectors reuse the
    locations instead of rebuilding them every call. The tensors are shared: read them, never
    modify them in place.
    """
    first = next(iter(feats_per_fpn_level.values()))
    shapes = tuple((level, tuple(feats.shape[-2:])) for level, feats in feats_per_fpn_level.items())
    return _cached_locations(shapes, tuple(strides_per_fpn_level.items()), dtype, first.device)


def cat_across_fpn_levels(dict_with_fpn_levels: TensorDict, dim: int = 1) -> torch.Tensor:
    """Concatenate per-level tensors along ``dim`` in level order p3, p4, p5 (the one place we do)."""
    return torch.cat(list(dict_with_fpn_levels.values()), dim=dim)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Area of (..., 4) boxes; inverted sides count as zero, so areas are never negative."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def clip_boxes_to_image(boxes: torch.Tensor, image_size: Sequence[int]) -> torch.Tensor:
    """Clip (..., 4) boxes to an image of ``image_size = (H, W)``; returns a new tensor."""
    H, W = image_size
    return torch.minimum(boxes.clamp(min=0), boxes.new_tensor([W, H, W, H]))


def iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise intersection over union.

    Args:
        boxes1: (M, 4) and boxes2: (N, 4), ``(x1, y1, x2, y2)``.
    Returns:
        (M, N) IoU in [0, 1]. Pairs whose union is empty (two zero-area boxes) give 0, never NaN.
    """
    # BEGIN SOLUTION
    x1 = torch.maximum(boxes1[:, None, 0], boxes2[None, :, 0])  # (M, N)
    y1 = torch.maximum(boxes1[:, None, 1], boxes2[None, :, 1])
    x2 = torch.minimum(boxes1[:, None, 2], boxes2[None, :, 2])
    y2 = torch.minimum(boxes1[:, None, 3], boxes2[None, :, 3])
    intersection = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    union = box_area(boxes1)[:, None] + box_area(boxes2)[None, :] - intersection
    return intersection / union.clamp(min=torch.finfo(union.dtype).tiny)
    # END SOLUTION


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float = 0.5) -> torch.Tensor:
    """Greedy non-maximum suppression, equal to ``torchvision.ops.nms``.

    Greedy NMS walks the boxes by decreasing score and keeps a box iff no box kept before it
    overlaps it with IoU > threshold. We walk in blocks of ``_NMS_BLOCK`` boxes instead of one box
    at a time: a block's boxes are first checked against every box kept so far (one IoU matrix),
    then the rule is solved inside the block as a fixed point (Cluster-NMS, Zheng et al. 2020,
    Sec. 3.1): start with every surviving box kept and repeatedly drop each box that a kept,
    higher-scoring box of the block overlaps, until a pass changes nothing. Each pass settles at
    least one more box, and in practice a few passes suffice. IoUs are compared in float64, as
    torchvision's kernel does, so that a pair at exactly the threshold is treated the same way.

    Args:
        boxes: (N, 4); scores: (N,); iou_threshold: drop a box whose IoU with a kept box is > this.
    Returns:
        (num_kept,) ``long`` indices into ``boxes``, by decreasing score.
    """
    # BEGIN SOLUTION
    order = scores.argsort(descending=True, stable=True)
    if not boxes.dtype.is_floating_point or boxes.element_size() < 4:
        boxes = boxes.float()
    sorted_boxes = boxes[order]
    N = len(order)
    keep = torch.zeros(N, dtype=torch.bool, device=boxes.device)
    for start in range(0, N, _NMS_BLOCK):
        block = sorted_boxes[start : start + _NMS_BLOCK]
        kept_before = sorted_boxes[:start][keep[:start]]
        suppressed = (iou(kept_before, block).double() > iou_threshold).any(dim=0)  # (T,)
        # overlaps[i, j]: box i of the block outranks box j and would suppress it if i is kept.
        overlaps = (iou(block, block).double() > iou_threshold).triu_(diagonal=1).to(block.dtype)
        alive = ~suppressed
        block_keep = alive
        while True:
            new_keep = alive & (block_keep.to(block.dtype) @ overlaps == 0)  # (T,) @ (T, T) -> (T,)
            if torch.equal(new_keep, block_keep):
                break
            block_keep = new_keep
        keep[start : start + _NMS_BLOCK] = block_keep
    return order[keep]
    # END SOLUTION


def class_spec_nms(
    boxes: torch.Tensor, scores: torch.Tensor, class_ids: torch.Tensor, iou_threshold: float = 0.5
) -> torch.Tensor:
    """Per-class NMS in one call: each class's boxes are shifted so that classes never overlap.

    Args:
        boxes: (N, 4); scores: (N,); class_ids: (N,) integer (or integral float) class of each box.
    Returns:
        (num_kept,) ``long`` indices into ``boxes``, by decreasing score.
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    offsets = class_ids.to(boxes) * (boxes.max() - boxes.min() + 1)
    shifted = boxes + offsets[:, None]
    return nms(shifted, scores, iou_threshold)


def split_by_image(keep: torch.Tensor, image_ids: torch.Tensor, num_images: int, limit: int) -> List[torch.Tensor]:
    """Split indices ``keep`` (by decreasing score) into B lists, at most ``limit`` each, score order kept.

    Args:
        keep: (N,) indices into ``image_ids``; image_ids: image index of every box.
    Returns:
        ``num_images`` tensors of indices; list ``b`` holds image ``b``'s first ``limit`` entries of ``keep``.
    """
    keep = keep[image_ids[keep].sort(stable=True).indices]
    counts = torch.bincount(image_ids[keep], minlength=num_images).tolist()
    return [part[:limit] for part in keep.split(counts)]


def batched_class_nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    image_ids: torch.Tensor,
    num_images: int,
    num_classes: int,
    iou_threshold: float,
    max_per_image: int,
) -> List[torch.Tensor]:
    """NMS per (image, class) for a whole batch in one call, then the best ``max_per_image`` of each image.

    It keeps exactly what ``class_spec_nms`` keeps image by image (the tests check this), but runs
    torchvision's compiled NMS kernel, which the detectors use for speed; ``nms`` above is the
    readable version of the same algorithm.

    Args:
        boxes: (N, 4); scores: (N,); labels: (N,) classes in ``0..num_classes-1``; image_ids: (N,)
            images in ``0..num_images-1``.
    Returns:
        ``num_images`` tensors of indices into ``boxes``, each by decreasing score.
    """
    groups = image_ids * num_classes + labels  # one group per (image, class): they never suppress each other
    keep = torchvision.ops.batched_nms(boxes.float(), scores, groups, iou_threshold)
    return split_by_image(keep, image_ids, num_images, max_per_image)

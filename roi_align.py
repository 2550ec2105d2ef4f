"""RoI Align (He et al., Mask R-CNN, 2017, section 3) as one weighted gather of feature rows.

It holds ``roi_align`` on one feature map (equal to ``torchvision.ops.roi_align``, values and
gradients) and ``multi_level_roi_align``, which pools each RoI from its own FPN level in the same
single gather; Faster R-CNN's second stage uses the latter. The bilinear weights depend only on
the boxes, so they are computed once per box, not once per channel.

This module imports only torch and ``common``. Shapes use the dimension letters and box
conventions of ``common.py``'s docstring.
"""

from typing import Mapping, Tuple

import torch
from torch.nn import functional as F

from common import TensorDict

__all__ = ["multi_level_roi_align", "roi_align"]


def _bilinear_taps_1d(
    start: torch.Tensor, bin_size: torch.Tensor, size: torch.Tensor, num_bins: int, sampling_ratio: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Along one axis of RoI Align: the two pixels each sampling point reads, and their weights.

    A bin of ``bin_size`` pixels is sampled at ``sampling_ratio`` evenly spaced points; a point
    reads its two neighbouring pixels with linear-interpolation weights. Points more than one
    pixel outside the map read nothing (weight 0), and points past the last pixel centre read
    the last pixel alone: torchvision's ``roi_align`` rules.

    Args:
        start, bin_size, size: (R,) first sampled coordinate's bin edge, bin length and map length.
    Returns:
        ``index`` (R, num_bins, 2 * sampling_ratio) ``long`` pixel positions and ``weight`` of the
        same shape; a point's two weights sum to 1, or to 0 when it reads nothing.
    """
    bins = torch.arange(num_bins, device=start.device, dtype=start.dtype)[:, None]
    points = (torch.arange(sampling_ratio, device=start.device, dtype=start.dtype) + 0.5) / sampling_ratio
    bin_size = bin_size[:, None, None]
    coord = start[:, None, None] + bins * bin_size + points * bin_size  # (R, num_bins, sampling_ratio)
    last = (size - 1).to(coord.dtype)[:, None, None]
    inside = (coord >= -1.0) & (coord <= last + 1)
    coord = torch.minimum(coord.clamp(min=0), last)
    low = coord.floor()
    frac = coord - low
    high = torch.minimum(low + 1, last)
    index = torch.stack([low, high], dim=-1).long().flatten(2)  # (R, num_bins, sampling_ratio * 2)
    weight = (torch.stack([1 - frac, frac], dim=-1) * inside[..., None]).flatten(2)
    return index, weight


def _roi_align_taps(
    rois: torch.Tensor,
    spatial_scale: torch.Tensor,
    map_hw: torch.Tensor,
    first_row: torch.Tensor,
    output_size: Tuple[int, int],
    sampling_ratio: int,
    aligned: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """For every output cell of every RoI, the feature rows it averages and their weights.

    The features are one table of rows (one per pixel, C values each); a RoI's map starts at row
    ``first_row`` and is laid out row-major, image after image, as ``(B, H, W, C).reshape(-1, C)``.

    Args:
        rois: (R, 5) ``(image index, x1, y1, x2, y2)`` in image pixels; spatial_scale, first_row: (R,);
        map_hw: (R, 2) ``(H, W)`` of each RoI's map.
    Returns:
        ``rows`` (R * h * w, T) ``long`` and ``weight`` (R * h * w, T) with ``T = (2 sampling_ratio)^2``.
    """
    h, w = output_size
    offset = 0.5 if aligned else 0.0  # aligned: pixel i covers [i, i + 1) and its centre is i + 0.5
    x1, y1, x2, y2 = (rois[:, 1:] * spatial_scale[:, None] - offset).unbind(dim=1)
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:  # the original RoI Align made every RoI at least 1 x 1 pixels
        roi_w, roi_h = roi_w.clamp(min=1), roi_h.clamp(min=1)
    height, width = map_hw.unbind(dim=1)
    y_index, y_weight = _bilinear_taps_1d(y1, roi_h / h, height, h, sampling_ratio)  # (R, h, 2s)
    x_index, x_weight = _bilinear_taps_1d(x1, roi_w / w, width, w, sampling_ratio)  # (R, w, 2s)
    image_first = first_row + rois[:, 0].long() * height * width  # (R,) row of pixel (0, 0) of the RoI's image
    y_rows = image_first[:, None, None] + y_index * width[:, None, None]  # (R, h, 2s)
    rows = y_rows[:, :, None, :, None] + x_index[:, None, :, None, :]  # (R, h, w, 2s, 2s)
    weight = y_weight[:, :, None, :, None] * x_weight[:, None, :, None, :] / sampling_ratio**2
    return rows.flatten(3).flatten(0, 2), weight.flatten(3).flatten(0, 2)  # (R, h, w, 2s, 2s) -> (Rhw, T)


def _gather_weighted(table: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``sum_t weight[:, t] * table[rows[:, t]]``: (N, C), (M, T), (M, T) -> (M, C), without the
    (M, T, C) intermediate; ``embedding_bag`` does exactly this, with a fast backward pass.
    Sums in float32 at least (bf16 weights would be off by up to 0.4%), returned in the table's dtype."""
    dtype = torch.promote_types(table.dtype, torch.float32)
    return F.embedding_bag(rows, table.to(dtype), per_sample_weights=weight.to(dtype), mode="sum").to(table.dtype)


def roi_align(
    features: torch.Tensor,
    rois: torch.Tensor,
    output_size: Tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = 2,
    aligned: bool = True,
) -> torch.Tensor:
    """RoI Align (Mask R-CNN 3): each RoI is split into ``h x w`` bins, and each bin is the mean
    of ``sampling_ratio^2`` bilinearly interpolated points. Equal to ``torchvision.ops.roi_align``
    (up to float rounding) for ``sampling_ratio >= 1``, gradient included.

    The interpolation weights depend only on the boxes, so the whole operation is one weighted
    gather of feature rows: cheap forward, and a backward pass that is a scatter of the same
    weights (torchvision's CPU kernel recomputes them for every channel).

    Args:
        features: (B, C, H, W); rois: (R, 5) ``(image index, x1, y1, x2, y2)`` in input pixels.
        output_size: ``(h, w)``; spatial_scale: feature cells per input pixel (1 / stride).
        sampling_ratio: points per bin side (torchvision's adaptive ``<= 0`` is not supported).
        aligned: pixel centres at ``+0.5`` (Detectron2's fix of Mask R-CNN's half-pixel shift).
    Returns:
        (R, C, h, w).
    """
    if sampling_ratio < 1:
        raise ValueError(f"sampling_ratio must be at least 1, got {sampling_ratio}")
    B, C, H, W = features.shape
    R = rois.shape[0]
    rows, weight = _roi_align_taps(
        rois,
        rois.new_full((R,), spatial_scale),
        torch.tensor([H, W], device=rois.device).expand(R, 2),
        torch.zeros(R, dtype=torch.long, device=rois.device),
        output_size,
        sampling_ratio,
        aligned,
    )
    table = features.permute(0, 2, 3, 1).reshape(B * H * W, C)  # (B, C, H, W) -> (BHW, C)
    return _gather_weighted(table, rows, weight).view(R, *output_size, C).permute(0, 3, 1, 2)


def multi_level_roi_align(
    feats_per_fpn_level: TensorDict,
    strides_per_fpn_level: Mapping[str, int],
    rois: torch.Tensor,
    levels: torch.Tensor,
    output_size: Tuple[int, int],
    sampling_ratio: int = 2,
    aligned: bool = True,
) -> torch.Tensor:
    """``roi_align`` of each RoI on its own FPN level, all levels in one weighted gather.

    Args:
        feats_per_fpn_level: {level: (B, C, Hl, Wl)}; strides_per_fpn_level: {level: stride}, in level order.
        rois: (R, 5) ``(image index, x1, y1, x2, y2)`` in input pixels.
        levels: (R,) ``long`` position of each RoI's level in ``strides_per_fpn_level``.
        output_size: ``(h, w)``; sampling_ratio, aligned: as ``roi_align``'s.
    Returns:
        (R, C, h, w): row r is the feature of RoI r.
    """
    # All levels in one table of pixel rows, so that one weighted gather serves every RoI.
    feats = [feats_per_fpn_level[level] for level in strides_per_fpn_level]
    tables = [level_feats.permute(0, 2, 3, 1).flatten(0, 2) for level_feats in feats]  # (BHlWl, C) each
    first_rows = torch.tensor([0] + [len(table) for table in tables[:-1]], device=rois.device).cumsum(0)
    map_hw = torch.tensor([level_feats.shape[-2:] for level_feats in feats], device=rois.device)
    scales = torch.tensor(
        [1.0 / stride for stride in strides_per_fpn_level.values()], device=rois.device, dtype=rois.dtype
    )
    rows, weight = _roi_align_taps(
        rois, scales[levels], map_hw[levels], first_rows[levels], output_size, sampling_ratio, aligned
    )
    roi_feats = _gather_weighted(torch.cat(tables), rows, weight)  # (Rhw, C)
    return roi_feats.view(rois.shape[0], *output_size, tables[0].shape[1]).permute(0, 3, 1, 2)

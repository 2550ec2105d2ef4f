"""A detector's block diagram with the tensor shapes of one forward pass through it (``draw_architecture``).

The detector runs once on zeros; forward hooks on its parts record what they output, so that every shape in
the figure is one the run produced. Imports: ``drawing`` (matplotlib on first use) and torch. No detector
module: the detector is passed in, and its parts are found by their attribute names.
"""

from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from drawing import _pyplot

# What draw_architecture records: {name: (submodule path, record its input (True) or its output)}.
_HOOKED = {
    "trunk": ("backbone.backbone", False),
    "fpn": ("backbone", False),
    "head": ("pred_net", False),
    "proposals": ("rpn", False),
    "first_stage_head": ("rpn.pred_net", False),
    "roi_align": ("roi_stem", True),
    "class_logits": ("cls_pred", False),
    "box_deltas": ("box_pred", False),
}
_BLOCK_COLOURS = {
    "input": "#e6e6e6",
    "trunk": "#d6e6f5",
    "fpn": "#d5efd0",
    "head": "#fde0c5",
    "roi": "#e6dcf0",
    "output": "#fff2ae",
    "missing": "#f5f5f5",
}
_ARCH_WIDTH, _LINE_INCHES = 14.0, 0.15
_MONO_INCHES = 7.5 * 0.6 / 72  # the width of a 7.5-pt monospace character
_BOLD_INCHES = 9 * 0.62 / 72  # about the width of a 9-pt bold character


class _Block(NamedTuple):
    title: str
    entries: Tuple[Tuple[str, str], ...]  # (name, shape) lines
    kind: str  # a key of _BLOCK_COLOURS
    level: Optional[int] = None  # the FPN level number (2-5) whose row the block sits on; None: centred


class _Column(NamedTuple):
    header: str
    key: str  # the shapes in the dimension letters of common.py
    where: str  # the attribute whose tensors the column shows
    blocks: List[_Block]
    chain: Optional[str] = None  # "down" or "up": arrows between its level blocks (trunk; FPN top-down)


def _shapes_of(value: Any) -> Any:
    """A module's output with every tensor replaced by its shape (a tuple); dicts and lists keep their form."""
    if torch.is_tensor(value):
        return tuple(value.shape)
    if isinstance(value, Mapping):
        return {key: _shapes_of(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_shapes_of(item) for item in value]
    return None


def _submodule(module: nn.Module, path: str) -> Optional[nn.Module]:
    for name in path.split("."):
        module = getattr(module, name, None)
        if not isinstance(module, nn.Module):
            return None
    return module


def _recording_hook(shapes: Dict[str, Any], name: str, of_input: bool):
    def hook(module, inputs, output=None):
        shapes.setdefault(name, _shapes_of(inputs[0] if of_input else output))  # the first call's

    return hook


def _record_shapes(detector: nn.Module, image_size: Tuple[int, int], batch_size: int) -> Tuple[Dict, Optional[str]]:
    """One eval-mode pass of ``predict`` (or ``forward``) on zeros under ``torch.no_grad``, with the shapes
    that the ``_HOOKED`` submodules saw. A part that is still a stub (``NotImplementedError``, as in the
    course's release) ends the pass; the shapes recorded up to it are kept, and its message returned."""
    shapes, handles = {}, []
    for name, (path, of_input) in _HOOKED.items():
        module = _submodule(detector, path)
        if module is not None:
            hook = _recording_hook(shapes, name, of_input)
            handles.append(module.register_forward_pre_hook(hook) if of_input else module.register_forward_hook(hook))
    parameter = next(detector.parameters())
    images = torch.zeros(batch_size, 3, *image_size, device=parameter.device, dtype=parameter.dtype)
    was_training, stopped = detector.training, None
    try:
        detector.eval()
        with torch.no_grad():
            output = detector.predict(images) if hasattr(detector, "predict") else detector(images)
        shapes["output"] = _shapes_of(output)
    except NotImplementedError as error:
        stopped = str(error).splitlines()[0] if str(error) else type(error).__name__
    finally:
        for handle in handles:
            handle.remove()
        detector.train(was_training)
    return shapes, stopped


def _text(shape: Any) -> str:
    return "not run" if shape is None else str(tuple(shape))


def _level_blocks(
    record: Optional[Mapping], levels: Sequence[str], kind: str, notes: Mapping[str, str]
) -> List[_Block]:
    """One block per trunk stage or FPN level: its stride (and ``notes[level]``) and its shape."""
    blocks = []
    for level in levels:
        shape = None if record is None else record.get(level)
        title = f"{level}  stride {2 ** int(level[1:])}{notes.get(level, '')}"
        blocks.append(_Block(title, (("", _text(shape)),), kind if shape else "missing", int(level[1:])))
    return blocks


def _head_blocks(record: Optional[Sequence], fpn: Optional[Mapping], levels, names: Sequence[str]) -> List[_Block]:
    """One block per FPN level with a head's outputs there (``names``, in the head's output order), titled
    with the level's size and what it predicts for: locations (FCOS) or A anchors per location (RPN)."""
    blocks = []
    for level in levels:
        outputs = [None if record is None else record[i].get(level) for i in range(len(names))]
        title = f"{level} head"
        if fpn is not None and outputs[0] is not None:
            Hl, Wl = fpn[level][-2:]
            per_location = outputs[0][1] // (Hl * Wl)  # (B, Hl*Wl, K) for FCOS, (B, Hl*Wl*A) for an RPN
            title = f"{level}: {Hl}x{Wl}" + (f"x{per_location} anchors" if per_location > 1 else " locations")
        entries = tuple((name, _text(shape)) for name, shape in zip(names, outputs))
        blocks.append(_Block(title, entries, "head" if outputs[0] else "missing", int(level[1:])))
    return blocks


def _per_image_block(output: Any) -> _Block:
    """The first image's detections (a ``predict`` dict) or proposals (a tensor) of a per-image list."""
    first = output[0] if isinstance(output, list) and output else None
    if isinstance(first, Mapping):
        entries = tuple((name, _text(first[name])) for name in ("boxes", "labels", "scores") if name in first)
    else:
        entries = (("boxes", _text(first)),)
    of = f" of {len(output)}" if isinstance(output, list) and len(output) > 1 else ""
    return _Block(f"image 1{of}", entries, "output" if first is not None else "missing")


def _architecture_columns(detector: nn.Module, shapes: Mapping[str, Any], images: Tuple[int, ...]) -> List[_Column]:
    """The columns of the block diagram, left to right, from the detector's parts and the recorded shapes."""
    backbone = detector.backbone
    levels = list(getattr(backbone, "levels", shapes.get("fpn") or ()))
    stages = list(shapes["trunk"]) if "trunk" in shapes else [f"c{level[1:]}" for level in levels]
    fine_p3 = {"p3": " (+ c2)"} if getattr(backbone, "fine_p3", False) and "p2" in levels else {}
    fpn = shapes.get("fpn")
    columns = [
        _Column("Input", "(B, 3, H, W)", "zeros", [_Block("images", (("", _text(images)),), "input")]),
        _Column(
            "Trunk (RegNetX-400MF)",
            "(B, C_l, H/s, W/s)",
            "detector.backbone.backbone",
            _level_blocks(shapes.get("trunk"), stages, "trunk", {}),
            "down",
        ),
        _Column("FPN", "(B, C, H/s, W/s)", "detector.backbone", _level_blocks(fpn, levels, "fpn", fine_p3), "up"),
    ]
    if _submodule(detector, "pred_net") is not None:  # a one-stage detector
        head = _head_blocks(shapes.get("head"), fpn, levels, ("class logits", "box deltas", "centerness"))
        header = f"Head: {type(detector.pred_net).__name__}"
        columns.append(_Column(header, "(B, Hl*Wl, K | 4 | 1)", "detector.pred_net, shared by levels", head))
    if _submodule(detector, "rpn.pred_net") is not None:  # a first stage: anchors (RPN) or locations (FCOS)
        record, anchors = shapes.get("first_stage_head"), type(detector.rpn).__name__ == "RPN"
        names = ("objectness", "box deltas") if anchors else ("objectness", "box deltas", "centerness")
        key = "(B, Hl*Wl*A)\n(B, Hl*Wl*A, 4)" if anchors else "(B, Hl*Wl, 1 | 4 | 1)"
        header = f"First stage: {type(detector.rpn).__name__}"
        columns.append(_Column(header, key, "detector.rpn.pred_net", _head_blocks(record, fpn, levels, names)))
        proposals = _per_image_block(shapes.get("proposals", {}).get("proposals"))
        columns.append(_Column("Proposals", "(P, 4) per image", "detector.rpn: decode, NMS", [proposals]))
    if _submodule(detector, "cls_pred") is not None:  # a second stage
        kind = "roi" if "roi_align" in shapes else "missing"
        roi = _Block("RoI features", (("", _text(shapes.get("roi_align"))),), kind)
        columns.append(_Column("RoI Align", "(R, C, h, w)", "detector.roi_features", [roi]))
        entries = (("class logits", _text(shapes.get("class_logits"))), ("box deltas", _text(shapes.get("box_deltas"))))
        second = _Block("per RoI", entries, "roi" if "class_logits" in shapes else "missing")
        columns.append(_Column("Second stage", "(R, K + 1), (R, 4K)", "detector.cls_pred, box_pred", [second]))
    if hasattr(detector, "predict"):
        detections = _per_image_block(shapes.get("output"))
        columns.append(_Column("Detections", "(N, 4), (N,), (N,)", "detector.predict: decode, NMS", [detections]))
    return columns


def _column_lines(column: _Column, chars: int) -> Dict[int, List[str]]:
    """{id(block): its lines}: ``name shape`` per entry, or, when one of the column's entries is longer than
    ``chars`` characters, the name and the shape on two lines in every block of the column alike."""
    split = any(len(f"{name} {shape}") > chars for block in column.blocks for name, shape in block.entries if name)
    lines = {}
    for block in column.blocks:
        lines[id(block)] = []
        for name, shape in block.entries:
            lines[id(block)] += [name, f"  {shape}"] if split and name else [f"{name} {shape}".strip()]
    return lines


def _arrow(ax, start: Tuple[float, float], end: Tuple[float, float]) -> None:
    style = {"arrowstyle": "-|>", "color": "0.3", "lw": 1.0, "shrinkA": 1, "shrinkB": 1, "mutation_scale": 10}
    ax.annotate("", xy=end, xytext=start, arrowprops=style)


def _feeds(source: _Block, target: _Block, target_column: _Column) -> bool:
    """Whether an arrow joins two blocks of neighbouring columns: on the same level; from a block that
    spans the levels into the first block of a chain (the trunk is sequential) or into every block; into
    the next finer level there is when the source's level is missing (the trunk's c2 feeds p3 without p2)."""
    chained = [block for block in target_column.blocks if block.level is not None]
    if source.level is None:
        return target_column.chain != "down" or target is chained[0]
    if target.level is None:
        return True
    levels = [block.level for block in chained]
    if source.level in levels:
        return source.level == target.level
    return target.level == min((level for level in levels if level > source.level), default=None)


def _wrapped(text: str, width_inches: float, char_inches: float) -> str:
    """``text`` broken at spaces into lines of about ``width_inches``; a longer word keeps its own line."""
    import textwrap

    return "\n".join(textwrap.wrap(text, max(8, int(width_inches / char_inches)), break_long_words=False))


def _draw_column_header(ax, column: _Column, centre_x: float, width: float, rows_top: float) -> None:
    """A column's name (bold, shrunk to fit its width), its shapes in letters and where they come from."""
    header = _wrapped(column.header, width, _BOLD_INCHES)
    size = min(9.0, 9.0 * width / (_BOLD_INCHES * max(len(line) for line in header.splitlines())))
    ax.text(centre_x, rows_top + 0.55, header, ha="center", va="bottom", fontsize=size, weight="bold")
    ax.text(centre_x, rows_top + 0.5, column.key, ha="center", va="top", fontsize=7, family="monospace")
    where = _wrapped(column.where, width, 6.5 * 0.55 / 72)
    below_key = rows_top + 0.35 - 0.12 * column.key.count("\n")
    ax.text(centre_x, below_key, where, ha="center", va="top", fontsize=6.5, color="0.4")


def _draw_block(ax, block: _Block, lines: List[str], left: float, centre: float, width: float, height: float):
    """A rounded box with the block's title and lines; returns its ``(left, bottom, right, top)``."""
    from matplotlib.patches import FancyBboxPatch

    bottom, top = centre - height / 2, centre + height / 2
    style = "round,pad=0,rounding_size=0.06"
    ax.add_patch(
        FancyBboxPatch((left, bottom), width, height, boxstyle=style, fc=_BLOCK_COLOURS[block.kind], ec="0.35")
    )
    ax.text(left + 0.06, top - 0.06, block.title, va="top", fontsize=8, weight="bold")
    colour = "0.45" if block.kind == "missing" else "black"
    ax.text(left + 0.06, top - 0.26, "\n".join(lines), va="top", fontsize=7.5, family="monospace", color=colour)
    return left, bottom, left + width, top


def _draw_columns(columns: List[_Column], title: str, footer: str):
    """The block diagram: one column per part, level blocks on their level's row, the others centred."""
    n, margin, gap = len(columns), 0.15, 0.32
    width = (_ARCH_WIDTH - 2 * margin - (n - 1) * gap) / n
    lines = {
        key: text
        for column in columns
        for key, text in _column_lines(column, int((width - 0.12) / _MONO_INCHES)).items()
    }
    heights = {key: 0.3 + _LINE_INCHES * len(text) for key, text in lines.items()}
    levels = sorted({block.level for column in columns for block in column.blocks if block.level is not None})
    row = max([heights[id(b)] for c in columns for b in c.blocks if b.level is not None] or [1.0]) + 0.3
    routed = any(column.header == "RoI Align" for column in columns)  # an arrow under the rows
    top, bottom = 1.45, 0.8 if routed else 0.45
    height = top + row * max(len(levels), 1) + bottom + 0.15 * footer.count("\n")
    figure = _pyplot().figure(figsize=(_ARCH_WIDTH, height))
    ax = figure.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, _ARCH_WIDTH)
    ax.set_ylim(0, height)
    ax.axis("off")
    rows_top = height - top
    places = {}  # id(block) -> (left, bottom, right, top)
    middle = rows_top - row * max(len(levels), 1) / 2
    for c, column in enumerate(columns):
        left, centre_x = margin + c * (width + gap), margin + c * (width + gap) + width / 2
        _draw_column_header(ax, column, centre_x, width, rows_top)
        for block in column.blocks:
            centre = middle if block.level is None else rows_top - (levels.index(block.level) + 0.5) * row
            places[id(block)] = _draw_block(ax, block, lines[id(block)], left, centre, width, heights[id(block)])
        chained = [block for block in column.blocks if block.level is not None]
        for upper, lower in zip(chained, chained[1:]):
            if column.chain == "down":
                _arrow(ax, (centre_x, places[id(upper)][1]), (centre_x, places[id(lower)][3]))
            elif column.chain == "up":
                _arrow(ax, (centre_x, places[id(lower)][3]), (centre_x, places[id(upper)][1]))
    for source_column, target_column in zip(columns, columns[1:]):
        for source in source_column.blocks:
            for target in target_column.blocks:
                if _feeds(source, target, target_column):
                    s, t = places[id(source)], places[id(target)]
                    _arrow(ax, (s[2], (s[1] + s[3]) / 2), (t[0], (t[1] + t[3]) / 2))
    if routed:
        _draw_fpn_to_roi(ax, columns, places, bottom + 0.15 * footer.count("\n") - 0.3)
    ax.text(_ARCH_WIDTH / 2, height - 0.1, title, ha="center", va="top", fontsize=11, weight="bold")
    ax.text(margin, 0.08, footer, ha="left", va="bottom", fontsize=8, color="0.25")
    return figure


def _draw_fpn_to_roi(ax, columns: List[_Column], places: Mapping[int, Tuple], y: float) -> None:
    """RoI Align reads the FPN features too: an arrow under the rows from the FPN column to it."""
    headers = [column.header for column in columns]
    fpn, roi = columns[headers.index("FPN")].blocks[-1], columns[headers.index("RoI Align")].blocks[0]
    (fpn_left, fpn_bottom, fpn_right, _), (roi_left, roi_bottom, roi_right, _) = places[id(fpn)], places[id(roi)]
    start, end = ((fpn_left + fpn_right) / 2, fpn_bottom), ((roi_left + roi_right) / 2, roi_bottom)
    ax.plot([start[0], start[0], end[0]], [start[1], y, y], color="0.3", lw=1.0)
    _arrow(ax, (end[0], y), end)
    label = "FPN features (every level): each RoI is cut from its own level"
    ax.text((start[0] + end[0]) / 2, y + 0.03, label, ha="center", va="bottom", fontsize=7.5, color="0.3")


def draw_architecture(detector: nn.Module, image_size: Union[int, Tuple[int, int]], batch_size: int = 1):
    """A detector's block diagram with the tensor shapes of one forward pass through it.

    The detector runs once, in eval mode and under ``torch.no_grad``, on a batch of zeros (its train/eval
    mode is restored afterwards). Forward hooks on its parts record the shapes they output: the trunk's
    stages (``detector.backbone.backbone``: c3-c5, and c2 when used), the FPN's levels (``detector.backbone``),
    and either FCOS's head outputs per level (``detector.pred_net``) or, for Faster R-CNN, the first stage's
    outputs per level (``detector.rpn.pred_net``, an RPN's or an FCOS first stage's), the proposals
    (``detector.rpn``), the RoI Align output (the input of ``detector.roi_stem``) and the second stage's
    class logits and box deltas (``detector.cls_pred``, ``detector.box_pred``); then the detections of
    ``predict``. Every shape drawn is one the run produced. A part that is still a stub in the course's
    release (``NotImplementedError``) stops the pass: the blocks after it are drawn grey, "not run".

    Args:
        detector: an ``FCOS``, a ``FasterRCNN`` (with either first stage) or a ``FirstStage``.
        image_size: the side of the square images, or ``(H, W)``.
        batch_size: B, the images in the batch.
    Returns:
        The matplotlib figure, 14 inches wide.
    """
    H, W = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    shapes, stopped = _record_shapes(detector, (H, W), batch_size)
    columns = _architecture_columns(detector, shapes, (batch_size, 3, H, W))
    fpn = shapes.get("fpn") or {}
    channels = next(iter(fpn.values()))[1] if fpn else "C"
    letters = ["B images", f"C = {channels} FPN channels", "C_l a trunk stage's channels", "s a level's stride"]
    letters += ["Hl x Wl its size", "K classes"]
    if type(getattr(detector, "rpn", None)).__name__ == "RPN":
        letters.append("A anchors per location")
    if _submodule(detector, "rpn") is not None:
        letters += ["P proposals per image", "R RoIs in the batch"]
    footer = (
        f"Shapes recorded by forward hooks during one eval-mode pass over a ({batch_size}, 3, {H}, {W}) batch of "
        f"zeros.\nLetters (common.py): {', '.join(letters + ['N detections per image'])}."
    )
    if stopped:
        footer = f"Stopped at a part not written yet: {stopped}\n" + footer
    return _draw_columns(columns, f"{type(detector).__name__}: the tensors of one forward pass", footer)

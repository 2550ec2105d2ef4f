"""What both notebooks set up the same way, and the small helpers their cells share.

``setup(name, root, quick)`` sizes the run (quick mode or the course's recipe), picks the device,
tries the ImageNet weights, makes the run folder and opens the data (VOC 2007 when it is on disk,
else the synthetic shapes); the ``NotebookRun`` it returns builds the loaders, names the run folders,
writes the ``RunConfig`` that checkpoints store, draws predictions and exports the mAP-tool files.
Only the first cell of a notebook, which finds the repository (and so cannot import from it), stays
in the notebook.

Imports: ``common``, ``detection_data``, ``drawing``, ``architecture_figure``, ``evaluation``, ``experiment``,
``photos`` and ``check`` (on first use), IPython and matplotlib.
"""

import dataclasses
import importlib
import inspect
import os
import shutil
import tempfile
import textwrap
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from architecture_figure import draw_architecture
from common import NMS_THRESH, PICTURE_SCORE_THRESH, SCORE_THRESH, DetectorBackboneWithFPN
from detection_data import SyntheticDetection, VOC2007DetectionTiny, denormalize_image, save_image, synthetic_photo
from drawing import _pyplot, detection_visualizer
from evaluation import compute_map, gt_boxes_to_targets, inference_with_detector, plot_precision_recall
from experiment import RunConfig


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How big a notebook's run is."""

    image_size: int
    batch_size: int
    fpn_channels: int
    num_train: int  # synthetic images (VOC uses its whole splits)
    num_val: int
    overfit_images: int
    overfit_iters: int
    train_iters: int
    learning_rate: float
    log_period: int
    num_workers: int
    optimizer: str  # "sgd" or "adamw", as ``train_detector`` takes it


# Quick mode: small enough for a CPU and the test suite, long enough that held-out images visibly improve.
# A random backbone barely moves under SGD in a few hundred steps; AdamW at 2e-3 does. 300 iterations of
# 8 images of 128 pixels take the improved FCOS and Faster R-CNN from a held-out mAP@0.5 of about 0 to 0.34-0.53
# (three seeds each; the course's FCOS reaches about 0.1): docs/notebooks.md, benchmarks/bench_notebook_quick_mode.py.
# Overfitting uses four images for 150 iterations.
QUICK_SIZES = Sizes(128, 8, 32, 256, 32, 4, 150, 300, 2e-3, 20, 0, "adamw")
# The course's recipe; the synthetic set then has as many images as VOC's train and val splits.
FULL_SIZES = Sizes(224, 16, 128, 2501, 2510, 160, 500, 9000, 8e-3, 100, min(4, os.cpu_count() or 1), "sgd")


# The photo-sized scene of ``try_on_photo``: a seed whose scene holds eight objects of many sizes.
PHOTO_SEED = 7


def show(figure) -> None:
    """Display a figure once and free it (inline in Jupyter, a no-op picture under a headless runner)."""
    from IPython.display import display

    display(figure)
    _pyplot().close(figure)


def show_source(*objects):
    """The source of functions, methods or classes, highlighted, as their module holds it now: never a copy
    that could drift (in the student release, the stub that is yours to write). The notebook displays
    the returned ``IPython.display.Code``."""
    from IPython.display import Code

    return Code("\n\n".join(textwrap.dedent(inspect.getsource(item)) for item in objects), language="python")


def example_with_objects(dataset, at_least: int = 4):
    """The first image of ``dataset`` with ``at_least`` objects: ``(image, gt_boxes)``, the padding rows left out
    and the objects sorted from the largest down."""
    index = next(i for i in range(len(dataset)) if int((dataset[i][2][:, 4] >= 0).sum()) >= at_least)
    _, image, gt_boxes = dataset[index][:3]
    objects = gt_boxes[gt_boxes[:, 4] >= 0]
    areas = (objects[:, 2] - objects[:, 0]) * (objects[:, 3] - objects[:, 1])
    return image, objects[areas.argsort(descending=True)]


def _shifted(row: torch.Tensor, fraction: float) -> torch.Tensor:
    """A ground-truth row's box moved right by ``fraction`` of its width: IoU (1 - f) / (1 + f) with it."""
    step = fraction * float(row[2] - row[0])
    return row[:4] + torch.tensor([step, 0.0, step, 0.0])


def made_up_detections(objects: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Detections placed by hand on ``objects`` (at least three rows, largest first), one of each outcome, to
    show how detections are judged: (4, 6) rows ``(x1, y1, x2, y2, class, score)``, highest score first.

    Row 0 sits on object 0 (IoU 0.90, a true positive); row 1 is a second box on it (IoU 0.60 with it, 0.67
    with row 0: a duplicate); row 2 is too loose on object 1 (IoU 0.38); row 3 covers object 2 exactly with
    the wrong class. Objects 3 and on get no detection."""
    rows = [
        (_shifted(objects[0], 0.05), objects[0, 4], 0.92),
        (_shifted(objects[0], 0.25), objects[0, 4], 0.71),
        (_shifted(objects[1], 0.45), objects[1, 4], 0.55),
        (objects[2, :4], (objects[2, 4] + 1) % num_classes, 0.40),
    ]
    return torch.stack([torch.cat([box, torch.tensor([float(label), score])]) for box, label, score in rows])


def show_architecture(build, image_size: int, batch_size: int) -> None:
    """Draw the detector that ``build()`` returns (``architecture_figure.draw_architecture``, the shapes of one forward
    pass at this run's sizes). In the student release, a detector whose parts are not written yet cannot be
    built: then one line says which part, and the figure waits until the cell runs again."""
    try:
        detector = build()
    except NotImplementedError as unwritten:
        reason = str(unwritten).rstrip(".")
        print(f"Not drawn yet, the detector cannot be built: {reason}. Run this cell again once it is written.")
        return
    show(draw_architecture(detector, image_size, batch_size))


def part_functions(name: str) -> List[Any]:
    """The functions that part ``name`` of ``tools/parts.json`` grades (its ``"functions"``, imported)."""
    import check

    parts = {part["name"]: part for part in check.load_parts()}
    if name not in parts:
        raise ValueError(f"no part named {name!r} in tools/parts.json; the parts are: {', '.join(parts)}")
    found = []
    for dotted in parts[name]["functions"]:
        module, *path = dotted.split(".")
        item = importlib.import_module(module)
        for attribute in path:
            item = getattr(item, attribute)
        found.append(item)
    return found


def show_part(name: str):
    """``show_source`` of what ``check(name)`` checks: the functions of one part of the assignment."""
    return show_source(*part_functions(name))


def subset(dataset, count: int):
    """``count`` images spread evenly over ``dataset``."""
    return torch.utils.data.Subset(dataset, torch.linspace(0, len(dataset) - 1, count).long().tolist())


def loss_fell(history: Dict[str, List[float]], factor: float) -> bool:
    """Mean total loss of the last fifth of the run below ``factor`` times that of the first fifth."""
    window = max(5, len(history["total"]) // 5)
    first, last = (sum(part) / window for part in (history["total"][:window], history["total"][-window:]))
    print(f"mean total loss: first {window} iterations {first:.3f}, last {window} iterations {last:.3f}")
    return last < factor * first


@dataclasses.dataclass
class NotebookRun:
    """One notebook's settings (``setup`` makes it) and the data it opened."""

    name: str
    root: Path
    quick: bool
    sizes: Sizes
    device: torch.device
    pretrained: bool
    run_root: Path
    data: str = "synthetic"
    train_set: Any = None
    val_set: Any = None

    @property
    def idx_to_class(self) -> Dict[int, str]:
        return self.train_set.idx_to_class

    def open_data(self, data_dir: Path, download_voc: bool = False) -> None:
        """VOC 2007 from ``data_dir`` when it is there (or ``download_voc``) and not in quick mode, else the
        synthetic shapes. The held-out VOC split keeps the difficult objects, which evaluation ignores."""
        voc_present = (data_dir / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main" / "train.txt").is_file()
        self.data = "voc2007" if not self.quick and (voc_present or download_voc) else "synthetic"
        size = self.sizes.image_size
        if self.data == "voc2007":
            self.train_set = VOC2007DetectionTiny(data_dir, "train", download=download_voc, image_size=size)
            self.val_set = VOC2007DetectionTiny(data_dir, "val", image_size=size, return_difficult=True)
        else:
            cache = self.sizes.num_train * size * size <= 256 * 128 * 128  # quick mode: about 50 MB
            self.train_set = SyntheticDetection("train", num_images=self.sizes.num_train, image_size=size, cache=cache)
            self.val_set = SyntheticDetection("val", num_images=self.sizes.num_val, image_size=size, cache=cache)

    def make_train_loader(self):
        """A fresh, identically seeded training loader for each run, so that runs see the same batches."""
        return torch.utils.data.DataLoader(
            self.train_set,
            batch_size=self.sizes.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=self.sizes.num_workers,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(0),
        )

    def make_val_loader(self):
        return torch.utils.data.DataLoader(
            self.val_set,
            batch_size=self.sizes.batch_size,
            num_workers=self.sizes.num_workers,
            pin_memory=self.device.type == "cuda",
        )

    def run_dir(self, model: str) -> Path:
        """Folder of one training run, named after what changes its result."""
        s = self.sizes
        folder = self.run_root / f"{model}_{self.data}_{s.image_size}px_fpn{s.fpn_channels}_{s.train_iters}it"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def run_config(
        self, model: str, variant: str = "course", first_stage: Optional[str] = None, **options: Any
    ) -> RunConfig:
        """This run as the ``RunConfig`` that ``detect.py`` stores in its checkpoints (so that ``detect.py
        eval`` can rebuild the model). Faster R-CNN gets the RPN unless ``first_stage="fcos"``; ``options``
        are other ``RunConfig`` fields (e.g. ``fine_p3=True``)."""
        s, synthetic = self.sizes, self.data == "synthetic"
        return RunConfig(
            model=model,
            variant=variant,
            data=self.data,
            image_size=s.image_size,
            batch_size=s.batch_size,
            fpn_channels=s.fpn_channels,
            iters=s.train_iters,
            optimizer=s.optimizer,
            lr=s.learning_rate,
            train_images=s.num_train if synthetic else None,
            eval_images=s.num_val if synthetic else None,
            first_stage=(first_stage or "rpn") if model == "faster_rcnn" else None,
            num_classes=len(self.idx_to_class),
            idx_to_class=dict(self.idx_to_class),
            **options,
        )

    def show_predictions(
        self,
        detector,
        dataset,
        indices,
        score_thresh: float = PICTURE_SCORE_THRESH,
        max_boxes: int = 6,
        title: str = "",
    ) -> None:
        """Predict on ``dataset[indices]`` and draw ground truth (solid) and predictions (dashed): those
        above ``score_thresh``, at most ``max_boxes`` per image (the best ones), so that labels stay
        readable. The title names both and each panel counts what it leaves out."""
        items = [dataset[index] for index in indices]
        batch = torch.stack([item[1] for item in items])
        detector.to(self.device).eval()
        with torch.inference_mode():
            predictions = detector.predict(batch.to(self.device), score_thresh=score_thresh, nms_thresh=NMS_THRESH)
        columns = min(len(items), 4)
        rows = -(-len(items) // columns)
        figure, axes = _pyplot().subplots(rows, columns, figsize=(4.5 * columns, 4.8 * rows), squeeze=False)
        for ax, item, prediction in zip(axes.flat, items, predictions):
            prediction = {key: value.cpu() for key, value in prediction.items()}
            assert (prediction["scores"] > score_thresh).all() and (prediction["labels"] < len(self.idx_to_class)).all()
            assert (prediction["boxes"] >= 0).all() and (prediction["boxes"] <= self.sizes.image_size).all(), "clipped"
            best = prediction["scores"].argsort(descending=True)[:max_boxes]
            detection_visualizer(
                item[1], self.idx_to_class, bbox=item[2], pred={k: v[best] for k, v in prediction.items()}, ax=ax
            )
            ax.set_title(f"{len(best)} of {len(prediction['scores'])} detections drawn", fontsize=9)
        for ax in axes.flat[len(items) :]:
            ax.axis("off")
        figure.suptitle(f"{title} (score > {score_thresh}, at most {max_boxes} per image)")
        show(figure)

    def export_and_curves(self, detector, folder: Path, title: str) -> Dict[str, Any]:
        """Write mAP-tool files for the held-out set, check them, and draw precision-recall curves."""
        if folder.exists():
            shutil.rmtree(folder)  # stale files of an earlier run would be counted too
        results = inference_with_detector(
            detector, self.make_val_loader(), self.idx_to_class, score_thresh=SCORE_THRESH, nms_thresh=NMS_THRESH,
            output_dir=folder, device=self.device,
        )  # fmt: skip
        ground_truths = []
        for batch in torch.utils.data.DataLoader(self.val_set, batch_size=self.sizes.batch_size):
            ground_truths += gt_boxes_to_targets(batch[2], batch[3] if len(batch) > 3 else None)
        for subfolder in ("ground-truth", "detection-results"):
            assert len(os.listdir(folder / subfolder)) == len(self.val_set), "one file per image, even without any"
        first = sorted(os.listdir(folder / "detection-results"))[0]
        print(f"wrote {len(self.val_set)} files each to {folder}/ground-truth and {folder}/detection-results; {first}:")
        print("".join((folder / "detection-results" / first).read_text().splitlines(keepends=True)[:3]) or "(empty)")
        num_classes = len(self.idx_to_class)
        figure = plot_precision_recall(results, ground_truths, num_classes, self.idx_to_class)
        figure.suptitle(title, y=1.02)
        show(figure)
        return compute_map(results, ground_truths, num_classes)

    def try_on_photo(
        self, detector, photo=None, upload: bool = False, score_thresh: float = PICTURE_SCORE_THRESH, max_boxes: int = 8
    ):
        """Detect objects in a whole photo (``photos.predict_photos``, as ``detect.py predict`` does) and
        return a figure of the best ``max_boxes`` detections above ``score_thresh``.

        ``photo``: a path; ``upload``: pick one on Colab; neither: a photo-sized synthetic scene
        (``detection_data.synthetic_photo``, 3 x 2 times ``image_size``, never seen in training) or, on VOC,
        the first held-out image (the synthetic shapes' classes are not VOC's), whose ground truth is drawn in
        a panel beside the detections."""
        import photos

        if upload:
            photo = photos.upload_photo()
        gt_boxes = None
        if photo is None:
            size = self.sizes.image_size
            if self.data == "synthetic":
                image, gt_boxes = synthetic_photo(3 * size, 2 * size, seed=PHOTO_SEED)
            else:
                _, normalised, padded = self.val_set[0][:3]
                image, gt_boxes = torch.from_numpy(denormalize_image(normalised)).permute(2, 0, 1), padded
                gt_boxes = gt_boxes[gt_boxes[:, 4] >= 0]
            photo = self.run_dir("photo") / "photo_with_ground_truth.png"
            save_image(image, photo)
        size = self.sizes.image_size
        detector.to(self.device).eval()
        [found] = photos.predict_photos(detector, [photo], size, 2 * size, score_thresh, device=self.device)
        seen = photos.network_size(found["width"], found["height"], size, 2 * size)
        photo_size = torch.tensor([found["width"], found["height"]] * 2)
        assert ((found["boxes"] >= 0) & (found["boxes"] <= photo_size)).all(), "boxes lie inside the photo"
        best = found["scores"].argsort(descending=True)[:max_boxes]
        print(
            f"{photo}: {found['width']} x {found['height']} pixels, seen by the network at "
            f"{seen[0]} x {seen[1]}; {len(found['boxes'])} detections with "
            f"score > {score_thresh}, the best {len(best)} drawn"
        )
        pixels = np.asarray(photos.open_photo(photo))
        pred = {key: found[key][best] for key in ("boxes", "labels", "scores")}
        panels = 1 if gt_boxes is None else 2
        figure, axes = _pyplot().subplots(1, panels, figsize=(7.5 * panels, 5.5), squeeze=False)
        if gt_boxes is not None:
            detection_visualizer(pixels, self.idx_to_class, bbox=gt_boxes, ax=axes[0, 0])
            axes[0, 0].set_title(f"ground truth: {len(gt_boxes)} objects")
        detection_visualizer(pixels, self.idx_to_class, pred=pred, ax=axes[0, -1])
        axes[0, -1].set_title(f"detections: the best {len(best)} of {len(found['boxes'])} with score > {score_thresh}")
        figure.tight_layout()
        return figure


def _try_imagenet_weights() -> bool:
    try:
        DetectorBackboneWithFPN(8, pretrained=True)  # fetches torchvision's ImageNet weights once
        return True
    except RuntimeError as error:
        print(f"ImageNet weights unavailable, so the backbone starts from random weights:\n{error}")
        return False


# The stubs of the student release (tools/make_assignment.py) raise NotImplementedError with this in the message.
STUB_MARK = "is yours to write"


def _brief_unwritten_step(shell, etype, value, tb, tb_offset=None):
    """IPython's handler for NotImplementedError: a stub of the student release shows as its one-line
    message (which function to write, which step explains it); any other one keeps its traceback. The
    cell still fails, so that "Run all" stops there."""
    import sys

    if STUB_MARK in str(value):
        print(f"Not written yet: {value}", file=sys.stderr)
    else:
        traceback = shell.InteractiveTB.structured_traceback(etype, value, tb, tb_offset=tb_offset)
        print("\n".join(traceback), file=sys.stderr)
    return []


def _show_unwritten_steps_briefly() -> None:
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is not None:
        shell.set_custom_exc((NotImplementedError,), _brief_unwritten_step)


def setup(name: str, root: Path, quick: bool) -> NotebookRun:
    """A notebook's run: sizes, device, weights (ImageNet outside quick mode, when available) and run folder
    (``DETECT_RUN_DIR`` when a test runner sets it; in quick mode a temporary folder the last cell removes;
    else ``runs/notebooks``). Prints what it chose. In the student release, a step not written yet then
    stops the notebook with one line naming the function to write instead of a traceback."""
    _show_unwritten_steps_briefly()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"repository: {root}\ndevice: {device}; quick mode: {quick}")
    if device.type == "cpu" and not quick:
        print(
            "No GPU: the full recipe takes many hours on a CPU. On Colab pick Runtime > Change runtime type > GPU, "
            "or set DETECT_QUICK=1 for a short run."
        )
    sizes = QUICK_SIZES if quick else FULL_SIZES
    pretrained = False if quick else _try_imagenet_weights()
    if os.environ.get("DETECT_RUN_DIR"):
        run_root = Path(os.environ["DETECT_RUN_DIR"])  # where a test runner wants the outputs
    elif quick:
        run_root = Path(tempfile.mkdtemp(prefix=f"{name}_notebook_"))
    else:
        run_root = root / "runs" / "notebooks"
    run_root.mkdir(parents=True, exist_ok=True)
    print(
        f"images {sizes.image_size}px, batch {sizes.batch_size}, FPN {sizes.fpn_channels}, {sizes.train_iters} "
        f"iterations, ImageNet weights: {pretrained}; outputs in {run_root}"
    )
    return NotebookRun(name, root, quick, sizes, device, pretrained, run_root)

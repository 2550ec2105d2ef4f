"""What both notebooks set up the same way, and the small helpers their cells share.

``setup(name, root, quick)`` sizes the run (quick mode or the course's recipe), picks the device,
tries the ImageNet weights, makes the run folder and opens the data (VOC 2007 when it is on disk,
else the synthetic shapes); the ``NotebookRun`` it returns builds the loaders, names the run folders,
writes the ``RunConfig`` that checkpoints store, draws predictions and exports the mAP-tool files.
Only the first cell of a notebook, which finds the repository (and so cannot import from it), stays
in the notebook.

Imports: ``common``, ``detection_data``, ``drawing``, ``evaluation``, ``experiment`` and matplotlib.
"""

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from common import NMS_THRESH, PICTURE_SCORE_THRESH, SCORE_THRESH, DetectorBackboneWithFPN
from detection_data import SyntheticDetection, VOC2007DetectionTiny, denormalize_image
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


# Quick mode: small, for a CPU and the test suite, and still long enough to see a detector learn. A random
# backbone barely moves under SGD in a few hundred steps; AdamW at 2e-3 overfits four images in 150 (FCOS
# reaches mAP@0.5 of about 0.7 on them). The held-out numbers of 60 iterations on 32 images stay low.
QUICK_SIZES = Sizes(96, 4, 32, 32, 16, 4, 150, 60, 2e-3, 10, 0, "adamw")
# The course's recipe; the synthetic set then has as many images as VOC's train and val splits.
FULL_SIZES = Sizes(224, 16, 128, 2501, 2510, 160, 500, 9000, 8e-3, 100, min(4, os.cpu_count() or 1), "sgd")


def show(figure) -> None:
    """Display a figure once and free it (inline in Jupyter, a no-op picture under a headless runner)."""
    from IPython.display import display

    display(figure)
    _pyplot().close(figure)


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
            self.train_set = SyntheticDetection("train", num_images=self.sizes.num_train, image_size=size)
            self.val_set = SyntheticDetection("val", num_images=self.sizes.num_val, image_size=size)

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

    def run_config(self, model: str, variant: str = "course", first_stage: Optional[str] = None) -> RunConfig:
        """This run as the ``RunConfig`` that ``detect.py`` stores in its checkpoints (so that ``detect.py
        eval`` can rebuild the model). Faster R-CNN gets the RPN unless ``first_stage="fcos"``."""
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
        return the picture with the best ``max_boxes`` detections above ``score_thresh`` drawn.
        ``photo``: a path; ``upload``: pick one on Colab; neither: two held-out images side by side stand
        in for a photo twice as wide as it is high (enlarged four times, so that the labels drawn on it stay
        readable; the detector sees the same image, since the photo is scaled back to ``image_size``)."""
        import numpy as np
        from PIL import Image

        import photos

        if upload:
            photo = photos.upload_photo()
        if photo is None:
            pair = Image.fromarray(np.concatenate([denormalize_image(self.val_set[i][1]) for i in range(2)], axis=1))
            photo = self.run_dir("photo") / "two_held_out_images.png"
            pair.resize((4 * pair.width, 4 * pair.height), Image.NEAREST).save(photo)
        size = self.sizes.image_size
        [found] = photos.predict_photos(detector, [photo], size, 2 * size, score_thresh, device=self.device)
        photo_size = torch.tensor([found["width"], found["height"]] * 2)
        assert ((found["boxes"] >= 0) & (found["boxes"] <= photo_size)).all(), "boxes lie inside the photo"
        best = found["scores"].argsort(descending=True)[:max_boxes]
        print(
            f"{photo}: {found['width']} x {found['height']} pixels, {len(found['boxes'])} detections with score "
            f"> {score_thresh}, the best {len(best)} drawn"
        )
        return photos.draw_detections(
            photo, {key: found[key][best] for key in ("boxes", "labels", "scores")}, self.idx_to_class
        )


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

# ---
# jupyter:
#   jupytext:
#     formats: ipynb,.notebook.py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # FCOS, step by step: a one-stage, anchor-free detector
#
# This notebook builds FCOS (Tian et al., *FCOS: Fully Convolutional One-Stage Object Detection*,
# ICCV 2019) out of the pieces in `common.py` and `one_stage_detector.py`, checks every piece against
# values worked out by hand, trains it, and measures it with the project's own mAP evaluator.
# No detector code lives here: every cell calls the modules, so what you see is what `detect.py` runs.
#
# **How to run it.** Top to bottom, on Colab (pick a GPU runtime) or on a laptop.
# With the environment variable `DETECT_QUICK=1` the whole notebook runs in a minute or two on a CPU:
# small synthetic images, random weights, and AdamW, which moves a random backbone much faster than SGD.
# That is enough to watch FCOS overfit four images (mAP@0.5 above 0.5 on them, asserted); the held-out
# numbers of its short training run stay low. Every check still runs, which is what the test suite relies on.
# Without it, the notebook runs the course recipe (224 x 224 images, batch 16, 9000 iterations), which
# wants a GPU.
#
# Every "sanity" cell first asserts and only then prints: if a cell finishes, its check passed.

# %%
# Edited modules are reloaded before each cell runs, so a fix in a .py file counts at once.
# %load_ext autoreload
# %autoreload 2

# %%
import os
import sys
from pathlib import Path

# DETECT_QUICK=1 in the environment selects quick mode (in a running notebook, os.environ["DETECT_QUICK"] = "1"
# on the line above this one does the same).
QUICK = os.environ.get("DETECT_QUICK") == "1"

# Colab only. Either clone the repository (fill in REPO_URL) or keep a copy in Google Drive, so that
# your edits and checkpoints outlive the session (leave REPO_URL empty and name its folder under "My Drive").
REPO_URL = ""  # e.g. "https://github.com/<account>/<repository>.git"
CLONE_DIR = "/content/detection"
DRIVE_FOLDER = "detection"


def find_repo_root(starts):
    """The first folder that holds common.py, walking up from each start in turn."""
    for start in starts:
        for folder in (start, *start.parents):
            if (folder / "common.py").is_file() and (folder / "a4_helper.py").is_file():
                return folder
    return None


starts = [Path(path).resolve() for path in (os.environ.get("DETECT_ROOT"), os.getcwd()) if path]
if "google.colab" in sys.modules:
    if REPO_URL:
        if not Path(CLONE_DIR).exists():
            import subprocess

            subprocess.run(["git", "clone", "--depth", "1", REPO_URL, CLONE_DIR], check=True)
        starts.append(Path(CLONE_DIR))
    else:
        from google.colab import drive

        drive.mount("/content/drive")
        starts.append(Path("/content/drive/MyDrive") / DRIVE_FOLDER)
ROOT = find_repo_root(starts)
if ROOT is None:
    raise FileNotFoundError(
        f"No folder holding common.py above any of {[str(s) for s in starts]}. Start Jupyter inside the "
        "repository, set the environment variable DETECT_ROOT to it, or (on Colab) fill in REPO_URL or DRIVE_FOLDER."
    )
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from IPython.display import display  # noqa: E402

import a4_helper  # noqa: E402
import experiment  # noqa: E402
import notebook_kit  # noqa: E402

# The check of each part you write: check("iou") runs its public tests (check.py).
from check import check  # noqa: E402
from common import DetectorBackboneWithFPN, class_spec_nms, get_fpn_location_coords, hello_common, iou, nms  # noqa: E402
from one_stage_detector import (  # noqa: E402
    FCOS,
    FCOSPredictionNetwork,
    course_fcos,
    fcos_apply_deltas_to_locations,
    fcos_get_deltas_from_locations,
    fcos_make_centerness_targets,
    fcos_match_locations_to_gt,
    fcos_object_balance_weights,
    hello_one_stage_detector,
)

hello_common()
hello_one_stage_detector()
a4_helper.hello_helper()


# %% [markdown]
# ## One switch sizes the run
#
# Quick mode shrinks everything that costs time: 96-pixel images, a 32-channel FPN, random backbone weights
# (no download) and AdamW at 2e-3 for 150 iterations on four images, then 60 on 32 images. The full recipe
# is the course's: 224-pixel images, batch 16, a 128-channel FPN, SGD for 9000 iterations, and a backbone
# that starts from ImageNet weights,
# because a detector trained on a few thousand images learns far better from features that already
# know what edges and textures look like. Both notebooks share this set-up: `notebook_kit.setup` picks the
# sizes (`notebook_kit.QUICK_SIZES` or `FULL_SIZES`), the device, the weights and the run folder, and the
# helpers the later cells call (`show`, `run_dir`, `show_predictions`, ...) live there too.

# %%
RUN = notebook_kit.setup("fcos", ROOT, QUICK)
S = RUN.sizes
IMAGE_SIZE, BATCH_SIZE, FPN_CHANNELS = S.image_size, S.batch_size, S.fpn_channels
NUM_TRAIN, NUM_VAL = S.num_train, S.num_val  # synthetic images
OVERFIT_IMAGES, OVERFIT_ITERS = S.overfit_images, S.overfit_iters
TRAIN_ITERS, LEARNING_RATE, LOG_PERIOD, OPTIMIZER = S.train_iters, S.learning_rate, S.log_period, S.optimizer
NUM_WORKERS, DEVICE, PRETRAINED, RUN_DIR = S.num_workers, RUN.device, RUN.pretrained, RUN.run_root
show, subset, loss_fell = notebook_kit.show, notebook_kit.subset, notebook_kit.loss_fell

# %% [markdown]
# ## Data
#
# PASCAL VOC 2007 is used when it is on disk (`data/VOCdevkit/VOC2007`), or when you set
# `DOWNLOAD_VOC = True` to fetch the official archive (about 450 MB) once. Otherwise, and always in quick
# mode, the notebook uses the built-in synthetic set: coloured shapes on textured backgrounds, drawn on the
# fly, in the same format. Both give `(image_id, image, gt_boxes)`: the image is ImageNet-normalised, and
# `gt_boxes` holds up to 40 rows `(x1, y1, x2, y2, class)` in pixels, padded with rows of `-1` so that
# images with different numbers of objects stack into one batch.
#
# The held-out VOC split keeps the objects marked *difficult*, so that the evaluation can ignore them
# the way the VOC benchmark does.

# %%
DOWNLOAD_VOC = False
RUN.open_data(ROOT / "data", download_voc=DOWNLOAD_VOC)
DATA, train_set, val_set = RUN.data, RUN.train_set, RUN.val_set
IDX_TO_CLASS = RUN.idx_to_class
NUM_CLASSES = len(IDX_TO_CLASS)
val_loader = RUN.make_val_loader()
make_train_loader, run_dir, run_config = RUN.make_train_loader, RUN.run_dir, RUN.run_config
show_predictions, export_and_curves = RUN.show_predictions, RUN.export_and_curves

# A first look, straight from the data set (no shuffling, so it is the same every run).
image_ids, images, gt_boxes = next(iter(torch.utils.data.DataLoader(train_set, batch_size=4)))
real = gt_boxes[..., 4] >= 0
# Catches boxes in (y1, x1, y2, x2) or (x, y, w, h) order, boxes outside the image, and padding that a
# later step could mistake for an object of class 0.
assert images.shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE) and gt_boxes.shape == (4, 40, 5)
assert (gt_boxes[~real] == -1).all(), "padding rows are all -1"
assert (gt_boxes[real][:, 0] < gt_boxes[real][:, 2]).all() and (gt_boxes[real][:, 1] < gt_boxes[real][:, 3]).all()
assert gt_boxes[real][:, :4].min() >= 0 and gt_boxes[real][:, :4].max() <= IMAGE_SIZE
assert ((gt_boxes[real][:, 4] >= 0) & (gt_boxes[real][:, 4] < NUM_CLASSES)).all()
print(f"data: {DATA}, {NUM_CLASSES} classes, {len(train_set)} training and {len(val_set)} held-out images")
print(
    f"a batch: images {tuple(images.shape)}, gt_boxes {tuple(gt_boxes.shape)}, objects per image {real.sum(1).tolist()}"
)
print("first rows of the first image:\n", gt_boxes[0, :3])

# %% [markdown]
# Solid boxes are the ground truth. Look for small objects: they are the ones that the finest FPN
# level has to handle. A shape without a box is no mistake: the synthetic set labels an object only when
# at least half of it is visible, and draws the others (mostly hidden behind nearer shapes, or cut off by
# the border) as clutter that counts as background, much as VOC leaves out objects too hidden to name.

# %%
figure, axes = plt.subplots(1, 4, figsize=(16, 4))
for ax, image, boxes in zip(axes, images, gt_boxes):
    a4_helper.detection_visualizer(image, IDX_TO_CLASS, bbox=boxes, ax=ax)
show(figure)

# %% [markdown]
# ## Backbone with a Feature Pyramid Network
#
# A RegNetX-400MF trunk turns the image into features at strides 8, 16 and 32 (`c3, c4, c5`): deeper
# features know more about *what* is in the image but less about *where*. The FPN (Lin et al., CVPR 2017,
# Sec. 3) passes the coarse, semantically strong map back down the pyramid, upsampled and added to 1x1
# "lateral" projections of the finer maps, then smooths each sum with a 3x3 conv. Every level `p3, p4, p5`
# ends up with the same number of channels, so one prediction head can run on all of them.
#
# For two 224 x 224 images and 64 channels the levels must be 28 x 28, 14 x 14 and 7 x 7.

# %%
backbone = DetectorBackboneWithFPN(out_channels=64, pretrained=False)
dummy_images = torch.randn(2, 3, 224, 224)
with torch.no_grad():
    dummy_feats = backbone(dummy_images)

# Catches an FPN wired to the wrong trunk stages (strides 4, 8, 16) or with lateral convs of the wrong width.
expected_shapes = {"p3": (2, 64, 28, 28), "p4": (2, 64, 14, 14), "p5": (2, 64, 7, 7)}
assert {level: tuple(feats.shape) for level, feats in dummy_feats.items()} == expected_shapes
assert backbone.fpn_strides == {"p3": 8, "p4": 16, "p5": 32}
for level, feats in dummy_feats.items():
    print(f"{level}: stride {backbone.fpn_strides[level]:2d}, features {tuple(feats.shape)}")

# %% [markdown]
# ## Where each prediction looks: FPN locations
#
# FCOS predicts one thing per feature cell (FCOS Sec. 3.1), and treats the cell as the point at the
# centre of its receptive field in the image: cell `(i, j)` of a level with stride `s` sits at
# `x = (j + 0.5) s`, `y = (i + 0.5) s`.
#
# The order matters as much as the coordinates. A head's output is flattened with
# `permute(0, 2, 3, 1).reshape(B, H * W, C)`, which walks along a row first: entry `i * W + j` is row `i`,
# column `j`. The locations must come in that same row-major order, or every target is paired with the
# prediction of a different cell. (The original course expected x and y swapped here; code that
# matched it still trained, but to about half the mAP, which is why this check is worth having.)

# %%
STRIDES = backbone.fpn_strides
locations = get_fpn_location_coords(dummy_feats, STRIDES)

# Catches transposed locations (y moving first, the original assignment's order) and centres at the cell's
# corner instead of its middle. Row-major: x moves first. The first five p3 centres are (4, 4), (12, 4),
# (20, 4), (28, 4), (36, 4).
first_five = torch.tensor([[4.0, 4.0], [12.0, 4.0], [20.0, 4.0], [28.0, 4.0], [36.0, 4.0]])
torch.testing.assert_close(locations["p3"][:5], first_five)
for level, stride in STRIDES.items():
    Hl, Wl = dummy_feats[level].shape[-2:]
    assert locations[level].shape == (Hl * Wl, 2)
    for i, j in [(0, 0), (0, Wl - 1), (1, 0), (Hl - 1, 2), (Hl - 1, Wl - 1)]:
        expected = torch.tensor([(j + 0.5) * stride, (i + 0.5) * stride])
        torch.testing.assert_close(locations[level][i * Wl + j], expected)
assert sum(len(level_locations) for level_locations in locations.values()) == 28 * 28 + 14 * 14 + 7 * 7 == 1029
for level, level_locations in locations.items():
    print(f"{level}: {len(level_locations):4d} locations, first three {level_locations[:3].tolist()}")

# %% [markdown]
# The same grids on one of our images: each dot is a point where FCOS makes a prediction.


# %%
def image_locations(image_size):
    """FPN locations of one square image of our data set."""
    shapes = {level: (1, 1, image_size // stride, image_size // stride) for level, stride in STRIDES.items()}
    return get_fpn_location_coords(shapes, STRIDES)


IMAGE_LOCATIONS = image_locations(IMAGE_SIZE)
figure, axes = plt.subplots(1, 3, figsize=(15, 5))
for ax, (level, level_locations) in zip(axes, IMAGE_LOCATIONS.items()):
    a4_helper.detection_visualizer(images[0], IDX_TO_CLASS, bbox=gt_boxes[0], points=level_locations, ax=ax)
    ax.set_title(f"{level}: stride {STRIDES[level]}, {len(level_locations)} locations")
show(figure)

# %%
# The part's public tests, as the grader runs them: points, and what each failed test expected.
check("locations")

# %% [markdown]
# ## The prediction head
#
# One head is shared by all levels (FCOS Sec. 3.2): an object looks the same to it whatever level it
# lands on, because each level only sees objects of its own size range. Classification has its own stem of
# 3x3 convs; box regression and centerness share the other one (the placement the FCOS authors later
# found to work better). Per location it predicts K class logits, 4 distances and 1 centerness logit.
#
# The class bias starts at `-log(99)`, so every class begins at probability 0.01 (RetinaNet, Lin et al.
# 2017, Sec. 4.1): almost every location is background, and a head that starts at 0.5 would spend its
# first iterations being punished by thousands of easy negatives.

# %%
head = FCOSPredictionNetwork(num_classes=20, in_channels=64, stem_channels=[64, 64])
with torch.no_grad():
    class_logits, boxreg_deltas, centerness_logits = head(dummy_feats)

# Catches a head flattened as (B, C, HW) instead of (B, HW, C), and a class bias left at 0, which starts
# every class at probability 0.5 instead of 0.01.
assert class_logits["p3"].shape == (2, 784, 20)
assert boxreg_deltas["p4"].shape == (2, 196, 4)
assert centerness_logits["p5"].shape == (2, 49, 1)
for level, feats in dummy_feats.items():
    HW = feats.shape[2] * feats.shape[3]
    assert class_logits[level].shape == (2, HW, 20) and boxreg_deltas[level].shape == (2, HW, 4)
    assert centerness_logits[level].shape == (2, HW, 1)
initial_probability = torch.sigmoid(class_logits["p3"]).mean().item()
assert abs(initial_probability - 0.01) < 2e-3, initial_probability
for level in dummy_feats:
    print(
        f"{level}: class logits {tuple(class_logits[level].shape)}, box deltas {tuple(boxreg_deltas[level].shape)}, "
        f"centerness {tuple(centerness_logits[level].shape)}"
    )
print(f"mean initial class probability: {initial_probability:.4f}")

# %%
# The part's public tests, as the grader runs them: points, and what each failed test expected.
check("fcos_head")

# %% [markdown]
# ## Which location learns which box
#
# FCOS has no anchors, so "which prediction is responsible for this object" is decided by the locations
# (FCOS Sec. 3.1 and 3.2):
#
# 1. a location can only regress a box it lies strictly inside;
# 2. each level takes objects of one size range: the largest of the four distances from the location to
#    the box sides must fall in `(0, 64)` pixels on p3, `(64, 128)` on p4 and above 128 on p5 (the paper's
#    size ranges, with p5 as our coarsest level taking everything large). The rule measures from the
#    location, so a box with a side of about 64 to 128 pixels is matched on p3 near its centre (where its
#    farthest side is close) and on p4 near its edges: one box may appear on two levels. On 96-pixel images
#    no distance exceeds 96, so p5 gets no foreground at all in quick mode; on 224-pixel images it does;
# 3. when several boxes still qualify, the smallest one wins, since the larger one has plenty of other
#    locations;
# 4. everything else is background, marked with a row of `-1`.
#
# The cell below first checks the tie rule on a case worked out by hand, then matches the image (of the
# four above) with the largest object and checks the rules on the result.

# %%
SIZE_RANGES = {"p3": (0, 64), "p4": (64, 128), "p5": (128, float("inf"))}

# Catches the tie rule inverted (the larger box wins), padding rows matched as objects, and levels whose
# size ranges are ignored. Two nested boxes and a padding row. The p3 location (20, 20) lies in both boxes
# (largest distances 40 and 20, both inside p3's range), so the smaller box wins; (50, 50) lies only in the
# big one.
nested = torch.tensor([[0, 0, 60, 60, 0], [10, 10, 40, 40, 1], [-1, -1, -1, -1, -1]], dtype=torch.float32)
few_locations = {
    "p3": torch.tensor([[20.0, 20.0], [50.0, 50.0]]),
    "p4": torch.tensor([[200.0, 200.0]]),
    "p5": torch.tensor([[200.0, 200.0]]),
}
few_matched = fcos_match_locations_to_gt(few_locations, STRIDES, nested)
torch.testing.assert_close(few_matched["p3"], nested[[1, 0]])
assert (few_matched["p4"] == -1).all() and (few_matched["p5"] == -1).all(), "outside every box: background"

areas = (gt_boxes[..., 2] - gt_boxes[..., 0]) * (gt_boxes[..., 3] - gt_boxes[..., 1]) * real
image, boxes = images[areas.amax(1).argmax()], gt_boxes[areas.amax(1).argmax()]
matched = fcos_match_locations_to_gt(IMAGE_LOCATIONS, STRIDES, boxes)
real_boxes = boxes[boxes[:, 4] >= 0]

for level, rows in matched.items():
    foreground = rows[:, 4] >= 0
    assert (rows[~foreground] == -1).all(), "background rows are all -1"
    assert (rows[foreground][:, None, :] == real_boxes[None]).all(-1).any(-1).all(), "matched rows are real GT rows"
    # With stride 1 the deltas are plain pixel distances (left, top, right, bottom).
    distances = fcos_get_deltas_from_locations(IMAGE_LOCATIONS[level][foreground], rows[foreground], stride=1)
    assert (distances > 0).all(), "a location lies strictly inside its box"
    low, high = SIZE_RANGES[level]
    assert ((distances.amax(1) > low) & (distances.amax(1) < high)).all(), "the box fits the level's size range"
    why = f" (no distance in a {IMAGE_SIZE}-pixel image reaches {low})" if low >= IMAGE_SIZE else ""
    print(f"{level}: {int(foreground.sum()):3d} of {len(rows)} locations are foreground{why}")

figure, axes = plt.subplots(1, 3, figsize=(15, 5))
for ax, (level, rows) in zip(axes, matched.items()):
    foreground = rows[:, 4] >= 0
    a4_helper.detection_visualizer(image, IDX_TO_CLASS, bbox=boxes, points=IMAGE_LOCATIONS[level][foreground], ax=ax)
    low, high = SIZE_RANGES[level]
    ax.set_title(f"{level}: {int(foreground.sum())} matched\n(farthest side {low}-{high:g} px)")
show(figure)

# %%
# The part's public tests, as the grader runs them: points, and what each failed test expected.
check("fcos_matching")

# %% [markdown]
# ## Box targets: distances to the four sides
#
# A foreground location regresses its box as the distances `(l, t, r, b)` from itself to the left, top,
# right and bottom sides (FCOS Sec. 3.1, eq. 1), divided by the level's stride so that the targets of all
# levels have similar magnitudes. Decoding multiplies back and steps out from the location; a negative
# prediction counts as 0, so a decoded box always contains its location.
#
# Background rows give deltas of `-1`, and a `-1` decodes to an empty box at the location itself.

# %%
gt_example = torch.tensor([[10, 15, 100, 115, 1], [30, 20, 40, 30, 1], [120, 100, 200, 200, 1]], dtype=torch.float32)
location_example = torch.tensor([[30, 40], [32, 29], [125, 150]], dtype=torch.float32)

# Catches deltas not divided by the stride, sides swapped (x1 with x2), and a decoder that is not the
# encoder's inverse.
fcos_deltas = fcos_get_deltas_from_locations(location_example, gt_example, stride=8)
# Location (30, 40) in box (10, 15, 100, 115): l = 30 - 10 = 20, t = 40 - 15 = 25, r = 100 - 30 = 70,
# b = 115 - 40 = 75, each divided by the stride 8.
torch.testing.assert_close(fcos_deltas[0], torch.tensor([20.0, 25.0, 70.0, 75.0]) / 8)
round_trip = fcos_apply_deltas_to_locations(fcos_deltas, location_example, stride=8)
assert a4_helper.rel_error(round_trip, gt_example[:, :4]) == 0

background_location = torch.tensor([[100.0, 200.0]])
background_deltas = fcos_get_deltas_from_locations(background_location, torch.full((1, 5), -1.0), stride=8)
assert (background_deltas == -1).all()
background_box = fcos_apply_deltas_to_locations(background_deltas, background_location, stride=8)
torch.testing.assert_close(background_box, torch.tensor([[100.0, 200.0, 100.0, 200.0]]))

print("deltas:\n", fcos_deltas)
print("round trip rel. error:", a4_helper.rel_error(round_trip, gt_example[:, :4]))
print("background deltas:", background_deltas.tolist(), "-> box", background_box.tolist())

# %%
# The part's public tests, as the grader runs them: points, and what each failed test expected.
check("fcos_deltas")

# %% [markdown]
# ## Centerness
#
# Locations near a box's border see mostly other things and predict poor boxes. FCOS (Sec. 3.3, eq. 3)
# adds a third output trained towards `sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))`: 1 at the box
# centre, falling to 0 at its edges. At test time it is combined with the class score (here as the
# square root of their product), which pushes off-centre boxes down the ranking so that NMS keeps the
# good ones.

# %%
# Catches min and max swapped (values above 1), a missing square root, and background given a target.
centerness = fcos_make_centerness_targets(torch.cat([fcos_deltas[:2], background_deltas]))
# Box 1 at (30, 40): sqrt(min(20, 70) * min(25, 75) / (max(20, 70) * max(25, 75))) = sqrt(500 / 5250) = 0.3086.
# Box 2 at (32, 29): l, t, r, b = 2, 9, 8, 1, so sqrt(2 * 1 / (8 * 9)) = 1/6. Background gives -1.
torch.testing.assert_close(centerness, torch.tensor([0.30860671401, 0.1666666716, -1.0]))
print("centerness targets:", centerness.tolist())

# %% [markdown]
# The targets of the same image, level by level, drawn over the image (background left transparent):
# bright in the middle of each box, dark towards its edges. Each level only colours the locations it
# matched above, so in quick mode the p5 panel stays clear (no 96-pixel image has a distance above 128).

# %%
figure, axes = plt.subplots(1, 3, figsize=(15, 5))
for ax, (level, stride) in zip(axes, STRIDES.items()):
    side = IMAGE_SIZE // stride
    level_deltas = fcos_get_deltas_from_locations(IMAGE_LOCATIONS[level], matched[level], stride)
    targets = fcos_make_centerness_targets(level_deltas)
    foreground = matched[level][:, 4] >= 0
    assert ((targets[foreground] >= 0) & (targets[foreground] <= 1)).all() and (targets[~foreground] == -1).all()
    heatmap = targets.reshape(side, side)  # row-major: row i of the grid is y = (i + 0.5) * stride
    heatmap = heatmap.masked_fill(heatmap < 0, float("nan"))
    a4_helper.detection_visualizer(image, IDX_TO_CLASS, bbox=boxes, ax=ax)
    edges = (-0.5, IMAGE_SIZE - 0.5, IMAGE_SIZE - 0.5, -0.5)  # where imshow put the image
    shown = ax.imshow(heatmap, extent=edges, cmap="magma", vmin=0, vmax=1, alpha=0.75)
    ax.set_title(f"{level}: centerness targets")
figure.colorbar(shown, ax=axes, shrink=0.8)
show(figure)

# %%
# The part's public tests, as the grader runs them: points, and what each failed test expected.
check("centerness")

# %% [markdown]
# ## Overlap and duplicate removal: IoU and NMS
#
# Intersection over union is the yardstick of detection: the evaluation counts a detection as correct
# when its IoU with an unclaimed object of its class is at least 0.5. Boxes use continuous coordinates, so
# a box's width is `x2 - x1` (no `+1`).
#
# A detector fires many overlapping boxes on every object. Non-maximum suppression walks them from the
# most confident down and drops each box that overlaps an already kept box by more than a threshold.
# `common.nms` is written from scratch (it is part of the lesson) and must keep exactly what
# `torchvision.ops.nms` keeps. FCOS applies it per class, which `class_spec_nms` does in a single call.

# %%
boxes1 = torch.tensor([[10, 10, 90, 90], [20, 20, 40, 40], [60, 60, 80, 80]], dtype=torch.float32)
boxes2 = torch.tensor([[10, 10, 90, 90], [60, 60, 80, 80], [30, 30, 70, 70]], dtype=torch.float32)
# Catches the "+1" pixel convention (widths x2 - x1 + 1) and an intersection not clamped at 0 for
# disjoint boxes. Row 2 against column 3: intersection 10 * 10 = 100, union 400 + 1600 - 100 = 1900,
# IoU = 1/19. Row 1 against column 2: the small box lies inside the big one, 400 / 6400 = 0.0625.
expected_iou = torch.tensor([[1, 0.0625, 0.25], [0.0625, 0, 0.052631579], [0.0625, 1, 0.052631579]])
iou_matrix = iou(boxes1, boxes2)
assert a4_helper.rel_error(iou_matrix, expected_iou) < 1e-7
print("IoU matrix:\n", iou_matrix)

# %%
generator = torch.Generator().manual_seed(0)
random_boxes = (100 * torch.rand(5000, 4, generator=generator)).round()
random_boxes[:, 2] += random_boxes[:, 0] + 1
random_boxes[:, 3] += random_boxes[:, 1] + 1
random_scores = torch.randn(5000, generator=generator)
random_classes = torch.randint(0, 5, (5000,), generator=generator)

# Catches NMS that visits boxes in the wrong order, compares IoU with the threshold the wrong way round, or
# suppresses across classes when it should not (5000 random boxes give plenty of overlaps of each kind).
for threshold in (0.3, 0.5, 0.7):
    ours = nms(random_boxes, random_scores, threshold)
    theirs = torchvision.ops.nms(random_boxes, random_scores, threshold)
    assert torch.equal(ours, theirs), f"NMS differs from torchvision at IoU threshold {threshold}"
    ours_per_class = class_spec_nms(random_boxes, random_scores, random_classes, threshold)
    theirs_per_class = torchvision.ops.batched_nms(random_boxes, random_scores, random_classes, threshold)
    assert torch.equal(ours_per_class, theirs_per_class)
    print(
        f"IoU threshold {threshold}: both keep the same {len(ours)} of 5000 boxes "
        f"({len(ours_per_class)} when NMS runs per class)"
    )

# %%
# The part's public tests, as the grader runs them: points, and what each failed test expected.
check("iou")
check("nms")

# %% [markdown]
# ## The losses
#
# FCOS's loss (Sec. 3.1, eq. 2) has three terms, each summed over locations and divided by the number of
# foreground locations:
#
# - **classification**: sigmoid focal loss (RetinaNet Sec. 3, eq. 5) over all locations; it down-weights
#   the easy background locations that would otherwise dominate. You write it too (`sigmoid_focal_loss`;
#   torchvision's own is off limits while this part is graded);
# - **box regression**: on foreground locations only (L1 on the stride-normalised distances, as in the
#   course; the section "What came after the paper" turns to GIoU);
# - **centerness**: binary cross-entropy towards the centerness target, on foreground locations only.
#
# An image without objects must still give finite losses: a positive classification loss (it still
# has to learn "nothing here") and zero box and centerness losses.
#
# Until the last section this notebook builds **the course's FCOS**: `course_fcos(...)` builds FCOS from
# the parts written above (the plain head, matching anywhere inside a box, the L1 box loss), without the
# improvements that FCOS's authors published after the paper, which `FCOS(...)` has by default.

# %%
a4_helper.reset_seed(0)
untrained = course_fcos(NUM_CLASSES, FPN_CHANNELS, [FPN_CHANNELS] * 2, pretrained=False)
untrained.train()
losses = untrained(images, gt_boxes)
# Catches losses divided by zero foreground locations (NaN on an empty image) and box or centerness
# losses computed on background rows.
assert set(losses) == {"loss_cls", "loss_box", "loss_ctr"}
assert all(torch.isfinite(value) and value.dim() == 0 for value in losses.values())
no_objects = untrained(images, torch.full_like(gt_boxes, -1.0))
assert torch.isfinite(no_objects["loss_cls"]) and no_objects["loss_cls"] > 0
assert no_objects["loss_box"] == 0 and no_objects["loss_ctr"] == 0
print("untrained losses:", {name: round(value.item(), 4) for name, value in losses.items()})
print("images without objects:", {name: round(value.item(), 4) for name, value in no_objects.items()})


# %%
# The part's public tests, as the grader runs them: points, and what each failed test expected.
check("fcos_losses")

# %% [markdown]
# ## Overfit a small subset first
#
# Before spending hours on the full data, train on a small, fixed subset (the course used 160 images
# for a few hundred iterations; quick mode uses four images for 150). A correct detector drives the loss
# down quickly and then finds the objects of those very images; if it cannot even do that, something in
# the matching, the targets or the losses is wrong, and a long run would only hide it. The check asks for
# the loss to halve in quick mode and to fall by a fifth on the full recipe's 160 images (a loss that
# merely falls also passes a detector that only learns "background everywhere").

# %%
overfit_set = subset(train_set, OVERFIT_IMAGES)
overfit_loader = torch.utils.data.DataLoader(
    overfit_set,
    batch_size=BATCH_SIZE,
    shuffle=True,
    num_workers=NUM_WORKERS,
    generator=torch.Generator().manual_seed(0),
)
a4_helper.reset_seed(0)
overfit_fcos = course_fcos(NUM_CLASSES, FPN_CHANNELS, [FPN_CHANNELS, FPN_CHANNELS], pretrained=PRETRAINED)
overfit_history = a4_helper.train_detector(
    overfit_fcos,
    overfit_loader,
    learning_rate=LEARNING_RATE,
    max_iters=OVERFIT_ITERS,
    log_period=LOG_PERIOD,
    device=DEVICE,
    optimizer=OPTIMIZER,
)
# Catches a loss that cannot fall: targets paired with the wrong locations, a sign flipped in the
# deltas, a loss divided by the wrong count. (Quick mode's curve is noisy with batches of four.)
assert loss_fell(overfit_history, factor=0.5 if QUICK else 0.8)
show(a4_helper.plot_loss_history(overfit_history))

# %% [markdown]
# Predictions on the four images it was trained on: dashed boxes with a score above 0.3 (the threshold of
# all prediction pictures in this notebook; the mAP below uses every score from 0.05), at most six per image.
# They should sit on the labelled objects. Then the mAP@0.5 on these images must reach 0.5: a detector
# whose boxes or classes are systematically off (transposed locations, labels of another image, a
# decoding that does not invert the encoding) cannot fit even four images that well.

# %%
PICTURE_SCORE = 0.3
show_predictions(overfit_fcos, overfit_set, range(4), PICTURE_SCORE, title="FCOS after overfitting: training images")
overfit_map = a4_helper.evaluate_detector(
    overfit_fcos, torch.utils.data.DataLoader(overfit_set, batch_size=BATCH_SIZE), device=DEVICE
)["map"]
assert overfit_map >= 0.5, f"FCOS could not overfit {OVERFIT_IMAGES} images: mAP@0.5 {overfit_map:.3f}"
print(f"mAP@0.5 on the {OVERFIT_IMAGES} training images it overfit: {overfit_map:.3f}")

# %% [markdown]
# ## Train FCOS
#
# The full recipe: SGD with momentum, a short linear warm-up, and the learning rate divided by 10 at 60%
# and 90% of the run. `train_detector` saves the whole training state every `LOG_PERIOD` iterations;
# if Colab disconnects, run the notebook again and training resumes where it stopped, ending exactly as
# an uninterrupted run would. The configuration stored with the checkpoint lets `detect.py` reload it.

# %%
FCOS_DIR = run_dir("fcos")
FCOS_CHECKPOINT = FCOS_DIR / "checkpoint.pt"
a4_helper.reset_seed(0)
fcos = course_fcos(NUM_CLASSES, FPN_CHANNELS, [FPN_CHANNELS, FPN_CHANNELS], pretrained=PRETRAINED)
fcos_history = a4_helper.train_detector(
    fcos,
    make_train_loader(),
    learning_rate=LEARNING_RATE,
    max_iters=TRAIN_ITERS,
    log_period=LOG_PERIOD,
    device=DEVICE,
    optimizer=OPTIMIZER,
    checkpoint_path=FCOS_CHECKPOINT,
    metadata={"config": run_config("fcos").to_dict()},
)
# Catches a run that diverges (NaN) or stops early, e.g. a loader that runs dry after one epoch.
assert len(fcos_history["total"]) == TRAIN_ITERS
assert all(torch.isfinite(torch.tensor(values)).all() for values in fcos_history.values())
assert loss_fell(fcos_history, factor=1.0 if QUICK else 0.8)
show(a4_helper.plot_loss_history(fcos_history, path=FCOS_DIR / "losses.png"))

# %% [markdown]
# ## Predictions on held-out images
#
# Images the detector has never seen, drawn like the overfitting pictures (score above 0.3, at most six
# boxes per image). Typical mistakes to look for: duplicates that NMS left because their classes differ,
# small objects missed, and boxes that are right in place but wrong in class. In quick mode, after only 60
# iterations on 32 images, the detector is still weak on new images: expect loose boxes with scores just
# above 0.3, often of one class. The full recipe's boxes sit on the objects.

# %%
show_predictions(fcos, val_set, range(8), PICTURE_SCORE, title="FCOS: held-out images")

# %%
# The part's public tests, as the grader runs them: points, and what each failed test expected.
check("fcos_inference")

# %% [markdown]
# ## Mean average precision
#
# For each class, detections of all held-out images are sorted by score; walking down the list, a
# detection is a true positive if the object of its class that it overlaps most has IoU >= 0.5 and was
# not already claimed by a higher-scoring detection, and a false positive otherwise. The area under the
# resulting precision-recall curve (after making precision non-increasing) is the class's AP, and mAP is
# the mean over classes (the PASCAL VOC protocol, Everingham et al., IJCV 2010; the all-point area is the
# variant used since VOC 2010, the paper's 11-point one is `method="voc07"`). COCO's mAP@[.5:.95]
# averages the same over IoU thresholds 0.5, 0.55, ..., 0.95 and so also rewards tight boxes. A low
# score threshold (0.05) is used on purpose: the low-confidence tail adds recall, which AP rewards.

# %%
fcos_voc = a4_helper.evaluate_detector(fcos, val_loader, score_thresh=0.05, nms_thresh=0.5, device=DEVICE)
fcos_coco = a4_helper.evaluate_detector(
    fcos, val_loader, score_thresh=0.05, nms_thresh=0.5, device=DEVICE, method="coco"
)
assert all(0 <= value <= 1 for value in (fcos_voc["map"], fcos_coco["map"], fcos_coco["map_50"], fcos_coco["map_75"]))
assert fcos_voc["num_images"] == len(val_set)

print(f"FCOS on {fcos_voc['num_images']} held-out images ({fcos_voc['images_per_second']:.1f} images/s)")
print(
    f"  mAP@0.5 (VOC): {fcos_voc['map']:.4f}   mAP@[.5:.95] (COCO): {fcos_coco['map']:.4f}   "
    f"COCO mAP@0.5: {fcos_coco['map_50']:.4f}   mAP@0.75: {fcos_coco['map_75']:.4f}"
)
print(f"\n{'class':>14}  AP@0.5")
for class_index, average_precision in sorted(fcos_voc["ap_per_class"].items()):
    print(f"{IDX_TO_CLASS[class_index]:>14}  {average_precision:.4f}")

# %% [markdown]
# ### Precision-recall curves, and the files for external mAP tools
#
# `inference_with_detector(..., output_dir=...)` writes one `ground-truth/<image>.txt` and one
# `detection-results/<image>.txt` per held-out image, in the format of the popular mAP script the course
# used (`class x1 y1 x2 y2`, `class score x1 y1 x2 y2`), including empty files for images with no
# detection (skipping them would inflate the mAP). That script crashes on current matplotlib, so the
# project evaluates itself; the files are there for those who want a second opinion. Below, the same
# predictions go through `compute_map` again, which must agree with `evaluate_detector`, and each class's
# precision-recall curve is drawn (grey: raw; blue: the non-increasing envelope whose area is the AP).
# In quick mode the curves are short and low (the held-out mAP is a few percent): the few boxes that hit an
# object come with many misses.

# %%
fcos_export = export_and_curves(fcos, FCOS_DIR / "map_input", "FCOS: precision-recall per class (IoU 0.5)")
# Catches exported files that skip images without detections, or boxes written in another order.
assert abs(fcos_export["map"] - fcos_voc["map"]) < 1e-9, "exported predictions give the same mAP"

# %% [markdown]
# ## Reload the checkpoint
#
# A trained model is only useful if it can be rebuilt from disk. `experiment.load_detector` rebuilds the
# detector from the configuration stored in the checkpoint and loads its weights; it must score exactly
# what the model in memory scored. The command line does the same with
# `python detect.py eval --checkpoint <path>`.

# %%
reloaded_fcos, reloaded_config = experiment.load_detector(str(FCOS_CHECKPOINT))
reloaded_voc = a4_helper.evaluate_detector(reloaded_fcos, val_loader, score_thresh=0.05, nms_thresh=0.5, device=DEVICE)
assert reloaded_config.model == "fcos" and reloaded_config.num_classes == NUM_CLASSES
tolerance = 1e-6 if DEVICE.type == "cpu" else 1e-3  # GPU kernels may round differently between runs
# Catches a checkpoint that misses weights or buffers (BatchNorm statistics) or rebuilds another model.
assert abs(reloaded_voc["map"] - fcos_voc["map"]) < tolerance, (reloaded_voc["map"], fcos_voc["map"])
print(f"reloaded from {FCOS_CHECKPOINT}: mAP@0.5 {reloaded_voc['map']:.4f} (in memory: {fcos_voc['map']:.4f})")
print(f"from a shell: python detect.py eval --checkpoint {FCOS_CHECKPOINT}")

# %% [markdown]
# ## What came after the paper
#
# FCOS's authors kept improving it after the conference paper, and published the changes in the journal
# version (Tian et al., *FCOS: A Simple and Strong Anchor-free Object Detector*, TPAMI 2022) and their
# released code; torchvision's `FCOS` has most of them. `FCOS` is built from parts (a backbone, a head,
# a matching rule and a box loss), and `FCOS(...)` builds the improved ones; `course_fcos(...)` the
# course's:
#
# - The head, `improved_fcos_head(...)`, is `FCOSPredictionNetwork` with three options on.
#   `group_norm=True`: GroupNorm after each head conv. One head serves all levels, whose features differ
#   in scale; normalised, the head trains faster and steadier. `nonnegative_deltas=True`: a ReLU on the
#   box output. A distance to a side is never negative, so every box contains its location, in training
#   as at test time. `learnable_scales=True`: a trainable scale of each level's box output, so that each
#   level can choose its own output range.
# - The matching rule, `FCOSMatcher(center_sampling_radius=1.5)`: positives only within 1.5 strides of a
#   box's centre. Border locations see mostly background and regress poorly.
# - The box loss, `fcos_giou_loss`: GIoU instead of L1 (`fcos_l1_loss`) on the distances; it measures
#   boxes as the evaluation does, whatever their size.
#
# With all of these, our FCOS learned as well as torchvision's, but no better: both found only a third of
# the objects under 16 pixels. Two more changes of this project's own go after those small objects:
#
# - `DetectorBackboneWithFPN(..., fine_p3=True)`: p3 also sees the backbone's stride-4 stage. The
#   stride-8 stage no longer knows where inside each 8-pixel cell an edge lies, which is what a 10-pixel
#   box needs.
# - `FCOS(..., object_balance=0.5)`: FCOS weighs every foreground location alike, so a 40-pixel box with
#   nine locations counts nine times as much as a 10-pixel box with one. Here a location of an object
#   with `n` locations weighs `n ** -0.5` (scaled so that the loss keeps its size): the small box counts a third
#   of the large one, not a ninth.
#
# `benchmarks/bench_accuracy_vs_torchvision.py` measures each one alone and all together, mean over three
# seeds, next to torchvision's FCOS; `docs/accuracy.md` has the table. Below, center
# sampling and the object balance on the batch of the matching section, then the improved FCOS trained
# exactly like the course's.

# %%
plain = fcos_match_locations_to_gt(IMAGE_LOCATIONS, STRIDES, gt_boxes)
sampled = fcos_match_locations_to_gt(IMAGE_LOCATIONS, STRIDES, gt_boxes, center_sampling_radius=1.5)
plain_fg = sum(int((m[..., 4] >= 0).sum()) for m in plain.values())
sampled_fg = sum(int((m[..., 4] >= 0).sum()) for m in sampled.values())
# Center sampling only removes candidates, so a location that is foreground with it was foreground without
# it (though perhaps for another box: with the smaller box's centre out of reach, a larger box may win).
# Each positive it keeps lies within 1.5 strides of its box's centre, along x and along y.
for level, stride in STRIDES.items():
    kept = sampled[level][..., 4] >= 0  # (B, HlWl)
    assert (plain[level][..., 4] >= 0)[kept].all()
    rows = sampled[level][kept]
    centres = (rows[:, :2] + rows[:, 2:4]) / 2
    where = IMAGE_LOCATIONS[level].expand(len(gt_boxes), -1, -1)[kept]
    assert ((where - centres).abs() < 1.5 * stride).all()
assert 0 < sampled_fg <= plain_fg
print(f"foreground locations in the batch: {plain_fg} anywhere inside a box, {sampled_fg} with center sampling")

# %%
# The object balance on the same matches: the fewer locations an object has, the more each of them weighs.
matched_all = torch.cat(list(sampled.values()), dim=1)  # (B, HW, 5), levels in order
balance = fcos_object_balance_weights(matched_all, gt_boxes, power=0.5)
assert torch.isclose(balance.sum(), torch.tensor(float(sampled_fg)))  # the loss keeps FCOS's size
per_object = []  # (locations, weight of each) of every object of the batch that has locations
for image_matches, image_weights, image_gt in zip(matched_all, balance, gt_boxes):
    for row in image_gt[image_gt[:, 4] >= 0]:
        mine = (image_matches == row).all(dim=1)
        if mine.any():
            per_object.append((int(mine.sum()), float(image_weights[mine][0])))
per_object.sort()
assert all(a[1] >= b[1] for a, b in zip(per_object, per_object[1:]))  # fewer locations, larger weight
for count, weight in (per_object[0], per_object[-1]):
    print(f"an object with {count} locations: each weighs {weight:.2f}, together {count * weight:.2f}")

# %%
a4_helper.reset_seed(0)
improved_fcos = FCOS(NUM_CLASSES, FPN_CHANNELS, [FPN_CHANNELS, FPN_CHANNELS], pretrained=PRETRAINED)
improved_history = a4_helper.train_detector(
    improved_fcos,
    make_train_loader(),
    learning_rate=LEARNING_RATE,
    max_iters=TRAIN_ITERS,
    log_period=LOG_PERIOD,
    device=DEVICE,
    optimizer=OPTIMIZER,
    checkpoint_path=run_dir("fcos_improved") / "checkpoint.pt",
    metadata={"config": run_config("fcos", variant="improved").to_dict()},
)
assert loss_fell(improved_history, factor=1.0 if QUICK else 0.8)
improved_voc = a4_helper.evaluate_detector(improved_fcos, val_loader, device=DEVICE)
assert 0 <= improved_voc["map"] <= 1
print(
    f"mAP@0.5 on the held-out images after {TRAIN_ITERS} iterations: course's FCOS {fcos_voc['map']:.4f}, "
    f"improved FCOS {improved_voc['map']:.4f}"
)

# %% [markdown]
# ## Try it on your own photo
#
# The detector has only seen square crops of `IMAGE_SIZE` pixels. `photos.predict_photos` runs it on a whole
# photo of any shape, as `detect.py predict` does: the photo is scaled so that its short side is `IMAGE_SIZE`
# (and its long side at most twice that), padded to a multiple of 32, and the boxes come back in the photo's
# own pixels. Set `PHOTO` to the path of a photo, or on Colab set `UPLOAD = True` to pick one from your
# computer. A detector trained on the synthetic shapes finds shapes, not cats: train on VOC for that. With
# no photo given, two held-out images side by side stand in for a photo twice as wide as it is high. The
# picture draws the best eight detections with a score above 0.3; in quick mode the detector is as weak here
# as on the held-out pictures above, and may find little or nothing.

# %%
PHOTO = None  # e.g. "my_photo.jpg"
UPLOAD = False  # on Colab: True opens a file picker
display(RUN.try_on_photo(improved_fcos, PHOTO, upload=UPLOAD))

# %% [markdown]
# ## Where to go from here
#
# - `two_stage_detector.ipynb` builds Faster R-CNN on the same backbone and compares it with this FCOS.
# - Swap the improved parts in one at a time (for example the course's FCOS with the improved head,
#   `FCOS(K, backbone=DetectorBackboneWithFPN(C, fine_p3=False), head=improved_fcos_head(K, C, [C, C]),
#   matcher=FCOSMatcher(), box_loss=fcos_l1_loss, object_balance=0.0)`) and see which of them matter on
#   your data.
# - `improved_fcos(..., fpn_levels=P2_LEVELS)` (`detect.py train --p2`) adds a level of stride 4,
#   which finds small objects far better still, for about twice the computation.
# - Public results of the original course put a correct FCOS at roughly 42-45% mAP@0.5 on VOC 2007 with
#   this recipe, and code with the assignment's transposed locations at roughly 23-28%.

# %%
if QUICK and not os.environ.get("DETECT_RUN_DIR"):
    import shutil

    shutil.rmtree(RUN_DIR)  # quick-mode checkpoints and exports only served the checks above
    print(f"removed {RUN_DIR}")

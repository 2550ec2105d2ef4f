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
# values worked out by hand, trains it, and measures it with the project's own mAP evaluator. The code
# lives in the modules, and each step shows the source of the function it is about (read from the module as
# it is now, so in the student release it shows the stub you are about to write); every cell calls the
# modules, so what you see is what `detect.py` runs.
#
# **How to run it.** Top to bottom, on Colab (pick a GPU runtime) or on a laptop.
# With the environment variable `DETECT_QUICK=1` the whole notebook runs in a few minutes on a CPU:
# small synthetic images, random weights, and AdamW, which moves a random backbone much faster than SGD.
# That is enough to watch FCOS overfit four images and to lift its mAP on held-out images from about 0 to
# above 0.3 (both asserted). Without it, the notebook runs the course recipe (224 x 224 images, batch 16,
# 9000 iterations), which wants a GPU.
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
# Quick mode shrinks everything that costs time: 128-pixel images, a 32-channel FPN, random backbone
# weights (no download) and AdamW at 2e-3: 150 iterations on four images to overfit, then 300 iterations of
# batch 8 on 256 images to train. The full recipe is the course's: 224-pixel images, batch 16, a 128-channel
# FPN, SGD for 9000 iterations, and a backbone that starts from ImageNet weights, because a detector
# trained on a few thousand images learns far better from features that already know what edges and
# textures look like. Both notebooks share this set-up: `notebook_kit.setup` picks the sizes
# (`notebook_kit.QUICK_SIZES` or `FULL_SIZES`), the device, the weights and the run folder, and the helpers
# the later cells call (`show`, `run_dir`, `show_predictions`, ...) live there too. The printout below says
# what this run chose.

# %%
RUN = notebook_kit.setup("fcos", ROOT, QUICK)
S = RUN.sizes
IMAGE_SIZE, BATCH_SIZE, FPN_CHANNELS = S.image_size, S.batch_size, S.fpn_channels
NUM_TRAIN, NUM_VAL = S.num_train, S.num_val  # synthetic images
OVERFIT_IMAGES, OVERFIT_ITERS = S.overfit_images, S.overfit_iters
TRAIN_ITERS, LEARNING_RATE, LOG_PERIOD, OPTIMIZER = S.train_iters, S.learning_rate, S.log_period, S.optimizer
NUM_WORKERS, DEVICE, PRETRAINED, RUN_DIR = S.num_workers, RUN.device, RUN.pretrained, RUN.run_root
show, subset, loss_fell = notebook_kit.show, notebook_kit.subset, notebook_kit.loss_fell
show_part = notebook_kit.show_part  # the source of what a check checks, from its module

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
# On square images, boxes in (y1, x1, y2, x2) order pass every test above; only where an object lies tells.
# Each synthetic image is drawn from a fixed seed: the first one (the first picture below) has its red
# square, class 0, in the top right corner, right of the middle (x1) and above it (y2).
if DATA == "synthetic":
    red_square = gt_boxes[0][gt_boxes[0][:, 4] == 0][0]
    assert red_square[0] > IMAGE_SIZE / 2 > red_square[3], f"the red square at {red_square[:4].tolist()}"
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
# ### Try this
#
# - Draw the next four training images (`next(iter(torch.utils.data.DataLoader(train_set, batch_size=8)))`)
#   and count the objects under 16 pixels a side: those are the ones only p3's fine grid can hold.
# - Draw the accuracy benchmark's harder scenes, `a4_helper.SyntheticDetection("val", 4, IMAGE_SIZE,
#   scene=a4_helper.CROWDED_SCENE)`: what makes them harder than these?

# %% [markdown]
# ## The task: what a detector outputs, and how it is judged
#
# For each image a detector returns a list of **detections**: a box `(x1, y1, x2, y2)` in pixels, a class,
# and a score from 0 to 1 that says how sure it is. The list can be of any length, empty included. Inside,
# a detector scores a great many candidate boxes and keeps the best ones; `FCOS.predict` returns, per image,
# the dict `{"boxes" (N, 4), "labels" (N,), "scores" (N,)}`.
#
# To show what is judged and how, the next cells use *made-up* detections on one held-out image. No network
# made them: `notebook_kit.made_up_detections` places one of each kind of outcome on purpose.
#
# **IoU.** A detection is compared with the ground truth by *intersection over union*: the area two boxes
# share divided by the area they cover together. It is 1 for identical boxes and 0 for boxes that do not
# touch. (Its code, `common.iou`, is one of the parts you write later on.)
#
# **True and false positives.** Going down the detections from the highest score, a detection is a
# **true positive** (TP) when its IoU with a ground-truth box of its own class is at least 0.5 and no
# higher-scoring detection has claimed that box already; anything else is a **false positive** (FP): a box
# too loose, a box of the wrong class, or a second box on an object already found. A ground-truth box
# that no detection claims is **missed**.

# %%
# A held-out image with at least four objects (largest first), and one made-up detection of each outcome.
example_image, objects = notebook_kit.example_with_objects(val_set)
made_up = notebook_kit.made_up_detections(objects, NUM_CLASSES)  # (4, 6) rows (x1, y1, x2, y2, class, score)
print("made-up detections (x1, y1, x2, y2, class, score):\n", made_up)
show(a4_helper.draw_detector_outputs(example_image, IDX_TO_CLASS, objects, made_up))

# %% [markdown]
# *Look for:* one true positive (the 0.92 box); three false positives, each for another reason; and the
# objects without any detection, which count against recall below.
#
# The IoU of the second box with the largest object, drawn. Left: the intersection shaded and the union
# outlined. Right: what the 0.5 threshold means, as a box shifted to just above and just below it.

# %%
show(a4_helper.draw_iou_example(objects[0, :4].tolist(), made_up[1, :4].tolist()))

# %% [markdown]
# *Look for:* on the right, a box at IoU 0.75 finds the object and one at 0.25 does not. A box slid sideways by
# a third of its width is at exactly 0.5, so for a 12-pixel object four pixels decide: small objects are the
# hard ones.
#
# **NMS (non-maximum suppression).** A detector fires several overlapping boxes on one object, and all but
# one of them are false positives. NMS walks the boxes from the highest score down, keeps a box, and drops
# every later box of the same class that overlaps it by more than a threshold (IoU 0.5 in this project).
# Run on the made-up detections, it removes the second box on the largest object and keeps the others,
# which overlap nothing of their class. (`common.nms` and `class_spec_nms` are yours to write too; this cell
# uses torchvision's, so that it runs before yours exist.)

# %%
kept = torchvision.ops.batched_nms(made_up[:, :4], made_up[:, 5], made_up[:, 4].long(), iou_threshold=0.5)
# The second box overlaps the first by IoU (1 - 0.2) / (1 + 0.2) = 0.67 > 0.5: it goes; the others stay.
assert kept.tolist() == [0, 2, 3], kept
print(f"NMS at IoU 0.5 keeps detections {kept.tolist()} of {list(range(len(made_up)))} (scores, highest first)")

# %% [markdown]
# **Average precision (AP) and mAP.** Take all detections of one class over all test images, sorted by
# score. After each one, *precision* is the fraction of the detections so far that are true positives, and
# *recall* the fraction of the class's ground-truth boxes found so far. The AP is the area under this
# precision-recall curve once precision is made non-increasing (PASCAL VOC, Everingham et al., IJCV 2010):
# a fraction from 0 to 1, and 1 only if every object is found before any false positive. **mAP** is the
# mean of the classes' APs; **mAP@0.5** counts a true positive at IoU 0.5, as above. COCO's mAP@[.5:.95]
# averages over IoU thresholds 0.5, 0.55, ..., 0.95, so it also rewards tight boxes. All the figures of
# this notebook are fractions from 0 to 1, not percentages. The example below: one class, three objects,
# seven ranked detections.

# %%
show(a4_helper.draw_average_precision_example())

# %% [markdown]
# *Look for:* precision drops at each false positive and recall rises only at true positives; the shaded
# area under the envelope is the AP written in the title. A detector that found the same boxes with the
# false positives ranked last would score higher: AP rewards scores that rank well.
#
# ### Try this
#
# - Slide the second made-up box further right (`made_up[1, [0, 2]] += 10`) and predict before you run the
#   NMS cell again: does NMS still remove it? Would it still be a false positive without NMS?
# - Give the loose box a score of 0.95 (`made_up[2, 5] = 0.95`), so that it ranks first, and draw the outputs
#   again: which outcomes change, and which stay?

# %% [markdown]
# ## The network at a glance
#
# The FCOS this notebook trains, as one forward pass at this run's sizes draws it: the backbone's trunk
# (RegNetX-400MF) makes features at strides 8, 16 and 32 (and 4, which this FCOS also feeds into p3: see
# "What came after the paper"); the FPN turns them into the levels `p3, p4, p5` of `C` channels each; one
# head, shared by the levels, predicts at every location of every level the class logits, four box
# distances and a centerness logit; `predict` turns those into detections. Every shape in the figure was
# recorded from the run (`B` images in the batch, `C` the FPN's channels). The sections below take these
# blocks one at a time. (In the student release the figure appears once the head is written.)

# %%
notebook_kit.show_architecture(
    lambda: FCOS(NUM_CLASSES, FPN_CHANNELS, [FPN_CHANNELS] * 2, pretrained=False), IMAGE_SIZE, BATCH_SIZE
)

# %% [markdown]
# *Look for:* each level's grid is the image side divided by its stride (on p3, the image side over 8), and
# every head output has one row per location of its level: the row count is the grid's cells.

# %% [markdown]
# ### Try this
#
# - Draw the course's FCOS instead, `course_fcos(NUM_CLASSES, FPN_CHANNELS, [FPN_CHANNELS] * 2)`: which
#   block changes, and which shapes stay the same?

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
# ### Try this
#
# - Feed the backbone one image of 192 x 256 pixels (`torch.randn(1, 3, 192, 256)`); predict each level's
#   shape before you run it.
# - How many of the backbone's weights are the FPN's? Compare `sum(p.numel() for p in backbone.parameters())`
#   with the same sum over the trunk alone, `backbone.backbone`.

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
show_part("locations")

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
# ### Try this
#
# - Swap x and y in the check's `expected` line and run the cell: which assertion fails, and what does it
#   print? That is what a transposed `get_fpn_location_coords` would show.
# - Work out by hand where cell (row 2, column 5) of p4 lies, then look it up: `locations["p4"][2 * 14 + 5]`.

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
show_part("fcos_head")

# %%
head = FCOSPredictionNetwork(num_classes=20, in_channels=64, stem_channels=[64, 64])
with torch.no_grad():
    class_logits, boxreg_deltas, centerness_logits = head(dummy_feats)

# Catches a head flattened as (B, C, HW) instead of (B, HW, C), also when that is then reshaped to
# (B, HW, C) without moving C last, and a class bias left at 0, which starts every class at probability 0.5
# instead of 0.01.
assert class_logits["p3"].shape == (2, 784, 20)
assert boxreg_deltas["p4"].shape == (2, 196, 4)
assert centerness_logits["p5"].shape == (2, 49, 1)
for level, feats in dummy_feats.items():
    HW = feats.shape[2] * feats.shape[3]
    assert class_logits[level].shape == (2, HW, 20) and boxreg_deltas[level].shape == (2, HW, 4)
    assert centerness_logits[level].shape == (2, HW, 1)
# Right shapes can still hold the wrong numbers: row i * 28 + j of p3 is what the convs give at cell (i, j).
with torch.no_grad():
    box_map = head.pred_box(head.stem_box(dummy_feats["p3"]))  # (2, 4, 28, 28)
torch.testing.assert_close(boxreg_deltas["p3"][:, 1 * 28 + 2], box_map[:, :, 1, 2])
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
# ### Try this
#
# - Build the head with one stem conv (`stem_channels=[64]`) and with three, and compare their parameter counts.
# - Zero the class bias (`torch.nn.init.zeros_(head.pred_cls.bias)`), run the head again and print the mean
#   initial class probability: what would the focal loss make of thousands of locations starting at 0.5?

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
#    farthest side is close) and on p4 near its edges: one box may appear on two levels. On 128-pixel images
#    no distance exceeds 128, so p5 gets no foreground at all in quick mode; on 224-pixel images it does;
# 3. when several boxes still qualify, the smallest one wins, since the larger one has plenty of other
#    locations;
# 4. everything else is background, marked with a row of `-1`.
#
# The cell below first checks the tie rule on a case worked out by hand, then matches the image (of the
# four above) with the largest object and checks the rules on the result. In the picture each box has its
# own colour, and the dots of the locations matched to it share that colour.
#
# *Look for:* the dots of a small box on p3 only; a larger box's dots on p4, and some of them on p3 near its
# centre; where two boxes overlap, the dots in the overlap take the smaller box's colour.

# %%
show_part("fcos_matching")

# %%
SIZE_RANGES = {"p3": (0, 64), "p4": (64, 128), "p5": (128, float("inf"))}

# Catches the tie rule inverted (the larger box wins), padding rows matched as objects, and levels whose
# size ranges are ignored. Two nested boxes and a padding row. The p3 location (20, 20) lies in both boxes
# (largest distances 40 and 20, both inside p3's range), so the smaller box wins; (50, 50) lies only in the
# big one. Class -1 makes a row padding whatever its coordinates: this one, a still smaller box around
# (20, 20), would win there if padding counted (all -1, as the data pads, no location could ever lie inside).
nested = torch.tensor([[0, 0, 60, 60, 0], [10, 10, 40, 40, 1], [15, 15, 25, 25, -1]], dtype=torch.float32)
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
    owner = (rows[foreground][:, None, :] == boxes[None]).all(-1).float().argmax(1)  # the GT row each one regresses
    a4_helper.detection_visualizer(
        image, IDX_TO_CLASS, bbox=boxes, points=IMAGE_LOCATIONS[level][foreground], point_boxes=owner, ax=ax
    )
    low, high = SIZE_RANGES[level]
    ax.set_title(f"{level}: {int(foreground.sum())} matched\n(farthest side {low}-{high:g} px)")
show(figure)

# %%
# The part's public tests, as the grader runs them: points, and what each failed test expected.
check("fcos_matching")

# %% [markdown]
# ### Try this
#
# - Match with `center_sampling_radius=1.5` (the improved FCOS's rule) and draw the panels again: which
#   foreground locations disappear?
# - Match one 100 x 100 box (`torch.tensor([[10.0, 10.0, 110.0, 110.0, 0.0]])`): on which levels does it get
#   locations, and why on more than one?

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
show_part("fcos_deltas")

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
# ### Try this
#
# - Decode `fcos_deltas` with stride 16 instead of 8: how far off are the boxes, and why does the error grow
#   with the box?
# - Move the first location onto its box's left side (`location_example[0, 0] = 10.0`): what is `l`, and
#   why does the matching never give such a location a box?

# %% [markdown]
# ## Centerness
#
# Locations near a box's border see mostly other things and predict poor boxes. FCOS (Sec. 3.3, eq. 3)
# adds a third output trained towards `sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))`: 1 at the box
# centre, falling to 0 at its edges. At test time it is combined with the class score (here as the
# square root of their product), which pushes off-centre boxes down the ranking so that NMS keeps the
# good ones.

# %%
show_part("centerness")

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
# matched above, so in quick mode the p5 panel stays clear (no 128-pixel image has a distance above 128).

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
# ### Try this
#
# - Work out the target one pixel inside a box's left side, halfway down, for a 64-pixel square, then check
#   it with `fcos_make_centerness_targets`.
# - Without the square root the targets would be the product itself: which locations would that push down?

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
show_part("iou")

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
show_part("nms")

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
# ### Try this
#
# - Run `nms` on `random_boxes` at IoU thresholds 0.0 and 1.0; predict how many boxes each keeps.
# - Time your `nms` against torchvision's on the 5000 boxes (`%timeit nms(random_boxes, random_scores, 0.5)`).

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
# The checks below, and the overfitting run after them, use **the course's FCOS**: `course_fcos(...)` builds
# FCOS from the parts written above (the plain head, matching anywhere inside a box, the L1 box loss),
# without the improvements that FCOS's authors published after the paper. "What came after the paper" then
# turns those on, as `FCOS(...)` has them by default, and that FCOS is the one trained on the whole set.

# %%
show_part("fcos_losses")

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
# ### Try this
#
# - Compare `sigmoid_focal_loss` of an easy background location (logit -4.6, probability 0.01, target 0)
#   with `gamma=2.0` and with `gamma=0.0`: by how much does the focal term shrink it?
# - Give the untrained detector images with one object each: which loss changes most, and why?

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
# Catches a loss that cannot fall: targets paired with another image's locations, a sign flipped in the
# deltas, a loss divided by the wrong count. Divided by the foreground count, the first class loss is that of
# one foreground location at probability 0.01: 0.25 * 0.99**2 * ln(100) = 1.128 (the background adds under
# 0.001). A sign flip makes centerness targets above 1, whose cross-entropy sinks below 0 without end. (A
# consistent mix-up such as transposed locations is learned by heart on four images; the locations' check
# catches that one.) Quick mode's curve is noisy with batches of four.
assert abs(overfit_history["loss_cls"][0] - 1.128) < 0.1, f"first class loss {overfit_history['loss_cls'][0]:.3f}"
assert min(min(values) for values in overfit_history.values()) >= 0, "a loss term below 0"
assert loss_fell(overfit_history, factor=0.5 if QUICK else 0.8)
class_loss = torch.tensor(overfit_history["loss_cls"])
window = max(5, len(class_loss) // 5)
assert class_loss[-window:].mean() < (0.25 if QUICK else 0.8) * class_loss[:window].mean(), "the class loss stalls"
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
# ### Try this
#
# - Overfit for a third of the iterations (`OVERFIT_ITERS // 3`): does the mAP check still pass?
# - Overfit on two images instead of four: is it easier or harder, and why?

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
# the objects under 16 pixels (`docs/accuracy.md`, recall by size). Two more changes of this project's own
# go after those small objects:
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
# seeds, next to torchvision's FCOS; `docs/accuracy.md` has the table. Below, center sampling and the
# object balance on the batch of the matching section. From here on the detector is `FCOS(...)` with all of
# them, the one that `detect.py train` builds: still the parts you wrote, with the options above turned on.

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

# %% [markdown]
# ### Try this
#
# - Turn one improvement off at a time (for example `FCOS(..., object_balance=0.0)`) in the training cell
#   below and compare the held-out mAP. One run each: how large must a gap be before you believe it?

# %% [markdown]
# ## Train FCOS
#
# The detector: `FCOS(...)`, with the improvements of the previous section. (From random weights, as in
# quick mode, the course's FCOS learns far more slowly: "The course's FCOS against the improved one" below
# trains it on the same schedule.) The schedule: a short linear warm-up, then the learning rate divided by 10
# at 60% and 90% of the run; SGD with momentum in the full recipe, AdamW in quick mode. `train_detector`
# saves the whole training state every `LOG_PERIOD` iterations; if Colab disconnects, run the notebook
# again and training resumes where it stopped, ending exactly as an uninterrupted run would. The
# configuration stored with the checkpoint lets `detect.py` reload it.
#
# Before it trains, the cell measures the untrained detector's held-out mAP@0.5 (defined in "The task"):
# the figure that training has to beat. Random weights score boxes at random, so it is close to 0.

# %%
FCOS_DIR = run_dir("fcos")
FCOS_CHECKPOINT = FCOS_DIR / "checkpoint.pt"
a4_helper.reset_seed(0)
fcos = FCOS(NUM_CLASSES, FPN_CHANNELS, [FPN_CHANNELS, FPN_CHANNELS], pretrained=PRETRAINED)
untrained_voc = a4_helper.evaluate_detector(fcos, val_loader, device=DEVICE)
print(f"untrained FCOS: held-out mAP@0.5 {untrained_voc['map']:.4f}")
fcos_history = a4_helper.train_detector(
    fcos,
    make_train_loader(),
    learning_rate=LEARNING_RATE,
    max_iters=TRAIN_ITERS,
    log_period=LOG_PERIOD,
    device=DEVICE,
    optimizer=OPTIMIZER,
    checkpoint_path=FCOS_CHECKPOINT,
    metadata={"config": run_config("fcos", variant="improved").to_dict()},
)
# Catches a run that diverges (NaN) or stops early, e.g. a loader that runs dry after one epoch.
assert len(fcos_history["total"]) == TRAIN_ITERS
assert all(torch.isfinite(torch.tensor(values)).all() for values in fcos_history.values())
assert loss_fell(fcos_history, factor=1.0 if QUICK else 0.8)
show(a4_helper.plot_loss_history(fcos_history, path=FCOS_DIR / "losses.png"))

# %% [markdown]
# *Look for:* the total falling fast over the first hundred iterations, then slowly. Spikes in the first
# tenth of the run come while the warm-up raises the learning rate: large steps on a random network
# overshoot, and the loss recovers within a few iterations (the warm-up is there to keep them small).

# %% [markdown]
# ### Try this
#
# - In quick mode, double `TRAIN_ITERS` and train again: predict the held-out mAP first.
# - Train with `OPTIMIZER = "sgd"` in quick mode: why does a randomly initialised backbone barely move?

# %% [markdown]
# ## Predictions on held-out images
#
# Images the detector has never seen, drawn like the overfitting pictures: ground truth solid, detections
# dashed, those with a score above `PICTURE_SCORE`, at most six per image (the best ones; each panel's title
# counts the rest). `FCOS.predict` makes them: per level, the locations whose class score passes the
# threshold (`fcos_level_candidates`), their boxes decoded from the distances, then per-class NMS.
#
# *Look for:* most labelled objects have a dashed box of their class close around them; misses are mostly
# the smallest objects and those half hidden behind others; a common mistake is a box in the right place with
# the wrong class, which per-class NMS cannot remove (it only compares boxes of one class).

# %%
show_part("fcos_inference")

# %%
show_predictions(fcos, val_set, range(8), PICTURE_SCORE, title="FCOS: held-out images")

# %%
# The part's public tests, as the grader runs them: points, and what each failed test expected.
check("fcos_inference")

# %% [markdown]
# ### Try this
#
# - Lower `PICTURE_SCORE` to 0.1 and draw the held-out images again: what kind of detections appear?

# %% [markdown]
# ## Mean average precision
#
# AP and mAP as "The task" defined them, on every held-out image: per class, detections sorted by score, a
# true positive at IoU >= 0.5 with an unclaimed object of the class, the area under the precision-recall
# curve made non-increasing (the all-point area that VOC uses since 2010; the 2007 paper's 11-point one is
# `method="voc07"`). COCO's mAP@[.5:.95] is printed beside it. A low score threshold (0.05) is used on
# purpose: the low-confidence tail adds recall, which AP rewards, and can only add points at the end of the
# ranking. In quick mode the held-out mAP@0.5 must reach 0.3 (the untrained detector's figure, printed in
# "Train FCOS", is the one to compare with).

# %%
fcos_voc = a4_helper.evaluate_detector(fcos, val_loader, score_thresh=0.05, nms_thresh=0.5, device=DEVICE)
fcos_coco = a4_helper.evaluate_detector(
    fcos, val_loader, score_thresh=0.05, nms_thresh=0.5, device=DEVICE, method="coco"
)
assert all(0 <= value <= 1 for value in (fcos_voc["map"], fcos_coco["map"], fcos_coco["map_50"], fcos_coco["map_75"]))
assert fcos_voc["num_images"] == len(val_set)
# Quick mode's run must lift held-out mAP@0.5 from about 0 (the untrained figure) to 0.3.
assert not QUICK or fcos_voc["map"] >= 0.3, f"held-out mAP@0.5 {fcos_voc['map']:.3f} after quick training"

print(f"FCOS on {fcos_voc['num_images']} held-out images ({fcos_voc['images_per_second']:.1f} images/s)")
print(f"  untrained mAP@0.5: {untrained_voc['map']:.4f}")
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
#
# *Look for:* the classes whose curve stays high far to the right (found early and completely) against
# those whose curve drops early: their first detections are already false positives.

# %%
fcos_export = export_and_curves(fcos, FCOS_DIR / "map_input", "FCOS: precision-recall per class (IoU 0.5)")
# Catches exported files that skip images without detections, or boxes written in another order.
assert abs(fcos_export["map"] - fcos_voc["map"]) < 1e-9, "exported predictions give the same mAP"
# That mAP comes from the predictions in memory; the files are read back as a mAP tool reads them. The ground
# truth of the first held-out images must come back box for box, (x1, y1, x2, y2) to the written 0.01 pixel.
held_out_ids, _, held_out_gt, *_ = next(iter(val_loader))
for image_id, rows in zip(held_out_ids, held_out_gt):
    lines = (FCOS_DIR / "map_input" / "ground-truth" / f"{Path(image_id).stem}.txt").read_text().splitlines()
    written = torch.tensor([[float(v) for v in line.split()[1:5]] for line in lines]).view(-1, 4)
    torch.testing.assert_close(written, rows[rows[:, 4] >= 0, :4], atol=0.005, rtol=0)

# %% [markdown]
# ### Try this
#
# - Evaluate with `method="voc07"` (the 11-point AP of the 2007 paper) and compare with the all-point AP.
# - Evaluate with `score_thresh=0.5` instead of 0.05: why does the mAP fall, although the boxes are the same?

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
in_memory, reloaded = fcos.state_dict(), reloaded_fcos.state_dict()
assert in_memory.keys() == reloaded.keys(), "the same model, parameter for parameter"
assert all(torch.equal(in_memory[name].cpu(), reloaded[name]) for name in in_memory), "the same weights and buffers"
assert abs(reloaded_voc["map"] - fcos_voc["map"]) < tolerance, (reloaded_voc["map"], fcos_voc["map"])
print(f"reloaded from {FCOS_CHECKPOINT}: mAP@0.5 {reloaded_voc['map']:.4f} (in memory: {fcos_voc['map']:.4f})")
print(f"from a shell: python detect.py eval --checkpoint {FCOS_CHECKPOINT}")

# %% [markdown]
# ### Try this
#
# - List what the checkpoint keeps besides the weights (`a4_helper.read_checkpoint(FCOS_CHECKPOINT).keys()`): which of
#   those does an exact resume need, and why?
# - Run the training cell again: it finds the finished checkpoint and returns at once. What would it do with
#   a larger `TRAIN_ITERS`?

# %% [markdown]
# ## The course's FCOS against the improved one
#
# The course's FCOS (`course_fcos`: the plain head, matching anywhere inside a box, the L1 box loss, no
# object balance), trained on exactly the same schedule and batches as the one above. This is one run of
# each, with one seed: a gap of a few points can be noise (`docs/accuracy.md` gives the mean and spread of
# three seeds for each change). A large gap is not: from random weights, without GroupNorm in the head, the
# course's FCOS learns far more slowly.

# %%
a4_helper.reset_seed(0)
course = course_fcos(NUM_CLASSES, FPN_CHANNELS, [FPN_CHANNELS, FPN_CHANNELS], pretrained=PRETRAINED)
course_history = a4_helper.train_detector(
    course,
    make_train_loader(),
    learning_rate=LEARNING_RATE,
    max_iters=TRAIN_ITERS,
    log_period=LOG_PERIOD,
    device=DEVICE,
    optimizer=OPTIMIZER,
    checkpoint_path=run_dir("fcos_course") / "checkpoint.pt",
    metadata={"config": run_config("fcos").to_dict()},
)
assert loss_fell(course_history, factor=1.0 if QUICK else 0.8)
course_voc = a4_helper.evaluate_detector(course, val_loader, device=DEVICE)
assert 0 <= course_voc["map"] <= 1
print(f"held-out mAP@0.5 after {TRAIN_ITERS} iterations, one run each (fraction, 0 to 1):")
for name, voc in (("untrained", untrained_voc), ("course's FCOS", course_voc), ("improved FCOS", fcos_voc)):
    print(f"{name:>15}  {voc['map']:.4f}")

# %% [markdown]
# ### Try this
#
# - Train the course's FCOS with the improved head only (`improved_fcos_head`, see "Where to go from here")
#   and see how much of the gap that closes.

# %% [markdown]
# ## Try it on your own photo
#
# The detector has only seen square crops of `IMAGE_SIZE` pixels. `photos.predict_photos` runs it on a whole
# photo of any shape, as `detect.py predict` does: the photo is scaled so that its short side is `IMAGE_SIZE`
# (and its long side at most twice that), padded to a multiple of 32, and the boxes come back in the photo's
# own pixels. Set `PHOTO` to the path of a photo, or on Colab set `UPLOAD = True` to pick one from your
# computer. A detector trained on the synthetic shapes finds shapes, not cats: train on VOC for that. With
# no photo given, the cell draws a new synthetic scene of photo shape (`detection_data.synthetic_photo`, three
# times `IMAGE_SIZE` wide and twice as high, never seen in training), so that its ground truth can be drawn
# on the left beside the detections on the right (the best eight with a score above `PICTURE_SCORE`).
#
# *Look for:* the large and medium objects found with their right class; the smallest ones, which the
# scaling makes smaller still, are the ones most often missed.

# %%
PHOTO = None  # e.g. "my_photo.jpg"
UPLOAD = False  # on Colab: True opens a file picker
show(RUN.try_on_photo(fcos, PHOTO, upload=UPLOAD))

# %% [markdown]
# ### Try this
#
# - Try `PHOTO = ...` on a photo of your own: what does a detector of coloured shapes find in it?
# - Draw another synthetic photo: `notebook_kit.PHOTO_SEED = 1` and run the cell again.

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
# - Results published by students of the original course (not measured by this project) put a correct FCOS
#   at roughly 0.42-0.45 mAP@0.5 on VOC 2007 with the full recipe, and code with the assignment's transposed
#   locations at roughly 0.23-0.28.

# %%
if QUICK and not os.environ.get("DETECT_RUN_DIR"):
    import shutil

    shutil.rmtree(RUN_DIR)  # quick-mode checkpoints and exports only served the checks above
    print(f"removed {RUN_DIR}")

"""The course's helper module, kept as its facade: every name the course, the notebooks and the
command line use from ``a4_helper`` is re-exported here from the module that holds it, so that
``import a4_helper`` keeps working as the course's code expects. No code lives here but
``hello_helper``; look in:

- ``detection_data.py``: image helpers, ``VOC2007DetectionTiny``, ``SyntheticDetection``, ``synthetic_photo``,
  the uint8 cache;
- ``augmentation.py``: ``BatchAugmentation``, the training augmentation (flip, scale jitter, colours);
- ``drawing.py``: ``detection_visualizer``, ``plot_loss_history``, the opening's figures (``draw_detector_outputs``,
  ``draw_iou_example``, ``draw_average_precision_example``); ``architecture_figure.py``: ``draw_architecture``;
- ``training.py``: ``train_detector``, checkpoints, ``reset_seed``;
- ``evaluation.py``: ``compute_map``, ``evaluate_detector``, ``inference_with_detector``, ``proposal_recall``.
"""

from architecture_figure import draw_architecture
from augmentation import BatchAugmentation
from detection_data import (
    CROWDED_SCENE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MAX_GT_BOXES,
    SYNTHETIC_CLASSES,
    VOC_CLASSES,
    VOC_LIKE_SCENE,
    VOC_SPLITS,
    PreprocessedCache,
    SceneOptions,
    SyntheticDetection,
    VOC2007DetectionTiny,
    denormalize_image,
    load_image,
    normalize_image,
    prepare_images,
    save_image,
    synthetic_photo,
)
from drawing import (
    detection_visualizer,
    draw_average_precision_example,
    draw_detector_outputs,
    draw_iou_example,
    plot_loss_history,
)
from evaluation import (
    compute_map,
    evaluate_detector,
    gt_boxes_to_targets,
    inference_with_detector,
    plot_precision_recall,
    plot_proposal_recall,
    proposal_recall,
    rel_error,
)
from training import GRAD_CLIP, NonFiniteLossError, compile_detector, read_checkpoint, reset_seed, train_detector

__all__ = [
    "BatchAugmentation",
    "CROWDED_SCENE",
    "GRAD_CLIP",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MAX_GT_BOXES",
    "SYNTHETIC_CLASSES",
    "VOC_LIKE_SCENE",
    "VOC_CLASSES",
    "VOC_SPLITS",
    "NonFiniteLossError",
    "PreprocessedCache",
    "SceneOptions",
    "SyntheticDetection",
    "VOC2007DetectionTiny",
    "compile_detector",
    "compute_map",
    "denormalize_image",
    "detection_visualizer",
    "draw_architecture",
    "draw_average_precision_example",
    "draw_detector_outputs",
    "draw_iou_example",
    "evaluate_detector",
    "gt_boxes_to_targets",
    "hello_helper",
    "inference_with_detector",
    "load_image",
    "normalize_image",
    "plot_loss_history",
    "plot_precision_recall",
    "plot_proposal_recall",
    "prepare_images",
    "proposal_recall",
    "read_checkpoint",
    "rel_error",
    "reset_seed",
    "save_image",
    "synthetic_photo",
    "train_detector",
]


def hello_helper():
    print("Hello from a4_helper.py!")

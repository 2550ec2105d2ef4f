"""RunConfig, the one configuration of a run: recipes, stored dicts (also old ones), and the detector built from it."""

import dataclasses
import json
import os
import re

import pytest

import experiment
from experiment import RECIPES, RunConfig, build_detector, make_augmentation
from two_stage_detector import RPN, FCOSProposalNetwork

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = {0: "cat", 1: "dog"}


@pytest.mark.parametrize("model", ["fcos", "faster_rcnn"])
def test_a_stored_config_reads_back_as_the_same_config(model):
    config = dataclasses.replace(RECIPES["synthetic"], model=model, num_classes=2, idx_to_class=CLASSES)
    stored = config.to_dict()
    assert RunConfig.from_dict(stored) == config.resolved()
    # JSON (metrics.json) turns the class indices into strings; they come back as integers.
    assert RunConfig.from_dict(json.loads(json.dumps(stored))).idx_to_class == CLASSES
    assert ("first_stage" in stored) == (model == "faster_rcnn") and "init_from" not in stored
    # FCOS's options are stored as built, so that a checkpoint keeps its meaning when the defaults change.
    assert (stored.get("fine_p3"), stored.get("object_balance")) == ((True, 0.5) if model == "fcos" else (True, None))


def test_faster_rcnn_feeds_c2_into_p3_when_improved_and_did_not_before():
    for variant, fine_p3 in (("improved", True), ("course", False)):
        config = RunConfig(model="faster_rcnn", variant=variant, fpn_channels=16, num_classes=2)
        assert config.resolved().fine_p3 is fine_p3 and build_detector(config).backbone.fine_p3 is fine_p3
    # Stored before it was a default, an improved Faster R-CNN had none; stored with it, it keeps it.
    old = {"model": "faster_rcnn", "variant": "improved", "first_stage": "fcos", "fpn_channels": 16, "num_classes": 2}
    detector = build_detector(RunConfig.from_dict(old))
    assert not detector.backbone.fine_p3 and "backbone.fpn_params.c2_to_p3.weight" not in detector.state_dict()
    assert build_detector(RunConfig.from_dict({**old, "fine_p3": True})).backbone.fine_p3
    assert not RunConfig(model="faster_rcnn", fine_p3=False).resolved().fine_p3  # an explicit choice stays


def test_old_configs_mean_what_they_meant_when_they_were_written():
    # Before the variant existed, detectors were the course's; before FCOS proposals, Faster R-CNN had the RPN.
    old = {"model": "faster_rcnn", "data": "synthetic", "image_size": 64, "fpn_channels": 16, "num_classes": 2}
    config = RunConfig.from_dict({**old, "idx_to_class": {"0": "cat", "1": "dog"}, "unknown_key": 1})
    assert config.variant == "course" and config.first_stage == "rpn" and config.idx_to_class == CLASSES
    assert isinstance(build_detector(config).rpn, RPN)


def test_an_fcos_stored_before_fine_p3_and_object_balance_is_rebuilt_without_them():
    old = {"model": "fcos", "variant": "improved", "fpn_channels": 16, "num_classes": 2}
    config = RunConfig.from_dict(old)
    assert (config.fine_p3, config.object_balance) == (False, 0.0)
    detector = build_detector(config)
    assert not detector.backbone.fine_p3 and detector.object_balance == 0.0
    assert "backbone.fpn_params.c2_to_p3.weight" not in detector.state_dict()  # its state dict loads
    course = RunConfig(variant="course").resolved()
    assert (course.fine_p3, course.object_balance) == (False, 0.0)


def test_p2_builds_fcos_with_a_stride_4_level_and_old_configs_have_none():
    config = RunConfig(model="fcos", fpn_channels=16, num_classes=2, p2=True)
    assert list(build_detector(config).backbone.fpn_strides) == ["p2", "p3", "p4", "p5"]
    assert RunConfig.from_dict(config.to_dict()).p2
    assert not RunConfig.from_dict({"model": "fcos", "fpn_channels": 16, "num_classes": 2}).p2  # written before p2
    with pytest.raises(ValueError, match="FCOS only"):
        build_detector(dataclasses.replace(config, model="faster_rcnn"))


def test_the_improved_faster_rcnn_proposes_with_fcos_unless_told_otherwise():
    config = RunConfig(model="faster_rcnn", fpn_channels=16, num_classes=2)
    assert config.resolved_first_stage == "fcos" and isinstance(build_detector(config).rpn, FCOSProposalNetwork)
    course = dataclasses.replace(config, variant="course")
    assert course.resolved_first_stage == "rpn" and isinstance(build_detector(course).rpn, RPN)
    assert RunConfig(model="fcos").resolved_first_stage is None


def test_recipes_are_the_documented_ones():
    synthetic, voc = RECIPES["synthetic"], RECIPES["voc2007"]
    assert (synthetic.image_size, synthetic.batch_size, synthetic.iters, synthetic.optimizer) == (128, 8, 700, "adamw")
    assert (voc.image_size, voc.batch_size, voc.fpn_channels, voc.iters, voc.optimizer) == (224, 16, 128, 9000, "sgd")
    assert experiment.CACHED_BY_DEFAULT == {"voc2007"}


def test_the_readmes_python_example_runs_and_does_what_it_says(capsys):
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme.split("## Using it from Python", 1)[1]
    example = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace = {}
    exec(compile(example, "README.md (Using it from Python)", "exec"), namespace)
    assert namespace["images"].shape == (4, 3, 128, 128)
    assert len(namespace["predictions"]) == 4 and set(namespace["predictions"][0]) == {"boxes", "labels", "scores"}
    assert 0 <= namespace["result"]["map"] <= 1 and len(namespace["history"]["total"]) == 30
    assert "mAP@0.5" in capsys.readouterr().out


def test_the_voc_recipe_augments_and_the_quick_start_does_not():
    # docs/data.md, Augmentation: the measurement behind both defaults.
    assert RECIPES["voc2007"].augment and not RECIPES["synthetic"].augment
    assert make_augmentation(RECIPES["synthetic"]) is None
    assert make_augmentation(RECIPES["voc2007"], seed=1).generator.initial_seed() == 1


def test_a_stored_configuration_that_turns_on_a_retired_option_is_refused():
    stored = {"model": "fcos", "variant": "improved", "fine_p3": True, "object_balance": 0.5}
    for name, value in (("exp_deltas", True), ("quality_focal", True), ("matching", "atss")):
        with pytest.raises(ValueError, match=f"{name}={value!r}, an FCOS option retired after commit 3e0958e"):
            RunConfig.from_dict({**stored, name: value})
    # Written "off", they mean what the library does today, and load.
    off = {"exp_deltas": False, "quality_focal": False, "centerness_weighted_box_loss": False, "matching": "fcos"}
    assert RunConfig.from_dict({**stored, **off}) == RunConfig.from_dict(stored)


def test_each_variant_builds_its_fcos_preset():
    for variant, expected_loss in (("improved", "fcos_giou_loss"), ("course", "fcos_l1_loss")):
        config = RunConfig(model="fcos", variant=variant, fpn_channels=16, num_classes=3)
        detector = build_detector(config)
        assert detector.box_loss.__name__ == expected_loss
        assert detector.backbone.fine_p3 == config.resolved().fine_p3 == (variant == "improved")
    p2 = build_detector(RunConfig(model="fcos", p2=True, fpn_channels=16, num_classes=3))
    assert p2.backbone.levels == ("p2", "p3", "p4", "p5") and p2.pred_net.scales.shape == (4,)

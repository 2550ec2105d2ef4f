"""The accuracy benchmark compares like with like: the same backbone for every detector of a seed,
and torchvision's detectors driven through our calling convention with our class numbering."""

import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import bench_accuracy_vs_torchvision as bench  # noqa: E402

from detection_data import VOC_LIKE_SCENE, SyntheticDetection  # noqa: E402

# 32 channels: torchvision's FCOS head has GroupNorm with 32 groups.
SMALL = bench.Settings(image_size=64, train_images=4, eval_images=2, fpn_channels=32, stem=(32, 32))


def test_every_variant_of_a_seed_starts_from_the_same_backbone():
    variants = {
        "fcos": ["torchvision", "default", "course", "tv-rules", "previous", "default +p2", "torchvision +p2"],
        "faster_rcnn": ["torchvision", "default", "course +He init"],
    }
    bench.check_same_start(variants, SMALL)  # raises if any backbone differs
    torch.manual_seed(1)
    other_seed = bench.backbone_of(bench.build("fcos", "default", SMALL)).state_dict()
    torch.manual_seed(0)
    seed_0 = bench.backbone_of(bench.build("fcos", "default", SMALL)).state_dict()
    assert any(not torch.equal(seed_0[name], other_seed[name]) for name in seed_0)


def test_torchvision_adapter_trains_and_predicts_with_our_labels():
    items = bench.data(SMALL, "train")[:2]
    images = torch.stack([item[1] for item in items])
    gt_boxes = torch.stack([item[2] for item in items])
    for detector, loss_names in (
        ("fcos", {"classification", "bbox_regression", "bbox_ctrness"}),
        ("faster_rcnn", {"loss_classifier", "loss_box_reg", "loss_objectness"}),
    ):
        torch.manual_seed(0)
        model = bench.build(detector, "torchvision", SMALL).train()
        losses = model(images, gt_boxes)
        assert loss_names <= set(losses) and all(torch.isfinite(value) for value in losses.values())
        model.eval()
        predictions = model.predict(images, score_thresh=0.0, nms_thresh=0.5)
        assert len(predictions) == 2
        for prediction in predictions:
            labels = prediction["labels"]
            # Faster R-CNN's background is torchvision's class 0: our classes come back as 0..K-1.
            assert len(labels) > 0 and labels.min() >= 0 and labels.max() < bench.NUM_CLASSES


def test_augmentation_benchmark_variants_and_table():
    import bench_augmentation

    from augmentation import BatchAugmentation

    for settings in bench_augmentation.VARIANTS.values():  # each a valid BatchAugmentation, or none
        assert settings is None or isinstance(BatchAugmentation(**settings), BatchAugmentation)
    lines = bench_augmentation.table({"none": [0.5, 0.7], "flip": [0.6]}).splitlines()
    # none: mean 0.6, sample standard deviation sqrt(((0.5-0.6)^2 + (0.7-0.6)^2) / 1) = 0.1414
    assert lines[1].split() == ["none", "0.600", "0.141", "0.500", "0.700"]
    assert lines[2].split() == ["flip", "0.600", "0.000", "0.600"]


def test_fcos_variants_built_from_parts_are_the_library_presets():
    """The benchmark's ``default`` and ``course`` rows measure what the library builds (same parts,
    same initial weights from the same seed), and ``default +p2`` what ``improved_fcos`` builds with p2."""
    from common import P2_LEVELS
    from one_stage_detector import course_fcos, improved_fcos

    C, stem = SMALL.fpn_channels, list(SMALL.stem)
    for variant, preset in (
        ("default", lambda: improved_fcos(bench.NUM_CLASSES, C, stem, pretrained=False)),
        ("course", lambda: course_fcos(bench.NUM_CLASSES, C, stem, pretrained=False)),
        ("default +p2", lambda: improved_fcos(bench.NUM_CLASSES, C, stem, pretrained=False, fpn_levels=P2_LEVELS)),
    ):
        torch.manual_seed(0)
        ours = bench.build("fcos", variant, SMALL)
        torch.manual_seed(0)
        library = preset()
        assert (ours.matcher, ours.box_loss, ours.object_balance) == (
            library.matcher,
            library.box_loss,
            library.object_balance,
        )
        state, expected = ours.state_dict(), library.state_dict()
        assert state.keys() == expected.keys(), variant
        assert all(torch.equal(state[name], expected[name]) for name in state), variant


def test_quick_mode_benchmark_prints_held_out_map_before_and_after(capsys):
    import bench_notebook_quick_mode

    tiny = ["--image-size", "64", "--num-train", "8", "--num-val", "4", "--train-iters", "2", "--seeds", "0", "1"]
    bench_notebook_quick_mode.main(["--model", "fcos", *tiny])
    printed = capsys.readouterr().out
    assert printed.count("held-out mAP@0.5") == 2 and "spread (max - min)" in printed


def test_notebook_benchmark_times_every_cell_and_compares_with_the_budget(tmp_path, capsys, monkeypatch):
    import bench_notebooks
    import nbformat

    for name in ("DETECT_QUICK", "MPLBACKEND", "DETECT_RUN_DIR", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)  # restored after the test; the benchmark sets them
    notebook = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell("import time"), nbformat.v4.new_code_cell("time.sleep(1.0)  # slow")]
    )
    path = tmp_path / "tiny.ipynb"
    nbformat.write(notebook, path)
    bench_notebooks.main(
        ["--notebooks", str(path), "--threads", "1", "--budget", "0.5", "--save-to", str(tmp_path / "ran")]
    )
    lines = capsys.readouterr().out.splitlines()
    name, wall, in_cells, budget, verdict = lines[1].split()[:5]
    assert name == "tiny.ipynb" and float(budget) == 0.5 and verdict == "OVER"
    assert float(wall) >= float(in_cells) >= 1.0
    slowest = lines[lines.index("slowest code cells of tiny.ipynb:") + 1]
    assert slowest.split()[2:4] == ["cell", "1"] and float(slowest.split()[0]) >= 1.0
    assert nbformat.read(tmp_path / "ran" / "tiny.ipynb", as_version=4).cells[1].metadata["execution"]


def test_the_voc_like_scene_trains_on_its_own_data_and_sizes_its_recall_by_its_own_edges():
    settings = dataclasses.replace(SMALL, scene="voc-like")
    items = bench.data(settings, "train")
    expected = SyntheticDetection(
        "train", SMALL.train_images, SMALL.image_size, seed=SMALL.data_seed, scene=VOC_LIKE_SCENE
    )
    assert all(torch.equal(item[2], expected[i][2]) for i, item in enumerate(items))
    assert bench.SCENES["voc-like"]["iters"] > bench.SCENES["crowded"]["iters"]
    # One 40-px object, found: large among the crowded scene's sizes, medium among the VOC-shaped scene's.
    truth = [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 50.0]]), "labels": torch.tensor([2])}]
    found = [
        {"boxes": torch.tensor([[11.0, 10.0, 50.0, 50.0]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([2])}
    ]
    crowded = bench.where_it_fails(found, truth, bench.SCENES["crowded"]["size_edges"])
    voc_like = bench.where_it_fails(found, truth, bench.SCENES["voc-like"]["size_edges"])
    assert (crowded["recall_large"], crowded["recall_medium"]) == (1.0, 0.0)
    assert (voc_like["recall_large"], voc_like["recall_medium"]) == (0.0, 1.0)


def test_speed_benchmark_builds_both_libraries_detectors_and_profiles_ours_above_the_floor():
    import bench_vs_torchvision as speed

    names = [speed.FLOOR, "FCOS ours", "FCOS torchvision", "Faster R-CNN ours", "Faster R-CNN torchvision"]
    runners = speed.make_runners(names, batch_size=2, device=torch.device("cpu"))
    train, infer, first = speed.time_interleaved(runners, steps=1, warmup=1, device=torch.device("cpu"))
    assert set(train) == set(infer) == set(first) == set(names)
    assert all(seconds > 0 for times in (train, infer) for seconds in times.values())
    assert all(train_s > 0 and infer_s > 0 for train_s, infer_s in first.values())
    above = speed.profile_above_floor(runners, steps=1, top=1000)
    assert set(above) == {"FCOS ours", "Faster R-CNN ours"}
    for ops in above.values():
        extra = [seconds for _, seconds in ops]
        assert extra == sorted(extra, reverse=True)
    # Operators that only the detectors run show up above the floor with all of their time:
    assert dict(above["FCOS ours"])["aten::native_group_norm"] > 0  # the FCOS head's GroupNorm
    assert dict(above["Faster R-CNN ours"])["aten::_embedding_bag"] > 0  # RoI Align's weighted gather

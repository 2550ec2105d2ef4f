"""Training on several processes (distributed.py, DDP in a4_helper.train_detector and detect.py), on the CPU.

Two processes talk through the gloo backend. Starting processes is what costs time here (each one
imports torch and torchvision), so the ``two_ranks`` fixture starts them once: ``torchrun`` runs this
file as a script, each rank runs every job of ``_JOBS`` and then the command line's first training
run (``detect.main``, as ``detect.py`` would), and saves what it saw; the tests check those results.
The command-line test then reruns that training command with ``torchrun detect.py``.
"""

import copy
import json
import math
import os
import subprocess
import sys
import types

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.testing import assert_close

import a4_helper
import detect
import distributed
from a4_helper import SyntheticDetection, reset_seed, train_detector
from common import DetectorBackboneWithFPN
from one_stage_detector import FCOS, fcos_object_balance_weights
from two_stage_detector import RPN, FasterRCNN, FCOSProposalNetwork

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = len(a4_helper.SYNTHETIC_CLASSES)
WORLD_SIZE = 2
GLOBAL_BATCH = 4
_TRAIN_SET = SyntheticDetection("train", num_images=6, image_size=64, seed=1)  # one global batch per epoch
_FCOS_SETTINGS = {"learning_rate": 0.02, "max_iters": 2, "warmup_iters": 0, "progress": False}

# The tests that read the two_ranks runs stay on one pytest -n worker, so that the runs happen once.
ON_TWO_RANKS = pytest.mark.xdist_group("two_ranks")


def _tiny_fcos(dtype: torch.dtype = torch.float32) -> FCOS:
    torch.manual_seed(0)
    return FCOS(NUM_CLASSES, 16, [16, 16], pretrained=False).to(dtype)


def _tiny_faster_rcnn(first_stage: str) -> FasterRCNN:
    torch.manual_seed(0)
    backbone = DetectorBackboneWithFPN(16, pretrained=False)
    if first_stage == "fcos":
        rpn = FCOSProposalNetwork(16, [16], pre_nms_topk=100, post_nms_topk=30)
    else:
        rpn = RPN(16, [16], batch_size_per_image=16, anchor_stride_scale=4, pre_nms_topk=100, post_nms_topk=30)
    return FasterRCNN(backbone, rpn, NUM_CLASSES, stem_channels=[16], batch_size_per_image=16)


def _collate_float64(items):
    image_ids, images, gt_boxes = torch.utils.data.default_collate(items)
    return image_ids, images.double(), gt_boxes.double()


def _share_loader(num_replicas: int, rank: int, float64: bool = False) -> torch.utils.data.DataLoader:
    """Rank ``rank``'s share of shuffled global batches of ``GLOBAL_BATCH`` images (as detect.py's loader)."""
    sampler = torch.utils.data.DistributedSampler(
        _TRAIN_SET, num_replicas=num_replicas, rank=rank, shuffle=True, seed=7, drop_last=True
    )
    return torch.utils.data.DataLoader(
        _TRAIN_SET,
        batch_size=GLOBAL_BATCH // num_replicas,
        sampler=sampler,
        collate_fn=_collate_float64 if float64 else None,
    )


# ---------------------------------------------------------------------------------------------
# The jobs that each of the two ranks runs (see the module docstring); each returns what the tests check
# ---------------------------------------------------------------------------------------------


def _batchnorm_job(rank, out_dir):
    """Each rank normalises its half of one batch with SyncBatchNorm2d, twice (for the running stats)."""
    torch.manual_seed(0)  # the same batches, layer and loss weights on both ranks
    layer = nn.BatchNorm2d(3, momentum=0.3)
    nn.init.uniform_(layer.weight, 0.5, 1.5)
    nn.init.uniform_(layer.bias, -0.5, 0.5)
    sync = distributed.convert_sync_batchnorm(copy.deepcopy(layer))
    batches = [torch.randn(8, 3, 5, 4) * 3 + 1, torch.randn(8, 3, 5, 4) - 2]
    loss_weights = torch.randn(8, 3, 5, 4)
    half = slice(4 * rank, 4 * rank + 4)
    inputs = [batch[half].clone().requires_grad_() for batch in batches]
    outputs = []
    for x in inputs:
        output = sync(x)
        (output * loss_weights[half]).sum().backward()
        outputs.append(output.detach())
    return {
        "layer": layer.state_dict(),
        "batches": batches,
        "loss_weights": loss_weights,
        "outputs": outputs,
        "input_grads": [x.grad for x in inputs],
        "weight_grad": sync.weight.grad,
        "bias_grad": sync.bias.grad,
        "state": sync.state_dict(),
    }


def _fcos_job(rank, out_dir):
    """FCOS in float64 (see test_two_ranks_train_fcos_like_one_process_with_the_global_batch)."""
    detector = _tiny_fcos(torch.float64)
    checkpoint = os.path.join(out_dir, "fcos.pt")
    loader = _share_loader(WORLD_SIZE, rank, float64=True)
    history = train_detector(detector, loader, checkpoint_path=checkpoint, **_FCOS_SETTINGS)
    norm_types = {type(m) for m in detector.modules() if isinstance(m, nn.BatchNorm2d)}
    return {"state": detector.state_dict(), "history": history, "norm_types": norm_types}


_FASTER_RCNN_SETTINGS = {"learning_rate": 0.01, "warmup_iters": 0, "log_period": 1, "progress": False}


def _faster_rcnn_job(rank, out_dir, first_stage, wrap):
    """Two iterations of Faster R-CNN; with ``wrap``, the job converts and wraps the detector in DDP
    itself, as a caller of train_detector may."""
    detector = _tiny_faster_rcnn(first_stage)
    reset_seed(10 + rank)  # each rank samples its own anchors and RoIs
    wrapped = DistributedDataParallel(distributed.convert_sync_batchnorm(detector)) if wrap else detector
    checkpoint = os.path.join(out_dir, f"faster_rcnn_{first_stage}.pt")
    history = train_detector(
        wrapped, _share_loader(WORLD_SIZE, rank), max_iters=2, checkpoint_path=checkpoint, **_FASTER_RCNN_SETTINGS
    )
    return {"state": detector.state_dict(), "history": history}


class _SimulatedCrash(Exception):
    pass


def _crash_in_call(count):
    calls = []

    def hook(module, inputs):
        calls.append(1)
        if len(calls) == count:
            raise _SimulatedCrash(f"simulated crash in call {count}")

    return hook


def _resume_job(rank, out_dir):
    """The run of ``_faster_rcnn_job(rank, out_dir, "rpn", wrap=False)`` again, with a crash in iteration 2 and a
    resume from the checkpoint of iteration 1, under other random streams."""
    crashed, checkpoint = _tiny_faster_rcnn("rpn"), os.path.join(out_dir, "crashed.pt")
    crashed.register_forward_pre_hook(_crash_in_call(2))
    reset_seed(10 + rank)
    with pytest.raises(_SimulatedCrash):
        train_detector(
            crashed, _share_loader(WORLD_SIZE, rank), max_iters=2, checkpoint_path=checkpoint, **_FASTER_RCNN_SETTINGS
        )
    saved = a4_helper.read_checkpoint(checkpoint)
    resumed = _tiny_faster_rcnn("rpn")
    reset_seed(123)  # the checkpoint must bring back each rank's own random streams
    history = train_detector(
        resumed, _share_loader(WORLD_SIZE, rank), max_iters=2, checkpoint_path=checkpoint, **_FASTER_RCNN_SETTINGS
    )
    return {
        "state": resumed.state_dict(),
        "history": history,
        "crashed_iteration": saved["iteration"],
        "rank_states": saved["rank_states"],
    }


def _object_balance_job(rank, out_dir):
    """The object balance when rank 1's image has no ground-truth row at all (M = 0): the weights alone,
    then an FCOS training forward (which computes them) on each rank. A rank that returned before the
    weights' all-reduce would leave the other waiting in it for ever."""
    a, b, bg = [0.0, 0, 8, 8, 0], [0.0, 0, 40, 40, 1], [-1.0] * 5
    if rank == 0:
        matched, gt = torch.tensor([[a, b, b, b, b, bg, bg]]), torch.tensor([[a, b]])
    else:
        matched, gt = torch.tensor([[bg] * 7]), torch.zeros(1, 0, 5)
    weights = fcos_object_balance_weights(matched, gt, 0.5)
    detector = _tiny_fcos()
    assert detector.object_balance > 0
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(rank))
    gt_boxes = torch.tensor([[[8.0, 8, 40, 40, 1]]]) if rank == 0 else torch.zeros(1, 0, 5)
    losses = detector(images, gt_boxes)
    return {"weights": weights, "losses": {name: value.item() for name, value in losses.items()}}


_JOBS = {
    "batchnorm": _batchnorm_job,
    "fcos": _fcos_job,
    "faster_rcnn_rpn": lambda rank, out_dir: _faster_rcnn_job(rank, out_dir, "rpn", wrap=False),
    "faster_rcnn_fcos": lambda rank, out_dir: _faster_rcnn_job(rank, out_dir, "fcos", wrap=True),
    "resume": _resume_job,
    "object_balance": _object_balance_job,
}


# The command line's training run: tiny, on the CPU; the global batch of 4 is 2 images per process.
_TRAIN_COMMAND = [
    "train",
    "--data",
    "synthetic",
    "--weights",
    "none",
    "--device",
    "cpu",
    "--iters",
    "2",
    "--log-period",
    "2",
    "--train-images",
    "8",
    "--eval-images",
    "2",
    "--image-size",
    "64",
    "--fpn-channels",
    "16",
    "--batch-size",
    "4",
]


def _torchrun(arguments, cwd) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc_per_node=2 ARGUMENTS`` (a free port, one
    thread per process); fails the test with the output's end if it fails."""
    python_path = os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])  # for this file run as a script
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": python_path}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={WORLD_SIZE}",
        *arguments,
    ]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def _run_rank(out_dir, command):
    """What each process that ``two_ranks`` starts does: every job, then ``detect.main(command)``."""
    torch.set_num_threads(1)
    with distributed.process_group_from_environment(torch.device("cpu")):
        rank = distributed.rank()
        results = {name: job(rank, out_dir) for name, job in _JOBS.items()}
        detect.main(command)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """``results``: every job's results, ``[rank 0's, rank 1's]``; ``folder``: where the jobs wrote; ``cli``:
    the output folder of the command line's first run; ``stdout``: what torchrun printed."""
    folder = tmp_path_factory.mktemp("two_ranks")
    cli = folder / "cli"
    launched = _torchrun([__file__, str(folder), *_TRAIN_COMMAND, "--out", str(cli)], cwd=folder)
    results = [torch.load(folder / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]
    return types.SimpleNamespace(results=results, folder=folder, cli=cli, stdout=launched.stdout)


def _assert_same_state(state0, state1, **tolerance):
    assert state0.keys() == state1.keys()
    for name in state0:
        assert_close(state0[name], state1[name], msg=lambda m, name=name: f"{name}: {m}", **tolerance)


def _max_difference(state0, state1, names=None) -> float:
    """The largest absolute difference between two state dicts (over ``names``, by default all entries)."""
    return max((state0[name].double() - state1[name].double()).abs().max().item() for name in names or state0)


def _parameter_names(module):
    return [name for name, _ in module.named_parameters()]


# ---------------------------------------------------------------------------------------------
# SyncBatchNorm2d
# ---------------------------------------------------------------------------------------------


def test_sync_batchnorm_on_one_process_equals_batchnorm2d():
    torch.manual_seed(0)
    layer = nn.BatchNorm2d(5, momentum=None)  # momentum None: the cumulative average of the batch statistics
    nn.init.uniform_(layer.weight, 0.5, 1.5)
    nn.init.uniform_(layer.bias, -0.5, 0.5)
    sync = distributed.convert_sync_batchnorm(copy.deepcopy(layer))
    assert type(sync) is distributed.SyncBatchNorm2d and isinstance(sync, nn.BatchNorm2d)
    for step in range(3):
        x = torch.randn(6, 5, 7, 3) * (step + 1) + step
        loss_weights = torch.randn(6, 5, 7, 3)
        x_plain, x_sync = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_plain, out_sync = layer(x_plain), sync(x_sync)
        (out_plain * loss_weights).sum().backward()
        (out_sync * loss_weights).sum().backward()
        assert_close(out_sync, out_plain, rtol=0, atol=0)
        assert_close(x_sync.grad, x_plain.grad, rtol=0, atol=0)
    assert_close(sync.weight.grad, layer.weight.grad, rtol=0, atol=0)
    assert_close(sync.bias.grad, layer.bias.grad, rtol=0, atol=0)
    _assert_same_state(sync.state_dict(), layer.state_dict(), rtol=0, atol=0)  # running stats, batches tracked
    layer.eval(), sync.eval()
    x = torch.randn(2, 5, 4, 4)
    assert_close(sync(x), layer(x), rtol=0, atol=0)


def test_converting_a_detector_keeps_its_state_dict_and_tensors():
    detector = _tiny_fcos()
    before = detector.state_dict()
    distributed.convert_sync_batchnorm(detector)
    norms = [m for m in detector.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(type(m) is distributed.SyncBatchNorm2d for m in norms)
    after = detector.state_dict()
    assert list(after) == list(before)
    assert all(after[name].data_ptr() == before[name].data_ptr() for name in before)  # the same tensors
    FCOS(NUM_CLASSES, 16, [16, 16], pretrained=False).load_state_dict(after)  # a plain model takes them


@ON_TWO_RANKS
def test_sync_batchnorm_on_two_ranks_equals_batchnorm2d_on_the_whole_batch(two_ranks):
    ranks = [r["batchnorm"] for r in two_ranks.results]
    layer = nn.BatchNorm2d(3, momentum=0.3)
    layer.load_state_dict(ranks[0]["layer"])
    for step, batch in enumerate(ranks[0]["batches"]):
        x = batch.clone().requires_grad_()
        output = layer(x)
        (output * ranks[0]["loss_weights"]).sum().backward()
        assert_close(torch.cat([r["outputs"][step] for r in ranks]), output.detach(), rtol=0, atol=2e-6)
        assert_close(torch.cat([r["input_grads"][step] for r in ranks]), x.grad, rtol=0, atol=2e-6)
    # Each rank's parameter gradient is that of its own half; DDP would sum (and average) them.
    assert_close(ranks[0]["weight_grad"] + ranks[1]["weight_grad"], layer.weight.grad, rtol=1e-5, atol=1e-5)
    assert_close(ranks[0]["bias_grad"] + ranks[1]["bias_grad"], layer.bias.grad, rtol=1e-5, atol=1e-5)
    _assert_same_state(ranks[0]["state"], layer.state_dict(), rtol=1e-6, atol=1e-6)
    _assert_same_state(ranks[1]["state"], ranks[0]["state"], rtol=0, atol=0)


def test_mean_over_ranks_and_gathering_without_a_process_group():
    count = torch.tensor(7)
    assert distributed.mean_over_ranks(count) is count  # untouched with one process
    assert distributed.all_gather_objects({"a": 1}) == [{"a": 1}]
    assert distributed.world_size() == 1 and distributed.rank() == 0 and distributed.is_main_process()


# ---------------------------------------------------------------------------------------------
# train_detector with DDP
# ---------------------------------------------------------------------------------------------


@ON_TWO_RANKS
def test_two_ranks_train_fcos_like_one_process_with_the_global_batch(two_ranks):
    """Two ranks with 2 images each end where one process with the same 4 images per step ends.

    In float64: in float32 the two runs differ by rounding (about 1e-4 relative deep in the random
    backbone), and a pre-activation that lies within that of zero can land on the other side of a
    ReLU in one run, which changes the gradient at that location entirely (measured: one such flip
    in the last RegNet block moved a weight gradient there by 18%). In float64 they agree to ~1e-12.
    """
    rank0, rank1 = (r["fcos"] for r in two_ranks.results)
    assert rank0["norm_types"] == {distributed.SyncBatchNorm2d}
    _assert_same_state(rank0["state"], rank1["state"], rtol=0, atol=0)  # DDP keeps the ranks identical
    assert rank0["history"] == rank1["history"]  # the logged losses are the ranks' mean

    single = _tiny_fcos(torch.float64)
    history = train_detector(single, _share_loader(1, 0, float64=True), **_FCOS_SETTINGS)
    difference = _max_difference(rank0["state"], single.state_dict())  # weights and BatchNorm statistics
    change = _max_difference(single.state_dict(), _tiny_fcos(torch.float64).state_dict(), _parameter_names(single))
    print(f"max |DDP - single process| = {difference:.3g}; max weight change made by training = {change:.3g}")
    assert difference < 1e-9 and difference < 1e-6 * change
    assert rank0["history"]["total"] == pytest.approx(history["total"], rel=1e-5)

    checkpoint = a4_helper.read_checkpoint(two_ranks.folder / "fcos.pt")
    assert checkpoint["iteration"] == 2 and len(checkpoint["rank_states"]) == WORLD_SIZE
    assert list(checkpoint["model"]) == list(single.state_dict())  # no "module." prefix
    _assert_same_state(checkpoint["model"], rank0["state"], rtol=0, atol=0)


@ON_TWO_RANKS
def test_object_balance_with_no_ground_truth_rows_on_one_rank(two_ranks):
    rank0, rank1 = (r["object_balance"] for r in two_ranks.results)
    # Over both ranks: object a has 1 location (raw weight 1), b has 4 (raw 1/2 each), rank 1 none. The 5
    # foreground locations have raw weights adding up to 3, so the scale is 5/3: a 5/3, b 5/6 each.
    assert_close(rank0["weights"], torch.tensor([[5 / 3, 5 / 6, 5 / 6, 5 / 6, 5 / 6, 0, 0]]))
    assert rank1["weights"].shape == (1, 7) and (rank1["weights"] == 0).all()
    assert all(math.isfinite(value) for value in [*rank0["losses"].values(), *rank1["losses"].values()])
    assert rank0["losses"]["loss_box"] > 0 and rank1["losses"]["loss_box"] == 0 and rank1["losses"]["loss_cls"] > 0


@ON_TWO_RANKS
def test_a_detector_wrapped_by_the_caller_trains_and_saves_plain_weights(two_ranks):
    rank0 = two_ranks.results[0]["faster_rcnn_fcos"]  # wrapped in DDP by the job (the ranks agree: next test)
    checkpoint = a4_helper.read_checkpoint(two_ranks.folder / "faster_rcnn_fcos.pt")
    assert list(checkpoint["model"]) == list(_tiny_faster_rcnn("fcos").state_dict())  # no "module." prefix
    _assert_same_state(checkpoint["model"], rank0["state"], rtol=0, atol=0)


@ON_TWO_RANKS
def test_a_checkpoint_of_two_ranks_resumes_on_one_process(two_ranks, tmp_path):
    path = tmp_path / "fcos.pt"
    path.write_bytes((two_ranks.folder / "fcos.pt").read_bytes())
    saved = a4_helper.read_checkpoint(path)
    with pytest.warns(UserWarning) as caught:  # one more iteration than the checkpoint was saved for
        history = train_detector(
            _tiny_fcos(torch.float64),
            _share_loader(1, 0, float64=True),
            checkpoint_path=path,
            **{**_FCOS_SETTINGS, "max_iters": 3},
        )
    assert any("saved by 2 process(es) and is resumed by 1" in str(warning.message) for warning in caught)
    assert history["total"][:2] == saved["loss_history"]["total"] and len(history["total"]) == 3
    resaved = a4_helper.read_checkpoint(path)
    assert resaved["iteration"] == 3 and "rank_states" not in resaved  # saved by one process now


@pytest.mark.parametrize("first_stage", ["rpn", "fcos"])
@ON_TWO_RANKS
def test_two_ranks_train_faster_rcnn_to_identical_weights(two_ranks, first_stage):
    """Each rank samples its own anchors and RoIs, DDP keeps the weights identical; and no parameter
    goes unused in a step (DDP, without find_unused_parameters, would stop in the second iteration)."""
    rank0, rank1 = (r[f"faster_rcnn_{first_stage}"] for r in two_ranks.results)
    _assert_same_state(rank0["state"], rank1["state"], rtol=0, atol=0)
    assert rank0["history"] == rank1["history"] and len(rank0["history"]["total"]) == 2
    initial = _tiny_faster_rcnn(first_stage).state_dict()
    assert _max_difference(rank0["state"], initial, _parameter_names(_tiny_faster_rcnn(first_stage))) > 0


@ON_TWO_RANKS
def test_resumed_two_rank_run_ends_with_the_weights_of_an_uninterrupted_one(two_ranks):
    for result in two_ranks.results:
        uninterrupted, resumed = result["faster_rcnn_rpn"], result["resume"]
        assert resumed["crashed_iteration"] == 1
        _assert_same_state(resumed["state"], uninterrupted["state"], rtol=0, atol=0)
        assert resumed["history"] == uninterrupted["history"]
    torch_states = [state["rng"]["torch"] for state in two_ranks.results[0]["resume"]["rank_states"]]
    assert not torch.equal(*torch_states)  # each rank's own random stream is saved and restored


# ---------------------------------------------------------------------------------------------
# The command line under torchrun
# ---------------------------------------------------------------------------------------------


@ON_TWO_RANKS
def test_torchrun_trains_writes_once_from_rank_0_and_a_rerun_resumes(two_ranks, tmp_path):
    out = two_ranks.cli
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "losses.png", "metrics.json", "predictions.png"]
    assert two_ranks.stdout.count("mAP@0.5 on 2 val images") == 1  # rank 0 alone evaluates
    checkpoint = a4_helper.read_checkpoint(out / "checkpoint.pt")
    assert checkpoint["iteration"] == 2 and len(checkpoint["rank_states"]) == WORLD_SIZE
    assert checkpoint["metadata"]["config"]["batch_size"] == 4  # the global batch
    assert not any(name.startswith("module.") for name in checkpoint["model"])

    metrics = json.loads((out / "metrics.json").read_text())
    evaluated = detect.main(
        ["eval", "--checkpoint", str(out / "checkpoint.pt"), "--out", str(tmp_path / "eval"), "--device", "cpu"]
    )
    assert evaluated["map"] == pytest.approx(metrics["map"])  # one process reads the checkpoint of two

    again = _torchrun([os.path.join(ROOT, "detect.py"), *_TRAIN_COMMAND, "--out", str(out)], cwd=tmp_path)
    assert again.stdout.count("Resuming from") == 1 and again.stdout.count("mAP@0.5 on 2 val images") == 1
    resumed = a4_helper.read_checkpoint(out / "checkpoint.pt")
    assert resumed["iteration"] == 2 and resumed["loss_history"] == checkpoint["loss_history"]
    _assert_same_state(resumed["model"], checkpoint["model"], rtol=0, atol=0)  # nothing trained again


def test_at_every_step_the_ranks_batches_make_up_the_batch_of_one_process(monkeypatch):
    def batches(world_size, rank, epoch):
        monkeypatch.setattr(distributed, "world_size", lambda: world_size)
        monkeypatch.setattr(distributed, "rank", lambda: rank)
        loader = detect._train_loader(list(range(10)), batch_size=4, workers=0, seed=3)
        loader.sampler.set_epoch(epoch)
        return [batch.tolist() for batch in loader]

    epochs = []
    for epoch in (0, 1):
        single, shares = batches(1, 0, epoch), [batches(2, rank, epoch) for rank in range(2)]
        assert len(single) == len(shares[0]) == len(shares[1]) == 2  # 10 images: 2 batches of 4, the rest dropped
        for step, batch in enumerate(single):
            assert len(shares[0][step]) == len(shares[1][step]) == 2
            assert sorted(shares[0][step] + shares[1][step]) == sorted(batch)
        epochs.append(single)
    assert epochs[0] != epochs[1]  # each epoch has its own order


def test_a_global_batch_that_the_processes_cannot_share_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    with pytest.raises(SystemExit, match="--batch-size 4 is the global batch of all 3 processes"):
        detect.main([*_TRAIN_COMMAND, "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


if __name__ == "__main__":  # a process started by the two_ranks fixture's torchrun
    _run_rank(sys.argv[1], sys.argv[2:])

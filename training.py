"""Training: ``train_detector`` with checkpoints and exact resume (on one process, or on several with
DDP), the NaN guard, ``read_checkpoint``, ``compile_detector`` and ``reset_seed``.

Detectors are passed in and follow one small interface: in train mode ``losses = detector(images
(B, 3, H, W), gt_boxes (B, M, 5))`` returns a dict of scalar loss tensors whose sum is the total loss.
Imports: ``detection_data``, ``augmentation`` and ``distributed``; no detector.
"""

import contextlib
import functools
import math
import os
import random
import warnings
from collections import defaultdict
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm  # a single-line widget in a notebook, a text bar in a terminal

import distributed
from augmentation import BatchAugmentation
from detection_data import PathLike, _save_atomically, prepare_images


def reset_seed(seed: int) -> None:
    """Seed Python's ``random``, NumPy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


_CHECKPOINT_FORMAT = 1


_CHECKPOINT_KEYS = (
    "format",
    "iteration",
    "max_iters",
    "model",
    "optimizer",
    "scheduler",
    "scaler",
    "loss_history",
    "rng",
    "data",
)  # and, when saved by several processes, "rank_states"


GRAD_CLIP = 10.0  # train_detector's default bound on the global gradient norm (see its docstring)


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or infinite; training stopped before using it and saved nothing.

    Attributes: ``iteration`` (1-based) where it happened, ``values`` (every loss and metric of that
    step), ``checkpoint_path`` and ``last_saved`` (the iteration the kept checkpoint holds, or None).
    """

    def __init__(
        self,
        values: Mapping[str, float],
        iteration: int,
        checkpoint_path: Optional[PathLike],
        last_saved: Optional[int],
    ):
        super().__init__(_non_finite_message(values, iteration, checkpoint_path, last_saved))
        self.values, self.iteration = dict(values), iteration
        self.checkpoint_path, self.last_saved = checkpoint_path, last_saved


def _lr_factor(iteration: int, max_iters: int, warmup_iters: int) -> float:
    """LR multiplier at a 0-based iteration: linear warm-up, then x0.1 at 60% and 90% of training."""
    warmup = min(1.0, (iteration + 1) / warmup_iters) if warmup_iters > 0 else 1.0
    steps = (iteration >= 0.6 * max_iters) + (iteration >= 0.9 * max_iters)
    return warmup * 0.1**steps


def _autocast_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for ``amp`` ("auto", "bf16", "fp16", "fp32"); ``None`` means fp32."""
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    choices = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if amp not in choices:
        raise ValueError(f"amp must be 'auto', 'bf16', 'fp16' or 'fp32', got {amp!r}")
    return choices[amp]


def _loader_generators(loader: torch.utils.data.DataLoader) -> List[torch.Generator]:
    """The loader's and its sampler's own generators (they draw the shuffle when they are set)."""
    generators: List[torch.Generator] = []
    for owner in (loader, getattr(loader, "sampler", None)):
        generator = getattr(owner, "generator", None)
        if isinstance(generator, torch.Generator) and all(generator is not g for g in generators):
            generators.append(generator)
    return generators


class _ResumableBatches:
    """Endless batches from a DataLoader, epoch after epoch, with a position that can be saved.

    A loader draws its shuffle (and its workers' seeds) when an epoch's iterator starts, from
    torch's global RNG or from its own generator. We capture those states at the start of every
    epoch; resuming restores them, re-creates the iterator (same order) and skips the batches
    already used. Exact for data sets that are deterministic per index, like the ones here.
    A sampler with ``set_epoch`` (``DistributedSampler``) is told the epoch before each one
    starts; its order depends on its seed and the epoch only.
    """

    def __init__(self, loader: torch.utils.data.DataLoader):
        self.loader = loader
        self.epoch = 0
        self.batch = 0
        self._epoch_rng: Optional[Dict[str, Any]] = None
        self._iterator: Optional[Iterator] = None

    def _start_epoch(self, epoch_rng: Optional[Dict[str, Any]] = None) -> None:
        generators = _loader_generators(self.loader)
        if epoch_rng is None:
            epoch_rng = {"torch": torch.get_rng_state(), "generators": [g.get_state() for g in generators]}
        else:
            torch.set_rng_state(epoch_rng["torch"])
            for generator, state in zip(generators, epoch_rng["generators"]):
                generator.set_state(state)
        self._epoch_rng, self.batch = epoch_rng, 0
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        self._iterator = iter(self.loader)

    def __next__(self):
        if self._iterator is None:
            self._start_epoch()
        batch = next(self._iterator, None)
        if batch is None:
            self.epoch += 1
            self._start_epoch()
            batch = next(self._iterator, None)
            if batch is None:
                raise ValueError("The training loader yields no batches.")
        self.batch += 1
        return batch

    def state_dict(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "batch": self.batch, "epoch_rng": self._epoch_rng}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Go back to a saved position (this resets torch's RNG to the epoch's start state)."""
        self.epoch = state["epoch"]
        self._start_epoch(state["epoch_rng"])
        for _ in range(state["batch"]):
            next(self._iterator)
        self.batch = state["batch"]


def _rng_states() -> Dict[str, Any]:
    """Every RNG state, as tensors and plain Python values (loadable with ``weights_only``)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: Mapping[str, Any]) -> None:
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    numpy_state = states["numpy"]
    keys = numpy_state["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, numpy_state["pos"], numpy_state["has_gauss"], numpy_state["gauss"]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def read_checkpoint(path: PathLike) -> Dict[str, Any]:
    """Load a ``train_detector`` checkpoint onto the CPU (safely: ``weights_only``).

    Returns:
        The checkpoint dict (see ``train_detector``); its ``"model"`` entry is the detector's
        state dict and ``"metadata"`` whatever the training run passed.
    Raises:
        RuntimeError naming the file when it cannot be read or is not such a checkpoint; the
        file is never modified.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, garbage bytes, foreign pickles: all end here
        raise RuntimeError(
            f"Could not read the training checkpoint {os.fspath(path)!r} ({type(error).__name__}: {error}). "
            "It was left untouched; move or delete it to start training from scratch."
        ) from error
    missing = [key for key in _CHECKPOINT_KEYS if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise RuntimeError(f"{os.fspath(path)!r} is not a train_detector checkpoint: it lacks {missing}.")
    return checkpoint


def _non_finite_message(
    values: Mapping[str, float], iteration: int, checkpoint_path: Optional[PathLike], last_saved: Optional[int]
) -> str:
    bad = ", ".join(f"{name}={value}" for name, value in values.items() if not math.isfinite(value))
    message = f"Loss is not finite at iteration {iteration}: {bad}. Training stopped before this update."
    if checkpoint_path is not None and last_saved is not None:
        message += f" The last good checkpoint {os.fspath(checkpoint_path)!r} (iteration {last_saved}) is kept."
    return message + " Try a lower learning_rate, a longer warm-up or grad_clip."


def _loss_values(losses: Mapping[str, torch.Tensor], metrics: Mapping[str, torch.Tensor]) -> Dict[str, float]:
    """Loss terms, their total and the detector's metrics as Python floats, averaged over the ranks
    under DDP, so that every rank sees the same values (one all-reduce and one device sync per iteration)."""
    stacked = torch.stack([value.detach().float() for value in [*losses.values(), *metrics.values()]])
    floats = distributed.mean_over_ranks(stacked).tolist()
    values = dict(zip([*losses, *metrics], floats))
    values["total"] = math.fsum(values[name] for name in losses)
    return values


def train_detector(
    detector: nn.Module,
    train_loader: torch.utils.data.DataLoader,
    learning_rate: float = 5e-3,
    weight_decay: float = 1e-4,
    max_iters: int = 5000,
    log_period: int = 20,
    device: Union[str, torch.device] = "cpu",
    checkpoint_path: Optional[PathLike] = None,
    warmup_iters: Optional[int] = None,
    grad_clip: Optional[float] = GRAD_CLIP,
    amp: str = "auto",
    progress: bool = True,
    metadata: Optional[Mapping[str, Any]] = None,
    optimizer: str = "sgd",
    augmentation: Optional[BatchAugmentation] = None,
) -> Dict[str, List[float]]:
    """Train a detector with SGD, a warm-up and two LR steps; resumable exactly from a checkpoint.

    SGD with momentum 0.9 (or AdamW) and weight decay; the LR rises linearly over ``warmup_iters`` (to keep
    early, large gradients of a fresh head from blowing up) and drops x0.1 at 60% and 90% of
    ``max_iters``. The loader is re-iterated for as many epochs as needed.

    Several processes (DDP): when the default process group is initialised with more than one
    process (``torchrun``; see ``distributed.process_group_from_environment``), every rank calls
    this function with the same arguments and a loader over its own share of each batch
    (``DistributedSampler``). The detector's ``nn.BatchNorm2d`` layers become
    ``distributed.SyncBatchNorm2d`` (same state dict) and it is wrapped in
    ``DistributedDataParallel``, which averages the ranks' gradients; a detector that is already
    wrapped is used as it is. The logged losses are averaged over the ranks, so all ranks see the
    same values and a non-finite loss stops all of them. Rank 0 alone shows the progress bar and
    writes the checkpoint, whose ``"model"`` is the plain detector's state dict (no ``module.``
    prefix), loadable by one process or by any number of them; it also holds the RNG and data states
    of every rank (``"rank_states"``), so that a resumed run with as many processes continues exactly.

    Args:
        detector: a module whose train-mode call ``detector(images, gt_boxes)`` returns a dict of
            scalar losses (summed for the update). If it has a ``training_metrics`` dict of scalars
            (e.g. the first stage's classification error), those are logged in the history too,
            never added to the loss. It may come wrapped in ``DistributedDataParallel``.
        train_loader: yields ``(image_ids, images (B, 3, H, W), gt_boxes (B, M, 5), ...)``.
        learning_rate, weight_decay: optimizer settings.
        max_iters: number of updates in total (a resumed run counts the ones already done).
        log_period: every ``log_period`` iterations the progress bar shows the mean losses and
            the checkpoint (if any) is saved; it is also saved after the last iteration.
        device: where to train.
        checkpoint_path: file for the full training state, written atomically: a dict with
            ``"format"`` (1), ``"iteration"`` (updates done), ``"max_iters"``, ``"model"``,
            ``"optimizer"``, ``"scheduler"``, ``"scaler"`` (state dicts), ``"loss_history"``,
            ``"rng"`` (python, numpy, torch, cuda), ``"data"`` (epoch, batch within it, RNG
            states at the epoch's start), ``"augmentation"`` (with ``augmentation`` only),
            ``"model_class"`` and ``"optimizer_class"`` (class names) and ``"metadata"``. If it exists
            when training starts, training resumes from it and ends exactly as an uninterrupted run would.
        warmup_iters: length of the linear warm-up; ``None`` = ``min(100, max_iters // 10)``.
        grad_clip: clip the global gradient norm to this value (``GRAD_CLIP``, 10, by default); ``None``
            does not clip. A randomly initialised backbone receives gradients with norms in the
            hundreds in its first steps once a head passes them on undamped (an untrained Faster
            R-CNN with a He-initialised RoI head: about 230), and a single SGD step at lr 0.01 then
            wrecks its first layers; clipping shortens such steps and leaves their direction.
        amp: "auto" = bf16 autocast on CUDA where supported, else fp16 with a gradient scaler,
            and fp32 on CPU; or force "bf16", "fp16" or "fp32".
        progress: show a tqdm progress bar with the current losses.
        metadata: plain Python values (e.g. the detector's configuration) stored as is under
            ``"metadata"`` in every checkpoint, so that the checkpoint can rebuild its detector.
        optimizer: ``"sgd"`` (momentum 0.9, the course's choice for ImageNet-initialised backbones)
            or ``"adamw"``, which trains a randomly initialised backbone much faster.
        augmentation: a ``BatchAugmentation`` applied to every batch on ``device``, after the images are
            normalised (so after a uint8 cache); ``None`` trains on the images as they come. Its random
            state is saved in the checkpoint (``"augmentation"``, and per rank in ``"rank_states"``), so a
            resume continues its stream exactly; resuming a checkpoint saved with another augmentation
            setting (or none) raises a RuntimeError.
    Returns:
        Loss history ``{loss or metric name: [value per iteration], ..., "total": [...]}`` over all
        ``max_iters`` iterations (including those before a resume).
    Raises:
        NonFiniteLossError (a FloatingPointError): a loss was NaN or infinite; its message names
            the iteration (1-based) and the terms. Nothing is saved for that iteration.
        RuntimeError: ``checkpoint_path`` exists but cannot be read, or holds weights that do not
            fit ``detector`` (e.g. the other detector type); the file is left untouched.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    # The plain detector holds the weights and metrics; ``detector`` is what the forward pass calls.
    model = detector.module if isinstance(detector, DistributedDataParallel) else detector
    several = distributed.world_size() > 1 and model is detector
    if several:
        distributed.convert_sync_batchnorm(model)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _make_optimizer(optimizer, params, learning_rate, weight_decay)
    warmup_iters = min(100, max_iters // 10) if warmup_iters is None else warmup_iters
    lr_lambda = functools.partial(_lr_factor, max_iters=max_iters, warmup_iters=warmup_iters)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    autocast_dtype = _autocast_dtype(amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
    batches = _ResumableBatches(train_loader)
    parts = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler, "data": batches}
    if augmentation is not None:
        parts["augmentation"] = augmentation
    start, history = 0, defaultdict(list)
    if checkpoint_path is not None and os.path.exists(checkpoint_path):
        start, history = _resume(checkpoint_path, parts, max_iters)
    if several:  # after the resume: every rank has loaded the same weights (DDP checks they agree)
        detector = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    main = distributed.is_main_process()
    bar = tqdm(range(start, max_iters), initial=start, total=max_iters, desc="train", disable=not (progress and main))
    last_saved = start if start > 0 else None
    for iteration in bar:
        losses = _forward(detector, next(batches), device, autocast_dtype, augmentation)
        values = _loss_values(losses, getattr(model, "training_metrics", {}))
        if not all(math.isfinite(value) for value in values.values()):
            bar.close()
            raise NonFiniteLossError(values, iteration + 1, checkpoint_path, last_saved)
        _update(sum(losses.values()), optimizer, scaler, params, grad_clip)
        scheduler.step()
        for name, value in values.items():
            history[name].append(value)
        if (iteration + 1) % log_period == 0 or iteration + 1 == max_iters:
            bar.set_postfix({name: f"{np.mean(v[-log_period:]):.3f}" for name, v in history.items()}, refresh=False)
            if checkpoint_path is not None:
                state = _checkpoint(iteration + 1, max_iters, parts, history)  # every rank takes part
                if main:
                    _save_atomically({**state, "metadata": metadata}, checkpoint_path)
                last_saved = iteration + 1
    bar.close()
    distributed.barrier()  # no rank returns before the last checkpoint is written
    return dict(history)


def _make_optimizer(name: str, params: List[nn.Parameter], learning_rate: float, weight_decay: float):
    if name == "sgd":
        return torch.optim.SGD(params, lr=learning_rate, momentum=0.9, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {name!r}")


def compile_detector(detector: nn.Module, **compile_options: Any) -> nn.Module:
    """``torch.compile`` the detector's backbone and heads, in place.

    The convolutional parts (``backbone``, every ``pred_net`` head, FasterRCNN's ``roi_stem``) are
    compiled; matching, sampling and NMS, whose shapes change with the data, stay eager. The
    modules are compiled in place (``nn.Module.compile``), so state-dict names and checkpoints do
    not change. The first steps take longer (about a minute on a CPU) while the code is compiled.

    Args:
        detector: an ``FCOS``, ``FasterRCNN`` or ``FirstStage``.
        compile_options: passed to ``torch.compile`` (e.g. ``mode="max-autotune"``).
    Returns:
        The same detector.
    """
    if not hasattr(nn.Module, "compile"):
        raise RuntimeError(f"Compiling needs torch 2.2 or newer (this is {torch.__version__}); train without it.")
    compiled: List[str] = []
    for name, module in detector.named_modules():
        inside_compiled = any(name.startswith(done + ".") for done in compiled)
        if name.split(".")[-1] in ("backbone", "pred_net", "roi_stem") and not inside_compiled:
            module.compile(**compile_options)
            compiled.append(name)
    if not compiled:
        raise ValueError(f"{type(detector).__name__} has no backbone or head to compile.")
    return detector


def _forward(
    detector: nn.Module,
    batch: Sequence,
    device: torch.device,
    autocast_dtype: Optional[torch.dtype],
    augmentation: Optional[BatchAugmentation] = None,
) -> Dict[str, torch.Tensor]:
    _, images, gt_boxes = batch[:3]
    images = prepare_images(images, device)
    gt_boxes = gt_boxes.to(device, non_blocking=True)
    if augmentation is not None:  # on the device, after the cache: the cached images stay unaugmented
        images, gt_boxes = augmentation(images, gt_boxes)
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with autocast:
        return detector(images, gt_boxes)


def _update(
    total_loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    params: List[nn.Parameter],
    grad_clip: Optional[float],
) -> None:
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total_loss).backward()
    if grad_clip is not None:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()


def _checkpoint(iteration: int, max_iters: int, parts: Mapping[str, Any], history: Mapping[str, List[float]]) -> Dict:
    """The training state to save. Under DDP every rank must call this (it gathers the ranks' RNG, data
    and augmentation states); "rng", "data" and "augmentation" are rank 0's, "rank_states" lists every rank's."""
    state = {name: part.state_dict() for name, part in parts.items()}
    own = {name: state[name] for name in ("data", "augmentation") if name in state}
    ranks = distributed.all_gather_objects({"rng": _rng_states(), **own})
    state.update(
        format=_CHECKPOINT_FORMAT,
        iteration=iteration,
        max_iters=max_iters,
        rng=ranks[0]["rng"],
        data=ranks[0]["data"],
        **({"augmentation": ranks[0]["augmentation"]} if "augmentation" in state else {}),
        loss_history={name: list(values) for name, values in history.items()},
        model_class=type(parts["model"]).__name__,
        optimizer_class=type(parts["optimizer"]).__name__,
    )
    if len(ranks) > 1:
        state["rank_states"] = ranks
    return state


def _check_model_fits(path: PathLike, checkpoint: Mapping[str, Any], detector: nn.Module) -> None:
    """Raise a RuntimeError naming the file when its weights do not fit ``detector`` (before any is loaded)."""
    saved, own = checkpoint["model"], detector.state_dict()
    missing = [key for key in own if key not in saved]
    unexpected = [key for key in saved if key not in own]
    reshaped = [key for key in own if key in saved and saved[key].shape != own[key].shape]
    if missing or unexpected or reshaped:
        holds = checkpoint.get("model_class", "an unnamed model")
        raise RuntimeError(
            f"{os.fspath(path)!r} holds weights of {holds}, which do not fit this {type(detector).__name__}: "
            f"{len(missing)} missing (e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}), "
            f"{len(reshaped)} of another shape (e.g. {reshaped[:2]}). It was left untouched; pass another "
            "checkpoint_path, or delete the file to start training from scratch."
        )


def _resume(path: PathLike, parts: Mapping[str, Any], max_iters: int) -> Tuple[int, Dict[str, List[float]]]:
    """Restore every part from a checkpoint; returns (iterations done, loss history)."""
    checkpoint = read_checkpoint(path)
    _check_model_fits(path, checkpoint, parts["model"])
    _check_augmentation_fits(path, checkpoint, parts)
    saved_optimizer, optimizer = checkpoint.get("optimizer_class"), type(parts["optimizer"]).__name__
    if saved_optimizer not in (None, optimizer):
        raise RuntimeError(
            f"{os.fspath(path)!r} was trained with {saved_optimizer}, this run uses {optimizer}. It was left "
            "untouched; resume with the same optimizer, or pass another checkpoint_path."
        )
    if checkpoint["max_iters"] != max_iters:
        warnings.warn(
            f"{os.fspath(path)!r} was saved for max_iters={checkpoint['max_iters']}, now {max_iters}: "
            "the LR steps move, so the run will differ from an uninterrupted one.",
            stacklevel=3,
        )
    for name, part in parts.items():
        if name not in ("data", "augmentation"):
            part.load_state_dict(checkpoint[name])
    own = _own_rank_state(path, checkpoint, max_iters)
    parts["data"].load_state_dict(own["data"])
    if "augmentation" in parts:
        parts["augmentation"].load_state_dict(own["augmentation"])
    # Last, because restoring the data position replays the start of its epoch on torch's RNG.
    _set_rng_states(own["rng"])
    return checkpoint["iteration"], defaultdict(list, checkpoint["loss_history"])


def _check_augmentation_fits(path: PathLike, checkpoint: Mapping[str, Any], parts: Mapping[str, Any]) -> None:
    """Refuse, before loading anything, a checkpoint saved with augmentation by a run without, or the reverse."""
    saved, wanted = "augmentation" in checkpoint, "augmentation" in parts
    if saved != wanted:
        raise RuntimeError(
            f"{os.fspath(path)!r} was trained {'with' if saved else 'without'} augmentation, this run is "
            f"{'with' if wanted else 'without'}; it was left untouched. Resume with the same augmentation "
            "setting, or pass another checkpoint_path."
        )
    if saved:
        try:
            parts["augmentation"].check_settings(checkpoint["augmentation"])
        except ValueError as error:
            raise RuntimeError(f"{os.fspath(path)!r} cannot be resumed: {error} It was left untouched.") from error


def _own_rank_state(path: PathLike, checkpoint: Mapping[str, Any], max_iters: int) -> Dict[str, Any]:
    """This rank's saved ``{"rng", "data"}`` (and ``"augmentation"`` when it has one); rank 0's when the
    checkpoint was saved by another number of processes. The data order then still goes on exactly with a
    ``DistributedSampler`` as in detect.py, where a step takes the same global batch with any number of processes."""
    top = {name: checkpoint[name] for name in ("rng", "data", "augmentation") if name in checkpoint}
    saved = checkpoint.get("rank_states") or [top]
    if len(saved) == distributed.world_size():
        return saved[distributed.rank()]
    if checkpoint["iteration"] < max_iters:
        warnings.warn(
            f"{os.fspath(path)!r} was saved by {len(saved)} process(es) and is resumed by {distributed.world_size()}: "
            "the data order goes on exactly, but random draws (e.g. anchor sampling) differ from an uninterrupted run.",
            stacklevel=4,
        )
    return saved[0]

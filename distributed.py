"""Training on several processes (one per GPU) with DistributedDataParallel: the few pieces it needs.

``torchrun --nproc_per_node=N detect.py train ...`` starts N copies of the program; each one is a
*rank* with its own share of every batch. ``DistributedDataParallel`` averages the gradients of the
ranks after each backward pass, so that all ranks take the same step. Two things would still make
N processes train differently from one process with the same global batch, and this module fixes
both:

- BatchNorm in train mode normalises with the statistics of the batch it sees, which under DDP is
  only the rank's share. ``SyncBatchNorm2d`` computes them over all ranks (torch's own
  ``nn.SyncBatchNorm`` runs on GPUs only; this one works with the CPU's gloo backend as well).
- A loss divided by a count of the local batch (FCOS divides by the number of foreground
  locations) must be divided by the mean count over ranks instead: ``mean_over_ranks``.

Every function here also works without a process group (plain ``python ...``): it then behaves
like one process with rank 0 of 1.
"""

import contextlib
import os
from typing import Any, Iterator, List, Tuple

import torch
import torch.distributed as dist
from torch import nn


def world_size() -> int:
    """Number of processes in the default process group; 1 when there is none."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the default process group; 0 when there is none."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    """True on the rank that writes files and prints (rank 0, or the only process)."""
    return rank() == 0


def barrier() -> None:
    """Wait until every rank gets here (nothing to wait for with one process)."""
    if world_size() == 1:
        return
    if dist.get_backend() == "nccl":  # tell NCCL which GPU is this rank's, or it guesses
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


@contextlib.contextmanager
def rank_zero_first() -> Iterator[None]:
    """Run the block on rank 0 first, then on the other ranks.

    For work that writes shared files, such as downloading a data set or weights: rank 0 does it,
    and the others find the files in place.
    """
    if not is_main_process():
        barrier()
    yield
    if is_main_process():
        barrier()


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over all ranks (no gradient); the tensor itself with one process.

    A loss that each rank divides by this mean of a local count (e.g. FCOS's number of foreground
    locations) has, once DDP averages the gradients of the ranks, the gradient of the loss of one
    process that divides by the count of the whole global batch.
    """
    size = world_size()
    if size == 1:
        return value
    total = value.detach().float().clone()
    dist.all_reduce(total)
    return total / size


def all_gather_objects(obj: Any) -> List[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` with one process."""
    if world_size() == 1:
        return [obj]
    gathered: List[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


@torch.no_grad()
def _global_batch_stats(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of the batches of all ranks, and their element count.

    Each rank computes the count, mean and sum of squared deviations of each channel of its own
    batch, and writes them into its row of a table of zeros; one all-reduce (a sum) gives every rank
    the full table. The rows combine with Chan et al.'s parallel formula: the squared deviations
    around the global mean are the ranks' own plus ``count * (rank mean - global mean)^2``. Unlike
    ``E[x^2] - E[x]^2`` from summed squares, this keeps its precision when a channel's mean is large
    against its spread, as happens in randomly initialised networks.

    Args:
        x: (B, C, H, W), float32 or float64.
    Returns:
        mean (C,), var (C,) and the count N (a 0-dim tensor), all without gradient.
    """
    C = x.shape[1]
    local_mean = x.mean(dim=(0, 2, 3))
    local_m2 = (x - local_mean[None, :, None, None]).square().sum(dim=(0, 2, 3))
    table = x.new_zeros(world_size(), 1 + 2 * C)
    table[rank()] = torch.cat([x.new_full((1,), x.numel() // C), local_mean, local_m2])
    dist.all_reduce(table)
    counts, means, m2s = table[:, :1], table[:, 1 : C + 1], table[:, C + 1 :]  # (W, 1), (W, C), (W, C)
    n = counts.sum()
    mean = (counts * means).sum(dim=0) / n
    var = (m2s.sum(dim=0) + (counts * (means - mean).square()).sum(dim=0)) / n
    return mean, var, n


class _SyncBatchNormFunction(torch.autograd.Function):
    """``y = (x - mean) * invstd * weight + bias`` with the global batch's statistics, and its gradient.

    The statistics depend on the inputs of every rank, so the gradient of ``x`` needs the sums of
    ``grad_y`` and ``grad_y * x_hat`` over the whole global batch: the backward pass all-reduces them
    and then applies BatchNorm's usual formula, ``grad_x = weight * invstd * (grad_y - mean(grad_y)
    - x_hat * mean(grad_y * x_hat))``. ``weight`` and ``bias`` get the gradients of the rank's own
    batch, which DDP then averages like any other parameter's.
    """

    @staticmethod
    def forward(ctx, x, mean, invstd, weight, bias, count):
        x_hat = (x - mean[None, :, None, None]) * invstd[None, :, None, None]  # (B, C, H, W)
        ctx.save_for_backward(x_hat, invstd, weight)
        ctx.count = count
        return x_hat * weight[None, :, None, None] + bias[None, :, None, None]

    @staticmethod
    def backward(ctx, grad_y):
        x_hat, invstd, weight = ctx.saved_tensors
        local_sums = torch.cat([grad_y.sum(dim=(0, 2, 3)), (grad_y * x_hat).sum(dim=(0, 2, 3))])  # (2C,)
        global_sums = local_sums.clone()
        dist.all_reduce(global_sums)  # every rank runs this backward pass, in the same order
        mean_grad_y, mean_grad_y_x_hat = (global_sums / ctx.count)[:, None, None].chunk(2)  # (C, 1, 1) each
        grad_x = (weight * invstd)[:, None, None] * (grad_y - mean_grad_y - x_hat * mean_grad_y_x_hat)
        grad_bias, grad_weight = local_sums.chunk(2)
        return grad_x, None, None, grad_weight, grad_bias, None


class SyncBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose batch statistics in train mode cover the batches of all ranks.

    In train mode, under an initialised process group of more than one process, the mean and biased
    variance of the global batch (``_global_batch_stats``: one all-reduce) normalise the input, and
    the backward pass takes the gradient through those statistics into account
    (``_SyncBatchNormFunction``: one more all-reduce), so that once DDP has averaged the gradients
    they equal those of one process with the global batch. ``running_mean`` and ``running_var``
    (with the unbiased variance) are updated with ``momentum`` (or the cumulative average when
    ``momentum`` is ``None``) as ``nn.BatchNorm2d`` updates them for the global batch. Statistics
    are computed in float32 at least, whatever the input's dtype.

    Anywhere else (eval mode, no process group, one process) it is ``nn.BatchNorm2d``. Its
    parameters and buffers are those of ``nn.BatchNorm2d``, so state dicts are interchangeable.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or world_size() == 1:
            return super().forward(input)
        self._check_input_dim(input)
        x = input.to(torch.promote_types(input.dtype, torch.float32))  # half precision is too coarse for sums
        mean, var, n = _global_batch_stats(x)
        if self.track_running_stats:
            self._update_running_stats(mean, var, n)
        weight = self.weight if self.affine else x.new_ones(x.shape[1])
        bias = self.bias if self.affine else x.new_zeros(x.shape[1])
        output = _SyncBatchNormFunction.apply(x, mean, torch.rsqrt(var + self.eps), weight, bias, n)
        return output.to(input.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, n: torch.Tensor) -> None:
        """``running = (1 - momentum) * running + momentum * batch``, as ``nn.BatchNorm2d`` does."""
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased_var = var * n / (n - 1).clamp(min=1)
        self.running_mean.mul_(1 - momentum).add_(momentum * mean.to(self.running_mean.dtype))
        self.running_var.mul_(1 - momentum).add_(momentum * unbiased_var.to(self.running_var.dtype))


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` inside ``module`` (in place) by a ``SyncBatchNorm2d``.

    The new layers take over the old ones' parameter and buffer tensors themselves (not copies),
    so the state dict keeps its keys and values, and an optimizer built before still sees the
    parameters. Returns ``module`` (or the new layer, if ``module`` itself is a BatchNorm2d).
    """
    if type(module) is nn.BatchNorm2d:
        sync = SyncBatchNorm2d(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats, device="meta"
        )
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            setattr(sync, name, getattr(module, name))  # a Parameter, a buffer tensor, or None
        return sync.train(module.training)
    for name, child in module.named_children():
        converted = convert_sync_batchnorm(child)
        if converted is not child:
            setattr(module, name, converted)
    return module


@contextlib.contextmanager
def process_group_from_environment(device: torch.device) -> Iterator[torch.device]:
    """Join the process group when started by ``torchrun``; yields the device this rank uses.

    ``torchrun`` sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
    ``MASTER_PORT`` for each process it starts. With them, the default process group is created
    (backend "nccl" when training on CUDA, "gloo" on the CPU), each rank trains on
    ``cuda:LOCAL_RANK`` (CUDA) or on the CPU, and the group is destroyed when the block ends,
    also on an error. Without them, or when a process group exists already, this does nothing and
    yields ``device``.
    """
    launched = "WORLD_SIZE" in os.environ and "RANK" in os.environ
    if not launched or (dist.is_available() and dist.is_initialized()):
        yield device
        return
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method="env://")
    try:
        yield device
    finally:
        dist.destroy_process_group()

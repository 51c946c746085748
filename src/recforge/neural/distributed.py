"""Data-parallel training under ``torchrun``: process group, batch sharding, rank-0-only side effects.

``torchrun --nproc_per_node N ...`` starts N copies of a command with ``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` in
their environment. :class:`recforge.neural.Trainer` sees them, joins the process group (NCCL on GPUs, gloo on the
CPU) and wraps the network in ``DistributedDataParallel``. Every rank builds the same seeded batches and trains
on its own slice of each one, so a step averages the gradients of the whole batch, as one process would: the
result matches a single-process run up to float rounding and dropout noise, while each rank computes 1/N of it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from recforge.core.device import DEVICE_ENV, resolve_device
from recforge.errors import ParameterError

log = logging.getLogger(__name__)


def launched_distributed() -> bool:
    """True when this process was started by torchrun (or another launcher) as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed() -> bool:
    """Join the launcher's process group once: NCCL when every rank on this machine has a GPU of its own and the
    device is not set to the CPU (``RECFORGE_DEVICE``), gloo on the CPU otherwise (with a warning when GPUs are
    present but fewer than the ranks); True when running with several ranks."""
    if not launched_distributed() or not dist.is_available():
        return False
    if not dist.is_initialized():
        backend = "nccl" if _gpu_per_rank() and resolve_device("auto").type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank())
        elif torch.cuda.is_available() and not _gpu_per_rank() and rank() == 0:
            log.warning("%d ranks on this machine share %d GPU(s): training on the CPU (gloo); start one rank per GPU "
                        "(torchrun --nproc_per_node %d) to train on the GPUs", local_world_size(),
                        torch.cuda.device_count(), torch.cuda.device_count())
        dist.init_process_group(backend=backend)
        log.info("joined process group: rank %d of %d (%s)", rank(), world_size(), backend)
    return dist.get_world_size() > 1


def _gpu_per_rank() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() >= local_world_size()


def rank_device(device: torch.device, explicit: bool) -> torch.device:
    """The device this rank trains on, given the one the model resolved (``explicit``: asked for by name rather
    than left at ``"auto"``): its own GPU in an NCCL group, the CPU in a gloo group."""
    if dist.get_backend() == "nccl":
        if device.type != "cuda":
            raise ParameterError(f"device {str(device)!r} under torchrun with one GPU per rank: set "
                                 f"{DEVICE_ENV}=cpu before torchrun to train every rank on the CPU")
        return torch.device("cuda", local_rank())
    if device.type == "cuda" and explicit:
        raise ParameterError(f"device {str(device)!r} was asked for, but the {local_world_size()} ranks on this "
                             f"machine share {torch.cuda.device_count()} GPU(s): start at most one rank per GPU")
    return torch.device("cpu")


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's rank on its machine (the GPU it drives)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    """How many ranks run on this machine."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)


def world_size() -> int:
    """The number of ranks (1 when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True on rank 0, the only rank that writes files and shows progress."""
    return rank() == 0


def shard_rows(n: int, part: int, parts: int) -> slice:
    """The contiguous rows ``part`` takes of ``n``; never empty, so every rank joins every gradient exchange
    (with fewer rows than ranks, the surplus ranks repeat the last row)."""
    if n <= parts:
        i = min(part, n - 1)
        return slice(i, i + 1)
    lo, hi = n * part // parts, n * (part + 1) // parts
    return slice(lo, hi)


def shard_batch(batch: dict[str, Any], part: int, parts: int) -> dict[str, Any]:
    """This rank's slice of a batch: rows of every array whose first axis has the batch's length."""
    lengths = [len(v) for v in batch.values() if isinstance(v, (np.ndarray, torch.Tensor)) and v.ndim > 0]
    if not lengths:
        return batch
    n = max(lengths)
    rows = shard_rows(n, part, parts)
    return {k: v[rows] if isinstance(v, (np.ndarray, torch.Tensor)) and v.ndim > 0 and len(v) == n else v
            for k, v in batch.items()}


def barrier() -> None:
    """Wait for every rank (nothing to wait for in one process)."""
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (itself when not distributed)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def mean_across_ranks(value: float) -> float:
    """The mean of a float over the ranks (itself when not distributed)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


class LossModule(torch.nn.Module):
    """``DistributedDataParallel`` must run the forward pass that builds the loss; this wraps a network and its
    ``loss_fn`` so the wrapper's forward is that loss (the network's parameters are the wrapper's)."""

    def __init__(self, net: torch.nn.Module, loss_fn: Any) -> None:
        super().__init__()
        self.net = net
        self._loss_fn = loss_fn

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        """The loss of ``batch``."""
        return self._loss_fn(batch)


def wrap_ddp(net: torch.nn.Module, loss_fn: Any, device: torch.device) -> torch.nn.Module:
    """``net``'s loss as a DistributedDataParallel module (gradients averaged over the ranks on backward).
    ``static_graph``: the same parameters take part in every step, which also covers parameters a model's loss
    never uses (e.g. an unused feature table), without an extra graph traversal per step."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(LossModule(net, loss_fn), device_ids=ids, static_graph=True)

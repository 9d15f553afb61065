"""torch.distributed plumbing for training: one process per GPU (or CPU process) via torchrun.

``torchrun --nproc_per_node=N -m bimatting_triton.train --config stage1 ...`` sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous variables; :func:`setup`
reads them, joins the process group (NCCL on CUDA, gloo on CPU) and picks the device.
Without those variables training runs in a single process and nothing here is needed.

SyncBatchNorm: on CUDA with more than one process, BatchNorm layers are converted to
``nn.SyncBatchNorm`` so that the batch statistics cover the whole global batch (the
recipe's DDP + SyncBN). PyTorch's SyncBatchNorm runs on CUDA only (its kernels do not
exist for CPU / gloo), so CPU runs keep per-process BatchNorm; DDP then broadcasts
rank 0's running statistics at each forward (``broadcast_buffers``), and the parameters
stay identical because gradients are all-reduced.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["DistInfo", "setup", "cleanup", "wrap_model", "unwrap", "all_reduce_mean", "barrier", "broadcast_object"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size``, ``local_rank`` on its node, ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group described by torchrun's environment, if any.

    ``device``: 'cuda', 'cpu' or None (CUDA when available). Under torchrun with CUDA each
    process takes GPU ``LOCAL_RANK``. Returns the :class:`DistInfo`.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device='cuda' was asked for, but torch.cuda.is_available() is False")
        if dev.index is None:
            dev = torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def cleanup() -> None:
    """Leave the process group (if one was joined)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, info: DistInfo) -> nn.Module:
    """The model to train: DDP-wrapped (with SyncBatchNorm on CUDA) when distributed.

    ``find_unused_parameters=True`` because a matting step does not use ``project_seg``
    and a segmentation step does not use the refiner.
    """
    if not info.distributed:
        return model
    if info.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return DistributedDataParallel(model, device_ids=[info.device.index], find_unused_parameters=True)
    return DistributedDataParallel(model, find_unused_parameters=True)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DDP wrapper (the module itself otherwise)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def all_reduce_mean(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Average scalar metrics over processes (identity when not distributed)."""
    if not info.distributed or not values:
        return dict(values)
    keys = sorted(values)
    device = info.device if info.device.type == "cuda" else torch.device("cpu")
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t /= info.world_size
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def barrier(info: DistInfo) -> None:
    """Wait for every process (no-op when not distributed)."""
    if info.distributed:
        dist.barrier()


def broadcast_object(obj, info: DistInfo):
    """Rank 0's ``obj`` on every process (identity when not distributed)."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]

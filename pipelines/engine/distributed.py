"""Distributed helpers for ``torchrun``: process group setup, rank checks, metric reduction.

Without ``torchrun`` (no ``WORLD_SIZE`` in the environment) everything degrades to one process.
NCCL on GPUs, gloo on CPU.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as tdist
from torch import nn


def is_dist() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if is_dist() else 0


def world_size() -> int:
    return tdist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: torch.device) -> bool:
    """Join the process group that ``torchrun`` describes in the environment; return whether joined."""
    if is_dist() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return is_dist()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    tdist.init_process_group(backend=backend)
    return True


def local_device(device: torch.device) -> torch.device:
    if device.type == "cuda" and is_dist():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def barrier() -> None:
    if is_dist():
        tdist.barrier()


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def mean_dict(values: dict[str, float]) -> dict[str, float]:
    """Average a dict of floats over all processes (identity in one process)."""
    if not is_dist() or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    if tdist.get_backend() == "nccl":
        t = t.cuda()
    tdist.all_reduce(t)
    t /= world_size()
    return dict(zip(keys, t.cpu().tolist()))


def cleanup() -> None:
    if is_dist():
        tdist.destroy_process_group()

"""Distributed helpers for ``torchrun``: process group setup, rank checks, metric reduction.

Without ``torchrun`` (no ``WORLD_SIZE`` in the environment) everything degrades to one process.
NCCL on GPUs, gloo on CPU. The contract every stage follows under ``torchrun``: each process
computes its share of the global batch, DDP averages gradients, only rank 0 writes files (run
folder, checkpoints, metrics, caches) inside :func:`main_first`, which tells the others whether
the writing succeeded, and logged metrics are means over all processes (:func:`mean_dict`).

A failing process ends the others within seconds, each with one error line: a failure inside
:func:`main_first` is agreed by all processes (the others raise "stopped because rank 0 failed");
a process that dies anywhere else breaks the next collective of the others, which
:func:`peers_watched` turns into one :class:`MaskxError` (as it does a collective that waited
``MASKX_DIST_TIMEOUT_MINUTES``), and a stop signal from ``torchrun`` ends them with one line too.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import re
import signal
from typing import Callable, Iterator, TypeVar

import torch
import torch.distributed as tdist
from torch import nn

from pipelines.engine.device import resolve_device
from pipelines.errors import MaskxError

T = TypeVar("T")
# How long a process waits at a collective (e.g. for rank 0 building a feature cache) before giving up.
TIMEOUT_ENV = "MASKX_DIST_TIMEOUT_MINUTES"


def is_dist() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if is_dist() else 0


def world_size() -> int:
    return tdist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def launched_rank() -> int:
    """This process's rank as ``torchrun`` launched it: also before :func:`init_from_env` joins the group."""
    return rank() if is_dist() else int(os.environ.get("RANK", "0"))


def init_from_env(device: torch.device) -> bool:
    """Join the process group that ``torchrun`` describes in the environment; return whether joined."""
    if is_dist() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return is_dist()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    minutes = float(os.environ.get(TIMEOUT_ENV, "60"))
    tdist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=minutes))
    atexit.register(cleanup)
    return True


def local_device(device: torch.device) -> torch.device:
    if device.type == "cuda" and is_dist():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def setup(device: str, batch_size: int) -> torch.device:
    """This process's device after joining ``torchrun``'s process group (``cuda:LOCAL_RANK`` there).

    ``device``: auto | cpu | cuda; ``batch_size``: the global batch, which must split evenly.
    """
    dev = resolve_device(device)
    init_from_env(dev)
    if batch_size % world_size():
        raise MaskxError(f"solver.batch_size ({batch_size}) is the global batch and must be divisible by "
                         f"the number of processes ({world_size()})")
    return local_device(dev)


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel under ``torchrun`` (as is in one process)."""
    if not is_dist():
        return model
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


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


def _reduce_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum of a list of floats over all processes (identity in one process)."""
    if not is_dist():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_reduce_device())
    tdist.all_reduce(t)
    return t.cpu().tolist()


def gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` (picklable objects; ``[obj]`` in one process)."""
    if not is_dist():
        return [obj]
    out = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out


def main_first(fn: Callable[[], T], others: bool = True) -> T | None:
    """Run ``fn`` on rank 0; when it has finished, on the other ranks too (``others``), else return None there.

    For work only rank 0 may do (write the run folder, build a cache that the others then open).
    If ``fn`` fails on rank 0, the other ranks raise a :class:`MaskxError` instead of waiting forever.
    """
    if not is_dist():
        return fn()
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised below, after telling the others
            error = exc
    failed = all_reduce_sum([0.0 if error is None else 1.0])[0]
    if error is not None:
        raise error
    if failed:
        raise MaskxError(RANK0_FAILED)
    if others and not is_main():
        result = fn()
    return result


RANK0_FAILED = "stopped because rank 0 failed: its error line says why"
# What gloo and NCCL say when another process of the group has gone (or a collective waited too long).
_PEER_LOST = re.compile(r"Connection (closed|reset) by peer|Broken pipe|Timed out|timed out|Timeout|NCCL (error|communicator)")


def _collective_failure(exc: BaseException) -> str | None:
    """The reason in a backend's error about a lost process or an expired collective, else None."""
    if not isinstance(exc, RuntimeError) or not _PEER_LOST.search(str(exc)):
        return None
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    first = re.sub(r"^\[[^\]]*\]\s*", "", first)  # gloo's "[.../pair.cc:561] " source prefix
    return first.split(". ")[0].rstrip(".")[:160]


@contextlib.contextmanager
def peers_watched() -> Iterator[None]:
    """Run a stage's block so that, under ``torchrun``, losing another process ends this one with one
    :class:`MaskxError` line instead of a backend traceback or a silent kill.

    A collective broken by a process that died (gloo: "Connection closed by peer"), or that waited
    ``MASKX_DIST_TIMEOUT_MINUTES``, becomes one line saying so; the SIGTERM that ``torchrun`` sends
    the remaining processes when one has failed becomes one line too (the training loop has its own
    handler, which saves a checkpoint first). Once the block has failed, this process ignores
    SIGTERM for the little it has left to do (record the failure, print its line, exit): ``torchrun``
    stops the others as soon as one has exited, and would otherwise cut that short. In one process the
    block runs unchanged.
    """
    if not is_dist():
        yield
        return

    def on_term(signum, _frame):
        raise MaskxError(f"stopped by {signal.Signals(signum).name}: torchrun stops every process when one has failed "
                         "(its error line says why) or when it is stopped itself")

    previous = _set_sigterm(on_term)
    try:
        yield
    except RuntimeError as exc:
        _set_sigterm(signal.SIG_IGN)
        reason = _collective_failure(exc)
        if reason is None:
            raise
        timed_out = "imed out" in reason or "imeout" in reason
        waited = f" after {os.environ.get(TIMEOUT_ENV, '60')} minutes ({TIMEOUT_ENV})" if timed_out else ""
        raise MaskxError(f"stopped: another process of this torchrun job failed or ended ({reason}){waited}; "
                         "its error line says why") from None
    except BaseException:
        _set_sigterm(signal.SIG_IGN)
        raise
    _set_sigterm(previous)


def _set_sigterm(handler):
    """Install ``handler`` for SIGTERM; return the one it replaces (None outside the main thread, where it cannot)."""
    if handler is None:
        return None
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not in the main thread
        return None


def cleanup() -> None:
    if is_dist():
        tdist.destroy_process_group()

"""How many compute threads a maskx process runs, and how they wait: the one rule, applied at start.

torch runs its CPU operators on an OpenMP pool of as many threads as the machine has cores, and
OpenMP's idle threads spin for a while before they sleep. That is right for one process alone, and
wrong for several on one machine: two maskx jobs on 2 cores each ran 2 threads that spun while the
other's worked, and a stage-2 training fell to 1/17 of its rate (docs/benchmarks.md, "Several
processes on one machine"). The rule, before torch is imported (it reads the environment when it
starts its pool):

- threads = ``MASKX_THREADS`` if set; else ``OMP_NUM_THREADS`` if set (``torchrun`` sets it to 1
  for each process unless you set it); else the cores this process may run on divided by the
  processes ``torchrun`` starts on this machine (``LOCAL_WORLD_SIZE``), at least 1;
- ``OMP_WAIT_POLICY=PASSIVE`` unless set: an idle thread sleeps instead of spinning, so processes
  side by side share the cores instead of burning them;
- data-loader workers run one thread each (torch sets that in every worker process).

Torch-free: the CLI calls :func:`configure_threads` before any command imports torch.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import MutableMapping

from pipelines.errors import MaskxError

THREADS_ENV = "MASKX_THREADS"


@dataclass(frozen=True)
class ThreadPlan:
    threads: int  # compute (intra-op) threads of this process
    source: str  # MASKX_THREADS | OMP_NUM_THREADS | cores
    cores: int  # the cores this process may run on
    local_processes: int  # processes torchrun starts on this machine (1 without torchrun)
    wait_policy: str  # OMP_WAIT_POLICY as it is now


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity: taskset, cgroups' cpusets), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def thread_plan(environ: MutableMapping[str, str] = os.environ, cores: int | None = None) -> ThreadPlan:
    """What :func:`configure_threads` chooses for ``environ`` on ``cores`` cores (default: this process's)."""
    cores = cores if cores is not None else available_cores()
    local = _positive(environ, "LOCAL_WORLD_SIZE", default=1)
    if environ.get(THREADS_ENV):
        threads, source = _positive(environ, THREADS_ENV), THREADS_ENV
    elif environ.get("OMP_NUM_THREADS"):
        threads, source = _positive(environ, "OMP_NUM_THREADS"), "OMP_NUM_THREADS"
    else:
        threads, source = max(1, cores // local), "cores"
    return ThreadPlan(threads, source, cores, local, environ.get("OMP_WAIT_POLICY") or "PASSIVE")


def configure_threads(environ: MutableMapping[str, str] = os.environ) -> ThreadPlan:
    """Apply the rule of the module docstring to ``environ`` (this process's by default): set
    ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` to the chosen count and ``OMP_WAIT_POLICY`` to
    ``PASSIVE`` unless set; returns the plan. For this process's own environment it only acts
    before torch is imported (torch reads it once, when it starts its thread pool): a process that
    has already imported torch (a Python session using the library) keeps its settings."""
    plan = thread_plan(environ)
    if environ is os.environ and "torch" in sys.modules:
        return plan
    environ["OMP_NUM_THREADS"] = environ["MKL_NUM_THREADS"] = str(plan.threads)
    environ.setdefault("OMP_WAIT_POLICY", plan.wait_policy)
    return plan


def _positive(environ: MutableMapping[str, str], name: str, default: int | None = None) -> int:
    value = environ.get(name, "")
    if not value and default is not None:
        return default
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise MaskxError(f"environment variable {name} must be a whole number >= 1, got {value!r}", key=name)
    return n

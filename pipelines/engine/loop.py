"""The training loop shared by every stage: SGD steps, logging, atomic checkpoints, resume, signals.

A stage supplies ``step(iteration) -> dict of losses``; the loop does backward, optimizer and
schedule steps, writes ``metrics.jsonl`` every ``log_every`` iterations, saves ``last.pth`` every
``checkpoint_every`` iterations, on SIGINT/SIGTERM, and at the end. A non-finite loss stops the run
with a clear message and leaves the last good checkpoint in place.
"""

from __future__ import annotations

import math
import random
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from pipelines.config import SolverConfig
from pipelines.engine import distributed as dist
from pipelines.engine.checkpoint import load_checkpoint, save_checkpoint
from pipelines.engine.run_dir import MetricsLog
from pipelines.engine.solver import build_optimizer, build_scheduler
from pipelines.errors import MaskxError
from pipelines.progress import NULL_PROGRESS, Progress

LAST = "last.pth"


@dataclass
class TrainStats:
    iterations: int = 0
    start_iter: int = 0
    seconds: float = 0.0
    last_losses: dict[str, float] = field(default_factory=dict)
    mean_loss_last_window: float = float("nan")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def stop_on_signals() -> Iterator[dict]:
    """Turn SIGINT/SIGTERM into a flag the loop checks after the current step."""
    flag = {"stop": None}
    previous = {}

    def handler(signum, _frame):
        flag["stop"] = signal.Signals(signum).name

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not in the main thread
            pass
    try:
        yield flag
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


class Trainer:
    """Owns optimizer + schedule for ``model`` and runs ``step`` for each iteration."""

    def __init__(
        self,
        model: nn.Module,
        cfg: SolverConfig,
        run_dir: str | Path,
        kind: str,
        extra: dict | None = None,
        progress: Progress = NULL_PROGRESS,
        description: str = "training",
        params=None,
    ):
        self.model = model
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.kind = kind
        self.extra = extra or {}
        self.progress = progress
        self.description = description
        self.optimizer = build_optimizer(model.parameters() if params is None else params, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.start_iter = 0
        self.log = MetricsLog(self.run_dir, enabled=dist.is_main())

    # -- checkpoints --------------------------------------------------------------------------
    def state(self, iteration: int) -> dict:
        return {
            "model": dist.unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "iteration": iteration,
            "rng": rng_state(),
            **self.extra,
        }

    def save(self, iteration: int, name: str = LAST) -> None:
        if dist.is_main():
            save_checkpoint(self.run_dir / name, self.kind, **self.state(iteration))
        dist.barrier()

    def resume(self) -> bool:
        """Load ``last.pth`` of the run folder if there is one; return whether it did."""
        path = self.run_dir / LAST
        if not path.is_file():
            return False
        ckpt = load_checkpoint(path, self.kind)
        dist.unwrap(self.model).load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        self.start_iter = int(ckpt["iteration"])
        return True

    # -- loop --------------------------------------------------------------------------------
    def run(self, step: Callable[[int], dict[str, torch.Tensor]]) -> TrainStats:
        cfg = self.cfg
        stats = TrainStats(start_iter=self.start_iter)
        task = self.progress.task(self.description, cfg.iterations)
        task.advance(self.start_iter)
        window: list[float] = []
        t0 = time.perf_counter()
        self.model.train()
        with stop_on_signals() as flag:
            it = self.start_iter
            for it in range(self.start_iter, cfg.iterations):
                losses = step(it)
                loss = sum(losses.values())
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise MaskxError(
                        f"loss became non-finite ({value}) at iteration {it}; stopped, the last good checkpoint "
                        f"({LAST}) is kept — lower the learning rate or check the data",
                        self.run_dir,
                    )
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.clip_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                window.append(value)
                window = window[-cfg.log_every :]
                stats.last_losses = {k: float(v.detach()) for k, v in losses.items()}
                task.advance(1, loss=sum(window) / len(window))
                if (it + 1) % cfg.log_every == 0 or it + 1 == cfg.iterations:
                    reduced = dist.mean_dict(stats.last_losses)
                    self.log.write(iteration=it + 1, lr=self.optimizer.param_groups[0]["lr"], loss=sum(reduced.values()), **reduced)
                if flag["stop"]:
                    self.save(it + 1)
                    raise MaskxError(
                        f"stopped by {flag['stop']} at iteration {it + 1}; checkpoint saved — rerun with --resume to continue",
                        self.run_dir,
                    )
                if cfg.checkpoint_every and (it + 1) % cfg.checkpoint_every == 0 and it + 1 < cfg.iterations:
                    self.save(it + 1)
            task.close()
        stats.iterations = cfg.iterations
        stats.seconds = time.perf_counter() - t0
        stats.mean_loss_last_window = sum(window) / len(window) if window else float("nan")
        return stats

"""The training loop shared by every stage: SGD steps, logging, atomic checkpoints, resume, signals.

A stage supplies ``step(iteration) -> dict of losses`` (:func:`train_on_images` is the step of the
image-level stages, ``detect-train`` and end-to-end ``train``); the loop does backward, optimizer and
schedule steps, writes ``metrics.jsonl`` and TensorBoard scalars (``tb/``) every ``log_every``
iterations, saves ``last.pth`` every ``checkpoint_every`` iterations and on SIGINT/SIGTERM. A
non-finite loss stops the run with a clear message and leaves the last good checkpoint in place.

Resuming restores model, optimizer, schedule, iteration and every process's random state, so that
(with the deterministic data order of :class:`pipelines.engine.sampler.IterationBatches`) an
interrupted and resumed run reaches the same weights as an uninterrupted one. Under ``torchrun``
the stop signal and the non-finite check are agreed by all processes each iteration (one small
all-reduce), so that every process stops at the same iteration and none waits forever.
"""

from __future__ import annotations

import json
import math
import random
import signal
import threading
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from pipelines.config import SolverConfig
from pipelines.data.coco import collate
from pipelines.engine import distributed as dist
from pipelines.checkpoint import load_state, save_checkpoint
from pipelines.engine.device import autocast
from pipelines.engine.run_dir import LAST, TENSORBOARD, MetricsLog, read_training_state
from pipelines.engine.sampler import IterationBatches
from pipelines.engine.solver import build_optimizer, build_scheduler
from pipelines.errors import MaskxError
from pipelines.io import atomic_path, os_error_reason
from pipelines.progress import NULL_PROGRESS, Progress



@dataclass
class TrainStats:
    iterations: int = 0
    start_iter: int = 0
    seconds: float = 0.0
    last_losses: dict[str, float] = field(default_factory=dict)
    mean_loss_last_window: float = float("nan")  # the mean total loss of the last ``loss_window`` iterations
    loss_window: int = 0  # min(log_every, iterations run in this attempt)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@dataclass(frozen=True)
class StageProcess:
    """This process's part in a training stage (see :func:`stage_process`)."""

    device: torch.device  # cpu, cuda, or cuda:LOCAL_RANK under torchrun
    progress: Progress  # the caller's on rank 0, NULL_PROGRESS on the others: one set of progress bars


@contextmanager
def stage_process(solver: SolverConfig, progress: Progress = NULL_PROGRESS) -> Iterator[StageProcess]:
    """The process setup of every training stage (``detect-train``, ``mask-train``, ``train``), in one place.

    Joins ``torchrun``'s process group (when launched by it) and checks that ``solver.batch_size``
    splits over the processes; seeds every generator with ``solver.seed + rank``; gives rank 0 the
    progress bars; and runs the stage's block under :func:`pipelines.engine.distributed.peers_watched`,
    so that a process that fails ends the others with one error line each. Whatever rank 0 alone
    writes (run folder, checkpoints, logs, caches) goes through
    :func:`pipelines.engine.distributed.main_first`, which tells the others whether it succeeded.
    """
    device = dist.setup(solver.device, solver.batch_size)
    seed_everything(solver.seed + dist.rank())
    with dist.peers_watched():
        yield StageProcess(device, progress if dist.is_main() else NULL_PROGRESS)


def rng_state() -> dict:
    """Every random generator's state as plain data (tensors, numbers, lists): loadable weights-only.

    ``torch``: uint8 tensor; ``numpy``: MT19937 ``key`` int64[624] + ``pos``, ``has_gauss``,
    ``cached_gaussian``; ``python``: ``version``, ``internal`` (625 ints), ``gauss_next``;
    ``cuda``: one uint8 tensor per GPU, if there are GPUs.
    """
    name, key, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"bit_generator": str(name), "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state` (also the tuple form that checkpoints of earlier versions hold)."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    if isinstance(n, dict):
        n = (n["bit_generator"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    np.random.set_state(n)
    p = state["python"]
    if isinstance(p, dict):
        p = (p["version"], tuple(p["internal"]), p["gauss_next"])
    random.setstate(p)
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
    ):
        self.model = model
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.kind = kind
        self.extra = extra or {}
        self.progress = progress
        self.description = description
        self.optimizer = build_optimizer(model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.start_iter = 0
        self.log = MetricsLog(self.run_dir, enabled=dist.is_main())
        # fp16 autocast on GPU needs loss scaling; bf16 and fp32 do not (a no-op scaler then)
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and cfg.amp == "fp16")

    # -- checkpoints --------------------------------------------------------------------------
    def state(self, iteration: int) -> dict:
        """The checkpoint payload; a collective call under ``torchrun`` (gathers every rank's RNG)."""
        rng_ranks = dist.gather_objects(rng_state())
        return {
            "model": dist.unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "iteration": iteration,
            "rng": rng_ranks[0],
            "rng_ranks": rng_ranks,
            "world_size": dist.world_size(),
            **self.extra,
        }

    def save(self, iteration: int, name: str = LAST) -> None:
        """Write ``name`` atomically on rank 0; every rank raises if that write failed."""
        payload = self.state(iteration)
        dist.main_first(lambda: save_checkpoint(self.run_dir / name, self.kind, **payload), others=False)

    def resume(self) -> bool:
        """Load ``last.pth`` of the run folder if there is one (:func:`~pipelines.engine.run_dir.read_training_state`);
        return whether it did."""
        state = read_training_state(self.run_dir, self.kind)
        if state is None:
            return False
        path = state.checkpoint
        load_state(dist.unwrap(self.model), state.model, path)
        load_state(self.optimizer, state.optimizer, path, what="the optimizer state")
        load_state(self.scheduler, state.scheduler, path, what="the schedule state")
        if state.scaler is not None:
            load_state(self.scaler, state.scaler, path, what="the loss-scaler state")
        # the same world size: every process continues its own random stream; otherwise rank 0's
        set_rng_state(state.rng(dist.rank(), dist.world_size()))
        self.start_iter = state.iteration
        dist.main_first(lambda: self._truncate_metrics(self.start_iter), others=False)
        return True

    def _truncate_metrics(self, iteration: int) -> None:
        """Drop ``metrics.jsonl`` lines logged after ``iteration`` (they are recomputed on resume)."""
        path = self.log.path
        if not path.is_file():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                if int(json.loads(line).get("iteration", 0)) <= iteration:
                    kept.append(line)
            except (ValueError, AttributeError):
                pass  # a line cut short by a crash
        with atomic_path(path) as tmp:
            tmp.write_text("".join(k + "\n" for k in kept))

    @contextmanager
    def _tensorboard(self):
        """A SummaryWriter on ``run_dir/tb`` on rank 0 (None elsewhere); events after a resume point (steps
        above the checkpoint's iteration, as in ``metrics.jsonl``) are purged.

        A failed write of the events (a full disk) is one MaskxError naming ``tb/``: the writer's
        background thread hands its OSError to this thread, and is kept from printing it too.
        Opening and closing are rank 0's writes (:func:`~pipelines.engine.distributed.main_first`).
        """
        path = self.run_dir / TENSORBOARD
        previous_hook = threading.excepthook

        def hook(args) -> None:
            if not (type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(args.exc_value, OSError)):
                previous_hook(args)

        threading.excepthook = hook
        try:
            writer = dist.main_first(lambda: _open_tensorboard(path, self.start_iter), others=False)
            try:
                yield writer
            except BaseException:
                if writer is not None:
                    with suppress(OSError):  # the error that stopped the run is the one to report
                        writer.close()
                raise
            dist.main_first(lambda: _close_tensorboard(writer, path), others=False)
        finally:
            threading.excepthook = previous_hook

    def _log(self, tb, iteration: int, **scalars: float) -> None:
        """``metrics.jsonl`` and TensorBoard: rank 0's writes (every rank calls this, and raises if they failed)."""
        def write() -> None:
            self.log.write(iteration=iteration, **scalars)
            try:
                for key, value in scalars.items():
                    tb.add_scalar(key, value, iteration)
                tb.flush()
            except OSError as exc:
                raise MaskxError(f"cannot write TensorBoard logs: {os_error_reason(exc)}", self.run_dir / TENSORBOARD) from None

        dist.main_first(write, others=False)

    # -- loop --------------------------------------------------------------------------------
    def run(self, step: Callable[[int], dict[str, torch.Tensor]]) -> TrainStats:
        cfg = self.cfg
        stats = TrainStats(start_iter=self.start_iter)
        task = self.progress.task(self.description, cfg.iterations)
        task.advance(self.start_iter)
        window: list[float] = []
        t0 = time.perf_counter()
        self.model.train()
        with stop_on_signals() as flag, self._tensorboard() as tb:
            it = self.start_iter
            for it in range(self.start_iter, cfg.iterations):
                losses = step(it)
                loss = sum(losses.values())
                value = float(loss.detach())
                # one all-reduce agrees on both: any rank non-finite, any rank signalled
                bad, stop = dist.all_reduce_sum([0.0 if math.isfinite(value) else 1.0, 1.0 if flag["stop"] else 0.0])
                if bad:
                    kept = f"the last good checkpoint ({LAST}) is kept" if (self.run_dir / LAST).is_file() else \
                        "no checkpoint had been written yet"
                    raise MaskxError(
                        f"loss became non-finite ({value if not math.isfinite(value) else 'on another process'}) at "
                        f"iteration {it}; stopped, {kept} — lower the learning rate or check the data",
                        self.run_dir,
                    )
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                if cfg.clip_grad_norm > 0:
                    self.scaler.unscale_(self.optimizer)
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad_norm)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.scheduler.step()
                window.append(value)
                window = window[-cfg.log_every :]
                stats.last_losses = {k: float(v.detach()) for k, v in losses.items()}
                task.advance(1, loss=sum(window) / len(window))
                if (it + 1) % cfg.log_every == 0 or it + 1 == cfg.iterations:
                    reduced = dist.mean_dict(stats.last_losses)
                    self._log(tb, it + 1, lr=self.optimizer.param_groups[0]["lr"], loss=sum(reduced.values()), **reduced)
                if stop:
                    self.save(it + 1)
                    raise MaskxError(
                        f"stopped by {flag['stop'] or 'a signal to another process'} at iteration {it + 1}; checkpoint "
                        f"saved — to continue, rerun with resume",
                        self.run_dir, key="resume",
                    )
                if cfg.checkpoint_every and (it + 1) % cfg.checkpoint_every == 0 and it + 1 < cfg.iterations:
                    self.save(it + 1)
            task.close()
        stats.iterations = cfg.iterations
        stats.seconds = time.perf_counter() - t0
        stats.mean_loss_last_window = sum(window) / len(window) if window else float("nan")
        stats.loss_window = len(window)
        return stats


def _open_tensorboard(path: Path, start_iter: int):
    from torch.utils.tensorboard import SummaryWriter

    try:
        # the checkpoint's own step was logged before it was saved: purge only the steps after it
        return SummaryWriter(str(path), purge_step=start_iter + 1 if start_iter else None)
    except OSError as exc:
        raise MaskxError(f"cannot write TensorBoard logs: {os_error_reason(exc)}", path) from None


def _close_tensorboard(writer, path: Path) -> None:
    try:
        writer.close()
    except OSError as exc:
        raise MaskxError(f"cannot write TensorBoard logs: {os_error_reason(exc)}", path) from None


def train_on_images(model: torch.nn.Module, dataset: torch.utils.data.Dataset, solver: SolverConfig, out: Path, kind: str, extra: dict,
                    device: torch.device, progress: Progress = NULL_PROGRESS, resume: bool = False, description: str = "train",
                    target_keys: tuple[str, ...] = ("boxes", "labels")) -> TrainStats:
    """Train a torchvision detection ``model`` (``model(images, targets) -> dict of losses``) on ``dataset``
    (a :class:`pipelines.data.coco.CocoDataset`, or its :class:`pipelines.data.transforms.FlippedCopies` with ``data.hflip``).

    ``device`` is :func:`pipelines.engine.distributed.setup`'s. The loop of the image-level stages (``detect-train``, end-to-end ``train``): DDP under
    ``torchrun``, a :class:`Trainer` (checkpoints of kind ``kind`` with ``extra``), and the
    deterministic :class:`IterationBatches` order. ``target_keys`` are the target fields moved to the
    device (``boxes`` float32[N, 4], ``labels`` int64[N]; ``masks`` uint8[N, H, W], ``has_mask``
    bool[N] for a mask model). ``model`` is trained in place.
    """
    wrapped = dist.wrap(model, device)
    trainer = Trainer(wrapped, solver, out, kind, extra=extra, progress=progress, description=description)
    if resume:
        trainer.resume()
    batches = IterationBatches(len(dataset), solver.batch_size, solver.iterations, solver.seed,
                               trainer.start_iter, dist.rank(), dist.world_size())
    # the loader's own generator: creating its iterator must not draw from the global RNG, which the
    # checkpoint restores (RPN / box sampling use it), or a resumed run would drift from an uninterrupted one
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=solver.workers,
                                         generator=torch.Generator().manual_seed(solver.seed))
    it_loader = iter(loader)

    def step(_iteration: int) -> dict[str, torch.Tensor]:
        images, targets = next(it_loader)
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{k: t[k].to(device) for k in target_keys} for t in targets]
        with autocast(device, solver.amp):
            return wrapped(images, targets)

    return trainer.run(step)

"""Stage 1: Faster R-CNN trained on the boxes of every class (A and B)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipelines.config import DetectTrainConfig, SolverConfig, to_dict
from pipelines.data.coco import CocoDataset, collate
from pipelines.engine import distributed as dist
from pipelines.engine.checkpoint import save_checkpoint
from pipelines.engine.device import autocast, resolve_device
from pipelines.engine.loop import Trainer, TrainStats, seed_everything
from pipelines.engine.run_dir import prepare_run_dir, training_run, update_manifest
from pipelines.engine.sampler import IterationBatches
from pipelines.errors import MaskxError
from pipelines.modeling.detector import build_detector
from pipelines.progress import NULL_PROGRESS, Progress
from pipelines.stages.common import DETECTOR_CKPT, load_split


@dataclass
class DetectTrainResult:
    run_dir: Path
    checkpoint: Path
    num_classes: int
    train_images: int
    degenerate_boxes: int
    stats: TrainStats
    data_warnings: list[str]  # what loading the annotations skipped, one line each (with the first annotation ids)


def detect_train(cfg: DetectTrainConfig, out: str | Path, progress: Progress = NULL_PROGRESS, resume: bool = False) -> DetectTrainResult:
    """Train the detector on ``cfg.data.train_json``; write ``out/model_final.pth`` and the run record."""
    out = Path(out)
    if (out / DETECTOR_CKPT).exists() and not resume:
        raise MaskxError(f"already holds a finished detector ({DETECTOR_CKPT}); choose another --out", out)
    with training_run(out, resume, (DETECTOR_CKPT,)):
        return _detect_train(cfg, out, progress, resume)


def _detect_train(cfg: DetectTrainConfig, out: Path, progress: Progress, resume: bool) -> DetectTrainResult:
    device = resolve_device(cfg.solver.device)
    dist.init_from_env(device)
    device = dist.local_device(device)  # cuda:LOCAL_RANK under torchrun
    seed_everything(cfg.solver.seed + dist.rank())
    if not dist.is_main():
        progress = NULL_PROGRESS  # one set of progress bars, from rank 0

    data, report = load_split(cfg.data.train_json, "train")
    dataset = CocoDataset(data, cfg.data.train_images, with_masks=False, max_images=cfg.data.max_train_images, drop_empty=True)
    if len(dataset) == 0:
        raise MaskxError("the training split has no image with a box annotation", cfg.data.train_json)
    categories = data["categories"]
    # built (ImageNet weights read or fetched) before the run folder is made: a failure leaves nothing behind
    model = build_detector(cfg.detector, len(categories), progress=progress).to(device)
    dist.main_first(lambda: prepare_run_dir(out, "detect-train", to_dict(cfg), {"train_json": cfg.data.train_json}), others=False)
    stats = train_on_images(model, dataset, cfg.solver, out, "detector-train", {"config": to_dict(cfg), "categories": categories},
                            device, progress, resume, "detect-train")
    final = out / DETECTOR_CKPT

    def finish() -> None:
        save_checkpoint(final, "detector", model=model.state_dict(), config=to_dict(cfg), categories=categories,
                        iteration=cfg.solver.iterations)
        update_manifest(out, status="finished", train_images=len(dataset), degenerate_boxes_skipped=report.degenerate_boxes,
                        seconds=round(stats.seconds, 1), world_size=dist.world_size(),
                        effective_lr=cfg.solver.effective_lr(), images_per_process=cfg.solver.batch_size // dist.world_size())

    dist.main_first(finish, others=False)  # rank 0 writes; the others wait for it
    return DetectTrainResult(out, final, len(categories), len(dataset), report.degenerate_boxes, stats,
                             report.warnings(cfg.data.train_json))


def train_on_images(model: torch.nn.Module, dataset: CocoDataset, solver: SolverConfig, out: Path, kind: str, extra: dict,
                    device: torch.device, progress: Progress = NULL_PROGRESS, resume: bool = False, description: str = "train",
                    target_keys: tuple[str, ...] = ("boxes", "labels")) -> TrainStats:
    """Train a torchvision detection ``model`` (``model(images, targets) -> dict of losses``) on ``dataset``.

    The shared loop of the image-level stages (``detect-train``, end-to-end ``train``): DDP under
    ``torchrun``, the engine's :class:`Trainer` (checkpoints of kind ``kind`` with ``extra``), and the
    deterministic :class:`IterationBatches` order. ``target_keys`` are the target fields moved to the
    device (``boxes`` float32[N, 4], ``labels`` int64[N]; ``masks`` uint8[N, H, W], ``has_mask``
    bool[N] for a mask model). ``model`` is trained in place.
    """
    if solver.batch_size % dist.world_size():
        raise MaskxError(f"solver.batch_size ({solver.batch_size}) must be divisible by the number of processes ({dist.world_size()})")
    wrapped = model
    if dist.is_dist():
        wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
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

"""Stage 1: Faster R-CNN trained on the boxes of every class (A and B)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipelines.config import DetectTrainConfig, to_dict
from pipelines.data.coco import CocoDataset, collate
from pipelines.engine import distributed as dist
from pipelines.engine.checkpoint import save_checkpoint
from pipelines.engine.device import autocast, resolve_device
from pipelines.engine.loop import Trainer, TrainStats, seed_everything
from pipelines.engine.run_dir import prepare_run_dir, update_manifest
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


def detect_train(cfg: DetectTrainConfig, out: str | Path, progress: Progress = NULL_PROGRESS, resume: bool = False) -> DetectTrainResult:
    """Train the detector on ``cfg.data.train_json``; write ``out/model_final.pth`` and the run record."""
    out = Path(out)
    if (out / DETECTOR_CKPT).exists() and not resume:
        raise MaskxError(f"already holds a finished detector ({DETECTOR_CKPT}); choose another --out", out)
    device = dist.local_device(resolve_device(cfg.solver.device))
    dist.init_from_env(device)
    seed_everything(cfg.solver.seed + dist.rank())

    data, report = load_split(cfg.data.train_json, "train")
    dataset = CocoDataset(data, cfg.data.train_images, with_masks=False, max_images=cfg.data.max_train_images, drop_empty=True)
    if len(dataset) == 0:
        raise MaskxError("the training split has no image with a box annotation", cfg.data.train_json)
    categories = data["categories"]
    if dist.is_main():
        prepare_run_dir(out, "detect-train", to_dict(cfg), {"train_json": cfg.data.train_json})
    dist.barrier()

    model = build_detector(cfg.detector, len(categories)).to(device)
    if dist.is_dist():
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    trainer = Trainer(
        model, cfg.solver, out, "detector-train",
        extra={"config": to_dict(cfg), "categories": categories},
        progress=progress, description="detect-train",
    )
    if resume:
        trainer.resume()
    if cfg.solver.batch_size % dist.world_size():
        raise MaskxError(f"solver.batch_size ({cfg.solver.batch_size}) must be divisible by the number of processes ({dist.world_size()})")
    batches = IterationBatches(len(dataset), cfg.solver.batch_size, cfg.solver.iterations, cfg.solver.seed,
                               trainer.start_iter, dist.rank(), dist.world_size())
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=cfg.solver.workers)
    it_loader = iter(loader)

    def step(_iteration: int) -> dict[str, torch.Tensor]:
        images, targets = next(it_loader)
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for t in targets]
        with autocast(device, cfg.solver.amp):
            return model(images, targets)

    stats = trainer.run(step)
    final = out / DETECTOR_CKPT
    if dist.is_main():
        save_checkpoint(final, "detector", model=dist.unwrap(model).state_dict(), config=to_dict(cfg), categories=categories,
                        iteration=cfg.solver.iterations)
        update_manifest(out, train_images=len(dataset), degenerate_boxes_skipped=report.degenerate_boxes,
                        seconds=round(stats.seconds, 1), world_size=dist.world_size())
    dist.barrier()
    return DetectTrainResult(out, final, len(categories), len(dataset), report.degenerate_boxes, stats)

"""Stage 1: Faster R-CNN trained on the boxes of every class (A and B)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipelines.config import DetectTrainConfig, to_dict
from pipelines.data.coco import CocoDataset, load_split
from pipelines.data.transforms import training_images
from pipelines.engine import distributed as dist
from pipelines.engine.loop import TrainStats, stage_process, train_on_images
from pipelines.engine.run_dir import (DETECTOR_CKPT, check_not_finished, prepare_run_dir, save_detector, training_run,
                                      update_manifest, write_recipe)
from pipelines.engine.solver import check_solver
from pipelines.errors import MaskxError
from pipelines.modeling.detector import build_detector
from pipelines.progress import NULL_PROGRESS, Progress


@dataclass
class DetectTrainResult:
    run_dir: Path
    checkpoint: Path
    num_classes: int
    train_images: int
    degenerate_boxes: int
    stats: TrainStats
    data_warnings: list[str]  # what loading the annotations skipped, one line each (with the first annotation ids)


def start_warnings(cfg: DetectTrainConfig, recipe: str | Path | None) -> list[str]:
    """What to tell the user before stage 1 starts, one line each: a detector trained without a recipe
    and without ``detector.pretrained_backbone`` starts from a randomly initialised ResNet (the shipped
    recipes choose on purpose: ImageNet weights for COCO, VG and LVIS, none for the synthetic world)."""
    if recipe or cfg.detector.pretrained_backbone:
        return []
    return [f"no recipe and no detector.pretrained_backbone: the {cfg.detector.backbone} backbone starts from random "
            "weights, which needs far longer training; set detector.pretrained_backbone=IMAGENET1K_V1 (or a weights "
            "file), or start from a recipe"]


def detect_train(cfg: DetectTrainConfig, out: str | Path, progress: Progress = NULL_PROGRESS, resume: bool = False,
                 recipe: str | Path | None = None) -> DetectTrainResult:
    """Train the detector on ``cfg.data.train_json``; write ``out/model_final.pth`` and the run record.

    ``recipe`` (the recipe ``cfg`` was loaded from, optional) is kept as ``out/recipe.yaml``: stage 2
    and evaluation on this detector read it by default.
    """
    check_solver(cfg.solver)
    out = Path(out)
    if not resume:
        check_not_finished(out, DETECTOR_CKPT, "detector")
    with training_run(out, resume, (DETECTOR_CKPT,)), stage_process(cfg.solver, progress) as proc:
        return _detect_train(cfg, out, proc.progress, resume, recipe, proc.device)


def _detect_train(cfg: DetectTrainConfig, out: Path, progress: Progress, resume: bool, recipe: str | Path | None,
                  device: torch.device) -> DetectTrainResult:
    data, report = load_split(cfg.data.train_json, "train")
    dataset = CocoDataset(data, cfg.data.train_images, with_masks=False, max_images=cfg.data.max_train_images, drop_empty=True)
    if len(dataset) == 0:
        raise MaskxError("the training split has no image with a box annotation", cfg.data.train_json)
    categories = data["categories"]
    # built (ImageNet weights read or fetched) before the run folder is made: a failure leaves nothing behind
    model = build_detector(cfg.detector, len(categories), progress=progress).to(device)

    def start() -> None:
        prepare_run_dir(out, "detect-train", to_dict(cfg), {"train_json": cfg.data.train_json})
        if recipe:
            write_recipe(out, recipe)

    dist.main_first(start, others=False)
    stats = train_on_images(model, training_images(dataset, cfg.data.hflip), cfg.solver, out, "detector-train", {"config": to_dict(cfg), "categories": categories},
                            device, progress, resume, "detect-train")
    final = out / DETECTOR_CKPT

    def finish() -> None:
        save_detector(final, model.state_dict(), to_dict(cfg), categories, cfg.solver.iterations)
        update_manifest(out, status="finished", train_images=len(dataset), degenerate_boxes_skipped=report.degenerate_boxes,
                        seconds=round(stats.seconds, 1), world_size=dist.world_size(),
                        effective_lr=cfg.solver.effective_lr(), images_per_process=cfg.solver.batch_size // dist.world_size())

    dist.main_first(finish, others=False)  # rank 0 writes; the others wait for it
    return DetectTrainResult(out, final, len(categories), len(dataset), report.degenerate_boxes, stats,
                             report.warnings(cfg.data.train_json))

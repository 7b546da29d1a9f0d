"""Stage 2: train only the mask side (T + FCN head + MLP branch) against the frozen detector.

By default the frozen detector's state is read from the feature cache (built on first use), so a
stage-2 experiment never runs the detector again; a cache larger than ``cache.ram_budget_gb``
streams from disk. ``cache.enabled=false`` runs the frozen detector on every step instead (same
RoIs and targets; with ``cache.proposals_per_instance=0`` and a float32 cache, identical batches).
Either way the RoIs that get a mask loss are the set-A rule's (:func:`pipelines.data.splits.takes_mask_loss`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from pipelines.config import MaskTrainConfig, to_dict
from pipelines.data.coco import CocoDataset, check_same_categories, load_split
from pipelines.data.splits import label_table, training_sets
from pipelines.data.transforms import FlippedCopies
from pipelines.engine import distributed as dist
from pipelines.engine.device import autocast
from pipelines.engine.loop import Trainer, TrainStats, rng_state, set_rng_state, stage_process
from pipelines.engine.run_dir import (MASK_CKPT, DetectorRun, check_embeddings_fit, check_not_finished, load_detector_run,
                                      prepare_run_dir, save_mask, training_run, update_manifest)
from pipelines.engine.solver import check_solver
from pipelines.errors import MaskxError
from pipelines.modeling.embeddings import class_embedding_table, read_embeddings
from pipelines.modeling.mask_heads import MaskSide, trains_every_class
from pipelines.modeling.maskx_rcnn import build_mask_roi_pool, build_mask_side, check_head, mask_loss
from pipelines.progress import NULL_PROGRESS, Progress
from pipelines.rois.ensure import check_cache_config, ensure_cache
from pipelines.rois.sources import DetectorRoIs, cache_source
from pipelines.rois.streaming import StreamingRoIs


@dataclass
class MaskTrainResult:
    run_dir: Path
    checkpoint: Path
    head: str
    set_a: list[int]
    train_rois: int
    cache_path: Path | None
    cache_built: bool
    stats: TrainStats
    missing_glove: list[str]
    categories: list[dict]
    data_warnings: list[str]  # what loading skipped (degenerate boxes) and the file lacks (set-A masks), one line each


def check_mask_train_config(cfg: MaskTrainConfig) -> None:
    """Reject impossible combinations before anything is loaded or trained."""
    check_head(cfg.head)
    check_cache_config(cfg.cache)
    check_solver(cfg.solver)
    if not cfg.cache.enabled and cfg.cache.sampling != "instance":
        raise MaskxError("cache.sampling=detectron needs the feature cache (cache.enabled=true); training through the "
                         "frozen detector samples instances (cache.sampling=instance)", key="cache.sampling")


def _training_images(data: dict, cfg: MaskTrainConfig, train_classes: list[int]) -> CocoDataset:
    """The training images with a mask of a mask class (what the no-cache route reads)."""
    dataset = CocoDataset(data, cfg.data.train_images, with_masks=True, mask_category_ids=train_classes,
                          max_images=cfg.data.max_train_images)
    dataset.images = [im for im in dataset.images if any(dataset.has_mask(a) for a in dataset.anns_by_image.get(im["id"], []))]
    if not dataset.images:
        raise MaskxError(f"no training image has a mask of the set-A classes ('{cfg.data.mask_classes}')", cfg.data.train_json)
    return dataset


def mask_train(cfg: MaskTrainConfig, detector: str | Path, embeddings: str | Path, out: str | Path,
               progress: Progress = NULL_PROGRESS, resume: bool = False, mask_side: MaskSide | None = None) -> MaskTrainResult:
    """Train the mask side of ``cfg.head.head`` on set-A masks (all masks for the oracle).

    Each data file and image folder ``cfg.data`` leaves empty is the detector run's (set A and flips
    are the stage-2 run's own). ``mask_side``
    (optional) is trained instead of a fresh one built from ``cfg.head`` -- it must fit ``cfg.head``
    (e.g. a side with frozen parts, for a probe); it is built on the caller's seed.
    """
    check_mask_train_config(cfg)
    out = Path(out)
    if not resume:
        check_not_finished(out, MASK_CKPT, "mask head")
    with training_run(out, resume, (MASK_CKPT,)), stage_process(cfg.solver, progress) as proc:
        return _mask_train(cfg, detector, embeddings, out, proc.progress, resume, mask_side, proc.device)


def _mask_train(cfg: MaskTrainConfig, detector: str | Path, embeddings: str | Path, out: Path, progress: Progress,
                resume: bool, mask_side: MaskSide | None, device: torch.device) -> MaskTrainResult:
    det = load_detector_run(detector)
    emb = read_embeddings(embeddings)
    check_embeddings_fit(emb, det)
    cfg = dataclasses.replace(cfg, data=det.data_config(cfg.data))
    data, report = load_split(cfg.data.train_json, "train")
    check_same_categories(det.categories, data["categories"], "the detector's classes", cfg.data.train_json)
    categories = det.categories
    sets = training_sets(cfg.data.mask_classes, trains_every_class(cfg.head.head), categories, data, cfg.data.train_json)
    set_a, train_classes = sets.set_a, sets.train_classes

    w_det, missing = class_embedding_table(cfg.head, emb.w_cls, emb.w_box, emb.class_names, cfg.solver.seed)
    fpn_channels = det.model.backbone.out_channels
    if mask_side is None:
        mask_side = build_mask_side(cfg.head, len(categories), fpn_channels, w_det)
    mask_side.to(device)
    det.model.to(device)
    dataset = _training_images(data, cfg, train_classes)
    dist.main_first(lambda: prepare_run_dir(out, "mask-train", to_dict(cfg),
                                            {"detector": det.checkpoint, "embeddings": embeddings, "train_json": cfg.data.train_json},
                                            extra={"set_a": set_a, "train_classes": len(train_classes),
                                                   "set_a_unmasked_annotations": len(sets.unmasked)}), others=False)
    source, prepared = _roi_source(cfg, det, data, dataset, train_classes, progress)

    wrapped = dist.wrap(mask_side, device)
    trainer = Trainer(wrapped, cfg.solver, out, "mask-train",
                      extra={"config": to_dict(cfg), "categories": categories, "set_a": set_a},
                      progress=progress, description=f"mask-train [{cfg.head.head}{'+mlp' if cfg.head.mlp else ''}]")
    if resume:
        trainer.resume()

    def step(iteration: int) -> dict[str, torch.Tensor]:
        rois = source.batch(iteration)  # this process's share of the global batch
        with autocast(device, cfg.solver.amp):
            logits = wrapped(rois.features_on(device), rois.labels.to(device))
            return {"loss_mask": mask_loss(logits, rois.masks.to(device))}

    try:
        stats = trainer.run(step)
    finally:
        source.close()
        if prepared is not None:
            prepared.cache.close()
    final = out / MASK_CKPT
    cache_path = prepared.path if prepared is not None else None

    def finish() -> None:
        save_mask(final, mask_side, to_dict(cfg), cfg.head, categories, set_a, det.sha256, fpn_channels, cfg.solver.iterations)
        update_manifest(out, status="finished", train_rois=source.rois, cache=str(cache_path) if cache_path else None,
                        cache_built=bool(prepared and prepared.built), seconds=round(stats.seconds, 1), missing_glove=missing,
                        world_size=dist.world_size(), effective_lr=cfg.solver.effective_lr())

    dist.main_first(finish, others=False)  # rank 0 writes; the others wait for it
    return MaskTrainResult(out, final, cfg.head.head, set_a, source.rois, cache_path, bool(prepared and prepared.built), stats, missing,
                           categories, report.warnings(cfg.data.train_json) + sets.warnings)


def _roi_source(cfg: MaskTrainConfig, det: DetectorRun, data: dict, dataset: CocoDataset, train_classes: list[int],
                progress: Progress):
    """(RoI source of the training batches, the opened cache or None): the cache's RoIs of the mask
    classes ``train_classes``, or the frozen detector's on every step (``cache.enabled=false``); with
    ``data.hflip``, of the images and their flipped copies."""
    batch_args = (cfg.solver.batch_size, cfg.solver.iterations, cfg.solver.seed)
    mask_labels = label_table(train_classes, det.categories)
    if not cfg.cache.enabled:
        source = DetectorRoIs(det.model, build_mask_roi_pool(cfg.head.roi_size), FlippedCopies(dataset) if cfg.data.hflip else dataset,
                              cfg.cache, *batch_args, dist.rank(), dist.world_size(), mask_labels=mask_labels)
        return source, None
    # the cache of the mask classes (or one of more classes with the same settings); rank 0 builds
    # (or finds) it, the other ranks then open the finished file. Building it must not shift the
    # random stream (dropout of T): a run gives the same weights whether the cache was built now or found.
    before = rng_state()
    prepared = dist.main_first(lambda: ensure_cache(det, data, cfg.data, cfg.cache, cfg.head.roi_size, progress, train_classes,
                                                     visits=cfg.solver.iterations * cfg.solver.batch_size))
    set_rng_state(before)
    source = cache_source(prepared.cache, mask_labels, *batch_args, cfg.cache, dist.rank(), dist.world_size())
    if isinstance(source, StreamingRoIs):
        progress.log(f"feature cache: {source.rois} training RoIs over the RAM budget "
                     f"({cfg.cache.ram_budget_gb:g} GiB): streaming from {prepared.path}")
    return source, prepared

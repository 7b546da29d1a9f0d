"""Stage 2: train only the mask side (T + FCN head + MLP branch) against the frozen detector.

By default the frozen detector's state is read from the feature cache (built on first use), so a
stage-2 experiment never runs the detector again; a cache larger than ``cache.ram_budget_gb``
streams from disk. ``cache.enabled=false`` runs the frozen detector on every step instead (same
RoIs and targets; with ``cache.proposals_per_instance=0`` and a float32 cache, identical batches).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipelines.config import MaskTrainConfig, to_dict
from pipelines.data.coco import CocoDataset, check_same_categories
from pipelines.data.splits import resolve_split
from pipelines.engine import distributed as dist
from pipelines.engine.cache import DetectorRoIs, StreamingRoIs, cache_source
from pipelines.engine.checkpoint import save_checkpoint
from pipelines.engine.device import autocast, resolve_device
from pipelines.engine.loop import Trainer, TrainStats, rng_state, seed_everything, set_rng_state
from pipelines.engine.run_dir import prepare_run_dir, training_run, update_manifest
from pipelines.errors import MaskxError
from pipelines.modeling.embeddings import INPUTS, detector_embedding, glove_embedding, randn_embedding
from pipelines.modeling.mask_heads import FCNS
from pipelines.modeling.maskx_rcnn import build_mask_roi_pool, build_mask_side, mask_loss
from pipelines.progress import NULL_PROGRESS, Progress
from pipelines.stages.cache import check_cache_config, ensure_cache
from pipelines.stages.common import MASK_CKPT, DetectorRun, load_detector_run, load_split
from pipelines.stages.export_embeddings import Embeddings, check_embeddings_fit, read_embeddings


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


def check_head_config(cfg: MaskTrainConfig) -> None:
    """Reject impossible combinations before anything is loaded or trained."""
    h = cfg.head
    if h.head not in ("transfer", "agnostic", "oracle"):
        raise MaskxError(f"unknown --head '{h.head}' (expected transfer | agnostic | oracle)")
    if h.input not in INPUTS:
        raise MaskxError(f"unknown --input '{h.input}' (expected {' | '.join(INPUTS)})")
    if h.head == "transfer" and h.input == "glove" and not h.glove:
        raise MaskxError("--input glove needs a GloVe text file: pass --glove PATH")
    if h.transfer_layers not in (1, 2, 3):
        raise MaskxError(f"--transfer-layers must be 1, 2 or 3, got {h.transfer_layers}")
    if h.transfer_activation not in ("none", "relu", "leaky_relu"):
        raise MaskxError(f"unknown --transfer-activation '{h.transfer_activation}' (expected none | relu | leaky_relu)")
    if h.fcn not in FCNS:
        raise MaskxError(f"unknown head.fcn '{h.fcn}' (expected {' | '.join(FCNS)})")
    check_cache_config(cfg.cache)
    if cfg.solver.iterations < 1 or cfg.solver.batch_size < 1:
        raise MaskxError("solver.iterations and solver.batch_size must be positive")


def class_embedding_table(cfg: MaskTrainConfig, emb: Embeddings) -> tuple[torch.Tensor, list[str]]:
    """``w_det`` [K, E] for the chosen input of T, and the class names GloVe lacks."""
    h = cfg.head
    if h.input in ("cls", "box", "cls+box"):
        return detector_embedding(h.input, emb.w_cls, emb.w_box).float(), []
    if h.input == "randn":
        return randn_embedding(emb.num_classes, emb.w_cls.shape[1] * 5, cfg.solver.seed), []
    return glove_embedding(emb.class_names, h.glove)


def mask_train(cfg: MaskTrainConfig, detector: str | Path, embeddings: str | Path, out: str | Path,
               progress: Progress = NULL_PROGRESS, resume: bool = False) -> MaskTrainResult:
    """Train the mask side of ``cfg.head.head`` on set-A masks (all masks for the oracle)."""
    check_head_config(cfg)
    out = Path(out)
    if (out / MASK_CKPT).exists() and not resume:
        raise MaskxError(f"already holds a finished mask head ({MASK_CKPT}); choose another --out", out)
    with training_run(out, resume, (MASK_CKPT,)):
        return _mask_train(cfg, detector, embeddings, out, progress, resume)


def _mask_train(cfg: MaskTrainConfig, detector: str | Path, embeddings: str | Path, out: Path, progress: Progress,
                resume: bool) -> MaskTrainResult:
    det = load_detector_run(detector)
    emb = read_embeddings(embeddings)
    check_embeddings_fit(emb, det)
    data, _ = load_split(cfg.data.train_json, "train", require_masks=True)
    check_same_categories(det.categories, data["categories"], "the detector's classes", cfg.data.train_json)
    categories = det.categories
    set_a = resolve_split(cfg.data.mask_classes, categories)
    train_classes = [c["id"] for c in categories] if cfg.head.head == "oracle" else set_a
    device = resolve_device(cfg.solver.device)
    dist.init_from_env(device)
    device = dist.local_device(device)  # cuda:LOCAL_RANK under torchrun
    if cfg.solver.batch_size % dist.world_size():
        raise MaskxError(f"solver.batch_size ({cfg.solver.batch_size}) is the global batch and must be divisible by "
                         f"the number of processes ({dist.world_size()})")
    if not dist.is_main():
        progress = NULL_PROGRESS  # one set of progress bars, from rank 0
    seed_everything(cfg.solver.seed + dist.rank())

    w_det, missing = class_embedding_table(cfg, emb)
    fpn_channels = det.model.backbone.out_channels
    mask_side = build_mask_side(cfg.head, len(categories), fpn_channels, w_det if cfg.head.head == "transfer" else None)
    mask_side.to(device)
    roi_pool = build_mask_roi_pool(cfg.head.roi_size)
    det.model.to(device)

    dataset = CocoDataset(data, cfg.data.train_images, with_masks=True, mask_category_ids=train_classes,
                          max_images=cfg.data.max_train_images)
    dataset.images = [im for im in dataset.images
                      if any(a["category_id"] in dataset.mask_cats for a in dataset.anns_by_image.get(im["id"], []))]
    if not dataset.images:
        raise MaskxError(f"no training image has a mask of the set-A classes ({cfg.data.mask_classes})", cfg.data.train_json)

    dist.main_first(lambda: prepare_run_dir(out, "mask-train", to_dict(cfg),
                                            {"detector": det.checkpoint, "embeddings": embeddings, "train_json": cfg.data.train_json},
                                            extra={"set_a": set_a, "train_classes": len(train_classes)}), others=False)
    label_ok = torch.zeros(len(categories) + 1, dtype=torch.bool)
    label_ok[[i + 1 for i, c in enumerate(categories) if c["id"] in set(train_classes)]] = True

    cache_path, built = None, False
    batch_args = (cfg.solver.batch_size, cfg.solver.iterations, cfg.solver.seed)
    if cfg.cache.enabled:
        # one cache of every class's masks serves agnostic, transfer and oracle runs alike
        # rank 0 builds (or finds) the cache; the other ranks then open the finished file
        # building a cache must not shift the random stream (dropout of T): the same run gives the
        # same weights whether the cache was built now or found
        before = rng_state()
        prepared = dist.main_first(lambda: ensure_cache(det, data, cfg.data, cfg.cache, cfg.head.roi_size, progress))
        set_rng_state(before)
        cache_path, built = prepared.path, prepared.built
        source = cache_source(prepared.cache, label_ok, *batch_args, cfg.cache, dist.rank(), dist.world_size())
        if isinstance(source, StreamingRoIs):
            progress.log(f"feature cache: {source.rois} training RoIs over the RAM budget "
                         f"({cfg.cache.ram_budget_gb:g} GiB): streaming from {cache_path}")
    else:
        source = DetectorRoIs(det.model, roi_pool, dataset, cfg.cache, *batch_args, dist.rank(), dist.world_size())
    train_rois = source.rois

    wrapped = mask_side
    if dist.is_dist():
        wrapped = torch.nn.parallel.DistributedDataParallel(mask_side, device_ids=[device.index] if device.type == "cuda" else None)
    trainer = Trainer(wrapped, cfg.solver, out, "mask-train",
                      extra={"config": to_dict(cfg), "categories": categories, "set_a": set_a},
                      progress=progress, description=f"mask-train [{cfg.head.head}{'+mlp' if cfg.head.mlp else ''}]")
    if resume:
        trainer.resume()

    def step(iteration: int) -> dict[str, torch.Tensor]:
        rois = source.batch(iteration)  # this process's share of the global batch
        with autocast(device, cfg.solver.amp):
            logits = wrapped(rois.features.to(device, torch.float32), rois.labels.to(device))
            return {"loss_mask": mask_loss(logits, rois.masks.to(device))}

    try:
        stats = trainer.run(step)
    finally:
        source.close()
        if cfg.cache.enabled:
            prepared.cache.close()
    final = out / MASK_CKPT

    def finish() -> None:
        save_checkpoint(final, "mask", model=mask_side.state_dict(), config=to_dict(cfg), head=to_dict(cfg.head),
                        categories=categories, set_a=set_a, detector_sha256=det.sha256, embed_dim=int(w_det.shape[1]),
                        in_channels=fpn_channels, iteration=cfg.solver.iterations)
        update_manifest(out, status="finished", train_rois=train_rois, cache=str(cache_path) if cache_path else None, cache_built=built,
                        seconds=round(stats.seconds, 1), missing_glove=missing, world_size=dist.world_size(),
                        effective_lr=cfg.solver.effective_lr())

    dist.main_first(finish, others=False)  # rank 0 writes; the others wait for it
    return MaskTrainResult(out, final, cfg.head.head, set_a, train_rois, cache_path, built, stats, missing)


def load_mask_run(run: str | Path, det: DetectorRun | None = None):
    """(mask side in eval mode, checkpoint dict) of a ``mask-train`` run; checks it fits ``det``."""
    from pipelines.config import HeadConfig, from_dict
    from pipelines.engine.checkpoint import load_checkpoint, load_state

    run = Path(run)
    path = run if run.is_file() else run / MASK_CKPT
    if not path.is_file():
        raise MaskxError(f"no {MASK_CKPT} here: not a finished mask run (train it with 'maskx mask-train')", run)
    ckpt = load_checkpoint(path, "mask")
    if det is not None and ckpt["detector_sha256"] != det.sha256:
        raise MaskxError(f"this mask head was trained on another detector (sha256 {ckpt['detector_sha256'][:12]}…, "
                         f"given detector {det.sha256[:12]}…)", path)
    head = from_dict(HeadConfig, ckpt["head"])
    side = build_mask_side(head, len(ckpt["categories"]), ckpt["in_channels"], None, embed_dim=ckpt["embed_dim"])
    load_state(side, ckpt["model"], path)
    side.eval().requires_grad_(False)
    return side, ckpt

"""Stage 2: train only the mask side (T + FCN head + MLP branch) against the frozen detector.

By default the frozen detector's state is read from the feature cache (built on first use), so a
stage-2 experiment never runs the detector again. ``cache.enabled=false`` runs the frozen detector
on every step instead (same RoIs, same targets; slower).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipelines.config import MaskTrainConfig, to_dict
from pipelines.data.coco import CocoDataset, check_same_categories, collate
from pipelines.data.splits import resolve_split
from pipelines.engine import distributed as dist
from pipelines.engine.cache import RoIBatch, build_cache, cache_key, extract_rois, open_cache
from pipelines.engine.checkpoint import save_checkpoint
from pipelines.engine.device import resolve_device
from pipelines.engine.loop import Trainer, TrainStats, seed_everything
from pipelines.engine.run_dir import prepare_run_dir, update_manifest
from pipelines.engine.sampler import IterationBatches
from pipelines.errors import MaskxError
from pipelines.io import sha256_file
from pipelines.modeling.embeddings import INPUTS, detector_embedding, glove_embedding, randn_embedding
from pipelines.modeling.maskx_rcnn import build_mask_roi_pool, build_mask_side, mask_loss
from pipelines.progress import NULL_PROGRESS, Progress
from pipelines.stages.common import MASK_CKPT, DetectorRun, load_detector_run, load_split
from pipelines.stages.export_embeddings import Embeddings, read_embeddings

RAM_BUDGET = 4 * 2**30  # caches up to this size are read into memory once


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
    if cfg.cache.dtype not in ("float16", "float32"):
        raise MaskxError(f"cache.dtype must be float16 or float32, got '{cfg.cache.dtype}'")
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
    det = load_detector_run(detector)
    emb = read_embeddings(embeddings)
    if emb.detector_sha256 != det.sha256:
        raise MaskxError(f"embeddings were exported from another detector (checkpoint sha256 {emb.detector_sha256[:12]}…, "
                         f"this detector's is {det.sha256[:12]}…): run 'maskx export-embeddings' on it", embeddings)
    if emb.class_ids != [c["id"] for c in det.categories]:
        raise MaskxError("the embeddings' class list does not match the detector's", embeddings)
    data, _ = load_split(cfg.data.train_json, "train", require_masks=True)
    check_same_categories(det.categories, data["categories"], "the detector's classes", cfg.data.train_json)
    categories = det.categories
    set_a = resolve_split(cfg.data.mask_classes, categories)
    train_classes = [c["id"] for c in categories] if cfg.head.head == "oracle" else set_a
    device = resolve_device(cfg.solver.device)
    seed_everything(cfg.solver.seed)

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

    prepare_run_dir(out, "mask-train", to_dict(cfg),
                    {"detector": det.checkpoint, "embeddings": embeddings, "train_json": cfg.data.train_json},
                    extra={"set_a": set_a, "train_classes": len(train_classes)})
    label_ok = torch.zeros(len(categories) + 1, dtype=torch.bool)
    label_ok[[i + 1 for i, c in enumerate(categories) if c["id"] in set(train_classes)]] = True

    cache_path, built, cached = None, False, None
    if cfg.cache.enabled:
        cache_dir = Path(cfg.cache.dir) if cfg.cache.dir else det.run_dir / "cache"
        # one cache of every class's masks serves agnostic, transfer and oracle runs alike
        all_ids = [c["id"] for c in categories]
        key = cache_key(det.sha256, sha256_file(cfg.data.train_json), all_ids, cfg.head.roi_size, cfg.cache, len(dataset))
        cache_path = cache_dir / f"features-{key[:16]}.h5"
        cache = open_cache(cache_path, key)
        if cache is None:
            full = CocoDataset(data, cfg.data.train_images, with_masks=True, mask_category_ids=all_ids,
                               max_images=cfg.data.max_train_images)
            full.images = [im for im in full.images if full.anns_by_image.get(im["id"])]
            cache = build_cache(det.model, roi_pool, full, cfg.cache, cache_path, key, fpn_channels, progress,
                                seed=cfg.solver.seed)
            built = True
        if cache.nbytes > RAM_BUDGET:
            cache.close()
            raise MaskxError(f"feature cache is {cache.nbytes / 2**30:.1f} GiB, over the in-memory budget; "
                             "lower cache.proposals_per_instance", cache_path)
        everything = cache.load()
        cache.close()
        keep = label_ok[everything.labels]
        cached = RoIBatch(everything.features[keep], everything.masks[keep], everything.labels[keep])
        train_rois = int(keep.sum())
        if train_rois == 0:
            raise MaskxError("the feature cache holds no RoI of the training classes", cache_path)
    else:
        train_rois = 0

    trainer = Trainer(mask_side, cfg.solver, out, "mask-train",
                      extra={"config": to_dict(cfg), "categories": categories, "set_a": set_a},
                      progress=progress, description=f"mask-train [{cfg.head.head}{'+mlp' if cfg.head.mlp else ''}]")
    if resume:
        trainer.resume()

    if cached is not None:
        batches = IterationBatches(train_rois, cfg.solver.batch_size, cfg.solver.iterations, cfg.solver.seed)

        def step(iteration: int) -> dict[str, torch.Tensor]:
            idx = torch.tensor(batches.batch(iteration))
            feats = cached.features[idx].to(device, torch.float32)
            logits = mask_side(feats, cached.labels[idx].to(device))
            return {"loss_mask": mask_loss(logits, cached.masks[idx].to(device))}
    else:
        images_per_step = max(1, cfg.solver.batch_size // 8)
        img_batches = IterationBatches(len(dataset), images_per_step, cfg.solver.iterations, cfg.solver.seed)
        generator = torch.Generator().manual_seed(cfg.solver.seed)

        def step(iteration: int) -> dict[str, torch.Tensor]:
            images, targets = collate([dataset[i] for i in img_batches.batch(iteration)])
            rois = extract_rois(det.model, roi_pool, list(images), list(targets), cfg.cache, generator)
            logits = mask_side(rois.features.float(), rois.labels)
            return {"loss_mask": mask_loss(logits, rois.masks)}

    stats = trainer.run(step)
    final = out / MASK_CKPT
    save_checkpoint(final, "mask", model=mask_side.state_dict(), config=to_dict(cfg), head=to_dict(cfg.head),
                    categories=categories, set_a=set_a, detector_sha256=det.sha256, embed_dim=int(w_det.shape[1]),
                    in_channels=fpn_channels, iteration=cfg.solver.iterations)
    update_manifest(out, train_rois=train_rois, cache=str(cache_path) if cache_path else None, cache_built=built,
                    seconds=round(stats.seconds, 1), missing_glove=missing)
    return MaskTrainResult(out, final, cfg.head.head, set_a, train_rois, cache_path, built, stats, missing)


def load_mask_run(run: str | Path, det: DetectorRun | None = None):
    """(mask side in eval mode, checkpoint dict) of a ``mask-train`` run; checks it fits ``det``."""
    from pipelines.config import HeadConfig, from_dict
    from pipelines.engine.checkpoint import load_checkpoint

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
    side.load_state_dict(ckpt["model"])
    side.eval().requires_grad_(False)
    return side, ckpt

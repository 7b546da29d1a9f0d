"""The stage-2 feature cache as a stage: find it, or build it with the frozen detector.

``ensure_cache`` is what ``maskx mask-train`` calls before training and what ``maskx cache
build`` calls on its own, so a cache built ahead of time is the one a later mask-train reuses.
One cache holds the RoIs of every class's masks: agnostic, transfer and oracle runs (any set A)
share it and pick their classes' rows when they read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipelines.config import CacheConfig, DataConfig, MaskTrainConfig
from pipelines.data.coco import CocoDataset, check_same_categories
from pipelines.engine.cache import FeatureCache, build_cache, cache_key, open_cache
from pipelines.engine.device import resolve_device
from pipelines.errors import MaskxError
from pipelines.io import sha256_file
from pipelines.modeling.maskx_rcnn import build_mask_roi_pool
from pipelines.progress import NULL_PROGRESS, Progress
from pipelines.stages.common import DetectorRun, load_detector_run, load_split

CACHE_SEED = 0  # proposal sampling of the cache: fixed, so a cache's content is a function of its key


@dataclass
class CacheResult:
    """An opened, complete cache (``cache``; close it when done) and where it came from."""

    path: Path
    key: str
    built: bool
    cache: FeatureCache

    @property
    def rois(self) -> int:
        return len(self.cache)


def cache_dataset(data: dict, data_cfg: DataConfig) -> CocoDataset:
    """Every training image with an annotation; masks of every class (the cache's input)."""
    all_ids = [c["id"] for c in data["categories"]]
    full = CocoDataset(data, data_cfg.train_images, with_masks=True, mask_category_ids=all_ids,
                       max_images=data_cfg.max_train_images)
    full.images = [im for im in full.images if full.anns_by_image.get(im["id"])]
    return full


def check_cache_config(cfg: CacheConfig) -> None:
    if cfg.dtype not in ("float16", "float32"):
        raise MaskxError(f"cache.dtype must be float16 or float32, got '{cfg.dtype}'")
    if cfg.proposals_per_instance < 0:
        raise MaskxError(f"cache.proposals_per_instance must be 0 or more, got {cfg.proposals_per_instance}")
    if cfg.ram_budget_gb < 0:
        raise MaskxError(f"cache.ram_budget_gb must be 0 or more, got {cfg.ram_budget_gb}")


def ensure_cache(det: DetectorRun, data: dict, data_cfg: DataConfig, cfg: CacheConfig, roi_size: int,
                 progress: Progress = NULL_PROGRESS) -> CacheResult:
    """The complete cache for (detector, training data, RoI settings): reused if present, else built.

    The cache lives in ``cfg.dir`` (default ``<detector run>/cache``) as ``features-<key[:16]>.h5``.
    The detector must already be on the device it should run on.
    """
    check_cache_config(cfg)
    full = cache_dataset(data, data_cfg)
    if not full.images:
        raise MaskxError("no training image has an annotation", data_cfg.train_json)
    all_ids = [c["id"] for c in det.categories]
    key = cache_key(det.sha256, sha256_file(data_cfg.train_json), all_ids, roi_size, cfg, len(full))
    path = (Path(cfg.dir) if cfg.dir else det.run_dir / "cache") / f"features-{key[:16]}.h5"
    cache = open_cache(path, key)
    if cache is not None:
        return CacheResult(path, key, False, cache)
    cache = build_cache(det.model, build_mask_roi_pool(roi_size), full, cfg, path, key, det.model.backbone.out_channels,
                        progress, seed=CACHE_SEED)
    return CacheResult(path, key, True, cache)


def cache_build(cfg: MaskTrainConfig, detector: str | Path, progress: Progress = NULL_PROGRESS) -> CacheResult:
    """``maskx cache build``: the cache a later ``mask-train`` with this config and detector reuses."""
    check_cache_config(cfg.cache)
    det = load_detector_run(detector)
    data, _ = load_split(cfg.data.train_json, "train", require_masks=True)
    check_same_categories(det.categories, data["categories"], "the detector's classes", cfg.data.train_json)
    det.model.to(resolve_device(cfg.solver.device))
    return ensure_cache(det, data, cfg.data, cfg.cache, cfg.head.roi_size, progress)

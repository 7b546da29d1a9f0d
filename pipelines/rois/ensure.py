"""Finding or building the feature cache of a detector and its training data.

:func:`ensure_cache` finds the cache of a (detector, training data, RoI settings, classes) or
builds it. By default (``cache.classes=train``) a cache holds the RoIs of the run's mask classes
only (:func:`pipelines.data.splits.mask_classes`: set A, every class for the oracle);
``cache.classes=all`` caches every class, so agnostic, transfer and oracle runs of any set A share
it, and a cache of more classes built with the same settings is always reused. Concurrent runs that
need the same cache take a lock file beside it: the first builds, the others wait and reuse it.
See ``docs/cache.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import h5py

from pipelines.config import CacheConfig, DataConfig
from pipelines.engine.run_dir import DetectorRun
from pipelines.errors import MaskxError
from pipelines.io import file_lock, sha256_file, sha256_json
from pipelines.modeling.maskx_rcnn import build_mask_roi_pool
from pipelines.progress import NULL_PROGRESS, Progress
from pipelines.rois.build import build_cache
from pipelines.rois.extract import proposals_per_image
from pipelines.rois.instances import cache_dataset, instance_counts
from pipelines.rois.plan import plan_cache
from pipelines.rois.sampling import SAMPLINGS, fg_per_image, sampling_settings
from pipelines.rois.store import STORAGES, VERSION, FeatureCache, inspect_cache, layout_of, open_cache

CACHE_SEED = 0  # RoI sampling of the cache: fixed, so a cache's content is a function of its key
BUILD_BATCH_IMAGES = 8  # images per detector batch while building


@dataclass
class CacheResult:
    """An opened, complete cache (``cache``; close it when done) and where it came from."""

    path: Path
    key: str
    built: bool
    cache: FeatureCache
    warnings: list[str] = field(default_factory=list)  # what loading skipped (degenerate boxes) and the file lacks (set-A masks)

    @property
    def rois(self) -> int:
        return len(self.cache)


def settings_key(detector_sha256: str, data_sha256: str, roi_size: int, cfg: CacheConfig, images: int, hflip: bool = False) -> str:
    """What a cache's rows are, whichever classes it holds: detector, data, RoI settings, flips."""
    return sha256_json({"version": VERSION, "detector": detector_sha256, "data": data_sha256, "roi_size": roi_size,
                        "dtype": cfg.dtype, "images": images, "hflip": bool(hflip), **sampling_settings(cfg)})


def cache_key(detector_sha256: str, data_sha256: str, class_ids: list[int], roi_size: int, cfg: CacheConfig, images: int,
              hflip: bool = False) -> str:
    """The key of the cache of ``class_ids`` for these settings (see :func:`settings_key`)."""
    return sha256_json({"settings": settings_key(detector_sha256, data_sha256, roi_size, cfg, images, hflip),
                        "classes": sorted(class_ids)})


# the least value of each numeric cache setting, and what that least value means when it is special
AT_LEAST = {"proposals_per_instance": (0, ""), "rpn_proposals": (0, " (the detector's own)"), "rois_per_image": (1, ""),
            "ram_budget_gb": (0, ""), "max_gb": (0, " (no budget)"), "fg_per_image": (0, " (as many as cache.max_gb holds)"),
            "reader_threads": (1, ""), "shuffle_window": (1, ""), "workers": (0, ""), "stream_chunk_rows": (0, "")}


def check_cache_config(cfg: CacheConfig) -> None:
    """Refuse impossible ``cache.*`` settings with one line naming the key."""
    def bad(key: str, message: str):
        raise MaskxError(f"cache.{key} {message}", key=f"cache.{key}")

    if cfg.dtype not in STORAGES:
        bad("dtype", f"must be {', '.join(STORAGES)}, got '{cfg.dtype}'")
    if cfg.sampling not in SAMPLINGS:
        bad("sampling", f"must be {' or '.join(SAMPLINGS)}, got '{cfg.sampling}'")
    if cfg.classes not in ("train", "all"):
        bad("classes", f"must be train or all, got '{cfg.classes}'")
    for key, (least, meaning) in AT_LEAST.items():
        if getattr(cfg, key) < least:
            bad(key, f"must be {least}{meaning} or more, got {getattr(cfg, key):g}")
    for key in ("fg_fraction", "min_iou"):
        if not 0 < getattr(cfg, key) <= 1:
            bad(key, f"must be in (0, 1], got {getattr(cfg, key):g}")
    draw = fg_per_image(cfg.rois_per_image, cfg.fg_fraction)
    if cfg.sampling == "detectron" and cfg.fg_per_image > draw:  # the draw never gives more: say so, do not clamp quietly
        bad("fg_per_image", f"must be at most the foreground RoIs the draw gives an image copy, round(cache.fg_fraction x "
                            f"cache.rois_per_image) = {draw}, got {cfg.fg_per_image} (raise cache.rois_per_image for more)")


def find_superset(folder: Path, settings: str, class_ids: list[int], threads: int = 4) -> FeatureCache | None:
    """A complete cache in ``folder`` built with ``settings`` whose classes include ``class_ids``
    (the one with the fewest classes), or None."""
    wanted, found = set(class_ids), []
    for p in sorted(folder.glob("features-*.h5")):
        try:
            with h5py.File(p, "r") as f:
                if str(f.attrs.get("settings_key")) == settings and f.attrs.get("complete"):
                    classes = {int(c) for c in f.attrs["classes"]}
                    if wanted <= classes:
                        found.append((len(classes), p, str(f.attrs["key"])))
        except (OSError, KeyError, ValueError, TypeError):
            continue
    for _, p, key in sorted(found):
        cache = open_cache(p, key, threads)
        if cache is not None:
            return cache
    return None


def ensure_cache(det: DetectorRun, data: dict, data_cfg: DataConfig, cfg: CacheConfig, roi_size: int,
                 progress: Progress = NULL_PROGRESS, class_ids: list[int] | None = None, visits: int = 0) -> CacheResult:
    """The complete cache for (detector, training data, RoI settings, classes): reused if present, else built.

    ``class_ids``: the run's mask classes (:func:`pipelines.data.splits.mask_classes`; every class if
    None or ``cache.classes=all``). First the plan (:func:`plan_cache`, from the annotation file's
    counts and ``cache.max_gb``) fixes how many RoIs are kept -- part of the key, so a cache is found
    again whatever the free space. The cache lives in ``cfg.dir`` (default ``<detector run>/cache``)
    as ``features-<key[:16]>.h5`` + ``.rows``; a complete cache of more classes with the same settings
    is reused. One that is there but damaged (unreadable, truncated, a sampled row failing its
    checksum) is rebuilt, with a line saying so. The build holds a lock file beside it. ``visits``:
    RoI visits of the training schedule, for the plan's passes per RoI. The detector must already
    be on the device it should run on.
    """
    check_cache_config(cfg)
    all_ids = [c["id"] for c in det.categories]
    wanted = all_ids if class_ids is None or cfg.classes == "all" else sorted(set(class_ids))
    full = cache_dataset(data, data_cfg, wanted)
    if not len(full):
        raise MaskxError("no training image has a mask of the cached classes", data_cfg.train_json)
    channels = det.model.backbone.out_channels
    plan = plan_cache(instance_counts(full), cfg, layout_of(channels, roi_size, cfg.dtype), proposals_per_image(det.model, cfg),
                      visits)
    cfg = plan.cfg
    args = (det.sha256, sha256_file(data_cfg.train_json))
    settings = settings_key(*args, roi_size, cfg, data_cfg.max_train_images, data_cfg.hflip)
    key = cache_key(*args, wanted, roi_size, cfg, data_cfg.max_train_images, data_cfg.hflip)
    folder = Path(cfg.dir) if cfg.dir else det.run_dir / "cache"
    path = folder / f"features-{key[:16]}.h5"
    lock = folder / f".features-{settings[:16]}.lock"
    with file_lock(lock, on_wait=lambda: progress.log(f"another process is building this feature cache: waiting for it ({lock})")):
        cache, damage = inspect_cache(path, key, cfg.reader_threads)
        cache = cache or find_superset(folder, settings, wanted, cfg.reader_threads)
        if cache is not None:
            return CacheResult(cache.path, cache.key, False, cache)
        if damage:
            progress.log(f"feature cache {path} {damage}: rebuilding it")
        cache = build_cache(det.model, build_mask_roi_pool(roi_size), full, cfg, path, key, channels,
                            progress, batch_images=BUILD_BATCH_IMAGES, seed=CACHE_SEED, workers=cfg.workers,
                            attrs={"settings_key": settings}, plan=plan)
    return CacheResult(path, key, True, cache)

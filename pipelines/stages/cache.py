"""``maskx cache build``: the stage-2 feature cache on its own, before any mask-train.

It finds or builds the cache with :func:`pipelines.rois.ensure.ensure_cache`, the function
``mask-train`` calls before training, with the same classes (:func:`pipelines.data.splits.mask_classes`
of the config's head and set A), so a cache built ahead of time is the one a later mask-train with
the same config and detector reuses.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pipelines.config import MaskTrainConfig
from pipelines.data.coco import check_same_categories, load_split
from pipelines.data.splits import training_sets
from pipelines.engine.device import resolve_device
from pipelines.engine.run_dir import load_detector_run
from pipelines.progress import NULL_PROGRESS, Progress
from pipelines.rois.ensure import CacheResult, check_cache_config, ensure_cache


def cache_build(cfg: MaskTrainConfig, detector: str | Path, progress: Progress = NULL_PROGRESS) -> CacheResult:
    """The cache a later ``mask-train`` with this config and detector reuses (opened; close it when done).

    Each data file ``cfg.data`` leaves empty is the detector run's, as in ``mask-train``.
    """
    check_cache_config(cfg.cache)
    det = load_detector_run(detector)
    cfg = dataclasses.replace(cfg, data=det.data_config(cfg.data))
    data, report = load_split(cfg.data.train_json, "train")
    check_same_categories(det.categories, data["categories"], "the detector's classes", cfg.data.train_json)
    det.model.to(resolve_device(cfg.solver.device))
    sets = training_sets(cfg.data.mask_classes, cfg.head.head, det.categories, data, cfg.data.train_json)
    result = ensure_cache(det, data, cfg.data, cfg.cache, cfg.head.roi_size, progress, sets.train_classes,
                          visits=cfg.solver.iterations * cfg.solver.batch_size)
    return dataclasses.replace(result, warnings=report.warnings(cfg.data.train_json) + sets.warnings)

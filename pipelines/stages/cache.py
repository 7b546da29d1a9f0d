"""``maskx cache build`` and ``maskx cache plan``: the stage-2 feature cache on its own, before any mask-train.

``cache build`` finds or builds the cache with :func:`pipelines.rois.ensure.ensure_cache`, the
function ``mask-train`` calls before training, with the same classes
(:func:`pipelines.data.splits.mask_classes` of the config's head and set A), so a cache built ahead
of time is the one a later mask-train with the same config and detector reuses.

``cache plan`` needs no detector run: from an annotation file and a recipe it gives the plan the
build would make (:func:`pipelines.rois.plan.plan_cache`) and projects the build's and one
experiment's time from rates measured on this machine (:mod:`pipelines.rois.projection`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.config import DetectorConfig, MaskTrainConfig
from pipelines.data.coco import check_same_categories, load_split
from pipelines.data.splits import training_sets
from pipelines.engine.device import resolve_device
from pipelines.engine.run_dir import load_detector_run
from pipelines.errors import MaskxError
from pipelines.modeling.mask_heads import trains_every_class
from pipelines.progress import NULL_PROGRESS, Progress
from pipelines.rois.ensure import CacheResult, check_cache_config, ensure_cache
from pipelines.rois.instances import cache_dataset, instance_counts
from pipelines.rois.plan import CachePlan, plan_cache
from pipelines.rois.projection import Projection, Rates, measure_rates, project
from pipelines.rois.store import layout_of


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
    sets = training_sets(cfg.data.mask_classes, trains_every_class(cfg.head.head), det.categories, data, cfg.data.train_json)
    result = ensure_cache(det, data, cfg.data, cfg.cache, cfg.head.roi_size, progress, sets.train_classes,
                          visits=cfg.solver.iterations * cfg.solver.batch_size)
    return dataclasses.replace(result, warnings=report.warnings(cfg.data.train_json) + sets.warnings)


@dataclass
class CachePlanReport:
    """What ``maskx cache plan`` shows: the plan, the image copies the build decodes, the rates and the projection."""

    plan: CachePlan
    train_json: str
    set_a: list[int]
    image_copies: int
    rates: Rates
    projection: Projection
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        p = self.plan
        return {"train_json": self.train_json, "set_a": self.set_a, "image_copies": self.image_copies, "instances": p.instances,
                "images_with_set_a": p.images, "sampling": p.cfg.sampling, "fg_per_image": p.cfg.fg_per_image,
                "proposals_per_instance": p.cfg.proposals_per_instance, "dtype": p.cfg.dtype, "rois": p.rows,
                "roi_bytes": p.roi_bytes, "bytes": p.bytes, "budget_bytes": p.budget, "visits": p.visits, "passes": p.passes,
                "rates": dataclasses.asdict(self.rates), "projection": self.projection.to_dict()}


def cache_plan(cfg: MaskTrainConfig, det: DetectorConfig, rates: Rates | None = None, folder: str | Path = ".") -> CachePlanReport:
    """The plan of the cache ``cfg`` asks for on ``cfg.data.train_json`` and the times it projects.

    ``det``: the recipe's detector settings (FPN channels, input size, proposals per image). ``rates``:
    given (e.g. read from a JSON file) or measured here on ``cfg.solver.device``, the disk's in ``folder``.
    """
    check_cache_config(cfg.cache)
    if not cfg.data.train_json:
        raise MaskxError("no annotation file to plan a cache for: give data.train_json", key="data.train_json")
    data, report = load_split(cfg.data.train_json, "train")
    sets = training_sets(cfg.data.mask_classes, trains_every_class(cfg.head.head), data["categories"], data, cfg.data.train_json)
    wanted = None if cfg.cache.classes == "all" else sets.train_classes
    counts = instance_counts(cache_dataset(data, cfg.data, wanted))
    if not counts:
        raise MaskxError("no training image has a mask of the cached classes", cfg.data.train_json)
    layout = layout_of(det.fpn_channels, cfg.head.roi_size, cfg.cache.dtype)
    plan = plan_cache(counts, cfg.cache, layout, cfg.cache.rpn_proposals or det.rpn_post_nms_top_n_test,
                      cfg.solver.iterations * cfg.solver.batch_size)
    rates = rates or measure_rates(det, cfg.head, Path(cfg.cache.dir or folder), resolve_device(cfg.solver.device), cfg.cache,
                                   cfg.solver.batch_size)
    proj = project(plan, len(counts), rates, cfg.cache.workers, cfg.cache.ram_budget_gb)
    warnings = report.warnings(cfg.data.train_json) + sets.warnings
    if rates.stream_rois_s and rates.stream_dtype and rates.stream_dtype != cfg.cache.dtype:
        warnings.append(f"{rates.source}: the streaming reader's rate was measured for {rates.stream_dtype} storage, this plan "
                        f"stores {cfg.cache.dtype}: its reader time is approximate (measure the rates with cache.dtype={cfg.cache.dtype})")
    return CachePlanReport(plan, str(cfg.data.train_json), sets.set_a, len(counts), rates, proj, warnings)

""""Faster R-CNN tested with GrabCut" (Table 3.5): masks from GrabCut inside every detected box.

The detector (any ``detect-train`` or end-to-end run) gives boxes, scores and classes; each box's
mask is GrabCut's foreground inside it (:func:`pipelines.evaluation.inference.grabcut_predictions`).
Scored like ``maskx eval``, through the same path: mask and box AP on set B, A and all.
"""

from __future__ import annotations

import time
from pathlib import Path

from pipelines.config import EvalConfig
from pipelines.engine.device import resolve_device
from pipelines.engine.run_dir import file_record, load_detector_run
from pipelines.evaluation.inference import grabcut_predictions, load_validation, set_inference_limits
from pipelines.evaluation.scoring import EvalResult, class_sets, protocol_of, score_jobs, write_metrics
from pipelines.progress import NULL_PROGRESS, Progress


def evaluate_grabcut(detector: str | Path, cfg: EvalConfig, val_json: str | Path | None = None, val_images: str | Path | None = None,
                     iterations: int = 5, progress: Progress = NULL_PROGRESS, json_out: str | Path | None = None) -> EvalResult:
    """Evaluate "detector + GrabCut" on a validation split (default: the detector run's ``data.val_json``)."""
    det = load_detector_run(detector)
    data_cfg = det.config.get("data", {})
    val_json = val_json or data_cfg.get("val_json")
    gt, dataset = load_validation(det, val_json, val_images or data_cfg.get("val_images"), cfg.max_images)
    sets = class_sets(cfg.split, gt["categories"])
    set_inference_limits(det.model, gt, cfg)
    t0 = time.perf_counter()
    results = {"grabcut": grabcut_predictions(det, dataset, resolve_device("auto"), iterations, progress)}
    metrics = score_jobs(gt, results, {"grabcut": ("grabcut", sets)}, cfg, [im["id"] for im in dataset.images], progress)
    protocol = protocol_of(gt)
    result = EvalResult(metrics, sets, len(dataset), time.perf_counter() - t0, results, protocol.name, list(protocol.metrics))
    if json_out:
        write_metrics(json_out, cfg, gt, result, {"grabcut": {"run": str(det.run_dir), "head": "grabcut", "grabcut_iterations": iterations}},
                      {"detector": file_record(det.checkpoint), "val_json": file_record(val_json)})
    return result

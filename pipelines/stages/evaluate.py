"""Evaluation: mask and box AP on set B, set A and all classes, by COCO's or LVIS's rules.

Several mask heads trained on the same frozen detector are evaluated in one pass: the detector
runs once per image and every head predicts masks for the same detections
(:func:`pipelines.evaluation.inference.predict_dataset`); :func:`pipelines.evaluation.scoring.score`
scores them, by the rules the ground truth calls for. On an LVIS ground truth the detector keeps up
to 300 detections per image (the LVIS protocol's limit) whatever its ``box_detections_per_img``.
"""

from __future__ import annotations

import time
from pathlib import Path

from pipelines.config import EvalConfig
from pipelines.engine.device import resolve_device
from pipelines.engine.run_dir import detector_of_mask_run, file_record, load_detector_run, load_mask_run
from pipelines.errors import MaskxError
from pipelines.evaluation.inference import load_validation, predict_dataset, set_inference_limits
from pipelines.evaluation.scoring import EvalResult, class_sets, protocol_of, score_jobs, write_metrics
from pipelines.progress import NULL_PROGRESS, Progress


def evaluate_heads(mask_runs: dict[str, str | Path], cfg: EvalConfig, val_json: str | Path | None = None,
                   val_images: str | Path | None = None, detector: str | Path | None = None,
                   progress: Progress = NULL_PROGRESS, json_out: str | Path | None = None) -> EvalResult:
    """Evaluate mask runs (name -> run folder) that share one detector on a validation split.

    ``cfg.split`` names set B (``nonvoc`` for voc -> non-voc); set A is the rest. The data defaults
    to the first run's ``data.val_json`` / ``data.val_images``; the detector to the one the first
    run's manifest names.
    """
    if not mask_runs:
        raise MaskxError("no mask run to evaluate")
    first = next(iter(mask_runs.values()))
    det = load_detector_run(detector or detector_of_mask_run(first))
    heads, ckpts = {}, {}
    for name, run in mask_runs.items():
        heads[name], ckpts[name] = load_mask_run(run, det)
    data_cfg = ckpts[next(iter(ckpts))]["config"]["data"]
    val_json = val_json or data_cfg.get("val_json")
    gt, dataset = load_validation(det, val_json, val_images or data_cfg.get("val_images"), cfg.max_images)
    sets = class_sets(cfg.split, gt["categories"])
    sizes = {c["head"]["roi_size"] for c in ckpts.values()}
    if len(sizes) > 1:
        raise MaskxError(f"these mask runs use different RoI sizes ({sorted(sizes)}); evaluate them separately")
    set_inference_limits(det.model, gt, cfg)
    t0 = time.perf_counter()
    results = predict_dataset(det, heads, dataset, sizes.pop(), resolve_device("auto"), progress, gt_boxes=cfg.gt_boxes)
    metrics = score_jobs(gt, results, {name: (name, sets) for name in heads}, cfg, [im["id"] for im in dataset.images], progress)
    protocol = protocol_of(gt)
    result = EvalResult(metrics, sets, len(dataset), time.perf_counter() - t0, results, protocol.name, list(protocol.metrics))
    if json_out:
        described = {name: {"run": str(mask_runs[name]), "head": c["head"]["head"], "mlp": c["head"]["mlp"],
                            "input": c["head"]["input"], "trained_set_a": c["set_a"]} for name, c in ckpts.items()}
        write_metrics(json_out, cfg, gt, result, described,
                      {"detector": file_record(det.checkpoint), "val_json": file_record(val_json)})
    return result

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
from pipelines.data.annotations import describe_classes
from pipelines.errors import MaskxError
from pipelines.evaluation.inference import load_validation, predict_dataset, set_inference_limits
from pipelines.evaluation.scoring import (EvalResult, class_sets, classes_without_masks, mask_ap_note, protocol_of, score_jobs,
                                         write_metrics)
from pipelines.progress import NULL_PROGRESS, Progress


def run_class_sets(split: str, categories: list[dict], trained: dict[str, list[int]]) -> tuple[dict[str, list[int]], list[str]]:
    """The class sets to score runs on, and warnings: ``trained`` maps each run to its set A.

    ``split`` empty: B = the classes the runs had no masks for (their common set A's complement;
    runs with different sets A need a split). A split whose B holds classes a run trained masks
    on is scored as asked, with a warning naming them (those are not unseen classes).
    """
    set_as = {tuple(sorted(a)) for a in trained.values()}
    if not split and len(set_as) > 1:
        raise MaskxError("these runs were trained with different sets A, so they have no common set B: give the split "
                         "(--split)", key="split")
    sets = class_sets(split, categories, list(next(iter(trained.values()))) if not split else None)
    warnings = []
    for name, set_a in trained.items():
        overlap = sorted(set(sets["B"]) & set(set_a))
        if overlap:
            warnings.append(f"split '{split}' puts {len(overlap)} class(es) that {name} trained masks on into set B: "
                            f"{describe_classes(overlap, categories, 8)} (B is meant to be the classes without training "
                            f"masks; leave --split out to score the run's own set B)")
    return sets, warnings


def evaluate_heads(mask_runs: dict[str, str | Path], cfg: EvalConfig, val_json: str | Path | None = None,
                   val_images: str | Path | None = None, detector: str | Path | None = None,
                   progress: Progress = NULL_PROGRESS, json_out: str | Path | None = None) -> EvalResult:
    """Evaluate mask runs (name -> run folder) that share one detector on a validation split.

    ``cfg.split`` names set B (``nonvoc`` for voc -> non-voc); set A is the rest. Empty (the
    default), B is the classes the runs had no masks for (see :func:`run_class_sets`). The data
    defaults to the first run's ``data.val_json`` / ``data.val_images``; the detector to the one
    the first run's manifest names.
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
    skipped: list[str] = []
    gt, dataset = load_validation(det, val_json, val_images or data_cfg.get("val_images"), cfg.max_images, skipped)
    sets, warnings = run_class_sets(cfg.split, gt["categories"], {name: c["set_a"] for name, c in ckpts.items()})
    warnings = skipped + warnings
    sizes = {c["head"]["roi_size"] for c in ckpts.values()}
    if len(sizes) > 1:
        raise MaskxError(f"these mask runs use different RoI sizes ({sorted(sizes)}); evaluate them separately")
    set_inference_limits(det.model, gt, cfg)
    t0 = time.perf_counter()
    results = predict_dataset(det, heads, dataset, sizes.pop(), resolve_device("auto"), progress, gt_boxes=cfg.gt_boxes)
    metrics = score_jobs(gt, results, {name: (name, sets) for name in heads}, cfg, [im["id"] for im in dataset.images], progress)
    protocol = protocol_of(gt)
    unmasked = classes_without_masks(gt)
    notes = [mask_ap_note(unmasked, gt["categories"])] if unmasked else []
    result = EvalResult(metrics, sets, len(dataset), time.perf_counter() - t0, results, protocol.name, list(protocol.metrics),
                        warnings, notes)
    if json_out:
        described = {name: {"run": str(mask_runs[name]), "head": c["head"]["head"], "mlp": c["head"]["mlp"],
                            "input": c["head"]["input"], "trained_set_a": c["set_a"]} for name, c in ckpts.items()}
        write_metrics(json_out, cfg, gt, result, described,
                      {"detector": file_record(det.checkpoint), "val_json": file_record(val_json)})
    return result

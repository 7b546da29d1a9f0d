"""Evaluation: mask and box AP on set B, set A and all classes, by COCO's or LVIS's rules.

Several mask heads trained on the same frozen detector are evaluated in one pass: the detector
runs once per image and every head predicts masks for the same detections
(:class:`pipelines.evaluation.inference.HeadPredictions`), scored through the one evaluation path,
:func:`pipelines.evaluation.inference.inference_on_dataset`, by the rules the ground truth calls for. On an LVIS ground truth the detector keeps up
to 300 detections per image (the LVIS protocol's limit) whatever its ``box_detections_per_img``.
"""

from __future__ import annotations

from pathlib import Path

from pipelines.config import EvalConfig
from pipelines.data.annotations import describe_classes
from pipelines.engine.run_dir import detector_of_mask_run, file_record, load_detector_run, load_eval_config, load_mask_run
from pipelines.errors import MaskxError
from pipelines.evaluation.inference import HeadPredictions, inference_on_dataset, load_validation
from pipelines.evaluation.scoring import EvalResult, class_sets, classes_without_masks, mask_ap_note, protocol_of, write_metrics
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


def evaluate_heads(mask_runs: dict[str, str | Path], cfg: EvalConfig | None = None, val_json: str | Path | None = None,
                   val_images: str | Path | None = None, detector: str | Path | None = None,
                   progress: Progress = NULL_PROGRESS, json_out: str | Path | None = None) -> EvalResult:
    """Evaluate mask runs (name -> run folder) that share one detector on a validation split.

    ``cfg.split`` names set B (``nonvoc`` for voc -> non-voc); set A is the rest. Empty (the
    default), B is the classes the runs had no masks for (see :func:`run_class_sets`). ``cfg``
    defaults to the ``eval:`` section of the detector run's recipe (:func:`load_eval_config`). The
    data defaults to the first run's ``data.val_json`` / ``data.val_images``; the detector to the one
    the first run's manifest names.
    """
    if not mask_runs:
        raise MaskxError("no mask run to evaluate")
    first = next(iter(mask_runs.values()))
    det = load_detector_run(detector or detector_of_mask_run(first))
    cfg = cfg if cfg is not None else load_eval_config(None, det.run_dir)
    runs = {name: load_mask_run(run, det) for name, run in mask_runs.items()}
    run_data = next(iter(runs.values())).data
    val_json = val_json or run_data.val_json
    skipped: list[str] = []
    data = load_validation(det, val_json, val_images or run_data.val_images, cfg.max_images, skipped)
    sets, warnings = run_class_sets(cfg.split, data.gt["categories"], {name: run.set_a for name, run in runs.items()})
    warnings = skipped + warnings
    inference = inference_on_dataset(HeadPredictions.of_runs(det, runs, cfg.gt_boxes), data,
                                      {name: (name, sets) for name in runs}, cfg, progress)
    protocol = protocol_of(data.gt)
    unmasked = classes_without_masks(data.gt)
    notes = [mask_ap_note(unmasked, data.gt["categories"])] if unmasked else []
    result = EvalResult(inference.metrics, sets, len(data.dataset), inference.seconds, inference.predictions, protocol.name,
                        list(protocol.metrics), warnings, notes)
    if json_out:
        described = {name: {"run": str(mask_runs[name]), **run.description()} for name, run in runs.items()}
        write_metrics(json_out, cfg, data.gt, result, described,
                      {"detector": file_record(det.checkpoint), "val_json": file_record(val_json)})
    return result

"""Scoring a COCO results file: another system's detections (detectron2, mmdetection, torchvision,
``maskx predict``) against a ground-truth file, with the same sets, metrics and rules as the run mode,
through the same path (:class:`~pipelines.evaluation.inference.ResultsFile`,
:func:`~pipelines.evaluation.inference.inference_on_dataset`).

``maskx eval --gt FILE --results FILE`` calls :func:`evaluate_results_file`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.config import EvalConfig
from pipelines.data.coco import load_coco
from pipelines.engine.run_dir import file_record
from pipelines.errors import MaskxError
from pipelines.evaluation.inference import EvalData, ResultsFile, inference_on_dataset
from pipelines.evaluation.scoring import PAPER_SPLIT, Scores, class_sets
from pipelines.io import write_json
from pipelines.progress import NULL_PROGRESS, Progress


@dataclass
class ResultsEvalResult:
    scores: Scores  # metrics {iou_type: {set: {metric: value}}}, protocol, notes
    sets: dict[str, list[int]]
    images: int
    detections: int
    seconds: float
    warnings: list[str] = field(default_factory=list)  # what loading the ground truth skipped


def default_metrics_path(results: str | Path, split: str) -> Path:
    """``dets.json`` -> ``dets_metrics_<split>.json`` beside it."""
    results = Path(results)
    return results.with_name(f"{results.stem}_metrics_{(split or PAPER_SPLIT).replace(':', '_')}.json")


def evaluate_results_file(gt_path: str | Path, results_path: str | Path, cfg: EvalConfig, json_out: str | Path | None = None,
                          progress: Progress = NULL_PROGRESS) -> ResultsEvalResult:
    """Mask and box AP of a COCO results file on every image of a COCO or LVIS ground-truth file.

    ``cfg.split`` names set B; set A is the rest (left out when empty). The protocol (COCO or LVIS)
    follows the ground truth; mask AP is scored when every result has a ``segmentation``, box AP
    when every result has a ``bbox`` (a note says which one was left out). ``cfg.backend`` picks
    the implementation; ``cfg.max_images``, ``score_thresh`` and ``gt_boxes`` concern detector runs
    and must be left at their defaults. Writes the metrics file to ``json_out`` (atomically).
    Raises MaskxError naming the file (and the result index) for anything malformed.
    """
    if cfg.max_images or cfg.gt_boxes:
        raise MaskxError("max_images and gt_boxes apply to mask runs, not to a results file")
    t0 = time.perf_counter()
    gt, report = load_coco(gt_path)
    if not gt["images"]:
        raise MaskxError("the ground truth has no images", gt_path)
    producer = ResultsFile.read(results_path)
    sets = class_sets(cfg.split, gt["categories"])
    inference = inference_on_dataset(producer, EvalData(gt, gt_path=gt_path), {producer.name: (producer.name, sets)}, cfg,
                                     progress)
    scores, results = inference.scores[producer.name], inference.predictions[producer.name]
    seconds = time.perf_counter() - t0
    if json_out:
        write_json(json_out, {
            "split": cfg.split,
            "sets": {k: v for k, v in sets.items() if k != "all"},
            **scores.record(),
            "notes": scores.notes,
            "images": len(gt["images"]),
            "detections": len(results),
            "seconds": round(seconds, 1),
            "config": {"split": cfg.split, "backend": cfg.backend},
            "inputs": {"gt": file_record(gt_path), "results": file_record(results_path)},
        })
    return ResultsEvalResult(scores, sets, len(gt["images"]), len(results), seconds, report.warnings(gt_path))

""""Faster R-CNN tested with GrabCut" (Table 3.5): masks from GrabCut inside every detected box.

The detector (any ``detect-train`` or end-to-end run) gives boxes, scores and classes; each box's
mask is GrabCut's foreground inside it (:class:`pipelines.evaluation.inference.GrabCutPredictions`).
Scored like ``maskx eval``, through the same path (:func:`~pipelines.evaluation.inference.inference_on_dataset`):
mask and box AP on set B, A and all.
"""

from __future__ import annotations

from pathlib import Path

from pipelines.config import EvalConfig
from pipelines.engine.run_dir import file_record, load_detector_run, load_eval_config
from pipelines.evaluation.inference import GrabCutPredictions, inference_on_dataset, load_validation
from pipelines.evaluation.scoring import EvalResult, class_sets, protocol_of, write_metrics
from pipelines.progress import NULL_PROGRESS, Progress


def evaluate_grabcut(detector: str | Path, cfg: EvalConfig | None = None, val_json: str | Path | None = None,
                     val_images: str | Path | None = None, iterations: int = 5, progress: Progress = NULL_PROGRESS,
                     json_out: str | Path | None = None) -> EvalResult:
    """Evaluate "detector + GrabCut" on a validation split (default: the detector run's ``data.val_json``).

    ``cfg`` defaults to the ``eval:`` section of the detector run's recipe (:func:`load_eval_config`).
    """
    det = load_detector_run(detector)
    cfg = cfg if cfg is not None else load_eval_config(None, det.run_dir)
    val_json = val_json or det.data.val_json
    data = load_validation(det, val_json, val_images or det.data.val_images, cfg.max_images)
    sets = class_sets(cfg.split, data.gt["categories"])
    producer = GrabCutPredictions(det, iterations)
    inference = inference_on_dataset(producer, data, {producer.name: (producer.name, sets)}, cfg, progress)
    protocol = protocol_of(data.gt)
    result = EvalResult(inference.metrics, sets, len(data.dataset), inference.seconds, inference.predictions, protocol.name,
                        list(protocol.metrics))
    if json_out:
        write_metrics(json_out, cfg, data.gt, result, {"grabcut": {"run": str(det.run_dir), "head": "grabcut", "grabcut_iterations": iterations}},
                      {"detector": file_record(det.checkpoint), "val_json": file_record(val_json)})
    return result

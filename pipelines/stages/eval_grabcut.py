""""Faster R-CNN tested with GrabCut" (Table 3.5): masks from GrabCut inside every detected box.

The detector (any ``detect-train`` or end-to-end run) gives boxes, scores and classes; each box's
mask is GrabCut's foreground inside it, computed on the full-resolution image (no 28x28 head), so
every mask lies within its box. Scored like ``maskx eval``: mask and box AP on set B, A and all.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from pipelines.config import EvalConfig, to_dict
from pipelines.data.coco import CocoDataset, check_same_categories, collate
from pipelines.data.grabcut import grabcut_masks
from pipelines.engine.device import resolve_device
from pipelines.engine.run_dir import file_record
from pipelines.errors import MaskxError
from pipelines.evaluation import class_sets, protocol_of, score, to_coco_results
from pipelines.io import write_json
from pipelines.progress import NULL_PROGRESS, Progress
from pipelines.stages.common import load_detector_run, load_split
from pipelines.stages.evaluate import EvalResult, set_inference_limits


@torch.no_grad()
def grabcut_predictions(model, dataset: CocoDataset, categories: list[dict], device: torch.device, iterations: int = 5,
                        progress: Progress = NULL_PROGRESS, batch_images: int = 4) -> list[dict]:
    """COCO results of the detector's boxes with GrabCut masks, for every image of ``dataset``."""
    model = model.to(device).eval()
    cat_ids = torch.tensor([c["id"] for c in categories])
    results: list[dict] = []
    task = progress.task("predict + grabcut", len(dataset))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_images, collate_fn=collate, num_workers=0)
    for images, targets in loader:
        detections = model([im.to(device) for im in images])  # boxes at the original image size
        for im, d, t in zip(images, detections, targets):
            rgb = (im.permute(1, 2, 0).numpy() * 255 + 0.5).astype("uint8")
            boxes = d["boxes"].cpu().numpy()
            masks = grabcut_masks(rgb, boxes, iterations)
            results.extend(to_coco_results(int(t["image_id"]), boxes, d["scores"].cpu().numpy(),
                                           cat_ids[d["labels"].cpu() - 1].numpy(), masks))
        task.advance(len(images))
    task.close()
    return results


def evaluate_grabcut(detector: str | Path, cfg: EvalConfig, val_json: str | Path | None = None, val_images: str | Path | None = None,
                     iterations: int = 5, progress: Progress = NULL_PROGRESS, json_out: str | Path | None = None) -> EvalResult:
    """Evaluate "detector + GrabCut" on a validation split (default: the detector run's ``data.val_json``)."""
    det = load_detector_run(detector)
    data_cfg = det.config.get("data", {})
    val_json = val_json or data_cfg.get("val_json")
    val_images = val_images or data_cfg.get("val_images")
    gt, _ = load_split(str(val_json) if val_json else "", "val", require_masks=True)
    check_same_categories(det.categories, gt["categories"], "the detector's classes", val_json)
    sets = class_sets(cfg.split, gt["categories"])
    dataset = CocoDataset(gt, val_images, with_masks=False, max_images=cfg.max_images)
    if len(dataset) == 0:
        raise MaskxError("the validation split has no images", val_json)
    set_inference_limits(det.model, gt, cfg)
    t0 = time.perf_counter()
    results = grabcut_predictions(det.model, dataset, det.categories, resolve_device("auto"), iterations, progress)
    metrics = {"grabcut": score(gt, results, sets, backend=cfg.backend, image_ids=[im["id"] for im in dataset.images],
                                progress=progress).metrics}
    seconds = time.perf_counter() - t0
    protocol = protocol_of(gt)
    if json_out:
        write_json(json_out, {
            "split": cfg.split,
            "protocol": protocol.name,
            "max_dets": protocol.max_dets,
            "sets": {k: v for k, v in sets.items() if k != "all"},
            "heads": {"grabcut": {"run": str(det.run_dir), "head": "grabcut", "grabcut_iterations": iterations, **metrics["grabcut"]}},
            "images": len(dataset),
            "seconds": round(seconds, 1),
            "config": to_dict(cfg),
            "inputs": {"detector": file_record(det.checkpoint), "val_json": file_record(val_json)},
        })
    return EvalResult(metrics, sets, len(dataset), seconds, {"grabcut": results}, protocol.name, list(protocol.metrics))

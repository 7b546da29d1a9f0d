"""Producing predictions to score: COCO results of mask sides, or of GrabCut, on every image of a data set.

Boxes come from the detector alone (one pass per image for every mask side), so every head is
scored on the same detections; :mod:`pipelines.evaluation.scoring` scores them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipelines.config import EvalConfig
from pipelines.data.coco import CocoDataset, check_same_categories, collate, load_split
from pipelines.data.grabcut import grabcut_masks
from pipelines.engine.run_dir import DetectorRun
from pipelines.errors import MaskxError
from pipelines.evaluation.results import to_coco_results
from pipelines.evaluation.scoring import LVIS, protocol_of
from pipelines.modeling.maskx_rcnn import build_mask_roi_pool, detect_and_segment
from pipelines.progress import NULL_PROGRESS, Progress


def load_validation(det: DetectorRun, val_json: str | Path | None, val_images: str | Path | None,
                    max_images: int = 0, warnings: list[str] | None = None) -> tuple[dict, CocoDataset]:
    """The validation ground truth and its images (the first ``max_images``; 0 = all), checked against
    the detector's classes. Box-only instances are valid: mask AP leaves their classes out, box AP keeps them.
    What loading skipped (boxes of zero area, ...; counted, one line each) is added to ``warnings``."""
    gt, report = load_split(str(val_json) if val_json else "", "val")
    if warnings is not None:
        warnings.extend(report.warnings(val_json))
    check_same_categories(det.categories, gt["categories"], "the detector's classes", val_json)
    dataset = CocoDataset(gt, val_images or "", with_masks=False, max_images=max_images)
    if len(dataset) == 0:
        raise MaskxError("the validation split has no images", val_json)
    return gt, dataset


def set_inference_limits(model: torch.nn.Module, gt: dict, cfg: EvalConfig) -> None:
    """The detector's test-time score threshold (``cfg.score_thresh``) and, on an LVIS ground truth,
    LVIS's 300 detections per image in place of the detector's ``box_detections_per_img``."""
    model.roi_heads.score_thresh = cfg.score_thresh
    if protocol_of(gt) is LVIS:
        model.roi_heads.detections_per_img = LVIS.max_dets


@torch.no_grad()
def predict_dataset(det: DetectorRun, heads: dict[str, torch.nn.Module], dataset: CocoDataset, roi_size: int,
                    device: torch.device, progress: Progress = NULL_PROGRESS, batch_images: int = 4,
                    mask_threshold: float = 0.5, gt_boxes: bool = False) -> dict[str, list[dict]]:
    """COCO results (boxes, scores, RLE masks) of every mask side in ``heads`` on every image of ``dataset``.

    The detector runs with its own limits (see :func:`set_inference_limits`); with ``gt_boxes`` the
    boxes are the ground-truth boxes and classes of ``dataset`` (score 1) instead: mask quality alone.
    """
    model = det.model.to(device).eval()
    roi_pool = build_mask_roi_pool(roi_size)
    for h in heads.values():
        h.to(device).eval()
    cat_ids = torch.tensor([c["id"] for c in det.categories])
    results: dict[str, list[dict]] = {name: [] for name in heads}
    task = progress.task("predict", len(dataset))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_images, collate_fn=collate, num_workers=0)
    for images, targets in loader:
        per_head = detect_and_segment(model, roi_pool, heads, list(images), device, mask_threshold,
                                      given=list(targets) if gt_boxes else None, paste=False)
        for name, dets in per_head.items():
            for d, t in zip(dets, targets):  # each mask pasted and encoded in turn: one full-size mask at a time
                results[name].extend(to_coco_results(int(t["image_id"]), d["boxes"].numpy(), d["scores"].numpy(),
                                                     cat_ids[d["labels"] - 1].numpy(), d["masks"]))
        task.advance(len(images))
    task.close()
    return results


@torch.no_grad()
def grabcut_predictions(det: DetectorRun, dataset: CocoDataset, device: torch.device, iterations: int = 5,
                        progress: Progress = NULL_PROGRESS, batch_images: int = 4) -> list[dict]:
    """COCO results of the detector's boxes with GrabCut masks (Table 3.5), for every image of ``dataset``.

    Each box's mask is GrabCut's foreground inside it on the full-resolution image, so every mask
    lies within its box.
    """
    model = det.model.to(device).eval()
    cat_ids = torch.tensor([c["id"] for c in det.categories])
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

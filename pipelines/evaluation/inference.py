"""The one evaluation path: a prediction producer, the data, and :func:`inference_on_dataset`.

A producer makes COCO results to score (as detectron2 separates producing predictions from
evaluating them, ``inference_on_dataset(model, loader, evaluator)``):

- :class:`HeadPredictions`: mask sides of mask runs on a detector's detections (one detector pass
  per image for every head, so every head is scored on the same detections);
- :class:`GrabCutPredictions`: the detector's boxes with GrabCut masks (Table 3.5's "Faster R-CNN
  tested with GrabCut");
- :class:`ResultsFile`: a COCO results file of any system.

:func:`inference_on_dataset` is the only function that sets a detector's inference limits
(``eval.score_thresh``; LVIS's 300 detections per image on an LVIS ground truth), runs a producer
and scores its predictions (:func:`pipelines.evaluation.scoring.score`). ``maskx eval`` (runs and
results files), ``maskx eval-grabcut``, the sweep and the quick start all call it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch.utils.data import Subset

from pipelines.config import EvalConfig
from pipelines.data.coco import CocoDataset, check_same_categories, collate, load_split
from pipelines.data.grabcut import grabcut_masks
from pipelines.engine.device import resolve_device
from pipelines.engine.run_dir import DetectorRun, MaskRun
from pipelines.errors import MaskxError
from pipelines.evaluation.coco_eval import IOU_TYPES
from pipelines.evaluation.results import to_coco_results
from pipelines.evaluation.scoring import LVIS, Scores, protocol_of, score
from pipelines.io import read_json
from pipelines.modeling.maskx_rcnn import build_mask_roi_pool, detect_and_segment
from pipelines.progress import NULL_PROGRESS, Progress


@dataclass
class EvalData:
    """What predictions are scored on: the ground truth (a COCO or LVIS dict, named ``gt_path`` in
    errors) and, for a producer that runs a model, the images it predicts on (``dataset``: the
    first ``max_images`` of the ground truth, a :class:`~pipelines.data.coco.CocoDataset` or a
    ``Subset`` of one); without ``dataset`` every ground-truth image counts."""

    gt: dict
    dataset: CocoDataset | Subset | None = None
    gt_path: str | Path | None = None

    @property
    def image_ids(self) -> list[int] | None:
        """The ids of ``dataset``'s images, in order (None without ``dataset``)."""
        if isinstance(self.dataset, Subset):
            return [self.dataset.dataset.images[i]["id"] for i in self.dataset.indices]
        return None if self.dataset is None else [im["id"] for im in self.dataset.images]


def load_validation(det: DetectorRun, val_json: str | Path | None, val_images: str | Path | None,
                    max_images: int = 0, warnings: list[str] | None = None) -> EvalData:
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
    return EvalData(gt, dataset, val_json)


class PredictionProducer(Protocol):
    """What :func:`inference_on_dataset` runs: ``predict`` gives name -> COCO results (``image_id``,
    ``category_id``, ``score``, ``bbox`` [x, y, w, h], ``segmentation`` RLE) on ``data``'s images."""

    detector: DetectorRun | None  # whose inference limits apply (None: nothing is run)
    iou_types: tuple[str, ...] | None  # what is scored (None: whatever the results carry)
    source: Path | None  # the file the results come from, named in errors

    def predict(self, data: EvalData, progress: Progress) -> dict[str, list[dict]]: ...


@dataclass
class HeadPredictions:
    """Mask sides ``heads`` (name -> :class:`~pipelines.modeling.mask_heads.MaskSide`) on the detections
    of ``detector`` (or, ``gt_boxes``, on the ground-truth boxes and classes, score 1: mask quality
    alone); every head reads ``roi_size`` x ``roi_size`` RoI features."""

    detector: DetectorRun
    heads: dict[str, torch.nn.Module]
    roi_size: int
    gt_boxes: bool = False
    batch_images: int = 4
    mask_threshold: float = 0.5
    iou_types: tuple[str, ...] | None = IOU_TYPES
    source: Path | None = None

    @classmethod
    def of_runs(cls, detector: DetectorRun, runs: Mapping[str, MaskRun], gt_boxes: bool = False,
                where: str | Path | None = None) -> HeadPredictions:
        """The mask sides of ``runs`` (name -> run), which must share one RoI size (else an error naming ``where``)."""
        sizes = sorted({run.head.roi_size for run in runs.values()})
        if len(sizes) > 1:
            raise MaskxError(f"these mask runs use different RoI sizes ({sizes}); evaluate them separately", where)
        return cls(detector, {name: run.side for name, run in runs.items()}, sizes[0], gt_boxes)

    @torch.no_grad()
    def predict(self, data: EvalData, progress: Progress = NULL_PROGRESS) -> dict[str, list[dict]]:
        device = resolve_device("auto")
        model = self.detector.model.to(device).eval()
        roi_pool = build_mask_roi_pool(self.roi_size)
        for h in self.heads.values():
            h.to(device).eval()
        cat_ids = torch.tensor([c["id"] for c in self.detector.categories])
        results: dict[str, list[dict]] = {name: [] for name in self.heads}
        task = progress.task("predict", len(data.dataset))
        loader = torch.utils.data.DataLoader(data.dataset, batch_size=self.batch_images, collate_fn=collate, num_workers=0)
        for images, targets in loader:
            per_head = detect_and_segment(model, roi_pool, self.heads, list(images), device, self.mask_threshold,
                                          given=list(targets) if self.gt_boxes else None, paste=False)
            for name, dets in per_head.items():
                for d, t in zip(dets, targets):  # each mask pasted and encoded in turn: one full-size mask at a time
                    results[name].extend(to_coco_results(int(t["image_id"]), d["boxes"].numpy(), d["scores"].numpy(),
                                                         cat_ids[d["labels"] - 1].numpy(), d["masks"]))
            task.advance(len(images))
        task.close()
        return results


@dataclass
class GrabCutPredictions:
    """The detector's boxes, each with GrabCut's foreground inside it on the full-resolution image
    (``iterations`` per box) as its mask, under ``name`` (Table 3.5)."""

    detector: DetectorRun
    iterations: int = 5
    name: str = "grabcut"
    batch_images: int = 4
    iou_types: tuple[str, ...] | None = IOU_TYPES
    source: Path | None = None

    @torch.no_grad()
    def predict(self, data: EvalData, progress: Progress = NULL_PROGRESS) -> dict[str, list[dict]]:
        device = resolve_device("auto")
        model = self.detector.model.to(device).eval()
        cat_ids = torch.tensor([c["id"] for c in self.detector.categories])
        results: list[dict] = []
        task = progress.task("predict + grabcut", len(data.dataset))
        loader = torch.utils.data.DataLoader(data.dataset, batch_size=self.batch_images, collate_fn=collate, num_workers=0)
        for images, targets in loader:
            detections = model([im.to(device) for im in images])  # boxes at the original image size
            for im, d, t in zip(images, detections, targets):
                rgb = (im.permute(1, 2, 0).numpy() * 255 + 0.5).astype("uint8")
                boxes = d["boxes"].cpu().numpy()
                masks = grabcut_masks(rgb, boxes, self.iterations)
                results.extend(to_coco_results(int(t["image_id"]), boxes, d["scores"].cpu().numpy(),
                                               cat_ids[d["labels"].cpu() - 1].numpy(), masks))
            task.advance(len(images))
        task.close()
        return {self.name: results}


@dataclass
class ResultsFile:
    """The detections of a COCO results file (``source``, read by :meth:`read`), under ``name``; mask AP
    and box AP as its rows carry them."""

    source: Path
    results: list
    name: str = "results"
    detector: DetectorRun | None = None
    iou_types: tuple[str, ...] | None = None

    @classmethod
    def read(cls, path: str | Path) -> ResultsFile:
        """The file at ``path`` (JSON; one error naming it when it cannot be read), checked when scored."""
        return cls(Path(path), read_json(path, "results file"))

    def predict(self, data: EvalData, progress: Progress = NULL_PROGRESS) -> dict[str, list[dict]]:
        return {self.name: self.results}


@dataclass
class Inference:
    """What :func:`inference_on_dataset` returns: each job's :class:`~pipelines.evaluation.scoring.Scores`,
    the producer's predictions (name -> COCO results) and the seconds it took to predict and score."""

    scores: dict[str, Scores]
    predictions: dict[str, list[dict]]
    seconds: float
    metrics: dict[str, dict] = field(init=False)  # job -> {iou_type: {set: {metric: value}}}

    def __post_init__(self) -> None:
        self.metrics = {job: s.metrics for job, s in self.scores.items()}


def inference_on_dataset(producer: PredictionProducer, data: EvalData, jobs: Mapping[str, tuple[str, Mapping[str, list[int]]]],
                         cfg: EvalConfig, progress: Progress = NULL_PROGRESS) -> Inference:
    """Set ``cfg``'s inference limits on the producer's detector, predict on ``data``, score every job.

    ``jobs``: job -> (the name of one of the producer's predictions, its class sets ``{"B": ids,
    "A": ids, "all": ids}``); a prediction may be scored in several jobs (the oracle under two splits),
    and no job at all predicts only (a picture). The limits: the detector's test-time score
    threshold is ``cfg.score_thresh`` and, on an LVIS ground truth, it keeps LVIS's 300 detections
    per image in place of its ``box_detections_per_img``.
    """
    if producer.detector is not None:
        heads = producer.detector.model.roi_heads
        heads.score_thresh = cfg.score_thresh
        if protocol_of(data.gt) is LVIS:
            heads.detections_per_img = LVIS.max_dets
    t0 = time.perf_counter()
    predictions = producer.predict(data, progress)
    scores = {job: score(data.gt, predictions[name], sets, producer.iou_types, cfg.backend, data.image_ids, progress,
                         data.gt_path, producer.source) for job, (name, sets) in jobs.items()}
    return Inference(scores, predictions, time.perf_counter() - t0)

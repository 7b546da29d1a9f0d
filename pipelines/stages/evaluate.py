"""Evaluation: mask and box AP on set B, set A and all classes, by COCO's or LVIS's rules
(:func:`pipelines.evaluation.score` picks them from the ground truth).

Several mask heads trained on the same frozen detector are evaluated in one pass: the detector
runs once per image and every head predicts masks for the same detections. On an LVIS ground
truth the detector keeps up to 300 detections per image (the LVIS protocol's limit) whatever its
``box_detections_per_img``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torchvision.models.detection.transform import resize_boxes

from pipelines.config import EvalConfig, to_dict
from pipelines.data.coco import CocoDataset, check_same_categories, collate
from pipelines.engine.device import resolve_device
from pipelines.engine.run_dir import file_record, read_manifest
from pipelines.errors import MaskxError
from pipelines.evaluation import LVIS, METRICS, class_sets, protocol_of, score, to_coco_results
from pipelines.io import write_json
from pipelines.modeling.detector import FPN_LEVELS
from pipelines.modeling.maskx_rcnn import build_mask_roi_pool
from pipelines.progress import NULL_PROGRESS, Progress
from pipelines.stages.common import DetectorRun, load_detector_run, load_split
from pipelines.stages.mask_train import load_mask_run


@dataclass
class EvalResult:
    metrics: dict[str, dict]  # head name -> {"segm": {"B": {...}, "A": {...}, "all": {...}}, "bbox": {...}}
    sets: dict[str, list[int]]
    images: int
    seconds: float
    detections: dict[str, list[dict]] = field(default_factory=dict)
    protocol: str = "coco"  # "coco" or "lvis": whose rules scored the detections
    metric_names: list[str] = field(default_factory=lambda: list(METRICS))


def detector_of_mask_run(mask_run: str | Path) -> Path:
    """The detector checkpoint a mask run was trained against (from its manifest)."""
    manifest = read_manifest(mask_run)
    try:
        return Path(manifest["inputs"]["detector"]["path"])
    except KeyError:
        raise MaskxError("manifest does not name the detector; pass --detector", Path(mask_run) / "manifest.json") from None


@torch.no_grad()
def detect_and_segment(model, roi_pool, heads: dict[str, torch.nn.Module], images: list[torch.Tensor], device: torch.device,
                       mask_threshold: float = 0.5, keep_label: torch.Tensor | None = None,
                       given: list[dict] | None = None) -> dict[str, list[dict]]:
    """Run the detector once on a batch of images, then every mask head on the same detections.

    ``model`` is a torchvision Faster R-CNN in eval mode on ``device``; ``roi_pool`` the mask RoIAlign
    (``[R, C, S, S]`` features per detection); ``images`` float32 ``[3, H_i, W_i]`` in [0, 1], any
    sizes. ``keep_label`` (bool ``[K + 1]``, optional) drops detections of the other classes before
    masks are computed. ``given`` (optional, one dict per image: ``boxes`` float32 ``[N_i, 4]`` in the
    image's pixels, ``labels`` int64 ``[N_i]``) replaces the detector's detections: those boxes are
    segmented, with score 1 (mask quality alone, ``maskx eval --gt-boxes``). Each head computes one
    ``2S x 2S`` map per detection, for its own class, so memory does not grow with the number of
    classes.

    Returns head name -> one dict per image, on the CPU: ``boxes`` float32 ``[N, 4]`` (x1, y1, x2, y2
    in the image's pixels), ``scores`` float32 ``[N]``, ``labels`` int64 ``[N]`` (1..K) and ``masks``
    uint8 ``[N, H_i, W_i]`` (mask probability >= ``mask_threshold``).
    """
    original_sizes = [tuple(im.shape[-2:]) for im in images]
    image_list, _ = model.transform([im.to(device) for im in images])
    features = model.backbone(image_list.tensors)
    if given is None:
        proposals, _ = model.rpn(image_list, features)
        detections, _ = model.roi_heads(features, proposals, image_list.image_sizes)
    else:
        detections = [{"boxes": resize_boxes(g["boxes"].to(device), size, new_size), "labels": g["labels"].to(device),
                       "scores": torch.ones(len(g["boxes"]), device=device)}
                      for g, size, new_size in zip(given, original_sizes, image_list.image_sizes)]
    if keep_label is not None:
        detections = [{k: v[keep_label.to(v.device)[d["labels"]]] for k, v in d.items()} for d in detections]
    boxes = [d["boxes"] for d in detections]
    labels = torch.cat([d["labels"] for d in detections])
    counts = [len(b) for b in boxes]
    roi_features = roi_pool(features, boxes, image_list.image_sizes) if sum(counts) else None
    out: dict[str, list[dict]] = {}
    for name, head in heads.items():
        if roi_features is not None:
            probs = head(roi_features, labels).sigmoid()
        else:
            m = 2 * roi_pool.output_size[0]
            probs = features[FPN_LEVELS[0]].new_zeros((0, m, m))
        dets = [{**d, "masks": p[:, None]} for d, p in zip(detections, probs.split(counts))]
        dets = model.transform.postprocess(dets, image_list.image_sizes, original_sizes)
        out[name] = [{"boxes": d["boxes"].float().cpu(), "scores": d["scores"].float().cpu(), "labels": d["labels"].cpu(),
                      "masks": (d["masks"][:, 0] >= mask_threshold).to(torch.uint8).cpu()} for d in dets]
    return out


@torch.no_grad()
def predict_dataset(det: DetectorRun, heads: dict[str, torch.nn.Module], dataset: CocoDataset, roi_size: int,
                    device: torch.device, progress: Progress = NULL_PROGRESS, batch_images: int = 4,
                    mask_threshold: float = 0.5, gt_boxes: bool = False) -> dict[str, list[dict]]:
    """COCO results (boxes, scores, RLE masks) of every head on every image of ``dataset``.

    Boxes come from the detector alone, so they are the same for every head; with ``gt_boxes`` they
    are the ground-truth boxes and classes of ``dataset`` instead (score 1).
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
                                      given=list(targets) if gt_boxes else None)
        for name, dets in per_head.items():
            for d, t in zip(dets, targets):
                results[name].extend(to_coco_results(int(t["image_id"]), d["boxes"].numpy(), d["scores"].numpy(),
                                                     cat_ids[d["labels"] - 1].numpy(), d["masks"].numpy()))
        task.advance(len(images))
    task.close()
    return results


def set_inference_limits(model, gt: dict, cfg: EvalConfig) -> None:
    """The detector's test-time score threshold (``cfg.score_thresh``) and, on an LVIS ground truth,
    LVIS's 300 detections per image in place of the detector's ``box_detections_per_img``."""
    model.roi_heads.score_thresh = cfg.score_thresh
    if protocol_of(gt) is LVIS:
        model.roi_heads.detections_per_img = LVIS.max_dets


def score_heads(det: DetectorRun, heads: dict[str, torch.nn.Module], gt: dict, dataset: CocoDataset,
                jobs: dict[str, tuple[str, dict[str, list[int]]]], roi_size: int, cfg: EvalConfig,
                progress: Progress = NULL_PROGRESS) -> tuple[dict[str, dict], dict[str, list[dict]]]:
    """One prediction pass for every head (the detector runs once per image), then COCOeval per job.

    ``jobs``: job name -> (head name, sets), sets being ``{"B": ids, "A": ids, ...}``; a head may
    appear in several jobs (e.g. the oracle scored under two class splits). Returns (job name ->
    ``evaluate_sets`` metrics, head name -> COCO results).
    """
    set_inference_limits(det.model, gt, cfg)
    results = predict_dataset(det, heads, dataset, roi_size, resolve_device("auto"), progress, gt_boxes=cfg.gt_boxes)
    image_ids = [im["id"] for im in dataset.images]
    metrics: dict[str, dict] = {}
    for job, (head, sets) in jobs.items():
        metrics[job] = score(gt, results[head], sets, backend=cfg.backend, image_ids=image_ids, progress=progress).metrics
    return metrics, results


def evaluate_heads(mask_runs: dict[str, str | Path], cfg: EvalConfig, val_json: str | Path | None = None,
                   val_images: str | Path | None = None, detector: str | Path | None = None,
                   progress: Progress = NULL_PROGRESS, json_out: str | Path | None = None) -> EvalResult:
    """Evaluate mask runs (name -> run folder) that share one detector on a validation split.

    ``cfg.split`` names set B (``nonvoc`` for voc -> non-voc); set A is the rest. The data defaults
    to the first run's ``data.val_json`` / ``data.val_images``.
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
    val_images = val_images or data_cfg.get("val_images")
    gt, _ = load_split(str(val_json) if val_json else "", "val", require_masks=True)
    check_same_categories(det.categories, gt["categories"], "the detector's classes", val_json)
    sets = class_sets(cfg.split, gt["categories"])
    dataset = CocoDataset(gt, val_images, with_masks=False, max_images=cfg.max_images)
    if len(dataset) == 0:
        raise MaskxError("the validation split has no images", val_json)
    sizes = {c["head"]["roi_size"] for c in ckpts.values()}
    if len(sizes) > 1:
        raise MaskxError(f"these mask runs use different RoI sizes ({sorted(sizes)}); evaluate them separately")
    roi_size = sizes.pop()
    t0 = time.perf_counter()
    metrics, results = score_heads(det, heads, gt, dataset, {name: (name, sets) for name in heads}, roi_size, cfg, progress)
    seconds = time.perf_counter() - t0
    protocol = protocol_of(gt)
    if json_out:
        record = {
            "split": cfg.split,
            "protocol": protocol.name,
            "max_dets": protocol.max_dets,
            "sets": {k: v for k, v in sets.items() if k != "all"},
            "heads": {name: {"run": str(mask_runs[name]), "head": ckpts[name]["head"]["head"], "mlp": ckpts[name]["head"]["mlp"],
                             "input": ckpts[name]["head"]["input"], "trained_set_a": ckpts[name]["set_a"], **metrics[name]}
                      for name in heads},
            "images": len(dataset),
            "seconds": round(seconds, 1),
            "config": to_dict(cfg),
            "inputs": {"detector": file_record(det.checkpoint), "val_json": file_record(val_json)},
        }
        write_json(json_out, record)
    return EvalResult(metrics, sets, len(dataset), seconds, results, protocol.name, list(protocol.metrics))

"""COCO mask and box AP restricted to class subsets (set A, set B, all), as the paper reports them.

The numbers are COCOeval's: IoU thresholds 0.50:0.05:0.95, 101-point interpolated precision,
at most 100 detections per image and class, COCO's small / medium / large area ranges, crowd
ground truth ignored. AP on a class subset is the mean over the subset's classes, exactly what
``COCOeval`` gives with ``params.catIds`` set to the subset.

This module is the COCO engine of :func:`pipelines.evaluation.scoring.score` (which validates the
inputs and picks COCO's or LVIS's rules from the ground truth), and holds the helpers both engines
share: ground truth and results as COCOeval indexes them, and subset summaries of a precision array.

Backends (``backend=``):

``"faster"``
    ``faster_coco_eval.COCOeval_faster``: the same algorithm with the per-image matching and
    accumulation in C++; tests check that it gives the same numbers as the reference but for the
    last bit of a float (pycocotools divides by ``tp + fp + eps``): at most 2.2e-16 apart.
``"reference"`` (also accepted under its old name ``"pycocotools"``)
    The reference implementation (``pycocotools.cocoeval.COCOeval``).

Details that matter for the numbers:

* Mask AP uses each detection's *mask* area for the small/medium/large ranges (a ``bbox`` field in
  the results is ignored for ``"segm"``; pycocotools would otherwise take the box area, as
  detectron2 also avoids). Box AP uses the box area. Ground truth uses its ``area`` field.
* Ground-truth annotations are evaluated on copies whose ids are renumbered 1..N (COCOeval treats
  an id of 0 as "unmatched"); the caller's dict is never modified. Missing ``iscrowd`` means 0,
  missing ``area`` means the box area.
* A metric is ``None`` when it is undefined: no (non-crowd) ground truth of the subset in that
  area range, or an empty subset. ``None`` is JSON's ``null``; it is never NaN.
* Results are evaluated even when there are none: every defined metric is then 0.0.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Callable

import numpy as np
from pycocotools import mask as mask_utils

from pipelines.data.annotations import has_usable_mask
from pipelines.errors import MaskxError
from pipelines.progress import NULL_PROGRESS, Progress

METRICS = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
BACKENDS = ("faster", "reference")
DEFAULT_BACKEND = "faster"
IOU_TYPES = ("segm", "bbox")
COCO_MAX_DETS = 100  # per image and class

_ALIASES = {"pycocotools": "reference"}

# metric -> (area range label, IoU threshold or None for the mean over 0.50:0.95).
_SPEC: dict[str, tuple[str, float | None]] = {
    "AP": ("all", None),
    "AP50": ("all", 0.5),
    "AP75": ("all", 0.75),
    "APs": ("small", None),
    "APm": ("medium", None),
    "APl": ("large", None),
}

Metrics = dict[str, float | None]


def _noop(*args: Any, **kwargs: Any) -> None:
    pass


@contextlib.contextmanager
def silenced():
    """Swallow what COCO/COCOeval print to stdout."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def backend_name(name: str) -> str:
    """The canonical name of a backend (``"pycocotools"`` -> ``"reference"``); MaskxError if unknown."""
    name = _ALIASES.get(name, name)
    if name not in BACKENDS:
        raise MaskxError(f"unknown evaluation backend '{name}' (expected one of: {', '.join(BACKENDS)})")
    return name


def _backend(name: str) -> tuple[type, Callable[[Any, Any, str], Any]]:
    """(COCO index class, factory of an evaluator for (coco_gt, coco_dt, iou_type)) of a backend."""
    if backend_name(name) == "reference":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, lambda gt, dt, iou_type: COCOeval(gt, dt, iou_type)
    from faster_coco_eval import COCO, COCOeval_faster

    return COCO, lambda gt, dt, iou_type: COCOeval_faster(gt, dt, iou_type, print_function=_noop)


def index(coco_cls: type, dataset: dict) -> Any:
    """A COCO API object (pycocotools' or faster-coco-eval's ``COCO``) over a dict, without copying it."""
    coco = coco_cls()
    coco.dataset = dataset
    coco.createIndex()
    return coco


def prepare_gt(gt: Mapping, need_masks: bool, path: str | Path | None = None) -> dict:
    """Validated shallow copy of a COCO dict, annotation ids renumbered 1..N (``path`` names it in errors)."""
    if not isinstance(gt, Mapping) or "images" not in gt or "categories" not in gt:
        raise MaskxError("ground truth is not a COCO dict (needs 'images' and 'categories')", path)
    images = []
    for img in gt["images"]:
        if "id" not in img:
            raise MaskxError(f"ground-truth image record {img} has no 'id'", path)
        im = dict(img)
        im["id"] = int(im["id"])
        images.append(im)
    image_ids = {im["id"] for im in images}
    cat_ids = {int(c["id"]) for c in gt["categories"]}
    categories = [dict(c, id=int(c["id"])) for c in gt["categories"]]
    anns = []
    for i, a in enumerate(gt.get("annotations", [])):
        aid = a.get("id", "?")
        b = dict(a)
        try:
            b["image_id"] = int(a["image_id"])
            b["category_id"] = int(a["category_id"])
            bbox = a["bbox"]
        except KeyError as exc:
            raise MaskxError(f"ground-truth annotation {aid} has no '{exc.args[0]}'", path) from None
        if b["image_id"] not in image_ids:
            raise MaskxError(f"ground-truth annotation {aid} points at image {b['image_id']}, which is not in the image list", path)
        if b["category_id"] not in cat_ids:
            raise MaskxError(f"ground-truth annotation {aid} has category {b['category_id']}, which is not in the category list", path)
        if need_masks and a.get("iscrowd", 0) and not has_usable_mask(a):
            raise MaskxError(f"ground-truth crowd region {aid} has no mask (mask AP needs a crowd region's mask)", path)
        b["id"] = i + 1
        b.setdefault("iscrowd", 0)
        if "area" not in b:
            b["area"] = float(bbox[2]) * float(bbox[3])
        anns.append(b)
    return {"images": images, "categories": categories, "annotations": anns}


def _compressed(seg: Any, height: int, width: int) -> dict:
    """A result's segmentation as compressed RLE (polygons and uncompressed RLE are converted)."""
    if isinstance(seg, dict) and isinstance(seg.get("counts"), (str, bytes)):
        return seg
    if isinstance(seg, dict):
        return mask_utils.frPyObjects(seg, height, width)
    if isinstance(seg, list):
        return mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    raise MaskxError(f"segmentation of type {type(seg).__name__} is not a mask (expected RLE or polygons)")


def _mask_areas(segs: list[dict]) -> list:
    """``mask_utils.area`` of each RLE (batches of 255: pycocotools counts a batch in a uint8)."""
    out: list = []
    for i in range(0, len(segs), 255):
        out.extend(mask_utils.area(segs[i : i + 255]))
    return out


def prepare_results(results: Sequence[dict], iou_type: str, images: dict[int, dict]) -> list[dict]:
    """Result annotations as pycocotools' ``loadRes`` makes them, numbered 1..N in the given order.

    segm: compressed RLE and the mask's area, no ``bbox`` (loadRes would size masks by a given box;
    mask matching needs no box); bbox: the box and its area."""
    anns = []
    if iou_type == "segm":
        segs = []
        for r in results:
            img = images[r["image_id"]]
            segs.append(_compressed(r["segmentation"], img.get("height", 0), img.get("width", 0)))
        for i, (r, seg, area) in enumerate(zip(results, segs, _mask_areas(segs))):
            anns.append({
                "image_id": int(r["image_id"]), "category_id": int(r["category_id"]), "score": r["score"],
                "segmentation": seg, "area": area, "id": i + 1, "iscrowd": 0,
            })
    else:
        for i, r in enumerate(results):
            bb = r["bbox"]
            anns.append({
                "image_id": int(r["image_id"]), "category_id": int(r["category_id"]), "score": r["score"],
                "bbox": bb, "area": bb[2] * bb[3], "id": i + 1, "iscrowd": 0,
            })
    return anns


def summarize_precision(precision: np.ndarray, cat_ids: Sequence[int], subset: Iterable[int], area_labels: Sequence[str],
                        iou_thrs: np.ndarray) -> Metrics:
    """The six metrics of a class subset from an accumulated precision array ``[T, R, K, A]`` (IoU
    thresholds, recall points, the classes ``cat_ids`` in that order, area ranges ``area_labels``),
    as ``summarize`` computes them had the evaluation run on ``subset`` alone (classes are
    independent). None where no entry is defined (COCOeval's -1)."""
    position = {int(c): k for k, c in enumerate(cat_ids)}
    kidx = np.array(sorted(position[int(c)] for c in set(subset)), dtype=np.intp)
    out: Metrics = {}
    for name, (area, thr) in _SPEC.items():
        s = precision
        if thr is not None:
            s = s[np.where(np.isclose(iou_thrs, thr))[0]]
        s = s[:, :, kidx, list(area_labels).index(area)]
        valid = s[s > -1]
        out[name] = float(np.mean(valid)) if valid.size else None
    return out


def coco_scores(gt_ds: dict, results: list[dict], subsets: Mapping[str, set[int]], iou_types: Sequence[str],
                backend: str, img_subset: set[int], progress: Progress = NULL_PROGRESS) -> dict[str, dict[str, Metrics]]:
    """COCOeval on prepared inputs: ``gt_ds`` from :func:`prepare_gt`, ``results`` validated, every
    subset non-empty. Returns ``{iou_type: {set name: metrics}}``.

    The ground truth is indexed once, the results once per IoU type, and COCOeval's matching runs
    once per IoU type over the union of the sets; each set is then summarised from the accumulated
    precision array (the same numbers as separate runs, at the cost of one).
    """
    coco_cls, make_eval = _backend(backend)
    images = {im["id"]: im for im in gt_ds["images"]}
    union = sorted(set().union(*subsets.values()))
    union_set = set(union)
    kept = [r for r in results if r["category_id"] in union_set and r["image_id"] in img_subset]
    out: dict[str, dict[str, Metrics]] = {}
    task = progress.task("COCOeval", len(iou_types))
    with silenced():
        coco_gt = index(coco_cls, gt_ds)
        for t in iou_types:
            dt_ds = {"images": gt_ds["images"], "categories": gt_ds["categories"], "annotations": prepare_results(kept, t, images)}
            coco_eval = make_eval(coco_gt, index(coco_cls, dt_ds), t)
            coco_eval.params.catIds = union
            coco_eval.params.imgIds = sorted(img_subset)
            coco_eval.evaluate()
            coco_eval.accumulate()
            p = coco_eval.params
            precision = np.asarray(coco_eval.eval["precision"])[..., len(p.maxDets) - 1]  # [T, R, K, A] at 100 dets
            out[t] = {name: summarize_precision(precision, p.catIds, ids, p.areaRngLbl, p.iouThrs) for name, ids in subsets.items()}
            task.advance(1)
    task.close()
    return out

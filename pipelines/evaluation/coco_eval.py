"""COCO mask and box AP restricted to class subsets (set A, set B, all), as the paper reports them.

The numbers are COCOeval's: IoU thresholds 0.50:0.05:0.95, 101-point interpolated precision,
at most 100 detections per image and class, COCO's small / medium / large area ranges, crowd
ground truth ignored. AP on a class subset is the mean over the subset's classes, exactly what
``COCOeval`` gives with ``params.catIds`` set to the subset.

Backends (``backend=``):

``"pycocotools"``
    The reference implementation (``pycocotools.cocoeval.COCOeval``).
``"faster"``
    ``faster_coco_eval.COCOeval_faster``: the same algorithm with the per-image matching and
    accumulation in C++; tests check that it gives the same numbers as pycocotools.

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
from collections.abc import Iterable, Mapping
from typing import Any, Callable

import numpy as np
from pycocotools import mask as mask_utils

from pipelines.errors import MaskxError

METRICS = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
BACKENDS = ("faster", "pycocotools")
DEFAULT_BACKEND = "faster"
IOU_TYPES = ("segm", "bbox")

# metric -> (area range label, IoU threshold or None for the mean over 0.50:0.95); maxDets 100.
_SPEC: dict[str, tuple[str, float | None]] = {
    "AP": ("all", None),
    "AP50": ("all", 0.5),
    "AP75": ("all", 0.75),
    "APs": ("small", None),
    "APm": ("medium", None),
    "APl": ("large", None),
}


def _noop(*args: Any, **kwargs: Any) -> None:
    pass


@contextlib.contextmanager
def _silenced():
    """Swallow what COCO/COCOeval print to stdout."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _backend(name: str) -> tuple[type, Callable[[Any, Any, str], Any]]:
    """(COCO index class, factory of an evaluator for (coco_gt, coco_dt, iou_type)) of a backend."""
    if name == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, lambda gt, dt, iou_type: COCOeval(gt, dt, iou_type)
    if name == "faster":
        from faster_coco_eval import COCO, COCOeval_faster

        return COCO, lambda gt, dt, iou_type: COCOeval_faster(gt, dt, iou_type, print_function=_noop)
    raise MaskxError(f"unknown evaluation backend '{name}' (expected one of: {', '.join(BACKENDS)})")


def _index(coco_cls: type, dataset: dict) -> Any:
    coco = coco_cls()
    coco.dataset = dataset
    coco.createIndex()
    return coco


def _prepare_gt(gt: Mapping, need_masks: bool) -> dict:
    """Validated shallow copy of a COCO dict, annotation ids renumbered 1..N."""
    if not isinstance(gt, Mapping) or "images" not in gt or "categories" not in gt:
        raise MaskxError("ground truth is not a COCO dict (needs 'images' and 'categories')")
    images = []
    for img in gt["images"]:
        if "id" not in img:
            raise MaskxError(f"ground-truth image record {img} has no 'id'")
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
            raise MaskxError(f"ground-truth annotation {aid} has no '{exc.args[0]}'") from None
        if b["image_id"] not in image_ids:
            raise MaskxError(f"ground-truth annotation {aid} points at image {b['image_id']}, which is not in the image list")
        if b["category_id"] not in cat_ids:
            raise MaskxError(f"ground-truth annotation {aid} has category {b['category_id']}, which is not in the category list")
        if need_masks and "segmentation" not in a:
            raise MaskxError(f"ground-truth annotation {aid} has no 'segmentation' (mask AP needs every instance's mask)")
        b["id"] = i + 1
        b.setdefault("iscrowd", 0)
        if "area" not in b:
            b["area"] = float(bbox[2]) * float(bbox[3])
        anns.append(b)
    return {"images": images, "categories": categories, "annotations": anns}


def _check_results(results: list[dict], image_ids: set[int], cat_ids: set[int], iou_types: Iterable[str]) -> None:
    if not isinstance(results, list):
        raise MaskxError("results must be a list of COCO result dicts")
    need = ["image_id", "category_id", "score"]
    if "segm" in iou_types:
        need.append("segmentation")
    if "bbox" in iou_types:
        need.append("bbox")
    for i, r in enumerate(results):
        for k in need:
            if k not in r:
                raise MaskxError(f"result {i} has no '{k}'")
    bad_images = {r["image_id"] for r in results} - image_ids
    if bad_images:
        i = next(i for i, r in enumerate(results) if r["image_id"] in bad_images)
        raise MaskxError(
            f"result {i} points at image {results[i]['image_id']}, which is not in the ground truth "
            f"({len(bad_images)} unknown image id(s))"
        )
    bad_cats = {r["category_id"] for r in results} - cat_ids
    if bad_cats:
        i = next(i for i, r in enumerate(results) if r["category_id"] in bad_cats)
        raise MaskxError(
            f"result {i} has category {results[i]['category_id']}, which is not in the ground truth's "
            f"category list ({len(bad_cats)} unknown category id(s))"
        )


def _compressed(seg: Any, height: int, width: int) -> dict:
    """A result's segmentation as compressed RLE (polygons and uncompressed RLE are converted)."""
    if isinstance(seg, dict) and isinstance(seg.get("counts"), (str, bytes)):
        return seg
    if isinstance(seg, dict):
        return mask_utils.frPyObjects(seg, height, width)
    if isinstance(seg, list):
        return mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    raise MaskxError(f"segmentation of type {type(seg).__name__} is not a mask (expected RLE or polygons)")


def _prepare_results(results: list[dict], iou_type: str, images: dict[int, dict], keep: Callable[[dict], bool]) -> list[dict]:
    """Result annotations as pycocotools' ``loadRes`` makes them (segm: without ``bbox``, so that the
    area is the mask area), for the results that ``keep`` accepts."""
    kept = [r for r in results if keep(r)]
    anns = []
    if iou_type == "segm":
        segs = []
        for r in kept:
            img = images[r["image_id"]]
            segs.append(_compressed(r["segmentation"], img.get("height", 0), img.get("width", 0)))
        # one call per mask, as loadRes does (pycocotools' batched area() fails past 255 masks)
        areas = [mask_utils.area(seg) for seg in segs]
        boxes = mask_utils.toBbox(segs) if segs else []
        for i, (r, seg) in enumerate(zip(kept, segs)):
            anns.append({
                "image_id": int(r["image_id"]), "category_id": int(r["category_id"]), "score": r["score"],
                "segmentation": seg, "area": areas[i], "bbox": boxes[i], "id": i + 1, "iscrowd": 0,
            })
    else:
        for i, r in enumerate(kept):
            bb = r["bbox"]
            anns.append({
                "image_id": int(r["image_id"]), "category_id": int(r["category_id"]), "score": r["score"],
                "bbox": bb, "area": bb[2] * bb[3], "id": i + 1, "iscrowd": 0,
            })
    return anns


def _summarize(coco_eval: Any, subset: Iterable[int]) -> dict[str, float | None]:
    """The six metrics of a class subset from an accumulated COCOeval, as ``COCOeval.summarize``
    would compute them had it been run with ``params.catIds = subset``."""
    p = coco_eval.params
    precision = np.asarray(coco_eval.eval["precision"])  # [T, R, K, A, M]
    position = {int(c): k for k, c in enumerate(p.catIds)}
    kidx = np.array(sorted(position[int(c)] for c in set(subset)), dtype=np.intp)
    mind = len(p.maxDets) - 1
    out: dict[str, float | None] = {}
    for name, (area, thr) in _SPEC.items():
        s = precision
        if thr is not None:
            s = s[np.where(thr == p.iouThrs)[0]]
        s = s[:, :, kidx, p.areaRngLbl.index(area), mind]
        valid = s[s > -1]
        out[name] = float(np.mean(valid)) if valid.size else None
    return out


def evaluate_sets(
    gt: dict,
    results: list[dict],
    sets: Mapping[str, list[int]],
    iou_types: Iterable[str] = ("segm", "bbox"),
    backend: str = DEFAULT_BACKEND,
    image_ids: list[int] | None = None,
) -> dict[str, dict[str, dict[str, float | None]]]:
    """Metrics of several class subsets for several IoU types.

    ``gt``: COCO dict in memory (``images`` with ``height``/``width``, ``annotations``,
    ``categories``); ``results``: COCO result dicts (see :mod:`pipelines.evaluation.results`);
    ``sets``: name -> category ids, e.g. ``{"B": [...], "A": [...], "all": [...]}``;
    ``image_ids``: evaluate these images only (default: every ground-truth image).

    Returns ``{iou_type: {set name: {metric: value}}}`` with the keys of ``sets`` in their order and
    the metrics of :data:`METRICS`, each in [0, 1] or None when undefined.

    The ground truth is indexed once, the results once per IoU type, and COCOeval's matching runs
    once per IoU type over the union of the sets; each set is then summarised from the accumulated
    precision array (the same numbers as separate runs, at the cost of one).

    Raises MaskxError for results whose image or category is not in the ground truth, set or image
    ids not in the ground truth, missing fields, an unknown IoU type or backend.
    """
    iou_types = tuple(iou_types)
    for t in iou_types:
        if t not in IOU_TYPES:
            raise MaskxError(f"unknown IoU type '{t}' (expected one of: {', '.join(IOU_TYPES)})")
    coco_cls, make_eval = _backend(backend)
    gt_ds = _prepare_gt(gt, need_masks="segm" in iou_types)
    images = {im["id"]: im for im in gt_ds["images"]}
    cat_ids = {c["id"] for c in gt_ds["categories"]}
    subsets: dict[str, set[int]] = {}
    for name, ids in sets.items():
        unknown = sorted({int(c) for c in ids} - cat_ids)
        if unknown:
            raise MaskxError(f"class set '{name}': category {unknown[0]} is not in the ground truth's category list")
        subsets[name] = {int(c) for c in ids}
    if image_ids is not None:
        img_subset = {int(i) for i in image_ids}
        if not img_subset:
            raise MaskxError("image_ids is empty: no image to evaluate")
        unknown = sorted(img_subset - set(images))
        if unknown:
            raise MaskxError(f"image {unknown[0]} is not in the ground truth's image list")
    else:
        img_subset = set(images)
    _check_results(results, set(images), cat_ids, iou_types)

    union = sorted(set().union(*subsets.values())) if subsets else []
    union_set = set(union)

    def keep(r: dict) -> bool:
        return r["category_id"] in union_set and r["image_id"] in img_subset

    undefined = {m: None for m in METRICS}
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    with _silenced():
        coco_gt = _index(coco_cls, gt_ds) if union else None
        for t in iou_types:
            if not union:
                out[t] = {name: dict(undefined) for name in subsets}
                continue
            dt_ds = {"images": gt_ds["images"], "categories": gt_ds["categories"],
                     "annotations": _prepare_results(results, t, images, keep)}
            coco_eval = make_eval(coco_gt, _index(coco_cls, dt_ds), t)
            coco_eval.params.catIds = union
            coco_eval.params.imgIds = sorted(img_subset)
            coco_eval.evaluate()
            coco_eval.accumulate()
            out[t] = {name: (_summarize(coco_eval, ids) if ids else dict(undefined)) for name, ids in subsets.items()}
    return out


def evaluate(
    gt: dict,
    results: list[dict],
    iou_type: str,
    cat_ids: list[int] | None = None,
    backend: str = DEFAULT_BACKEND,
    image_ids: list[int] | None = None,
) -> dict[str, float | None]:
    """COCO AP of one IoU type (``"segm"`` or ``"bbox"``) on a class subset.

    ``cat_ids``: the classes to average over (default: every ground-truth category; an empty list
    gives all None). Returns ``{"AP", "AP50", "AP75", "APs", "APm", "APl"}`` in [0, 1], None where
    undefined (no ground truth of the subset in that area range). Empty ``results`` give 0.0 for
    every defined metric. See :func:`evaluate_sets` for errors; never prints.
    """
    if cat_ids is None:
        cat_ids = [c["id"] for c in gt.get("categories", [])] if isinstance(gt, Mapping) else []
    return evaluate_sets(gt, results, {"_": list(cat_ids)}, (iou_type,), backend, image_ids)[iou_type]["_"]

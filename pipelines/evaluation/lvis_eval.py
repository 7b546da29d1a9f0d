"""Mask / box AP with the LVIS API's rules (federated labels), restricted to class subsets.

The LVIS engine of :func:`pipelines.evaluation.scoring.score`, used when the ground truth is LVIS
(``neg_category_ids`` per image, ``frequency`` per class). The rules are ``lvis.LVISEval``'s,
unchanged:

- at most :data:`LVIS_MAX_DETS` (300) detections per image, highest scores first, counted over all
  of the image's results before any class is selected (as ``LVISResults`` does);
- a detection of class c on image i counts only if c is in i's ground truth or in its
  ``neg_category_ids``; otherwise the image was never checked for c and the detection is ignored;
- an unmatched detection of a class in i's ``not_exhaustive_category_ids`` is ignored, not a false
  positive;
- no crowd regions; the size ranges, IoU thresholds and 101 recall points are COCO's;
- APr / APc / APf average over the rare / common / frequent classes of the subset.

For mask AP the detections' boxes are dropped before evaluation so that the small / medium / large
ranges use mask areas (the LVIS API would otherwise take box areas), as detectron2 does.

Backends:

``"reference"``
    ``lvis.LVISEval`` itself, once over the union of the subsets. It visits every (image, class)
    pair in Python (LVIS v1 val: 19.8k images x 1,203 classes = 24M pairs, 95M per-image
    evaluations), about 5x the faster route's time on 1,000 images and growing with the pairs.
``"faster"`` (default)
    faster-coco-eval's ``COCOeval_faster(lvis_style=True)`` (the same rules, matching in C++),
    run on groups of classes, each on the images where its classes can count: those with ground
    truth of the class or listing it in ``neg_category_ids``. A class's precision depends only on
    those images, so the stitched precision array is the one a single run would give; tests check
    that the numbers equal ``LVISEval``'s. The two rules above that decide which detections count
    (the 300 cap and the federated filter) are applied here, before faster-coco-eval sees the
    results.

Undefined metrics (no ground truth of the subset, e.g. APr of a subset without rare classes) are
None. Nothing is printed or logged.
"""

from __future__ import annotations

import contextlib
import logging
import types
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Iterator

import numpy as np

from pipelines.errors import MaskxError
from pipelines.evaluation.coco_eval import (METRICS, Metrics, _backend, _noop, backend_name, index, prepare_results,
                                            silenced, summarize_precision)
from pipelines.progress import NULL_PROGRESS, Progress

LVIS_METRICS = METRICS + ["APr", "APc", "APf"]
LVIS_MAX_DETS = 300  # per image, over all classes
FREQUENCIES = ("r", "c", "f")
PAIR_BUDGET = 1 << 16  # (class, image) pairs per faster-coco-eval run


class _NumpyCompat(types.ModuleType):
    """numpy as the LVIS API (0.5.3) expects it: it still calls ``np.float``, gone since numpy 1.24."""

    float = float

    def __getattr__(self, name):
        return getattr(np, name)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    logger = logging.getLogger("lvis")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), silenced():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _import_lvis():
    """Import the LVIS API without its import-time side effect (a handler on the root logger)."""
    root = logging.getLogger()
    handlers = list(root.handlers)
    import lvis
    import lvis.eval

    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    if not hasattr(np, "float") and not isinstance(lvis.eval.np, _NumpyCompat):
        lvis.eval.np = _NumpyCompat("numpy")
    return lvis


def _lvis_from_dict(cls, dataset: dict):
    obj = cls.__new__(cls)
    obj.logger = logging.getLogger("lvis.lvis")
    obj.dataset = dataset
    obj._create_index()
    return obj


def check_lvis(gt_ds: dict) -> None:
    """Raise MaskxError unless every category has a frequency and every image its federated lists."""
    for c in gt_ds["categories"]:
        if c.get("frequency") not in FREQUENCIES:
            raise MaskxError(f"ground truth is not LVIS: category {c['id']} has no frequency r/c/f")
    for img in gt_ds["images"]:
        if "neg_category_ids" not in img or "not_exhaustive_category_ids" not in img:
            raise MaskxError(f"ground truth is not LVIS: image {img['id']} has no neg_category_ids / not_exhaustive_category_ids")


def cap_per_image(results: Sequence[dict], max_dets: int = LVIS_MAX_DETS) -> list[dict]:
    """At most ``max_dets`` results per image: an image's highest scores, ties in file order (as
    ``LVISResults.limit_dets_per_image``); images with fewer keep all of theirs, in order."""
    per_image: dict[int, list[dict]] = defaultdict(list)
    for r in results:
        per_image[r["image_id"]].append(r)
    out: list[dict] = []
    for rs in per_image.values():
        out.extend(rs if len(rs) <= max_dets else sorted(rs, key=lambda r: r["score"], reverse=True)[:max_dets])
    return out


def _summaries(precision: np.ndarray, cat_ids: Sequence[int], subsets: Mapping[str, set[int]], frequency: Mapping[int, str],
               area_labels: Sequence[str], iou_thrs: np.ndarray) -> dict[str, Metrics]:
    out = {}
    for name, ids in subsets.items():
        m = summarize_precision(precision, cat_ids, ids, area_labels, iou_thrs)
        for f in FREQUENCIES:
            group = {c for c in ids if frequency[c] == f}
            m[f"AP{f}"] = summarize_precision(precision, cat_ids, group, area_labels, iou_thrs)["AP"] if group else None
        out[name] = m
    return out


def _reference(gt_ds: dict, results: list[dict], union: list[int], iou_type: str, img_ids: list[int]) -> tuple[np.ndarray, object]:
    """``LVISEval`` itself: precision ``[T, R, K, A]`` over ``union`` and its params."""
    lvis_mod = _import_lvis()
    images = {im["id"]: im for im in gt_ds["images"]}
    field = "segmentation" if iou_type == "segm" else "bbox"
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "score": a["score"], field: a[field]}
            for a in prepare_results(results, iou_type, images)]
    if not dets:
        # LVISResults cannot hold an empty list: one detection of a class outside the evaluated
        # subset stands in (LVISEval drops it before matching), so every AP comes out 0 or undefined.
        dets = [{"image_id": img_ids[0], "category_id": min(c["id"] for c in gt_ds["categories"]) - 1, "score": 0.0,
                 "bbox": [0.0, 0.0, 1.0, 1.0]}]
    # LVISResults deep-copies the dataset it is built on: give it one without annotations.
    lvis_gt = _lvis_from_dict(lvis_mod.LVIS, gt_ds)
    shell = _lvis_from_dict(lvis_mod.LVIS, {**gt_ds, "annotations": []})
    lvis_dt = lvis_mod.LVISResults(shell, dets, max_dets=LVIS_MAX_DETS)
    ev = lvis_mod.LVISEval(lvis_gt, lvis_dt, iou_type=iou_type)
    ev.params.cat_ids = union
    ev.params.img_ids = img_ids
    ev.evaluate()
    ev.accumulate()
    return np.asarray(ev.eval["precision"]), ev.params


def _groups(union: list[int], relevant: Mapping[int, set[int]]) -> Iterator[tuple[list[int], list[int]]]:
    """Consecutive classes of ``union`` with the union of their relevant images, each group kept to
    about :data:`PAIR_BUDGET` (class, image) pairs; classes without a relevant image are left out."""
    cats: list[int] = []
    imgs: set[int] = set()
    for c in union:
        if not relevant.get(c):
            continue
        grown = imgs | relevant[c]
        if cats and (len(cats) + 1) * len(grown) > PAIR_BUDGET:
            yield cats, sorted(imgs)
            cats, grown = [], set(relevant[c])
        cats.append(c)
        imgs = grown
    if cats:
        yield cats, sorted(imgs)


def _faster(gt_ds: dict, results: list[dict], union: list[int], iou_type: str, img_subset: set[int],
            progress: Progress) -> tuple[np.ndarray, object]:
    """faster-coco-eval's LVIS mode per group of classes: precision ``[T, R, K, A]`` over ``union``.

    ``results`` are already capped at 300 per image. Each group gets its own small ground-truth and
    detection indexes (its classes, its images), dropped after the run: faster-coco-eval writes a
    decoded copy of every mask into the annotations it evaluates.
    """
    coco_cls, _ = _backend("faster")
    from faster_coco_eval import COCOeval_faster

    union_set = set(union)
    gt_by_cat: dict[int, list[dict]] = defaultdict(list)
    gt_cats: dict[int, set[int]] = defaultdict(set)
    for a in gt_ds["annotations"]:
        if a["image_id"] in img_subset and a["category_id"] in union_set:
            gt_by_cat[a["category_id"]].append(a)
            gt_cats[a["image_id"]].add(a["category_id"])
    relevant: dict[int, set[int]] = defaultdict(set)  # class -> images where its detections count
    for im in gt_ds["images"]:
        if im["id"] in img_subset:
            for c in gt_cats[im["id"]].union(im["neg_category_ids"]) & union_set:
                relevant[c].add(im["id"])
    dt_by_cat: dict[int, list[dict]] = defaultdict(list)
    for r in results:
        if r["image_id"] in relevant.get(r["category_id"], ()):
            dt_by_cat[r["category_id"]].append(r)
    images = {im["id"]: im for im in gt_ds["images"]}
    categories = {c["id"]: c for c in gt_ds["categories"]}
    groups = list(_groups(union, relevant))
    position = {c: k for k, c in enumerate(union)}
    shape = None
    precision = None
    params = None
    task = progress.task(f"LVIS eval ({iou_type})", sum(len(cats) for cats, _ in groups))
    for cats, imgs in groups:
        group_images = [images[i] for i in imgs]
        group_cats = [categories[c] for c in cats]
        coco_gt = index(coco_cls, {"images": group_images, "categories": group_cats,
                                   "annotations": [dict(a) for c in cats for a in gt_by_cat[c]]})
        coco_dt = index(coco_cls, {"images": group_images, "categories": group_cats,
                                   "annotations": prepare_results([r for c in cats for r in dt_by_cat[c]], iou_type, images)})
        ev = COCOeval_faster(coco_gt, coco_dt, iou_type, lvis_style=True, print_function=_noop)
        ev.params.catIds = cats
        ev.params.imgIds = imgs
        ev.params.maxDets = [LVIS_MAX_DETS]
        ev.evaluate()
        ev.accumulate()
        part = np.asarray(ev.eval["precision"])[..., 0]  # [T, R, k, A]
        if precision is None:
            params = ev.params
            shape = part.shape
            precision = -np.ones(shape[:2] + (len(union),) + shape[3:])
        precision[:, :, [position[int(c)] for c in ev.params.catIds], :] = part
        task.advance(len(cats))
    task.close()
    if precision is None:  # no class of the subsets can count anywhere: everything undefined
        empty = index(coco_cls, {"images": [], "categories": [], "annotations": []})
        params = COCOeval_faster(empty, empty, iou_type, lvis_style=True, print_function=_noop).params
        precision = -np.ones((len(params.iouThrs), len(params.recThrs), len(union), len(params.areaRngLbl)))
    return precision, params


def lvis_scores(gt_ds: dict, results: list[dict], subsets: Mapping[str, set[int]], iou_types: Sequence[str], backend: str,
                img_subset: set[int], progress: Progress = NULL_PROGRESS) -> dict[str, dict[str, Metrics]]:
    """LVIS AP on prepared inputs: ``gt_ds`` from :func:`~pipelines.evaluation.coco_eval.prepare_gt`
    (LVIS fields kept), ``results`` validated, every subset non-empty.

    Returns ``{iou_type: {set name: {AP, AP50, AP75, APs, APm, APl, APr, APc, APf}}}``, values in
    [0, 1] or None where undefined.
    """
    check_lvis(gt_ds)
    backend = backend_name(backend)
    if any(a.get("iscrowd") for a in gt_ds["annotations"]):  # LVIS has no crowd regions
        gt_ds = {**gt_ds, "annotations": [dict(a, iscrowd=0) for a in gt_ds["annotations"]]}
    frequency = {c["id"]: c["frequency"] for c in gt_ds["categories"]}
    union = sorted(set().union(*subsets.values()))
    img_ids = sorted(img_subset)
    in_images = [r for r in results if r["image_id"] in img_subset]
    out: dict[str, dict[str, Metrics]] = {}
    with _quiet():
        if backend == "faster":
            capped = cap_per_image(in_images)
        for t in iou_types:
            if backend == "faster":
                precision, p = _faster(gt_ds, capped, union, t, img_subset, progress)
                cat_order, area_labels, iou_thrs = union, p.areaRngLbl, p.iouThrs
            else:
                task = progress.task(f"LVISEval ({t})", 1)
                # LVISEval writes into the annotations it evaluates: give it copies
                gt_copy = {**gt_ds, "annotations": [dict(a) for a in gt_ds["annotations"]]}
                precision, p = _reference(gt_copy, in_images, union, t, img_ids)
                cat_order, area_labels, iou_thrs = p.cat_ids, p.area_rng_lbl, p.iou_thrs
                task.advance(1)
                task.close()
            out[t] = _summaries(precision, cat_order, subsets, frequency, area_labels, iou_thrs)
    return out

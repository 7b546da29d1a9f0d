"""Mask / box AP with the LVIS API's rules (federated labels), restricted to a class subset.

:func:`evaluate_lvis` runs ``lvis.LVISEval`` on a ground-truth dict (LVIS v1 as read by
:func:`pipelines.data.lvis.load_lvis`) and a list of detections, with ``params.cat_ids`` set to the
classes being reported (set A, set B or all). LVIS's rules apply unchanged:

- a detection of class c on image i counts only if c is in i's ground truth or in its
  ``neg_category_ids``; otherwise the image was never checked for c and the detection is ignored;
- an unmatched detection of a class in i's ``not_exhaustive_category_ids`` is ignored, not a false
  positive;
- at most ``max_dets`` (300) detections per image, highest scores first;
- APr / APc / APf average over the rare / common / frequent classes among ``cat_ids``.

For mask AP the detections' boxes are dropped before evaluation so that the small / medium / large
ranges use mask areas (the LVIS API would otherwise take box areas), as detectron2 does.
The evaluation prints nothing and logs nothing.
"""

from __future__ import annotations

import contextlib
import logging
import types
import warnings
from typing import Iterator

import numpy as np

from pipelines.errors import MaskxError

METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")


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
        with warnings.catch_warnings():
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


def _lvis_from_dict(lvis_mod, dataset: dict):
    obj = lvis_mod.LVIS.__new__(lvis_mod.LVIS)
    obj.logger = logging.getLogger("lvis.lvis")
    obj.dataset = dataset
    obj._create_index()
    return obj


def evaluate_lvis(
    gt: dict,
    results: list[dict],
    iou_type: str = "segm",
    cat_ids: list[int] | None = None,
    max_dets: int = 300,
) -> dict[str, float]:
    """LVIS AP of ``results`` on ``gt`` over the classes ``cat_ids`` (default: all).

    ``gt``: an LVIS dict (images with ``neg_category_ids`` / ``not_exhaustive_category_ids``,
    categories with ``frequency``); it is not modified. ``results``: COCO-style detections
    ``{"image_id", "category_id", "score", "bbox": [x, y, w, h]}`` plus ``"segmentation"``
    (compressed RLE) for ``iou_type="segm"``. Returns ``{AP, AP50, AP75, APs, APm, APl, APr, APc,
    APf}`` as fractions in [0, 1]; -1.0 where no class of the subset has ground truth (as COCOeval).
    Raises MaskxError for a ground truth without LVIS fields, an unknown class in ``cat_ids`` or a
    detection on an image not in ``gt``.
    """
    if iou_type not in ("segm", "bbox"):
        raise MaskxError(f"iou_type must be 'segm' or 'bbox', got {iou_type!r}")
    lvis_mod = _import_lvis()
    all_cats = {c["id"]: c for c in gt["categories"]}
    for c in all_cats.values():
        if c.get("frequency") not in ("r", "c", "f"):
            raise MaskxError(f"ground truth is not LVIS: category {c['id']} has no frequency r/c/f")
    for img in gt["images"]:
        if "neg_category_ids" not in img or "not_exhaustive_category_ids" not in img:
            raise MaskxError(f"ground truth is not LVIS: image {img['id']} has no neg_category_ids / not_exhaustive_category_ids")
    chosen = sorted(all_cats) if cat_ids is None else sorted(set(cat_ids))
    unknown = [c for c in chosen if c not in all_cats]
    if unknown:
        raise MaskxError(f"category {unknown[0]} is not in the ground truth's category list")
    if not chosen:
        raise MaskxError("no category to evaluate")
    image_ids = {img["id"] for img in gt["images"]}

    dets = []
    for n, r in enumerate(results):
        if r.get("image_id") not in image_ids:
            raise MaskxError(f"detection #{n} is on image {r.get('image_id')!r}, which is not in the ground truth")
        d = dict(r)
        if iou_type == "segm":
            if "segmentation" not in d:
                raise MaskxError(f"detection #{n} has no 'segmentation' (needed for mask AP)")
            d.pop("bbox", None)
            seg = d["segmentation"]
            if isinstance(seg.get("counts"), bytes):
                d["segmentation"] = {"size": seg["size"], "counts": seg["counts"].decode("ascii")}
        else:
            if "bbox" not in d:
                raise MaskxError(f"detection #{n} has no 'bbox' (needed for box AP)")
            d.pop("segmentation", None)
        dets.append(d)
    if not dets:
        # LVISResults cannot hold an empty list: one detection of a class outside the evaluated
        # subset stands in (LVISEval drops it before matching), so every AP comes out 0 or -1.
        dets = [{"image_id": next(iter(image_ids)), "category_id": min(all_cats) - 1, "score": 0.0,
                 "bbox": [0.0, 0.0, 1.0, 1.0]}]

    # LVISEval adds keys to ground-truth annotations: give it copies. LVISResults deep-copies the
    # dataset it is built on: give it one without annotations.
    gt_copy = {**gt, "annotations": [dict(a) for a in gt["annotations"]]}
    with _quiet():
        lvis_gt = _lvis_from_dict(lvis_mod, gt_copy)
        shell = _lvis_from_dict(lvis_mod, {**gt, "annotations": []})
        lvis_dt = lvis_mod.LVISResults(shell, dets, max_dets=max_dets)
        ev = lvis_mod.LVISEval(lvis_gt, lvis_dt, iou_type=iou_type)
        ev.params.cat_ids = chosen
        ev.params.max_dets = max_dets
        ev.run()
    return {k: float(ev.results[k]) for k in METRIC_KEYS}

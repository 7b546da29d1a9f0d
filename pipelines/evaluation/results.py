"""Detections to COCO results: compressed RLE masks and ``[x, y, w, h]`` boxes.

A COCO result is one dict per detection::

    {"image_id": int, "category_id": int, "score": float,
     "bbox": [x, y, w, h],                                   # pixels, float
     "segmentation": {"size": [H, W], "counts": str}}       # compressed RLE, only with masks

This is the format of the COCO results files and of ``maskx predict``'s JSON output.
:func:`validate_results` checks such a list against its ground truth, once, before any scoring.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from pipelines.errors import MaskxError


def encode_masks(masks: np.ndarray) -> list[dict]:
    """Compressed RLEs of binary masks.

    ``masks``: bool or uint8 ``[N, H, W]`` (values 0/1; a CPU tensor works too). Returns ``N`` dicts
    ``{"size": [H, W], "counts": str}`` (``counts`` as text, so that the dicts are JSON-ready and
    ``pycocotools.mask.decode`` gives the masks back). Raises ValueError for another shape or a
    float array (threshold mask probabilities first, e.g. ``probs > 0.5``).
    """
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must be [N, H, W], got shape {tuple(masks.shape)}")
    if masks.dtype != np.bool_ and masks.dtype != np.uint8:
        raise ValueError(f"masks must be bool or uint8 (binary), got {masks.dtype}")
    if masks.shape[0] == 0:
        return []
    # pycocotools wants Fortran-ordered uint8 [H, W, N].
    rles = mask_utils.encode(np.asfortranarray(masks.astype(np.uint8, copy=False).transpose(1, 2, 0)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def to_coco_results(
    image_id: int,
    boxes: np.ndarray,
    scores: np.ndarray,
    category_ids: np.ndarray,
    masks: np.ndarray | Iterable[np.ndarray] | None,
) -> list[dict]:
    """COCO result dicts of one image's detections.

    ``boxes`` float ``[N, 4]`` (x1, y1, x2, y2, pixels), ``scores`` float ``[N]``, ``category_ids``
    int ``[N]`` (dataset category ids, not contiguous labels), ``masks`` bool/uint8 ``[N, H, W]``
    (binary, full image), or ``N`` such ``[H, W]`` masks one after another (e.g. a
    :class:`~pipelines.modeling.maskx_rcnn.PastedMasks`: each is encoded as it comes, so only one
    full-size mask is held at a time), or None. Returns ``N`` dicts with ``image_id``,
    ``category_id``, ``score``, ``bbox`` as ``[x, y, w, h]`` and, if masks are given,
    ``segmentation`` (see :func:`encode_masks`). All values are plain Python numbers.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    category_ids = np.asarray(category_ids).reshape(-1)
    n = boxes.shape[0]
    if scores.shape[0] != n or category_ids.shape[0] != n:
        raise ValueError(f"{n} boxes but {scores.shape[0]} scores and {category_ids.shape[0]} category ids")
    xywh = boxes.copy()
    xywh[:, 2:] -= xywh[:, :2]
    rles = None
    if masks is not None:
        if hasattr(masks, "ndim") or isinstance(masks, np.ndarray):
            rles = encode_masks(masks)
        else:
            rles = [rle for m in masks for rle in encode_masks(np.asarray(m)[None])]
        if len(rles) != n:
            raise ValueError(f"{n} boxes but {len(rles)} masks")
    out = []
    for i in range(n):
        r = {
            "image_id": int(image_id),
            "category_id": int(category_ids[i]),
            "score": float(scores[i]),
            "bbox": [float(v) for v in xywh[i]],
        }
        if rles is not None:
            r["segmentation"] = rles[i]
        out.append(r)
    return out


IOU_FIELDS = {"segm": "segmentation", "bbox": "bbox"}


def _kind(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null"}.get(type(value), f"a {type(value).__name__}")


_NUMBER = (int, float)  # compared with type(): bool is not a number here


def _is_number(v: object) -> bool:
    """A finite int or float (numpy's too), not a bool."""
    return (isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
            and bool(np.isfinite(v)))


def _raise_problem(i: int, r: object, results: list, sizes: dict, cat_ids: set, path: str | Path | None) -> None:
    """Raise the error of result ``i`` if it has one (the slow, complete check of one result)."""
    if not isinstance(r, dict):
        raise MaskxError(f"result {i} is {_kind(r)}, not a detection object", path)
    for key in ("image_id", "category_id", "score"):
        if key not in r:
            raise MaskxError(f"result {i} has no '{key}'", path)
    img, cat, score = r["image_id"], r["category_id"], r["score"]
    try:
        size = sizes.get(img)
    except TypeError:  # an unhashable image id
        size = None
    if size is None:
        unknown = {str(x.get("image_id")) for x in results if isinstance(x, dict)} - {str(k) for k in sizes}
        raise MaskxError(f"result {i} is on image {img!r}, which is not in the ground truth "
                         f"({len(unknown)} unknown image id(s) in the file)", path)
    try:
        known = cat in cat_ids
    except TypeError:  # an unhashable category id
        known = False
    if not known:
        unknown = {str(x.get("category_id")) for x in results if isinstance(x, dict)} - {str(c) for c in cat_ids}
        raise MaskxError(f"result {i} has category {cat!r}, which is not in the ground truth's category list "
                         f"({len(unknown)} unknown category id(s) in the file)", path)
    if not _is_number(score):
        raise MaskxError(f"result {i} has score {score!r} (expected a finite number)", path)
    box = r.get("bbox")
    if box is not None and not (isinstance(box, (list, tuple)) and len(box) == 4 and all(_is_number(v) for v in box)):
        raise MaskxError(f"result {i} has bbox {box!r} (expected [x, y, width, height] numbers)", path)
    if box is not None and (box[2] < 0 or box[3] < 0):
        raise MaskxError(f"result {i} has bbox {list(box)!r} with a negative width or height (expected [x, y, width, height], "
                         "width and height >= 0)", path)
    seg = r.get("segmentation")
    if isinstance(seg, dict):
        if "counts" not in seg or "size" not in seg:
            raise MaskxError(f"result {i} has an RLE segmentation without 'counts' and 'size'", path)
        if not isinstance(seg["size"], (list, tuple)) or list(seg["size"]) != size:
            raise MaskxError(f"result {i} has a mask of size {seg['size']!r} but its image {img} is "
                             f"{size[0]}x{size[1]} (height x width)", path)
    elif seg is not None and not (isinstance(seg, list) and all(isinstance(q, list) and len(q) % 2 == 0 for q in seg)):
        raise MaskxError(f"result {i} has a segmentation that is {_kind(seg)} (expected an RLE or polygons)", path)


def validate_results(results: object, gt: dict, iou_types: Iterable[str] | None = None,
                     path: str | Path | None = None) -> tuple[str, ...]:
    """Check COCO results against their ground truth; return the IoU types they can be scored on.

    ``results``: what a results file holds (it must be a list of result dicts, see the module
    docstring); ``gt``: the ground-truth dict (``images`` with ``id``/``height``/``width``,
    ``categories``); ``path`` names the results file in errors. Every result needs ``image_id`` (an
    image of ``gt``), ``category_id`` (a category of ``gt``) and a finite ``score``; a ``bbox`` is 4
    finite numbers, its width and height not negative; a ``segmentation`` is polygons or an RLE whose ``size`` is its image's
    ``[height, width]``.

    ``iou_types`` (``"segm"``, ``"bbox"``): require the field of each on every result. ``None``:
    infer them: ``segm`` if every result has a segmentation, ``bbox`` if every result has a box
    (a field on some results but not all is an error). An empty list is valid: both types.

    Raises MaskxError with one line naming ``path`` and the index of the first bad result. (One
    pass with cheap checks; a result that fails one is then examined in full for the message.)
    """
    if not isinstance(results, list):
        raise MaskxError(f"not a COCO results file: the top level is {_kind(results)} (expected a list of detections)", path)
    sizes = {im["id"]: [im.get("height"), im.get("width")] for im in gt["images"]}
    cat_ids = {c["id"] for c in gt["categories"]}
    counts = {"segmentation": 0, "bbox": 0}
    number = _NUMBER
    for i, r in enumerate(results):
        try:
            size = sizes[r["image_id"]]
            ok = r["category_id"] in cat_ids and type(r["score"]) in number
        except (KeyError, TypeError):
            ok = False
        if ok:
            box = r.get("bbox")
            if box is not None:
                counts["bbox"] += 1
                ok = (type(box) is list and len(box) == 4 and type(box[0]) in number and type(box[1]) in number
                      and type(box[2]) in number and type(box[3]) in number)
            seg = r.get("segmentation")
            if seg is not None:
                counts["segmentation"] += 1
                ok = ok and type(seg) is dict and seg.get("size") == size and "counts" in seg
        if not ok:
            _raise_problem(i, r, results, sizes, cat_ids, path)  # raises, or accepts e.g. polygons, tuples
    # NaN and infinities, all at once
    scores = np.fromiter((r["score"] for r in results), np.float64, len(results))
    if not np.isfinite(scores).all():
        _raise_problem(int(np.flatnonzero(~np.isfinite(scores))[0]), results[int(np.flatnonzero(~np.isfinite(scores))[0])],
                       results, sizes, cat_ids, path)
    if counts["bbox"]:
        with_box = [i for i, r in enumerate(results) if r.get("bbox") is not None] if counts["bbox"] < len(results) else None
        boxes = np.array([results[i]["bbox"] for i in with_box] if with_box is not None else [r["bbox"] for r in results], np.float64)
        bad = np.flatnonzero(~np.isfinite(boxes).all(axis=1) | (boxes[:, 2] < 0) | (boxes[:, 3] < 0))
        if bad.size:
            i = int(bad[0]) if with_box is None else with_box[int(bad[0])]
            _raise_problem(i, results[i], results, sizes, cat_ids, path)
    n = len(results)
    wanted = tuple(IOU_FIELDS) if iou_types is None else tuple(iou_types)
    for t in wanted:
        if t not in IOU_FIELDS:
            raise MaskxError(f"unknown IoU type '{t}' (expected one of: {', '.join(IOU_FIELDS)})")
    if n == 0:
        return wanted
    found = []
    for t in wanted:
        key = IOU_FIELDS[t]
        if counts[key] == n:
            found.append(t)
        elif counts[key] or iou_types is not None:
            i = next(i for i, r in enumerate(results) if r.get(key) is None)
            others = f" but {counts[key]} other result(s) have one" if counts[key] else ""
            raise MaskxError(f"result {i} has no '{key}'{others} ({'mask' if t == 'segm' else 'box'} AP needs one on every result)", path)
    if not found:
        raise MaskxError("result 0 has neither 'segmentation' nor 'bbox': nothing to score", path)
    return tuple(found)

"""Detections to COCO results: compressed RLE masks and ``[x, y, w, h]`` boxes.

A COCO result is one dict per detection::

    {"image_id": int, "category_id": int, "score": float,
     "bbox": [x, y, w, h],                                   # pixels, float
     "segmentation": {"size": [H, W], "counts": str}}       # compressed RLE, only with masks

This is the format of the COCO results files and of ``maskx predict``'s JSON output.
"""

from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils


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
    masks: np.ndarray | None,
) -> list[dict]:
    """COCO result dicts of one image's detections.

    ``boxes`` float ``[N, 4]`` (x1, y1, x2, y2, pixels), ``scores`` float ``[N]``, ``category_ids``
    int ``[N]`` (dataset category ids, not contiguous labels), ``masks`` bool/uint8 ``[N, H, W]``
    (binary, full image) or None. Returns ``N`` dicts with ``image_id``, ``category_id``,
    ``score``, ``bbox`` as ``[x, y, w, h]`` and, if masks are given, ``segmentation`` (see
    :func:`encode_masks`). All values are plain Python numbers.
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
        rles = encode_masks(masks)
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

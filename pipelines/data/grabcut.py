"""GrabCut masks inside boxes (OpenCV ``cv2.grabCut``): the baselines of the paper's Table 3.5.

- "Mask R-CNN trained with GrabCut": :func:`grabcut_annotations` replaces the masks of chosen
  classes in a COCO file by GrabCut masks inside their ground-truth boxes; a mask head trained on
  every class of that file (``--head oracle``) is the weakly supervised baseline.
- "Faster R-CNN tested with GrabCut": :func:`grabcut_masks` segments the detector's boxes at
  evaluation (see :mod:`pipelines.stages.eval_grabcut`).

Every mask lies within its box: GrabCut runs on a crop around the box with the box as its
rectangle, and the result is zeroed outside the box. When GrabCut cannot run (a box under 2 pixels
on a side, or no background pixels to model) or finds no foreground, the filled box is the mask,
as in the weakly supervised literature. OpenCV's random generator is reseeded before every call,
so the same image and box always give the same mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from pipelines.data.coco import load_coco, read_image
from pipelines.data.splits import resolve_split
from pipelines.errors import MaskxError
from pipelines.io import write_json
from pipelines.progress import NULL_PROGRESS, Progress

MARGIN = 0.5  # context around the box given to GrabCut, as a fraction of the box side


def _int_box(box, height: int, width: int) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = (float(v) for v in box)
    return (max(0, int(np.floor(x1))), max(0, int(np.floor(y1))), min(width, int(np.ceil(x2))), min(height, int(np.ceil(y2))))


def grabcut_in_box(image: np.ndarray, box, iterations: int = 5, margin: float = MARGIN) -> np.ndarray:
    """GrabCut foreground inside ``box``.

    ``image`` uint8[H, W, 3] (RGB), ``box`` (x1, y1, x2, y2) in pixels. Returns uint8[H, W] with
    1 on foreground pixels, all of them inside the box (the box rounded outwards to whole pixels).
    """
    h, w = image.shape[:2]
    x1, y1, x2, y2 = _int_box(box, h, w)
    out = np.zeros((h, w), np.uint8)
    if x2 <= x1 or y2 <= y1:
        return out
    bw, bh = x2 - x1, y2 - y1
    fill = out.copy()
    fill[y1:y2, x1:x2] = 1
    if bw < 2 or bh < 2:
        return fill
    mx, my = int(np.ceil(margin * bw)) + 1, int(np.ceil(margin * bh)) + 1
    cx1, cy1, cx2, cy2 = max(0, x1 - mx), max(0, y1 - my), min(w, x2 + mx), min(h, y2 + my)
    crop = np.ascontiguousarray(image[cy1:cy2, cx1:cx2, ::-1])  # OpenCV wants BGR
    rect = (x1 - cx1, y1 - cy1, bw, bh)
    if rect[2] >= crop.shape[1] and rect[3] >= crop.shape[0]:  # no pixel outside the box: nothing to model as background
        return fill
    mask = np.zeros(crop.shape[:2], np.uint8)
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(0)
    try:
        cv2.grabCut(crop, mask, rect, bgd, fgd, iterations, cv2.GC_INIT_WITH_RECT)
    except cv2.error:
        return fill
    fg = ((mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)).astype(np.uint8)
    out[cy1:cy2, cx1:cx2] = fg
    out *= fill  # within the box, whatever GrabCut did
    return out if out.any() else fill


def grabcut_masks(image: np.ndarray, boxes: np.ndarray, iterations: int = 5) -> np.ndarray:
    """GrabCut masks of several boxes: ``image`` uint8[H, W, 3], ``boxes`` float[N, 4] -> uint8[N, H, W]."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    masks = np.zeros((len(boxes),) + image.shape[:2], np.uint8)
    for i, b in enumerate(boxes):
        masks[i] = grabcut_in_box(image, b, iterations)
    return masks


def image_uint8(path: str | Path) -> np.ndarray:
    """An image file as RGB uint8[H, W, 3] (through the loader the data sets use)."""
    return (read_image(Path(path)).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


@dataclass
class GrabCutResult:
    out: Path
    classes: list[int]
    replaced: int  # annotations whose mask was replaced
    images: int  # images read
    box_fallbacks: int  # masks that are the filled box (GrabCut could not run or found nothing)


def grabcut_annotations(in_json: str | Path, images: str | Path, classes: str, out: str | Path, iterations: int = 5,
                        progress: Progress = NULL_PROGRESS) -> GrabCutResult:
    """Write ``out``: ``in_json`` with the masks of the ``classes`` split replaced by GrabCut masks.

    ``classes`` is a split spec (``nonvoc``, ``all``, ``random:N:SEED``, ``ids:...``). Each replaced
    annotation gets a compressed-RLE ``segmentation`` from GrabCut inside its ground-truth box,
    ``area`` updated and ``"grabcut": true``; crowd regions and other classes are left as they are.
    """
    data, _ = load_coco(in_json)
    chosen = set(resolve_split(classes, data["categories"], data))
    images_by_id = {im["id"]: im for im in data["images"]}
    todo: dict[int, list[dict]] = {}
    for ann in data["annotations"]:
        if ann["category_id"] in chosen and not ann.get("iscrowd", 0):
            todo.setdefault(ann["image_id"], []).append(ann)
    root = Path(images)
    task = progress.task("grabcut", len(todo))
    replaced = fallbacks = 0
    for image_id, anns in todo.items():
        info = images_by_id[image_id]
        img = image_uint8(root / info["file_name"])
        if img.shape[:2] != (info["height"], info["width"]):
            raise MaskxError(f"image is {img.shape[1]}x{img.shape[0]} but its record (id {image_id}) says "
                             f"{info['width']}x{info['height']}", root / info["file_name"])
        for ann in anns:
            x, y, bw, bh = ann["bbox"]
            box = (x, y, x + bw, y + bh)
            m = grabcut_in_box(img, box, iterations)
            x1, y1, x2, y2 = _int_box(box, *img.shape[:2])
            if int(m.sum()) == (x2 - x1) * (y2 - y1):
                fallbacks += 1
            rle = mask_utils.encode(np.asfortranarray(m))
            rle["counts"] = rle["counts"].decode("ascii")
            ann["segmentation"] = rle
            ann["area"] = float(m.sum())
            ann["grabcut"] = True
            replaced += 1
        task.advance(1)
    task.close()
    write_json(out, data)
    return GrabCutResult(Path(out), sorted(chosen), replaced, len(todo), fallbacks)

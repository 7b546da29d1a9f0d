"""Prediction with a detector run and a mask run: the loaded pair, and the files it writes.

:func:`load_predictor` loads a mask run and its detector (checked against each other) onto a device;
:class:`Predictor` runs :func:`~pipelines.modeling.maskx_rcnn.detect_and_segment` on images, on the
detector's own boxes or on given ones. :class:`PredictionWriter` turns each image's detections into
COCO result rows (``predictions.json``: the format of ``maskx predict``) and, optionally, pictures
(set-A classes green, set-B red). Shared by ``maskx predict``, ``maskx segment`` and the Python API.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.ops import MultiScaleRoIAlign

from pipelines.data.coco import read_image
from pipelines.engine.device import resolve_device
from pipelines.engine.run_dir import DetectorRun, MaskRun, detector_of_mask_run, load_detector_run, load_mask_run
from pipelines.errors import MaskxError
from pipelines.evaluation.results import to_coco_results
from pipelines.io import atomic_path, write_text
from pipelines.modeling.maskx_rcnn import build_mask_roi_pool, detect_and_segment
from pipelines.visualize import MAX_DRAWN, draw_predictions

PREDICTIONS = "predictions.json"


@dataclass
class Predictor:
    """A frozen detector and one mask side on ``device``, in eval mode.

    ``categories``: the detector's classes (COCO dicts, contiguous label ``i + 1`` is
    ``categories[i]``); ``set_a``: the category ids that had masks in training.
    """

    model: nn.Module
    head: nn.Module
    roi_pool: MultiScaleRoIAlign
    categories: list[dict]
    set_a: list[int]
    device: torch.device
    detector: Path  # the detector's checkpoint file

    def run(self, images: list[torch.Tensor], mask_threshold: float = 0.5, only_labels: torch.Tensor | None = None,
            given: list[dict] | None = None, paste: bool = True) -> list[dict]:
        """Detections of ``images`` (float32 ``[3, H_i, W_i]`` in [0, 1]), one dict per image: ``boxes``
        float32 ``[N, 4]``, ``scores`` ``[N]``, ``labels`` int64 ``[N]`` (1..K), ``masks`` uint8
        ``[N, H_i, W_i]`` (``paste=False``: pasted one at a time when read); ``only_labels``, ``given``
        and ``paste`` as :func:`detect_and_segment` takes them."""
        return detect_and_segment(self.model, self.roi_pool, {"mask": self.head}, images, self.device, mask_threshold,
                                  only_labels, given, paste)["mask"]


def load_predictor(mask_run: str | Path, detector: str | Path | None = None, device: str = "auto",
                   score_thresh: float | None = None) -> Predictor:
    """The mask run ``mask_run`` and its detector (``detector``, default: the one its manifest names; a
    mask run trained on another detector is refused), on ``device`` (``auto``: CUDA when present).
    ``score_thresh`` replaces the detector's score threshold for its own detections."""
    det = load_detector_run(detector or detector_of_mask_run(mask_run))
    return predictor_of(det, load_mask_run(mask_run, det), device, score_thresh)


def predictor_of(det: DetectorRun, run: MaskRun, device: str = "auto", score_thresh: float | None = None) -> Predictor:
    """The :class:`Predictor` of a loaded detector run and mask run (trained on it), on ``device``."""
    dev = resolve_device(device)
    model = det.model.to(dev).eval()
    if score_thresh is not None:
        model.roi_heads.score_thresh = score_thresh
    return Predictor(model, run.side.to(dev).eval(), build_mask_roi_pool(run.head.roi_size), det.categories, run.set_a, dev,
                     det.checkpoint)


def read_listed_image(path: Path, record: dict, skipped: list[tuple[str, str]], task, source: str = "") -> torch.Tensor | None:
    """The image at ``path`` as float32 ``[3, H, W]`` in [0, 1], or None when it cannot be read or its size
    differs from ``record``'s ``height`` / ``width`` (when the record has them): then ``(path, reason
    + source)`` goes to ``skipped`` and ``task`` advances by one."""
    try:
        image = read_image(path)
    except MaskxError as exc:
        skipped.append((str(path), exc.message))
        task.advance(1)
        return None
    size = tuple(image.shape[1:])
    if "height" in record and (record["height"], record["width"]) != size:
        skipped.append((str(path), f"its size {size[0]}x{size[1]} differs from its record's, "
                                   f"{record['height']}x{record['width']}{source}"))
        task.advance(1)
        return None
    return image


def picture_name(path: Path, used: set[str]) -> str:
    """``<stem>.png``, or ``<stem>-N.png`` when an earlier picture took that name (``used`` is updated)."""
    name, n = f"{path.stem}.png", 1
    while name in used:
        name, n = f"{path.stem}-{n}.png", n + 1
    used.add(name)
    return name


def save_picture(path: Path, image: torch.Tensor, d: dict, names: list[str], in_a: list[bool], scale: int,
                 max_drawn: int = MAX_DRAWN) -> int:
    """``image`` float32 [3, H, W] with detections ``d`` (``boxes`` [N, 4], ``scores`` [N], ``masks``
    [N, H, W] or pasted one at a time) drawn (set A green, set B red, the ``max_drawn`` highest scores, a
    legend below), as a PNG written atomically. Returns how many detections were left out of the picture."""
    rgb = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    masks = d["masks"].numpy() if isinstance(d["masks"], torch.Tensor) else d["masks"]
    drawing = draw_predictions(rgb, d["boxes"].numpy(), names, d["scores"].numpy(), masks, in_a, scale=scale,
                               max_drawn=max_drawn)
    with atomic_path(path) as tmp:
        drawing.image.save(tmp, format="PNG")
    return drawing.left_out


@dataclass
class PredictionWriter:
    """COCO result rows (with ``file_name`` and ``category_name``) and pictures of each image's detections.

    ``categories`` / ``set_a``: the detector's (:class:`Predictor`); pictures go to ``out`` when
    ``visualize``, ``scale`` times the image's size with a legend strip below, the ``max_drawn``
    highest-scoring detections of each image drawn; ``not_drawn`` counts the others.
    """

    out: Path
    categories: list[dict]
    set_a: list[int]
    visualize: bool = False
    scale: int = 1
    max_drawn: int = MAX_DRAWN
    results: list[dict] = field(default_factory=list)
    pictures: list[Path] = field(default_factory=list)
    not_drawn: int = 0  # detections left out of the pictures (beyond max_drawn per image)
    _used: set[str] = field(default_factory=set)

    def add(self, image_id: int, path: Path, image: torch.Tensor, d: dict, category_ids: np.ndarray | None = None) -> list[dict]:
        """Add one image's detections ``d`` (a :meth:`Predictor.run` dict); returns its rows.

        ``category_ids`` int ``[N]``: the ids the rows carry (default: the detector's id of each
        label); names and picture colours always follow the detector's class of each label.
        """
        cats = [self.categories[i - 1] for i in d["labels"].tolist()]
        ids = np.array([c["id"] for c in cats], dtype=np.int64) if category_ids is None else np.asarray(category_ids)
        rows = to_coco_results(image_id, d["boxes"].numpy(), d["scores"].numpy(), ids, d["masks"])
        for r, c in zip(rows, cats):
            r["file_name"] = str(path)
            r["category_name"] = c["name"]
        self.results.extend(rows)
        if self.visualize:
            picture = self.out / picture_name(path, self._used)
            in_a = set(self.set_a)
            self.not_drawn += save_picture(picture, image, d, [c["name"] for c in cats], [c["id"] in in_a for c in cats],
                                           self.scale, self.max_drawn)
            self.pictures.append(picture)
        return rows

    def write(self) -> Path:
        """``out/predictions.json``, compact (one entry per detection), written atomically."""
        path = self.out / PREDICTIONS
        write_text(path, json.dumps(self.results, separators=(",", ":")) + "\n")
        return path

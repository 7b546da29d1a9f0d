"""The Python API, for a notebook or a program: a trained model where you use it.

::

    from pipelines import api
    model = api.load("runs/transfer")          # a mask run; its detector from the run's manifest
    out = model.predict("photo.jpg")           # a path, a PIL image or an H x W x 3 uint8 array
    model.draw("photo.jpg", out).save("masks.png")

:func:`load` gives a :class:`Model`. Its outputs are torchvision's detection dicts, one per image,
on the CPU: ``boxes`` float32 ``[N, 4]`` (x1, y1, x2, y2, pixels), ``labels`` int64 ``[N]`` (1..K,
the detector's classes: ``model.classes[label - 1]``), ``scores`` float32 ``[N]``, ``masks`` uint8
``[N, H, W]`` (binary, thresholded at ``mask_threshold``; torchvision's are probabilities
``[N, 1, H, W]``), plus ``names`` (the class name of each detection) and ``category_ids`` (the
data set's id of each). Problems are :class:`~pipelines.errors.MaskxError`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipelines.data.coco import read_image
from pipelines.errors import MaskxError
from pipelines.evaluation.predictions import Predictor, load_predictor
from pipelines.visualize import MAX_DRAWN, draw_predictions

ImageLike = str | Path | Image.Image | np.ndarray


def as_image(image: ImageLike) -> torch.Tensor:
    """An image as float32 ``[3, H, W]`` in [0, 1]: a file path, a PIL image (converted to RGB) or a
    uint8 array ``[H, W, 3]``."""
    if isinstance(image, (str, Path)):
        return read_image(Path(image))
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        what = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise MaskxError(f"an image must be a path, a PIL image or a uint8 array [H, W, 3], got a {what}")
    return torch.from_numpy(image.copy()).permute(2, 0, 1).float().div_(255.0)


class Model:
    """A detector and a mask run, loaded (see :func:`load`); ``classes``: the class names, label ``i`` is
    ``classes[i - 1]``; ``set_a``: the names of the classes that had masks in training."""

    def __init__(self, predictor: Predictor, mask_threshold: float = 0.5):
        self.predictor = predictor
        self.mask_threshold = mask_threshold
        self.classes = [c["name"] for c in predictor.categories]
        in_a = set(predictor.set_a)
        self.set_a = [c["name"] for c in predictor.categories if c["id"] in in_a]

    def _output(self, d: dict) -> dict:
        cats = [self.predictor.categories[i - 1] for i in d["labels"].tolist()]
        return {**d, "names": [c["name"] for c in cats], "category_ids": [c["id"] for c in cats]}

    def _label(self, v: object) -> int | None:
        """Label 1..K of a class name or a label, None for neither."""
        if isinstance(v, str):
            return self.classes.index(v) + 1 if v in self.classes else None
        return int(v) if 1 <= int(v) <= len(self.classes) else None

    def predict(self, image: ImageLike) -> dict:
        """The detector's boxes above its score threshold and a mask for each (the module's output dict)."""
        return self._output(self.predictor.run([as_image(image)], self.mask_threshold)[0])

    def segment(self, image: ImageLike, boxes, labels, scores=None) -> dict:
        """Masks for given boxes: ``boxes`` ``[N, 4]`` (x1, y1, x2, y2, pixels; a tensor, array or list),
        ``labels`` ``[N]``: labels 1..K or class names; ``scores`` ``[N]`` (default 1) are passed through."""
        box_t = torch.as_tensor(np.asarray(boxes, dtype=np.float32).reshape(-1, 4))
        label_list = list(labels.tolist() if hasattr(labels, "tolist") else labels)
        resolved = [self._label(v) for v in label_list]
        if None in resolved:
            raise MaskxError(f"unknown class {label_list[resolved.index(None)]!r} (a label 1..{len(self.classes)} or a name "
                             "of model.classes)")
        if len(resolved) != len(box_t):
            raise MaskxError(f"{len(box_t)} boxes but {len(resolved)} labels")
        given = {"boxes": box_t, "labels": torch.tensor(resolved, dtype=torch.int64)}
        if scores is not None:
            given["scores"] = torch.as_tensor(np.asarray(scores, dtype=np.float32).reshape(-1))
        return self._output(self.predictor.run([as_image(image)], self.mask_threshold, given=[given])[0])

    def draw(self, image: ImageLike, output: dict, scale: int = 1, max_drawn: int = MAX_DRAWN) -> Image.Image:
        """``image`` with ``output``'s masks, boxes and ``name score`` labels drawn (set A green, set B red;
        the ``max_drawn`` highest scores), ``scale`` times its size, a legend strip below."""
        rgb = (as_image(image).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        in_a = set(self.set_a)
        names = output.get("names") or [self.classes[i - 1] for i in output["labels"].tolist()]
        return draw_predictions(rgb, np.asarray(output["boxes"]), names, np.asarray(output["scores"]),
                                np.asarray(output["masks"]), [n in in_a for n in names], scale=scale,
                                max_drawn=max_drawn).image


def load(mask_run: str | Path, detector: str | Path | None = None, device: str = "auto", score_thresh: float = 0.5,
         mask_threshold: float = 0.5) -> Model:
    """A :class:`Model` of the mask run ``mask_run`` (folder or ``mask_final.pth``) and its detector
    (``detector``, default: the one it was trained on) on ``device`` (``auto``: CUDA when present);
    ``predict`` keeps detections scoring at least ``score_thresh``."""
    if not 0.0 <= score_thresh <= 1.0:
        raise MaskxError(f"score_thresh must be in [0, 1], got {score_thresh}", key="score_thresh")
    return Model(load_predictor(mask_run, detector, device, score_thresh), mask_threshold)

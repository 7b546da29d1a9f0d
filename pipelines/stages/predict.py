"""``maskx predict``: boxes and masks of every class on new images, as COCO results and pictures.

The frozen detector finds boxes of all K classes; the mask run's head computes one mask per
detection for that detection's class (set-A classes saw masks in training, set-B classes get
theirs through the weight transfer function), so memory per image does not grow with K.

Outputs in ``out``:

- ``predictions.json``: COCO results (one dict per detection: ``image_id`` (1..N in reading order, or
  with ``gt`` the ground truth's id of the image of that file name), ``file_name``,
  ``category_id``, ``category_name``, ``score``, ``bbox`` [x, y, w, h], ``segmentation`` as
  compressed RLE); ``pycocotools``' ``loadRes`` reads it as is.
- ``images.json``: the images read (``id``, ``file_name``, ``width``, ``height``, and
  ``exif_orientation`` where the file has one other than 1) and those skipped with the reason.
- with ``visualize``: ``<image stem>.png`` per image, the input's size times ``scale``, set-A
  classes green, set-B classes red, ``name score`` labels (the paper's figures), the ``max_drawn``
  highest-scoring detections of the image, and a legend strip below (``pipelines.visualize``).

The files are all written or none is: they are written into a hidden staging folder in ``out``
and moved into ``out`` once every one is complete (:func:`pipelines.io.all_or_nothing`), so a
full disk met on the last picture or on ``predictions.json`` leaves ``out`` as it was.

Memory: one image at a time is held at full resolution (as float32), and each detection's mask is
pasted into it, encoded (and drawn) one at a time, so memory grows with the image's pixels, not
with its number of detections (docs/benchmarks.md, "Large images").

Images that cannot be read are reported and skipped; the others are written. With ``gt`` (a COCO
file of the same classes) an image is matched to its record by file name and takes its id, so
``maskx eval --gt FILE --results predictions.json`` scores the results as they are; an image the
file does not list is skipped and reported. Images are read on their stored pixel grid, as
training and evaluation read them (COCO's annotations refer to it): an EXIF orientation is not
applied, and the images that carry one are listed in the result (``exif_turned``), since a viewer
shows them turned and the boxes would not fall on what it shows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipelines.data.coco import check_same_categories, exif_orientation, load_coco
from pipelines.engine.run_dir import make_output_dir
from pipelines.errors import MaskxError
from pipelines.evaluation.predictions import PREDICTIONS, PredictionWriter, load_predictor, read_listed_image
from pipelines.io import all_or_nothing, staged_path, write_json
from pipelines.progress import NULL_PROGRESS, Progress
from pipelines.visualize import MAX_DRAWN, check_picture_settings

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
IMAGES = "images.json"


@dataclass
class PredictResult:
    out: Path
    predictions: Path
    images: int  # images read and predicted
    detections: int
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of unreadable images
    pictures: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    exif_turned: list[str] = field(default_factory=list)  # images with an EXIF orientation (not applied: the stored grid)
    not_drawn: int = 0  # detections left out of the pictures (beyond max_drawn per image)


def find_images(inputs: list[str | Path]) -> list[Path]:
    """Image files named directly, plus those found (recursively, sorted) in named folders.

    A file named directly is taken whatever its suffix (it may still fail to read); in folders only
    files with an image suffix count. Raises MaskxError for a path that does not exist or when no
    image is found at all.
    """
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.exists():
            found.append(path)
        else:
            raise MaskxError("no such image file or folder", path)
    if not found:
        raise MaskxError(f"no image files found (looked for {', '.join(IMAGE_SUFFIXES)})", inputs[0] if inputs else None)
    seen: set[Path] = set()
    return [p for p in found if not (p.resolve() in seen or seen.add(p.resolve()))]


def class_filter(categories: list[dict], set_a: list[int], classes: list[str] | None = None,
                 only: str | None = None) -> torch.Tensor:
    """Which contiguous labels to keep: bool ``[K + 1]`` (index 0, background, is False).

    ``classes``: class names to keep (None = all; an unknown name is an error). ``only``: ``"A"``
    keeps set-A classes, ``"B"`` set-B classes, None both.
    """
    if only not in (None, "A", "B"):
        raise MaskxError(f"unknown class set '{only}' (expected A or B)")
    keep = torch.zeros(len(categories) + 1, dtype=torch.bool)
    names = {c["name"]: i + 1 for i, c in enumerate(categories)}
    if classes:
        unknown = [n for n in classes if n not in names]
        if unknown:
            raise MaskxError(f"unknown class name '{unknown[0]}' (the detector has {len(names)} classes, e.g. "
                             f"{', '.join(list(names)[:5])})")
        keep[[names[n] for n in classes]] = True
    else:
        keep[1:] = True
    a = set(set_a)
    for i, c in enumerate(categories):
        if (only == "A" and c["id"] not in a) or (only == "B" and c["id"] in a):
            keep[i + 1] = False
    if not keep.any():
        raise MaskxError("the class filters leave no class to predict")
    return keep


class GroundTruthImages:
    """The image records of a COCO file, found by file name: ``find(path)`` is the record whose
    ``file_name`` is the path's tail (``val/0001.png`` matches ``.../images/val/0001.png``), else the
    only record of that base name, else None."""

    def __init__(self, data: dict):
        self.by_name = {str(Path(im["file_name"])): im for im in data["images"]}
        by_base: dict[str, list[dict]] = {}
        for im in data["images"]:
            by_base.setdefault(Path(im["file_name"]).name, []).append(im)
        self.by_base = {k: v[0] for k, v in by_base.items() if len(v) == 1}

    def find(self, path: Path) -> dict | None:
        parts = Path(path).parts
        for k in range(len(parts)):
            hit = self.by_name.get(str(Path(*parts[k:])))
            if hit is not None:
                return hit
        return self.by_base.get(Path(path).name)


def _readable_images(files: list[Path], known: GroundTruthImages | None, gt, skipped: list, task):
    """``(image id, path, image float32[3, H, W])`` of each file that reads (and, with ``known``, is a
    ground-truth image of its recorded size); the others go to ``skipped`` as ``(path, reason)``."""
    count = 0
    for path in files:
        record = known.find(path) if known is not None else {"id": count + 1}
        if record is None:
            skipped.append((str(path), f"not in the ground truth ({gt})"))
            task.advance(1)
            continue
        image = read_listed_image(path, record, skipped, task, f" ({gt})")
        if image is not None:
            count += 1
            yield record["id"], path, image


@torch.no_grad()
def predict(mask_run: str | Path, inputs: list[str | Path], out: str | Path, detector: str | Path | None = None,
            score_thresh: float = 0.5, classes: list[str] | None = None, only: str | None = None,
            visualize: bool = False, scale: int = 1, device: str = "auto", batch_images: int = 4,
            mask_threshold: float = 0.5, progress: Progress = NULL_PROGRESS, gt: str | Path | None = None,
            max_drawn: int = MAX_DRAWN) -> PredictResult:
    """Detect and segment every image of ``inputs`` (files or folders) with a detector + mask run.

    ``detector`` defaults to the one named in the mask run's manifest; a mask run trained on another
    detector is refused. ``score_thresh`` drops weaker detections before masks are computed;
    ``classes`` / ``only`` filter classes (see :func:`class_filter`). ``gt``: a COCO file whose image
    ids the results take (matched by file name, :class:`GroundTruthImages`). ``max_drawn``: detections
    drawn per picture. See the module docstring for the files written to ``out``.
    """
    t0 = time.perf_counter()
    if not 0.0 <= score_thresh <= 1.0:
        raise MaskxError(f"score_thresh must be in [0, 1], got {score_thresh}", key="score_thresh")
    check_picture_settings(scale, max_drawn)
    files = find_images(inputs)
    pred = load_predictor(mask_run, detector, device, score_thresh)
    categories = pred.categories
    known = None
    if gt is not None:
        gt_data, _ = load_coco(gt)
        check_same_categories(categories, gt_data["categories"], "the detector's classes", gt)
        known = GroundTruthImages(gt_data)
    keep = class_filter(categories, pred.set_a, classes, only)
    out = make_output_dir(out)
    with all_or_nothing(out) as staging:  # every file of this call, or none
        writer = PredictionWriter(staging, categories, pred.set_a, visualize, scale, max_drawn)
        image_records, skipped = _predict_images(pred, files, known, gt, keep, mask_threshold, batch_images, writer, progress)
        writer.write()
        in_a = set(pred.set_a)
        write_json(staging / IMAGES, {"images": image_records, "skipped": [{"file_name": p, "reason": r} for p, r in skipped],
                                      "categories": [{**c, "set": "A" if c["id"] in in_a else "B"} for c in categories],
                                      "detector": str(pred.detector), "mask": str(mask_run), "score_thresh": score_thresh})
    predictions, pictures = out / PREDICTIONS, [staged_path(staging, out, p) for p in writer.pictures]
    turned = [r["file_name"] for r in image_records if "exif_orientation" in r]
    return PredictResult(out, predictions, len(image_records), len(writer.results), skipped, pictures,
                         time.perf_counter() - t0, turned, writer.not_drawn)


def _predict_images(pred, files: list[Path], known: GroundTruthImages | None, gt, keep: torch.Tensor, mask_threshold: float,
                    batch_images: int, writer: PredictionWriter, progress: Progress) -> tuple[list[dict], list[tuple[str, str]]]:
    """Predict every readable image of ``files`` into ``writer``, ``batch_images`` at a time, each
    image's masks pasted and encoded one at a time; returns (``images.json`` records, skipped files)."""
    image_records: list[dict] = []
    skipped: list[tuple[str, str]] = []
    task = progress.task("predict", len(files))

    def run_batch(batch: list[tuple[int, Path, torch.Tensor]]) -> None:
        dets = pred.run([im for _, _, im in batch], mask_threshold, keep, paste=False)
        for (image_id, path, image), d in zip(batch, dets):
            writer.add(image_id, path, image, d)
        task.advance(len(batch))

    batch: list[tuple[int, Path, torch.Tensor]] = []
    for image_id, path, image in _readable_images(files, known, gt, skipped, task):
        orientation = exif_orientation(path)
        image_records.append({"id": image_id, "file_name": str(path), "height": int(image.shape[1]), "width": int(image.shape[2]),
                              **({"exif_orientation": orientation} if orientation != 1 else {})})
        batch.append((image_id, path, image))
        if len(batch) == batch_images:
            run_batch(batch)
            batch = []
    if batch:
        run_batch(batch)
    task.close()
    if not image_records:
        raise MaskxError(f"none of the {len(files)} image file(s) could be read (first: {skipped[0][1]})", skipped[0][0])
    return image_records, skipped

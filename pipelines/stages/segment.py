"""``maskx segment``: masks for given boxes, from any detector's results or a ground truth's boxes.

``boxes`` is either a COCO results file (a list of ``{"image_id", "category_id", "bbox": [x, y, w,
h], "score"}`` from any detector; the scores are kept, a result without one gets 1) or a COCO
ground-truth file (its annotations' boxes, score 1; crowd regions are left out). The mask side of
``mask_run`` segments exactly those boxes (:func:`~pipelines.modeling.maskx_rcnn.detect_and_segment`
with ``given``); the detector's own boxes are not used.

Image files are ``images / file_name`` (else ``images / <base name>``). A ground-truth file names
its images itself; a results file has only ``image_id``, so the file names come from ``gt`` (a COCO
file, or any JSON with an ``images`` list of ``id`` / ``file_name``, such as ``maskx predict``'s
``images.json``) or from the results' own ``file_name`` (``maskx predict`` writes it).

Classes: a box's category is the detector's class of the same id (``match="id"``) or of the same name
(``match="name"``, names from the ground truth's categories or the results' ``category_name``). Boxes
of a class the detector does not have are skipped and counted (:attr:`SegmentResult.unknown`).

Outputs in ``out``: ``predictions.json`` (the format of ``maskx predict``'s; ``category_id`` the
input's, ``category_name`` the detector's), ``images.json`` (images segmented, images skipped with
the reason, the unknown classes' box counts), one picture per image with ``visualize``, and for a
ground-truth input ``annotations.json``: the input file with the predicted mask (compressed RLE) on
every box-only annotation it segmented, the others as they were (auto-annotation).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipelines.data.annotations import has_usable_mask
from pipelines.data.coco import load_coco
from pipelines.engine.run_dir import make_output_dir
from pipelines.errors import MaskxError
from pipelines.evaluation.predictions import PredictionWriter, load_predictor, read_listed_image
from pipelines.io import read_json, write_json
from pipelines.progress import NULL_PROGRESS, Progress
from pipelines.visualize import MAX_DRAWN, check_picture_settings

MATCHES = ("id", "name")
IMAGES = "images.json"
ANNOTATIONS = "annotations.json"


@dataclass
class BoxSource:
    """The boxes to segment. ``images``: image id -> record (``file_name``, maybe ``height`` /
    ``width``); ``boxes``: image id -> its boxes, each ``{"bbox": [x, y, w, h], "category_id",
    "score", "ann"}`` (``ann``: the ground-truth annotation dict, or None); ``names``: category id ->
    name where known; ``gt``: the ground-truth data when the input is one, else None."""

    images: dict[int, dict]
    boxes: dict[int, list[dict]]
    names: dict[int, str]
    gt: dict | None = None


@dataclass
class SegmentResult:
    out: Path
    predictions: Path
    images: int  # images segmented
    boxes: int  # boxes segmented (rows of predictions.json)
    unknown: dict[str, int] = field(default_factory=dict)  # class of the input the detector lacks -> boxes skipped
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (image, reason) of images not segmented
    annotations: Path | None = None  # ground-truth input only: the file with masks added
    filled: int = 0  # box-only annotations that got a mask in ``annotations``
    pictures: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    not_drawn: int = 0  # boxes left out of the pictures (beyond max_drawn per image)


def _results_entry(i: int, r: object, path: Path) -> dict:
    """Result ``i`` checked: ``image_id``, ``category_id``, ``bbox`` of 4 numbers, ``score`` a number if given."""
    if not isinstance(r, dict):
        raise MaskxError(f"result {i} is not an object", path)
    for key in ("image_id", "category_id", "bbox"):
        if key not in r:
            raise MaskxError(f"result {i} has no '{key}'", path)
    box, score = r["bbox"], r.get("score", 1.0)
    if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
        raise MaskxError(f"result {i}: bbox must be [x, y, w, h], got {box!r}", path)
    if not isinstance(score, (int, float)):
        raise MaskxError(f"result {i}: score must be a number, got {score!r}", path)
    return {"bbox": [float(v) for v in box], "category_id": r["category_id"], "score": float(score), "ann": None}


def _image_list(path: Path) -> tuple[dict[int, dict], dict[int, str]]:
    """(image id -> record, category id -> name) of a COCO file or any JSON with an ``images`` list."""
    data = read_json(path, "images file")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise MaskxError("has no 'images' list (expected a COCO file or maskx predict's images.json)", path)
    images = {}
    for im in data["images"]:
        if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
            raise MaskxError(f"an image record without 'id' or 'file_name': {str(im)[:80]}", path)
        images[im["id"]] = im
    names = {c["id"]: c["name"] for c in data.get("categories") or [] if isinstance(c, dict) and "id" in c and "name" in c}
    return images, names


def read_boxes(boxes_file: str | Path, gt: str | Path | None = None) -> BoxSource:
    """The boxes of a ground-truth file or a results file (see the module docstring)."""
    path = Path(boxes_file)
    data = read_json(path, "boxes file")
    if isinstance(data, dict):
        gt_data, _ = load_coco(path)
        boxes: dict[int, list[dict]] = {}
        for ann in gt_data["annotations"]:
            if not ann.get("iscrowd", 0):
                boxes.setdefault(ann["image_id"], []).append(
                    {"bbox": [float(v) for v in ann["bbox"]], "category_id": ann["category_id"], "score": 1.0, "ann": ann})
        names = {c["id"]: c["name"] for c in gt_data["categories"]}
        return BoxSource({im["id"]: im for im in gt_data["images"]}, boxes, names, gt_data)
    if not isinstance(data, list):
        raise MaskxError("not a COCO results list or ground-truth file", path)
    images, names = _image_list(Path(gt)) if gt is not None else ({}, {})
    boxes = {}
    for i, r in enumerate(data):
        entry = _results_entry(i, r, path)
        boxes.setdefault(r["image_id"], []).append(entry)
        if gt is None:
            if "file_name" not in r:
                raise MaskxError(f"result {i} has no 'file_name' and no images list was given: give gt (the ground truth "
                                 "or an images list) to find the images of these image ids", path, key="gt")
            images.setdefault(r["image_id"], {"id": r["image_id"], "file_name": r["file_name"]})
        if "category_name" in r:
            names.setdefault(r["category_id"], r["category_name"])
    return BoxSource(images, boxes, names)


def match_classes(categories: list[dict], source: BoxSource, match: str) -> dict[int, int]:
    """Input category id -> the detector's contiguous label (1..K), by ``match`` (``id`` or ``name``);
    categories the detector does not have are left out."""
    if match not in MATCHES:
        raise MaskxError(f"unknown match '{match}' (expected {' | '.join(MATCHES)})", key="match")
    ids = {b["category_id"] for bs in source.boxes.values() for b in bs}
    if match == "id":
        labels = {c["id"]: i + 1 for i, c in enumerate(categories)}
        return {k: labels[k] for k in ids if k in labels}
    if ids and not source.names:
        raise MaskxError("matching classes by name needs their names: the results have no category_name; give gt "
                         "(a file with the categories)", key="match")
    labels = {c["name"]: i + 1 for i, c in enumerate(categories)}
    return {k: labels[source.names[k]] for k in ids if source.names.get(k) in labels}


def _unknown(source: BoxSource, known: dict[int, int]) -> dict[str, int]:
    """``"name (id N)"`` (or ``"id N"``) -> boxes of each input class the detector lacks."""
    counts: dict[str, int] = {}
    for bs in source.boxes.values():
        for b in bs:
            if b["category_id"] not in known:
                k = b["category_id"]
                what = f"{source.names[k]} (id {k})" if k in source.names else f"id {k}"
                counts[what] = counts.get(what, 0) + 1
    return counts


def image_file(images: Path, file_name: str) -> Path:
    """``images / file_name``, else ``images / <base name>`` when only that exists."""
    path = images / file_name
    if not path.is_file() and (images / Path(file_name).name).is_file():
        return images / Path(file_name).name
    return path


def _to_segment(source: BoxSource, known: dict[int, int], images: Path, skipped: list, task):
    """``(image id, path, image float32 [3, H, W], given)`` per image with boxes of known classes that
    reads (and fits its record's size); ``given``: ``boxes`` float32 [N, 4] (x1, y1, x2, y2),
    ``labels`` int64 [N], ``scores`` float32 [N], plus the input rows under ``rows``."""
    for image_id in source.boxes:
        rows = [b for b in source.boxes[image_id] if b["category_id"] in known and b["bbox"][2] > 0 and b["bbox"][3] > 0]
        if not rows:
            continue
        record = source.images.get(image_id)
        if record is None:
            skipped.append((f"image id {image_id}", "not in the images list"))
            task.advance(1)
            continue
        path = image_file(images, record["file_name"])
        image = read_listed_image(path, record, skipped, task)
        if image is None:
            continue
        xywh = torch.tensor([b["bbox"] for b in rows], dtype=torch.float32)
        given = {"boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1),
                 "labels": torch.tensor([known[b["category_id"]] for b in rows], dtype=torch.int64),
                 "scores": torch.tensor([b["score"] for b in rows], dtype=torch.float32), "rows": rows}
        yield image_id, path, image, given


@torch.no_grad()
def segment(mask_run: str | Path, boxes: str | Path, images: str | Path, out: str | Path, detector: str | Path | None = None,
            gt: str | Path | None = None, match: str = "id", visualize: bool = False, scale: int = 1, device: str = "auto",
            batch_images: int = 4, mask_threshold: float = 0.5, progress: Progress = NULL_PROGRESS,
            max_drawn: int = MAX_DRAWN) -> SegmentResult:
    """Masks for the boxes of ``boxes`` (a results or ground-truth file) on the images under ``images``.

    ``detector`` defaults to the mask run's own; ``gt`` gives a results file's image file names;
    ``match`` pairs the input's classes with the detector's (``id`` or ``name``); ``max_drawn``: boxes
    drawn per picture. See the module docstring for the inputs and the files written to ``out``.
    """
    t0 = time.perf_counter()
    check_picture_settings(scale, max_drawn)
    if not Path(images).is_dir():
        raise MaskxError("image folder not found", images, key="images")
    source = read_boxes(boxes, gt)
    pred = load_predictor(mask_run, detector, device)
    known = match_classes(pred.categories, source, match)
    out = make_output_dir(out)
    writer = PredictionWriter(out, pred.categories, pred.set_a, visualize, scale, max_drawn)
    skipped: list[tuple[str, str]] = []
    records: list[dict] = []
    filled = 0
    task = progress.task("segment", len(source.boxes))

    def run_batch(batch: list) -> int:
        dets = pred.run([b[2] for b in batch], mask_threshold, given=[b[3] for b in batch])
        done = 0
        for (image_id, path, image, given), d in zip(batch, dets):
            d = {**d, "boxes": given["boxes"], "scores": given["scores"]}  # the input's boxes and scores, exactly
            rows = writer.add(image_id, path, image, d, [b["category_id"] for b in given["rows"]])
            for b, row, m in zip(given["rows"], rows, d["masks"]):
                if b["ann"] is not None and not has_usable_mask(b["ann"]):
                    b["ann"]["segmentation"], b["ann"]["area"] = row["segmentation"], float(m.sum())
                    done += 1
        task.advance(len(batch))
        return done

    batch: list = []
    for item in _to_segment(source, known, Path(images), skipped, task):
        records.append({"id": item[0], "file_name": str(item[1]), "height": int(item[2].shape[1]), "width": int(item[2].shape[2])})
        batch.append(item)
        if len(batch) == batch_images:
            filled += run_batch(batch)
            batch = []
    if batch:
        filled += run_batch(batch)
    task.close()
    if not records and skipped:
        raise MaskxError(f"none of the {len(skipped)} image(s) could be segmented (first: {skipped[0][0]}: {skipped[0][1]})",
                         boxes)
    unknown = _unknown(source, known)
    annotations = None
    if source.gt is not None:
        annotations = out / ANNOTATIONS
        write_json(annotations, source.gt)
    write_json(out / IMAGES, {"images": records, "skipped": [{"file_name": p, "reason": r} for p, r in skipped],
                              "unknown_classes": unknown, "boxes": str(boxes), "match": match,
                              "detector": str(pred.detector), "mask": str(mask_run)})
    return SegmentResult(out, writer.write(), len(records), len(writer.results), unknown, skipped, annotations, filled,
                         writer.pictures, time.perf_counter() - t0, writer.not_drawn)

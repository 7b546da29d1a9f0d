"""COCO-format annotation files: load, validate, and serve as a torch Dataset.

The internal data format of maskx is the COCO dict: ``{"images": [...], "annotations": [...],
"categories": [...]}``. Masks may be polygons, uncompressed or compressed RLE. Crowd regions
(``iscrowd=1``) are kept in the dict (evaluation needs them, COCOeval ignores detections that
fall on them) but never become training targets.

What loading does with each quirk of real files:

- truncated or corrupt JSON, a missing key, a duplicate id, an annotation whose image or category
  is not listed, a malformed box or segmentation: one :class:`MaskxError` naming the file and
  the record;
- boxes of zero or negative width or height, or lying wholly outside their image: skipped and
  counted in :class:`LoadReport` (the CLI prints a counted warning);
- images without annotations: kept (they are negatives) and counted;
- box-only annotations -- ``segmentation`` absent, ``null`` or empty (``[]``, as CVAT, Label Studio
  and many converters write it), or holding no polygon of 3 points: kept as boxes; they are never a
  mask target (:func:`has_usable_mask` is the one rule, and :func:`mask_coverage` counts them per
  class);
- LVIS v1 files (``coco_url`` instead of ``file_name``, ``frequency`` per category) are
  recognised and normalised by :func:`pipelines.data.lvis.normalize_lvis`, so every stage reads
  them like COCO files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils

from pipelines.data.annotations import has_usable_mask
from pipelines.data.lvis import is_lvis, normalize_lvis
from pipelines.errors import MaskxError
from pipelines.io import read_json
from pipelines.progress import NULL_PROGRESS, Progress


@dataclass
class LoadReport:
    """What validation skipped or noticed, so that it can be counted in a warning rather than silently."""

    degenerate_boxes: int = 0  # annotations dropped: width or height <= 0, or box outside the image
    images_without_annotations: int = 0  # images kept with no (remaining) annotation
    crowd_annotations: int = 0  # iscrowd=1 regions: kept for evaluation, never training targets
    box_only: int = 0  # annotations without a usable mask (segmentation absent, null, [] or no 3-point polygon)
    first_degenerate: list = field(default_factory=list)  # up to 5 ids of dropped annotations

    def warnings(self, path: str | Path | None = None) -> list[str]:
        """One-line, counted warnings for the CLI (empty when there is nothing to say)."""
        where = f"{path}: " if path else ""
        out = []
        if self.degenerate_boxes:
            ids = ", ".join(str(i) for i in self.first_degenerate)
            out.append(
                f"{where}skipped {self.degenerate_boxes} annotation(s) with a zero-area, negative or "
                f"out-of-image box (annotation id {ids}{', ...' if self.degenerate_boxes > len(self.first_degenerate) else ''})"
            )
        return out


def load_coco(path: str | Path, require_masks: bool = False) -> tuple[dict, LoadReport]:
    """Read and validate a COCO (or LVIS v1) instances file.

    Returns the dataset dict (annotations with degenerate boxes removed) and a report of what was
    skipped. Raises MaskxError naming the file and record for structural problems: missing keys,
    duplicate ids, annotations whose image or category is not listed. Box-only annotations are
    valid; ``require_masks`` refuses a file with any (``maskx data check --masks``).
    """
    path = Path(path)
    data = read_json(path, "annotation file")
    if not isinstance(data, dict):
        raise MaskxError("not a COCO annotation file (top level is not an object)", path)
    if is_lvis(data):
        normalize_lvis(data, path)
    return validate_coco(data, path, require_masks=require_masks)


def load_lvis(path: str | Path, require_masks: bool = False) -> tuple[dict, LoadReport]:
    """Read an LVIS v1 file (LVIS fields required), normalise it (:func:`pipelines.data.lvis.normalize_lvis`)
    and validate it. Returns the COCO dict (LVIS fields kept) and the load report; raises MaskxError
    naming the file and record for anything malformed.
    """
    path = Path(path)
    data = read_json(path, "LVIS annotation file")
    if not isinstance(data, dict):
        raise MaskxError("not an LVIS annotation file (top level is not an object)", path)
    normalize_lvis(data, path)
    return validate_coco(data, path, require_masks=require_masks)


def load_split(json_path: str | Path, what: str, require_masks: bool = False) -> tuple[dict, LoadReport]:
    """The annotation file of the ``what`` split (``train`` / ``val``): read, validated, not empty."""
    if not json_path:
        raise MaskxError(f"no {what} annotation file given (data.{what}_json)")
    data, report = load_coco(json_path, require_masks=require_masks)
    if not data["images"]:
        raise MaskxError(f"the {what} split has no images", json_path)
    return data, report


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # not NaN


def _check_segmentation(seg, aid, img: dict, path: Path) -> None:
    if seg is None:
        return  # box-only (null), as some converters write it
    if isinstance(seg, list):
        for poly in seg:
            # Checking the first number only keeps loading COCO train (860k annotations) fast.
            if not (isinstance(poly, list) and len(poly) % 2 == 0 and (not poly or _is_number(poly[0]))):
                raise MaskxError(f"annotation {aid} has a malformed polygon (expected lists of x, y numbers)", path)
    elif isinstance(seg, dict):
        if "counts" not in seg or "size" not in seg:
            raise MaskxError(f"annotation {aid} has an RLE segmentation without 'counts' and 'size'", path)
        size = seg["size"]
        if list(size) != [img["height"], img["width"]]:
            raise MaskxError(
                f"annotation {aid} has an RLE mask of size {list(size)} but its image {img['id']} is "
                f"{img['height']}x{img['width']} (height x width)",
                path,
            )
    else:
        raise MaskxError(f"annotation {aid} has a segmentation of type {type(seg).__name__} (expected polygons or RLE)", path)


def validate_coco(data: dict, path: str | Path, require_masks: bool = False) -> tuple[dict, LoadReport]:
    """Validate a COCO dict in place (``path`` names it in errors); see :func:`load_coco`."""
    path = Path(path)
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise MaskxError(f"not a COCO annotation file: no '{key}' list", path)
    data.setdefault("annotations", [])
    if not isinstance(data["annotations"], list):
        raise MaskxError("not a COCO annotation file: 'annotations' is not a list", path)
    report = LoadReport()

    images: dict = {}
    for n, img in enumerate(data["images"]):
        if not isinstance(img, dict):
            raise MaskxError(f"image record #{n} is not an object", path)
        for k in ("id", "file_name", "width", "height"):
            if k not in img:
                raise MaskxError(f"image record {img.get('id', f'#{n}')} has no '{k}'", path)
        if img["id"] in images:
            raise MaskxError(f"duplicate image id {img['id']}", path)
        if not (isinstance(img["width"], int) and isinstance(img["height"], int) and img["width"] > 0 and img["height"] > 0):
            raise MaskxError(f"image record {img['id']} has a bad size {img['width']!r}x{img['height']!r}", path)
        images[img["id"]] = img
    cat_ids: set = set()
    for n, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or "id" not in cat or "name" not in cat:
            raise MaskxError(f"category record #{n} ({cat!r:.80}) has no 'id' or 'name'", path)
        if cat["id"] in cat_ids:
            raise MaskxError(f"duplicate category id {cat['id']}", path)
        cat_ids.add(cat["id"])
    if not data["categories"]:
        raise MaskxError("the category list is empty", path)

    kept = []
    ann_ids: set = set()
    for n, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise MaskxError(f"annotation record #{n} is not an object", path)
        aid = ann.get("id", f"#{n}")
        for k in ("id", "image_id", "category_id", "bbox"):
            if k not in ann:
                raise MaskxError(f"annotation {aid} has no '{k}'", path)
        if ann["id"] in ann_ids:
            raise MaskxError(f"duplicate annotation id {ann['id']}", path)
        ann_ids.add(ann["id"])
        img = images.get(ann["image_id"])
        if img is None:
            raise MaskxError(f"annotation {aid} points at image {ann['image_id']}, which is not in the image list", path)
        if ann["category_id"] not in cat_ids:
            raise MaskxError(f"annotation {aid} has category {ann['category_id']}, which is not in the category list", path)
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            raise MaskxError(f"annotation {aid} has a malformed bbox {bbox!r} (expected [x, y, w, h])", path)
        if "segmentation" in ann:
            _check_segmentation(ann["segmentation"], aid, img, path)
        if require_masks and not has_usable_mask(ann):
            raise MaskxError(f"annotation {aid} has no mask (segmentation {_seg_kind(ann)})", path)
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(bbox[2] * bbox[3]))
        x, y, w, h = bbox
        if w <= 0 or h <= 0 or x >= img["width"] or y >= img["height"] or x + w <= 0 or y + h <= 0:
            report.degenerate_boxes += 1
            if len(report.first_degenerate) < 5:
                report.first_degenerate.append(ann["id"])
            continue
        if ann["iscrowd"]:
            report.crowd_annotations += 1
        elif not has_usable_mask(ann):
            report.box_only += 1
        kept.append(ann)
    data["annotations"] = kept
    with_anns = {a["image_id"] for a in kept}
    report.images_without_annotations = len(set(images) - with_anns)
    return data, report


def _seg_kind(ann: dict) -> str:
    """How a box-only annotation's segmentation is written, for messages."""
    if "segmentation" not in ann:
        return "absent"
    seg = ann["segmentation"]
    if seg is None:
        return "null"
    if seg == []:
        return "[]"
    return "without a polygon of 3 points" if isinstance(seg, list) else "with empty RLE counts"


def check_same_categories(a: list[dict], b: list[dict], a_name: str, b_name: str | Path) -> None:
    """Raise unless two category lists hold the same ids with the same names."""
    ma = {c["id"]: c["name"] for c in a}
    mb = {c["id"]: c["name"] for c in b}
    if ma == mb:
        return
    only_a = sorted(set(ma) - set(mb))
    only_b = sorted(set(mb) - set(ma))
    renamed = sorted(i for i in set(ma) & set(mb) if ma[i] != mb[i])
    if only_a:
        detail = f"category {only_a[0]} ('{ma[only_a[0]]}') of {a_name} is missing"
    elif only_b:
        detail = f"category {only_b[0]} ('{mb[only_b[0]]}') is not in {a_name}"
    else:
        i = renamed[0]
        detail = f"category {i} is '{mb[i]}' here but '{ma[i]}' in {a_name}"
    raise MaskxError(f"class list does not match {a_name} ({len(ma)} vs {len(mb)} classes): {detail}", b_name)


def annotation_mask(ann: dict, height: int, width: int) -> np.ndarray:
    """Binary mask ``uint8[H, W]`` of one annotation (polygon, RLE or compressed RLE).

    Polygons with fewer than 3 points are dropped (pycocotools would read a 4-number polygon as a
    box); a box-only annotation (see :func:`has_usable_mask`) gives an empty mask: callers serve it
    as a target only where ``has_usable_mask`` holds.
    """
    seg = ann.get("segmentation")
    if not has_usable_mask(ann):
        return np.zeros((height, width), np.uint8)
    if isinstance(seg, list):
        polys = [p for p in seg if len(p) >= 6]
        if not polys:
            return np.zeros((height, width), np.uint8)
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
    elif isinstance(seg.get("counts"), list):
        rle = mask_utils.frPyObjects(seg, height, width)
    else:
        rle = seg
        if isinstance(rle["counts"], str):
            rle = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    return mask_utils.decode(rle).astype(np.uint8)


def open_image(path: str | Path) -> Image.Image:
    """The decoded 8-bit RGB image at ``path``, or one MaskxError.

    Decoded by what the image is (:func:`_as_rgb`): 16-bit grayscale scaled from its 0-65535 range,
    8-bit grayscale, palette and CMYK converted by Pillow. EXIF orientation is not applied
    (:func:`exif_orientation` reads it): COCO's annotations refer to the stored pixel grid.
    """
    path = Path(path)
    try:
        if path.is_file() and path.stat().st_size == 0:
            raise MaskxError("image cannot be read: the file is empty (0 bytes)", path)
        with Image.open(path) as im:
            return _as_rgb(im, path)
    except FileNotFoundError:
        raise MaskxError("image file not found", path) from None
    except IsADirectoryError:
        raise MaskxError("is a folder, not an image file", path) from None
    except UnidentifiedImageError:
        raise MaskxError("image cannot be read: not an image file (or a format Pillow does not know)", path) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise MaskxError(f"image cannot be read ({exc.__class__.__name__}: {exc})", path) from None


WIDE_GRAY_MAX = 65535  # the top of a 16-bit image's range, which maps to 255


def _as_rgb(im: Image.Image, path: Path) -> Image.Image:
    """``im`` as 8-bit RGB. Integer grayscale of more than 8 bits (Pillow's ``I;16`` modes, and ``I``,
    which Pillow gives some 16-bit files) is scaled from 0-65535 to 0-255 (``value / 257``, rounded):
    Pillow's own conversion clips it at 255, which makes a 16-bit image all white. An ``I`` image with
    values beyond 16 bits, or a floating-point one (``F``), has no range to scale from: refused."""
    if im.mode == "F":
        raise MaskxError("image cannot be read: a floating-point image (Pillow mode F) has no defined value range; "
                         "save it with 8 or 16 bits per sample", path)
    if not im.mode.startswith("I"):
        return im.convert("RGB")
    values = np.asarray(im).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > WIDE_GRAY_MAX):
        raise MaskxError(f"image cannot be read: integer values from {values.min()} to {values.max()} are beyond 16 bits "
                         "(0-65535); save it with 8 or 16 bits per sample", path)
    gray = np.rint(values * (255 / WIDE_GRAY_MAX)).astype(np.uint8)
    return Image.fromarray(gray, "L").convert("RGB")


def exif_orientation(path: str | Path) -> int:
    """The EXIF orientation tag of the image at ``path`` (1, the stored grid upright, where there is none).

    maskx reads every image on its stored pixel grid (COCO's annotations refer to it) and never
    turns it by this tag; a value other than 1 means a viewer shows the image turned or mirrored.
    """
    try:
        with Image.open(path) as im:
            return int(im.getexif().get(0x0112, 1) or 1)
    except (OSError, SyntaxError, ValueError, TypeError):
        return 1


def read_image(path: Path) -> torch.Tensor:
    """An RGB image as ``float32[3, H, W]`` in [0, 1] (see :func:`open_image`)."""
    arr = np.asarray(open_image(path))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def missing_images(data: dict, image_root: str | Path, limit: int = 0) -> list[str]:
    """File names (relative to ``image_root``) of the images in ``data`` that do not exist.

    ``limit`` > 0 stops after that many; a quick check before a long run.
    """
    root = Path(image_root)
    out = []
    for img in data["images"]:
        if not (root / img["file_name"]).is_file():
            out.append(img["file_name"])
            if limit and len(out) >= limit:
                break
    return out


def unreadable_images(data: dict, image_root: str | Path, progress: Progress = NULL_PROGRESS) -> list[tuple[str, str]]:
    """``(file_name, reason)`` of every image in ``data`` that training could not read.

    Opens and decodes each image as :class:`CocoDataset` does: missing, empty (0 bytes), not an
    image, truncated or corrupt files, and images whose size differs from their record.
    """
    root = Path(image_root)
    bad = []
    task = progress.task("open images", len(data["images"]))
    for img in data["images"]:
        try:
            size = open_image(root / img["file_name"]).size
            if size != (img["width"], img["height"]):
                bad.append((img["file_name"], f"image is {size[0]}x{size[1]} but its record (id {img['id']}) says "
                                              f"{img['width']}x{img['height']}"))
        except MaskxError as exc:
            bad.append((img["file_name"], exc.message))
        task.advance(1, unreadable=len(bad))
    task.close()
    return bad


class CocoDataset(torch.utils.data.Dataset):
    """Images and targets of a COCO dict, in torchvision's detection format.

    ``dataset[i]`` is ``(image float32[3, H, W], target)`` with ``target`` holding
    ``boxes`` float32[N, 4] (x1, y1, x2, y2), ``labels`` int64[N] (contiguous 1..K in category
    order), ``image_id`` int, and with ``with_masks`` also ``masks`` uint8[N, H, W] and
    ``has_mask`` bool[N]: True where the class is one of ``mask_category_ids`` and the annotation
    has a mask (:func:`has_usable_mask`) whose rasterised form is not empty; elsewhere the mask is
    all zero and must never be a target. Crowd annotations are left out of targets.
    """

    def __init__(
        self,
        data: dict,
        image_root: str | Path,
        with_masks: bool = False,
        mask_category_ids: list[int] | None = None,
        max_images: int = 0,
        drop_empty: bool = False,
    ):
        self.data = data
        self.image_root = Path(image_root)
        self.with_masks = with_masks
        self.cat_ids = [c["id"] for c in data["categories"]]
        self.label_of = {cid: i + 1 for i, cid in enumerate(self.cat_ids)}
        self.mask_cats = set(self.cat_ids if mask_category_ids is None else mask_category_ids)
        self.anns_by_image: dict = {}
        for ann in data["annotations"]:
            if not ann.get("iscrowd", 0):
                self.anns_by_image.setdefault(ann["image_id"], []).append(ann)
        images = sorted(data["images"], key=lambda im: im["id"])
        if drop_empty:
            images = [im for im in images if self.anns_by_image.get(im["id"])]
        if max_images:
            images = images[:max_images]
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def has_mask(self, ann: dict) -> bool:
        """Whether annotation ``ann``'s mask is served: its class is a mask class and it has a mask
        (:func:`has_usable_mask`; :meth:`__getitem__` also drops a mask that rasterises to nothing)."""
        return ann["category_id"] in self.mask_cats and has_usable_mask(ann)

    def image_path(self, index: int) -> Path:
        return self.image_root / self.images[index]["file_name"]

    def __getitem__(self, index: int):
        info = self.images[index]
        path = self.image_path(index)
        try:
            image = read_image(path)
        except MaskxError as exc:
            raise MaskxError(f"{exc.message} (image id {info['id']}, file_name '{info['file_name']}')", path) from None
        h, w = image.shape[1:]
        if (h, w) != (info["height"], info["width"]):
            raise MaskxError(
                f"image is {w}x{h} but its record (id {info['id']}) says {info['width']}x{info['height']}",
                path,
            )
        anns = self.anns_by_image.get(info["id"], [])
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2].clamp_(0, w)
        boxes[:, 1::2].clamp_(0, h)
        target = {
            "boxes": boxes,
            "labels": torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.int64),
            "image_id": info["id"],
        }
        if self.with_masks:
            has_mask = [self.has_mask(a) for a in anns]
            masks = np.zeros((len(anns), h, w), np.uint8)
            for i, a in enumerate(anns):
                if has_mask[i]:
                    masks[i] = annotation_mask(a, h, w)
                    has_mask[i] = bool(masks[i].any())  # e.g. a polygon wholly outside the image: no target
            target["masks"] = torch.from_numpy(masks)
            target["has_mask"] = torch.tensor(has_mask, dtype=torch.bool)
        return image, target


def collate(batch):
    """Batch of ``(image, target)`` pairs -> ``(tuple of images, tuple of targets)`` (sizes differ)."""
    return tuple(zip(*batch))

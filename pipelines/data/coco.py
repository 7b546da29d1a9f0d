"""COCO-format annotation files: load, validate, and serve as a torch Dataset.

The internal data format of maskx is the COCO dict: ``{"images": [...], "annotations": [...],
"categories": [...]}``. Masks may be polygons, uncompressed or compressed RLE. Crowd regions
(``iscrowd=1``) are kept for evaluation but never used as training targets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils

from pipelines.errors import MaskxError
from pipelines.io import read_json


@dataclass
class LoadReport:
    """What validation skipped, so that it can be counted in a warning rather than silently."""

    degenerate_boxes: int = 0
    images_without_annotations: int = 0


def load_coco(path: str | Path, require_masks: bool = False) -> tuple[dict, LoadReport]:
    """Read and validate a COCO instances file.

    Returns the dataset dict (annotations with degenerate boxes removed) and a report of what was
    skipped. Raises MaskxError naming the file and record for structural problems: missing keys,
    duplicate ids, annotations whose image or category is not listed.
    """
    path = Path(path)
    data = read_json(path, "annotation file")
    if not isinstance(data, dict):
        raise MaskxError("not a COCO annotation file (top level is not an object)", path)
    for key in ("images", "categories"):
        if key not in data:
            raise MaskxError(f"not a COCO annotation file: no '{key}' list", path)
    data.setdefault("annotations", [])
    report = LoadReport()

    image_ids: set = set()
    for img in data["images"]:
        for k in ("id", "file_name", "width", "height"):
            if k not in img:
                raise MaskxError(f"image record {img.get('id', '?')} has no '{k}'", path)
        if img["id"] in image_ids:
            raise MaskxError(f"duplicate image id {img['id']}", path)
        image_ids.add(img["id"])
    cat_ids: set = set()
    for cat in data["categories"]:
        if "id" not in cat or "name" not in cat:
            raise MaskxError(f"category record {cat} has no 'id' or 'name'", path)
        if cat["id"] in cat_ids:
            raise MaskxError(f"duplicate category id {cat['id']}", path)
        cat_ids.add(cat["id"])
    if not data["categories"]:
        raise MaskxError("the category list is empty", path)

    kept = []
    ann_ids: set = set()
    for ann in data["annotations"]:
        aid = ann.get("id", "?")
        for k in ("id", "image_id", "category_id", "bbox"):
            if k not in ann:
                raise MaskxError(f"annotation {aid} has no '{k}'", path)
        if ann["id"] in ann_ids:
            raise MaskxError(f"duplicate annotation id {ann['id']}", path)
        ann_ids.add(ann["id"])
        if ann["image_id"] not in image_ids:
            raise MaskxError(f"annotation {aid} points at image {ann['image_id']}, which is not in the image list", path)
        if ann["category_id"] not in cat_ids:
            raise MaskxError(f"annotation {aid} has category {ann['category_id']}, which is not in the category list", path)
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            raise MaskxError(f"annotation {aid} has a malformed bbox {bbox!r} (expected [x, y, w, h])", path)
        if require_masks and "segmentation" not in ann:
            raise MaskxError(f"annotation {aid} has no 'segmentation'", path)
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(bbox[2] * bbox[3]))
        if bbox[2] <= 0 or bbox[3] <= 0:
            report.degenerate_boxes += 1
            continue
        kept.append(ann)
    data["annotations"] = kept
    with_anns = {a["image_id"] for a in kept}
    report.images_without_annotations = len(image_ids - with_anns)
    return data, report


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
    """Binary mask ``uint8[H, W]`` of one annotation (polygon, RLE or compressed RLE)."""
    seg = ann["segmentation"]
    if isinstance(seg, list):
        if not seg:
            return np.zeros((height, width), np.uint8)
        rles = mask_utils.frPyObjects(seg, height, width)
        rle = mask_utils.merge(rles)
    elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):
        rle = mask_utils.frPyObjects(seg, height, width)
    else:
        rle = seg
    return mask_utils.decode(rle).astype(np.uint8)


def read_image(path: Path) -> torch.Tensor:
    """An RGB image as ``float32[3, H, W]`` in [0, 1] (grayscale, palette and CMYK converted)."""
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise MaskxError("image file not found", path) from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise MaskxError(f"image cannot be read ({exc.__class__.__name__})", path) from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


class CocoDataset(torch.utils.data.Dataset):
    """Images and targets of a COCO dict, in torchvision's detection format.

    ``dataset[i]`` is ``(image float32[3, H, W], target)`` with ``target`` holding
    ``boxes`` float32[N, 4] (x1, y1, x2, y2), ``labels`` int64[N] (contiguous 1..K in category
    order), ``image_id`` int, and with ``with_masks`` also ``masks`` uint8[N, H, W] and
    ``has_mask`` bool[N] (True for the classes in ``mask_category_ids``; others are box-only).
    Crowd annotations are left out of targets.
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

    def image_path(self, index: int) -> Path:
        return self.image_root / self.images[index]["file_name"]

    def __getitem__(self, index: int):
        info = self.images[index]
        image = read_image(self.image_path(index))
        h, w = image.shape[1:]
        if (h, w) != (info["height"], info["width"]):
            raise MaskxError(
                f"image is {w}x{h} but its record (id {info['id']}) says {info['width']}x{info['height']}",
                self.image_path(index),
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
            has_mask = [a["category_id"] in self.mask_cats and "segmentation" in a for a in anns]
            masks = np.zeros((len(anns), h, w), np.uint8)
            for i, a in enumerate(anns):
                if has_mask[i]:
                    masks[i] = annotation_mask(a, h, w)
            target["masks"] = torch.from_numpy(masks)
            target["has_mask"] = torch.tensor(has_mask, dtype=torch.bool)
        return image, target


def collate(batch):
    return tuple(zip(*batch))

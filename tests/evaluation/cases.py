"""Small COCO ground truth and results made in memory for the evaluation tests."""

from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils


def rect_rle(x: int, y: int, w: int, h: int, height: int, width: int) -> dict:
    """Compressed RLE (counts as str) of an axis-aligned rectangle of whole pixels."""
    m = np.zeros((height, width, 1), np.uint8, order="F")
    m[y : y + h, x : x + w, 0] = 1
    rle = mask_utils.encode(m)[0]
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def blob_rle(rng: np.random.Generator, box: list[float], height: int, width: int) -> dict:
    """Compressed RLE of an ellipse-ish polygon inside ``box`` ([x, y, w, h])."""
    x, y, w, h = box
    t = np.linspace(0, 2 * np.pi, 12, endpoint=False)
    r = rng.uniform(0.6, 1.0, t.size)
    px = x + w / 2 + r * np.cos(t) * w / 2
    py = y + h / 2 + r * np.sin(t) * h / 2
    poly = np.stack([px, py], 1).ravel().tolist()
    rle = mask_utils.merge(mask_utils.frPyObjects([poly], height, width))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def categories(n: int) -> list[dict]:
    return [{"id": 2 * i + 1, "name": f"class{i}"} for i in range(n)]


def random_case(seed: int, n_images: int = 20, n_cats: int = 6, crowd: bool = True, empty_images: int = 2):
    """(gt, results): random blobs of every size, jittered and spurious detections, some crowd GT,
    images without ground truth and detections of classes absent from an image."""
    rng = np.random.default_rng(seed)
    cats = categories(n_cats)
    cat_ids = [c["id"] for c in cats]
    images, anns, results = [], [], []
    for i in range(n_images):
        height, width = int(rng.integers(60, 240)), int(rng.integers(60, 240))
        img_id = 100 + 7 * i
        images.append({"id": img_id, "file_name": f"{img_id}.png", "height": height, "width": width})
        n_gt = 0 if i < empty_images else int(rng.integers(1, 8))
        for _ in range(n_gt):
            w = float(rng.uniform(3, width * 0.8))
            h = float(rng.uniform(3, height * 0.8))
            x = float(rng.uniform(0, width - w))
            y = float(rng.uniform(0, height - h))
            seg = blob_rle(rng, [x, y, w, h], height, width)
            cat = int(rng.choice(cat_ids))
            iscrowd = int(crowd and rng.random() < 0.1)
            anns.append({
                "id": len(anns) + 1, "image_id": img_id, "category_id": cat, "bbox": [x, y, w, h],
                "area": float(mask_utils.area(seg)), "iscrowd": iscrowd, "segmentation": seg,
            })
            for _ in range(int(rng.integers(0, 3))):  # detections near this object
                j = rng.normal(0, 0.12, 4) * [w, h, w, h]
                box = [max(0.0, x + j[0]), max(0.0, y + j[1]), max(1.0, w + j[2]), max(1.0, h + j[3])]
                dcat = cat if rng.random() < 0.8 else int(rng.choice(cat_ids))
                results.append({"image_id": img_id, "category_id": dcat, "score": float(rng.random()),
                                "bbox": box, "segmentation": blob_rle(rng, box, height, width)})
        for _ in range(int(rng.integers(0, 4))):  # spurious detections
            w = float(rng.uniform(2, width * 0.7))
            h = float(rng.uniform(2, height * 0.7))
            box = [float(rng.uniform(0, width - w)), float(rng.uniform(0, height - h)), w, h]
            results.append({"image_id": img_id, "category_id": int(rng.choice(cat_ids)),
                            "score": float(rng.random()), "bbox": box,
                            "segmentation": blob_rle(rng, box, height, width)})
    gt = {"images": images, "annotations": anns, "categories": cats}
    return gt, results


def image(img_id: int, height: int = 200, width: int = 200) -> dict:
    return {"id": img_id, "file_name": f"{img_id}.png", "height": height, "width": width}


def gt_rect(ann_id: int, img_id: int, cat: int, x: int, y: int, w: int, h: int, iscrowd: int = 0, size=(200, 200)) -> dict:
    return {"id": ann_id, "image_id": img_id, "category_id": cat, "bbox": [x, y, w, h], "area": float(w * h),
            "iscrowd": iscrowd, "segmentation": rect_rle(x, y, w, h, *size)}


def det_rect(img_id: int, cat: int, score: float, x: int, y: int, w: int, h: int, size=(200, 200)) -> dict:
    return {"image_id": img_id, "category_id": cat, "score": score, "bbox": [x, y, w, h],
            "segmentation": rect_rle(x, y, w, h, *size)}


def all_sizes_gt() -> dict:
    """Two classes, objects small (8x8), medium (40x40) and large (120x120) on two images."""
    anns = [
        gt_rect(1, 1, 1, 5, 5, 8, 8), gt_rect(2, 1, 1, 30, 30, 40, 40), gt_rect(3, 1, 3, 70, 70, 120, 120),
        gt_rect(4, 2, 3, 10, 10, 8, 8), gt_rect(5, 2, 3, 100, 20, 40, 40), gt_rect(6, 2, 1, 20, 70, 120, 120),
    ]
    return {"images": [image(1), image(2)], "annotations": anns, "categories": categories(2)}


def perfect_results(gt: dict) -> list[dict]:
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0, "bbox": list(a["bbox"]),
             "segmentation": dict(a["segmentation"])} for a in gt["annotations"]]


S = 100  # side of the LVIS fixture's images


def _lvis_square(x, y, s=40):
    return [[x, y, x + s, y, x + s, y + s, x, y + s]]


def lvis_dict() -> dict:
    """An LVIS v1 file's content: three images; person (f), dog (c), aerosol can (r), zebra (f).

    Image 1: one person; dog checked absent (neg). Image 2: one dog, dog not exhaustively marked.
    Image 3: one person and one zebra; nothing checked absent.
    """
    cats = [
        {"id": 1, "name": "aerosol_can", "synset": "aerosol.n.02", "frequency": "r", "image_count": 3, "instance_count": 4},
        {"id": 2, "name": "person", "synset": "person.n.01", "frequency": "f", "image_count": 900, "instance_count": 9000},
        {"id": 3, "name": "dog", "synset": "dog.n.01", "frequency": "c", "image_count": 90, "instance_count": 100},
        {"id": 4, "name": "zebra", "synset": "zebra.n.01", "frequency": "f", "image_count": 200, "instance_count": 800},
    ]
    images = [
        {"id": 1, "coco_url": "http://images.cocodataset.org/train2017/000000000001.jpg", "width": S, "height": S,
         "neg_category_ids": [3], "not_exhaustive_category_ids": []},
        {"id": 2, "coco_url": "http://images.cocodataset.org/val2017/000000000002.jpg", "width": S, "height": S,
         "neg_category_ids": [], "not_exhaustive_category_ids": [3]},
        {"id": 3, "coco_url": "http://images.cocodataset.org/train2017/000000000003.jpg", "width": S, "height": S,
         "neg_category_ids": [], "not_exhaustive_category_ids": []},
    ]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 2, "bbox": [10, 10, 40, 40], "area": 1600, "segmentation": _lvis_square(10, 10)},
        {"id": 2, "image_id": 2, "category_id": 3, "bbox": [20, 20, 40, 40], "area": 1600, "segmentation": _lvis_square(20, 20)},
        {"id": 3, "image_id": 3, "category_id": 2, "bbox": [5, 5, 40, 40], "area": 1600, "segmentation": _lvis_square(5, 5)},
        {"id": 4, "image_id": 3, "category_id": 4, "bbox": [50, 50, 40, 40], "area": 1600, "segmentation": _lvis_square(50, 50)},
    ]
    return {"info": {}, "licenses": [], "images": images, "annotations": anns, "categories": cats}


def lvis_det(image_id, cat, x, y, score, s=40):
    rle = mask_utils.merge(mask_utils.frPyObjects(_lvis_square(x, y, s), S, S))
    return {"image_id": image_id, "category_id": cat, "score": score, "bbox": [x, y, s, s],
            "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}}


def lvis_perfect(gt: dict) -> list[dict]:
    return [lvis_det(a["image_id"], a["category_id"], a["bbox"][0], a["bbox"][1], 0.9) for a in gt["annotations"]]

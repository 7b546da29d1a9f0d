"""LVIS v1 annotation files, read into the internal COCO dict, and LVIS class splits.

LVIS v1 (``lvis_v1_train.json`` / ``lvis_v1_val.json``) is COCO-like with three differences that
matter here:

- images carry ``coco_url`` (``http://images.cocodataset.org/train2017/000000391895.jpg``) and no
  ``file_name``; the file name is derived from the URL's last two parts (``train2017/000000391895.jpg``),
  so the image root is the folder holding COCO 2017's ``train2017/`` and ``val2017/``;
- labels are federated: each image lists ``neg_category_ids`` (verified absent) and
  ``not_exhaustive_category_ids`` (present but not all instances marked); both are kept, and
  :mod:`pipelines.evaluation.lvis_eval` applies them;
- each category has ``frequency`` (``r`` rare: 1-10 training images, ``c`` common: 11-100,
  ``f`` frequent: >100) and a WordNet ``synset``.

Every category gets a ``coco_id`` field: the COCO 2017 category id of the 80 LVIS synsets that
are COCO classes (the LVIS authors' ``coco_to_synset`` table), ``null`` for the rest, so that
:func:`pipelines.data.splits.coco_id_of` and the ``voc`` / ``nonvoc`` splits mean the same
classes on LVIS as on COCO.

Class splits of LVIS (``frequency:f``, ``frequency:fc``, ``coco``, ``noncoco``) are resolved with every
other split by :func:`pipelines.data.splits.resolve_split`; LVIS files are read by
:func:`pipelines.data.coco.load_coco` (which recognises them) or :func:`pipelines.data.coco.load_lvis`.
"""

from __future__ import annotations

from pathlib import Path

from pipelines.data.splits import FREQUENCIES
from pipelines.errors import MaskxError
from pipelines.io import file_name_from_url

# LVIS v1 synset -> COCO 2017 category id, for the 80 COCO classes (LVIS's coco_to_synset table).
LVIS_SYNSET_TO_COCO_ID: dict[str, int] = {
    "person.n.01": 1, "bicycle.n.01": 2, "car.n.01": 3, "motorcycle.n.01": 4, "airplane.n.01": 5,
    "bus.n.01": 6, "train.n.01": 7, "truck.n.01": 8, "boat.n.01": 9, "traffic_light.n.01": 10,
    "fireplug.n.01": 11, "stop_sign.n.01": 13, "parking_meter.n.01": 14, "bench.n.01": 15,
    "bird.n.01": 16, "cat.n.01": 17, "dog.n.01": 18, "horse.n.01": 19, "sheep.n.01": 20,
    "beef.n.01": 21, "elephant.n.01": 22, "bear.n.01": 23, "zebra.n.01": 24, "giraffe.n.01": 25,
    "backpack.n.01": 27, "umbrella.n.01": 28, "bag.n.04": 31, "necktie.n.01": 32, "bag.n.06": 33,
    "frisbee.n.01": 34, "ski.n.01": 35, "snowboard.n.01": 36, "ball.n.06": 37, "kite.n.03": 38,
    "baseball_bat.n.01": 39, "baseball_glove.n.01": 40, "skateboard.n.01": 41, "surfboard.n.01": 42,
    "tennis_racket.n.01": 43, "bottle.n.01": 44, "wineglass.n.01": 46, "cup.n.01": 47, "fork.n.01": 48,
    "knife.n.01": 49, "spoon.n.01": 50, "bowl.n.03": 51, "banana.n.02": 52, "apple.n.01": 53,
    "sandwich.n.01": 54, "orange.n.01": 55, "broccoli.n.01": 56, "carrot.n.01": 57, "frank.n.02": 58,
    "pizza.n.01": 59, "doughnut.n.02": 60, "cake.n.03": 61, "chair.n.01": 62, "sofa.n.01": 63,
    "pot.n.04": 64, "bed.n.01": 65, "dining_table.n.01": 67, "toilet.n.02": 70,
    "television_receiver.n.01": 72, "laptop.n.01": 73, "mouse.n.04": 74, "remote_control.n.01": 75,
    "computer_keyboard.n.01": 76, "cellular_telephone.n.01": 77, "microwave.n.02": 78, "oven.n.01": 79,
    "toaster.n.02": 80, "sink.n.01": 81, "electric_refrigerator.n.01": 82, "book.n.01": 84,
    "clock.n.01": 85, "vase.n.01": 86, "scissors.n.01": 87, "teddy.n.01": 88, "hand_blower.n.01": 89,
    "toothbrush.n.01": 90,
}



def is_lvis(data: dict) -> bool:
    """True for an LVIS-style dict (``neg_category_ids`` per image, or ``frequency`` r/c/f per category)."""
    images, cats = data.get("images") or [], data.get("categories") or []
    return bool(
        (images and isinstance(images[0], dict) and "neg_category_ids" in images[0])
        or (cats and isinstance(cats[0], dict) and cats[0].get("frequency") in ("r", "c", "f"))
    )


def normalize_lvis(data: dict, path: str | Path) -> dict:
    """Bring an LVIS v1 dict to the internal COCO form, in place; ``path`` names it in errors.

    Adds ``file_name`` to images (from ``coco_url``), ``coco_id`` to categories and ``iscrowd=0`` to
    annotations; checks ``frequency`` and the per-image federated lists. Returns ``data``.
    """
    path = Path(path)
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise MaskxError(f"not an LVIS annotation file: no '{key}' list", path)
    cat_ids = set()
    for n, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or "id" not in cat:
            raise MaskxError(f"category record #{n} has no 'id'", path)
        freq = cat.get("frequency")
        if freq not in FREQUENCIES:
            raise MaskxError(f"category {cat['id']} has frequency {freq!r} (expected one of r, c, f)", path)
        if "coco_id" not in cat:
            cat["coco_id"] = LVIS_SYNSET_TO_COCO_ID.get(cat.get("synset", ""))
        cat_ids.add(cat["id"])
    for n, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img:
            raise MaskxError(f"image record #{n} has no 'id'", path)
        if "file_name" not in img:
            if not img.get("coco_url"):
                raise MaskxError(f"image record {img['id']} has neither 'file_name' nor 'coco_url'", path)
            img["file_name"] = file_name_from_url(img["coco_url"])
        for key in ("neg_category_ids", "not_exhaustive_category_ids"):
            ids = img.get(key)
            if not isinstance(ids, list):
                raise MaskxError(f"image record {img['id']} has no '{key}' list (LVIS's federated labels)", path)
            bad = [c for c in ids if c not in cat_ids]
            if bad:
                raise MaskxError(f"image record {img['id']}: {key} holds category {bad[0]}, which is not in the category list", path)
    for ann in data.get("annotations") or []:
        if isinstance(ann, dict):
            ann.setdefault("iscrowd", 0)
    return data

"""Set A and set B, and the set-A rule: which classes have masks, and which RoIs get a mask loss.

Class splits (paper §3.1): set A = the classes whose masks are used for training, set B = the
others (boxes only). :func:`resolve_split` is the only place a split spec becomes category ids:

- ``annotated``: the classes with at least one mask in the training file (box-only classes are
  set B): the natural set A of one's own data set, where some classes were labelled with polygons
  and others with boxes only;
- ``voc``: the 20 PASCAL VOC classes, by their COCO category ids (:data:`VOC_COCO_IDS`);
  ``nonvoc``: every other class (COCO or not). Refused on categories that are not COCO's (a
  category without ``coco_id`` whose id is a COCO id but whose name is not COCO's at that id), so
  that a data set numbered 1..K is never split by coincidence of numbering;
- ``all``; ``random:N:SEED`` (N classes drawn reproducibly from SEED); ``ids:1,2,3``;
- for LVIS: ``frequency:LETTERS`` (the classes whose ``frequency`` is among r / c / f, e.g.
  ``frequency:fc``), ``coco`` / ``noncoco`` (the classes with / without a COCO id).

A category's COCO id is its ``coco_id`` field when it has one (Visual Genome and LVIS classes and
the synthetic world carry it; ``null`` for classes that are not in COCO), else its ``id`` -- only
when its name is COCO's name for that id (:func:`check_coco_categories`).

The set-A rule (:func:`takes_mask_loss`): a RoI gets a mask loss only if its ground-truth class is a
mask class -- set A, or every class for a head that trains on every class's masks, as the oracle
does (:func:`mask_classes`; the head's predictor says so, ``trains_every_class`` in
``pipelines/modeling/mask_heads.py``) -- and its instance has a mask. Every training route applies it: end to end (``MaskXRoIHeads``), from the feature cache
(``cache_source``) and through the frozen detector (``DetectorRoIs``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pipelines.data.annotations import annotated_classes, describe_classes, mask_coverage, unmasked_instances
from pipelines.errors import MaskxError

# COCO 2017 category ids and names, in order (instances_*.json).
COCO_CATEGORIES: list[tuple[int, str]] = [
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"),
    (7, "train"), (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"),
    (13, "stop sign"), (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"), (18, "dog"),
    (19, "horse"), (20, "sheep"), (21, "cow"), (22, "elephant"), (23, "bear"), (24, "zebra"),
    (25, "giraffe"), (27, "backpack"), (28, "umbrella"), (31, "handbag"), (32, "tie"),
    (33, "suitcase"), (34, "frisbee"), (35, "skis"), (36, "snowboard"), (37, "sports ball"),
    (38, "kite"), (39, "baseball bat"), (40, "baseball glove"), (41, "skateboard"), (42, "surfboard"),
    (43, "tennis racket"), (44, "bottle"), (46, "wine glass"), (47, "cup"), (48, "fork"),
    (49, "knife"), (50, "spoon"), (51, "bowl"), (52, "banana"), (53, "apple"), (54, "sandwich"),
    (55, "orange"), (56, "broccoli"), (57, "carrot"), (58, "hot dog"), (59, "pizza"), (60, "donut"),
    (61, "cake"), (62, "chair"), (63, "couch"), (64, "potted plant"), (65, "bed"),
    (67, "dining table"), (70, "toilet"), (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"),
    (76, "keyboard"), (77, "cell phone"), (78, "microwave"), (79, "oven"), (80, "toaster"),
    (81, "sink"), (82, "refrigerator"), (84, "book"), (85, "clock"), (86, "vase"), (87, "scissors"),
    (88, "teddy bear"), (89, "hair drier"), (90, "toothbrush"),
]

# The 20 PASCAL VOC classes among COCO's 80, by COCO category id (Pinheiro et al. 2015; paper §3.1).
VOC_COCO_IDS: frozenset[int] = frozenset({1, 2, 3, 4, 5, 6, 7, 9, 16, 17, 18, 19, 20, 21, 44, 62, 63, 64, 67, 72})

SPLIT_HELP = "annotated | voc | nonvoc | all | random:N:SEED | ids:1,2,3 | coco | noncoco | frequency:f|fc|cr (LVIS)"
COCO_NAME = dict(COCO_CATEGORIES)
FREQUENCIES = ("r", "c", "f")  # LVIS: rare (1-10 training images), common (11-100), frequent (>100)


def coco_id_of(category: dict) -> int | None:
    """The COCO category id of a category dict (its ``coco_id`` if present, else its ``id``)."""
    if "coco_id" in category:
        return category["coco_id"]
    return category["id"]


def _same_name(a: str, b: str) -> bool:
    return a.strip().lower().replace("_", " ") == b.strip().lower().replace("_", " ")


def check_coco_categories(spec: str, categories: list[dict]) -> None:
    """Raise unless ``categories`` can be read by COCO id: every category without a ``coco_id`` field
    whose id is one of COCO's has COCO's name for it (``person`` at 1, ``dog`` at 18, ...)."""
    for c in categories:
        if "coco_id" in c or c["id"] not in COCO_NAME or _same_name(c["name"], COCO_NAME[c["id"]]):
            continue
        raise MaskxError(f"split '{spec}' picks classes by COCO category id, but these categories are not COCO's "
                         f"(id {c['id']} is '{c['name']}', COCO's id {c['id']} is '{COCO_NAME[c['id']]}'): "
                         f"use 'annotated' (the classes with masks in the training file) or ids:... for your own classes")


def resolve_split(spec: str, categories: list[dict], data: dict | None = None) -> list[int]:
    """Category ids of the classes that ``spec`` selects, in the order of ``categories``.

    ``data``: the training annotations (a COCO dict), needed by ``annotated`` only. Raises MaskxError
    for an unknown spec, a spec that selects no class, and ``voc`` / ``nonvoc`` on categories that
    are not COCO's.
    """
    spec = (spec or "").strip()
    ids = [c["id"] for c in categories]
    if spec == "all":
        chosen = ids
    elif spec == "annotated":
        if data is None:
            raise MaskxError("split 'annotated' (the classes with masks) needs the training annotations")
        with_masks = set(annotated_classes(data))
        chosen = [i for i in ids if i in with_masks]
        if not chosen:
            raise MaskxError("split 'annotated': no annotation of the training file has a mask (segmentation absent, "
                             "null or empty everywhere)")
    elif spec in ("voc", "nonvoc"):
        check_coco_categories(spec, categories)
        in_voc = [c["id"] for c in categories if coco_id_of(c) in VOC_COCO_IDS]
        if not in_voc:
            raise MaskxError(f"split '{spec}': none of the {len(ids)} categories is a PASCAL VOC class by COCO id")
        chosen = in_voc if spec == "voc" else [i for i in ids if i not in set(in_voc)]
    elif spec.startswith("random:"):
        parts = spec.split(":")
        try:
            n, seed = int(parts[1]), int(parts[2])
            assert len(parts) == 3
        except (ValueError, IndexError, AssertionError):
            raise MaskxError(f"split '{spec}' is not of the form random:N:SEED") from None
        if not 0 < n <= len(ids):
            raise MaskxError(f"split '{spec}': N must be between 1 and the number of classes ({len(ids)})")
        rng = np.random.default_rng(seed)
        picked = set(rng.choice(sorted(ids), size=n, replace=False).tolist())
        chosen = [i for i in ids if i in picked]
    elif spec.startswith("frequency:"):
        letters = spec.split(":", 1)[1]
        if not letters or any(ch not in FREQUENCIES for ch in letters):
            raise MaskxError(f"split '{spec}': expected frequency: followed by letters among r, c, f (e.g. frequency:fc)")
        if any("frequency" not in c for c in categories):
            raise MaskxError(f"split '{spec}' needs categories with a 'frequency' field (LVIS)")
        chosen = [c["id"] for c in categories if c["frequency"] in letters]
    elif spec in ("coco", "noncoco"):
        in_coco = {c["id"] for c in categories if c.get("coco_id") is not None}
        if not in_coco:
            raise MaskxError(f"split '{spec}': none of the {len(categories)} categories has a COCO id")
        chosen = [c["id"] for c in categories if (c["id"] in in_coco) == (spec == "coco")]
    elif spec.startswith("ids:"):
        try:
            wanted = {int(x) for x in spec[4:].split(",") if x.strip()}
        except ValueError:
            raise MaskxError(f"split '{spec}': ids must be integers") from None
        missing = sorted(wanted - set(ids))
        if missing:
            raise MaskxError(f"split '{spec}': category id {missing[0]} is not in the category list")
        chosen = [i for i in ids if i in wanted]
    else:
        raise MaskxError(f"unknown class split '{spec}' (expected {SPLIT_HELP})")
    if not chosen:
        raise MaskxError(f"split '{spec}' selects no class")
    return chosen


def complement(selected: list[int], categories: list[dict]) -> list[int]:
    """Category ids not in ``selected``, in category order."""
    s = set(selected)
    return [c["id"] for c in categories if c["id"] not in s]


# --------------------------------------------------------------------------------------------
# The set-A rule
@dataclass
class TrainingSets:
    """Set A of a training run, the classes whose masks train it, and what the data lacks.

    ``set_a``: category ids of set A; ``train_classes``: :func:`mask_classes` of the head;
    ``unmasked``: ids of set-A annotations without a mask (they take no mask loss);
    ``warnings``: one counted line each, naming the file.
    """

    set_a: list[int]
    train_classes: list[int]
    unmasked: list = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def training_sets(spec: str, every_class: bool, categories: list[dict], data: dict, path=None) -> TrainingSets:
    """Set A of ``spec`` on the training file ``data`` (named ``path``), for a mask side that trains on
    set A's masks or, ``every_class`` (its predictor's ``trains_every_class``), on every class's.

    Raises MaskxError (key ``data.mask_classes``) when a set-A class has instances but no mask at
    all in the file (a box-only class: chosen by mistake, e.g. by coincidence of numbering); set-A
    annotations without a mask are counted into a warning, never trained on.
    """
    set_a = resolve_split(spec, categories, data)
    in_a = set(set_a)
    empty = [c.category_id for c in mask_coverage(data) if c.category_id in in_a and c.instances and not c.with_mask]
    if empty:
        raise MaskxError(f"set A ('{spec}') holds {len(empty)} box-only class(es), with no mask in the training file: "
                         f"{describe_classes(empty, categories, 5)}; set A must be classes with masks "
                         f"('annotated' picks them)", path, key="data.mask_classes")
    unmasked = unmasked_instances(data, set_a)
    warnings = []
    if unmasked:
        first = ", ".join(str(i) for i in unmasked[:5]) + (", ..." if len(unmasked) > 5 else "")
        where = f"{path}: " if path else ""
        warnings.append(f"{where}{len(unmasked)} set-A annotation(s) have no mask (segmentation absent, null or empty): "
                        f"they train boxes only, no mask loss (annotation id {first})")
    return TrainingSets(set_a, mask_classes(every_class, set_a, categories), unmasked, warnings)


def mask_classes(every_class: bool, set_a: list[int], categories: list[dict]) -> list[int]:
    """The classes whose masks train the mask side: set A, or every class for a head that trains on
    every class's masks (``every_class``: its predictor's ``trains_every_class``, the oracle's)."""
    return [c["id"] for c in categories] if every_class else list(set_a)


def label_table(category_ids, categories: list[dict]) -> torch.Tensor:
    """bool ``[K + 1]``: True at the contiguous label (1..K, category order) of each of ``category_ids``.

    Index 0 (background) is always False.
    """
    wanted = set(category_ids)
    table = torch.zeros(len(categories) + 1, dtype=torch.bool)
    table[[i + 1 for i, c in enumerate(categories) if c["id"] in wanted]] = True
    return table


def takes_mask_loss(labels: torch.Tensor, mask_labels: torch.Tensor, has_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The set-A rule: which RoIs get a mask loss. bool ``[R]``.

    ``labels`` int64 ``[R]``: each RoI's ground-truth class (contiguous 1..K; 0 = background);
    ``mask_labels`` bool ``[K + 1]`` (:func:`label_table` of :func:`mask_classes`); ``has_mask`` bool
    ``[R]`` (optional): whether the RoI's ground-truth instance has a mask annotation. A RoI takes the
    mask loss iff it is foreground, its class is a mask class and (if given) its instance has a mask.
    """
    keep = (labels > 0) & mask_labels.to(labels.device)[labels]
    return keep & has_mask.to(keep.device) if has_mask is not None else keep

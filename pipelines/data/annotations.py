"""Which annotations carry a mask: the one rule, and its counts per class.

Files from labelling tools mix mask and box annotations: set-A classes with polygons, box-only
classes with ``segmentation`` absent, ``null`` or ``[]`` (CVAT, Label Studio and many converters
write the last), and now and then a set-A instance without a mask. :func:`has_usable_mask` decides,
for every stage, whether an annotation is a mask target; nothing else reads ``segmentation`` to
decide it. Plain Python (no torch), so the command line can use it cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass


def has_usable_mask(ann: dict) -> bool:
    """Whether annotation ``ann`` carries a mask: an RLE, or at least one polygon of 3 or more points.

    ``segmentation`` absent, ``null``, ``[]``, an RLE with empty counts, or only polygons of fewer than
    3 points (pycocotools would read 4 numbers as a box) make a box-only annotation. The one rule for
    "has a mask" everywhere: loading, the set-A rule's ``has_mask``, the feature cache, ``data check``.
    """
    seg = ann.get("segmentation")
    if isinstance(seg, dict):
        return bool(seg.get("counts"))
    if isinstance(seg, list):
        return any(isinstance(p, list) and len(p) >= 6 for p in seg)
    return False


@dataclass
class ClassCoverage:
    """Per class of a data set: non-crowd instances, and how many of them have a mask."""

    category_id: int
    name: str
    instances: int = 0
    with_mask: int = 0

    @property
    def box_only(self) -> int:
        return self.instances - self.with_mask


def mask_coverage(data: dict) -> list[ClassCoverage]:
    """:class:`ClassCoverage` of every category of ``data``, in category order (crowd regions left out)."""
    cov = {c["id"]: ClassCoverage(c["id"], c["name"]) for c in data["categories"]}
    for ann in data["annotations"]:
        if ann.get("iscrowd", 0):
            continue
        c = cov[ann["category_id"]]
        c.instances += 1
        c.with_mask += has_usable_mask(ann)
    return list(cov.values())


def annotated_classes(data: dict) -> list[int]:
    """Category ids, in category order, of the classes with at least one mask in ``data``."""
    return [c.category_id for c in mask_coverage(data) if c.with_mask]


def unmasked_instances(data: dict, class_ids) -> list:
    """Ids of the non-crowd annotations of ``class_ids`` that have no mask, in file order."""
    wanted = set(class_ids)
    return [a["id"] for a in data["annotations"]
            if a["category_id"] in wanted and not a.get("iscrowd", 0) and not has_usable_mask(a)]


def describe_classes(class_ids, categories: list[dict], limit: int = 12) -> str:
    """``'name' (id), ...`` of ``class_ids`` in category order, the first ``limit`` and a count of the rest."""
    wanted = set(class_ids)
    named = [f"{c['name']} ({c['id']})" for c in categories if c["id"] in wanted]
    more = f", ... ({len(named) - limit} more)" if len(named) > limit else ""
    return ", ".join(named[:limit]) + more

"""A labelling tool's export from the synthetic world: one's own classes, and masks on some of them only.

What a user brings to partially supervised training is one COCO file where some classes were drawn
with polygons and others with boxes only. The synthetic world writes one when asked
(``maskx data synth --names own --box-only-classes N --unmasked-fraction F``):

- ``names="own"``: categories numbered 1..K with names that are not COCO's (``bolt``, ``nut``, ...)
  and no ``coco_id``, as a labelling tool writes them;
- ``box_only_classes``: that many classes (drawn from the seed) keep their boxes but lose every
  training mask, written in turn the three ways found in the wild: ``segmentation`` absent,
  ``null`` and ``[]``;
- ``unmasked_fraction``: that share of the other classes' training annotations lose their mask
  (``[]``): the odd instance a labeller boxed and did not outline.

The validation file keeps every mask, so set B's mask AP can be measured.
"""

from __future__ import annotations

import numpy as np

# Names of one's own classes: none of them is a COCO class name.
OWN_NAMES = ("bolt", "nut", "washer", "gear", "spring", "valve", "hinge", "clamp", "rivet", "bracket", "pulley", "socket",
             "lever", "flange", "bearing", "nozzle", "gasket", "piston", "shaft", "coupling", "sprocket", "caster", "latch",
             "hook", "pin", "plug", "cap", "ring", "tube", "wedge")
BOX_ONLY_FORMS = ("absent", "null", "empty")  # segmentation key left out | null | []


def own_categories(categories: list[dict]) -> list[dict]:
    """The same classes (and looks) as a labelling tool would list them: ids 1..K, own names, no ``coco_id``."""
    out = []
    for i, c in enumerate(categories):
        name = OWN_NAMES[i] if i < len(OWN_NAMES) else f"part_{i + 1:03d}"
        out.append({"id": i + 1, "name": name, "supercategory": "part",
                    **{k: v for k, v in c.items() if k not in ("id", "name", "supercategory", "coco_id")}})
    return out


def drop_masks(data: dict, box_only_classes: int, unmasked_fraction: float, seed: int) -> dict:
    """Remove masks from the training file ``data`` in place; returns what was removed (for ``world.json``).

    ``box_only_classes`` classes lose every mask, in turn absent / null / []; ``round(unmasked_fraction
    x their number)`` of the other annotations, drawn from ``seed``, lose theirs as ``[]``.
    """
    rng = np.random.default_rng([seed, 27])
    ids = [c["id"] for c in data["categories"]]
    box_only = sorted(int(i) for i in rng.choice(ids, size=box_only_classes, replace=False)) if box_only_classes else []
    chosen = set(box_only)
    forms = {form: 0 for form in BOX_ONLY_FORMS}
    others = [i for i, ann in enumerate(data["annotations"]) if ann["category_id"] not in chosen]
    picked = set(rng.choice(others, size=round(unmasked_fraction * len(others)), replace=False).tolist()) if others else set()
    unmasked: list[int] = []
    for i, ann in enumerate(data["annotations"]):
        if ann["category_id"] in chosen:
            form = BOX_ONLY_FORMS[sum(forms.values()) % len(BOX_ONLY_FORMS)]
            forms[form] += 1
            if form == "absent":
                del ann["segmentation"]
            else:
                ann["segmentation"] = None if form == "null" else []
        elif i in picked:
            ann["segmentation"] = []
            unmasked.append(ann["id"])
    return {"box_only_classes": box_only, "box_only_annotations": forms, "unmasked_annotations": unmasked}

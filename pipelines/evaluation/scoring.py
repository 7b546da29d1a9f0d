"""The one scoring path: ground truth + results + class sets -> metrics, by COCO's or LVIS's rules.

Every evaluation in maskx ends here, through
:func:`pipelines.evaluation.inference.inference_on_dataset`: ``maskx eval`` on mask runs and on
results files, the GrabCut baseline, the sweeps and the quick start. :func:`score` validates the results once
(:func:`~pipelines.evaluation.results.validate_results`), picks the protocol from the ground truth
(LVIS when it carries LVIS's fields, as :func:`pipelines.data.lvis.is_lvis` decides), and runs
COCOeval (:mod:`~pipelines.evaluation.coco_eval`) or LVISEval's rules
(:mod:`~pipelines.evaluation.lvis_eval`) once over the union of the class sets.

================  ===============================  ==========================================
protocol          metrics                          detections that count
================  ===============================  ==========================================
``coco``          AP AP50 AP75 APs APm APl         100 per image and class
``lvis``          the same + APr APc APf           300 per image; federated rules
================  ===============================  ==========================================
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.data.annotations import describe_classes, has_usable_mask
from pipelines.data.lvis import is_lvis
from pipelines.config import EvalConfig, to_dict
from pipelines.data.splits import check_coco_categories, complement, resolve_split
from pipelines.errors import MaskxError
from pipelines.evaluation.coco_eval import (COCO_MAX_DETS, DEFAULT_BACKEND, IOU_TYPES, METRICS, Metrics, backend_name,
                                            coco_scores, prepare_gt)
from pipelines.evaluation.lvis_eval import LVIS_MAX_DETS, LVIS_METRICS, lvis_scores
from pipelines.evaluation.results import validate_results
from pipelines.io import write_json
from pipelines.progress import NULL_PROGRESS, Progress



@dataclass(frozen=True)
class Protocol:
    """An evaluation protocol: its name, its metrics in table order, its detection limit."""

    name: str  # "coco" | "lvis"
    metrics: tuple[str, ...]
    max_dets: int  # COCO: per image and class; LVIS: per image


COCO = Protocol("coco", tuple(METRICS), COCO_MAX_DETS)
LVIS = Protocol("lvis", tuple(LVIS_METRICS), LVIS_MAX_DETS)


@dataclass
class Scores:
    """What :func:`score` returns.

    ``metrics``: ``{iou_type: {set name: {metric: value}}}``, values in [0, 1] or None (undefined),
    the sets in the order given; ``protocol``: ``"coco"`` or ``"lvis"``; ``metric_names``: the
    protocol's metrics in table order; ``max_dets``: the protocol's detection limit (per image and
    class for COCO, per image for LVIS); ``notes``: plain sentences about what was not scored.
    """

    protocol: str
    metrics: dict[str, dict[str, Metrics]]
    metric_names: list[str]
    max_dets: int
    notes: list[str] = field(default_factory=list)

    @property
    def iou_types(self) -> tuple[str, ...]:
        return tuple(self.metrics)

    def record(self) -> dict:
        """The metrics-file block: ``{"protocol", "max_dets", "segm": {...}, "bbox": {...}}``."""
        return {"protocol": self.protocol, "max_dets": self.max_dets, **self.metrics}


def protocol_of(gt: Mapping) -> Protocol:
    """:data:`LVIS` for an LVIS ground truth (see :func:`pipelines.data.lvis.is_lvis`), else :data:`COCO`."""
    return LVIS if is_lvis(dict(gt)) else COCO


RUN_SPLIT = ""  # eval.split's default: set B = the classes the evaluated run had no masks for
PAPER_SPLIT = "nonvoc"  # what B is without a run (a results file) on COCO's categories: the paper's voc -> nonvoc


def class_sets(split: str, categories: list[dict], run_set_a: list[int] | None = None) -> dict[str, list[int]]:
    """``{"B": split's classes, "A": the others, "all": every class}``; ``A`` left out when empty.

    ``split`` empty (:data:`RUN_SPLIT`): B = the classes not in ``run_set_a`` (the set A a run was
    trained with); without a run, the paper's ``nonvoc`` on COCO's categories, and an error naming
    the choice elsewhere (one's own classes have no default split to score).
    """
    split = (split or "").strip()
    if split == RUN_SPLIT and run_set_a is not None:
        set_b = complement(run_set_a, categories)
    elif split == RUN_SPLIT:
        try:
            check_coco_categories(PAPER_SPLIT, categories)
        except MaskxError:
            raise MaskxError("these categories are not COCO's and there is no run to take set B from: name set B, the "
                             "classes without training masks, with split (e.g. ids:3,5)", key="split") from None
        set_b = resolve_split(PAPER_SPLIT, categories)
    else:
        set_b = resolve_split(split, categories)
    sets = {"B": set_b, "A": complement(set_b, categories), "all": [c["id"] for c in categories]}
    if not sets["A"]:
        sets.pop("A")
    return sets


def score(gt: dict, results: list[dict], sets: Mapping[str, Iterable[int]], iou_types: Iterable[str] | None = IOU_TYPES,
          backend: str = DEFAULT_BACKEND, image_ids: Iterable[int] | None = None, progress: Progress = NULL_PROGRESS,
          gt_path: str | Path | None = None, results_path: str | Path | None = None) -> Scores:
    """Score ``results`` on ``gt`` for each class set, by the ground truth's protocol.

    ``gt``: COCO or LVIS dict (``images`` with ``height``/``width``, ``annotations``,
    ``categories``); ``results``: COCO result dicts (``image_id``, ``category_id``, ``score``,
    ``bbox`` [x, y, w, h], ``segmentation`` RLE or polygons); ``sets``: name -> category ids, e.g.
    ``{"B": [...], "A": [...], "all": [...]}``; ``iou_types``: ``"segm"`` and/or ``"bbox"`` (each
    needs its field on every result), or None for whatever the results carry (a note says what was
    left out); ``image_ids``: score these images only (default: every ground-truth image); the
    paths name the files in errors.

    Raises MaskxError (one line, naming the file and the result index where it applies) for
    results that are not a list, refer to an image or category not in the ground truth, lack a
    field, or hold a mask whose size is not its image's; for sets or image ids not in the ground
    truth; for an unknown IoU type or backend. Empty results are valid: every defined AP is 0.0.
    Never prints.
    """
    if not isinstance(gt, Mapping) or not isinstance(gt.get("images"), list) or not isinstance(gt.get("categories"), list):
        raise MaskxError("ground truth is not a COCO dict (needs 'images' and 'categories' lists)", gt_path)
    protocol = protocol_of(gt)
    backend = backend_name(backend)
    types = validate_results(results, gt, iou_types, results_path)
    notes = []
    if iou_types is None:
        missing = [t for t in IOU_TYPES if t not in types]
        if missing == ["segm"]:
            notes.append("the results have no segmentations: box AP only")
        elif missing == ["bbox"]:
            notes.append("the results have no boxes: mask AP only")
    gt_ds = prepare_gt(gt, need_masks="segm" in types, path=gt_path)
    images = {im["id"] for im in gt_ds["images"]}
    cat_ids = {c["id"] for c in gt_ds["categories"]}
    subsets: dict[str, set[int]] = {}
    for name, ids in sets.items():
        unknown = sorted({int(c) for c in ids} - cat_ids)
        if unknown:
            raise MaskxError(f"class set '{name}': category {unknown[0]} is not in the ground truth's category list", gt_path)
        subsets[name] = {int(c) for c in ids}
    if image_ids is not None:
        img_subset = {int(i) for i in image_ids}
        if not img_subset:
            raise MaskxError("image_ids is empty: no image to evaluate")
        unknown = sorted(img_subset - images)
        if unknown:
            raise MaskxError(f"image {unknown[0]} is not in the ground truth's image list", gt_path)
    else:
        img_subset = images
    unmasked = classes_without_masks(gt_ds) if "segm" in types else set()
    if unmasked & set().union(*subsets.values()):
        notes.append(mask_ap_note(unmasked & set().union(*subsets.values()), gt_ds["categories"]))
    metrics = _run_engine(protocol, gt_ds, results, subsets, types, backend, img_subset, progress, unmasked)
    return Scores(protocol.name, metrics, list(protocol.metrics), protocol.max_dets, notes)


def classes_without_masks(gt: Mapping) -> set[int]:
    """Categories with a non-crowd ground-truth instance that has no mask (box-only): mask AP cannot score
    them (an unmatched detection of such an instance would count as a false positive), so it leaves them out."""
    return {int(a["category_id"]) for a in gt["annotations"] if not a.get("iscrowd", 0) and not has_usable_mask(a)}


def mask_ap_note(classes: set[int], categories: list[dict]) -> str:
    return (f"mask AP leaves out {len(classes)} class(es) whose ground truth has instances without a mask (box AP "
            f"covers them): {describe_classes(classes, categories, 8)}")


def _run_engine(protocol: Protocol, gt_ds: dict, results: list[dict], subsets: dict[str, set[int]], types, backend: str,
                img_subset: set[int], progress: Progress, unmasked: set[int]) -> dict[str, dict[str, Metrics]]:
    """``{iou_type: {set: metrics}}``: the protocol's engine over the non-empty sets; mask AP over the
    sets less ``unmasked`` (classes with box-only ground truth), on a ground truth without them."""
    engine = lvis_scores if protocol is LVIS else coco_scores
    undefined = dict.fromkeys(protocol.metrics)
    runs = [(tuple(t for t in types if t != "segm" or not unmasked), gt_ds, subsets)]
    if "segm" in types and unmasked:
        masked_gt = {**gt_ds, "annotations": [a for a in gt_ds["annotations"] if a["category_id"] not in unmasked]}
        runs.append((("segm",), masked_gt, {k: v - unmasked for k, v in subsets.items()}))
    metrics: dict[str, dict[str, Metrics]] = {}
    for run_types, gt_run, sets in runs:
        nonempty = {k: v for k, v in sets.items() if v}
        scored = engine(gt_run, results, nonempty, run_types, backend, img_subset, progress) if nonempty and run_types else {}
        for t in run_types:
            metrics[t] = {name: (dict(scored[t][name]) if name in nonempty else dict(undefined)) for name in sets}
    return {t: metrics[t] for t in types}


def evaluate_sets(gt: dict, results: list[dict], sets: Mapping[str, list[int]], iou_types: Iterable[str] = IOU_TYPES,
                  backend: str = DEFAULT_BACKEND, image_ids: list[int] | None = None) -> dict[str, dict[str, Metrics]]:
    """``score(...).metrics``: ``{iou_type: {set name: {metric: value}}}`` (see :func:`score`)."""
    return score(gt, results, sets, tuple(iou_types), backend, image_ids).metrics


def evaluate(gt: dict, results: list[dict], iou_type: str, cat_ids: list[int] | None = None, backend: str = DEFAULT_BACKEND,
             image_ids: list[int] | None = None) -> Metrics:
    """AP of one IoU type (``"segm"`` or ``"bbox"``) on a class subset.

    ``cat_ids``: the classes to average over (default: every ground-truth category; an empty list
    gives all None). Returns the protocol's metrics (COCO: ``{"AP", "AP50", "AP75", "APs", "APm",
    "APl"}``; LVIS adds ``APr``, ``APc``, ``APf``) in [0, 1], None where undefined. Empty
    ``results`` give 0.0 for every defined metric. See :func:`score` for errors; never prints.
    """
    if cat_ids is None:
        cat_ids = [c["id"] for c in gt.get("categories", [])] if isinstance(gt, Mapping) else []
    return score(gt, results, {"_": list(cat_ids)}, (iou_type,), backend, image_ids).metrics[iou_type]["_"]


# --------------------------------------------------------------------------------------------
# Scoring the predictions of several heads, as the stages do
@dataclass
class EvalResult:
    """What an evaluation stage returns: per head its metrics, the sets, and the protocol that scored them."""

    metrics: dict[str, dict]  # head name -> {"segm": {"B": {...}, "A": {...}, "all": {...}}, "bbox": {...}}
    sets: dict[str, list[int]]
    images: int
    seconds: float
    detections: dict[str, list[dict]] = field(default_factory=dict)  # head name -> COCO results
    protocol: str = "coco"  # "coco" or "lvis": whose rules scored the detections
    metric_names: list[str] = field(default_factory=lambda: list(METRICS))
    warnings: list[str] = field(default_factory=list)  # e.g. a split that scores trained classes as set B
    notes: list[str] = field(default_factory=list)  # what was not scored (classes with box-only ground truth)


def write_metrics(path: str | Path, cfg: EvalConfig, gt: dict, result: EvalResult, heads: dict[str, dict], inputs: dict) -> None:
    """The metrics file (docs/metrics.md): split, protocol, sets A / B, per head its description and
    metrics, images, time, config, inputs."""
    protocol = protocol_of(gt)
    write_json(path, {
        "split": cfg.split or "run",  # "run": B = the classes the run had no masks for
        "protocol": protocol.name,
        "max_dets": protocol.max_dets,
        "sets": {k: v for k, v in result.sets.items() if k != "all"},
        "heads": {name: {**info, **result.metrics[name]} for name, info in heads.items()},
        "notes": result.notes,
        "warnings": result.warnings,
        "images": result.images,
        "seconds": round(result.seconds, 1),
        "config": to_dict(cfg),
        "inputs": inputs,
    })

"""Export the frozen per-class detection weights (``w_cls``, ``w_box``) to HDF5, with provenance.

The file's schema is :mod:`pipelines.modeling.embeddings`' (``docs/embeddings.md``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipelines.data.coco import load_split
from pipelines.data.splits import coco_id_of, resolve_split
from pipelines.engine.run_dir import load_detector_run
from pipelines.errors import MaskxError
from pipelines.modeling.detector import detection_weights
from pipelines.modeling.embeddings import write_embeddings


@dataclass
class ExportResult:
    path: Path
    num_classes: int
    dim_cls: int
    dim_box: int
    set_a: list[int]  # category ids of the set A recorded
    spec: str  # the split that chose it
    categories: list[dict]


def export_embeddings(run: str | Path, out: str | Path, mask_classes: str | None = None) -> ExportResult:
    """Write the detector's class weights to ``out`` (HDF5). ``mask_classes`` defaults to the run's;
    ``annotated`` reads the run's training file for the classes with masks."""
    det = load_detector_run(run)
    spec = mask_classes or det.data.mask_classes
    data = None
    if spec.strip() == "annotated":
        train_json = det.data_paths().get("train_json", "")
        if not train_json:
            raise MaskxError("set A 'annotated' is read from the training file the detector was made with, and this run "
                             "names none: choose mask_classes (e.g. ids:1,2,3)", det.run_dir, key="mask_classes")
        data, _ = load_split(train_json, "train")
    set_a = resolve_split(spec, det.categories, data)
    set_a_ids = set(set_a)
    weights = tuple(t.detach().float().cpu().numpy() for t in detection_weights(det.model.roi_heads.box_predictor))
    cats = det.categories
    write_embeddings(out, weights, cats, [coco_id_of(c) for c in cats], set_a_ids,
                     {"detector_sha256": det.sha256, "detector_checkpoint": det.checkpoint, "mask_classes": spec,
                      "config": det.config})
    return ExportResult(Path(out), len(cats), weights[0].shape[1], weights[1].shape[1], set_a, spec, cats)

"""Evaluation: mask/box AP per class subset (set A, set B, all) by COCO's or LVIS's rules, and report tables.

:func:`score` is the one scoring path (see :mod:`pipelines.evaluation.scoring`); ``docs/metrics.md``
describes the metrics file, the sets, the protocols and the backends.
"""

from pipelines.evaluation.coco_eval import BACKENDS, DEFAULT_BACKEND, IOU_TYPES, METRICS
from pipelines.evaluation.lvis_eval import LVIS_MAX_DETS, LVIS_METRICS
from pipelines.evaluation.report import format_value, markdown_table, metrics_rows
from pipelines.evaluation.results import encode_masks, to_coco_results, validate_results
from pipelines.evaluation.scoring import COCO, LVIS, Protocol, Scores, class_sets, evaluate, evaluate_sets, protocol_of, score

__all__ = [
    "BACKENDS",
    "COCO",
    "DEFAULT_BACKEND",
    "IOU_TYPES",
    "LVIS",
    "LVIS_MAX_DETS",
    "LVIS_METRICS",
    "METRICS",
    "Protocol",
    "Scores",
    "class_sets",
    "encode_masks",
    "evaluate",
    "evaluate_sets",
    "format_value",
    "markdown_table",
    "metrics_rows",
    "protocol_of",
    "score",
    "to_coco_results",
    "validate_results",
]

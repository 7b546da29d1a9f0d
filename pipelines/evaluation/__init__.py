"""Evaluation: COCO mask/box AP per class subset (set A, set B, all) and report tables.

See ``docs/metrics.md`` for the metrics file, the definition of the sets and the backends.
"""

from pipelines.evaluation.coco_eval import (
    BACKENDS,
    DEFAULT_BACKEND,
    IOU_TYPES,
    METRICS,
    evaluate,
    evaluate_sets,
)
from pipelines.evaluation.report import format_value, markdown_table, metrics_rows
from pipelines.evaluation.results import encode_masks, to_coco_results

__all__ = [
    "BACKENDS",
    "DEFAULT_BACKEND",
    "IOU_TYPES",
    "METRICS",
    "encode_masks",
    "evaluate",
    "evaluate_sets",
    "format_value",
    "markdown_table",
    "metrics_rows",
    "to_coco_results",
]

"""Metrics as table rows and a Markdown table (values x100, one decimal, as in the paper's tables).

No printing here: the CLI draws tables with rich from :func:`metrics_rows`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pipelines.evaluation.coco_eval import IOU_TYPES, METRICS

UNDEFINED = "n/a"


def metrics_rows(metrics: Mapping) -> dict[str, dict[str, float | None]]:
    """Flatten ``{iou_type: {set: {metric: value}}}`` into ``{"segm B": {metric: value}, ...}``.

    Accepts the output of :func:`~pipelines.evaluation.evaluate_sets` or a whole ``metrics.json``
    dict (other top-level keys are skipped). Rows come ``segm`` first, then ``bbox``, and within an
    IoU type in the order of the sets. Values are in [0, 1] or None (undefined).
    """
    rows: dict[str, dict[str, float | None]] = {}
    for iou_type in IOU_TYPES:
        for set_name, values in (metrics.get(iou_type) or {}).items():
            rows[f"{iou_type} {set_name}"] = dict(values)
    return rows


def format_value(value: float | None) -> str:
    """A metric in [0, 1] as the paper prints it: ``0.2371 -> "23.7"``; None -> ``"n/a"``."""
    return UNDEFINED if value is None else f"{100 * value:.1f}"


def markdown_table(rows: Mapping[str, Mapping[str, float | None]], columns: Sequence[str] = METRICS) -> str:
    """A Markdown table with one line per row and one column per metric (values x100, one decimal).

    A metric missing from a row or None shows as ``n/a``. Returns the table text ending in a newline.
    """
    lines = ["| | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, values in rows.items():
        lines.append(f"| {name} | " + " | ".join(format_value(values.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"

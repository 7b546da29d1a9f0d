"""Reporting, in one module: metrics as table rows, Markdown tables, the sweep's table and Figure 3.1,
the quick start's report and its picture (values x100, one decimal, as in the paper's tables).

No printing here: the CLI draws tables with rich from :func:`metrics_rows` and :func:`display_rows`;
this module writes Markdown text and PNG files (atomically).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from pipelines.data.world_config import SynthConfig
from pipelines.evaluation.coco_eval import IOU_TYPES, METRICS
from pipelines.io import atomic_path
from pipelines.visualize import add_legend, draw_predictions, grid

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


def mean(values: Sequence[float | None]) -> float | None:
    """Mean of the defined values (None if none is)."""
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


def direction_name(spec: str) -> str:
    """A split direction as tables name it: ``voc`` -> ``voc→nonvoc`` (set A of the direction -> set B)."""
    return {"voc": "voc→nonvoc", "nonvoc": "nonvoc→voc"}.get(spec, spec)


def timing_text(timings: dict[str, float]) -> str:
    """``"stage 1 600 s, stage 2 training 100 s, ..."``: the parts that took a second or more, in order."""
    parts = [f"{part} {sec:.0f} s" for part, sec in timings.items() if sec >= 1]
    return ", ".join(parts) if parts else "every part reused"


# --------------------------------------------------------------------------------------------
# The sweep's table (table.md) and Figure 3.1 (figure.png)
WIDE = 2  # more directions than this: one table row per direction (random-split sweeps have 25)


def display_rows(directions: Sequence[str], rows: dict[str, dict[str, float | None]]) -> tuple[str, list[str], dict[str, dict[str, float | None]]]:
    """The rows to show: the paper's layout (one row per method, columns ``"<direction> B|A"``) for up
    to ``WIDE`` directions, else transposed (one row per direction, columns ``"<method> B|A"``).
    Returns the first column's heading, the other columns and the rows."""
    if len(directions) <= WIDE:
        return "method", [f"{direction_name(d)} {s}" for d in directions for s in ("B", "A")], rows
    shown = {direction_name(d): {f"{name} {s}": vals.get(f"{direction_name(d)} {s}") for name, vals in rows.items()
                                 for s in ("B", "A")} for d in directions}
    return "set A", [f"{name} {s}" for name in rows for s in ("B", "A")], shown


def render_table(title: str, directions: Sequence[str], seeds: Sequence[int], rows: dict, results: list[dict],
                 val_images: int) -> str:
    """Mask AP on B and on A (x100) per method and direction (layout: :func:`display_rows`); notes for skipped runs."""
    first, columns, shown = display_rows(directions, rows)
    head = "| " + first + " | " + " | ".join(c[:-2] + ": AP on " + c[-1] for c in columns) + " |"
    lines = [f"# {title or 'sweep'}", "",
             f"Mask AP (COCO AP@[.5:.95], x100) on {val_images} validation images; mean over stage-2 seeds {list(seeds)}.", "",
             head, "|---|" + "---:|" * len(columns)]
    for name, vals in shown.items():
        lines.append(f"| {name} | " + " | ".join(format_value(vals.get(c)) for c in columns) + " |")
    notes = sorted({f"{r['row']}: {r['note']}" for r in results if r.get("note")})
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def plot_relative_change(points: list[dict], path: Path, title: str = "") -> None:
    """Relative set-B AP change, one colour per |A| (PNG): left against the average number of mask
    annotations per class in A (the paper's axis), right against |A| with the mean per size (on a
    class-balanced data set such as the synthetic world the paper's axis hardly varies)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_n) = plt.subplots(1, 2, figsize=(10, 4), dpi=120, sharey=True)
    sizes = sorted({p["size_a"] for p in points})
    means = []
    for n in sizes:
        pts = [p for p in points if p["size_a"] == n and p["relative_change"] is not None]
        y = [100 * p["relative_change"] for p in pts]
        ax.scatter([p["masks_per_class_a"] for p in pts], y, label=f"|A| = {n}", s=25)
        ax_n.scatter([n] * len(y), y, s=25)
        if y:
            means.append((n, sum(y) / len(y)))
    if means:
        ax_n.plot([m[0] for m in means], [m[1] for m in means], color="black", lw=1, marker="_", ms=14, label="mean over trials")
        ax_n.legend(fontsize=7)
    for a in (ax, ax_n):
        a.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("average number of mask annotations per class in A")
    ax.set_ylabel("relative change in mask AP on B (%)")
    ax_n.set_xlabel("number of classes in A (|A|)")
    ax_n.set_xticks(sizes)
    fig.suptitle(title or "transfer vs class-agnostic on random A/B splits", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# The quick start's report (report.md) and picture (predictions.png)
def summary_rows(summary: dict) -> dict[str, dict[str, float | None]]:
    """Rows = heads; columns = mask AP on B and A for every split (means over seeds)."""
    rows: dict[str, dict[str, float | None]] = {}
    for direction, s in summary["splits"].items():
        for name, h in s["heads"].items():
            rows.setdefault(name, {})
            rows[name][f"{direction_name(direction)} B"] = h["mean"]["segm"]["B"]["AP"]
            rows[name][f"{direction_name(direction)} A"] = h["mean"]["segm"]["A"]["AP"]
    return rows


def stage1_text(applied: dict) -> str:
    """What the quick start's stage-1 choice by device applied, in words."""
    parts = ([f"{applied['detector_iterations']} iterations"] if applied["detector_iterations"] else []) + applied["set"]
    return ", ".join(parts) or "no setting left to choose"


def render_report(summary: dict, world: SynthConfig, seeds: Sequence[int], picture_columns: Sequence[str]) -> str:
    """``report.md``: mask AP per head and split, the transfer / baseline ratio on B, box AP, the picture
    (its two columns: ``picture_columns``), the time."""
    rows = summary_rows(summary)
    columns = list(next(iter(rows.values())).keys())
    lines = [
        "# maskx quickstart report",
        "",
        f"Synthetic world: {world.num_classes} classes, {world.train_images} train / {summary['val_images']} val images "
        f"(seed {world.seed}). One detector (stage 1, boxes of all classes); stage-2 seeds {list(seeds)}; "
        f"mask AP (COCO AP@[.5:.95], x100) from `maskx`'s own evaluation, mean over stage-2 seeds.",
        "",
        markdown_table(rows, columns),
        "",
    ]
    for direction, s in summary["splits"].items():
        ratio = s["transfer_over_agnostic_B"]
        per_seed = {n: [None if v is None else round(100 * v, 1) for v in h["segm_B_AP_per_seed"]] for n, h in s["heads"].items()}
        lines.append(f"- **{direction_name(direction)}** (|A| = {len(s['set_a'])}): transfer+MLP / class-agnostic+MLP on set B = "
                     f"{'n/a' if ratio is None else f'{ratio:.2f}x'} (paper, COCO R-50: 23.7 / 19.2 = 1.23x). Per seed, set-B mask AP: {per_seed}")
    gpu = summary.get("stage1_by_device")
    if gpu:
        lines += ["", f"Stage 1 on {gpu['device']}: the stronger detector ({stage1_text(gpu)}; explicit flags kept)."]
    lines += ["", "Box AP (mean over seeds; the same detector for every head):", ""]
    box_head = next(iter(next(iter(summary["splits"].values()))["heads"]))  # every stage-wise head has the same boxes
    box_rows = {f"{direction_name(d)} {s_}": summary["splits"][d]["heads"][box_head]["mean"]["bbox"][s_]
                for d in summary["splits"] for s_ in ("B", "A")}
    lines += [markdown_table(box_rows), "", "![predictions](predictions.png)", "",
              *picture_caption(summary.get("picture"), picture_columns),
              f"Total time: {summary['seconds']:.0f} s ({timing_text(summary.get('timings', {}))}).", ""]
    return "\n".join(lines)


def picture_caption(picture: dict | None, columns: Sequence[str]) -> list[str]:
    """The report's line under ``predictions.png`` (the quick start's picture record; ``columns``: the
    two rows drawn, left and right), and a blank line."""
    if not picture:
        return []
    return [f"Left {columns[0]}, right {columns[1]}: the same {len(picture['images'])} validation images "
            f"({direction_name(picture['split'])}, stage-2 seed {picture['seed']}), detections scoring "
            f"{picture['score_thresh']} or more; set-A classes green, set-B red.", ""]


def prediction_sheet(images: Sequence[np.ndarray], image_ids: Sequence[int], detections: dict[str, dict[int, list[dict]]],
                     names: dict[int, str], set_a: set[int], direction: str, path: Path) -> None:
    """A PNG (Figure 3.2's style) with one row per image (``images`` uint8 [H, W, 3], ids ``image_ids``)
    and one column per entry of ``detections`` (column title -> image id -> COCO result rows, highest
    score first), at 3x scale, set-A classes (``set_a``: category ids) green, set B red, a legend below
    (counting the detections left out of one column); ``direction`` is named in the column titles."""
    tiles, left_out = [], 0
    for img, image_id in zip(images, image_ids):
        for by_image in detections.values():
            dets = by_image.get(image_id, [])
            boxes = np.array([[d["bbox"][0], d["bbox"][1], d["bbox"][0] + d["bbox"][2], d["bbox"][1] + d["bbox"][3]] for d in dets]).reshape(-1, 4)
            masks = np.stack([mask_utils.decode(d["segmentation"]) for d in dets]) if dets else None
            drawing = draw_predictions(img, boxes, [names[d["category_id"]] for d in dets], np.array([d["score"] for d in dets]),
                                       masks, [d["category_id"] in set_a for d in dets], scale=3, legend=False)
            tiles.append(drawing.image)
        left_out += drawing.left_out  # the same detections in every column: counted once
    name = direction_name(direction).replace("→", " -> ")  # the bitmap font has no arrow
    sheet, _ = add_legend(grid(tiles, columns=len(detections), column_titles=[f"{title} ({name})" for title in detections]), left_out)
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")

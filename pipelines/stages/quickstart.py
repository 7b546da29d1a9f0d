"""``maskx quickstart``: the shipped ``quickstart`` sweep, then a report and a picture.

synthetic world -> stage 1 detector (boxes of all 80 classes) -> embeddings -> stage 2 mask heads
(class-agnostic+MLP, transfer+MLP, oracle) for two class splits (voc -> nonvoc, and a random 40/40)
and several stage-2 seeds -> one evaluation pass: all of it is :func:`pipelines.stages.sweep.run_sweep`
on ``pipelines/configs/sweeps/quickstart.yaml``. This module adds ``report.md``, ``report.json``
(per split and head: mask and box AP on sets B and A, mean and per seed) and ``predictions.png``.
Finished pieces are reused when the command is run again with the same settings.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from pycocotools import mask as mask_utils
from torch.utils.data import Subset

from pipelines.config import (DetectTrainConfig, EvalConfig, Override, SweepSpec, load_config, parse_overrides, stage_overrides,
                              to_dict)
from pipelines.data.coco import CocoDataset
from pipelines.engine.device import resolve_device
from pipelines.engine.run_dir import load_detector_run, load_mask_run
from pipelines.evaluation.inference import load_validation, predict_dataset, set_inference_limits
from pipelines.evaluation.report import markdown_table
from pipelines.io import atomic_path, write_json, write_text
from pipelines.progress import NULL_PROGRESS, Progress
from pipelines.stages.sweep import direction_name, mean, run_sweep, timing_text
from pipelines.visualize import add_legend, draw_predictions, grid

TRANSFER, AGNOSTIC = "transfer+MLP", "class-agnostic+MLP"  # the rows the ratio and the picture compare
PICTURE_IMAGES = 3  # images (rows) in predictions.png
PICTURE_POOL = 64  # at most this many of the first validation images are searched for them
PICTURE_CHUNK = 8  # images predicted at a time while searching
PICTURE_SCORE = 0.5  # detections drawn score at least this

# Stage 1 where the device makes it cheap (CUDA): the stronger detector, 1,500 iterations with the full
# RPN / box-head sampling (the quick start's stage 1 until 2026-12-02; on a 2-core CPU it took 628 s
# instead of 295 s, README "Ten minutes, and what it costs"). On a CPU the recipe's stage 1 is kept.
GPU_STAGE1_ITERATIONS = 1500
GPU_STAGE1 = ("detector.rpn_pre_nms_top_n_train=600", "detector.rpn_post_nms_top_n_train=300",
              "detector.rpn_batch_size_per_image=128", "detector.box_batch_size_per_image=64")


@dataclass
class QuickstartResult:
    out: Path
    report_md: Path
    report_json: Path
    picture: Path
    summary: dict
    seconds: float


def quickstart(spec: SweepSpec, out: str | Path, progress: Progress = NULL_PROGRESS,
               overrides: Sequence[str | Override] = ()) -> QuickstartResult:
    """Run the quick-start sweep ``spec`` (``overrides`` for every stage) into ``out``; write the report."""
    out = Path(out)
    t0 = time.perf_counter()
    spec, overrides, stage1 = stage1_by_device(spec, overrides)
    r = run_sweep(spec, out, progress=progress, overrides=overrides)
    summary = summarize(spec, r.records)
    if stage1:
        summary["stage1_by_device"] = stage1
    det = load_detector_run(r.detector)
    picture = out / "predictions.png"
    eval_cfg = load_config(EvalConfig, spec.recipe, stage_overrides(EvalConfig, parse_overrides(spec.overrides) + parse_overrides(overrides)))
    t1 = time.perf_counter()
    summary["picture"] = _picture(spec, r, det, eval_cfg, picture)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    summary["timings"] = {**r.timings, "report and picture": round(time.perf_counter() - t1, 1)}
    summary["config"] = to_dict(spec)
    summary["detector_config"] = det.config
    report_json, report_md = out / "report.json", out / "report.md"
    write_json(report_json, summary)
    write_text(report_md, render_report(summary, spec))
    return QuickstartResult(out, report_md, report_json, picture, summary, summary["seconds"])


def stage1_by_device(spec: SweepSpec, overrides: Sequence[str | Override] = ()) -> tuple[SweepSpec, list[Override], dict]:
    """The quick start's stage-1 settings for the device its stage 1 runs on (``solver.device``, ``auto``: CUDA if present).

    On CUDA: :data:`GPU_STAGE1_ITERATIONS` iterations and the :data:`GPU_STAGE1` sampling, each only
    where nothing explicit sets it (``--detector-iterations`` or a ``solver.iterations`` override for the
    count, a ``--set`` or spec override of the same key for the sampling); returns the spec, the
    overrides (the GPU settings first) and what was applied. Elsewhere: ``spec`` and ``overrides``
    unchanged and an empty dict.
    """
    given = parse_overrides(overrides)
    every = parse_overrides(spec.overrides, spec.path or "override") + given
    device = load_config(DetectTrainConfig, spec.recipe, stage_overrides(DetectTrainConfig, every)).solver.device
    if resolve_device(device).type != "cuda":
        return spec, given, {}
    keys = {o.key for o in every}
    gpu = [o for o in parse_overrides(GPU_STAGE1, "quickstart on a GPU") if o.key not in keys]
    iterations = spec.detector_iterations or (0 if "solver.iterations" in keys else GPU_STAGE1_ITERATIONS)
    applied = {"device": "cuda", "set": [o.text for o in gpu],
               "detector_iterations": iterations if iterations != spec.detector_iterations else None}
    return dataclasses.replace(spec, detector_iterations=iterations), gpu + given, applied


def stage1_text(applied: dict) -> str:
    """What :func:`stage1_by_device` applied, in words."""
    parts = ([f"{applied['detector_iterations']} iterations"] if applied["detector_iterations"] else []) + applied["set"]
    return ", ".join(parts) or "no setting left to choose"


def summarize(spec: SweepSpec, records: list[dict]) -> dict:
    """Per split: sets A and B, and per head its metrics per seed and their means over seeds."""
    summary: dict = {"splits": {}, "seeds": spec.seeds, "val_images": records[0]["val_images"] if records else 0}
    for direction in spec.all_directions():
        mine = [r for r in records if r["direction"] == direction]
        split = {"set_a": mine[0]["set_a"], "set_b": mine[0]["set_b"], "heads": {}}
        for row in spec.rows:
            seeds = {r["seed"]: r["metrics"] for r in mine if r["row"] == row.name}
            per_seed = [seeds[s] for s in spec.seeds]
            means = {iou: {s: {m: mean([p[iou][s][m] for p in per_seed]) for m in per_seed[0][iou][s]} for s in ("B", "A")}
                     for iou in ("segm", "bbox")}
            split["heads"][row.name] = {"mean": means, "per_seed": {str(k): seeds[k] for k in spec.seeds},
                                        "segm_B_AP_per_seed": [p["segm"]["B"]["AP"] for p in per_seed]}
        heads = split["heads"]
        t = heads[TRANSFER]["mean"]["segm"]["B"]["AP"] if TRANSFER in heads else None
        a = heads[AGNOSTIC]["mean"]["segm"]["B"]["AP"] if AGNOSTIC in heads else None
        split["transfer_over_agnostic_B"] = (t / a) if (t is not None and a) else None
        summary["splits"][direction] = split
    return summary


def summary_rows(summary: dict) -> dict[str, dict[str, float | None]]:
    """Rows = heads; columns = mask AP on B and A for every split (means over seeds)."""
    rows: dict[str, dict[str, float | None]] = {}
    for direction, s in summary["splits"].items():
        for name, h in s["heads"].items():
            rows.setdefault(name, {})
            rows[name][f"{direction_name(direction)} B"] = h["mean"]["segm"]["B"]["AP"]
            rows[name][f"{direction_name(direction)} A"] = h["mean"]["segm"]["A"]["AP"]
    return rows


def render_report(summary: dict, spec: SweepSpec) -> str:
    rows = summary_rows(summary)
    columns = list(next(iter(rows.values())).keys())
    w = spec.world
    lines = [
        "# maskx quickstart report",
        "",
        f"Synthetic world: {w.num_classes} classes, {w.train_images} train / {summary['val_images']} val images "
        f"(seed {w.seed}). One detector (stage 1, boxes of all classes); stage-2 seeds {spec.seeds}; "
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
    last = next(iter(summary["splits"].values()))["heads"]
    box_head = "oracle" if "oracle" in last else next(iter(last))
    gpu = summary.get("stage1_by_device")
    if gpu:
        lines += ["", f"Stage 1 on {gpu['device']}: the stronger detector ({stage1_text(gpu)}; explicit flags kept)."]
    lines += ["", "Box AP (mean over seeds; the same detector for every head):", ""]
    box_rows = {f"{direction_name(d)} {s_}": summary["splits"][d]["heads"][box_head]["mean"]["bbox"][s_]
                for d in summary["splits"] for s_ in ("B", "A")}
    lines += [markdown_table(box_rows), "", "![predictions](predictions.png)", "", *picture_caption(summary.get("picture")),
              f"Total time: {summary['seconds']:.0f} s ({timing_text(summary.get('timings', {}))}).", ""]
    return "\n".join(lines)


def shows_both(dets: list[dict], set_a: set[int]) -> bool:
    """Whether the COCO result rows ``dets`` hold both a set-A class and a set-B class."""
    ids = {d["category_id"] for d in dets}
    return bool(ids & set_a) and bool(ids - set_a)


def choose_images(dets: dict[int, list[dict]], image_ids: list[int], set_a: set[int], count: int) -> list[int]:
    """The ``count`` images of ``image_ids`` that show the method best, from their detections ``dets``
    (image id -> COCO result rows): those with both a set-A and a set-B class first (:func:`shows_both`),
    then more classes, then fewer detections (less clutter); ties keep ``image_ids``' order."""
    def key(i: int) -> tuple[bool, int, int]:
        mine = dets.get(i, [])
        return not shows_both(mine, set_a), -len({d["category_id"] for d in mine}), len(mine)

    return sorted(image_ids, key=key)[:count]


def picture_caption(picture: dict | None) -> list[str]:
    """The report's line under ``predictions.png`` (:func:`_picture`'s record), and a blank line."""
    if not picture:
        return []
    return [f"Left {AGNOSTIC}, right {TRANSFER}: the same {len(picture['images'])} validation images "
            f"({direction_name(picture['split'])}, stage-2 seed {picture['seed']}), detections scoring "
            f"{picture['score_thresh']} or more; set-A classes green, set-B red.", ""]


def _picture_detections(det, heads: dict, roi_size: int, dataset: CocoDataset, set_a: set[int], count: int,
                        batch_images: int) -> tuple[dict[str, dict[int, list[dict]]], list[int]]:
    """Each head's detections scoring :data:`PICTURE_SCORE` or more (head -> image id -> rows, highest
    score first) on the first validation images, :data:`PICTURE_CHUNK` images at a time until ``count``
    images show both sets (:func:`shows_both`) or ``dataset`` ends; and the ids of the images predicted."""
    by_head: dict[str, dict[int, list[dict]]] = {name: {} for name in heads}
    seen: list[int] = []
    device = resolve_device("auto")
    for start in range(0, len(dataset), PICTURE_CHUNK):
        part = range(start, min(start + PICTURE_CHUNK, len(dataset)))
        results = predict_dataset(det, heads, Subset(dataset, part), roi_size, device, batch_images=batch_images)
        seen += [dataset.images[i]["id"] for i in part]
        for name, rows in results.items():
            for d in sorted(rows, key=lambda d: -d["score"]):
                if d["score"] >= PICTURE_SCORE:
                    by_head[name].setdefault(d["image_id"], []).append(d)
        if sum(shows_both(v, set_a) for v in by_head[TRANSFER].values()) >= count:
            break
    return by_head, seen


def _picture(spec: SweepSpec, r, det, eval_cfg: EvalConfig, path: Path, count: int = PICTURE_IMAGES,
             batch_images: int = 4) -> dict:
    """Figure 3.2 style: the same images side by side, class-agnostic+MLP on the left, transfer+MLP on
    the right (the split ``voc`` if the sweep has it, else its first; the lowest stage-2 seed), a legend below.

    The ``count`` images that :func:`choose_images` picks among the first validation images (at most
    :data:`PICTURE_POOL`, :func:`_picture_detections`). Both heads share the detector, so the boxes
    are the same; the masks differ. Returns the split, seed and file names drawn (for report.json).
    """
    directions = spec.all_directions()
    direction, seed = ("voc" if "voc" in directions else directions[0]), min(spec.seeds)
    runs = {rec["row"]: rec["run"] for rec in r.records if rec["direction"] == direction and rec["seed"] == seed}
    loaded = {name: load_mask_run(runs[name], det) for name in (AGNOSTIC, TRANSFER)}
    gt, _ = load_validation(det, r.data["val_json"], r.data["val_images"])
    dataset = CocoDataset(gt, r.data["val_images"], max_images=min(PICTURE_POOL, len(gt["images"])))
    set_inference_limits(det.model, gt, eval_cfg)
    set_a = set(next(rec["set_a"] for rec in r.records if rec["direction"] == direction))
    by_head, seen = _picture_detections(det, {n: h for n, (h, _) in loaded.items()}, loaded[TRANSFER][1]["head"]["roi_size"],
                                        dataset, set_a, count, batch_images)
    names = {c["id"]: c["name"] for c in gt["categories"]}
    index = {im["id"]: i for i, im in enumerate(dataset.images)}
    chosen = choose_images(by_head[TRANSFER], seen, set_a, count)
    tiles, left_out = [], 0
    for image_id in chosen:
        img = (dataset[index[image_id]][0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        for head_name in (AGNOSTIC, TRANSFER):
            dets = by_head[head_name].get(image_id, [])
            boxes = np.array([[d["bbox"][0], d["bbox"][1], d["bbox"][0] + d["bbox"][2], d["bbox"][1] + d["bbox"][3]] for d in dets]).reshape(-1, 4)
            masks = np.stack([mask_utils.decode(d["segmentation"]) for d in dets]) if dets else None
            drawing = draw_predictions(img, boxes, [names[d["category_id"]] for d in dets], np.array([d["score"] for d in dets]),
                                       masks, [d["category_id"] in set_a for d in dets], scale=3, legend=False)
            tiles.append(drawing.image)
        left_out += drawing.left_out  # the same detections in both columns: counted once
    name = direction_name(direction).replace("→", " -> ")  # the bitmap font has no arrow
    sheet, _ = add_legend(grid(tiles, columns=2, column_titles=[f"{AGNOSTIC} ({name})", f"{TRANSFER} ({name})"]), left_out)
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return {"split": direction, "seed": seed, "score_thresh": PICTURE_SCORE, "searched": len(seen),
            "images": [dataset.images[index[i]]["file_name"] for i in chosen]}

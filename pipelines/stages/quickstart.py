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
from torch.utils.data import Subset

from pipelines.config import DetectTrainConfig, Override, load_config, parse_overrides, stage_overrides, to_dict
from pipelines.engine.device import resolve_device
from pipelines.engine.run_dir import load_mask_run
from pipelines.data.coco import CocoDataset
from pipelines.evaluation.inference import EvalData, HeadPredictions, inference_on_dataset
from pipelines.evaluation.report import mean, prediction_sheet, render_report
from pipelines.io import write_json, write_text
from pipelines.progress import NULL_PROGRESS, Progress
from pipelines.stages.sweep import SweepResult, run_sweep
from pipelines.stages.sweep_spec import SweepSpec

TRANSFER, AGNOSTIC = "transfer+MLP", "class-agnostic+MLP"  # the rows the ratio and the picture compare
PICTURE_IMAGES = 3  # images (rows) in predictions.png
PICTURE_POOL = 64  # at most this many of the first validation images are searched for them
PICTURE_CHUNK = 8  # images predicted at a time while searching (a multiple of the evaluation's 4 images a batch)
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
    r = run_sweep(spec, out, progress=progress, overrides=overrides, keep_images=PICTURE_POOL)
    summary = summarize(spec, r.records)
    if stage1:
        summary["stage1_by_device"] = stage1
    picture = out / "predictions.png"
    t1 = time.perf_counter()
    summary["picture"] = _picture(spec, r, picture)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    summary["timings"] = {**r.timings, "report and picture": round(time.perf_counter() - t1, 1)}
    summary["config"] = to_dict(spec)
    summary["detector_config"] = r.det.config
    report_json, report_md = out / "report.json", out / "report.md"
    write_json(report_json, summary)
    write_text(report_md, render_report(summary, spec.world, spec.seeds, (AGNOSTIC, TRANSFER)))
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


def _picture_detections(r: SweepResult, runs: dict[str, str], pool: CocoDataset, set_a: set[int],
                        count: int) -> tuple[dict[str, dict[int, list[dict]]], list[int]]:
    """Each head's detections scoring :data:`PICTURE_SCORE` or more (head -> image id -> rows, highest
    score first) on the images of ``pool``, :data:`PICTURE_CHUNK` images at a time until ``count``
    images show both sets (:func:`shows_both`) or ``pool`` ends; and the ids of the images looked at.

    The detections are the ones the sweep scored (``r.shown``); only when the sweep reused every result
    are they predicted here, in the evaluation's batches and so on the same detections.
    """
    names = {name: str(runs[name]) for name in (AGNOSTIC, TRANSFER)}
    scored = all(n in r.shown for n in names.values()) and len(r.val.dataset) >= len(pool)
    heads = None if scored else HeadPredictions.of_runs(r.det, {name: load_mask_run(runs[name], r.det) for name in names},
                                                        r.eval_cfg.gt_boxes)
    by_head: dict[str, dict[int, list[dict]]] = {name: {} for name in names}
    seen: list[int] = []
    for start in range(0, len(pool), PICTURE_CHUNK):
        part = range(start, min(start + PICTURE_CHUNK, len(pool)))
        ids = {pool.images[i]["id"] for i in part}
        if scored:
            results = {name: [d for d in r.shown[n] if d["image_id"] in ids] for name, n in names.items()}
        else:
            results = inference_on_dataset(heads, EvalData(r.val.gt, Subset(pool, part)), {}, r.eval_cfg).predictions
        seen += [pool.images[i]["id"] for i in part]
        for name, rows in results.items():
            for d in sorted(rows, key=lambda d: -d["score"]):
                if d["score"] >= PICTURE_SCORE:
                    by_head[name].setdefault(d["image_id"], []).append(d)
        if sum(shows_both(v, set_a) for v in by_head[TRANSFER].values()) >= count:
            break
    return by_head, seen


def _picture(spec: SweepSpec, r: SweepResult, path: Path, count: int = PICTURE_IMAGES) -> dict:
    """Figure 3.2 style: the same images side by side, class-agnostic+MLP on the left, transfer+MLP on
    the right (the split ``voc`` if the sweep has it, else its first; the lowest stage-2 seed), a legend below.

    The ``count`` images that :func:`choose_images` picks among the first validation images (at most
    :data:`PICTURE_POOL`, :func:`_picture_detections`). Both heads share the detector, so the boxes
    are the same; the masks differ. Returns the split, seed and file names drawn (for report.json).
    """
    directions = spec.all_directions()
    direction, seed = ("voc" if "voc" in directions else directions[0]), min(spec.seeds)
    runs = {rec["row"]: rec["run"] for rec in r.records if rec["direction"] == direction and rec["seed"] == seed}
    set_a = set(next(rec["set_a"] for rec in r.records if rec["direction"] == direction))
    gt = r.val.gt
    pool = CocoDataset(gt, r.val.dataset.image_root, max_images=min(PICTURE_POOL, len(gt["images"])))
    by_head, seen = _picture_detections(r, runs, pool, set_a, count)
    index = {im["id"]: i for i, im in enumerate(pool.images)}
    chosen = choose_images(by_head[TRANSFER], seen, set_a, count)
    images = [(pool[index[i]][0].permute(1, 2, 0).numpy() * 255).astype(np.uint8) for i in chosen]
    prediction_sheet(images, chosen, {name: by_head[name] for name in (AGNOSTIC, TRANSFER)},
                     {c["id"]: c["name"] for c in gt["categories"]}, set_a, direction, path)
    return {"split": direction, "seed": seed, "score_thresh": PICTURE_SCORE, "searched": len(seen),
            "images": [pool.images[index[i]]["file_name"] for i in chosen]}

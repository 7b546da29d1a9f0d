"""``maskx sweep``: run a grid of mask-side variants on one detector and lay the results out like the paper.

A sweep spec (:class:`pipelines.stages.sweep_spec.SweepSpec`, YAML; shipped ones in ``pipelines/configs/sweeps/``,
``quickstart`` among them) names a base recipe, the split directions (set A of each: ``voc`` is
voc -> non-voc, ``nonvoc`` is non-voc -> voc, ``random:N:SEED`` a random split), stage-2 seeds, and
rows (methods)::

    title: "Table 3.3: impact of the MLP mask branch"
    recipe: synthetic                  # stage recipes (pipelines/configs/<recipe>.yaml)
    world: {train_images: 2000, val_images: 300, seed: 0}   # the synthetic world, made in OUT/world
    detector: ""                       # or a finished detect-train run to reuse (its data is used)
    directions: [voc, nonvoc]          # or random_splits: {sizes: [20, 30], trials: 5}
    seeds: [0]
    detector_iterations: 0             # stage-1 iterations (0: the recipe's)
    mask_iterations: 0                 # iterations of every stage-wise mask run (0: the recipe's)
    overrides: []                      # section.key=value for every stage
    stage2: []                         # section.key=value for every mask-side run (mask-train and train)
    e2e: {init: stage1, iterations: 0} # end-to-end rows: start from the sweep's detector or from scratch
    rows:
      - {name: class-agnostic, set: [head.head=agnostic, head.mlp=false]}
      - {name: transfer+MLP, set: [head.head=transfer, head.mlp=true]}
      - {name: transfer e2e, train: e2e, set: [head.stop_gradient=true]}
      - {name: Faster R-CNN tested w/ GrabCut, train: grabcut-test}
      - {name: Mask R-CNN trained w/ GrabCut, masks: grabcut, set: [head.head=oracle]}
    figure: {numerator: transfer+MLP, denominator: class-agnostic+MLP}   # Figure 3.1 plot (optional)

Each row's kind (``train:``) and training masks (``masks:``) are classes of
:mod:`pipelines.stages.sweep_rows`, which know how the row's runs are configured and trained and
what predicts for them; this module plans, runs and reports, whatever the kind. Stage 1 is trained
once (or taken from ``detector``) and serves every stage-wise row; end-to-end rows train their own
detector+mask model per direction; a stage-wise run of a head that trains on every class's masks
(the oracle) does not depend on the split and serves every direction. Each (row, direction, seed) writes
``OUT/results/<row>__<direction>__s<seed>.json``; a rerun skips every run whose JSON exists (and
every training whose checkpoint exists), so an interrupted sweep is resumed by running it again. A
finished run is reused only if it was made with the same resolved config (else: one clear error).
Stage-wise heads are evaluated together: the detector runs once per validation image for all of
them; every row is scored through :func:`pipelines.evaluation.inference.inference_on_dataset`. The table (``table.md``) has one row per method and, per direction, the mask AP on set B and
on set A, means over seeds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from pipelines.config import (DetectTrainConfig, EvalConfig, Override, check_stage_overrides, load_config, parse_overrides,
                              stage_overrides)
from pipelines.data.coco import load_coco
from pipelines.data.splits import resolve_split
from pipelines.data.synthetic import generate
from pipelines.engine.run_dir import DETECTOR_CKPT, DetectorRun, check_same_settings, load_detector_run
from pipelines.errors import MaskxError
from pipelines.evaluation.inference import EvalData, inference_on_dataset, load_validation
from pipelines.evaluation.report import direction_name, mean, plot_relative_change, render_table
from pipelines.io import read_json, write_json, write_text
from pipelines.modeling.embeddings import read_embeddings
from pipelines.modeling.mask_heads import uses_transfer
from pipelines.progress import NULL_PROGRESS, Progress
from pipelines.stages.detect_train import detect_train
from pipelines.stages.export_embeddings import export_embeddings
from pipelines.stages.sweep_rows import Job, SweepContext, row_kind, train_or_reuse, training_masks
from pipelines.stages.sweep_spec import SweepSpec

GLOVE_SKIPPED = "skipped: input glove needs a GloVe file (head.glove)"


@dataclass
class SweepResult:
    out: Path
    table_md: Path
    summary_json: Path
    figure: Path | None
    ran: int
    skipped: int
    seconds: float
    rows: dict[str, dict[str, float | None]]
    records: list[dict]  # every job's result JSON, in plan order (row, direction, seed)
    detector: Path  # the stage-1 checkpoint
    data: dict  # train_json, train_images, val_json, val_images
    timings: dict[str, float] = field(default_factory=dict)  # seconds of this call per part (:data:`TIMED`)
    det: DetectorRun | None = None  # stage 1, loaded
    val: EvalData | None = None  # the validation data every row was scored on
    eval_cfg: EvalConfig | None = None  # the settings they were scored with
    shown: dict[str, list[dict]] = field(default_factory=dict)  # predictions (name -> COCO results) kept for a picture


# The parts of a sweep's wall time (``SweepResult.timings``, ``summary.json`` "timings"): what this
# call did, so a part reused from an earlier call counts 0. "stage 2 setup" is each mask-side run's
# time outside its training steps: building the feature cache (the first run) or opening it, and
# making GrabCut training masks for rows that train on them.
TIMED = ("world", "stage 1", "embeddings, validation data", "stage 2 setup (feature cache)", "stage 2 training",
         "evaluation")


def run_sweep(spec: SweepSpec, out: str | Path, detector: str | Path | None = None, stage2: Sequence[str | Override] = (),
              glove: str | None = None, progress: Progress = NULL_PROGRESS, overrides: Sequence[str | Override] = (),
              keep_images: int = 0) -> SweepResult:
    """Run (or resume) the sweep into ``out``; write per-run JSONs, ``table.md``, ``summary.json``.

    ``detector`` replaces the spec's; ``stage2`` (every mask-side run) and ``overrides`` (every
    stage) add to the spec's ``stage2`` and ``overrides`` (strings are parsed with source
    ``override``; pass :class:`Override` s to name them otherwise); ``glove`` is the GloVe file of
    rows with ``head.input=glove`` that name none. ``keep_images``: the predictions made in this call
    on the first so many validation images are kept in the result (``shown``), for a picture.
    """
    out = Path(out)
    t0 = time.perf_counter()
    where = spec.path or "override"
    every = parse_overrides(spec.overrides, where) + parse_overrides(overrides)
    check_stage_overrides(every)
    ctx = _prepare(spec, out, detector, every, progress)
    jobs = _plan(ctx, parse_overrides(spec.stage2, where) + parse_overrides(stage2), glove)
    todo = [j for j in jobs if not j.result.is_file()]
    task = progress.task(f"sweep {Path(spec.path).stem or ''}".strip(), len(todo))
    shown = _run(ctx, todo, task, keep_images)
    task.close()
    records = [read_json(j.result, "sweep result") for j in jobs]
    r = _write_outputs(ctx, [j.result for j in jobs], records, len(todo), len(jobs) - len(todo), t0)
    r.shown = shown
    return r


def _prepare(spec: SweepSpec, out: Path, detector: str | Path | None, every: list[Override], progress: Progress) -> SweepContext:
    """Stage 1 (the world and its detector, or a given detector run), embeddings, validation data, eval config."""
    timings = dict.fromkeys(TIMED, 0.0)
    ctx = SweepContext(spec, out, every, None, {}, out / "embeddings.h5", None, None, progress, timings)
    if detector or spec.detector:
        det = load_detector_run(detector or spec.detector)
        data = det.data_paths()
        if not data.get("train_json") or not data.get("val_json"):
            raise MaskxError("the detector run's config names no train/val data", det.run_dir)
    else:
        with ctx.timed("world"):
            world = generate(spec.world, out / "world", progress)
        data = {"train_json": str(world.train_json), "train_images": str(world.train_dir),
                "val_json": str(world.val_json), "val_images": str(world.val_dir)}
        det_dir = out / "detector"
        layers = [{"data": data}, *stage_overrides(DetectTrainConfig, every)]
        if spec.detector_iterations:
            layers.append({"solver": {"iterations": spec.detector_iterations}})
        cfg = load_config(DetectTrainConfig, spec.recipe, layers)
        with ctx.timed("stage 1"):
            train_or_reuse(det_dir, DETECTOR_CKPT, cfg, lambda resume: detect_train(cfg, det_dir, progress, resume, spec.recipe))
        det = load_detector_run(det_dir)
    ctx.det, ctx.data = det, data
    with ctx.timed("embeddings, validation data"):
        if not ctx.embeddings.is_file() or read_embeddings(ctx.embeddings).detector_sha256 != det.sha256:
            export_embeddings(det.checkpoint, ctx.embeddings)
        ctx.val = load_validation(det, data["val_json"], data.get("val_images"), spec.max_val_images)
    ctx.eval_cfg = load_config(EvalConfig, spec.recipe, stage_overrides(EvalConfig, every))
    return ctx


def _run_config(ctx: SweepContext, job: Job, row_set: list[Override], stage2: list[Override], glove: str | None):
    """The resolved config of one job's run (the layers' order: :class:`~pipelines.stages.sweep_rows.RowKind`)."""
    cls, kind = job.kind.config_cls, job.kind
    layers: list[Any] = [{"data": ctx.data}, *kind.base_layers(ctx)]
    if glove:
        layers.append({"head": {"glove": str(glove)}})
    layers += stage_overrides(cls, ctx.every) + stage_overrides(cls, stage2) + kind.schedule_layers(ctx)
    layers += stage_overrides(cls, row_set)
    layers.append({"data": {"mask_classes": job.direction}, "solver": {"seed": job.seed}})
    layers += job.masks.layers(ctx, job.direction) + kind.final_layers(ctx)
    return load_config(cls, ctx.spec.recipe, layers)


def _plan(ctx: SweepContext, stage2: list[Override], glove: str | None) -> list[Job]:
    """Every (row, direction, seed) job with its run folder and resolved config; finished runs checked."""
    spec, jobs = ctx.spec, []
    first = spec.all_directions()[0]
    for row in spec.rows:
        kind, masks = row_kind(row, spec.path or None), training_masks(row, spec.path or None)
        row_set = parse_overrides(row.set, f"{spec.path or 'sweep'}: row '{row.name}'")
        for direction in spec.all_directions():
            for seed in spec.seeds:
                job = Job(row, kind, masks, direction, seed, ctx.out / "results" / f"{row.slug}__{direction.replace(':', '-')}__s{seed}.json")
                jobs.append(job)
                if kind.config_cls is None:
                    continue
                job.config = cfg = _run_config(ctx, job, row_set, stage2, glove)
                shared = kind.shares_run(cfg, masks)
                if shared:  # one run, trained for the first direction, serves every direction
                    cfg.data.mask_classes = first
                job.run = ctx.out / "runs" / f"{row.slug}__{'all' if shared else direction.replace(':', '-')}__s{seed}"
                job.note = GLOVE_SKIPPED if (uses_transfer(cfg.head.head) and cfg.head.input == "glove" and not cfg.head.glove) else ""
                if not job.note and (job.run / kind.checkpoint).is_file():
                    check_same_settings(job.run, cfg)
    return jobs


def _record(ctx: SweepContext, job: Job, metrics: dict, seconds: float, task, note: str = "") -> None:
    sets = ctx.sets_of(job.direction)
    write_json(job.result, {
        "row": job.row.name, "direction": job.direction, "seed": job.seed, "train": job.kind.name, "masks": job.masks.name,
        "set": job.row.set, "run": str(job.run) if job.run else None, "detector": str(ctx.det.checkpoint),
        "set_a": sets["A"], "set_b": sets["B"], "metrics": metrics, "seconds": round(seconds, 1),
        "val_images": len(ctx.val.dataset), "note": note,
    })
    task.advance(1)


def _run(ctx: SweepContext, todo: list[Job], task, keep_images: int) -> dict[str, list[dict]]:
    """Train every job's run (or reuse it), then score the jobs, one prediction pass per evaluation key
    of their kinds; returns the predictions on the first ``keep_images`` validation images."""
    groups: dict[str, list[Job]] = {}
    for job in todo:
        if job.note:
            _record(ctx, job, {}, 0.0, task, job.note)
            continue
        if job.run is not None:
            with ctx.timed("stage 2 setup (feature cache)"):
                job.masks.prepare(ctx, job.direction)
            job.kind.train(ctx, job)
        groups.setdefault(job.kind.evaluation_key(job), []).append(job)
    shown_ids = {im["id"] for im in ctx.val.dataset.images[:keep_images]}
    shown: dict[str, list[dict]] = {}
    for jobs in groups.values():
        t1 = time.perf_counter()
        with ctx.timed("evaluation"):
            producer, names = jobs[0].kind.producer(ctx, jobs)
            inference = inference_on_dataset(producer, ctx.val, {str(j.result): (names[j.result], ctx.sets_of(j.direction))
                                                                 for j in jobs}, ctx.eval_cfg, ctx.progress)
        per = (time.perf_counter() - t1) / len(jobs)
        for j in jobs:
            _record(ctx, j, inference.metrics[str(j.result)], per, task)
        shown.update({name: [r for r in results if r["image_id"] in shown_ids] for name, results in inference.predictions.items()})
    return shown


def _write_outputs(ctx: SweepContext, paths: list[Path], records: list[dict], ran: int, skipped: int, t0: float) -> SweepResult:
    """``table.md``, ``summary.json`` and (with a figure spec) ``figure.png`` from every job's record."""
    spec, out = ctx.spec, ctx.out
    rows = table_rows(spec, records)
    summary = {"title": spec.title, "spec": spec.path, "directions": spec.all_directions(), "seeds": spec.seeds,
               "detector": str(ctx.det.checkpoint), "val_images": len(ctx.val.dataset), "rows": rows,
               "results": [str(p) for p in paths]}
    figure_path = None
    if spec.figure.numerator:
        points = figure_points(spec, records, load_coco(ctx.data["train_json"])[0])
        summary["figure_points"] = points
        figure_path = out / "figure.png"
        plot_relative_change(points, figure_path, spec.title)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    summary["timings"] = {part: round(sec, 1) for part, sec in ctx.timings.items()}
    table_md, summary_json = out / "table.md", out / "summary.json"
    write_text(table_md, render_table(spec.title, spec.all_directions(), spec.seeds, rows, records, len(ctx.val.dataset)))
    write_json(summary_json, summary)
    return SweepResult(out, table_md, summary_json, figure_path, ran, skipped, summary["seconds"], rows, records,
                       ctx.det.checkpoint, ctx.data, summary["timings"], ctx.det, ctx.val, ctx.eval_cfg)


def table_rows(spec: SweepSpec, results: list[dict], metric: str = "AP") -> dict[str, dict[str, float | None]]:
    """Rows = methods; columns ``"<direction> B"``, ``"<direction> A"``: mask ``metric``, mean over seeds."""
    rows: dict[str, dict[str, float | None]] = {}
    for row in spec.rows:
        rows[row.name] = {}
        for d in spec.all_directions():
            for s in ("B", "A"):
                vals = [r["metrics"].get("segm", {}).get(s, {}).get(metric) for r in results
                        if r["row"] == row.name and r["direction"] == d and r["metrics"]]
                rows[row.name][f"{direction_name(d)} {s}"] = mean(vals)
    return rows


def figure_points(spec: SweepSpec, results: list[dict], train: dict) -> list[dict]:
    """Figure 3.1 points, one per direction: average mask annotations per class in A (x) and the relative
    change in set-B mask AP of ``figure.numerator`` over ``figure.denominator`` (y, mean over seeds)."""
    num, den = spec.figure.numerator, spec.figure.denominator
    counts: dict[int, int] = {}
    for a in train["annotations"]:
        if not a.get("iscrowd", 0):
            counts[a["category_id"]] = counts.get(a["category_id"], 0) + 1
    points = []
    for d in spec.all_directions():
        def b_ap(row: str) -> float | None:
            return mean([r["metrics"]["segm"]["B"]["AP"] for r in results if r["row"] == row and r["direction"] == d and r["metrics"]])
        t, a = b_ap(num), b_ap(den)
        set_a = resolve_split(d, train["categories"])
        points.append({"direction": d, "size_a": len(set_a), "masks_per_class_a": sum(counts.get(c, 0) for c in set_a) / len(set_a),
                       "ap_b_numerator": t, "ap_b_denominator": a,
                       "relative_change": (t / a - 1.0) if (t is not None and a) else None})
    return points

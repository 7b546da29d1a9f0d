"""``maskx sweep``: run a grid of mask-side variants on one detector and lay the results out like the paper.

A sweep spec (:class:`pipelines.config.SweepSpec`, YAML; shipped ones in ``pipelines/configs/sweeps/``,
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

Stage 1 is trained once (or taken from ``detector``) and serves every stage-wise row; end-to-end
rows train their own detector+mask model per direction; a stage-wise oracle run (masks of every
class) does not depend on the split and serves every direction. Each (row, direction, seed) writes
``OUT/results/<row>__<direction>__s<seed>.json``; a rerun skips every run whose JSON exists (and
every training whose checkpoint exists), so an interrupted sweep is resumed by running it again. A
finished run is reused only if it was made with the same resolved config (else: one clear error).
Stage-wise heads are evaluated together: the detector runs once per validation image for all of
them. The table (``table.md``) has one row per method and, per direction, the mask AP on set B and
on set A, means over seeds.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from pipelines.config import (DetectTrainConfig, EvalConfig, MaskTrainConfig, Override, SweepRow, SweepSpec, TrainE2EConfig,
                              check_stage_overrides, load_config, parse_overrides, stage_overrides)
from pipelines.data.coco import CocoDataset, load_coco
from pipelines.data.grabcut import grabcut_annotations
from pipelines.data.splits import complement, resolve_split
from pipelines.data.synthetic import generate
from pipelines.engine.device import resolve_device
from pipelines.engine.run_dir import (DETECTOR_CKPT, LAST, MASK_CKPT, DetectorRun, check_same_settings, load_detector_run,
                                      load_mask_run)
from pipelines.errors import MaskxError
from pipelines.evaluation.inference import grabcut_predictions, load_validation, predict_dataset, set_inference_limits
from pipelines.evaluation.report import format_value
from pipelines.evaluation.scoring import score_jobs
from pipelines.io import atomic_path, read_json, write_json, write_text
from pipelines.modeling.embeddings import read_embeddings
from pipelines.modeling.mask_heads import uses_transfer
from pipelines.progress import NULL_PROGRESS, Progress
from pipelines.stages.detect_train import detect_train
from pipelines.stages.export_embeddings import export_embeddings
from pipelines.stages.mask_train import mask_train
from pipelines.stages.train_e2e import train_e2e

DATA_KEYS = ("train_json", "train_images", "val_json", "val_images")
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


@dataclass
class _Job:
    row: SweepRow
    direction: str  # set A spec
    seed: int
    result: Path
    run: Path | None  # the run folder (None for grabcut-test)
    config: Any = None  # its resolved MaskTrainConfig / TrainE2EConfig
    note: str = ""  # why it is skipped


@dataclass
class _Context:
    """What every job of a sweep shares: the spec, stage 1, embeddings, validation data, eval config."""

    spec: SweepSpec
    out: Path
    every: list[Override]  # overrides of every stage
    det: DetectorRun
    data: dict
    embeddings: Path
    gt: dict
    dataset: CocoDataset
    eval_cfg: EvalConfig
    progress: Progress
    timings: dict[str, float]  # seconds per part of :data:`TIMED`, added to while the sweep runs

    def sets_of(self, direction: str) -> dict[str, list[int]]:
        """``{"B": the other classes, "A": the direction's}`` (a direction names set A)."""
        cats = self.gt["categories"]
        set_a = resolve_split(direction, cats)
        return {"B": complement(set_a, cats), "A": set_a}


def direction_name(spec: str) -> str:
    return {"voc": "voc→nonvoc", "nonvoc": "nonvoc→voc"}.get(spec, spec)


def mean(values: Sequence[float | None]) -> float | None:
    """Mean of the defined values (None if none is)."""
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


# The parts of a sweep's wall time (``SweepResult.timings``, ``summary.json`` "timings"): what this
# call did, so a part reused from an earlier call counts 0. "stage 2 setup" is each mask-side run's
# time outside its training steps: building the feature cache (the first run) or opening it, and
# making GrabCut training masks for rows that train on them.
TIMED = ("world", "stage 1", "embeddings, validation data", "stage 2 setup (feature cache)", "stage 2 training",
         "evaluation")


def timing_text(timings: dict[str, float]) -> str:
    """``"stage 1 600 s, stage 2 training 100 s, ..."``: the parts that took a second or more, in order."""
    parts = [f"{part} {sec:.0f} s" for part, sec in timings.items() if sec >= 1]
    return ", ".join(parts) if parts else "every part reused"


def _train_or_reuse(run: Path, checkpoint: str, cfg: Any, train: Callable[[bool], Any]) -> Any:
    """Train into ``run`` (resuming a ``last.pth``) unless it holds a finished run of the same config;
    returns what ``train`` returned (None if reused)."""
    if (run / checkpoint).is_file():
        check_same_settings(run, cfg)
        return None
    return train((run / LAST).is_file())


@contextlib.contextmanager
def _timed(timings: dict[str, float], part: str) -> Iterator[None]:
    """Add the seconds of the ``with`` block to ``timings[part]``."""
    t = time.perf_counter()
    try:
        yield
    finally:
        timings[part] += time.perf_counter() - t


def run_sweep(spec: SweepSpec, out: str | Path, detector: str | Path | None = None, stage2: Sequence[str | Override] = (),
              glove: str | None = None, progress: Progress = NULL_PROGRESS, overrides: Sequence[str | Override] = ()) -> SweepResult:
    """Run (or resume) the sweep into ``out``; write per-run JSONs, ``table.md``, ``summary.json``.

    ``detector`` replaces the spec's; ``stage2`` and ``overrides`` add to the spec's ``stage2`` and
    ``overrides`` (strings are parsed with source ``override``; pass :class:`Override` s to name them
    otherwise); ``glove`` is the GloVe file of rows with ``head.input=glove`` that name none.
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
    _run(ctx, todo, task)
    task.close()
    records = [read_json(j.result, "sweep result") for j in jobs]
    return _write_outputs(ctx, [j.result for j in jobs], records, len(todo), len(jobs) - len(todo), t0)


def _prepare(spec: SweepSpec, out: Path, detector: str | Path | None, every: list[Override], progress: Progress) -> _Context:
    """Stage 1 (the world and its detector, or a given detector run), embeddings, validation data, eval config."""
    timings = dict.fromkeys(TIMED, 0.0)
    if detector or spec.detector:
        det = load_detector_run(detector or spec.detector)
        data = {k: v for k, v in (det.config.get("data") or {}).items() if k in DATA_KEYS and v}
        if not data.get("train_json") or not data.get("val_json"):
            raise MaskxError("the detector run's config names no train/val data", det.run_dir)
    else:
        with _timed(timings, "world"):
            world = generate(spec.world, out / "world", progress)
        data = {"train_json": str(world.train_json), "train_images": str(world.train_dir),
                "val_json": str(world.val_json), "val_images": str(world.val_dir)}
        det_dir = out / "detector"
        layers = [{"data": data}, *stage_overrides(DetectTrainConfig, every)]
        if spec.detector_iterations:
            layers.append({"solver": {"iterations": spec.detector_iterations}})
        cfg = load_config(DetectTrainConfig, spec.recipe, layers)
        with _timed(timings, "stage 1"):
            _train_or_reuse(det_dir, DETECTOR_CKPT, cfg, lambda resume: detect_train(cfg, det_dir, progress, resume, spec.recipe))
        det = load_detector_run(det_dir)
    with _timed(timings, "embeddings, validation data"):
        embeddings = out / "embeddings.h5"
        if not embeddings.is_file() or read_embeddings(embeddings).detector_sha256 != det.sha256:
            export_embeddings(det.checkpoint, embeddings)
        gt, dataset = load_validation(det, data["val_json"], data.get("val_images"), spec.max_val_images)
    eval_cfg = load_config(EvalConfig, spec.recipe, stage_overrides(EvalConfig, every))
    return _Context(spec, out, every, det, data, embeddings, gt, dataset, eval_cfg, progress, timings)


def _grabcut_path(out: Path, direction: str) -> Path:
    return out / "grabcut" / f"train_grabcut_{direction.replace(':', '-')}.json"


def _run_config(ctx: _Context, row: SweepRow, row_set: list[Override], direction: str, seed: int,
                stage2: list[Override], glove: str | None):
    """The resolved config of one row's run: recipe < data < cache of every class (stage-wise) < glove < overrides < stage2 < row < split, seed."""
    spec = ctx.spec
    cls = TrainE2EConfig if row.train == "e2e" else MaskTrainConfig
    layers: list[Any] = [{"data": ctx.data}]
    if row.train == "stagewise":  # one cache of every class serves every row, split and seed (unless the sweep says otherwise)
        layers.append({"cache": {"classes": "all"}})
    if glove:
        layers.append({"head": {"glove": str(glove)}})
    layers += stage_overrides(cls, ctx.every) + stage_overrides(cls, stage2)
    if spec.mask_iterations and row.train == "stagewise":
        layers.append({"solver": {"iterations": spec.mask_iterations}})
    layers += stage_overrides(cls, row_set)
    layers.append({"data": {"mask_classes": direction}, "solver": {"seed": seed}})
    if row.masks == "grabcut":
        layers.append({"data": {"train_json": str(_grabcut_path(ctx.out, direction))}, "head": {"head": "oracle"}})
    if row.train == "e2e":
        if spec.e2e.iterations:
            layers.append({"solver": {"iterations": spec.e2e.iterations}})
        if spec.e2e.init == "stage1":
            layers.append({"init_detector": str(ctx.det.checkpoint)})
    return load_config(cls, spec.recipe, layers)


def _plan(ctx: _Context, stage2: list[Override], glove: str | None) -> list[_Job]:
    """Every (row, direction, seed) job with its run folder and resolved config; finished runs checked."""
    spec, jobs = ctx.spec, []
    first = spec.all_directions()[0]
    for row in spec.rows:
        row_set = parse_overrides(row.set, f"{spec.path or 'sweep'}: row '{row.name}'")
        for direction in spec.all_directions():
            for seed in spec.seeds:
                result = ctx.out / "results" / f"{row.slug}__{direction.replace(':', '-')}__s{seed}.json"
                if row.train == "grabcut-test":
                    jobs.append(_Job(row, direction, seed, result, None))
                    continue
                cfg = _run_config(ctx, row, row_set, direction, seed, stage2, glove)
                shared = row.train == "stagewise" and row.masks == "gt" and cfg.head.head == "oracle"
                if shared:  # the oracle trains on every class's masks: one run serves every direction
                    cfg.data.mask_classes = first
                run = ctx.out / "runs" / f"{row.slug}__{'all' if shared else direction.replace(':', '-')}__s{seed}"
                note = GLOVE_SKIPPED if (uses_transfer(cfg.head.head) and cfg.head.input == "glove" and not cfg.head.glove) else ""
                if not note and (run / MASK_CKPT).is_file():
                    check_same_settings(run, cfg)
                jobs.append(_Job(row, direction, seed, result, run, cfg, note))
    return jobs


def _record(ctx: _Context, job: _Job, metrics: dict, kind: str, seconds: float, task, note: str = "") -> None:
    sets = ctx.sets_of(job.direction)
    write_json(job.result, {
        "row": job.row.name, "direction": job.direction, "seed": job.seed, "train": kind, "masks": job.row.masks,
        "set": job.row.set, "run": str(job.run) if job.run else None, "detector": str(ctx.det.checkpoint),
        "set_a": sets["A"], "set_b": sets["B"], "metrics": metrics, "seconds": round(seconds, 1),
        "val_images": len(ctx.dataset), "note": note,
    })
    task.advance(1)


def _run(ctx: _Context, todo: list[_Job], task) -> None:
    """Train every job's run (or reuse it), then score: stage-wise heads in one pass, e2e runs each on its
    own detector, GrabCut at test time in one pass over the stage-1 detections."""
    stagewise: dict[Path, list[_Job]] = {}
    timings = ctx.timings
    for job in todo:
        if job.note:
            _record(ctx, job, {}, job.row.train, 0.0, task, job.note)
        elif job.row.train == "stagewise":
            if job.row.masks == "grabcut":
                with _timed(timings, "stage 2 setup (feature cache)"):
                    _grabcut_file(ctx, job.direction)
            t1 = time.perf_counter()
            r = _train_or_reuse(job.run, MASK_CKPT, job.config, lambda resume, j=job: mask_train(
                j.config, ctx.det.run_dir, ctx.embeddings, j.run, ctx.progress, resume))
            if r is not None:
                train_seconds = r.stats.seconds
                timings["stage 2 training"] += train_seconds
                timings["stage 2 setup (feature cache)"] += time.perf_counter() - t1 - train_seconds
            stagewise.setdefault(job.run, []).append(job)
        elif job.row.train == "e2e":
            with _timed(timings, "stage 2 training"):
                _train_or_reuse(job.run, MASK_CKPT, job.config,
                                lambda resume, j=job: train_e2e(j.config, j.run, ctx.progress, resume))
            t1 = time.perf_counter()
            e2e_det = load_detector_run(job.run)
            with _timed(timings, "evaluation"):
                metrics = _score_heads(ctx, e2e_det, {job.run: [job]})
            _record(ctx, job, metrics[str(job.result)], "e2e", time.perf_counter() - t1, task)
    if stagewise:
        t1 = time.perf_counter()
        with _timed(timings, "evaluation"):
            metrics = _score_heads(ctx, ctx.det, stagewise)
        per = (time.perf_counter() - t1) / sum(len(js) for js in stagewise.values())
        for js in stagewise.values():
            for j in js:
                _record(ctx, j, metrics[str(j.result)], "stagewise", per, task)
    gc_jobs = [j for j in todo if j.row.train == "grabcut-test"]
    if gc_jobs:
        t1 = time.perf_counter()
        with _timed(timings, "evaluation"):
            set_inference_limits(ctx.det.model, ctx.gt, ctx.eval_cfg)
            results = {"grabcut": grabcut_predictions(ctx.det, ctx.dataset, resolve_device("auto"), progress=ctx.progress)}
            metrics = score_jobs(ctx.gt, results, {str(j.result): ("grabcut", ctx.sets_of(j.direction)) for j in gc_jobs},
                                 ctx.eval_cfg, [im["id"] for im in ctx.dataset.images])
        per = (time.perf_counter() - t1) / len(gc_jobs)
        for j in gc_jobs:
            _record(ctx, j, metrics[str(j.result)], "grabcut-test", per, task)


def _score_heads(ctx: _Context, det: DetectorRun, runs: dict[Path, list[_Job]]) -> dict[str, dict]:
    """One prediction pass of every run's mask head on ``det``'s detections, then metrics per job (result path)."""
    heads, sizes = {}, set()
    for run in runs:
        heads[str(run)], ckpt = load_mask_run(run, det)
        sizes.add(ckpt["head"]["roi_size"])
    if len(sizes) > 1:
        raise MaskxError(f"the sweep's mask runs use different RoI sizes ({sorted(sizes)}); sweep them separately", ctx.spec.path or None)
    set_inference_limits(det.model, ctx.gt, ctx.eval_cfg)
    results = predict_dataset(det, heads, ctx.dataset, sizes.pop(), resolve_device("auto"), ctx.progress,
                              gt_boxes=ctx.eval_cfg.gt_boxes)
    jobs = {str(j.result): (str(run), ctx.sets_of(j.direction)) for run, js in runs.items() for j in js}
    return score_jobs(ctx.gt, results, jobs, ctx.eval_cfg, [im["id"] for im in ctx.dataset.images], ctx.progress)


def _grabcut_file(ctx: _Context, direction: str) -> Path:
    """The training file with set-B masks (B = the complement of ``direction``) replaced by GrabCut's."""
    path = _grabcut_path(ctx.out, direction)
    if not path.is_file():
        cats = ctx.gt["categories"]
        set_b = complement(resolve_split(direction, cats), cats)
        grabcut_annotations(ctx.data["train_json"], ctx.data["train_images"], "ids:" + ",".join(map(str, set_b)), path,
                            progress=ctx.progress)
    return path


def _write_outputs(ctx: _Context, paths: list[Path], records: list[dict], ran: int, skipped: int, t0: float) -> SweepResult:
    """``table.md``, ``summary.json`` and (with a figure spec) ``figure.png`` from every job's record."""
    spec, out = ctx.spec, ctx.out
    rows = table_rows(spec, records)
    summary = {"title": spec.title, "spec": spec.path, "directions": spec.all_directions(), "seeds": spec.seeds,
               "detector": str(ctx.det.checkpoint), "val_images": len(ctx.dataset), "rows": rows,
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
    write_text(table_md, render_table(spec, rows, records, len(ctx.dataset)))
    write_json(summary_json, summary)
    return SweepResult(out, table_md, summary_json, figure_path, ran, skipped, summary["seconds"], rows, records,
                       ctx.det.checkpoint, ctx.data, summary["timings"])


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


WIDE = 2  # more directions than this: one table row per direction (random-split sweeps have 25)


def display_rows(spec: SweepSpec, rows: dict[str, dict[str, float | None]]) -> tuple[str, list[str], dict[str, dict[str, float | None]]]:
    """The rows to show: the paper's layout (one row per method, columns ``"<direction> B|A"``) for up
    to ``WIDE`` directions, else transposed (one row per direction, columns ``"<method> B|A"``).
    Returns the first column's heading, the other columns and the rows."""
    dirs = spec.all_directions()
    if len(dirs) <= WIDE:
        return "method", [f"{direction_name(d)} {s}" for d in dirs for s in ("B", "A")], rows
    shown = {direction_name(d): {f"{name} {s}": vals.get(f"{direction_name(d)} {s}") for name, vals in rows.items()
                                 for s in ("B", "A")} for d in dirs}
    return "set A", [f"{name} {s}" for name in rows for s in ("B", "A")], shown


def render_table(spec: SweepSpec, rows: dict, results: list[dict], val_images: int) -> str:
    """Mask AP on B and on A (x100) per method and direction (layout: :func:`display_rows`); notes for skipped runs."""
    first, columns, shown = display_rows(spec, rows)
    head = "| " + first + " | " + " | ".join(c[:-2] + ": AP on " + c[-1] for c in columns) + " |"
    lines = [f"# {spec.title or 'sweep'}", "",
             f"Mask AP (COCO AP@[.5:.95], x100) on {val_images} validation images; mean over stage-2 seeds {spec.seeds}.", "",
             head, "|---|" + "---:|" * len(columns)]
    for name, vals in shown.items():
        lines.append(f"| {name} | " + " | ".join(format_value(vals.get(c)) for c in columns) + " |")
    notes = sorted({f"{r['row']}: {r['note']}" for r in results if r.get("note")})
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


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

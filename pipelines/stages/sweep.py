"""``maskx sweep``: run a grid of mask-side variants on one detector and lay the results out like the paper.

A sweep spec (YAML; shipped ones in ``pipelines/configs/sweeps/``) names a base recipe, the split
directions (set A of each: ``voc`` is voc -> non-voc, ``nonvoc`` is non-voc -> voc,
``random:N:SEED`` a random split), stage-2 seeds, and rows (methods)::

    title: "Table 3.3: impact of the MLP mask branch"
    recipe: synthetic                  # stage recipes (pipelines/configs/<recipe>.yaml)
    world: {train_images: 2000, val_images: 300, seed: 0}   # the synthetic world, made in OUT/world
    detector: ""                       # or a finished detect-train run to reuse (its data is used)
    directions: [voc, nonvoc]          # or random_splits: {sizes: [20, 30], trials: 5}
    seeds: [0]
    overrides: []                      # key=value for every stage
    stage2: []                         # key=value for every mask-side run (mask-train and train)
    e2e: {init: stage1, iterations: 0} # end-to-end rows: start from the sweep's detector or from scratch
    rows:
      - {name: class-agnostic, set: [head.head=agnostic, head.mlp=false]}
      - {name: transfer+MLP, set: [head.head=transfer, head.mlp=true]}
      - {name: transfer e2e, train: e2e, set: [head.stop_gradient=true]}
      - {name: Faster R-CNN tested w/ GrabCut, train: grabcut-test}
      - {name: Mask R-CNN trained w/ GrabCut, masks: grabcut, set: [head.head=oracle]}
    figure: {numerator: transfer+MLP, denominator: class-agnostic+MLP}   # Figure 3.1 plot (optional)

Stage 1 is trained once (or taken from ``detector``) and serves every stage-wise row; end-to-end
rows train their own detector+mask model per direction. Each (row, direction, seed) writes
``OUT/results/<row>__<direction>__s<seed>.json``; a rerun skips every run whose JSON exists (and
every training whose checkpoint exists), so an interrupted sweep is resumed by running it again.
Stage-wise heads are evaluated together: the detector runs once per validation image for all of
them (:func:`pipelines.stages.evaluate.score_heads`). The table (``table.md``) has one row per
method and, per direction, the mask AP on set B and on set A, means over seeds.
"""

from __future__ import annotations

import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.config import DetectTrainConfig, EvalConfig, MaskTrainConfig, load_config, resolve_shipped
from pipelines.data.coco import CocoDataset, load_coco
from pipelines.data.grabcut import grabcut_annotations
from pipelines.data.splits import complement, resolve_split
from pipelines.data.synthetic import SynthConfig, generate
from pipelines.engine.device import resolve_device
from pipelines.errors import MaskxError
from pipelines.evaluation import evaluate_sets
from pipelines.evaluation.report import format_value
from pipelines.io import atomic_path, read_json, read_yaml, write_json, write_text
from pipelines.progress import NULL_PROGRESS, Progress
from pipelines.stages.common import DETECTOR_CKPT, MASK_CKPT, load_detector_run
from pipelines.stages.detect_train import detect_train
from pipelines.stages.eval_grabcut import grabcut_predictions
from pipelines.stages.evaluate import score_heads, set_inference_limits
from pipelines.stages.export_embeddings import export_embeddings, read_embeddings
from pipelines.stages.mask_train import load_mask_run, mask_train
from pipelines.stages.train_e2e import load_e2e_config, train_e2e

SPEC_DIR = Path(__file__).resolve().parent.parent / "configs" / "sweeps"
KINDS = ("stagewise", "e2e", "grabcut-test")
MASKS = ("gt", "grabcut")


@dataclass
class Row:
    name: str
    train: str = "stagewise"  # stagewise | e2e | grabcut-test
    masks: str = "gt"  # gt | grabcut (set-B masks replaced by GrabCut in the training file; train on all classes)
    set: list[str] = field(default_factory=list)

    @property
    def slug(self) -> str:
        return slugify(self.name)


@dataclass
class SweepSpec:
    title: str = ""
    recipe: str = "synthetic"
    world: dict = field(default_factory=dict)
    detector: str = ""
    detector_iterations: int = 0
    directions: list[str] = field(default_factory=lambda: ["voc", "nonvoc"])
    random_splits: dict = field(default_factory=dict)  # {sizes: [...], trials: N}: directions random:N:TRIAL
    seeds: list[int] = field(default_factory=lambda: [0])
    overrides: list[str] = field(default_factory=list)
    stage2: list[str] = field(default_factory=list)
    e2e: dict = field(default_factory=lambda: {"init": "stage1", "iterations": 0})
    max_val_images: int = 0
    rows: list[Row] = field(default_factory=list)
    figure: dict = field(default_factory=dict)
    path: str = ""

    def all_directions(self) -> list[str]:
        if self.random_splits:
            sizes = self.random_splits.get("sizes") or []
            trials = int(self.random_splits.get("trials", 1))
            return [f"random:{n}:{t}" for n in sizes for t in range(trials)]
        return list(self.directions)


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


def slugify(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "row"


def direction_name(spec: str) -> str:
    return {"voc": "voc→nonvoc", "nonvoc": "nonvoc→voc"}.get(spec, spec)


def resolve_spec_path(name: str | Path) -> Path:
    """A sweep spec path, or the name of a shipped spec (``table_3_1``)."""
    return resolve_shipped(name, SPEC_DIR, "sweep spec")


def load_spec(path: str | Path) -> SweepSpec:
    """Read and check a sweep spec (unknown keys, duplicate rows, bad kinds: one clear error)."""
    path = resolve_spec_path(path)
    raw = read_yaml(path, "sweep spec")
    if not isinstance(raw, dict):
        raise MaskxError("sweep spec must be a mapping", path)
    known = set(SweepSpec.__dataclass_fields__) - {"path"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise MaskxError(f"unknown sweep key '{unknown[0]}' (known: {', '.join(sorted(known))})", path)
    rows = []
    for i, r in enumerate(raw.pop("rows", None) or []):
        if not isinstance(r, dict) or "name" not in r:
            raise MaskxError(f"row #{i + 1} needs a 'name'", path)
        bad = sorted(set(r) - {"name", "train", "masks", "set"})
        if bad:
            raise MaskxError(f"row '{r['name']}': unknown key '{bad[0]}' (known: name, train, masks, set)", path)
        row = Row(name=str(r["name"]), train=str(r.get("train", "stagewise")), masks=str(r.get("masks", "gt")),
                  set=[str(s) for s in (r.get("set") or [])])
        if row.train not in KINDS:
            raise MaskxError(f"row '{row.name}': train must be one of {' | '.join(KINDS)}, got '{row.train}'", path)
        if row.masks not in MASKS:
            raise MaskxError(f"row '{row.name}': masks must be one of {' | '.join(MASKS)}, got '{row.masks}'", path)
        rows.append(row)
    if not rows:
        raise MaskxError("the sweep has no rows", path)
    slugs = [r.slug for r in rows]
    dup = next((s for s in slugs if slugs.count(s) > 1), None)
    if dup:
        raise MaskxError(f"two rows have the same name (as a folder name: '{dup}')", path)
    spec = SweepSpec(**raw, rows=rows, path=str(path))
    if not spec.all_directions():
        raise MaskxError("the sweep has no split direction", path)
    if spec.e2e.get("init", "stage1") not in ("stage1", "scratch"):
        raise MaskxError(f"e2e.init must be stage1 or scratch, got '{spec.e2e.get('init')}'", path)
    return spec


def _row_set(row: Row, key: str) -> str | None:
    for item in row.set:
        if item.split("=", 1)[0].strip() == key:
            return item.split("=", 1)[1]
    return None


def _is_oracle(row: Row) -> bool:
    return _row_set(row, "head.head") == "oracle" and row.masks == "gt"


@dataclass
class _Job:
    row: Row
    direction: str  # set A spec
    seed: int
    result: Path
    run: Path | None  # training folder (None for grabcut-test)


def run_sweep(spec: SweepSpec, out: str | Path, detector: str | Path | None = None, extra_stage2: list[str] | None = None,
              glove: str | None = None, progress: Progress = NULL_PROGRESS) -> SweepResult:
    """Run (or resume) the sweep into ``out``; write per-run JSONs, ``table.md``, ``summary.json``."""
    out = Path(out)
    t0 = time.perf_counter()
    stage2 = list(spec.stage2) + list(extra_stage2 or [])

    # -- stage 1: one detector for every stage-wise row --------------------------------------
    det_dir = Path(detector or spec.detector) if (detector or spec.detector) else out / "detector"
    if detector or spec.detector:
        det = load_detector_run(det_dir)
        data = det.config.get("data") or {}
        if not data.get("train_json") or not data.get("val_json"):
            raise MaskxError("the detector run's config names no train/val data", det_dir)
    else:
        world = generate(SynthConfig(**spec.world), out / "world", progress)
        data = {"train_json": str(world.train_json), "train_images": str(world.train_dir),
                "val_json": str(world.val_json), "val_images": str(world.val_dir)}
        if not (det_dir / DETECTOR_CKPT).is_file():
            over = [f"data.{k}={v}" for k, v in data.items()] + [o for o in spec.overrides if not o.startswith(("head.", "cache.", "eval."))]
            if spec.detector_iterations:
                over.append(f"solver.iterations={spec.detector_iterations}")
            det_cfg = load_config(DetectTrainConfig, spec.recipe, over, section="detect_train")
            detect_train(det_cfg, det_dir, progress, resume=(det_dir / "last.pth").is_file())
        det = load_detector_run(det_dir)
    data_over = [f"data.{k}={data[k]}" for k in ("train_json", "train_images", "val_json", "val_images") if data.get(k)]
    emb_path = out / "embeddings.h5"
    if not emb_path.is_file() or read_embeddings(emb_path).detector_sha256 != det.sha256:
        export_embeddings(det.checkpoint, emb_path)

    gt, _ = load_coco(data["val_json"], require_masks=True)
    cats = gt["categories"]
    dataset = CocoDataset(gt, data["val_images"], max_images=spec.max_val_images)
    image_ids = [im["id"] for im in dataset.images]
    eval_cfg = load_config(EvalConfig, spec.recipe, [o for o in spec.overrides if o.startswith("eval.")], section="eval")

    def sets_of(direction: str) -> dict[str, list[int]]:
        set_a = resolve_split(direction, cats)
        return {"B": complement(set_a, cats), "A": set_a}

    stage_over = [o for o in spec.overrides if not o.startswith("eval.")]

    # -- the plan ------------------------------------------------------------------------------
    jobs: list[_Job] = []
    for row in spec.rows:
        for direction in spec.all_directions():
            for seed in spec.seeds:
                base = f"{row.slug}__{direction.replace(':', '-')}__s{seed}"
                train_dir = "all" if (_is_oracle(row) and row.train == "stagewise") else direction.replace(":", "-")
                run = None if row.train == "grabcut-test" else out / "runs" / f"{row.slug}__{train_dir}__s{seed}"
                jobs.append(_Job(row, direction, seed, out / "results" / f"{base}.json", run))
    todo = [j for j in jobs if not j.result.is_file()]
    skipped = len(jobs) - len(todo)
    task = progress.task(f"sweep {Path(spec.path).stem or ''}".strip(), len(todo))

    def record(job: _Job, metrics: dict, kind: str, seconds: float, note: str = "") -> None:
        sets = sets_of(job.direction)
        write_json(job.result, {
            "row": job.row.name, "direction": job.direction, "seed": job.seed, "train": kind, "masks": job.row.masks,
            "set": job.row.set, "run": str(job.run) if job.run else None, "detector": str(det.checkpoint),
            "set_a": sets["A"], "set_b": sets["B"], "metrics": metrics, "seconds": round(seconds, 1),
            "val_images": len(dataset), "note": note,
        })
        task.advance(1)

    # -- train every mask-side run -------------------------------------------------------------
    stagewise: dict[str, tuple[Path, list[_Job]]] = {}
    for job in todo:
        row = job.row
        over = data_over + stage_over + stage2 + list(row.set) + [f"data.mask_classes={job.direction}", f"solver.seed={job.seed}"]
        if glove and not any(o.startswith("head.glove=") for o in over):
            over.append(f"head.glove={glove}")
        if row.masks == "grabcut":
            over.append(f"data.train_json={_grabcut_file(out, data, job.direction, cats, progress)}")
            over.append("head.head=oracle")
        if _row_set(row, "head.input") == "glove" and not any(o.startswith("head.glove=") and o.split("=", 1)[1] for o in over):
            record(job, {}, row.train, 0.0, "skipped: input glove needs a GloVe file (maskx sweep --glove PATH)")
            continue
        if row.train == "grabcut-test":
            continue
        if row.train == "stagewise":
            if not (job.run / MASK_CKPT).is_file():
                mcfg = load_config(MaskTrainConfig, spec.recipe, over, section="mask_train")
                mask_train(mcfg, det.run_dir, emb_path, job.run, progress, resume=(job.run / "last.pth").is_file())
            stagewise.setdefault(str(job.run), (job.run, []))[1].append(job)
        else:
            if not (job.run / MASK_CKPT).is_file():
                e2e_over = [o for o in over if not o.startswith("cache.")]
                if spec.e2e.get("iterations"):
                    e2e_over.append(f"solver.iterations={spec.e2e['iterations']}")
                if spec.e2e.get("init", "stage1") == "stage1":
                    e2e_over.append(f"init_detector={det.checkpoint}")
                train_e2e(load_e2e_config(spec.recipe, e2e_over), job.run, progress, resume=(job.run / "last.pth").is_file())
            t1 = time.perf_counter()
            e2e_det = load_detector_run(job.run)
            head = load_mask_run(job.run, e2e_det)
            metrics, _ = score_heads(e2e_det, {"head": head[0]}, gt, dataset, {"job": ("head", sets_of(job.direction))},
                                     head[1]["head"]["roi_size"], eval_cfg, progress)
            record(job, metrics["job"], "e2e", time.perf_counter() - t1)

    # -- one evaluation pass for every stage-wise head -----------------------------------------
    if stagewise:
        t1 = time.perf_counter()
        heads, roi_size = {}, None
        for key, (run, _) in stagewise.items():
            heads[key], ckpt = load_mask_run(run, det)
            roi_size = ckpt["head"]["roi_size"]
        eval_jobs = {str(j.result): (key, sets_of(j.direction)) for key, (_, js) in stagewise.items() for j in js}
        metrics, _ = score_heads(det, heads, gt, dataset, eval_jobs, roi_size, eval_cfg, progress)
        per = (time.perf_counter() - t1) / max(1, len(eval_jobs))
        for _, js in stagewise.values():
            for j in js:
                record(j, metrics[str(j.result)], "stagewise", per)

    # -- GrabCut at test time: one pass over the detector's boxes ------------------------------
    gc_jobs = [j for j in todo if j.row.train == "grabcut-test" and not j.result.is_file()]
    if gc_jobs:
        t1 = time.perf_counter()
        set_inference_limits(det.model, gt, eval_cfg)
        results = grabcut_predictions(det.model, dataset, det.categories, resolve_device("auto"), progress=progress)
        per = (time.perf_counter() - t1) / len(gc_jobs)
        for j in gc_jobs:
            record(j, evaluate_sets(gt, results, sets_of(j.direction), backend=eval_cfg.backend, image_ids=image_ids),
                   "grabcut-test", per)
    task.close()

    # -- table, summary, figure ----------------------------------------------------------------
    loaded = [read_json(j.result, "sweep result") for j in jobs]
    rows = table_rows(spec, loaded)
    summary = {"title": spec.title, "spec": spec.path, "directions": spec.all_directions(), "seeds": spec.seeds,
               "detector": str(det.checkpoint), "val_images": len(dataset), "rows": rows,
               "results": [str(j.result) for j in jobs]}
    figure_path = None
    if spec.figure:
        points = figure_points(spec, loaded, load_coco(data["train_json"])[0])
        summary["figure_points"] = points
        figure_path = out / "figure.png"
        plot_relative_change(points, figure_path, spec.title)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    table_md, summary_json = out / "table.md", out / "summary.json"
    write_text(table_md, render_table(spec, rows, loaded, len(dataset)))
    write_json(summary_json, summary)
    return SweepResult(out, table_md, summary_json, figure_path, len(todo), skipped, summary["seconds"], rows)


def _grabcut_file(out: Path, data: dict, direction: str, cats: list[dict], progress: Progress) -> Path:
    """The training file with set-B masks (B = the complement of ``direction``) replaced by GrabCut's."""
    set_b = complement(resolve_split(direction, cats), cats)
    path = out / "grabcut" / f"train_grabcut_{direction.replace(':', '-')}.json"
    if not path.is_file():
        grabcut_annotations(data["train_json"], data["train_images"], "ids:" + ",".join(map(str, set_b)), path, progress=progress)
    return path


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


def table_rows(spec: SweepSpec, results: list[dict], metric: str = "AP") -> dict[str, dict[str, float | None]]:
    """Rows = methods; columns ``"<direction> B"``, ``"<direction> A"``: mask ``metric``, mean over seeds."""
    rows: dict[str, dict[str, float | None]] = {}
    for row in spec.rows:
        rows[row.name] = {}
        for d in spec.all_directions():
            for s in ("B", "A"):
                vals = [r["metrics"].get("segm", {}).get(s, {}).get(metric) for r in results
                        if r["row"] == row.name and r["direction"] == d and r["metrics"]]
                rows[row.name][f"{direction_name(d)} {s}"] = _mean(vals)
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
    num, den = spec.figure.get("numerator"), spec.figure.get("denominator")
    names = {r.name for r in spec.rows}
    for n in (num, den):
        if n not in names:
            raise MaskxError(f"figure row '{n}' is not a row of the sweep", spec.path or None)
    counts: dict[int, int] = {}
    for a in train["annotations"]:
        if not a.get("iscrowd", 0):
            counts[a["category_id"]] = counts.get(a["category_id"], 0) + 1
    points = []
    for d in spec.all_directions():
        def b_ap(row: str) -> float | None:
            return _mean([r["metrics"]["segm"]["B"]["AP"] for r in results if r["row"] == row and r["direction"] == d and r["metrics"]])
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

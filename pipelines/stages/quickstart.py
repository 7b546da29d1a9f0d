"""``maskx quickstart``: the whole job on the built-in synthetic world, with a report.

synthetic world -> stage 1 detector (boxes of all 80 classes) -> embeddings -> stage 2 mask heads
(class-agnostic+MLP, transfer+MLP, oracle) for two class splits (voc -> nonvoc, and a random 40/40)
and several stage-2 seeds -> one evaluation pass (the detector runs once per image, every head
predicts masks for the same detections) -> ``report.md``, ``report.json``, ``predictions.png``.
Stage 1 does not depend on the split (it sees boxes of every class), so one detector serves all.
Finished pieces are reused when the command is run again with the same settings.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipelines.config import DataConfig, DetectTrainConfig, EvalConfig, MaskTrainConfig, load_config, to_dict
from pipelines.data.coco import CocoDataset, load_coco
from pipelines.data.splits import complement, resolve_split
from pipelines.data.synthetic import SynthConfig, generate
from pipelines.evaluation.report import markdown_table
from pipelines.errors import MaskxError
from pipelines.io import atomic_path, write_json, write_text
from pipelines.progress import NULL_PROGRESS, Progress
from pipelines.stages.common import DETECTOR_CKPT, MASK_CKPT, load_detector_run
from pipelines.stages.detect_train import detect_train
from pipelines.stages.evaluate import score_heads
from pipelines.stages.export_embeddings import export_embeddings, read_embeddings
from pipelines.stages.mask_train import load_mask_run, mask_train
from pipelines.visualize import draw_predictions, grid

HEADS = {  # name -> (head, mlp)
    "class-agnostic+MLP": ("agnostic", True),
    "transfer+MLP": ("transfer", True),
    "oracle": ("oracle", True),
}


@dataclass
class QuickstartConfig:
    recipe: str = "synthetic"
    world: SynthConfig = field(default_factory=SynthConfig)
    splits: list[str] = field(default_factory=lambda: ["voc", "random:40:0"])  # set A of each split
    seeds: list[int] = field(default_factory=lambda: [0, 1])  # stage-2 seeds
    detector_iterations: int = 0  # 0: the recipe's
    mask_iterations: int = 0
    max_val_images: int = 0
    overrides: list[str] = field(default_factory=list)  # applied to every stage's config


@dataclass
class QuickstartResult:
    out: Path
    report_md: Path
    report_json: Path
    picture: Path
    summary: dict
    seconds: float


def split_name(spec: str) -> str:
    return "voc→nonvoc" if spec == "voc" else ("nonvoc→voc" if spec == "nonvoc" else spec)


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


def quickstart(cfg: QuickstartConfig, out: str | Path, progress: Progress = NULL_PROGRESS) -> QuickstartResult:
    out = Path(out)
    t0 = time.perf_counter()
    world = generate(cfg.world, out / "world", progress)
    data = DataConfig(train_json=str(world.train_json), train_images=str(world.train_dir), val_json=str(world.val_json),
                      val_images=str(world.val_dir), mask_classes=cfg.splits[0], max_val_images=cfg.max_val_images)
    data_overrides = [f"data.{k}={v}" for k, v in to_dict(data).items() if k != "max_val_images"]
    common = data_overrides + list(cfg.overrides)

    # stage 1
    det_dir = out / "detector"
    det_over = common + ([f"solver.iterations={cfg.detector_iterations}"] if cfg.detector_iterations else [])
    det_cfg = load_config(DetectTrainConfig, cfg.recipe, _for(DetectTrainConfig, det_over), section="detect_train")
    if (det_dir / DETECTOR_CKPT).is_file():
        _check_same_settings(det_dir, det_cfg)
    else:
        detect_train(det_cfg, det_dir, progress, resume=(det_dir / "last.pth").is_file())
    emb_path = out / "embeddings.h5"
    det = load_detector_run(det_dir)
    if not emb_path.is_file() or read_embeddings(emb_path).detector_sha256 != det.sha256:
        export_embeddings(det_dir, emb_path, cfg.splits[0])

    # stage 2: every head, split and seed (the oracle does not depend on the split)
    runs: dict[str, Path] = {}
    plan = []
    for seed in cfg.seeds:
        for name, (head, mlp) in HEADS.items():
            for spec in (cfg.splits if head != "oracle" else cfg.splits[:1]):
                key = f"{name}|{spec if head != 'oracle' else 'all'}|{seed}"
                run = out / "heads" / f"{head}{'-mlp' if mlp else ''}_{(spec if head != 'oracle' else 'all').replace(':', '-')}_s{seed}"
                plan.append((key, run, head, mlp, spec, seed))
    mask_over = common + ([f"solver.iterations={cfg.mask_iterations}"] if cfg.mask_iterations else [])
    for key, run, head, mlp, spec, seed in plan:
        mcfg = load_config(MaskTrainConfig, cfg.recipe, _for(MaskTrainConfig, mask_over) + [f"head.head={head}", f"head.mlp={str(mlp).lower()}",
                                                                      f"data.mask_classes={spec}", f"solver.seed={seed}"],
                           section="mask_train")
        if (run / MASK_CKPT).is_file():
            _check_same_settings(run, mcfg)
        else:
            mask_train(mcfg, det_dir, emb_path, run, progress, resume=(run / "last.pth").is_file())
        runs[key] = run

    # one prediction pass for every head, then COCOeval per split
    gt, _ = load_coco(world.val_json, require_masks=True)
    cats = gt["categories"]
    loaded = {key: load_mask_run(run, det) for key, run in runs.items()}  # (mask side, checkpoint)
    heads = {key: side for key, (side, _) in loaded.items()}
    dataset = CocoDataset(gt, world.val_dir, max_images=cfg.max_val_images)
    eval_cfg = load_config(EvalConfig, cfg.recipe, [o for o in cfg.overrides if o.startswith("eval.")], section="eval")
    roi_size = next(iter(loaded.values()))[1]["head"]["roi_size"]  # one recipe: the same for every head
    split_sets = {}
    for spec in cfg.splits:
        set_a = resolve_split(spec, cats)
        split_sets[spec] = {"B": complement(set_a, cats), "A": set_a}
    jobs = {f"{key}|{spec}": (key, split_sets[spec]) for spec in cfg.splits for key in heads if key.split("|")[1] in (spec, "all")}
    per_run, results = score_heads(det, heads, gt, dataset, jobs, roi_size, eval_cfg, progress)
    summary: dict = {"splits": {}, "seeds": cfg.seeds, "val_images": len(dataset)}
    for spec in cfg.splits:
        set_a, sets = split_sets[spec]["A"], split_sets[spec]
        split_summary = {"set_a": set_a, "set_b": sets["B"], "heads": {}}
        for name in HEADS:
            seeds = {}
            for seed in cfg.seeds:
                k = f"{name}|{spec if HEADS[name][0] != 'oracle' else 'all'}|{seed}|{spec}"
                seeds[seed] = per_run[k]
            mean = {iou: {s: {m: _mean([seeds[sd][iou][s][m] for sd in cfg.seeds]) for m in seeds[cfg.seeds[0]][iou][s]}
                          for s in ("B", "A")} for iou in ("segm", "bbox")}
            split_summary["heads"][name] = {"mean": mean, "per_seed": {str(k): v for k, v in seeds.items()},
                                            "segm_B_AP_per_seed": [seeds[sd]["segm"]["B"]["AP"] for sd in cfg.seeds]}
        t = split_summary["heads"]["transfer+MLP"]["mean"]["segm"]["B"]["AP"]
        a = split_summary["heads"]["class-agnostic+MLP"]["mean"]["segm"]["B"]["AP"]
        split_summary["transfer_over_agnostic_B"] = (t / a) if (t is not None and a) else None
        summary["splits"][spec] = split_summary

    picture = out / "predictions.png"
    _picture(det, heads, runs, cfg.splits[0], dataset, cats, results, picture)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    summary["config"] = {**dataclasses.asdict(cfg)}
    summary["detector_config"] = to_dict(det_cfg)
    report_json = out / "report.json"
    write_json(report_json, summary)
    report_md = out / "report.md"
    write_text(report_md, render_report(summary, cfg))
    return QuickstartResult(out, report_md, report_json, picture, summary, summary["seconds"])


def _for(cls, overrides: list[str]) -> list[str]:
    """The overrides whose section exists in the stage config ``cls`` (``solver.*`` goes to every stage)."""
    sections = {f.name for f in dataclasses.fields(cls)}
    return [o for o in overrides if o.split(".", 1)[0] in sections]


def _check_same_settings(run: Path, cfg) -> None:
    """A finished run is reused only if it was made with the same resolved config."""
    from pipelines.io import read_yaml

    saved = read_yaml(run / "config.yaml", "run config") or {}
    saved.pop("stage", None)
    if saved != to_dict(cfg):
        raise MaskxError("holds a finished run made with other settings; use another --out (or delete it)", run)


def summary_rows(summary: dict) -> dict[str, dict[str, float | None]]:
    """Rows = heads; columns = mask AP on B and A for every split (means over seeds)."""
    rows: dict[str, dict[str, float | None]] = {}
    for spec, s in summary["splits"].items():
        for name, h in s["heads"].items():
            rows.setdefault(name, {})
            rows[name][f"{split_name(spec)} B"] = h["mean"]["segm"]["B"]["AP"]
            rows[name][f"{split_name(spec)} A"] = h["mean"]["segm"]["A"]["AP"]
    return rows


def render_report(summary: dict, cfg: QuickstartConfig) -> str:
    rows = summary_rows(summary)
    columns = list(next(iter(rows.values())).keys())
    lines = [
        "# maskx quickstart report",
        "",
        f"Synthetic world: {cfg.world.num_classes} classes, {cfg.world.train_images} train / {summary['val_images']} val images "
        f"(seed {cfg.world.seed}). One detector (stage 1, boxes of all classes); stage-2 seeds {cfg.seeds}; "
        f"mask AP (COCO AP@[.5:.95], x100) from `maskx`'s own evaluation, mean over stage-2 seeds.",
        "",
        markdown_table(rows, columns),
        "",
    ]
    for spec, s in summary["splits"].items():
        ratio = s["transfer_over_agnostic_B"]
        per_seed = {n: [None if v is None else round(100 * v, 1) for v in h["segm_B_AP_per_seed"]] for n, h in s["heads"].items()}
        lines.append(f"- **{split_name(spec)}** (|A| = {len(s['set_a'])}): transfer+MLP / class-agnostic+MLP on set B = "
                     f"{'n/a' if ratio is None else f'{ratio:.2f}x'} (paper, COCO R-50: 23.7 / 19.2 = 1.23x). Per seed, set-B mask AP: {per_seed}")
    lines += ["", "Box AP (mean over seeds; the same detector for every head):", ""]
    box_rows = {f"{split_name(spec)} {s_}": summary["splits"][spec]["heads"]["oracle"]["mean"]["bbox"][s_]
                for spec in summary["splits"] for s_ in ("B", "A")}
    lines += [markdown_table(box_rows), "", "![predictions](predictions.png)", "",
              f"Total time: {summary['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def _picture(det, heads, runs, spec, dataset, cats, results, path: Path, count: int = 6) -> None:
    """Figure 3.2 style: top row class-agnostic+MLP, bottom row transfer+MLP, first seed, split ``spec``."""
    from pycocotools import mask as mask_utils

    set_a = set(resolve_split(spec, cats))
    names = {c["id"]: c["name"] for c in cats}
    seed = min(int(k.split("|")[2]) for k in runs)
    rows = []
    for head_name in ("class-agnostic+MLP", "transfer+MLP"):
        key = f"{head_name}|{spec}|{seed}"
        by_image: dict[int, list[dict]] = {}
        for r in results[key]:
            by_image.setdefault(r["image_id"], []).append(r)
        row = []
        for i in range(min(count, len(dataset))):
            image_id = dataset.images[i]["id"]
            dets = [d for d in sorted(by_image.get(image_id, []), key=lambda d: -d["score"]) if d["score"] >= 0.5][:6]
            img = (dataset[i][0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
            boxes = np.array([[d["bbox"][0], d["bbox"][1], d["bbox"][0] + d["bbox"][2], d["bbox"][1] + d["bbox"][3]] for d in dets]).reshape(-1, 4)
            masks = np.stack([mask_utils.decode(d["segmentation"]) for d in dets]) if dets else None
            row.append(draw_predictions(img, boxes, [names[d["category_id"]] for d in dets], np.array([d["score"] for d in dets]),
                                        masks, [d["category_id"] in set_a for d in dets], scale=3))
        rows.append(row)
    name = split_name(spec).replace("→", " -> ")  # the bitmap font has no arrow
    titles = [f"class-agnostic+MLP ({name})"] + [""] * (len(rows[0]) - 1) + \
             [f"transfer+MLP ({name})"] + [""] * (len(rows[1]) - 1)
    sheet = grid(rows[0] + rows[1], columns=len(rows[0]), titles=titles)
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")

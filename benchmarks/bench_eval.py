"""Evaluation speed at dataset scale, with a check that the numbers agree, in both ``maskx eval`` modes.

``--case coco`` (default): a COCO-val-sized synthetic case (``--images 5000``: 37k ground-truth
masks, 412k detections with boxes and masks, 80 classes), mask and box AP by

  pycocotools        COCO + loadRes + COCOeval, segm then bbox (all classes), as a user runs it;
  faster-coco-eval   the same with faster_coco_eval.COCO / COCOeval_faster;
  maskx              ``score`` (the run mode's scoring: segm and bbox on set B, set A, all) or, in
                     the results-file mode, ``evaluate_results_file`` (what ``maskx eval --gt
                     --results`` runs: reading and validating both files, scoring, the metrics file).

``--mode memory`` starts every route from dicts in memory (the run mode); ``--mode file`` from
the JSON files on disk (each route reads them); ``--mode both`` runs both.

``--case lvis``: an LVIS-v1-val-sized case (``--images 19809``, 1,203 classes with LVIS's
rare/common/frequent mix, ~12 ground-truth masks and 300 detections per image, federated
``neg_category_ids`` / ``not_exhaustive_category_ids``), scored by maskx (LVIS rules, default
backend) with a progress bar; ``--reference-images N`` also runs ``lvis.LVISEval`` itself and
faster-coco-eval's plain LVIS mode on the first N images and checks that the numbers agree.

    uv run python benchmarks/bench_eval.py --images 1000 --mode both --out bench_eval.json
    uv run python benchmarks/bench_eval.py --case lvis --images 2000 --reference-images 500 --out bench_eval_lvis.json

Masks are compressed RLEs of ellipses (polygons) and rectangles at COCO-like image sizes; object
sizes follow COCO's mix of small / medium / large; detections are jittered copies of ground truth
(mostly the right class) plus false positives concentrated on a few classes per image. Generating
the case and writing its files are not timed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from _common import machine, write_report  # noqa: E402  (puts the repo on sys.path)
from pipelines.config import EvalConfig  # noqa: E402
from pipelines.data.splits import COCO_CATEGORIES  # noqa: E402
from pipelines.evaluation import IOU_TYPES, LVIS_METRICS, METRICS, class_sets, score  # noqa: E402
from pipelines.stages.eval_results import evaluate_results_file  # noqa: E402

GT_PER_IMAGE = 7.3  # COCO val2017: 36,781 instances / 5,000 images
DETS_PER_IMAGE = 82  # 412k detections / 5,000 images
SIZE_MIX = ((0.41, 4, 32), (0.34, 32, 96), (0.25, 96, 400))  # (fraction, min sqrt(area), max sqrt(area))
LVIS_GROUPS = (("r", 337, 0.5), ("c", 461, 3.0), ("f", 405, 20.0))  # frequency, classes, relative share of instances
LVIS_GT_PER_IMAGE = 12.4  # LVIS v1 val: 244,707 instances / 19,809 images
LVIS_CLASSES_PER_IMAGE = 3.5
LVIS_NEG_PER_IMAGE = 6.0


def _noop(*args, **kwargs) -> None:
    pass


def _shapes(boxes: np.ndarray, height: int, width: int) -> list[dict]:
    """Compressed RLEs (counts as str): ellipses for even rows, rectangles for odd rows."""
    out: list[dict | None] = [None] * len(boxes)
    t = np.linspace(0, 2 * np.pi, 16, endpoint=False)
    polys, poly_rows = [], []
    for i, (x, y, w, h) in enumerate(boxes):
        if i % 2 == 0:
            px = x + w / 2 * (1 + np.cos(t))
            py = y + h / 2 * (1 + np.sin(t))
            polys.append(np.stack([px, py], 1).ravel().tolist())
            poly_rows.append(i)
    if polys:
        for i, rle in zip(poly_rows, mask_utils.frPyObjects(polys, height, width)):
            out[i] = rle
    rect_rows = [i for i in range(len(boxes)) if i % 2 == 1]
    if rect_rows:
        for i, rle in zip(rect_rows, mask_utils.frPyObjects(boxes[rect_rows].astype(np.float64), height, width)):
            out[i] = rle
    for rle in out:
        rle["counts"] = rle["counts"].decode("ascii")
    return out  # type: ignore[return-value]


def _boxes(rng: np.random.Generator, n: int, height: int, width: int) -> np.ndarray:
    frac = np.array([s[0] for s in SIZE_MIX])
    bucket = rng.choice(len(SIZE_MIX), size=n, p=frac / frac.sum())
    lo = np.array([SIZE_MIX[b][1] for b in bucket], float)
    hi = np.array([SIZE_MIX[b][2] for b in bucket], float)
    side = rng.uniform(lo, hi)
    aspect = np.exp(rng.uniform(-0.7, 0.7, n))
    w = np.clip(side * np.sqrt(aspect), 2, width - 1)
    h = np.clip(side / np.sqrt(aspect), 2, height - 1)
    x = rng.uniform(0, width - w)
    y = rng.uniform(0, height - h)
    return np.stack([x, y, w, h], 1)


def _image(rng: np.random.Generator, img_id: int) -> dict:
    width, height = (640, int(rng.integers(360, 640))) if rng.random() < 0.75 else (int(rng.integers(360, 640)), 640)
    return {"id": img_id, "file_name": f"{img_id:012d}.jpg", "height": height, "width": width}


def _detections(rng: np.random.Generator, img: dict, gboxes: np.ndarray, gcats: np.ndarray, n_total: int,
                pick_cats) -> list[dict]:
    """~3 jittered copies of each object (85% its class), false positives up to ``n_total``."""
    height, width = img["height"], img["width"]
    n_gt = len(gboxes)
    k = rng.integers(1, 5, size=n_gt)
    src = np.repeat(np.arange(n_gt), k)[: n_total]
    dboxes = gboxes[src] * (1 + rng.normal(0, 0.05, (src.size, 4))) if n_gt else np.zeros((0, 4))
    dcats = np.where(rng.random(src.size) < 0.85, gcats[src], pick_cats(src.size)) if n_gt else np.zeros(0, int)
    dscores = rng.beta(4, 2, src.size)
    n_fp = max(0, n_total - src.size)
    fboxes = _boxes(rng, n_fp, height, width)
    fcats = pick_cats(n_fp)
    fscores = rng.beta(1.2, 6, n_fp)
    boxes = np.concatenate([dboxes, fboxes])
    boxes[:, 0] = np.clip(boxes[:, 0], 0, width - 2)
    boxes[:, 1] = np.clip(boxes[:, 1], 0, height - 2)
    boxes[:, 2] = np.clip(boxes[:, 2], 1, width - boxes[:, 0])
    boxes[:, 3] = np.clip(boxes[:, 3], 1, height - boxes[:, 1])
    cats = np.concatenate([dcats, fcats])
    scores = np.concatenate([dscores, fscores])
    return [{"image_id": img["id"], "category_id": int(c), "score": float(s), "bbox": [float(v) for v in b], "segmentation": seg}
            for c, s, b, seg in zip(cats, scores, boxes, _shapes(boxes, height, width))]


def _annotations(rng: np.random.Generator, img: dict, gboxes: np.ndarray, gcats: np.ndarray, first_id: int, crowd: float) -> list[dict]:
    return [{"id": first_id + j, "image_id": img["id"], "category_id": int(c), "bbox": [float(v) for v in b],
             "area": float(mask_utils.area(seg)), "iscrowd": int(rng.random() < crowd), "segmentation": seg}
            for j, (b, c, seg) in enumerate(zip(gboxes, gcats, _shapes(gboxes, img["height"], img["width"])))]


def make_case(n_images: int, seed: int = 0) -> tuple[dict, list[dict]]:
    """(COCO ground-truth dict, results with boxes and masks) of ``n_images`` synthetic images."""
    rng = np.random.default_rng(seed)
    cat_ids = np.array([c for c, _ in COCO_CATEGORIES])
    images, anns, results = [], [], []
    for i in range(n_images):
        img = _image(rng, i + 1)
        images.append(img)
        n_gt = int(rng.poisson(GT_PER_IMAGE))
        gboxes = _boxes(rng, n_gt, img["height"], img["width"])
        gcats = rng.choice(cat_ids, size=n_gt)
        anns += _annotations(rng, img, gboxes, gcats, len(anns) + 1, crowd=0.01)
        few = rng.choice(cat_ids, size=5)  # false positives concentrate on a few classes per image
        results += _detections(rng, img, gboxes, gcats, DETS_PER_IMAGE, lambda n: rng.choice(few, size=n) if n else np.zeros(0, int))
    categories = [{"id": c, "name": n} for c, n in COCO_CATEGORIES]
    return {"images": images, "annotations": anns, "categories": categories}, results


def make_lvis_case(n_images: int, dets_per_image: int = 300, seed: int = 0) -> tuple[dict, list[dict]]:
    """(LVIS v1-like ground-truth dict, results) of ``n_images`` synthetic images, 1,203 classes."""
    rng = np.random.default_rng(seed)
    cats, weights = [], []
    for freq, n, share in LVIS_GROUPS:
        for _ in range(n):
            cats.append({"id": len(cats) + 1, "name": f"class_{len(cats) + 1}", "frequency": freq})
            weights.append(share / n)
    cat_ids = np.array([c["id"] for c in cats])
    p = np.array(weights) / sum(weights)
    images, anns, results = [], [], []
    for i in range(n_images):
        img = _image(rng, i + 1)
        present = np.unique(rng.choice(cat_ids, size=max(1, int(rng.poisson(LVIS_CLASSES_PER_IMAGE))), p=p))
        n_gt = max(1, int(rng.poisson(LVIS_GT_PER_IMAGE)))
        gcats = rng.choice(present, size=n_gt)
        gboxes = _boxes(rng, n_gt, img["height"], img["width"])
        absent = np.setdiff1d(rng.choice(cat_ids, size=int(rng.poisson(LVIS_NEG_PER_IMAGE)) + 1, p=p), present)
        img["neg_category_ids"] = [int(c) for c in absent]
        img["not_exhaustive_category_ids"] = [int(c) for c in present if rng.random() < 0.15]
        images.append(img)
        anns += _annotations(rng, img, gboxes, gcats, len(anns) + 1, crowd=0.0)
        mix = np.concatenate([present, absent])

        def pick(n, mix=mix):  # false positives: classes of the image, its checked-absent classes, any class
            if not n:
                return np.zeros(0, int)
            u = rng.random(n)
            return np.where(u < 0.35, rng.choice(mix, size=n), rng.choice(cat_ids, size=n, p=p))

        results += _detections(rng, img, gboxes, gcats, dets_per_image, pick)
    for a in anns:
        del a["iscrowd"]
    return {"images": images, "annotations": anns, "categories": cats}, results


# -- the routes -------------------------------------------------------------------------------------
def _by_hand(coco_cls, make_eval, gt: dict | str, results: list[dict]) -> dict[str, list[float]]:
    """COCO + loadRes + COCOeval for segm (results without boxes, so that masks are sized by their
    area) and bbox, on all classes: what a user runs by hand."""
    out = {}
    with contextlib.redirect_stdout(io.StringIO()):
        if isinstance(gt, str):
            coco_gt = coco_cls(gt)
        else:
            coco_gt = coco_cls()
            coco_gt.dataset = gt
            coco_gt.createIndex()
        for t in IOU_TYPES:
            drop = "bbox" if t == "segm" else "segmentation"
            e = make_eval(coco_gt, coco_gt.loadRes([{k: v for k, v in r.items() if k != drop} for r in results]), t)
            e.evaluate()
            e.accumulate()
            e.summarize()
            out[t] = [float(v) for v in e.stats[:6]]
    return out


def run_pycocotools(gt, results):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    return _by_hand(COCO, COCOeval, gt, results)


def run_faster(gt, results):
    from faster_coco_eval import COCO, COCOeval_faster

    return _by_hand(COCO, lambda g, d, t: COCOeval_faster(g, d, t, print_function=_noop), gt, results)


def _stats(metrics: dict, names=METRICS) -> list[float]:
    return [-1.0 if metrics[k] is None else metrics[k] for k in names]


def _fresh(gt: dict, results: list[dict]) -> tuple[dict, list[dict]]:
    """Shallow copies: loadRes and COCOeval write fields into the dicts they are given."""
    return ({k: [dict(x) for x in gt[k]] for k in ("images", "annotations", "categories")}, [dict(r) for r in results])


def bench_coco(args, report: dict) -> None:
    t0 = time.perf_counter()
    gt, results = make_case(args.images, args.seed)
    gen_s = time.perf_counter() - t0
    print(f"COCO case: {len(gt['images'])} images, {len(gt['annotations'])} GT masks "
          f"({sum(a['iscrowd'] for a in gt['annotations'])} crowd), {len(results)} detections; generated in {gen_s:.1f} s", flush=True)
    report["case"] = {"kind": "coco", "images": len(gt["images"]), "gt_masks": len(gt["annotations"]),
                      "crowd": sum(a["iscrowd"] for a in gt["annotations"]), "detections": len(results), "seed": args.seed,
                      "generate_s": round(gen_s, 2)}
    sets = class_sets("nonvoc", gt["categories"])
    modes = ("memory", "file") if args.mode == "both" else (args.mode,)
    with tempfile.TemporaryDirectory() as tmp:
        gt_path, res_path = os.path.join(tmp, "gt.json"), os.path.join(tmp, "dets.json")
        if "file" in modes:
            Path(gt_path).write_text(json.dumps(gt))
            Path(res_path).write_text(json.dumps(results))
            report["case"]["file_mb"] = {"gt": round(os.path.getsize(gt_path) / 2**20, 1),
                                         "results": round(os.path.getsize(res_path) / 2**20, 1)}
        for mode in modes:
            if mode == "memory":
                routes = {
                    "pycocotools": lambda: run_pycocotools(*_fresh(gt, results)),
                    "faster-coco-eval": lambda: run_faster(*_fresh(gt, results)),
                    "maskx score": lambda: {t: _stats(v["all"]) for t, v in score(gt, results, sets).metrics.items()},
                }
            else:
                routes = {
                    "pycocotools": lambda: run_pycocotools(gt_path, json.loads(Path(res_path).read_bytes())),
                    "faster-coco-eval": lambda: run_faster(gt_path, json.loads(Path(res_path).read_bytes())),
                    "maskx eval --results": lambda: {t: _stats(v["all"]) for t, v in evaluate_results_file(
                        gt_path, res_path, EvalConfig(split="nonvoc"), os.path.join(tmp, "metrics.json")).scores.metrics.items()},
                }
            report[mode] = _time_routes(routes, f"{mode} (segm + bbox, all classes; maskx: B, A and all)")


def _time_routes(routes: dict, title: str) -> dict:
    seconds, stats = {}, {}
    for name, fn in routes.items():
        t0 = time.perf_counter()
        stats[name] = fn()
        seconds[name] = time.perf_counter() - t0
        print(f"  {name}: {seconds[name]:.1f} s (load {os.getloadavg()[0]:.1f})", flush=True)
    ref = stats[next(iter(routes))]
    diffs = {name: max(abs(a - b) for t in ref for a, b in zip(ref[t], s[t])) for name, s in stats.items()}
    width = max(len(n) for n in routes)
    print(f"\n{title}")
    print(f"{'':{width}}  {'time s':>7}  {'segm AP':>7}  {'bbox AP':>7}  max |diff| vs {next(iter(routes))}")
    for name in routes:
        print(f"{name:{width}}  {seconds[name]:7.1f}  {100 * stats[name]['segm'][0]:7.2f}  {100 * stats[name]['bbox'][0]:7.2f}  {diffs[name]:.3g}")
    print()
    return {"seconds": {k: round(v, 3) for k, v in seconds.items()}, "metrics": stats, "max_abs_difference": diffs,
            "load_average_1m_after": round(os.getloadavg()[0], 2)}


def bench_lvis(args, report: dict) -> None:
    from maskx_cli.console import progress_bars

    t0 = time.perf_counter()
    gt, results = make_lvis_case(args.images, args.dets_per_image, args.seed)
    gen_s = time.perf_counter() - t0
    print(f"LVIS case: {len(gt['images'])} images, {len(gt['categories'])} classes, {len(gt['annotations'])} GT masks, "
          f"{len(results)} detections; generated in {gen_s:.1f} s", flush=True)
    report["case"] = {"kind": "lvis", "images": len(gt["images"]), "classes": len(gt["categories"]),
                      "gt_masks": len(gt["annotations"]), "detections": len(results), "seed": args.seed,
                      "generate_s": round(gen_s, 2)}
    sets = class_sets("frequency:r", gt["categories"])  # B = the rare classes
    t0 = time.perf_counter()
    with progress_bars() as progress:
        out = score(gt, results, sets, progress=progress)
    seconds = time.perf_counter() - t0
    print(f"maskx score, LVIS rules, segm + bbox on B (rare), A, all: {seconds:.1f} s (load {os.getloadavg()[0]:.1f})")
    for t in IOU_TYPES:
        print(f"  {t} all: " + "  ".join(f"{k} {100 * v:.2f}" for k, v in out.metrics[t]["all"].items() if v is not None))
    report["maskx"] = {"seconds": round(seconds, 1), "metrics": out.metrics, "load_average_1m_after": round(os.getloadavg()[0], 2)}

    if args.reference_images:
        keep = {im["id"] for im in gt["images"][: args.reference_images]}
        sub = {"images": gt["images"][: args.reference_images], "categories": gt["categories"],
               "annotations": [a for a in gt["annotations"] if a["image_id"] in keep]}
        sub_res = [r for r in results if r["image_id"] in keep]
        all_ids = {"all": [c["id"] for c in gt["categories"]]}
        print(f"\nreference on the first {len(keep)} images ({len(sub_res)} detections), segm, all classes:")
        routes = {
            "lvis LVISEval": lambda: score(sub, sub_res, all_ids, ("segm",), backend="reference").metrics["segm"]["all"],
            "faster-coco-eval lvis_style (one run)": lambda: _faster_lvis_plain(sub, sub_res),
            "maskx score (faster, class groups)": lambda: score(sub, sub_res, all_ids, ("segm",)).metrics["segm"]["all"],
        }
        secs, vals = {}, {}
        for name, fn in routes.items():
            t0 = time.perf_counter()
            vals[name] = _stats(fn(), LVIS_METRICS)
            secs[name] = time.perf_counter() - t0
            print(f"  {name}: {secs[name]:.1f} s (load {os.getloadavg()[0]:.1f})", flush=True)
        ref = vals["lvis LVISEval"]
        diffs = {k: max(abs(a - b) for a, b in zip(ref, v)) for k, v in vals.items()}
        print(f"  max |difference| from LVISEval: {max(diffs.values()):.3g}")
        report["reference"] = {"images": len(keep), "detections": len(sub_res), "iou_type": "segm",
                               "seconds": {k: round(v, 2) for k, v in secs.items()},
                               "metrics": {k: dict(zip(LVIS_METRICS, v)) for k, v in vals.items()}, "max_abs_difference": diffs}


def _faster_lvis_plain(gt: dict, results: list[dict]) -> dict:
    """faster-coco-eval's LVIS mode in one run over every (image, class) pair, as its README shows
    (the results pre-capped at 300 per image and federated-filtered: its own filter fails on images
    where every detection is dropped)."""
    from faster_coco_eval import COCO, COCOeval_faster

    from pipelines.evaluation.lvis_eval import cap_per_image

    present: dict[int, set[int]] = {}
    for a in gt["annotations"]:
        present.setdefault(a["image_id"], set()).add(a["category_id"])
    allowed = {im["id"]: present.get(im["id"], set()) | set(im["neg_category_ids"]) for im in gt["images"]}
    res = [{k: v for k, v in r.items() if k != "bbox"} for r in cap_per_image(results) if r["category_id"] in allowed[r["image_id"]]]
    g = copy.copy(gt)
    g["annotations"] = [dict(a, iscrowd=0) for a in gt["annotations"]]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(g)
        e = COCOeval_faster(coco_gt, coco_gt.loadRes(res), "segm", lvis_style=True, print_function=_noop)
        e.params.maxDets = [300]
        e.evaluate()
        e.accumulate()
        e.summarize()
    s = e.all_stats
    base = 2 * 3 + 3 + 5
    return dict(zip(LVIS_METRICS, [s[0], s[1], s[2], s[3], s[4], s[5], s[base], s[base + 1], s[base + 2]]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=("coco", "lvis"), default="coco")
    ap.add_argument("--images", type=int, default=None, help="number of images (default 5000 = COCO val2017, 19809 = LVIS v1 val)")
    ap.add_argument("--mode", choices=("memory", "file", "both"), default="both", help="COCO case: routes from dicts or from files")
    ap.add_argument("--dets-per-image", type=int, default=300, help="LVIS case: detections per image")
    ap.add_argument("--reference-images", type=int, default=0, help="LVIS case: also run LVISEval on the first N images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the timings and metrics here (JSON)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="accepted for uniformity: COCOeval and LVISEval (every route) run on the CPU whatever the device")
    args = ap.parse_args()
    args.images = args.images or (5000 if args.case == "coco" else 19809)

    import faster_coco_eval
    import pycocotools

    report: dict = {"command": "benchmarks/bench_eval.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "out"),
        "device": "cpu (evaluation is CPU code)", "machine": {**machine(), "pycocotools": getattr(pycocotools, "__version__", "?"),
                    "faster_coco_eval": faster_coco_eval.__version__}}
    (bench_lvis if args.case == "lvis" else bench_coco)(args, report)
    write_report(args.out, report)


if __name__ == "__main__":
    main()

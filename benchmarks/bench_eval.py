"""Segmentation COCOeval speed on a COCO-val-sized synthetic case: pycocotools vs faster-coco-eval
vs maskx's ``evaluate`` (default backend), all classes, with a check that the numbers agree.

    uv run python benchmarks/bench_eval.py --images 1000 --out bench_eval.json

The full size (``--images 5000``) has about 37k ground-truth masks and 412k detections, like COCO
val2017 with a detector keeping 100 detections per image. Masks are compressed RLEs of random
ellipses (polygons) and rectangles at COCO-like image sizes; object sizes follow COCO's mix of
small / medium / large; detections are jittered copies of ground truth (mostly the right class)
plus false positives concentrated on a few classes per image. Each timing covers what a user
pays starting from dicts in memory: building the ground-truth index, loading the results,
evaluate, accumulate and summarize.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.data.splits import COCO_CATEGORIES  # noqa: E402
from pipelines.evaluation import DEFAULT_BACKEND, METRICS, evaluate  # noqa: E402

GT_PER_IMAGE = 7.3  # COCO val2017: 36,781 instances / 5,000 images
DETS_PER_IMAGE = 82  # 412k detections / 5,000 images
SIZE_MIX = ((0.41, 4, 32), (0.34, 32, 96), (0.25, 96, 400))  # (fraction, min sqrt(area), max sqrt(area))


def _shapes(rng: np.random.Generator, boxes: np.ndarray, height: int, width: int) -> list[dict]:
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


def make_case(n_images: int, seed: int = 0) -> tuple[dict, list[dict]]:
    """(COCO ground-truth dict, segm results without bbox) of ``n_images`` synthetic images."""
    rng = np.random.default_rng(seed)
    cat_ids = np.array([c for c, _ in COCO_CATEGORIES])
    images, anns, results = [], [], []
    for i in range(n_images):
        img_id = i + 1
        width, height = (640, int(rng.integers(360, 640))) if rng.random() < 0.75 else (int(rng.integers(360, 640)), 640)
        images.append({"id": img_id, "file_name": f"{img_id:012d}.jpg", "height": height, "width": width})
        n_gt = int(rng.poisson(GT_PER_IMAGE))
        gboxes = _boxes(rng, n_gt, height, width)
        gcats = rng.choice(cat_ids, size=n_gt)
        for b, cat, seg in zip(gboxes, gcats, _shapes(rng, gboxes, height, width)):
            anns.append({
                "id": len(anns) + 1, "image_id": img_id, "category_id": int(cat), "bbox": [float(v) for v in b],
                "area": float(mask_utils.area(seg)), "iscrowd": int(rng.random() < 0.01), "segmentation": seg,
            })
        # detections: ~3 jittered copies per object, the rest false positives on a few classes
        k = rng.integers(1, 5, size=n_gt)
        src = np.repeat(np.arange(n_gt), k)
        dboxes = gboxes[src] * (1 + rng.normal(0, 0.05, (src.size, 4))) if n_gt else np.zeros((0, 4))
        dcats = np.where(rng.random(src.size) < 0.85, gcats[src], rng.choice(cat_ids, size=src.size)) if n_gt else np.zeros(0, int)
        dscores = rng.beta(4, 2, src.size)
        n_fp = max(0, DETS_PER_IMAGE - src.size)
        fboxes = _boxes(rng, n_fp, height, width)
        fcats = rng.choice(rng.choice(cat_ids, size=5), size=n_fp)
        fscores = rng.beta(1.2, 6, n_fp)
        boxes = np.concatenate([dboxes, fboxes])
        boxes[:, 0] = np.clip(boxes[:, 0], 0, width - 2)
        boxes[:, 1] = np.clip(boxes[:, 1], 0, height - 2)
        boxes[:, 2] = np.clip(boxes[:, 2], 1, width - boxes[:, 0])
        boxes[:, 3] = np.clip(boxes[:, 3], 1, height - boxes[:, 1])
        cats = np.concatenate([dcats, fcats])
        scores = np.concatenate([dscores, fscores])
        for c, s, seg in zip(cats, scores, _shapes(rng, boxes, height, width)):
            results.append({"image_id": img_id, "category_id": int(c), "score": float(s), "segmentation": seg})
    categories = [{"id": c, "name": n} for c, n in COCO_CATEGORIES]
    return {"images": images, "annotations": anns, "categories": categories}, results


def _fresh(gt: dict, results: list[dict]) -> tuple[dict, list[dict]]:
    """Shallow copies: loadRes and COCOeval write fields into the dicts they are given."""
    gt2 = {"images": [dict(x) for x in gt["images"]], "annotations": [dict(x) for x in gt["annotations"]],
           "categories": [dict(x) for x in gt["categories"]]}
    return gt2, [dict(r) for r in results]


def run_pycocotools(gt: dict, results: list[dict]) -> list[float]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(results)
        e = COCOeval(coco_gt, coco_dt, "segm")
        e.evaluate()
        e.accumulate()
        e.summarize()
    return [float(v) for v in e.stats[:6]]


def run_faster(gt: dict, results: list[dict]) -> list[float]:
    from faster_coco_eval import COCO, COCOeval_faster

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(gt)
        coco_dt = coco_gt.loadRes(results)
        e = COCOeval_faster(coco_gt, coco_dt, "segm", print_function=lambda *a, **k: None)
        e.evaluate()
        e.accumulate()
        e.summarize()
    return [float(v) for v in e.stats[:6]]


def run_maskx(gt: dict, results: list[dict]) -> list[float]:
    m = evaluate(gt, results, "segm")
    return [-1.0 if m[k] is None else m[k] for k in METRICS]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=5000, help="number of images (5000 = COCO val2017 size)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the timings and metrics here (JSON)")
    args = ap.parse_args()

    t0 = time.perf_counter()
    gt, results = make_case(args.images, args.seed)
    gen_s = time.perf_counter() - t0
    print(f"case: {len(gt['images'])} images, {len(gt['annotations'])} GT masks "
          f"({sum(a['iscrowd'] for a in gt['annotations'])} crowd), {len(results)} detections; "
          f"generated in {gen_s:.1f} s", flush=True)

    runners = {"pycocotools": run_pycocotools, "faster-coco-eval": run_faster, f"maskx evaluate ({DEFAULT_BACKEND})": run_maskx}
    timings, stats = {}, {}
    for name, fn in runners.items():
        g, r = _fresh(gt, results)
        t0 = time.perf_counter()
        stats[name] = fn(g, r)
        timings[name] = time.perf_counter() - t0
        print(f"  {name}: {timings[name]:.1f} s", flush=True)
        del g, r

    ref = stats["pycocotools"]
    max_diff = max(abs(a - b) for s in stats.values() for a, b in zip(ref, s))
    same_reported = all([round(100 * a, 1) for a in s] == [round(100 * a, 1) for a in ref] for s in stats.values())
    bitwise = all(s == ref for s in stats.values())

    width = max(len(n) for n in runners)
    print()
    print(f"{'':{width}}  {'time s':>7}  " + "  ".join(f"{m:>6}" for m in METRICS))
    for name in runners:
        print(f"{name:{width}}  {timings[name]:7.1f}  " + "  ".join(f"{100 * v:6.2f}" for v in stats[name]))
    print(f"max |difference| from pycocotools: {max_diff:.3g} (bitwise identical: {bitwise}; "
          f"identical at one decimal x100: {same_reported})")

    if args.out:
        import faster_coco_eval
        import pycocotools

        report = {
            "case": {"images": len(gt["images"]), "gt_masks": len(gt["annotations"]),
                     "crowd": sum(a["iscrowd"] for a in gt["annotations"]), "detections": len(results),
                     "seed": args.seed, "generate_s": round(gen_s, 2)},
            "iou_type": "segm", "classes": "all",
            "seconds": {k: round(v, 3) for k, v in timings.items()},
            "metrics": {k: dict(zip(METRICS, v)) for k, v in stats.items()},
            "max_abs_difference": max_diff, "bitwise_identical": bitwise, "identical_reported": same_reported,
            "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
                        "pycocotools": getattr(pycocotools, "__version__", "?"),
                        "faster_coco_eval": faster_coco_eval.__version__},
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

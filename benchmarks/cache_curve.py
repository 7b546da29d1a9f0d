"""Set-B mask AP against the foreground RoIs a feature cache keeps per image copy, and against its storage type.

On the synthetic world, from ONE detector run (``--detector``, e.g. a ``maskx quickstart`` folder's
``detector/``): for each cap in ``--caps`` (foreground RoIs kept per image copy, ``cache.fg_per_image``;
``all`` = the official draw, up to round(0.25 x 512) = 128) and each storage type in ``--dtypes``
(``cache.dtype``), train transfer+MLP and class-agnostic+MLP for each stage-2 seed and each split
(voc -> nonvoc and a random 40/40), then score each run's set B (the classes it had no masks for).

The caches use Detectron's sampling (``cache.sampling=detectron``, 512 RoIs x 25% foreground, IoU >=
0.5), the sampling of the COCO recipes -- NOT the synthetic recipe's own ``instance`` sampling (GT box
+ 1 proposal per instance), so the curve is about the cap the budget sets on real data. Each cache
holds the run's set A only (``cache.classes=train``, the default) and is built with no budget
(``cache.max_gb=0``) so that the cap is exactly the one asked for. Everything else is the
``synthetic`` recipe's stage 2 (``--set`` adds overrides, e.g. ``solver.iterations=...``).

    uv run python benchmarks/cache_curve.py --detector runs/quickstart/detector --work curve \\
        --out cache_curve.json --md cache_curve.md
    # a few seconds' check of the script itself:
    uv run python benchmarks/cache_curve.py --detector RUN --work /tmp/c --caps 4 all --dtypes float16 int8 \\
        --seeds 0 --splits voc --set solver.iterations=3 --max-val-images 4

Runs already finished in ``--work`` are reused (delete the folder to start over).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_device_arg, machine, print_table, write_report  # noqa: E402

from pipelines.config import EvalConfig, MaskTrainConfig, load_config  # noqa: E402
from pipelines.stages.evaluate import evaluate_heads  # noqa: E402
from pipelines.stages.export_embeddings import export_embeddings  # noqa: E402
from pipelines.stages.mask_train import mask_train  # noqa: E402

HEADS = {"transfer+MLP": "transfer", "class-agnostic+MLP": "agnostic"}
SPLITS = {"voc": "voc→nonvoc", "random:40:0": "random 40/40"}


def cache_settings(cap: str, dtype: str) -> list[str]:
    """The cache of one point of the curve: Detectron sampling, ``cap`` foreground RoIs per image copy, ``dtype``."""
    fg = 0 if cap == "all" else int(cap)
    return ["cache.sampling=detectron", "cache.rois_per_image=512", "cache.fg_fraction=0.25", "cache.max_gb=0",
            f"cache.fg_per_image={fg}", f"cache.dtype={dtype}", "cache.classes=train"]


def train_runs(args, emb: Path) -> dict[str, dict[str, Path]]:
    """{split: {run name: run folder}}, each run trained unless it is finished in ``--work``."""
    runs: dict[str, dict[str, Path]] = {s: {} for s in args.splits}
    for split in args.splits:
        for cap in args.caps:
            for dtype in args.dtypes:
                for head, slug in HEADS.items():
                    for seed in args.seeds:
                        name = f"{head} | cap {cap} | {dtype} | seed {seed}"
                        run = args.work / f"{split.replace(':', '_')}__{slug}__cap{cap}__{dtype}__s{seed}"
                        if not (run / "mask_final.pth").is_file():
                            over = cache_settings(cap, dtype) + [f"head.head={slug}", f"data.mask_classes={split}",
                                                                 f"solver.seed={seed}", f"solver.device={args.device}", *args.set]
                            cfg = load_config(MaskTrainConfig, "synthetic", over, section="mask_train")
                            t0 = time.perf_counter()
                            r = mask_train(cfg, args.detector, emb, run)
                            print(f"{SPLITS.get(split, split)}: {name}: {r.train_rois} RoIs, trained in "
                                  f"{time.perf_counter() - t0:.0f} s", flush=True)
                        runs[split][name] = run
    return runs


def score(args, runs: dict[str, dict[str, Path]]) -> dict[str, dict[str, float]]:
    """{split: {run name: set-B mask AP x 100}}, one evaluation pass per split (its own set B)."""
    out = {}
    for split, named in runs.items():
        r = evaluate_heads(named, EvalConfig(max_images=args.max_val_images), detector=args.detector)
        out[split] = {name: round(100 * r.metrics[name]["segm"]["B"]["AP"], 2) for name in named}
    return out


def table(args, ap: dict[str, dict[str, float]]) -> tuple[list[str], list[list]]:
    """Rows: cap x storage; columns: per split and head, the mean over seeds (the seeds in brackets)."""
    cols = ["cap (fg RoIs / image copy)", "storage"] + [f"{SPLITS.get(s, s)}: {h}" for s in args.splits for h in HEADS]
    rows = []
    for cap in args.caps:
        for dtype in args.dtypes:
            row: list = [cap, dtype]
            for split in args.splits:
                for head in HEADS:
                    vals = [ap[split][f"{head} | cap {cap} | {dtype} | seed {s}"] for s in args.seeds]
                    row.append(f"{statistics.mean(vals):.1f} ({' / '.join(f'{v:.1f}' for v in vals)})")
            rows.append(row)
    return cols, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--detector", type=Path, required=True, help="a detect-train run on the synthetic world")
    ap.add_argument("--embeddings", type=Path, default=None, help="its embeddings file (default: exported into --work)")
    ap.add_argument("--work", type=Path, required=True, help="folder of the stage-2 runs (reused when finished)")
    ap.add_argument("--caps", nargs="+", default=["4", "8", "16", "32", "all"])
    ap.add_argument("--dtypes", nargs="+", default=["float16", "int8"], choices=["float16", "float32", "int8", "float8"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--splits", nargs="+", default=list(SPLITS))
    ap.add_argument("--max-val-images", type=int, default=0, help="score on the first N validation images (0: all)")
    ap.add_argument("--set", nargs="*", default=[], help="more mask_train overrides, e.g. solver.iterations=200")
    ap.add_argument("--out", type=Path, default=None, help="JSON report")
    ap.add_argument("--md", type=Path, default=None, help="the table as markdown")
    add_device_arg(ap)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    emb = args.embeddings or args.work / "embeddings.h5"
    if not emb.is_file():
        export_embeddings(args.detector, emb)
    t0 = time.perf_counter()
    runs = train_runs(args, emb)
    ap_b = score(args, runs)
    cols, rows = table(args, ap_b)
    print_table("set-B mask AP x100 against the cache's cap and storage (mean over seeds, per seed in brackets)", cols, rows)
    if args.md:
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] + ["| " + " | ".join(map(str, r)) + " |" for r in rows]
        args.md.write_text("\n".join(lines) + "\n")
    write_report(args.out, {"benchmark": "cache_curve", "machine": machine(), "detector": str(args.detector),
                            "sampling": "detectron (512 x 0.25, IoU 0.5), cache.classes=train, no budget",
                            "caps": args.caps, "dtypes": args.dtypes, "seeds": args.seeds, "splits": args.splits,
                            "overrides": args.set, "set_b_mask_ap": ap_b, "seconds": time.perf_counter() - t0})


if __name__ == "__main__":
    main()

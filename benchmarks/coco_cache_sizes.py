"""The feature cache of COCO train2017 under the budget (cache.max_gb) and without it: the size table of docs/cache.md.

Pure arithmetic (seconds, no data needed): :func:`pipelines.rois.plan.plan_cache` on per-image counts
built from COCO train2017's instance counts (docs/cache.md: all 80 classes 860,001; the 20 VOC classes
492,812; the 60 others 367,189; 117,266 images with annotations, crowd annotations included). Which
images hold a set-A instance is not counted here, so every one of the 117,266 images is taken to hold
one (an upper bound: the real cache skips the others, so it is smaller and the budget holds more per
image). With flips every image counts twice. Each image gets ``instances / images`` set-A instances
(the bound depends on the image count alone, since an image offers up to 2,000 proposals + its ground
truths, far above any cap here). The recipe's schedule: 90,000 iterations x 512 RoIs.

With ``--measure`` (or ``--rates FILE``, e.g. rates measured on a GPU by ``maskx cache plan --json``) it also
projects, with :func:`pipelines.rois.projection.project`, the build's time and one experiment's training
time (the recipe's 90k x 512 RoI visits) from the rates of the ``coco_voc_r50`` recipe's shapes measured
on this machine (R-50-FPN at 800 px, the 4-conv mask head with its one-FC MLP branch) and the streaming
reader's rate from the page cache in each storage type of the table (a rates file's one rate serves every row).

    uv run python benchmarks/coco_cache_sizes.py --out coco_cache_sizes.json
    uv run python benchmarks/coco_cache_sizes.py --measure --device cpu --out coco_cache_sizes_cpu.json
"""

from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

from _common import add_device_arg, machine, pick_device, print_table, write_report  # noqa: E402
from pipelines.config import DetectTrainConfig, MaskTrainConfig, load_config  # noqa: E402
from pipelines.io import read_json  # noqa: E402
from pipelines.rois.plan import plan_cache  # noqa: E402
from pipelines.rois.projection import Rates, hours, measure_rates, measure_stream, project  # noqa: E402
from pipelines.rois.store import layout_of  # noqa: E402

IMAGES = 117_266
SETS = {"voc→nonvoc (set A = VOC)": 492_812, "nonvoc→voc (set A = nonvoc)": 367_189, "every class (VG-3k stage 2)": 860_001}
VISITS = 90_000 * 512


def counts(instances: int, flips: bool) -> list[tuple[int, int]]:
    """Per image copy (set-A instances, all instances): ``instances`` spread over every image."""
    q, r = divmod(instances, IMAGES)
    one = [(q + (i < r), q + (i < r)) for i in range(IMAGES)]
    return one * 2 if flips else one


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--measure", action="store_true", help="measure the recipe's rates here and project the times")
    ap.add_argument("--rates", type=Path, default=None, help="rates from a JSON file instead of measuring them")
    ap.add_argument("--out", default=None, help="JSON report")
    add_device_arg(ap)
    args = ap.parse_args()
    recipe = load_config(MaskTrainConfig, "coco_voc_r50")
    cfg = recipe.cache
    settings = {f"new default: cache.max_gb=250, {cfg.dtype} (the recipe's)": replace(cfg, max_gb=250.0),
                "cache.max_gb=250, float16": replace(cfg, max_gb=250.0, dtype="float16"),
                "cache.max_gb=500, int8": replace(cfg, max_gb=500.0, dtype="int8"),
                "old default: the official draw (cache.max_gb=0), float16": replace(cfg, max_gb=0.0, dtype="float16")}
    device = pick_device(args.device)
    rates, readers = None, {}  # readers: the streaming reader's RoIs/s per storage type (it depends on the type)
    if args.rates:
        rates = Rates.from_dict(read_json(args.rates, "rates file"), args.rates)
    elif args.measure:
        with tempfile.TemporaryDirectory(dir=".", prefix=".coco_rates_") as tmp:
            rates = measure_rates(load_config(DetectTrainConfig, "coco_voc_r50").detector, recipe.head, Path(tmp), device,
                                  cfg, recipe.solver.batch_size)
            readers = {d: measure_stream(Path(tmp), 256, recipe.head.roi_size, replace(cfg, dtype=d), recipe.solver.batch_size)
                       for d in sorted({s.dtype for s in settings.values()})}
    rows, report = [], []
    for set_name, instances in SETS.items():
        c = counts(instances, flips=True)
        for name, s in settings.items():
            plan = plan_cache(c, s, layout_of(256, 14, s.dtype), proposals=2000, visits=VISITS)
            entry = {"set": set_name, "setting": name, "instances": plan.instances, "image_copies": len(c),
                     "fg_per_image": plan.cfg.fg_per_image, "rois": plan.rows, "roi_bytes": plan.roi_bytes,
                     "gb": plan.bytes / 1e9, "passes": plan.passes}
            row = [set_name, name, plan.cfg.fg_per_image, f"{plan.rows:,}", plan.roi_bytes, f"{plan.bytes / 1e9:,.0f}", f"{plan.passes:.1f}"]
            if rates:
                x = project(plan, len(c), replace(rates, stream_rois_s=readers.get(s.dtype, rates.stream_rois_s)), s.workers,
                            s.ram_budget_gb)
                entry["projection"] = x.to_dict()
                row += [f"{hours(x.build_s)} ({x.build_bottleneck})", f"{hours(x.train_s)} ({x.train_bottleneck})"]
            report.append(entry)
            rows.append(row)
    cols = ["set A", "setting", "fg RoIs / image copy", "RoIs at most", "bytes / RoI", "GB at most", "passes / RoI"]
    if rates:
        cols += [f"build ({rates.device})", f"one experiment ({rates.device})"]
    print_table("COCO train2017 feature cache (flips; every image taken to hold a set-A instance)", cols, rows)
    write_report(args.out, {"benchmark": "coco_cache_sizes", "machine": machine(device), "load_average": os.getloadavg(), "images": IMAGES,
                            "visits": VISITS, "rates": asdict(rates) if rates else None, "stream_rois_s_by_dtype": readers, "rows": report})


if __name__ == "__main__":
    main()

"""Feature-cache speed: reading a cache against the disk, and building one against the detector.

Reader (``--gb`` of COCO-shaped RoIs: 256x14x14 features stored as ``--dtype`` + 28x28 mask: 101,136 bytes a
record in float16, 51,984 in int8 or float8 with their per-channel scales; every row read is checked
against its checksum (XXH3), as training reads it):

  dd cold        ``dd`` of the row file with the page cache dropped: the disk's sequential bandwidth;
  stream cold    one epoch of :class:`StreamingRoIs` (batches of ``--batch`` RoIs, random chunk order,
                 ``--threads`` reader threads) with the page cache dropped;
  stream warm    the same epoch again, the file now in the page cache (if it fits in RAM);
  2 processes    two processes (rank 0 and 1 of 2) each streaming its own share of the epoch, cold and
                 warm: every row read once in total; rows/s of each and of both together.

The page cache is dropped with ``echo 1 > /proc/sys/vm/drop_caches`` (needs root); where that is not
permitted the file's own pages are evicted with ``posix_fadvise(DONTNEED)`` and the report says so.
Targets: stream cold >= 0.8 x dd cold; 2 processes ~ 2x one process's rows/s when the disk is not
the limit (warm).

Each stream route is also reported from the batch on which the reader's batch buffers are reused
(``steady``, from ``StreamingRoIs.first_reused_batch``): a fresh buffer costs a page fault per 4 KiB on
first touch (about 80 against 30 us of CPU per float16 RoI on the 2-core benchmark machine), paid once per
buffer of the pool (~15 batches at COCO's record size and batch of 512) in a training run but on a large
share of the batches of a short benchmark epoch. Use ``--gb 2`` or more (4 with two processes) so that the
steady part is long enough.

Build (``--build-images`` synthetic images of ``--size`` px in the real COCO format, R-50-FPN with
random weights, ``--build-batch`` images per detector batch):

  inference      the frozen detector's own inference (``model(images)``, images already decoded);
  build          ``build_cache`` end to end: decoding in ``--workers`` DataLoader workers, backbone +
                 RPN in batches, RoI sampling, RoIAlign, mask targets, writing. Target >= 0.8 x inference.

The machine's load average (``os.getloadavg``) before and after is in the report.

    uv run python benchmarks/bench_cache.py --out bench_cache.json
    uv run python benchmarks/bench_cache.py --dtype int8 --out bench_cache_int8.json
    PYTHONPATH=. python3 benchmarks/bench_cache.py --device cuda --out bench_cache_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import ROOT, add_device_arg, machine, pick_device, print_table, sync, write_report  # noqa: E402
from pipelines.config import CacheConfig, DetectorConfig  # noqa: E402
from pipelines.rois.build import build_cache  # noqa: E402
from pipelines.rois.projection import write_random_cache  # noqa: E402
from pipelines.rois.store import layout_of, open_cache  # noqa: E402
from pipelines.rois.streaming import StreamingRoIs  # noqa: E402

C, S = 256, 14  # COCO's FPN channels and RoIAlign size


DROP = {"how": "auto"}


def drop_page_cache(path: Path) -> str:
    """Empty the page cache (all of it if permitted and ``--drop auto``, else ``path``'s pages); say which was done."""
    os.sync()
    try:
        if DROP["how"] != "auto":
            raise PermissionError
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return "drop_caches"
    except OSError:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return "fadvise_dontneed"


def dd_read(path: Path) -> float:
    """Seconds ``dd`` takes to read ``path`` to /dev/null (16 MiB blocks)."""
    t0 = time.perf_counter()
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=16M"], check=True, capture_output=True)
    return time.perf_counter() - t0


def stream_epoch(cache_path: Path, batch: int, threads: int, rank: int = 0, world: int = 1) -> dict:
    """One epoch of this process's share of a streamed cache: rows, bytes read, seconds."""
    cache = open_cache(cache_path, None, threads)
    rows = np.arange(len(cache))
    src = StreamingRoIs(cache, rows, batch * world, 10**9, seed=0, rank=rank, world_size=world)
    iters = src.epoch_length(0) // batch
    src.iterations = iters
    warm = src.first_reused_batch - 1  # batches after which every batch buffer has been touched once
    t0 = time.perf_counter()
    n, done = 0, []
    for i in range(iters):
        n += src.batch(i).labels.shape[0]
        done.append(time.perf_counter())
    dt = time.perf_counter() - t0
    src.close()
    out = {"rank": rank, "world_size": world, "rows": n, "bytes_read": src.bytes_read, "seconds": dt,
           "rows_per_s": n / dt, "mb_per_s": src.bytes_read / dt / 1e6}
    if iters > warm + 1:  # the rate once the batch buffers are reused, as through a training run
        rows, secs = (iters - 1 - warm) * batch, done[-1] - done[warm]
        out["steady"] = {"from_batch": warm + 1, "rows": rows, "seconds": secs, "rows_per_s": rows / secs,
                         "mb_per_s": rows * cache.record_bytes / secs / 1e6}
    cache.close()
    return out


def stream_two(cache_path: Path, batch: int, threads: int) -> dict:
    """Two processes, each streaming its own share of one epoch, started together."""
    start = time.time() + 8.0  # both start reading at this moment (after importing torch)
    cmd = [sys.executable, str(Path(__file__)), "--shard", "", "--cache", str(cache_path), "--batch", str(batch),
           "--threads", str(threads), "--start-at", str(start)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen(cmd[:3] + [f"{r}/2"] + cmd[4:], stdout=subprocess.PIPE, text=True, env=env) for r in (0, 1)]
    res = []
    for p in procs:
        out, _ = p.communicate(timeout=3600)
        if p.returncode:
            raise SystemExit(f"error: the shard process failed (exit {p.returncode})")
        res.append(json.loads(out.strip().splitlines()[-1]))
    wall = max(r["seconds"] for r in res)
    rows = sum(r["rows"] for r in res)
    out = {"processes": res, "rows": rows, "bytes_read": sum(r["bytes_read"] for r in res), "seconds": wall,
           "rows_per_s": rows / wall, "mb_per_s": sum(r["bytes_read"] for r in res) / wall / 1e6}
    if all("steady" in r for r in res):  # both at once: the sum of each one's steady rate
        out["steady"] = {k: sum(r["steady"][k] for r in res) for k in ("rows_per_s", "mb_per_s")}
    return out


def reader(args, work: Path) -> dict:
    rec = layout_of(C, S, args.dtype).record_bytes
    rows = int(args.gb * 1e9 / rec)
    path = work / "features-bench.h5"
    t0 = time.perf_counter()
    write_random_cache(path, "bench", rows, C, S, args.dtype, block=512)
    write_s = time.perf_counter() - t0
    rows_file = path.with_suffix(".rows")
    size = rows_file.stat().st_size
    report = {"dtype": args.dtype, "rows": rows, "record_bytes": rec, "file_bytes": size, "write_seconds": write_s, "threads": args.threads,
              "batch": args.batch}
    how = drop_page_cache(rows_file)
    report["page_cache"] = how
    dd_s = dd_read(rows_file)
    report["dd_cold"] = {"seconds": dd_s, "mb_per_s": size / dd_s / 1e6}
    drop_page_cache(rows_file)
    report["stream_cold"] = stream_epoch(path, args.batch, args.threads)
    report["stream_warm"] = stream_epoch(path, args.batch, args.threads)
    dd_w = dd_read(rows_file)
    report["dd_warm"] = {"seconds": dd_w, "mb_per_s": size / dd_w / 1e6}
    drop_page_cache(rows_file)
    report["two_cold"] = stream_two(path, args.batch, args.threads)
    report["two_warm"] = stream_two(path, args.batch, args.threads)
    report["ratio_cold_to_dd"] = report["stream_cold"]["mb_per_s"] / report["dd_cold"]["mb_per_s"]
    if "steady" in report["stream_cold"]:
        report["ratio_cold_steady_to_dd"] = report["stream_cold"]["steady"]["mb_per_s"] / report["dd_cold"]["mb_per_s"]
    for k in ("two_cold", "two_warm"):
        one = report["stream_cold" if k == "two_cold" else "stream_warm"]["rows_per_s"]
        report[k]["ratio_to_one_process"] = report[k]["rows_per_s"] / one
        # every row delivered but the last partial batch of each process, and no byte read twice
        report[k]["each_row_once"] = report[k]["rows"] >= rows - 2 * args.batch and report[k]["bytes_read"] <= size
    path.unlink()
    rows_file.unlink()
    return report


def builder(args, work: Path, device: torch.device) -> dict:
    from pipelines.data.coco import CocoDataset, load_coco
    from pipelines.data.synthetic import SynthConfig, generate
    from pipelines.modeling.detector import build_detector
    from pipelines.modeling.maskx_rcnn import build_mask_roi_pool

    world = generate(SynthConfig(train_images=args.build_images, val_images=1, image_size=args.size, seed=0), work / "world")
    data, _ = load_coco(world.train_json, require_masks=True)
    dataset = CocoDataset(data, world.train_dir, with_masks=True)
    dataset.images = [im for im in dataset.images if dataset.anns_by_image.get(im["id"])]
    torch.manual_seed(0)
    det_cfg = DetectorConfig(min_size=args.size, max_size=args.size) if args.backbone == "resnet50" else DetectorConfig(
        backbone=args.backbone, fpn_channels=C, min_size=args.size, max_size=args.size)
    model = build_detector(det_cfg, len(data["categories"])).eval().requires_grad_(False).to(device)
    images = [dataset[i][0] for i in range(len(dataset))]
    b = args.build_batch

    def inference() -> float:
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            for a in range(0, len(images), b):
                model([im.to(device, non_blocking=True) for im in images[a : a + b]])
        sync(device)
        return time.perf_counter() - t0

    cfg = CacheConfig(sampling=args.sampling, dtype=args.dtype, max_gb=0.0)

    def build(k: int) -> float:
        sync(device)
        t0 = time.perf_counter()
        cache = build_cache(model, build_mask_roi_pool(S), dataset, cfg, work / f"build{k}.h5", "bench", C,
                            batch_images=b, workers=args.workers)
        sync(device)
        dt = time.perf_counter() - t0
        rows.append(len(cache))
        cache.close()
        for p in work.glob(f"build{k}.*"):
            p.unlink()
        return dt

    rows: list[int] = []
    inference()  # warm-up (allocator, cuDNN autotuning)
    times: dict[str, list[float]] = {"inference": [], "build": []}
    for k in range(args.build_rounds):  # interleaved: a change of load hits both alike
        times["inference"].append(inference())
        times["build"].append(build(k))
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    n = len(images)
    return {"images": n, "dtype": args.dtype, "record_bytes": layout_of(C, S, args.dtype).record_bytes, "size": args.size, "backbone": det_cfg.backbone, "batch_images": b, "workers": args.workers,
            "sampling": args.sampling, "rounds": args.build_rounds, "rois_per_build": rows[-1], "seconds": times,
            "inference_images_per_s": n / med["inference"], "build_images_per_s": n / med["build"],
            "ratio_build_to_inference": med["inference"] / med["build"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=4.0, help="size of the cache the reader benchmark writes and reads")
    ap.add_argument("--dir", type=Path, default=Path("."), help="where to write it (a real disk, not a RAM disk)")
    ap.add_argument("--threads", type=int, default=CacheConfig().reader_threads, help="reader threads per process")
    ap.add_argument("--batch", type=int, default=512, help="RoIs per batch (per process)")
    ap.add_argument("--build-images", type=int, default=16)
    ap.add_argument("--build-batch", type=int, default=None, help="images per detector batch (default: 8 on GPU, 2 on CPU)")
    ap.add_argument("--build-rounds", type=int, default=2)
    ap.add_argument("--size", type=int, default=512, help="image side of the build benchmark (800 = COCO)")
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--workers", type=int, default=CacheConfig().workers, help="DataLoader workers of the build")
    ap.add_argument("--sampling", default="detectron", choices=["instance", "detectron"])
    ap.add_argument("--dtype", default="float16", choices=["float16", "int8", "float8"], help="how the RoI features are stored")
    ap.add_argument("--drop", default="auto", choices=["auto", "fadvise"],
                    help="auto: drop the whole page cache when permitted (root); fadvise: evict only the file's pages")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: reader, build")
    ap.add_argument("--out", type=Path, default=None, help="JSON report")
    add_device_arg(ap)
    ap.add_argument("--shard", default="", help=argparse.SUPPRESS)  # internal: RANK/WORLD of a two-process read
    ap.add_argument("--cache", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.shard:
        rank, world = (int(x) for x in args.shard.split("/"))
        time.sleep(max(0.0, args.start_at - time.time()))
        print(json.dumps(stream_epoch(args.cache, args.batch, args.threads, rank, world)))
        return
    device = pick_device(args.device)
    DROP["how"] = args.drop
    args.build_batch = args.build_batch or (8 if device.type == "cuda" else 2)
    skip = set(filter(None, args.skip.split(",")))
    report = {"benchmark": "cache", "machine": machine(device), "uptime": _uptime(), "load_average": os.getloadavg()}
    args.dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench_cache_") as tmp:
        if "reader" not in skip:
            r = reader(args, Path(tmp))
            report["reader"] = r
            one = lambda x: [x["rows_per_s"], x["mb_per_s"]]  # noqa: E731
            dd = r["dd_cold"]["mb_per_s"]
            steady = [[f"  {name}, from batch {r[k]['steady'].get('from_batch', r['stream_cold']['steady']['from_batch'])} "
                       f"(batch buffers reused)", *one(r[k]["steady"]), r[k]["steady"]["mb_per_s"] / dd]
                      for k, name in (("stream_cold", "stream, cold, 1 process"), ("stream_warm", "stream, page cache, 1 process"),
                                      ("two_cold", "stream, cold, 2 processes"), ("two_warm", "stream, page cache, 2 processes"))
                      if "steady" in r[k] and "steady" in r["stream_cold"]]
            print_table(f"cache reader: {r['file_bytes'] / 1e9:.1f} GB, {r['rows']} RoIs of {r['record_bytes']} bytes ({args.dtype}), "
                        f"{args.threads} threads, "
                        f"page cache emptied by {r['page_cache']}",
                        ["route", "RoIs/s", "MB/s", "x dd cold"],
                        [["dd, cold", r["dd_cold"]["mb_per_s"] * 1e6 / r["record_bytes"], r["dd_cold"]["mb_per_s"], 1.0],
                         ["stream, cold, 1 process", *one(r["stream_cold"]), r["ratio_cold_to_dd"]],
                         ["stream, page cache, 1 process", *one(r["stream_warm"]), r["stream_warm"]["mb_per_s"] / r["dd_cold"]["mb_per_s"]],
                         ["dd, page cache", r["dd_warm"]["mb_per_s"] * 1e6 / r["record_bytes"], r["dd_warm"]["mb_per_s"],
                          r["dd_warm"]["mb_per_s"] / r["dd_cold"]["mb_per_s"]],
                         [f"stream, cold, 2 processes ({r['two_cold']['ratio_to_one_process']:.2f}x one)", *one(r["two_cold"]),
                          r["two_cold"]["mb_per_s"] / r["dd_cold"]["mb_per_s"]],
                         [f"stream, page cache, 2 processes ({r['two_warm']['ratio_to_one_process']:.2f}x one)",
                          *one(r["two_warm"]), r["two_warm"]["mb_per_s"] / r["dd_cold"]["mb_per_s"]], *steady])
        if "build" not in skip:
            b = builder(args, Path(tmp), device)
            report["build"] = b
            print_table(f"cache build on {device}: {b['images']} images of {b['size']} px, {b['backbone']}-FPN, "
                        f"batches of {b['batch_images']}, {b['workers']} workers, {b['sampling']} sampling",
                        ["route", "images/s", "x inference"],
                        [["frozen detector inference", b["inference_images_per_s"], 1.0],
                         ["cache build (decode + detector + RoIs + write)", b["build_images_per_s"], b["ratio_build_to_inference"]]])
    report["uptime_after"] = _uptime()
    report["load_average_after"] = os.getloadavg()
    write_report(args.out, report)


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


if __name__ == "__main__":
    main()

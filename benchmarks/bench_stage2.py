"""Stage-2 training throughput in mask RoIs per second, four ways, on the same machine in one run:

  limit     the mask side's own forward + backward + SGD step on RoI tensors already in memory;
  cache     the same, batches read from a feature cache (row file, float16): in memory, and streamed
            from disk by the parallel reader (the file is fresh, so mostly from the page cache; the
            cold-disk speed is bench_cache.py's);
  detector  the same head trained through the frozen detector (backbone + RPN + RoIAlign each step);
  full      a whole torchvision Mask R-CNN training step, per mask RoI it trains on.

Settings: ``quick`` = the synthetic recipe (ResNet-18 + FPN 64 channels, 128-px images, 4-conv
mask head of 64 channels, 64 RoIs a step); ``coco`` = R-50-FPN (256 channels), batch 2 images of
``--size`` px (800 with ``--full``), the 4-conv 256-channel head + MLP branch, 16 objects per
image (the RoI sampler then gives ~30-60 positives per image). Weights are random: throughput
does not depend on them. Ratios are each route's RoIs/s over the limit's.

    uv run python benchmarks/bench_stage2.py --out bench_stage2.json
    uv run python benchmarks/bench_stage2.py --full --out bench_stage2_full.json
    PYTHONPATH=. python3 benchmarks/bench_stage2.py --device cuda --out bench_stage2_gpu.json
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

from _common import add_device_arg, interleaved, machine, pick_device, print_table, timed, write_report  # noqa: E402  (puts the repo on sys.path)
from pipelines.config import CacheConfig, DetectorConfig, HeadConfig  # noqa: E402
from pipelines.rois.extract import extract_rois  # noqa: E402
from pipelines.rois.sources import InMemoryRoIs  # noqa: E402
from pipelines.rois.store import CacheWriter, open_cache  # noqa: E402
from pipelines.rois.streaming import StreamingRoIs  # noqa: E402
from pipelines.modeling.detector import build_backbone, build_detector  # noqa: E402
from pipelines.modeling.maskx_rcnn import build_mask_roi_pool, build_mask_side, mask_loss  # noqa: E402

SETTINGS = {
    "quick": dict(det=DetectorConfig(backbone="resnet18", fpn_channels=64, box_representation=256, norm="bn", min_size=128,
                                     max_size=128, anchor_sizes=[16, 32, 64, 128, 256], rpn_post_nms_top_n_train=300,
                                     box_batch_size_per_image=64),
                  head=HeadConfig(mask_dim=64, num_convs=4, mlp_layers=2, mlp_hidden=256, mlp_input_size=14, normalize_input=True,
                                  input_dropout=0.5),
                  size=128, images=8, objects=8, rois=64),
    "coco": dict(det=DetectorConfig(), head=HeadConfig(), size=512, images=2, objects=16, rois=64),
}
K = 80


def random_targets(n_images: int, objects: int, size: int, g: torch.Generator, with_masks: bool = True):
    """Images float32[3, size, size] and targets with ``objects`` random boxes and box-filling masks."""
    images, targets = [], []
    for _ in range(n_images):
        xy = torch.rand(objects, 2, generator=g) * size * 0.7
        wh = 8 + torch.rand(objects, 2, generator=g) * size * 0.3
        boxes = torch.cat([xy, (xy + wh).clamp(max=size - 1)], 1)
        masks = torch.zeros(objects, size, size, dtype=torch.uint8)
        for i, (x1, y1, x2, y2) in enumerate(boxes.round().long().tolist()):
            masks[i, y1:y2, x1:x2] = 1
        t = {"boxes": boxes, "labels": torch.randint(1, K + 1, (objects,), generator=g), "masks": masks,
             "has_mask": torch.ones(objects, dtype=torch.bool)}
        images.append(torch.rand(3, size, size, generator=g))
        targets.append(t if with_masks else {k: v for k, v in t.items() if k != "masks"})
    return images, targets


def write_cache(path: Path, n: int, channels: int, s: int, g: torch.Generator, block: int = 1024) -> None:
    """A cache of ``n`` random RoIs in the layout build_cache writes (float16 row file + HDF5 description)."""
    with CacheWriter(path, "bench", channels, s, "float16") as w:
        for a in range(0, n, block):
            b = min(n, a + block)
            w.append(torch.randn(b - a, channels, s, s, generator=g).relu().half(),
                     (torch.rand(b - a, 2 * s, 2 * s, generator=g) > 0.5).to(torch.uint8), torch.randint(1, K + 1, (b - a,), generator=g))
        w.attrs.update({"instances": n})


def through_detector(det_cfg: DetectorConfig, s: int, images: list[torch.Tensor], targets: list[dict], rois: int, steps: int,
                     train_on, device: torch.device) -> tuple[int, float]:
    """(mask RoIs a step, seconds a step) of the head trained through a frozen detector built here (freed on return)."""
    detector = build_detector(det_cfg, K).eval().requires_grad_(False).to(device)
    roi_pool = build_mask_roi_pool(s)
    ccfg = CacheConfig(proposals_per_instance=max(0, rois // (len(images) * len(targets[0]["boxes"])) - 1))
    dg = torch.Generator().manual_seed(0)
    got = {}

    def through() -> None:
        r = extract_rois(detector, roi_pool, images, targets, ccfg, dg)
        got["n"] = len(r.labels)
        train_on(r.features, r.labels, r.masks)

    t = timed(through, steps, device=device)
    return got["n"], t


def bench(name: str, st: dict, steps: int, cache_rois: int, tmp: Path, device: torch.device) -> dict:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    det_cfg, head, b = st["det"], st["head"], st["rois"]
    c, s = det_cfg.fpn_channels, head.roi_size
    side = build_mask_side(head, K, c, torch.randn(K, 5 * det_cfg.box_representation)).to(device)
    side.train()
    opt = torch.optim.SGD(side.parameters(), lr=1e-3, momentum=0.9)

    def train_on(features: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor) -> None:
        features, labels, masks = features.to(device, torch.float32), labels.to(device), masks.to(device)
        loss = mask_loss(side(features, labels), masks)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    rows = {}
    # (i) the limit, (ii) from the cache in memory and streamed: interleaved step by step
    feats = torch.randn(b, c, s, s, generator=g).relu().to(device)
    labels = torch.randint(1, K + 1, (b,), generator=g).to(device)
    masks = (torch.rand(b, 2 * s, 2 * s, generator=g) > 0.5).to(torch.uint8).to(device)
    path = tmp / f"cache_{name}.h5"
    write_cache(path, cache_rois, c, s, g)
    cache = open_cache(path, "bench")
    all_rows = np.arange(len(cache))
    iters = steps + 1
    mem = InMemoryRoIs(cache, all_rows, b, iters, seed=0)
    stream = StreamingRoIs(cache, all_rows, b, iters, seed=0, window=CacheConfig().shuffle_window)
    its = {"mem": iter(range(iters)), "stream": iter(range(iters))}

    def from_source(src, key):
        x = src.batch(next(its[key]))
        train_on(x.features, x.labels, x.masks)

    t = interleaved({"limit": lambda: train_on(feats, labels, masks), "mem": lambda: from_source(mem, "mem"),
                     "stream": lambda: from_source(stream, "stream")}, steps, device=device)
    stream.close()
    cache.close()
    rows["limit: head fwd+bwd, tensors in memory"] = (b, t["limit"])
    rows["cache, in memory (fp16)"] = (b, t["mem"])
    rows["cache, streamed from disk (fp16)"] = (b, t["stream"])

    # (iii) through the frozen detector
    images, targets = random_targets(st["images"], st["objects"], st["size"], g)
    images = [im.to(device) for im in images]
    rows["through the frozen detector"] = through_detector(det_cfg, s, images, targets, b, max(2, steps // 4), train_on, device)

    # (iv) a full torchvision Mask R-CNN training step
    if name == "coco":
        model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=K + 1, min_size=st["size"], max_size=st["size"])
    else:
        d = head.mask_dim
        model = MaskRCNN(build_backbone(det_cfg), num_classes=None, min_size=st["size"], max_size=st["size"],
                         rpn_anchor_generator=build_detector(det_cfg, K).rpn.anchor_generator,
                         box_head=TwoMLPHead(c * 49, det_cfg.box_representation),
                         box_predictor=FastRCNNPredictor(det_cfg.box_representation, K + 1),
                         mask_head=MaskRCNNHeads(c, [d] * head.num_convs, 1), mask_predictor=MaskRCNNPredictor(d, d, K + 1),
                         rpn_post_nms_top_n_train=det_cfg.rpn_post_nms_top_n_train,
                         box_batch_size_per_image=det_cfg.box_batch_size_per_image)
    model.train().to(device)
    counts = []
    model.roi_heads.mask_roi_pool.register_forward_hook(lambda mod, inp, out: counts.append(out.shape[0]))
    full_targets = [{k: v.to(device) for k, v in t_.items() if k != "has_mask"} for t_ in targets]
    fopt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def full_step() -> None:
        loss = sum(model(images, full_targets).values())
        fopt.zero_grad(set_to_none=True)
        loss.backward()
        fopt.step()

    t = timed(full_step, max(2, steps // 4), device=device)
    rows["full torchvision Mask R-CNN step"] = (int(np.median(counts)), t)

    limit = rows["limit: head fwd+bwd, tensors in memory"][0] / rows["limit: head fwd+bwd, tensors in memory"][1]
    out = []
    for k, (n, sec) in rows.items():
        rate = n / sec
        out.append({"route": k, "rois_per_step": n, "seconds_per_step": sec, "rois_per_s": rate, "ratio_to_limit": rate / limit,
                    "cost_per_roi_x_limit": limit / rate})
    return {"setting": name, "device": str(device), "channels": c, "roi_size": s, "mask_dim": head.mask_dim, "num_convs": head.num_convs,
            "mlp": head.mlp, "image_size": st["size"], "images_per_step": st["images"], "objects_per_image": st["objects"],
            "backbone": det_cfg.backbone, "cache_rois": cache_rois, "results": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", default="quick,coco", help="comma list of: quick, coco")
    ap.add_argument("--full", action="store_true", help="COCO-like at 800 px, more steps, a larger cache")
    ap.add_argument("--size", type=int, default=None, help="image side of the coco setting (default 512; 800 with --full)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps of the head routes (default 8; 20 with --full)")
    ap.add_argument("--cache-rois", type=int, default=None, help="RoIs in the benchmark cache (default 2048; 8192 with --full)")
    ap.add_argument("--images", type=int, default=None, help="images per step through the detector (default: the setting's)")
    ap.add_argument("--rois", type=int, default=None, help="mask RoIs per step of the head routes (default 64)")
    ap.add_argument("--out", type=Path, default=None, help="JSON report")
    add_device_arg(ap)
    args = ap.parse_args()
    device = pick_device(args.device)
    steps = args.steps or (20 if args.full else 8)
    cache_rois = args.cache_rois or (8192 if args.full else 2048)
    SETTINGS["coco"]["size"] = args.size or (800 if args.full else 512)
    for st in SETTINGS.values():
        st["images"] = args.images or st["images"]
        st["rois"] = args.rois or st["rois"]
    report = {"benchmark": "stage2", "machine": machine(device), "steps": steps, "settings": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.settings.split(","):
            r = bench(name, SETTINGS[name], steps, cache_rois, Path(tmp), device)
            report["settings"].append(r)
            print_table(f"stage-2 throughput on {device}, {name}: {r['backbone']} FPN {r['channels']} ch, {r['image_size']} px, "
                        f"head {r['num_convs']}x{r['mask_dim']} +mlp",
                        ["route", "RoIs/step", "s/step", "RoIs/s", "x limit speed", "cost/RoI vs limit"],
                        [[x["route"], x["rois_per_step"], x["seconds_per_step"], x["rois_per_s"], x["ratio_to_limit"],
                          x["cost_per_roi_x_limit"]] for x in r["results"]])
    report["machine_after"] = machine()["load_average_1m"]
    write_report(args.out, report)


if __name__ == "__main__":
    main()

"""Class-count scaling: mask inference at 3000 classes against 80, and where whole-model time goes.

1. Mask inference (the transfer head + MLP branch, eval mode, ``--rois`` detections): median time
   and peak bytes of live tensors (a dispatch-level count, the CPU stand-in for CUDA's peak
   allocation) at K = 80 and K = 3000. Target: at most 1.2x.
2. Whole Mask^X R-CNN inference (R-50-FPN, ``--size`` px) at K = 80 and 3000, broken down into
   backbone, RPN, box head (RoIAlign + 2 FC), box predictor + per-class post-processing, mask side.
   Weights are random; classifier weights are sharpened (x20) so each proposal has one likely
   class, like a trained detector, and ``score_thresh`` stays at 0.05.

    uv run python benchmarks/bench_classes.py --out bench_classes.json
    PYTHONPATH=. python3 benchmarks/bench_classes.py --device cuda --out bench_classes_gpu.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from _common import PeakTensorMemory, add_device_arg, interleaved, machine, pick_device, print_table, sync, write_report  # noqa: E402
from pipelines.config import DetectorConfig, HeadConfig  # noqa: E402
from pipelines.modeling.detector import build_detector  # noqa: E402
from pipelines.modeling.maskx_rcnn import build_mask_side, build_maskx_rcnn  # noqa: E402

E = 5 * 1024  # w_det = [w_cls, w_box] of a 1024-d box head


def mask_inference(ks: list[int], rois: int, rounds: int, device: torch.device, mlp_hidden: int = 1024) -> list[list]:
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(rois, 256, 14, 14, generator=g).relu().to(device)
    sides, fns, peaks = {}, {}, {}
    for k in ks:
        torch.manual_seed(0)
        side = build_mask_side(HeadConfig(mlp_hidden=mlp_hidden), k, 256, torch.randn(k, E)).eval().to(device)
        labels = torch.randint(1, k + 1, (rois,), generator=g).to(device)
        with torch.no_grad():
            side(feats[:1], labels[:1])  # T once on the table (cached for every later forward)
            with PeakTensorMemory() as mem:
                out = side(feats, labels)
        assert out.shape == (rois, 28, 28)
        peaks[k] = mem.peak
        sides[k] = side
        fns[str(k)] = (lambda s=side, lab=labels: s(feats, lab))
    with torch.no_grad():
        t = interleaved(fns, rounds, device=device)
    base = ks[0]
    return [[k, rois, t[str(k)], t[str(k)] / t[str(base)], peaks[k] / 2**20, peaks[k] / peaks[base]] for k in ks]


class Timer:
    """Accumulates wall time of wrapped callables under names (the device synchronised around each)."""

    def __init__(self, device: torch.device):
        self.t: dict[str, float] = {}
        self.device = device

    def wrap(self, name: str, fn):
        def run(*a, **kw):
            sync(self.device)
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                sync(self.device)
                self.t[name] = self.t.get(name, 0.0) + time.perf_counter() - t0
        return run


def whole_model(k: int, size: int, rounds: int, image: list[torch.Tensor], device: torch.device) -> dict:
    torch.manual_seed(0)
    det = build_detector(DetectorConfig(min_size=size, max_size=size), k)
    with torch.no_grad():
        det.roi_heads.box_predictor.cls_score.weight.mul_(20)
    w_det = torch.randn(k, E)
    model = build_maskx_rcnn(det, build_mask_side(HeadConfig(), k, 256, w_det), 14).eval().to(device)
    rh = model.roi_heads
    timer = Timer(device)
    model.backbone.forward = timer.wrap("backbone", model.backbone.forward)
    model.rpn.forward = timer.wrap("RPN", model.rpn.forward)
    rh.box_roi_pool.forward = timer.wrap("box head", rh.box_roi_pool.forward)
    rh.box_head.forward = timer.wrap("box head", rh.box_head.forward)
    rh.box_predictor.forward = timer.wrap("box predictor + post-processing", rh.box_predictor.forward)
    rh.postprocess_detections = timer.wrap("box predictor + post-processing", rh.postprocess_detections)
    rh.mask_roi_pool.forward = timer.wrap("mask side", rh.mask_roi_pool.forward)
    rh.mask_head.forward = timer.wrap("mask side", rh.mask_head.forward)
    rh.mask_predictor.forward = timer.wrap("mask side", rh.mask_predictor.forward)
    with torch.no_grad():
        dets = len(model(image)[0]["boxes"])  # warm-up (and T once on the class table)
        timer.t.clear()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(rounds):
            model(image)
        sync(device)
        total = (time.perf_counter() - t0) / rounds
    parts = {name: v / rounds for name, v in timer.t.items()}
    parts["other (transform, paste masks)"] = total - sum(parts.values())
    return {"classes": k, "detections": dets, "seconds": total, "parts": parts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rois", type=int, default=100, help="detections for the mask-inference comparison")
    ap.add_argument("--size", type=int, default=512, help="image side of the whole-model run (800 with --full)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--full", action="store_true", help="800-px whole-model runs")
    ap.add_argument("--skip-model", action="store_true", help="only the mask-inference comparison")
    ap.add_argument("--mlp-hidden", type=int, default=1024, help="hidden units of the MLP branch (1024: the paper's)")
    ap.add_argument("--out", type=Path, default=None, help="JSON report")
    add_device_arg(ap)
    args = ap.parse_args()
    device = pick_device(args.device)
    size = 800 if args.full else args.size
    rows = mask_inference([80, 3000], args.rois, args.rounds, device, args.mlp_hidden)
    print_table(f"mask inference on {device} (transfer head + MLP, eval), K classes",
                ["K", "RoIs", "s", "x K=80", "peak MiB", "x K=80"], rows)
    report = {"benchmark": "classes", "machine": machine(device), "rounds": args.rounds,
              "mask_inference": [dict(zip(["classes", "rois", "seconds", "time_ratio", "peak_mib", "peak_ratio"], r)) for r in rows]}
    if not args.skip_model:
        image = [torch.rand(3, size, size, generator=torch.Generator().manual_seed(0)).to(device)]
        runs = [whole_model(k, size, max(1, args.rounds // 2), image, device) for k in (80, 3000)]
        names = list(runs[1]["parts"])
        print_table(f"whole Mask^X R-CNN inference, R-50-FPN, {size} px: seconds per image",
                    ["part"] + [f"K={r['classes']}" for r in runs] + ["x K=80"],
                    [[n] + [r["parts"].get(n, 0.0) for r in runs] + [runs[1]["parts"].get(n, 0.0) / max(runs[0]["parts"].get(n, 0.0), 1e-9)]
                     for n in names]
                    + [["total"] + [r["seconds"] for r in runs] + [runs[1]["seconds"] / runs[0]["seconds"]],
                       ["detections"] + [r["detections"] for r in runs] + [""]])
        report["whole_model"] = {"size": size, "runs": runs}
    write_report(args.out, report)


if __name__ == "__main__":
    main()

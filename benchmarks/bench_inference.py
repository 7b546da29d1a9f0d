"""Per-image inference latency: maskx's Mask^X R-CNN against torchvision's ``maskrcnn_resnet50_fpn``.

Same layout on both sides: R-50-FPN, 81 classes (80 + background), ``--size`` px images (800),
the same 4-conv 256-channel mask head. maskx's model is its Faster R-CNN (modeling/detector.py)
with the transfer head (``MaskXRoIHeads``, T applied once to the class table, one 28x28 map per
detection); torchvision's predicts 81 maps per detection and keeps one. maskx's detector and mask
head are loaded with torchvision's (random) weights, so both produce the same detections; class
scores are sharpened (classifier weights x20) and ``score_thresh = 0`` so each image keeps 100
detections, as a trained detector would. Runs alternate between the two models; medians reported.

    uv run python benchmarks/bench_inference.py --out bench_inference.json
    PYTHONPATH=. python3 benchmarks/bench_inference.py --device cuda --out bench_inference_gpu.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torchvision.models.detection import maskrcnn_resnet50_fpn

from _common import add_device_arg, interleaved, machine, pick_device, print_table, sync, write_report  # noqa: E402  (puts the repo on sys.path)
from pipelines.config import DetectorConfig, HeadConfig  # noqa: E402
from pipelines.modeling.detector import build_detector  # noqa: E402
from pipelines.modeling.mask_heads import MaskSide  # noqa: E402
from pipelines.modeling.maskx_rcnn import build_mask_side, build_maskx_rcnn  # noqa: E402

K = 80


def build_pair(size: int, mlp: bool, proposals: int = 1000, detections: int = 100):
    torch.manual_seed(0)
    tv = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=K + 1, min_size=size, max_size=size,
                               rpn_pre_nms_top_n_test=proposals, rpn_post_nms_top_n_test=proposals, box_detections_per_img=detections)
    with torch.no_grad():
        tv.roi_heads.box_predictor.cls_score.weight.mul_(20)
    tv.roi_heads.score_thresh = 0.0
    det = build_detector(DetectorConfig(min_size=size, max_size=size, box_score_thresh=0.0, rpn_pre_nms_top_n_test=proposals,
                                        rpn_post_nms_top_n_test=proposals, box_detections_per_img=detections), K)
    missing, unexpected = det.load_state_dict(tv.state_dict(), strict=False)
    assert not missing and all(k.startswith("roi_heads.mask_") for k in unexpected), (missing, unexpected)
    w_det = torch.cat([det.roi_heads.box_predictor.cls_score.weight[1:],
                       det.roi_heads.box_predictor.bbox_pred.weight.view(K + 1, -1)[1:]], 1).detach()
    side = build_mask_side(HeadConfig(mlp=mlp), K, 256, w_det)
    side.fcn.convs.load_state_dict(tv.roi_heads.mask_head.state_dict())
    side.fcn.upsample.load_state_dict(tv.roi_heads.mask_predictor.conv5_mask.state_dict())
    mx = build_maskx_rcnn(det, side, 14)
    return tv.eval(), mx.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=800, help="image side in pixels")
    ap.add_argument("--rounds", type=int, default=3, help="timed runs per model (alternating)")
    ap.add_argument("--full", action="store_true", help="7 rounds")
    ap.add_argument("--proposals", type=int, default=1000, help="RPN proposals per image (1000: Detectron's test setting)")
    ap.add_argument("--detections", type=int, default=100, help="detections kept per image (and RoIs of the mask-side timing)")
    ap.add_argument("--out", type=Path, default=None, help="JSON report")
    add_device_arg(ap)
    args = ap.parse_args()
    device = pick_device(args.device)
    rounds = 7 if args.full else args.rounds
    image = [torch.rand(3, args.size, args.size, generator=torch.Generator().manual_seed(0)).to(device)]
    tv, mx = build_pair(args.size, False, args.proposals, args.detections)
    _, mx_mlp = build_pair(args.size, True, args.proposals, args.detections)
    tv, mx, mx_mlp = tv.to(device), mx.to(device), mx_mlp.to(device)
    heads: dict[str, list[float]] = {}
    for name, m in (("torchvision", tv), ("maskx", mx), ("maskx+mlp", mx_mlp)):
        m.roi_heads.forward = _timed(m.roi_heads.forward, heads.setdefault(name, []), device)
    with torch.no_grad():
        dets = [len(m(image)[0]["boxes"]) for m in (tv, mx, mx_mlp)]
        same = torch.equal(tv(image)[0]["boxes"], mx(image)[0]["boxes"])
        # the mask side alone, on the same 100 detections' RoI features
        d = args.detections
        feats = torch.randn(d, 256, 14, 14).relu().to(device)
        labels = torch.randint(1, K + 1, (d,)).to(device)
        mx_side, mx_mlp_side = (MaskSide(m.roi_heads.mask_head, m.roi_heads.mask_predictor) for m in (mx, mx_mlp))
        tv_mask = lambda: tv.roi_heads.mask_predictor(tv.roi_heads.mask_head(feats))[torch.arange(d), labels]  # noqa: E731
        t = interleaved({"torchvision": lambda: tv(image), "maskx": lambda: mx(image), "maskx+mlp": lambda: mx_mlp(image),
                         "tv_mask": tv_mask, "mx_mask": lambda: mx_side(feats, labels),
                         "mx_mlp_mask": lambda: mx_mlp_side(feats, labels)}, rounds, device=device)
    h = {k: sorted(v[-rounds:])[rounds // 2] for k, v in heads.items()}  # RoI heads (box + mask side) of the timed runs
    rows = [
        ["torchvision maskrcnn_resnet50_fpn", dets[0], t["torchvision"], 1.0, h["torchvision"], 1.0, t["tv_mask"], 1.0],
        ["maskx Mask^X R-CNN (transfer)", dets[1], t["maskx"], t["maskx"] / t["torchvision"], h["maskx"], h["maskx"] / h["torchvision"],
         t["mx_mask"], t["mx_mask"] / t["tv_mask"]],
        ["maskx Mask^X R-CNN (transfer+MLP)", dets[2], t["maskx+mlp"], t["maskx+mlp"] / t["torchvision"], h["maskx+mlp"],
         h["maskx+mlp"] / h["torchvision"], t["mx_mlp_mask"], t["mx_mlp_mask"] / t["tv_mask"]],
    ]
    print_table(f"inference per image on {device}, R-50-FPN, {K + 1} classes, {args.size} px (same detections: {same})",
                ["model", "detections", "s/image", "x tv", "RoI heads s", "x tv", f"mask side s ({args.detections} RoIs)", "x tv"], rows)
    write_report(args.out, {"benchmark": "inference", "machine": machine(device), "size": args.size, "rounds": rounds,
                            "proposals": args.proposals, "detections": args.detections,
                            "same_boxes": same,
                            "rows": [dict(zip(["model", "detections", "seconds", "ratio", "roi_heads_seconds", "roi_heads_ratio",
                                               "mask_seconds", "mask_ratio"], r)) for r in rows]})


def _timed(fn, sink: list[float], device: torch.device):
    def run(*a, **kw):
        sync(device)
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        sync(device)
        sink.append(time.perf_counter() - t0)
        return out
    return run


if __name__ == "__main__":
    main()

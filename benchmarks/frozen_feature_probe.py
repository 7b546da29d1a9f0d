"""How far could any transfer function go on set B with a given mask head's features?

    uv run python benchmarks/frozen_feature_probe.py --detector QS/detector --embeddings QS/embeddings.h5 \
        --from QS/heads/transfer-mlp_voc_s0 --work probe_runs --out probe.json

Takes a finished set-A-only mask run (``--from``, any head with the MLP branch), freezes its FCN and
MLP branch, and fits free per-class mask weights and biases (the oracle predictor) on the masks
of *every* class on top of them, with the recipe's stage-2 solver. The set-B mask AP of that probe
is what perfect set-B mask weights reach on features learned from set A alone: an upper bound for
T on those features. Compare it with the full oracle (whose FCN is also trained on set B) and with
the run itself. About 10 s of training and 30 s of evaluation on a 2-core CPU for the synthetic world.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_device_arg, machine, print_table, write_report  # noqa: E402

from pipelines.config import EvalConfig, MaskTrainConfig, load_config  # noqa: E402
from pipelines.checkpoint import load_checkpoint  # noqa: E402
from pipelines.engine.loop import seed_everything  # noqa: E402
from pipelines.engine.run_dir import load_detector_run  # noqa: E402
from pipelines.errors import MaskxError  # noqa: E402
from pipelines.io import read_yaml  # noqa: E402
from pipelines.modeling.mask_heads import MaskSide  # noqa: E402
from pipelines.modeling.maskx_rcnn import build_mask_side  # noqa: E402
from pipelines.stages.evaluate import evaluate_heads  # noqa: E402
from pipelines.stages.mask_train import mask_train  # noqa: E402

FROZEN = ("fcn.", "predictor.mlp.")


def frozen_side(cfg: MaskTrainConfig, num_classes: int, in_channels: int, state: dict[str, torch.Tensor]) -> MaskSide:
    """The mask side of ``cfg.head`` (built on ``cfg.solver.seed``) with ``state``'s FCN and MLP-branch
    tensors loaded and frozen."""
    seed_everything(cfg.solver.seed)
    side = build_mask_side(cfg.head, num_classes, in_channels)
    keep = {k: v for k, v in state.items() if k.startswith(FROZEN)}
    own = side.state_dict()
    bad = [k for k in keep if k not in own or own[k].shape != keep[k].shape]
    if not keep:
        raise MaskxError("the source checkpoint holds no FCN / MLP-branch tensors")
    if bad:
        raise MaskxError(f"the source run's FCN / MLP branch does not fit this head ({bad[0]})")
    side.load_state_dict(keep, strict=False)
    for name, p in side.named_parameters():
        if name in keep:
            p.requires_grad_(False)
    return side


def train_probe(source: Path, detector: Path, embeddings: Path, work: Path, seed: int = 0,
                extra: list[str] | None = None) -> Path:
    """Train (or find) the probe run for ``source``: the oracle predictor on its frozen FCN and MLP
    branch, stage-2 solver of the ``synthetic`` recipe (+ ``extra`` overrides). Returns the run folder."""
    saved = read_yaml(source / "config.yaml", "run config") or {}
    head, data = saved.get("head", {}), saved.get("data", {})
    if not head.get("mlp"):
        raise MaskxError("the probe needs a run with the MLP branch", source)
    if data.get("mask_classes") != "voc":
        raise MaskxError("the probe reports voc -> nonvoc; the run must be trained with data.mask_classes=voc", source)
    same = {"data": {k: data[k] for k in ("train_json", "train_images", "val_json", "val_images", "mask_classes")},
            "head": {k: head[k] for k in ("mask_dim", "num_convs", "fcn", "mlp_hidden", "mlp_input_size", "roi_size")}}
    same["head"]["mlp_layers"] = head.get("mlp_layers", 2)  # runs saved before the key had the 2-layer branch
    cfg = load_config(MaskTrainConfig, "synthetic", [same, {"head": {"head": "oracle", "mlp": True}, "solver": {"seed": seed}},
                                                     *(extra or [])])
    run = work / f"probe_{source.name}_s{seed}"
    if not (run / "mask_final.pth").is_file():
        det = load_detector_run(detector)
        side = frozen_side(cfg, len(det.categories), det.model.backbone.out_channels,
                           load_checkpoint(source / "mask_final.pth", "mask")["model"])
        mask_train(cfg, detector, embeddings, run, mask_side=side)
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--detector", type=Path, required=True)
    p.add_argument("--embeddings", type=Path, required=True)
    p.add_argument("--from", dest="source", type=Path, required=True, help="finished mask run whose features are probed")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    add_device_arg(p)
    args = p.parse_args()

    try:
        run = train_probe(args.source, args.detector, args.embeddings, args.work, args.seed, [f"solver.device={args.device}"])
    except MaskxError as e:
        raise SystemExit(f"error: {e}") from None
    runs = {"source run": args.source, "oracle weights on its frozen features": run}
    r = evaluate_heads(runs, EvalConfig(split="nonvoc"), detector=args.detector)
    scores = {k: {s: round(100 * r.metrics[k]["segm"][s]["AP"], 1) for s in ("B", "A")} for k in runs}
    print_table(f"mask AP x100 (voc -> nonvoc), features of {args.source}", ["", "B", "A"],
                [[k, v["B"], v["A"]] for k, v in scores.items()])
    write_report(args.out, {"machine": machine(), "source": str(args.source), "probe_run": str(run), "heads": scores})


if __name__ == "__main__":
    main()

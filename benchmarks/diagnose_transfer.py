"""Why does transfer not beat class-agnostic on set B? Diagnostics on a finished synthetic run.

    uv run python benchmarks/diagnose_transfer.py --detector QS/detector --embeddings QS/embeddings.h5 \
        --work diag_runs --seeds 0 1 --out diagnose.json

``QS`` is a ``maskx quickstart`` folder (or any detect-train run on the built-in synthetic world
with its exported embeddings). Four questions, voc -> nonvoc:

1. **Does ``w_det`` encode the world's factors so that they carry from A to B?** A ridge map
   fitted on set A's rows of ``w_cls`` (L2-normalised) to one-hot colour and texture predicts the
   factors of set B's classes; accuracy (chance 0.10 colour, 0.125 texture). Same for ``w_box``.
2. **Could T transfer with a perfect class description?** Heads trained with the ``factor``
   embedding — ``w_cls`` replaced by one-hot colour + texture, i.e. exactly what a B class
   shares with A — against ``w_cls`` and the class-agnostic head.
3. **Where is the gain lost?** Every head is scored twice with maskx's evaluation: through the
   detector's detections (the product's number) and on ground-truth boxes (``--gt-boxes``).
4. **Is T's output as large on set B as on set A?** Mean ``|w_seg|`` over B classes / over A.

Heads: class-agnostic+MLP, transfer+MLP (input ``cls``), transfer+MLP (``factor``), each with the
recipe's 4-conv mask FCN and with a 1-conv one, stage 2 otherwise as the ``synthetic`` recipe.
About 30 s per stage-2 run and 40 s per evaluation pass on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_device_arg, machine, print_table, write_report  # noqa: E402

from pipelines.config import EvalConfig, MaskTrainConfig, load_config  # noqa: E402
from pipelines.io import read_json, read_yaml  # noqa: E402
from pipelines.engine.run_dir import load_detector_run  # noqa: E402
from pipelines.stages.evaluate import evaluate_heads  # noqa: E402
from pipelines.stages.mask_train import mask_train  # noqa: E402


def factor_table(categories: list[dict]) -> np.ndarray:
    """One-hot colour and texture of each class, ``float32[K, n_colours + n_textures]``."""
    colours = sorted({c["look"]["color_name"] for c in categories})
    textures = sorted({c["look"]["texture"] for c in categories})
    f = np.zeros((len(categories), len(colours) + len(textures)), np.float32)
    for i, c in enumerate(categories):
        f[i, colours.index(c["look"]["color_name"])] = 1.0
        f[i, len(colours) + textures.index(c["look"]["texture"])] = 1.0
    return f, len(colours)


def readout(w: np.ndarray, factors: np.ndarray, n_colours: int, set_a: np.ndarray, lam: float = 1e-2) -> dict:
    """Ridge map from set A's rows of ``w`` [K, D] to their factors; factor accuracy on set B."""
    x = w / np.linalg.norm(w, axis=1, keepdims=True)
    a, y = x[set_a], factors[set_a]
    m = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ y)
    p, t = x[~set_a] @ m, factors[~set_a]
    return {"colour_accuracy_on_B": float((p[:, :n_colours].argmax(1) == t[:, :n_colours].argmax(1)).mean()),
            "texture_accuracy_on_B": float((p[:, n_colours:].argmax(1) == t[:, n_colours:].argmax(1)).mean())}


def w_seg_norm_ratio(run: Path, det) -> float:
    """Mean norm of ``w_seg = T(w_det)`` over set-B classes divided by the mean over set A (eval
    mode); ``det`` is the loaded detector run the mask run was trained on."""
    import torch

    from pipelines.engine.run_dir import load_mask_run

    mask_run = load_mask_run(run, det)
    predictor = mask_run.side.predictor
    with torch.no_grad():
        norms = predictor.transfer(predictor.w_det).norm(dim=1)
    in_a = torch.tensor([c["id"] in set(mask_run.set_a) for c in mask_run.categories])
    return float(norms[~in_a].mean() / norms[in_a].mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--detector", type=Path, required=True)
    ap.add_argument("--embeddings", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True, help="folder for the stage-2 runs (finished runs are reused)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--convs", type=int, nargs="+", default=[4, 1])
    ap.add_argument("--out", type=Path)
    add_device_arg(ap)
    args = ap.parse_args()

    data = read_yaml(args.detector / "config.yaml")["data"]
    categories = read_json(data["val_json"])["categories"]
    if any("look" not in c for c in categories[:80]):
        sys.exit(f"error: {data['val_json']}: not a maskx synthetic world (categories have no 'look')")
    factors, n_colours = factor_table(categories[:80])
    with h5py.File(args.embeddings, "r") as f:
        w_cls, w_box, set_a = f["w_cls"][()], f["w_box"][()], f["set_a"][()].astype(bool)
    if len(w_cls) != 80 or w_cls.shape[1] < factors.shape[1]:
        sys.exit(f"error: {args.embeddings}: expected 80 classes with at least {factors.shape[1]}-d w_cls")
    report = {"machine": machine(), "detector": str(args.detector), "embeddings": str(args.embeddings),
              "readout": {"w_cls": readout(w_cls, factors, n_colours, set_a), "w_box": readout(w_box, factors, n_colours, set_a)}}

    args.work.mkdir(parents=True, exist_ok=True)
    factor_emb = args.work / "embeddings_factor.h5"
    if not factor_emb.is_file():  # the same file with w_cls replaced by the one-hot factors
        shutil.copy(args.embeddings, factor_emb.with_suffix(".tmp"))
        with h5py.File(factor_emb.with_suffix(".tmp"), "a") as f:
            table = np.zeros_like(w_cls)
            table[:, : factors.shape[1]] = factors
            f["w_cls"][...] = table
        factor_emb.with_suffix(".tmp").rename(factor_emb)

    base = [f"data.{k}={data[k]}" for k in ("train_json", "train_images", "val_json", "val_images")] + ["data.mask_classes=voc",
                                                                                                      f"solver.device={args.device}"]
    heads = {"class-agnostic+MLP": ("agnostic", ["head.head=agnostic"], args.embeddings),
             "transfer+MLP (w_cls)": ("transfer_cls", ["head.head=transfer", "head.input=cls"], args.embeddings),
             "transfer+MLP (factor)": ("transfer_factor", ["head.head=transfer", "head.input=cls"], factor_emb)}
    runs: dict[str, Path] = {}
    for convs in args.convs:
        for seed in args.seeds:
            for name, (slug, over, emb) in heads.items():
                key = f"{name}, {convs} conv{'s' if convs > 1 else ''}, seed {seed}"
                run = args.work / f"{slug}_c{convs}_s{seed}"
                if not (run / "mask_final.pth").is_file():
                    cfg = load_config(MaskTrainConfig, "synthetic", base + over + [f"head.num_convs={convs}", f"solver.seed={seed}"],
                                      section="mask_train")
                    t0 = time.perf_counter()
                    mask_train(cfg, args.detector, emb, run)
                    print(f"{key}: trained in {time.perf_counter() - t0:.0f} s", flush=True)
                runs[key] = run
    det = load_detector_run(args.detector)  # loaded once for every transfer head
    report["w_seg_norm_b_over_a"] = {k: round(w_seg_norm_ratio(run, det), 3) for k, run in runs.items() if "transfer" in k}
    scores: dict[str, dict] = {k: {} for k in runs}
    for mode, gt_boxes in (("detections", False), ("gt_boxes", True)):  # one pass per mode: the detector runs once per image
        r = evaluate_heads(runs, EvalConfig(split="nonvoc", gt_boxes=gt_boxes), detector=args.detector)
        for key in runs:
            scores[key][mode] = {s: round(100 * r.metrics[key]["segm"][s]["AP"], 1) for s in ("B", "A")}
    report["heads"] = scores
    print_table("factor read-out from w_det (ridge on set A, accuracy on set B)", ["", "colour", "texture"],
                [[k, round(v["colour_accuracy_on_B"], 2), round(v["texture_accuracy_on_B"], 2)] for k, v in report["readout"].items()])
    print_table("mask AP x100 (voc -> nonvoc)", ["head", "B (detections)", "A (detections)", "B (GT boxes)", "A (GT boxes)"],
                [[k, v["detections"]["B"], v["detections"]["A"], v["gt_boxes"]["B"], v["gt_boxes"]["A"]] for k, v in scores.items()])
    print_table("mean |w_seg| over set-B classes / over set-A classes", ["head", "ratio"],
                [[k, v] for k, v in report["w_seg_norm_b_over_a"].items()])
    write_report(args.out, report)


if __name__ == "__main__":
    main()

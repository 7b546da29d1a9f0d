"""``maskx export`` and ``maskx slim``: a trained model as torchvision / TorchScript / ONNX files, or a float16 copy."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from maskx_cli.console import console, guarded, labelled, print_paths, progress_bars

FORMAT_NAMES = ("torchvision", "torchscript", "onnx")  # for --help without importing torch: pipelines.stages.export.FORMATS' keys


@guarded
def export_cmd(
    run: Annotated[Path, typer.Argument(help="Mask run folder (stage 2, an end-to-end run, or a slim copy) or its mask_final.pth.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: model_torchvision.pth, model.ts, model.onnx, model.json.")],
    detector: Annotated[Optional[Path], typer.Option("--detector", "-d", help="Detector run (default: the one the mask run was trained on).")] = None,
    formats: Annotated[Optional[list[str]], typer.Option("--format", "-f", help=(
        f"What to write: {' | '.join(FORMAT_NAMES)} (repeatable; default: all three)."))] = None,
    score_thresh: Annotated[float, typer.Option("--score-thresh", help="The exported model keeps detections scoring above this.")] = 0.5,
    check: Annotated[Optional[list[Path]], typer.Option("--check", help=(
        "An image that maskx and every written file predict, compared within the stated tolerance (repeatable)."))] = None,
) -> None:
    """Export a trained model as a torchvision Mask R-CNN (T baked in), TorchScript and ONNX."""
    from pipelines.io import format_size
    from pipelines.stages.export import export

    with progress_bars() as progress:
        r = export(run, out, detector=detector, formats=formats, score_thresh=score_thresh, check=check, progress=progress)
    predictor = "MaskRCNNPredictor, T baked in" if not r.mlp else "MLPMaskRCNNPredictor: T baked in + the MLP branch"
    builder = f"loads into torchvision's {r.builder}" if r.builder else "torchvision's parts (pipelines.stages.export.load_torchvision)"
    console.print(labelled("exported", "green", f"a torchvision Mask R-CNN ({predictor}; {builder}) in {r.seconds:.1f} s"),
                  highlight=False, soft_wrap=True)
    for name, path in r.files.items():
        console.print(labelled(f"{name}:", "dim", f"{path} ({format_size(r.sizes[name])})"), highlight=False, soft_wrap=True)
    if r.checks:
        worst = {}
        for row in r.checks:
            w = worst.setdefault(row["format"], {"box_px": 0.0, "score": 0.0, "mask_pixels": 0.0, "detections": 0})
            for key in ("box_px", "score", "mask_pixels"):
                w[key] = max(w[key], row[key])
            w["detections"] += row["detections"]
        for name, w in worst.items():
            console.print(labelled(f"checked {name}:", "green", (
                f"{w['detections']} detections on {len(check)} image(s) as maskx's: boxes within {w['box_px']:.2g} px, "
                f"scores within {w['score']:.2g}, {100 * w['mask_pixels']:.3g}% of mask pixels differ")),
                highlight=False, soft_wrap=True)
    print_paths(description=r.spec)


@guarded
def slim_cmd(
    run: Annotated[Path, typer.Argument(help="Mask run folder (stage 2 or end-to-end) or its mask_final.pth.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output run folder: model_final.pth and mask_final.pth in float16.")],
    detector: Annotated[Optional[Path], typer.Option("--detector", "-d", help="Detector run (default: the one the mask run was trained on).")] = None,
) -> None:
    """An inference-only float16 copy of a mask run and its detector, for predict, eval and the Python API."""
    from pipelines.io import format_size
    from pipelines.stages.slim import slim

    r = slim(run, out, detector)
    for kind in ("detector", "mask"):
        console.print(labelled(f"{kind}:", "green", f"{format_size(r.source_bytes[kind])} -> {format_size(r.bytes[kind])} (float16)"),
                      highlight=False, soft_wrap=True)
    if r.kept_float32:
        console.print(labelled("kept in float32 (beyond float16's range):", "yellow", ", ".join(r.kept_float32)),
                      highlight=False, soft_wrap=True)
    print_paths(run=r.out)

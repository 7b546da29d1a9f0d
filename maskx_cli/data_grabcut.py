"""GrabCut baselines (Table 3.5): ``maskx data grabcut`` and ``maskx eval-grabcut``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from maskx_cli.console import console, guarded, metrics_table, print_paths, progress_bars
from maskx_cli.options import EVAL, ConfigOpt, SetOpt, config_options


@guarded
def grabcut_cmd(
    in_json: Annotated[Path, typer.Option("--in", help="COCO-format annotations to read.")],
    images: Annotated[Path, typer.Option(help="Image folder of --in.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Annotation file to write.")],
    classes: Annotated[str, typer.Option(help="Classes whose masks are replaced: nonvoc | voc | all | random:N:SEED | ids:...")] = "nonvoc",
    iterations: Annotated[int, typer.Option(help="GrabCut iterations per box.")] = 5,
) -> None:
    """Replace the masks of some classes by GrabCut masks inside their ground-truth boxes."""
    from pipelines.data.grabcut import grabcut_annotations

    with progress_bars() as progress:
        r = grabcut_annotations(in_json, images, classes, out, iterations, progress)
    console.print(f"[green]grabcut[/] {r.replaced} masks of {len(r.classes)} classes on {r.images} images replaced "
                  f"({r.box_fallbacks} are the filled box)")
    print_paths(annotations=r.out)


@guarded
@config_options(EVAL)
def eval_grabcut_cmd(
    detector: Annotated[Path, typer.Option("--detector", "-d", help="Detector run (detect-train or train).")],
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Metrics file (default: <detector>/metrics_grabcut_<split>.json).")] = None,
    data: Annotated[Optional[Path], typer.Option(help="COCO-format validation annotations (default: the run's data.val_json).")] = None,
    images: Annotated[Optional[Path], typer.Option(help="Image folder of --data.")] = None,
    iterations: Annotated[int, typer.Option(help="GrabCut iterations per box.")] = 5,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    values: dict | None = None,
) -> None:
    """"Faster R-CNN tested with GrabCut": GrabCut masks inside every detected box, scored on sets B, A, all."""
    from maskx_cli.stages import load_eval_config
    from pipelines.stages.eval_grabcut import evaluate_grabcut

    run_dir = detector if detector.is_dir() else detector.parent
    cfg = load_eval_config(config, run_dir, set_, values)
    json_out = json_out or run_dir / f"metrics_grabcut_{cfg.split.replace(':', '_')}.json"
    with progress_bars() as progress:
        r = evaluate_grabcut(detector, cfg, data, images, iterations, progress, json_out)
    for iou in ("segm", "bbox"):
        rows = {f"grabcut · {s}": r.metrics["grabcut"][iou][s] for s in r.sets}
        console.print(metrics_table(f"{'mask' if iou == 'segm' else 'box'} AP ({r.images} images; B = {cfg.split})", rows,
                                    r.metric_names))
    print_paths(metrics=json_out)

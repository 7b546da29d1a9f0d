"""The four stages: ``detect-train`` (or ``detect-import``), ``export-embeddings``, ``mask-train``, ``eval``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from maskx_cli.console import (console, err_console, fail, guarded, labelled, metrics_table, print_paths, progress_bars,
                               training_summary, warn, warn_missing_glove)
from maskx_cli.options import CACHE, DATA, EVAL, EVAL_BACKEND, MASK_SIDE, SET_SOURCE, SOLVER, ConfigOpt, ResumeOpt, SetOpt, config_options


@guarded
@config_options(DATA, SOLVER)
def detect_train_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder to create.")],
    config: ConfigOpt = None,
    resume: ResumeOpt = False,
    set_: SetOpt = None,
    values: dict | None = None,
) -> None:
    """Stage 1: train Faster R-CNN (FPN) on the boxes of every class."""
    from pipelines.config import DetectTrainConfig, load_config
    from pipelines.stages.detect_train import detect_train, start_warnings

    cfg = load_config(DetectTrainConfig, config, [*(set_ or []), values], source=SET_SOURCE)
    warn(*start_warnings(cfg, config))
    with progress_bars() as progress:
        result = detect_train(cfg, out, progress=progress, resume=resume, recipe=config)
    console.print(f"[green]detector trained[/] {result.num_classes} classes, {result.train_images} images, "
                  + training_summary(result.stats))
    warn(*result.data_warnings)
    print_paths(checkpoint=result.checkpoint, config=out / "config.yaml", metrics=out / "metrics.jsonl")


@guarded
@config_options(DATA)
def detect_import_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder to create.")],
    source: Annotated[Optional[str], typer.Option("--from", help="torchvision:fasterrcnn_resnet50_fpn (default) | "
                                                  "torchvision:fasterrcnn_resnet50_fpn_v2 | torchvision:maskrcnn_resnet50_fpn[_v2] (box part only).")] = None,
    weights: Annotated[Optional[Path], typer.Option(help="The model's state dict file (default: torchvision's COCO_V1 release, "
                                                    "from torch's cache or downloaded).")] = None,
    data: Annotated[Optional[Path], typer.Option(help="COCO-format annotations whose categories the detector gets, by COCO id "
                                                 "(data.train_json).")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    values: dict | None = None,
) -> None:
    """Stage 1 without training: import a torchvision COCO detector as a detector run."""
    from pipelines.config import DetectImportConfig, load_config
    from pipelines.stages.detect_import import detect_import

    given = {"source": source, "weights": str(weights) if weights else None, "data": {"train_json": str(data)} if data else None}
    cfg = load_config(DetectImportConfig, config, [*(set_ or []), values, {k: v for k, v in given.items() if v is not None}],
                      source=SET_SOURCE)
    with progress_bars() as progress:
        r = detect_import(cfg, out, progress=progress, recipe=config)
    release = f" ({r.release})" if r.release else ""
    console.print(f"[green]detector imported[/] {escape(r.source + release)}: {r.num_classes} classes "
                  f"({r.dropped_rows} of the checkpoint's rows not used)")
    print_paths(checkpoint=r.checkpoint, weights=r.weights, config=out / "config.yaml")


@guarded
def export_embeddings_cmd(
    run: Annotated[Path, typer.Argument(help="Detector run folder (or its model_final.pth).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="HDF5 file to write.")],
    mask_classes: Annotated[Optional[str], typer.Option(help="Set A to record (default: the detector run's data.mask_classes).")] = None,
) -> None:
    """Stage 2a: write the frozen per-class detection weights w_cls, w_box to HDF5."""
    from pipelines.stages.export_embeddings import export_embeddings

    r = export_embeddings(run, out, mask_classes)
    console.print(f"[green]embeddings[/] {r.num_classes} classes, w_cls {r.dim_cls}-d, w_box {r.dim_box}-d")
    print_set_a(r.spec, r.set_a, r.categories)
    print_paths(embeddings=r.path)


def print_set_a(spec: str, set_a: list[int], categories: list[dict]) -> None:
    """The set-A line every stage that chooses set A prints: the spec, the count and the class names."""
    from pipelines.data.annotations import describe_classes

    console.print(labelled(f"set A ('{spec}', {len(set_a)} of {len(categories)} classes):", "dim",
                           describe_classes(set_a, categories, 20)), highlight=False, soft_wrap=True)


def load_mask_train_config(config: str | None, detector: Path, set_: list[str] | None, values: dict):
    """The stage-2 config: the recipe (default: the detector run's), the detector run's data files,
    then --set, then the options given (:func:`pipelines.engine.run_dir.load_stage_config`)."""
    from pipelines.config import MaskTrainConfig
    from pipelines.engine.run_dir import load_stage_config

    return load_stage_config(MaskTrainConfig, config, detector, [*(set_ or []), values], source=SET_SOURCE)


@guarded
@config_options(DATA, MASK_SIDE, SOLVER, CACHE)
def mask_train_cmd(
    detector: Annotated[Path, typer.Option("--detector", "-d", help="Detector run folder (stage 1).")],
    embeddings: Annotated[Path, typer.Option("--embeddings", "-e", help="Embeddings file from export-embeddings.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder to create.")],
    config: ConfigOpt = None,
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help="Train from the cached frozen-detector state.")] = True,
    resume: ResumeOpt = False,
    set_: SetOpt = None,
    values: dict | None = None,
) -> None:
    """Stage 2: train the mask side (T + mask head) on set-A masks, detector frozen."""
    from pipelines.stages.mask_train import mask_train

    cfg = load_mask_train_config(config, detector, set_, {**values, **({} if cache else {"cache": {"enabled": False}})})
    with progress_bars() as progress:
        r = mask_train(cfg, detector, embeddings, out, progress=progress, resume=resume)
    warn_missing_glove(r.missing_glove)
    warn(*r.data_warnings)
    cache_note = "" if r.cache_path is None else (" (cache built)" if r.cache_built else " (cache reused)")
    console.print(f"[green]mask head trained[/] {r.head}, set A = {len(r.set_a)} classes, {r.train_rois} training RoIs{cache_note}, "
                  + training_summary(r.stats))
    print_set_a(cfg.data.mask_classes, r.set_a, r.categories)
    print_paths(checkpoint=r.checkpoint, config=out / "config.yaml", cache=r.cache_path)


def load_eval_config(config: str | None, detector_run: Path | None, set_: list[str] | None, values: dict):
    """The recipe's ``eval:`` section (default recipe: the detector run's), then --set, then the options given
    (:func:`pipelines.engine.run_dir.load_eval_config`)."""
    from pipelines.engine.run_dir import load_eval_config as load

    return load(config, detector_run, [*(set_ or []), values], source=SET_SOURCE)


@guarded
@config_options(EVAL, EVAL_BACKEND)
def eval_cmd(
    runs: Annotated[Optional[list[Path]], typer.Argument(help="Mask run folder(s) trained on the same detector (none with --results).")] = None,
    results: Annotated[Optional[Path], typer.Option("--results", help="Score this COCO results file (a JSON list of detections: "
                                                    "image_id, category_id, score, bbox, segmentation) on --gt instead of running a model.")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Metrics file (default: <first run>/metrics_<split>.json, "
                                                     "or <results>_metrics_<split>.json).")] = None,
    detector: Annotated[Optional[Path], typer.Option(help="Detector run (default: the one the mask run names).")] = None,
    data: Annotated[Optional[Path], typer.Option("--gt", "--data", help="Ground-truth annotations, COCO or LVIS v1 (LVIS's rules "
                                                 "then apply); with runs the default is the run's data.val_json.")] = None,
    images: Annotated[Optional[Path], typer.Option(help="Image folder of --gt (runs only).")] = None,
    gt_boxes: Annotated[bool, typer.Option("--gt-boxes", help="Segment the ground-truth boxes and classes (score 1) "
                                           "instead of the detections: mask quality without detection errors.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    values: dict | None = None,
) -> None:
    """Mask and box AP on set B, set A and all classes, of mask runs or of a results file (--gt, --results).

    COCO's rules (COCOeval), or LVIS's (LVISEval: federated labels, 300 detections per image, APr/APc/APf) on an LVIS
    ground truth; settings from the recipe's eval: section. Examples: maskx eval runs/transfer --split nonvoc;
    maskx eval --gt instances_val2017.json --results detections.json --split nonvoc --json metrics.json
    """
    values = {**values, **({"gt_boxes": True} if gt_boxes else {})}
    if results is not None:
        if runs or detector or images:
            fail("--results scores a results file: give --gt, not mask runs, --detector or --images")
        if data is None:
            fail("--results needs the ground truth: --gt FILE")
        return _eval_results(data, results, load_eval_config(config, None, set_, values), json_out)
    if not runs:
        fail("nothing to evaluate: give mask run folder(s), or --gt FILE --results FILE")
    from pipelines.engine.run_dir import detector_of_mask_run
    from pipelines.stages.evaluate import evaluate_heads

    det_run = detector if detector is not None else detector_of_mask_run(runs[0])
    cfg = load_eval_config(config, det_run, set_, values)
    names = _unique_names(runs)
    stem = f"metrics_{cfg.split.replace(':', '_')}" if cfg.split else "metrics"
    json_out = json_out or runs[0] / f"{stem}{'_gt_boxes' if cfg.gt_boxes else ''}.json"
    with progress_bars() as progress:
        r = evaluate_heads(dict(zip(names, runs)), cfg, data, images, detector, progress, json_out)
    warn(*r.warnings)
    _print_protocol(r.protocol)
    b_is = cfg.split or "the classes without training masks"  # a plain-text title: no escaping
    for iou in ("segm",) if cfg.gt_boxes else ("segm", "bbox"):
        rows = {f"{name} · {s}": r.metrics[name][iou][s] for name in names for s in r.sets}
        console.print(metrics_table(f"{'mask' if iou == 'segm' else 'box'} AP ({r.images} images; B = {b_is}"
                                    f"{'; ground-truth boxes' if cfg.gt_boxes else ''})", rows, r.metric_names))
    for note in r.notes:
        err_console.print(labelled("note:", "yellow", note), highlight=False, soft_wrap=True)
    print_paths(metrics=json_out)


_PROTOCOL_LINE = {"coco": "COCO's rules (COCOeval: 100 detections per image and class)",
                  "lvis": "LVIS's rules (LVISEval: federated labels, 300 detections per image)"}


def _print_protocol(protocol: str) -> None:
    console.print(f"[dim]scored by[/] {_PROTOCOL_LINE[protocol]}", highlight=False, soft_wrap=True)


def _eval_results(gt: Path, results: Path, cfg, json_out: Optional[Path]) -> None:
    from pipelines.stages.eval_results import default_metrics_path, evaluate_results_file

    json_out = json_out or default_metrics_path(results, cfg.split)
    with progress_bars() as progress:
        r = evaluate_results_file(gt, results, cfg, json_out, progress)
    warn(*r.warnings)
    for note in r.scores.notes:
        err_console.print(labelled("note:", "yellow", f"{results}: {note}"), highlight=False, soft_wrap=True)
    _print_protocol(r.scores.protocol)
    for iou, by_set in r.scores.metrics.items():
        console.print(metrics_table(f"{'mask' if iou == 'segm' else 'box'} AP of {results.name} ({r.detections} detections "
                                    f"on {r.images} images; B = {cfg.split or 'nonvoc'})", by_set, r.scores.metric_names))
    print_paths(metrics=json_out)


def _unique_names(runs: list[Path]) -> list[str]:
    names = [Path(r).name or str(r) for r in runs]
    if len(set(names)) < len(names):
        names = [str(r) for r in runs]
    return names

"""``maskx predict`` and ``maskx segment``: COCO results JSON with masks, and pictures (set A green, set B red)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from maskx_cli.console import console, err_console, fail, guarded, labelled, print_paths, progress_bars, warn

if TYPE_CHECKING:  # the library imports torch: only for the annotations here
    from pipelines.stages.predict import PredictResult
    from pipelines.stages.segment import SegmentResult

# The picture options of both commands (pipelines/visualize.py draws the pictures).
VisualizeOpt = Annotated[bool, typer.Option("--visualize", help=(
    "Write one PNG per image: set-A classes green, set-B red, a legend strip below."))]
ScaleOpt = Annotated[int, typer.Option(help="Enlarge pictures by this integer factor (small images).")]
MaxDrawnOpt = Annotated[int, typer.Option("--max-drawn", help=(
    "Draw at most this many detections per picture, highest scores first (all are in predictions.json)."))]
MAX_DRAWN = 10  # pipelines.visualize.MAX_DRAWN (not imported here: it needs numpy; a test checks they agree)


def pictures_line(r: PredictResult | SegmentResult, max_drawn: int) -> str:
    """What ``--visualize`` wrote: the PNG count and folder, and the detections left out of the pictures."""
    left = f"; {r.not_drawn} more left out (--max-drawn {max_drawn})" if r.not_drawn else ""
    return f"{len(r.pictures)} PNG files in {r.out}{left}"


@guarded
def predict_cmd(
    images: Annotated[list[Path], typer.Argument(help="Image files and/or folders (searched recursively).")],
    mask: Annotated[Path, typer.Option("--mask", "-m", help="Mask run folder (stage 2) or its mask_final.pth.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: predictions.json, images.json, pictures.")],
    detector: Annotated[Optional[Path], typer.Option("--detector", "-d", help="Detector run (default: the one the mask run was trained on).")] = None,
    visualize: VisualizeOpt = False,
    score_thresh: Annotated[float, typer.Option("--score-thresh", help="Keep detections scoring at least this.")] = 0.5,
    classes: Annotated[Optional[str], typer.Option("--classes", help="Only these classes, comma-separated names (e.g. person,dog).")] = None,
    set_a_only: Annotated[bool, typer.Option("--set-a-only", help="Only classes that had masks in training (set A).")] = False,
    set_b_only: Annotated[bool, typer.Option("--set-b-only", help="Only classes without training masks (set B).")] = False,
    scale: ScaleOpt = 1,
    max_drawn: MaxDrawnOpt = MAX_DRAWN,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    batch_images: Annotated[int, typer.Option(help="Images per forward pass.")] = 4,
    gt: Annotated[Optional[Path], typer.Option("--gt", help=(
        "A COCO file listing these images: results take its image ids (matched by file name), so "
        "'maskx eval --gt FILE --results predictions.json' scores them; images it does not list are skipped."))] = None,
) -> None:
    """Detect and segment every class on new images with a detector and a mask run."""
    from pipelines.stages.predict import predict

    if set_a_only and set_b_only:
        fail("--set-a-only and --set-b-only exclude each other")
    if batch_images < 1:
        fail(f"--batch-images must be positive, got {batch_images}")
    only = "A" if set_a_only else ("B" if set_b_only else None)
    names = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    with progress_bars() as progress:
        r = predict(mask, list(images), out, detector=detector, score_thresh=score_thresh, classes=names, only=only,
                    visualize=visualize, scale=scale, device=device, batch_images=batch_images, progress=progress,
                    gt=gt, max_drawn=max_drawn)
    for path, reason in r.skipped[:10]:
        warn(f"{path}: skipped: {reason}")
    if len(r.skipped) > 10:
        warn(f"... and {len(r.skipped) - 10} more")
    if r.exif_turned:
        err_console.print(labelled("note:", "yellow", f"{len(r.exif_turned)} image(s) carry an EXIF orientation, not applied "
                                   f"(first: {r.exif_turned[0]}): boxes and masks are on the stored pixel grid, as training "
                                   "reads images; a viewer shows these turned"), highlight=False, soft_wrap=True)
    skipped = f", [yellow]{len(r.skipped)} unreadable skipped[/]" if r.skipped else ""
    console.print(f"[green]predicted[/] {r.images} images, {r.detections} detections{skipped} in {r.seconds:.1f} s")
    paths = {"predictions": r.predictions}
    if visualize:
        paths["pictures"] = pictures_line(r, max_drawn)
    print_paths(**paths)


@guarded
def segment_cmd(
    boxes: Annotated[Path, typer.Argument(help=(
        "A COCO results file (any detector's; scores kept) or a COCO ground-truth file (its boxes, score 1)."))],
    images: Annotated[Path, typer.Option("--images", "-i", help="Image folder: each image is found here by its file_name.")],
    mask: Annotated[Path, typer.Option("--mask", "-m", help="Mask run folder (stage 2) or its mask_final.pth.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: predictions.json, images.json, pictures.")],
    detector: Annotated[Optional[Path], typer.Option("--detector", "-d", help="Detector run (default: the one the mask run was trained on).")] = None,
    gt: Annotated[Optional[Path], typer.Option("--gt", help=(
        "For a results file: a COCO file (or maskx predict's images.json) giving the file_name of each image_id."))] = None,
    match: Annotated[str, typer.Option("--match", help="Pair the file's classes with the detector's by category id or by name: id | name.")] = "id",
    visualize: VisualizeOpt = False,
    scale: ScaleOpt = 1,
    max_drawn: MaxDrawnOpt = MAX_DRAWN,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    batch_images: Annotated[int, typer.Option(help="Images per forward pass.")] = 4,
) -> None:
    """Masks for given boxes: any detector's results, or a box-only ground truth (auto-annotation)."""
    from pipelines.stages.segment import segment

    if batch_images < 1:
        fail(f"--batch-images must be positive, got {batch_images}")
    with progress_bars() as progress:
        r = segment(mask, boxes, images, out, detector=detector, gt=gt, match=match, visualize=visualize, scale=scale,
                    device=device, batch_images=batch_images, progress=progress, max_drawn=max_drawn)
    if r.unknown:
        shown = ", ".join(list(r.unknown)[:5]) + (", ..." if len(r.unknown) > 5 else "")
        warn(f"{sum(r.unknown.values())} box(es) of {len(r.unknown)} class(es) the detector does not have were skipped "
             f"(matched by {match}): {shown}")
    for path, reason in r.skipped[:10]:
        warn(f"{path}: skipped: {reason}")
    if len(r.skipped) > 10:
        warn(f"... and {len(r.skipped) - 10} more")
    console.print(f"[green]segmented[/] {r.boxes} boxes on {r.images} images in {r.seconds:.1f} s")
    paths = {"predictions": r.predictions, "annotations": r.annotations}
    if r.annotations is not None:
        paths["annotations"] = f"{r.annotations} ({r.filled} box-only annotations given a mask)"
    if visualize:
        paths["pictures"] = pictures_line(r, max_drawn)
    print_paths(**paths)

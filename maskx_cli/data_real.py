"""``maskx data prepare-vg`` and ``maskx data check``: real data sets (COCO 2017, Visual Genome, LVIS v1)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table
from rich.text import Text

from maskx_cli.console import console, guarded, labelled, print_paths, progress_bars, warn


@guarded
def prepare_vg_cmd(
    out: Annotated[Path, typer.Option("--out", help="Output folder (vg_{train,val}.json, coco_masks_{train,val}.json, classes.tsv).")],
    vg: Annotated[Optional[Path], typer.Option("--vg", help="Visual Genome folder: image_data.json, objects.json, VG_100K/, VG_100K_2/.")] = None,
    coco: Annotated[Optional[Path], typer.Option("--coco", help="COCO 2017 folder holding annotations/instances_{train,val}2017.json.")] = None,
    image_data: Annotated[Optional[Path], typer.Option(help="VG image_data.json (default: VG/image_data.json).")] = None,
    objects: Annotated[Optional[Path], typer.Option(help="VG objects.json (default: VG/objects.json).")] = None,
    coco_train: Annotated[Optional[Path], typer.Option(help="COCO instances_train2017.json (default: COCO/annotations/...).")] = None,
    coco_val: Annotated[Optional[Path], typer.Option(help="COCO instances_val2017.json (default: COCO/annotations/...).")] = None,
    images: Annotated[Optional[Path], typer.Option(help="VG image root to check every image against (default: VG, if given).")] = None,
    no_image_check: Annotated[bool, typer.Option("--no-image-check", help="Do not check that the VG images exist.")] = False,
    allow_missing_images: Annotated[bool, typer.Option(help="Leave out (and count) images that are missing instead of failing.")] = False,
    num_classes: Annotated[int, typer.Option(help="Keep this many most frequent synsets as classes.")] = 3000,
    hand_map: Annotated[Optional[Path], typer.Option(help='JSON {"coco name": ["synset.n.01", ...]} overriding entries of the built-in COCO-to-VG hand map.')] = None,
) -> None:
    """Build Visual Genome 3k (paper §4): VG boxes of the most frequent synsets + COCO masks on VG class ids."""
    from pipelines.data.visual_genome import VGPrepareConfig, prepare_vg
    from pipelines.errors import MaskxError

    def pick(explicit: Optional[Path], base: Optional[Path], rel: str, flag: str) -> str:
        if explicit is not None:
            return str(explicit)
        if base is None:
            folder = "--coco" if rel.startswith("annotations/") else "--vg"
            raise MaskxError(f"give {flag} (or {folder}, the folder it defaults from)")
        return str(base / rel)

    cfg = VGPrepareConfig(
        image_data=pick(image_data, vg, "image_data.json", "--image-data"),
        objects=pick(objects, vg, "objects.json", "--objects"),
        coco_train=pick(coco_train, coco, "annotations/instances_train2017.json", "--coco-train"),
        coco_val=pick(coco_val, coco, "annotations/instances_val2017.json", "--coco-val"),
        out=str(out),
        images="" if no_image_check else str(images or vg or ""),
        num_classes=num_classes,
        hand_map=str(hand_map) if hand_map else "",
        allow_missing_images=allow_missing_images,
    )
    with progress_bars() as progress:
        result = prepare_vg(cfg, progress=progress)
    for w in result.warnings:
        warn(w)

    table = Table(title=f"Visual Genome {result.num_classes} classes", title_justify="left")
    table.add_column("", style="bold")
    table.add_column("count", justify="right")
    labels = [
        ("vg_images", "VG images"),
        ("vg_objects", "VG objects (distinct ids)"),
        ("duplicate_object_ids_dropped", "repeated object ids dropped"),
        ("objects_without_synset", "objects without synset"),
        ("objects_with_several_synsets", "objects with several synsets"),
        ("distinct_synsets", "distinct synsets"),
        ("classes", "classes kept"),
        ("coco_classes_matched", "COCO classes matched"),
        ("coco_classes_matched_by_hand", "  of which by the hand map"),
        ("coco_extra_classes", "  of which extra classes (beyond the most frequent)"),
        ("objects_not_in_classes", "objects of other synsets"),
        ("degenerate_boxes_dropped", "degenerate boxes dropped"),
        ("boxes_clipped_to_image", "boxes clipped to the image"),
        ("missing_images_dropped", "missing images left out"),
        ("train_images", "train images"),
        ("train_boxes", "train boxes"),
        ("val_images", "val images (in COCO val2017)"),
        ("val_boxes", "val boxes"),
        ("images_without_boxes", "images without boxes"),
        ("coco_mask_train_annotations", "COCO train masks (VG ids)"),
        ("coco_mask_val_annotations", "COCO val masks (VG ids)"),
        ("coco_masks_of_unmatched_classes_dropped", "COCO masks of unmatched classes"),
        ("coco_degenerate_boxes_skipped", "COCO degenerate boxes skipped"),
    ]
    for key, label in labels:
        table.add_row(label, f"{result.stats.get(key, 0):,}")
    console.print(table)
    print_paths(**result.files)


PER_CLASS_ROWS = 50  # classes listed one per row by 'data check' without --per-class


@guarded
def check_cmd(
    annotations: Annotated[Path, typer.Argument(help="COCO or LVIS v1 instances file.")],
    images: Annotated[Optional[Path], typer.Option(help="Image root: open every listed image, as training will.")] = None,
    masks: Annotated[bool, typer.Option("--masks", help="Require a mask on every annotation (no box-only ones).")] = False,
    split: Annotated[str, typer.Option("--split", help="Show which classes this set-A choice puts in A and B "
                                       "(annotated | voc | random:N:SEED | ids:...).")] = "annotated",
    per_class: Annotated[Optional[bool], typer.Option("--per-class/--no-per-class", help=(
        f"One row per class (default: when the file has at most {PER_CLASS_ROWS} classes)."))] = None,
) -> None:
    """Validate a COCO / LVIS annotation file (and its images) the way training will read it.

    Per class: instances, with a mask, box-only (segmentation absent, null or []), and the set (A or B) the
    --split choice of set A gives it.
    """
    from pipelines.data.coco import load_coco, unreadable_images
    from pipelines.data.lvis import is_lvis
    from pipelines.errors import MaskxError
    from pipelines.io import leaves_folder

    data, report = load_coco(annotations, require_masks=masks)
    for w in report.warnings(annotations):
        warn(w)
    outside = [im for im in data["images"] if leaves_folder(im["file_name"])]
    if outside:
        first = ", ".join(f"image id {im['id']} {im['file_name']!r}" for im in outside[:3])
        warn(f"{annotations}: {len(outside)} image file_name(s) are absolute or climb out of the image folder with '..' "
             f"({first}{', ...' if len(outside) > 3 else ''}): they are read from there, not from the image folder")
    table = Table(title=Text(f"{annotations.name} ({'LVIS' if is_lvis(data) else 'COCO'} format)"), title_justify="left")
    table.add_column("", style="bold")
    table.add_column("count", justify="right")
    table.add_row("images", f"{len(data['images']):,}")
    table.add_row("images without annotations", f"{report.images_without_annotations:,}")
    table.add_row("categories", f"{len(data['categories']):,}")
    table.add_row("annotations kept", f"{len(data['annotations']):,}")
    table.add_row("box-only annotations (no mask)", f"{report.box_only:,}")
    table.add_row("crowd regions (eval only)", f"{report.crowd_annotations:,}")
    table.add_row("degenerate boxes skipped", f"{report.degenerate_boxes:,}")
    if images is not None:
        with progress_bars() as progress:
            bad = unreadable_images(data, images, progress)
        table.add_row("missing or unreadable image files", f"{len(bad):,}")
    console.print(table)
    _print_classes(data, split, per_class if per_class is not None else len(data["categories"]) <= PER_CLASS_ROWS)
    if images is None:
        return
    for name, reason in bad[:10]:
        warn(f"{images / name}: {reason}")
    if len(bad) > 10:
        warn(f"... and {len(bad) - 10} more")
    if bad:
        raise MaskxError(f"{len(bad)} of the {len(data['images'])} image file(s) listed in {annotations.name} are missing or "
                         f"cannot be read, first: {bad[0][0]} ({bad[0][1]})", images)


def _print_classes(data: dict, split: str, per_class: bool) -> None:
    """Mask coverage per class and the sets A / B that ``split`` gives (its refusal, if any, as a warning)."""
    from pipelines.data.annotations import describe_classes, mask_coverage
    from pipelines.data.splits import resolve_split
    from pipelines.errors import MaskxError

    coverage = mask_coverage(data)
    cats = data["categories"]
    try:
        set_a = set(resolve_split(split, cats, data))
    except MaskxError as exc:
        warn(f"--split {split}: {exc.message}")
        set_a = None
    if per_class:
        table = Table(title=Text(f"per class (set A = '{split}')"), title_justify="left")
        for col in ("id", "class", "instances", "with a mask", "box-only", "set"):
            table.add_column(col, justify="left" if col == "class" else "right")
        for c in coverage:
            in_set = "" if set_a is None else ("A" if c.category_id in set_a else "B")
            table.add_row(str(c.category_id), Text(c.name), f"{c.instances:,}", f"{c.with_mask:,}", f"{c.box_only:,}", in_set)
        console.print(table)
    masked = [c for c in coverage if c.with_mask]
    partly = [c for c in masked if c.box_only]
    console.print(f"{len(masked)} of {len(cats)} classes have masks ({len(partly)} of them also box-only instances); "
                  f"{len(cats) - len(masked)} are box-only or absent", highlight=False)
    if set_a is not None:
        console.print(labelled(f"'{split}' puts in set A ({len(set_a)}):", "dim", describe_classes(set_a, cats, 20)),
                      highlight=False, soft_wrap=True)
        without = [c.category_id for c in coverage if c.category_id in set_a and not c.with_mask]
        if without:
            warn(f"--split {split}: {len(without)} set-A class(es) have no mask in this file (stage 2 refuses them): "
                 f"{describe_classes(without, cats, 8)}")

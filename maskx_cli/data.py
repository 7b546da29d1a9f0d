"""``maskx data ...``: make the synthetic world, prepare real data sets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from maskx_cli.console import console, guarded, print_paths, progress_bars
from maskx_cli.main import app

data_app = typer.Typer(help="Make or prepare data sets (COCO-format annotations + images).", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("synth")
@guarded
def synth(
    out: Annotated[Path, typer.Option("--out", help="Output folder (instances_{train,val}.json, train/, val/).")],
    num_classes: Annotated[int, typer.Option(help="Number of classes (the first 80 are named and numbered like COCO's).")] = 80,
    train_images: Annotated[int, typer.Option(help="Training images.")] = 2000,
    val_images: Annotated[int, typer.Option(help="Validation images.")] = 300,
    image_size: Annotated[int, typer.Option(help="Image side in pixels.")] = 128,
    min_objects: Annotated[int, typer.Option(help="Fewest objects per image.")] = 2,
    max_objects: Annotated[int, typer.Option(help="Most objects per image.")] = 4,
    min_radius: Annotated[float, typer.Option(help="Smallest object radius, pixels at 128 px (scaled with --image-size).")] = 14.0,
    max_radius: Annotated[float, typer.Option(help="Largest object radius, pixels at 128 px.")] = 34.0,
    seed: Annotated[int, typer.Option(help="Random seed: the same seed gives the same files.")] = 0,
) -> None:
    """Generate the built-in synthetic world (no download needed)."""
    from pipelines.data.synthetic import SynthConfig, generate

    cfg = SynthConfig(
        num_classes=num_classes,
        train_images=train_images,
        val_images=val_images,
        image_size=image_size,
        min_objects=min_objects,
        max_objects=max_objects,
        min_radius=min_radius,
        max_radius=max_radius,
        seed=seed,
    )
    with progress_bars() as progress:
        result = generate(cfg, out, progress=progress)
    console.print(f"[green]synthetic world[/] {result.num_classes} classes, {result.train_images} train / {result.val_images} val images, {result.train_instances} / {result.val_instances} instances")
    print_paths(train=result.train_json, val=result.val_json)

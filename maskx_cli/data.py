"""``maskx data synth``: make the synthetic world."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from maskx_cli.console import console, guarded, print_paths, progress_bars
from maskx_cli.options import config_options, world_options


@guarded
@config_options(world_options())
def synth(
    out: Annotated[Path, typer.Option("--out", help="Output folder (instances_{train,val}.json, train/, val/).")],
    values: dict | None = None,
) -> None:
    """Generate the built-in synthetic world (no download needed)."""
    from pipelines.config import from_dict
    from pipelines.data.synthetic import SynthConfig, generate

    with progress_bars() as progress:
        result = generate(from_dict(SynthConfig, values["world"]), out, progress=progress)
    console.print(f"[green]synthetic world[/] {result.num_classes} classes, {result.train_images} train / {result.val_images} val images, {result.train_instances} / {result.val_instances} instances")
    print_paths(train=result.train_json, val=result.val_json)

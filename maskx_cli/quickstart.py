"""``maskx quickstart``: the whole job on the built-in synthetic world."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from maskx_cli.console import console, guarded, metrics_table, print_paths, progress_bars
from maskx_cli.main import app


@app.command("quickstart")
@guarded
def quickstart_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the world, the runs and the report.")] = Path("runs/quickstart"),
    seeds: Annotated[Optional[list[int]], typer.Option("--seed", help="Stage-2 seed (repeatable; default 0 and 1).")] = None,
    split: Annotated[Optional[list[str]], typer.Option("--split", help="Set A of a split (repeatable; default voc and random:40:0).")] = None,
    world_seed: Annotated[int, typer.Option(help="Seed of the synthetic world.")] = 0,
    train_images: Annotated[int, typer.Option(help="Training images of the world.")] = 2000,
    val_images: Annotated[int, typer.Option(help="Validation images of the world.")] = 300,
    max_objects: Annotated[int, typer.Option(help="Most objects per image of the world.")] = 4,
    min_radius: Annotated[float, typer.Option(help="Smallest object radius of the world, pixels at 128 px.")] = 14.0,
    max_radius: Annotated[float, typer.Option(help="Largest object radius of the world, pixels at 128 px.")] = 34.0,
    detector_iterations: Annotated[int, typer.Option(help="Stage-1 iterations (0: the recipe's).")] = 0,
    mask_iterations: Annotated[int, typer.Option(help="Stage-2 iterations (0: the recipe's).")] = 0,
    config: Annotated[str, typer.Option("--config", "-c", help="Recipe for the stages.")] = "synthetic",
    set_: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a config key of every stage.")] = None,
) -> None:
    """Synthetic world -> detector -> embeddings -> mask heads -> eval on sets A and B -> report."""
    from pipelines.data.synthetic import SynthConfig
    from pipelines.stages.quickstart import QuickstartConfig, quickstart, summary_rows

    cfg = QuickstartConfig(
        recipe=config,
        world=SynthConfig(train_images=train_images, val_images=val_images, max_objects=max_objects,
                          min_radius=min_radius, max_radius=max_radius, seed=world_seed),
        detector_iterations=detector_iterations,
        mask_iterations=mask_iterations,
        overrides=list(set_ or []),
    )
    if seeds:
        cfg.seeds = list(seeds)
    if split:
        cfg.splits = list(split)
    with progress_bars() as progress:
        r = quickstart(cfg, out, progress)
    rows = summary_rows(r.summary)
    console.print(metrics_table(f"mask AP, mean over stage-2 seeds {cfg.seeds}", rows, list(next(iter(rows.values())))))
    for spec, s in r.summary["splits"].items():
        ratio = s["transfer_over_agnostic_B"]
        console.print(f"{spec}: transfer+MLP / class-agnostic+MLP on set B = {'n/a' if ratio is None else f'{ratio:.2f}x'}")
    console.print(f"[green]done[/] in {r.seconds:.0f} s")
    print_paths(report=r.report_md, json=r.report_json, picture=r.picture)

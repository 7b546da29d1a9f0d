"""``maskx quickstart``: the whole job on the built-in synthetic world (the shipped ``quickstart`` sweep)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.text import Text

from maskx_cli.console import console, guarded, metrics_table, print_paths, progress_bars
from maskx_cli.options import SET_SOURCE, config_options, world_options

WORLD = world_options({"seed": "--world-seed"})


@guarded
@config_options(WORLD)
def quickstart_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the world, the runs and the report.")] = Path("runs/quickstart"),
    seeds: Annotated[Optional[list[int]], typer.Option("--seed", help="Stage-2 seed (repeatable; default 0 and 1).")] = None,
    split: Annotated[Optional[list[str]], typer.Option("--split", help="Set A of a split (repeatable; default voc and random:40:0).")] = None,
    detector_iterations: Annotated[int, typer.Option(help="Stage-1 iterations (0: the recipe's).")] = 0,
    mask_iterations: Annotated[int, typer.Option(help="Stage-2 iterations (0: the recipe's).")] = 0,
    config: Annotated[str, typer.Option("--config", "-c", help="Recipe for the stages.")] = "synthetic",
    set_: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a config key of every stage, as "
                                                                          "in maskx sweep (repeatable).")] = None,
    values: dict | None = None,
) -> None:
    """Synthetic world -> detector -> embeddings -> mask heads -> eval on sets A and B -> report."""
    from pipelines.config import from_dict, parse_overrides
    from pipelines.data.world_config import SynthConfig
    from pipelines.evaluation.report import stage1_text, summary_rows, timing_text
    from pipelines.stages.quickstart import quickstart
    from pipelines.stages.sweep_spec import load_spec

    spec = load_spec("quickstart")
    spec.recipe, spec.world = config, from_dict(SynthConfig, values["world"])
    spec.detector_iterations, spec.mask_iterations = detector_iterations, mask_iterations
    spec.seeds = list(seeds) if seeds else spec.seeds
    spec.directions = list(split) if split else spec.directions
    with progress_bars() as progress:
        r = quickstart(spec, out, progress, parse_overrides(set_ or [], SET_SOURCE))
    if r.summary.get("stage1_by_device"):
        console.print(f"stage 1 on cuda, the stronger detector: {stage1_text(r.summary['stage1_by_device'])}")
    rows = summary_rows(r.summary)
    console.print(metrics_table(f"mask AP, mean over stage-2 seeds {spec.seeds}", rows, list(next(iter(rows.values())))))
    for direction, s in r.summary["splits"].items():
        ratio = s["transfer_over_agnostic_B"]
        console.print(Text(f"{direction}: transfer+MLP / class-agnostic+MLP on set B = {'n/a' if ratio is None else f'{ratio:.2f}x'}"))
    console.print(f"[green]done[/] in {r.seconds:.0f} s ({timing_text(r.summary['timings'])})")
    print_paths(report=r.report_md, json=r.report_json, picture=r.picture)

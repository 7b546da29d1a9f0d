"""``maskx sweep SPEC --out DIR``: a whole table of the paper (or any grid of variants) in one command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from maskx_cli.console import console, fail, guarded, metrics_table, print_paths, progress_bars
from maskx_cli.options import SET_SOURCE, command_flags, config_options, world_options

WORLD = world_options({"seed": "--world-seed"}, unset=True)


@guarded
@config_options(WORLD)
def sweep_cmd(
    spec: Annotated[str, typer.Argument(help="Sweep spec: a YAML path or a shipped name (table_3_1 ... table_3_5, figure_3_1, quickstart).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Sweep folder (rerun with the same folder to resume).")],
    detector: Annotated[Optional[Path], typer.Option(help="Reuse this detect-train run instead of training stage 1.")] = None,
    glove: Annotated[Optional[Path], typer.Option(help="GloVe text file for rows with head.input=glove.")] = None,
    seeds: Annotated[Optional[list[int]], typer.Option("--seed", help="Stage-2 seed (repeatable; default: the spec's).")] = None,
    max_val_images: Annotated[Optional[int], typer.Option(help="Evaluate on the first N validation images (0 = all).")] = None,
    only: Annotated[Optional[list[str]], typer.Option("--only", help="Run only the rows whose name contains this text (repeatable).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a config key of every stage, as the spec's "
                                                                          "overrides: (repeatable).")] = None,
    stage2: Annotated[Optional[list[str]], typer.Option("--stage2", help="Override a key of every mask-side run only, as the "
                                                        "spec's stage2:, e.g. --stage2 solver.iterations=100 (repeatable).")] = None,
    values: dict | None = None,
) -> None:
    """Train stage 1 once, every stage-2 variant of the spec on it, evaluate, write a paper-style table.

    The world options (--world-seed, --class-freq, --shapes, --appearance, ...) replace those fields
    of the spec's `world:`; the others keep the spec's values.
    """
    import dataclasses

    from pipelines.config import parse_overrides
    from pipelines.evaluation.report import display_rows, timing_text
    from pipelines.stages.sweep import run_sweep
    from pipelines.stages.sweep_spec import load_spec

    s = load_spec(spec)
    world = (values or {}).get("world") or {}
    if world and (detector or s.detector):
        flags = command_flags(sweep_cmd)
        fail(f"{' '.join(flags[f'world.{k}'] for k in world)}: the world is made only when stage 1 is trained; "
             "with --detector (or the spec's detector:) the detector run's data is used")
    if world:
        s.world = dataclasses.replace(s.world, **world)
    if seeds:
        s.seeds = list(seeds)
    if max_val_images is not None:
        s.max_val_images = max_val_images
    if only:
        s.rows = [r for r in s.rows if any(o.lower() in r.name.lower() for o in only)]
        if not s.rows:
            fail(f"no row of {spec} matches --only {' '.join(only)}")
    with progress_bars() as progress:
        r = run_sweep(s, out, detector, parse_overrides(stage2 or [], "--stage2"), str(glove) if glove else None, progress,
                      overrides=parse_overrides(set_ or [], SET_SOURCE))
    _, columns, shown = display_rows(s.all_directions(), r.rows)
    console.print(metrics_table(s.title or "sweep (mask AP)", shown, columns))
    console.print(f"[green]done[/] {r.ran} run(s) trained/evaluated, {r.skipped} already finished, {r.seconds:.0f} s "
                  f"({timing_text(r.timings)})")
    print_paths(table=r.table_md, summary=r.summary_json, **({"figure": r.figure} if r.figure else {}))

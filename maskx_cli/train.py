"""``maskx train``: end-to-end training of detector and mask side together (paper §2.2, Table 3.4)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from maskx_cli.console import console, guarded, print_paths, progress_bars, training_summary, warn, warn_missing_glove
from maskx_cli.options import DATA, END_TO_END, MASK_SIDE, SET_SOURCE, SOLVER, ConfigOpt, ResumeOpt, SetOpt, config_options


@guarded
@config_options(DATA, MASK_SIDE, END_TO_END, SOLVER)
def train_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder to create (holds model_final.pth and mask_final.pth).")],
    config: ConfigOpt = None,
    resume: ResumeOpt = False,
    set_: SetOpt = None,
    values: dict | None = None,
) -> None:
    """Train detector and mask side end to end: boxes of every class, masks of set A."""
    from maskx_cli.stages import print_set_a
    from pipelines.config import TrainE2EConfig, load_config
    from pipelines.stages.train_e2e import train_e2e

    cfg = load_config(TrainE2EConfig, config, [*(set_ or []), values], source=SET_SOURCE)
    with progress_bars() as progress:
        r = train_e2e(cfg, out, progress=progress, resume=resume)
    warn_missing_glove(r.missing_glove)
    warn(*r.data_warnings)
    console.print(f"[green]trained end to end[/] {r.head}, set A = {len(r.set_a)} classes, {r.train_images} images, "
                  + training_summary(r.stats))
    print_set_a(cfg.data.mask_classes, r.set_a, r.categories)
    print_paths(detector=r.detector_checkpoint, mask=r.mask_checkpoint, config=out / "config.yaml")

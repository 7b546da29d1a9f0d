"""``maskx train``: end-to-end training of detector and mask side together (paper §2.2, Table 3.4)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from maskx_cli.console import console, guarded, option_overrides, print_paths, progress_bars, warn, warn_missing_glove
from maskx_cli.main import app
from maskx_cli.stages import ConfigOpt, DeviceOpt, ResumeOpt, SetOpt


@app.command("train")
@guarded
def train_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder to create (holds model_final.pth and mask_final.pth).")],
    config: ConfigOpt = None,
    head: Annotated[Optional[str], typer.Option(help="transfer | agnostic | oracle")] = None,
    input_: Annotated[Optional[str], typer.Option("--input", help="Input of T: randn | glove | cls | box | cls+box")] = None,
    mlp: Annotated[Optional[bool], typer.Option("--mlp/--no-mlp", help="Fuse the class-agnostic MLP mask branch.")] = None,
    stop_gradient: Annotated[Optional[bool], typer.Option("--stop-gradient/--no-stop-gradient",
                                                          help="Stop the mask loss's gradient from T into w_det (default on).")] = None,
    mask_classes: Annotated[Optional[str], typer.Option(help="Set A: voc | nonvoc | random:N:SEED | ids:...")] = None,
    transfer_layers: Annotated[Optional[int], typer.Option(help="Layers of T: 1, 2 or 3.")] = None,
    transfer_activation: Annotated[Optional[str], typer.Option(help="none | relu | leaky_relu")] = None,
    glove: Annotated[Optional[Path], typer.Option(help="GloVe text file, for --input glove.")] = None,
    init_detector: Annotated[Optional[Path], typer.Option(help="Start from this detect-train run's weights (else from scratch).")] = None,
    iterations: Annotated[Optional[int], typer.Option(help="Training iterations.")] = None,
    device: DeviceOpt = None,
    resume: ResumeOpt = False,
    set_: SetOpt = None,
) -> None:
    """Train detector and mask side end to end: boxes of every class, masks of set A."""
    from pipelines.stages.train_e2e import load_e2e_config, train_e2e

    overrides = option_overrides(set_, {
        "head.head": head, "head.input": input_, "head.mlp": mlp, "head.stop_gradient": stop_gradient,
        "data.mask_classes": mask_classes, "head.transfer_layers": transfer_layers,
        "head.transfer_activation": transfer_activation, "head.glove": glove, "init_detector": init_detector,
        "solver.iterations": iterations, "solver.device": device})
    cfg = load_e2e_config(config, overrides)
    with progress_bars() as progress:
        r = train_e2e(cfg, out, progress=progress, resume=resume)
    warn_missing_glove(r.missing_glove)
    warn(*r.data_warnings)
    console.print(f"[green]trained end to end[/] {r.head}, set A = {len(r.set_a)} classes, {r.train_images} images, "
                  f"{r.stats.iterations} iterations in {r.stats.seconds:.0f} s, final loss {r.stats.mean_loss_last_window:.3f}")
    print_paths(detector=r.detector_checkpoint, mask=r.mask_checkpoint, config=out / "config.yaml")

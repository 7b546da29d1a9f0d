"""``maskx cache ...``: build the stage-2 feature cache ahead of time, or describe one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from maskx_cli.console import console, guarded, print_paths, progress_bars
from maskx_cli.main import app

cache_app = typer.Typer(help="The stage-2 feature cache (frozen-detector RoI features + mask targets).", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


@cache_app.command("build")
@guarded
def build_cmd(
    detector: Annotated[Path, typer.Option("--detector", "-d", help="Detector run folder (stage 1).")],
    config: Annotated[Optional[str], typer.Option("--config", "-c", help="YAML recipe (default: the detector run's).")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="auto | cpu | cuda")] = None,
    set_: Annotated[
        Optional[list[str]],
        typer.Option("--set", "-s", help="Override a config key, e.g. --set cache.proposals_per_instance=0 (repeatable)."),
    ] = None,
) -> None:
    """Build (or find) the cache that a later 'maskx mask-train' with the same settings reuses."""
    from maskx_cli.stages import _detector_data, _detector_recipe
    from pipelines.config import MaskTrainConfig, load_config
    from pipelines.stages.cache import cache_build

    overrides = list(set_ or [])
    if device:
        overrides.append(f"solver.device={device}")
    cfg = load_config(MaskTrainConfig, config or _detector_recipe(detector), overrides, section="mask_train")
    if not cfg.data.train_json:
        cfg.data = _detector_data(detector, cfg.data)
    with progress_bars() as progress:
        r = cache_build(cfg, detector, progress)
    info = r.cache.info()
    r.cache.close()
    console.print(f"[green]feature cache {'built' if r.built else 'already there, reused'}[/] {info['rois']} RoIs "
                  f"of {info['instances']} instances, {info['classes']} classes; features {info['dtype']} "
                  f"{'x'.join(map(str, info['feature_shape']))}; {_size(info['file_bytes'])} on disk, "
                  f"{_size(info['memory_bytes'])} in memory", highlight=False)
    print_paths(cache=r.path)


@cache_app.command("info")
@guarded
def info_cmd(path: Annotated[Path, typer.Argument(help="A cache file (features-<key>.h5).")]) -> None:
    """Describe a cache file: RoIs, instances, classes, shapes, sizes, key."""
    from pipelines.engine.cache import open_cache
    from pipelines.errors import MaskxError

    if not path.is_file():
        raise MaskxError("cache file not found", path)
    cache = open_cache(path, None)
    if cache is None:
        raise MaskxError("not a complete maskx feature cache (partial, corrupt or another format): delete it; "
                         "the next mask-train or 'maskx cache build' rebuilds it", path)
    info = cache.info()
    cache.close()
    for k in ("rois", "instances", "classes", "feature_shape", "dtype", "chunk_rows"):
        console.print(f"[dim]{k}:[/] {info[k]}", highlight=False)
    console.print(f"[dim]size:[/] {_size(info['file_bytes'])} on disk, {_size(info['memory_bytes'])} in memory", highlight=False)
    console.print(f"[dim]key:[/] {info['key']}", highlight=False)

"""``maskx cache ...``: build the stage-2 feature cache ahead of time, or describe one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from maskx_cli.console import console, guarded, print_paths, progress_bars, warn
from maskx_cli.options import CACHE, DATA, DEVICE, MASK_SIDE, SetOpt, config_options
from pipelines.io import format_size



@guarded
@config_options(DATA, {k: MASK_SIDE[k] for k in ("head", "mask_classes")}, DEVICE, CACHE)
def build_cmd(
    detector: Annotated[Path, typer.Option("--detector", "-d", help="Detector run folder (stage 1).")],
    config: Annotated[Optional[str], typer.Option("--config", "-c", help="YAML recipe (default: the detector run's).")] = None,
    set_: SetOpt = None,
    values: dict | None = None,
) -> None:
    """Build (or find) the cache that a later 'maskx mask-train' with the same settings reuses."""
    from maskx_cli.stages import load_mask_train_config
    from pipelines.stages.cache import cache_build

    cfg = load_mask_train_config(config, detector, set_, values)
    with progress_bars() as progress:
        r = cache_build(cfg, detector, progress)
    info = r.cache.info()
    r.cache.close()
    warn(*r.warnings)
    console.print(f"[green]feature cache {'built' if r.built else 'already there, reused'}[/] {info['rois']} RoIs "
                  f"of {info['instances']} instances, {info['classes']} classes; features {info['dtype']} "
                  f"{'x'.join(map(str, info['feature_shape']))}; {format_size(info['file_bytes'])} on disk, "
                  f"{format_size(info['memory_bytes'])} in memory", highlight=False)
    print_paths(cache=r.path)


@guarded
def info_cmd(path: Annotated[Path, typer.Argument(help="A cache file (features-<key>.h5).")]) -> None:
    """Describe a cache file: RoIs, instances, classes, shapes, sizes, key."""
    from pipelines.rois.store import open_cache
    from pipelines.errors import MaskxError

    if not path.is_file():
        raise MaskxError("cache file not found", path)
    cache = open_cache(path, None)
    if cache is None:
        raise MaskxError("not a complete maskx feature cache (partial, corrupt or another format): delete it; "
                         "the next mask-train or 'maskx cache build' rebuilds it", path)
    info = cache.info()
    cache.close()
    keys = ("rois", "instances", "images", "classes", "feature_shape", "dtype", "sampling", "proposals_per_instance",
            "rois_per_image", "fg_fraction", "hflip", "chunk_rows", "rows_file")
    print_paths(**{k: info[k] for k in keys if k in info})
    print_paths(size=f"{format_size(info['file_bytes'])} on disk, {format_size(info['memory_bytes'])} in memory", key=info["key"])

"""``maskx cache ...``: plan the stage-2 feature cache, build it ahead of time, or describe one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from maskx_cli.console import console, guarded, print_paths, progress_bars, warn
from maskx_cli.options import CACHE, DATA, DEVICE, MASK_SIDE, SET_SOURCE, SetOpt, config_options
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
    if path.suffix == ".rows":
        raise MaskxError(f"this is a cache's row file (the rows only): describe its description file instead, "
                         f"{path.with_suffix('.h5').name}", path)
    cache = open_cache(path, None)
    if cache is None:
        raise MaskxError("not a complete maskx feature cache (partial, corrupt or another format): delete it; "
                         "the next mask-train or 'maskx cache build' rebuilds it", path)
    info = cache.info()
    cache.close()
    keys = ("rois", "instances", "images", "classes", "feature_shape", "dtype", "sampling", "proposals_per_instance",
            "rois_per_image", "fg_fraction", "fg_per_image", "hflip", "chunk_rows", "rows_file")
    print_paths(**{k: info[k] for k in keys if k in info})
    plan = info["plan"]
    if plan:
        budget = f"budget {plan['budget_bytes'] / 1e9:g} GB" if plan.get("budget_bytes") else "no budget"
        print_paths(plan=f"up to {plan['rois']} RoIs, {format_size(plan['bytes'])} ({budget}), {plan['passes']:.1f}+ passes per RoI")
    print_paths(size=f"{format_size(info['file_bytes'])} on disk, {format_size(info['memory_bytes'])} in memory", key=info["key"])


@guarded
@config_options({"train_data": DATA["train_data"]}, {k: MASK_SIDE[k] for k in ("head", "mask_classes")}, DEVICE, CACHE)
def plan_cmd(
    config: Annotated[str, typer.Option("--config", "-c", help="YAML recipe (e.g. coco_voc_r50).")],
    rates: Annotated[Optional[Path], typer.Option("--rates", help="Rates from a JSON file ('cache plan --json' writes one) "
                                                                  "instead of measuring them here.")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the plan, the rates and the projection here.")] = None,
    set_: SetOpt = None,
    values: dict | None = None,
) -> None:
    """Plan a feature cache without building it: RoIs, bytes, passes per RoI, build and training time here, bottlenecks."""
    from pipelines.config import DetectTrainConfig, MaskTrainConfig, load_config
    from pipelines.io import read_json, write_json
    from pipelines.rois.projection import Rates, hours
    from pipelines.stages.cache import cache_plan

    cfg = load_config(MaskTrainConfig, config, [*(set_ or []), values or {}], source=SET_SOURCE)
    det = load_config(DetectTrainConfig, config).detector
    given = Rates.from_dict(read_json(rates, "rates file"), rates) if rates is not None else None
    r = cache_plan(cfg, det, given)
    warn(*r.warnings)
    p, x, t = r.plan, r.projection, r.rates
    parts = lambda d: ", ".join(f"{k} {hours(v)}" for k, v in d.items())  # noqa: E731
    print_paths(plan=p.describe())
    print_paths(rates=f"{t.device}, {t.source}: disk {t.read_mb_s:.0f} MB/s, decode {t.decode_images_s:.1f} images/s per worker, "
                      f"detector {t.detect_images_s:.2f} images/s, mask side {t.train_rois_s:.0f} RoIs/s, "
                      + (f"streaming reader {t.stream_rois_s:.0f} RoIs/s" if t.stream_rois_s else "streaming reader not measured"),
                build=f"~{hours(x.build_s)} for {r.image_copies} image copies ({parts(x.build_parts)}): bottleneck {x.build_bottleneck}",
                training=f"~{hours(x.train_s)} for {p.visits} RoI visits ({parts(x.train_parts)}; "
                         f"{'streamed from disk' if x.streamed else 'read into memory once'}): bottleneck {x.train_bottleneck}")
    if json_out is not None:
        write_json(json_out, r.to_dict())
        print_paths(json=json_out)

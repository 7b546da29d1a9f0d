"""Options that several commands share, declared once.

``--config`` / ``--set`` / ``--resume`` are plain annotated types. Options that set a config key
are :class:`Opt` s in groups (``SOLVER``, ``MASK_SIDE``, ``CACHE``, ``END_TO_END``, ``EVAL``, and the
synthetic world's, made from :class:`~pipelines.data.world_config.SynthConfig`'s fields by
:func:`world_options`); :func:`config_options` adds a group's options to a command, which then
receives ``values``: the typed values the user gave, as a nested mapping ``{section: {key: value}}``
that :func:`pipelines.config.load_config` takes as an override. :func:`command_flags` is how an error
about a config key or a parameter shows this command's flag for it.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from pipelines.data.world_config import APPEARANCES, CLASS_FREQS, SHAPES, SynthConfig

SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override a config key, e.g. --set solver.lr=0.01 (repeatable)."),
]
ConfigOpt = Annotated[Optional[str], typer.Option("--config", "-c", help="YAML recipe: a path or a shipped name (synthetic, coco_voc_r50, ...).")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue from the run folder's last checkpoint.")]
SET_SOURCE = "--set"  # what errors call an override given with --set


@dataclass(frozen=True)
class Opt:
    """A command-line option that sets config key ``key`` (None: not given)."""

    key: str
    annotation: Any
    default: Any = None


SOLVER = {
    "iterations": Opt("solver.iterations", Annotated[Optional[int], typer.Option(help="Training iterations (overrides the recipe).")]),
    "device": Opt("solver.device", Annotated[Optional[str], typer.Option("--device", help="auto | cpu | cuda")]),
}
DEVICE = {"device": SOLVER["device"]}
CACHE = {
    "ram_budget_gb": Opt("cache.ram_budget_gb", Annotated[Optional[float], typer.Option(
        help="Read the feature cache into memory up to this size, stream it from disk above (cache.ram_budget_gb).")]),
}
DATA = {
    "train_data": Opt("data.train_json", Annotated[Optional[Path], typer.Option("--train-data", help=(
        "Training annotations, COCO format (data.train_json): classes with masks and box-only classes may share it. "
        "Later stages take it from the detector run."))]),
    "train_images": Opt("data.train_images", Annotated[Optional[Path], typer.Option("--train-images", help=(
        "Image folder of --train-data (data.train_images)."))]),
    "val_data": Opt("data.val_json", Annotated[Optional[Path], typer.Option("--val-data", help=(
        "Validation annotations, COCO format (data.val_json)."))]),
    "val_images": Opt("data.val_images", Annotated[Optional[Path], typer.Option("--val-images", help=(
        "Image folder of --val-data (data.val_images)."))]),
}
MASK_SIDE = {
    "head": Opt("head.head", Annotated[Optional[str], typer.Option(help="transfer | agnostic | oracle")]),
    "input_": Opt("head.input", Annotated[Optional[str], typer.Option("--input", help="Input of T: randn | glove | cls | box | cls+box")]),
    "mlp": Opt("head.mlp", Annotated[Optional[bool], typer.Option("--mlp/--no-mlp", help="Fuse the class-agnostic MLP mask branch.")]),
    "mask_classes": Opt("data.mask_classes", Annotated[Optional[str], typer.Option(help=(
        "Set A: annotated (the classes with masks in the training file) | voc | nonvoc (COCO's categories) | "
        "random:N:SEED | ids:1,2,3"))]),
    "transfer_layers": Opt("head.transfer_layers", Annotated[Optional[int], typer.Option(help="Layers of T: 1, 2 or 3.")]),
    "transfer_activation": Opt("head.transfer_activation", Annotated[Optional[str], typer.Option(help="none | relu | leaky_relu")]),
    "glove": Opt("head.glove", Annotated[Optional[Path], typer.Option(help="GloVe text file, for --input glove.")]),
}
END_TO_END = {
    "stop_gradient": Opt("head.stop_gradient", Annotated[Optional[bool], typer.Option(
        "--stop-gradient/--no-stop-gradient", help="Stop the mask loss's gradient from T into w_det (default on).")]),
    "init_detector": Opt("init_detector", Annotated[Optional[Path], typer.Option(
        help="Start from this detect-train run's weights (else from scratch).")]),
}
EVAL = {
    "split": Opt("split", Annotated[Optional[str], typer.Option(
        help="Set B, the classes reported as unseen: nonvoc | voc | random:N:SEED | ids:... (default: the classes the "
             "run had no masks for; with --results: nonvoc).")]),
    "max_images": Opt("max_images", Annotated[Optional[int], typer.Option(help="Evaluate on the first N images only (0 = all).")]),
}
EVAL_BACKEND = {
    "backend": Opt("backend", Annotated[Optional[str], typer.Option(
        help="faster | reference (pycocotools' COCOeval, lvis' LVISEval): the same numbers but for the last bit "
             "of a float (at most 2.2e-16 apart).")]),
}

WORLD_HELP = {
    "num_classes": "Number of classes (the first 80 are named and numbered like COCO's).",
    "train_images": "Training images.",
    "val_images": "Validation images.",
    "image_size": "Image side in pixels.",
    "min_objects": "Fewest objects per image.",
    "max_objects": "Most objects per image.",
    "min_radius": "Smallest object radius, pixels at 128 px (scaled with the image size).",
    "max_radius": "Largest object radius, pixels at 128 px.",
    "seed": "Random seed of the world: the same seed gives the same files.",
    "class_freq": f"Class frequencies: {' | '.join(CLASS_FREQS)} (coco: COCO train2017's long tail).",
    "class_freq_power": "Exponent on COCO's instance counts (1: COCO's own tail, 0: uniform).",
    "shapes": f"Object shapes: {' | '.join(SHAPES)} (class: a shape prior per class).",
    "appearance": f"Look of the images: {' | '.join(APPEARANCES)} (photo: scene background, two-colour objects, uneven light).",
    "names": "Class names: coco (COCO's names and ids) | own (ids 1..K, own names, no COCO ids: a labelling tool's export).",
    "box_only_classes": "Classes whose training annotations have boxes only (segmentation absent, null, [] in turn).",
    "unmasked_fraction": "Share of the other training annotations without a mask (segmentation []).",
}


def world_options(flags: dict[str, str] | None = None, unset: bool = False) -> dict[str, Opt]:
    """One option per field of the synthetic world's config (key ``world.<field>``, default the field's).

    ``flags`` renames some (field -> flag, e.g. ``{"seed": "--world-seed"}``). With ``unset`` every
    option defaults to None, so ``values["world"]`` holds only the fields given (a sweep spec's
    ``world:`` keeps the rest).
    """
    hints = typing.get_type_hints(SynthConfig)
    out = {}
    for f in dataclasses.fields(SynthConfig):
        flag = (flags or {}).get(f.name, "--" + f.name.replace("_", "-"))
        help_text = WORLD_HELP.get(f.name, f.name.replace("_", " ").capitalize() + " of the synthetic world.")
        kind = Optional[hints[f.name]] if unset else hints[f.name]
        out[f"world_{f.name}"] = Opt(f"world.{f.name}", Annotated[kind, typer.Option(flag, help=help_text)],
                                     None if unset else f.default)
    return out


_KEY_OF_PARAM: dict[str, str] = {}  # parameter name -> config key, over every declared group


def _nested(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for key, value in flat.items():
        node = out
        *sections, last = key.split(".")
        for s in sections:
            node = node.setdefault(s, {})
        node[last] = str(value) if isinstance(value, Path) else value
    return out


def config_options(*groups: dict[str, Opt]) -> Callable[[Callable], Callable]:
    """Add the options of ``groups`` to a command; it gets ``values`` (the given ones, nested by config key)."""
    opts = {name: o for g in groups for name, o in g.items()}
    for name, o in opts.items():
        _KEY_OF_PARAM[name] = o.key

    def decorate(fn: Callable) -> Callable:
        sig = inspect.signature(fn, eval_str=True)
        params = [p for p in sig.parameters.values() if p.name != "values"]
        params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=o.annotation, default=o.default)
                   for name, o in opts.items()]

        @functools.wraps(fn)
        def wrapper(**kwargs):
            given = {opts[name].key: kwargs.pop(name) for name in opts}
            return fn(**kwargs, values=_nested({k: v for k, v in given.items() if v is not None}))

        wrapper.__signature__ = sig.replace(parameters=params)
        return wrapper

    return decorate


def command_flags(fn: Callable) -> dict[str, str]:
    """A command's long flag for each config key and parameter it has (``head.glove`` and ``glove`` -> ``--glove``)."""
    flags: dict[str, str] = {}
    for name, param in inspect.signature(fn, eval_str=True).parameters.items():
        info = next((m for m in getattr(param.annotation, "__metadata__", ()) if isinstance(m, typer.models.OptionInfo)), None)
        if info is None:
            continue
        decls = [d for d in (info.param_decls or ()) if d.startswith("--")]
        if isinstance(info.default, str) and info.default.startswith("--"):  # Option("--flag") in Annotated
            decls.insert(0, info.default)
        flag = decls[0].split("/")[0] if decls else "--" + name.replace("_", "-")
        flags[name] = flag
        if name in _KEY_OF_PARAM:
            flags[_KEY_OF_PARAM[name]] = flag
    return flags

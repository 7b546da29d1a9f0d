"""Sweep specs (``maskx sweep``, ``maskx quickstart``): the YAML files of ``pipelines/configs/sweeps/``.

:class:`SweepSpec` is read by :func:`pipelines.config.load_config`, like every config, and checked by
:func:`check_spec`: a row's ``train:`` and ``masks:`` must name a row kind and a source of training
masks of :mod:`pipelines.stages.sweep_rows` (its tables :data:`~pipelines.stages.sweep_rows.ROW_KINDS`
and :data:`~pipelines.stages.sweep_rows.TRAINING_MASKS`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.config import CONFIG_DIR, check_stage_overrides, load_config, parse_overrides, resolve_shipped
from pipelines.data.world_config import SynthConfig
from pipelines.errors import MaskxError
from pipelines.stages.sweep_rows import row_kind, training_masks

SPEC_DIR = CONFIG_DIR / "sweeps"
INTERNAL = {"internal": True}  # a field the loader fills; a file may not set it


@dataclass
class SweepRow:
    """One method of a sweep table: how it is trained and the overrides that make it."""

    name: str = ""
    train: str = "stagewise"  # its kind, a key of sweep_rows.ROW_KINDS: stagewise | e2e | grabcut-test
    masks: str = "gt"  # its training masks, a key of sweep_rows.TRAINING_MASKS: gt | grabcut (set-B masks by GrabCut)
    set: list[str] = field(default_factory=list)  # section.key=value overrides of this row's runs

    @property
    def slug(self) -> str:
        return slugify(self.name)


@dataclass
class RandomSplits:
    sizes: list[int] = field(default_factory=list)  # |A| of each split
    trials: int = 1  # splits per size: directions random:N:0 .. random:N:trials-1


@dataclass
class E2ESettings:
    init: str = "stage1"  # stage1 (start from the sweep's detector) | scratch
    iterations: int = 0  # 0: the recipe's detector schedule


@dataclass
class FigureSpec:
    numerator: str = ""  # row names of the Figure 3.1 plot (none: no figure)
    denominator: str = ""


@dataclass
class SweepSpec:
    """A grid of stage-2 variants on one detector, laid out like the paper (see ``pipelines.stages.sweep``)."""

    title: str = ""
    recipe: str = "synthetic"  # the stages' recipe (pipelines/configs/<recipe>.yaml)
    world: SynthConfig = field(default_factory=SynthConfig)  # the synthetic world made in OUT/world
    detector: str = ""  # a finished detect-train run to reuse (its data is used) instead of the world
    detector_iterations: int = 0  # 0: the recipe's
    mask_iterations: int = 0  # iterations of every mask-side run (0: the recipe's)
    directions: list[str] = field(default_factory=lambda: ["voc", "nonvoc"])  # set A of each split
    random_splits: RandomSplits = field(default_factory=RandomSplits)  # instead of directions
    seeds: list[int] = field(default_factory=lambda: [0])  # stage-2 seeds
    overrides: list[str] = field(default_factory=list)  # section.key=value for every stage
    stage2: list[str] = field(default_factory=list)  # section.key=value for every mask-side run
    e2e: E2ESettings = field(default_factory=E2ESettings)
    max_val_images: int = 0
    rows: list[SweepRow] = field(default_factory=list)
    figure: FigureSpec = field(default_factory=FigureSpec)
    path: str = field(default="", metadata=INTERNAL)  # the spec file

    def all_directions(self) -> list[str]:
        if self.random_splits.sizes:
            return [f"random:{n}:{t}" for n in self.random_splits.sizes for t in range(self.random_splits.trials)]
        return list(self.directions)


def slugify(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "row"


def resolve_spec_path(name: str | Path) -> Path:
    """A sweep spec path, or the name of a spec shipped in ``pipelines/configs/sweeps`` (``table_3_1``)."""
    return resolve_shipped(name, SPEC_DIR, "sweep spec")


def load_spec(name: str | Path) -> SweepSpec:
    """Read and check a sweep spec (a file or a shipped name): unknown keys, bad rows, one clear error."""
    path = resolve_spec_path(name)
    spec = load_config(SweepSpec, path)
    spec.path = str(path)
    check_spec(spec)
    return spec


def check_spec(spec: SweepSpec) -> None:
    """Rows named, unique and of known kinds; directions; e2e and figure settings; overrides well formed."""
    where = spec.path or None
    if not spec.rows:
        raise MaskxError("the sweep has no rows", where)
    for i, row in enumerate(spec.rows):
        if not row.name:
            raise MaskxError(f"row #{i + 1} needs a 'name'", where)
        row_kind(row, where)
        training_masks(row, where)
        parse_overrides(row.set, f"{where}: row '{row.name}'" if where else f"row '{row.name}'")
    slugs = [r.slug for r in spec.rows]
    dup = next((s for s in slugs if slugs.count(s) > 1), None)
    if dup:
        raise MaskxError(f"two rows have the same name (as a folder name: '{dup}')", where)
    if not spec.all_directions():
        raise MaskxError("the sweep has no split direction", where)
    if spec.e2e.init not in ("stage1", "scratch"):
        raise MaskxError(f"e2e.init must be stage1 or scratch, got '{spec.e2e.init}'", where)
    names = {r.name for r in spec.rows}
    for row_name in (spec.figure.numerator, spec.figure.denominator) if spec.figure.numerator or spec.figure.denominator else ():
        if row_name not in names:
            raise MaskxError(f"figure row '{row_name}' is not a row of the sweep", where)
    check_stage_overrides(parse_overrides(spec.overrides, where or "override"))
    parse_overrides(spec.stage2, where or "override")

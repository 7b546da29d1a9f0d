"""The kinds of sweep rows, one small class each, in one table: how a row's runs are configured and
trained, and what produces the predictions it is scored on.

A spec row names its kind with ``train:`` (:data:`ROW_KINDS`: stage-wise mask heads on the sweep's
detector, end-to-end models, GrabCut at test time) and where its training masks come from with
``masks:`` (:data:`TRAINING_MASKS`: the ground truth's, or set B's replaced by GrabCut's). The sweep
(:mod:`pipelines.stages.sweep`) plans, trains and scores every row through these classes and never
reads a kind's name; a new baseline row is one class here, added to the table
(``docs/architecture.md``, "How to add a baseline row to a sweep").
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

from pipelines.config import EvalConfig, MaskTrainConfig, Override, TrainE2EConfig
from pipelines.data.grabcut import grabcut_annotations
from pipelines.data.splits import complement, resolve_split
from pipelines.engine.run_dir import LAST, MASK_CKPT, DetectorRun, check_same_settings, load_detector_run, load_mask_run
from pipelines.errors import MaskxError
from pipelines.evaluation.inference import EvalData, GrabCutPredictions, HeadPredictions, PredictionProducer
from pipelines.modeling.mask_heads import trains_every_class
from pipelines.progress import Progress
from pipelines.stages.mask_train import mask_train
from pipelines.stages.train_e2e import train_e2e


@dataclass
class SweepContext:
    """What every job of a sweep shares: the spec, stage 1, embeddings, validation data, eval config."""

    spec: Any  # the SweepSpec (pipelines.stages.sweep_spec)
    out: Path
    every: list[Override]  # overrides of every stage
    det: DetectorRun  # stage 1
    data: dict  # train_json, train_images, val_json, val_images
    embeddings: Path
    val: EvalData  # the validation ground truth and images every row is scored on
    eval_cfg: EvalConfig
    progress: Progress
    timings: dict[str, float]  # seconds per part of the sweep's wall time, added to while it runs

    def sets_of(self, direction: str) -> dict[str, list[int]]:
        """``{"B": the other classes, "A": the direction's}`` (a direction names set A)."""
        cats = self.val.gt["categories"]
        set_a = resolve_split(direction, cats)
        return {"B": complement(set_a, cats), "A": set_a}

    @contextlib.contextmanager
    def timed(self, part: str) -> Iterator[None]:
        """Add the seconds of the ``with`` block to ``timings[part]``."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.timings[part] += time.perf_counter() - t


@dataclass
class Job:
    """One (row, direction, seed) of a sweep: its result file and, for a row that trains, its run."""

    row: Any  # the SweepRow
    kind: RowKind
    masks: TrainingMasks
    direction: str  # set A spec
    seed: int
    result: Path
    run: Path | None = None  # the run folder (None: the row trains nothing)
    config: Any = None  # its resolved config (kind.config_cls)
    note: str = ""  # why it is skipped


def train_or_reuse(run: Path, checkpoint: str, cfg: Any, train: Callable[[bool], Any]) -> Any:
    """Train into ``run`` (resuming a ``last.pth``) unless it holds a finished run of the same config;
    returns what ``train`` returned (None if reused)."""
    if (run / checkpoint).is_file():
        check_same_settings(run, cfg)
        return None
    return train((run / LAST).is_file())


# --------------------------------------------------------------------------------------------
# Where a row's training masks come from (the spec's ``masks:``)
class TrainingMasks:
    """The ground truth's masks of set A: the training file as it is."""

    name: ClassVar[str] = "gt"
    same_for_every_direction: ClassVar[bool] = True  # one training file whatever the split

    def layers(self, ctx: SweepContext, direction: str) -> list[dict]:
        """Config layers of a run of ``direction`` (after the row's and the split's)."""
        return []

    def prepare(self, ctx: SweepContext, direction: str) -> None:
        """Make what the run of ``direction`` reads (before it trains)."""


class GrabCutMasks(TrainingMasks):
    """Set B's masks replaced by GrabCut's inside their ground-truth boxes (Table 3.5's "Mask R-CNN
    trained w/ GrabCut"), one training file per direction; the head trains on every class."""

    name = "grabcut"
    same_for_every_direction = False

    @staticmethod
    def path(ctx: SweepContext, direction: str) -> Path:
        return ctx.out / "grabcut" / f"train_grabcut_{direction.replace(':', '-')}.json"

    def layers(self, ctx, direction):
        return [{"data": {"train_json": str(self.path(ctx, direction))}, "head": {"head": "oracle"}}]

    def prepare(self, ctx, direction):
        path = self.path(ctx, direction)
        if not path.is_file():
            cats = ctx.val.gt["categories"]
            set_b = complement(resolve_split(direction, cats), cats)
            grabcut_annotations(ctx.data["train_json"], ctx.data["train_images"], "ids:" + ",".join(map(str, set_b)), path,
                                progress=ctx.progress)


TRAINING_MASKS: dict[str, type[TrainingMasks]] = {cls.name: cls for cls in (TrainingMasks, GrabCutMasks)}


# --------------------------------------------------------------------------------------------
# Row kinds (the spec's ``train:``)
class RowKind:
    """A kind of sweep row. A kind that trains has a ``config_cls`` and writes ``checkpoint`` into
    its run folder; every kind says which jobs are scored in one prediction pass
    (:meth:`evaluation_key`) and what produces their predictions (:meth:`producer`)."""

    name: ClassVar[str]
    config_cls: ClassVar[type | None] = None  # the config of its runs (None: it trains nothing)
    checkpoint: ClassVar[str] = MASK_CKPT

    # The resolved config of a run: recipe < data < base_layers < glove < overrides of every stage <
    # stage2 < schedule_layers < the row's set < split and seed < the masks' layers < final_layers.
    def base_layers(self, ctx: SweepContext) -> list[dict]:
        return []

    def schedule_layers(self, ctx: SweepContext) -> list[dict]:
        return []

    def final_layers(self, ctx: SweepContext) -> list[dict]:
        return []

    def shares_run(self, cfg: Any, masks: TrainingMasks) -> bool:
        """Whether one run (trained for the first direction) serves every direction."""
        return False

    def train(self, ctx: SweepContext, job: Job) -> None:
        """Train ``job.run`` (or reuse it when finished with the same config)."""

    def evaluation_key(self, job: Job) -> str:
        """Jobs with the same key are scored in one pass (:meth:`producer` of all of them)."""
        raise NotImplementedError

    def producer(self, ctx: SweepContext, jobs: list[Job]) -> tuple[PredictionProducer, dict[Path, str]]:
        """What predicts for ``jobs``, and per job (its result path) the name of its predictions."""
        raise NotImplementedError


class StageWise(RowKind):
    """Stage 2: a mask head trained on the sweep's frozen detector (``mask-train``), from one feature
    cache of every class; every stage-wise head is scored in one pass over the detector's detections."""

    name = "stagewise"
    config_cls = MaskTrainConfig

    def base_layers(self, ctx):
        return [{"cache": {"classes": "all"}}]  # one cache serves every row, split and seed (unless the sweep says otherwise)

    def schedule_layers(self, ctx):
        return [{"solver": {"iterations": ctx.spec.mask_iterations}}] if ctx.spec.mask_iterations else []

    def shares_run(self, cfg, masks):
        # a head that trains on every class's masks (the oracle) does not depend on the split
        return masks.same_for_every_direction and trains_every_class(cfg.head.head)

    def train(self, ctx, job):
        t = time.perf_counter()
        r = train_or_reuse(job.run, self.checkpoint, job.config, lambda resume: mask_train(
            job.config, ctx.det.run_dir, ctx.embeddings, job.run, ctx.progress, resume))
        if r is not None:
            ctx.timings["stage 2 training"] += r.stats.seconds
            ctx.timings["stage 2 setup (feature cache)"] += time.perf_counter() - t - r.stats.seconds

    def evaluation_key(self, job):
        return "stage-wise heads"

    def producer(self, ctx, jobs):
        runs = {str(j.run): load_mask_run(j.run, ctx.det) for j in jobs}
        return (HeadPredictions.of_runs(ctx.det, runs, ctx.eval_cfg.gt_boxes, ctx.spec.path or None),
                {j.result: str(j.run) for j in jobs})


class EndToEnd(RowKind):
    """End-to-end training of detector and mask side (``maskx train``), from the sweep's detector or
    from scratch (``e2e.init``); each run is scored on its own detector."""

    name = "e2e"
    config_cls = TrainE2EConfig

    def final_layers(self, ctx):
        e2e, layers = ctx.spec.e2e, []
        if e2e.iterations:
            layers.append({"solver": {"iterations": e2e.iterations}})
        if e2e.init == "stage1":
            layers.append({"init_detector": str(ctx.det.checkpoint)})
        return layers

    def train(self, ctx, job):
        with ctx.timed("stage 2 training"):
            train_or_reuse(job.run, self.checkpoint, job.config, lambda resume: train_e2e(job.config, job.run, ctx.progress, resume))

    def evaluation_key(self, job):
        return str(job.run)

    def producer(self, ctx, jobs):
        det = load_detector_run(jobs[0].run)
        runs = {str(jobs[0].run): load_mask_run(jobs[0].run, det)}
        return HeadPredictions.of_runs(det, runs, ctx.eval_cfg.gt_boxes), {j.result: str(j.run) for j in jobs}


class GrabCutAtTest(RowKind):
    """"Faster R-CNN tested w/ GrabCut" (Table 3.5): the sweep's detector's boxes, GrabCut masks inside them; nothing trained."""

    name = "grabcut-test"

    def evaluation_key(self, job):
        return "grabcut at test"

    def producer(self, ctx, jobs):
        producer = GrabCutPredictions(ctx.det)
        return producer, {j.result: producer.name for j in jobs}


ROW_KINDS: dict[str, type[RowKind]] = {cls.name: cls for cls in (StageWise, EndToEnd, GrabCutAtTest)}


def row_kind(row: Any, where: str | Path | None = None) -> RowKind:
    """The kind a spec row names (``train:``); an unknown one is an error naming ``where`` (the spec)."""
    if row.train not in ROW_KINDS:
        raise MaskxError(f"row '{row.name}': train must be one of {' | '.join(ROW_KINDS)}, got '{row.train}'", where)
    return ROW_KINDS[row.train]()


def training_masks(row: Any, where: str | Path | None = None) -> TrainingMasks:
    """Where a spec row's training masks come from (``masks:``); an unknown source is an error naming ``where``."""
    if row.masks not in TRAINING_MASKS:
        raise MaskxError(f"row '{row.name}': masks must be one of {' | '.join(TRAINING_MASKS)}, got '{row.masks}'", where)
    return TRAINING_MASKS[row.masks]()

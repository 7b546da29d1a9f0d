"""Run folders, read and written here: config, manifest, metrics, recipe, and the checkpoint of each kind.

A run folder holds ``config.yaml`` (the resolved config, with ``stage``), ``manifest.json`` (command,
versions, every input file with its SHA-256), ``metrics.jsonl`` (one JSON object per logged step),
optionally ``recipe.yaml`` (the recipe a detector was trained with: what stage 2 reads by default),
and its final checkpoint, one plain dict (:func:`pipelines.checkpoint.save_checkpoint`) per kind:

- ``model_final.pth``, kind ``detector``: ``model`` (Faster R-CNN state dict), ``config`` (the
  resolved config, with ``detector``), ``categories``, ``iteration`` (+ ``end_to_end``);
- ``mask_final.pth``, kind ``mask``: ``model`` (:class:`~pipelines.modeling.mask_heads.MaskSide`
  state dict), ``config``, ``head`` (its :class:`~pipelines.config.HeadConfig`), ``categories``,
  ``set_a``, ``detector_sha256`` (of the detector it was trained against), ``embed_dim`` (width of
  ``w_det``, 0 without T), ``in_channels``, ``iteration`` (+ ``end_to_end``).

Each final checkpoint's SHA-256 is recorded in the manifest when it is written (``checkpoints``:
file name -> SHA-256, :func:`record_checkpoint`) and checked when it is read
(:func:`check_recorded_sha256`): a checkpoint damaged or replaced since is refused with one line.

A training stage opens its folder with :func:`training_run`, so that a run folder is always in one
of three states its manifest names: ``running`` (or killed), ``failed`` (with the error line and a
checkpoint to resume from) or ``finished``. A run that fails before its first checkpoint leaves
nothing new behind.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import platform
import shutil
import sys
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torchvision.models.detection import FasterRCNN

from pipelines import __version__
from pipelines.config import (DATA_PATH_KEYS, DataConfig, DetectorConfig, EvalConfig, HeadConfig, from_dict, load_config,
                              resolve_config_path, to_dict)
from pipelines.engine import distributed as dist
from pipelines.checkpoint import SCHEMAS, TRAINING, half_precision, load_checkpoint, load_state, save_checkpoint
from pipelines.errors import MaskxError
from pipelines.io import (discard, file_lock, os_error_reason, read_json, read_yaml, remove_stale_temporaries, sha256_file,
                          write_json, write_problem, write_text, write_yaml)
from pipelines.modeling.detector import detector_from_state
from pipelines.modeling.embeddings import Embeddings
from pipelines.modeling.mask_heads import MaskSide, TransferPredictor
from pipelines.modeling.maskx_rcnn import build_mask_side

CONFIG = "config.yaml"
MANIFEST = "manifest.json"
METRICS = "metrics.jsonl"
LAST = "last.pth"  # the training checkpoint (pipelines.engine.loop.Trainer)
TENSORBOARD = "tb"
RECIPE = "recipe.yaml"
# What one training attempt writes besides its checkpoints: stale once no checkpoint goes with them.
ATTEMPT_FILES = (CONFIG, MANIFEST, METRICS, TENSORBOARD, RECIPE)
RUN_LOCK = ".run.lock"  # held (flock) by the process writing the run folder
DETECTOR_CKPT = "model_final.pth"
MASK_CKPT = "mask_final.pth"


def make_output_dir(out: str | Path) -> Path:
    """Create the folder ``out`` (and parents) or raise one clear MaskxError."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MaskxError("output path exists and is not a folder", out)
    check_output_folder(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MaskxError(f"cannot create output folder: {exc.strerror}", out) from None
    return out


def check_output_folder(out: str | Path) -> None:
    """Refuse, before any work, an output folder that no file can be written in (on a read-only
    file system, without write permission), or that cannot be created for that reason: one error naming ``out``."""
    out = Path(out)
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        return  # a file on the way: make_output_dir names it
    problem = write_problem(existing)
    if problem:
        raise MaskxError(f"cannot write here: {problem}" if existing == out else f"cannot create output folder: {problem}", out)


def prepare_run_dir(out: str | Path, stage: str, config: dict, inputs: dict[str, str | Path], extra: dict | None = None) -> Path:
    """Create ``out`` and write its resolved config and manifest (input paths with SHA-256)."""
    out = make_output_dir(out)
    write_yaml(out / CONFIG, {"stage": stage, **config})
    manifest = {
        "stage": stage,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:]),
        "maskx": __version__,
        "torch": str(torch.__version__),
        "python": platform.python_version(),
        "inputs": {k: file_record(v) for k, v in inputs.items()},
        "status": "running",
        **(extra or {}),
    }
    write_json(out / MANIFEST, manifest)
    return out


@contextlib.contextmanager
def training_run(out: str | Path, resume: bool, finished: tuple[str, ...]) -> Iterator[Path]:
    """Open the run folder ``out`` of one training attempt (``finished``: its final checkpoint names).

    On entry (rank 0): a folder holding an unfinished run (``last.pth``) is refused unless
    ``resume``; temporaries of writes cut short by a kill are removed; and when there is no
    checkpoint at all, what an earlier failed attempt left (config, manifest, metrics, TensorBoard
    events) is removed, so the run starts clean. On failure: with no checkpoint written, the
    attempt's files are removed again (and the folder, if this attempt created it); otherwise the
    manifest records ``status: failed`` and the error line, beside the checkpoint to resume from.
    The folder is held (:func:`run_lock`) from entry to exit: a second run into it is refused. On
    success, with every ``finished`` checkpoint written, the training checkpoint ``last.pth`` is
    removed (it is kept on failure or a stop, to resume from).
    """
    out = Path(out)
    created = not out.exists()
    with contextlib.ExitStack() as held:
        if dist.launched_rank() == 0:  # before the process group is joined, too
            held.enter_context(run_lock(make_output_dir(out)))
        if dist.launched_rank() == 0 and not created:
            if (out / LAST).is_file() and not resume:
                raise MaskxError(f"holds an unfinished run ({LAST}): add resume to continue it, or choose another output folder",
                                 out, key="resume")
            remove_stale_temporaries(out)
            if not _has_checkpoint(out, finished):
                _remove_attempt(out)
        try:
            yield out
        except BaseException as exc:
            if dist.is_main():
                _record_failure(out, created, finished, exc)
            raise
        if dist.is_main() and all((out / name).is_file() for name in finished):
            (out / LAST).unlink(missing_ok=True)  # finished: the final checkpoints hold the weights


@contextlib.contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold the run folder ``out`` (creating it) while this process writes it: a second run into the
    same folder is refused with one line naming it, not let to mix its files with this one's. The
    lock (``out/.run.lock``) is released on exit, and by the kernel when the process dies."""
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(file_lock(out / RUN_LOCK, wait=False))
        except BlockingIOError:
            raise MaskxError("another run is writing this folder now: wait for it to end, or choose another output folder",
                             out) from None
        yield


def _has_checkpoint(out: Path, finished: tuple[str, ...]) -> bool:
    """Whether ``out`` holds a checkpoint: this stage's, or any other (a folder of another stage is not swept)."""
    return any((out / name).is_file() for name in (LAST, *finished)) or any(out.glob("*.pth"))


def _remove_attempt(out: Path) -> None:
    for name in ATTEMPT_FILES:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _record_failure(out: Path, created: bool, finished: tuple[str, ...], exc: BaseException) -> None:
    """Leave nothing new (no checkpoint yet) or a manifest that says the run failed, and why.

    Done as far as the disk lets it: on a disk still full or turned read-only, what cannot be
    removed or written stays, and the run's own error is the one reported.
    """
    if not out.is_dir():
        return
    with contextlib.suppress(MaskxError, OSError):
        remove_stale_temporaries(out)
        if not _has_checkpoint(out, finished):
            _remove_attempt(out)
            if created and all(p.name == RUN_LOCK for p in out.iterdir()):  # only this run's lock, held
                discard(out / RUN_LOCK)
                out.rmdir()
            return
        error = exc.line() if isinstance(exc, MaskxError) else f"{exc.__class__.__name__}: {exc}".splitlines()[0]
        update_manifest(out, status="failed", error=error)


def file_record(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_file():
        return {"path": str(path), "sha256": sha256_file(path)}
    return {"path": str(path)}


def update_manifest(run: str | Path, **fields: Any) -> None:
    path = Path(run) / MANIFEST
    manifest = read_json(path, "run manifest") if path.is_file() else {}
    manifest.update(fields)
    write_json(path, manifest)


def read_manifest(run: str | Path) -> dict:
    return read_json(Path(run) / MANIFEST, "run manifest")


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` (flushed each write)."""

    def __init__(self, run: str | Path, enabled: bool = True):
        self.path = Path(run) / METRICS
        self.enabled = enabled

    def write(self, **record: Any) -> None:
        if not self.enabled:
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as exc:  # a line cut short by a full disk is dropped when the run is resumed
            raise MaskxError(f"could not be written: {os_error_reason(exc)}", self.path) from None


# --------------------------------------------------------------------------------------------
# Finished runs and their checkpoints
def check_not_finished(out: str | Path, checkpoint: str, what: str) -> None:
    """Refuse to train into a folder that already holds a finished run (``checkpoint``), or that cannot be written."""
    if (Path(out) / checkpoint).exists():
        raise MaskxError(f"already holds a finished {what} ({checkpoint}); choose another output folder", out)
    check_output_folder(out)


def check_same_settings(run: str | Path, cfg: Any) -> None:
    """A finished run is reused only if it was made with the same resolved config."""
    saved = read_yaml(Path(run) / CONFIG, "run config") or {}
    saved.pop("stage", None)
    if saved != to_dict(cfg):
        raise MaskxError("holds a finished run made with other settings; use another output folder (or delete it)", run)


def write_recipe(out: str | Path, recipe: str | Path) -> None:
    """Keep the recipe a run was made with (a file or a shipped name) as ``out/recipe.yaml``."""
    write_text(Path(out) / RECIPE, resolve_config_path(recipe).read_text())


def run_recipe(run: str | Path) -> Path | None:
    """The ``recipe.yaml`` of a run folder, if it has one (what commands on its output read by default)."""
    path = Path(run) / RECIPE
    return path if path.is_file() else None


def _data_paths(config: dict) -> dict[str, str]:
    data = config.get("data") if isinstance(config, dict) else None
    return {k: str(data[k]) for k in DATA_PATH_KEYS if data.get(k)} if isinstance(data, dict) else {}


def load_stage_config(cls: type, recipe: str | Path | None, detector_run: str | Path, overrides: list, source: str = "override"):
    """The config ``cls`` of a stage that runs on a detector run (``mask-train``, ``cache build``).

    Read from ``recipe`` (default: the run's ``recipe.yaml``); then the data files and image folders
    the detector run was trained or imported with (its ``config.yaml``), key by key, so a recipe's
    own data paths never replace the data the detector was made with (with no recipe at all, its
    ``data.mask_classes`` too); then ``overrides`` (the user's ``--set`` and options), which win.
    """
    run = _run_folder(detector_run)
    config_file = run / "config.yaml"
    try:
        run_config = read_yaml(config_file) if config_file.is_file() else {}
    except MaskxError:
        run_config = {}  # the checkpoint is checked when the stage loads it
    recipe = recipe or run_recipe(run)
    layer = _data_paths(run_config)
    run_data = run_config.get("data") if isinstance(run_config, dict) else None
    if recipe is None and isinstance(run_data, dict) and run_data.get("mask_classes"):
        layer["mask_classes"] = str(run_data["mask_classes"])  # no recipe at all: the run's set A too
    return load_config(cls, recipe, [{"data": layer}, *overrides] if layer else list(overrides), source=source)


def load_eval_config(recipe: str | Path | None, detector_run: str | Path | None, overrides: Sequence = (),
                     source: str = "override") -> EvalConfig:
    """The ``eval:`` section of ``recipe`` (default: the ``recipe.yaml`` of ``detector_run``, a detector
    run folder or its checkpoint, when there is one), then ``overrides`` (``--set`` and options)."""
    recipe = recipe or (run_recipe(_run_folder(detector_run)) if detector_run is not None else None)
    return load_config(EvalConfig, recipe, list(overrides), source=source)


def _run_folder(run: str | Path) -> Path:
    """A run folder, given it or a checkpoint file in it."""
    run = Path(run)
    return run.parent if run.is_file() else run


@dataclass
class DetectorRun:
    """A finished detector (``detect-train``, ``detect-import`` or end-to-end run), its model in eval mode, frozen.

    ``config``: the resolved config it was made with, as saved (provenance, written into what is made
    from it); ``data`` and ``detector``: its data settings and detector config, typed.
    """

    run_dir: Path
    checkpoint: Path
    sha256: str
    config: dict
    categories: list[dict]
    model: FasterRCNN
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    detector: DetectorConfig = dataclasses.field(default_factory=DetectorConfig)

    def data_paths(self) -> dict[str, str]:
        """The annotation files and image folders this detector was trained (or imported) with, the
        non-empty ones of ``data.train_json``, ``train_images``, ``val_json``, ``val_images``."""
        return {k: getattr(self.data, k) for k in DATA_PATH_KEYS if getattr(self.data, k)}

    def data_config(self, mine: DataConfig) -> DataConfig:
        """``mine`` with each data file and image folder it leaves empty taken from the run, key by key
        (:meth:`data_paths`); everything else (set A, flips, image limits) is ``mine``."""
        return dataclasses.replace(mine, **{k: v for k, v in self.data_paths().items() if not getattr(mine, k)})


@dataclass
class MaskRun:
    """A finished mask run (``mask-train`` or end-to-end): its mask side in eval mode, frozen, and what made it.

    ``head``: its :class:`~pipelines.config.HeadConfig` (``head.roi_size`` is the RoI size it reads);
    ``set_a``: the category ids whose masks it trained on (set A); ``data``: its data settings (its
    ``val_json`` / ``val_images`` are what evaluation reads by default); ``detector_sha256``: the
    detector checkpoint it was trained against; ``iteration`` and ``end_to_end``: how it was trained.
    """

    checkpoint: Path
    side: MaskSide
    head: HeadConfig
    set_a: list[int]
    categories: list[dict]
    data: DataConfig
    detector_sha256: str
    iteration: int
    end_to_end: bool = False
    in_channels: int = 256  # channels of the RoI features it reads (the detector's FPN width)

    @property
    def run_dir(self) -> Path:
        return self.checkpoint.parent

    def description(self) -> dict:
        """What a metrics file says of the run: head, MLP branch, T's input, the set A it trained on."""
        return {"head": self.head.head, "mlp": self.head.mlp, "input": self.head.input, "trained_set_a": list(self.set_a)}


def _typed(cls: type, data: Any) -> Any:
    """``cls`` from a saved config section, its known keys only (a checkpoint of an older maskx may hold others)."""
    known = {f.name for f in dataclasses.fields(cls)}
    return from_dict(cls, {k: v for k, v in data.items() if k in known} if isinstance(data, dict) else {})


def check_embeddings_fit(emb: Embeddings, det: DetectorRun) -> None:
    """Raise unless ``emb`` was exported from ``det``: its hash, its class list, its box head's width D."""
    path = emb.path
    if emb.detector_sha256 != det.sha256:
        raise MaskxError(f"embeddings were exported from another detector (checkpoint sha256 {emb.detector_sha256[:12]}…, "
                         f"this detector's is {det.sha256[:12]}…): run 'maskx export-embeddings' on it", path)
    if emb.class_ids != [c["id"] for c in det.categories]:
        raise MaskxError("the embeddings' class list does not match the detector's", path)
    width = det.model.roi_heads.box_predictor.cls_score.in_features
    if emb.w_cls.shape[1] != width:
        raise MaskxError(f"embeddings dataset 'w_cls' is {emb.w_cls.shape[1]} wide but the detector's box head is "
                         f"{width} wide: not exported from this detector", path)


def detector_checkpoint_path(run: str | Path) -> Path:
    run = Path(run)
    if run.is_file():
        return run
    if not run.is_dir():
        raise MaskxError("detector run not found", run)
    path = run / DETECTOR_CKPT
    if not path.is_file():
        raise MaskxError(f"no {DETECTOR_CKPT} here: not a finished detector run (train it with 'maskx detect-train')", run)
    return path


@dataclass
class DetectorWeights:
    """A detector checkpoint's weights and what builds its model, read without building it."""

    checkpoint: Path
    state: dict  # the Faster R-CNN state dict
    categories: list[dict]
    detector: DetectorConfig
    config: dict  # the resolved config it was made with, as saved


def read_detector_weights(run: str | Path) -> DetectorWeights:
    """The weights of a detector run (folder or ``model_final.pth``), e.g. to start a training from."""
    path = detector_checkpoint_path(run)
    ckpt = load_checkpoint(path, "detector")
    return DetectorWeights(path, ckpt["model"], ckpt["categories"], from_dict(DetectorConfig, ckpt["config"]["detector"]),
                           ckpt["config"])


def load_detector_run(run: str | Path) -> DetectorRun:
    """The frozen detector of a run folder (or its checkpoint file), in eval mode."""
    w = read_detector_weights(run)
    model = detector_from_state(w.detector, len(w.categories), w.state, w.checkpoint)
    model.eval().requires_grad_(False)
    return DetectorRun(w.checkpoint.parent, w.checkpoint, check_recorded_sha256(w.checkpoint), w.config, w.categories, model,
                       _typed(DataConfig, w.config.get("data")), w.detector)


def record_checkpoint(path: Path, sha256: str) -> None:
    """Record ``sha256`` of the final checkpoint ``path`` in the manifest of its run folder (if it has one)."""
    manifest = path.parent / MANIFEST
    if manifest.is_file():
        recorded = read_json(manifest, "run manifest").get("checkpoints") or {}
        update_manifest(path.parent, checkpoints={**recorded, path.name: sha256})


def check_recorded_sha256(path: Path) -> str:
    """The SHA-256 of the checkpoint ``path``, checked against the one its run's manifest recorded when it
    was written (:func:`record_checkpoint`; nothing to check for a file without such a record).

    Called once a checkpoint has been read and checked for what it holds, so that a file that is
    unreadable, of the wrong kind or schema is refused for that; this refuses the damage that
    still loads (bytes zeroed inside a tensor) and a file replaced since."""
    sha256 = sha256_file(path)
    manifest = path.parent / MANIFEST
    recorded = (read_json(manifest, "run manifest").get("checkpoints") or {}).get(path.name) if manifest.is_file() else None
    if recorded and recorded != sha256:
        raise MaskxError(f"damaged or replaced since it was written: its SHA-256 is {sha256[:12]}…, {MANIFEST} recorded "
                         f"{recorded[:12]}… (train or import it again, or restore the file)", path)
    return sha256


def save_detector(path: str | Path, state: dict, config: dict, categories: list[dict], iteration: int, **extra: Any) -> str:
    """Write a ``detector`` checkpoint (see the module docstring) and record its SHA-256 (returned)."""
    sha256 = save_checkpoint(path, "detector", model=state, config=config, categories=categories, iteration=iteration, **extra)
    record_checkpoint(Path(path), sha256)
    return sha256


def save_mask(path: str | Path, side: MaskSide, config: dict, head: HeadConfig, categories: list[dict], set_a: list[int],
              detector_sha256: str, in_channels: int, iteration: int, **extra: Any) -> str:
    """Write a ``mask`` checkpoint of ``side`` (see the module docstring) and record its SHA-256 (returned)."""
    embed_dim = int(side.predictor.w_det.shape[1]) if isinstance(side.predictor, TransferPredictor) else 0
    sha256 = save_checkpoint(path, "mask", model=side.state_dict(), config=config, head=to_dict(head), categories=categories,
                             set_a=set_a, detector_sha256=detector_sha256, embed_dim=embed_dim, in_channels=in_channels,
                             iteration=iteration, **extra)
    record_checkpoint(Path(path), sha256)
    return sha256


def mask_checkpoint_path(run: str | Path) -> Path:
    """The ``mask_final.pth`` of a mask run folder (or the file itself), or one error naming the folder."""
    run = Path(run)
    path = run if run.is_file() else run / MASK_CKPT
    if not path.is_file():
        raise MaskxError(f"no {MASK_CKPT} here: not a finished mask run (train it with 'maskx mask-train')", run)
    return path


def load_mask_run(run: str | Path, det: DetectorRun | None = None) -> MaskRun:
    """The mask run of a folder (or its ``mask_final.pth``), its mask side in eval mode; checks that it fits ``det``."""
    path = mask_checkpoint_path(run)
    ckpt = load_checkpoint(path, "mask")
    if det is not None:
        _check_mask_fits(ckpt, det.sha256, path)
    head = _mask_head_config(ckpt)
    side = build_mask_side(head, len(ckpt["categories"]), ckpt["in_channels"], embed_dim=ckpt["embed_dim"])
    load_state(side, ckpt["model"], path)
    check_recorded_sha256(path)
    side.eval().requires_grad_(False)
    return MaskRun(path, side, head, list(ckpt["set_a"]), ckpt["categories"], _typed(DataConfig, ckpt["config"]["data"]),
                   ckpt["detector_sha256"], ckpt["iteration"], bool(ckpt.get("end_to_end", False)), ckpt["in_channels"])


@dataclass
class TrainingState:
    """What a training checkpoint (``last.pth``, written by :class:`pipelines.engine.loop.Trainer`) resumes from."""

    checkpoint: Path
    model: dict  # state dicts
    optimizer: dict
    scheduler: dict
    scaler: dict | None  # None: written before the loss scaler was saved
    iteration: int
    rng_ranks: list[dict]  # every process's random-generator state (one, from an older checkpoint)

    def rng(self, rank: int, world_size: int) -> dict:
        """The random state process ``rank`` continues from: its own at the same world size, else rank 0's."""
        return self.rng_ranks[rank] if len(self.rng_ranks) == world_size else self.rng_ranks[0]


def read_training_state(run: str | Path, kind: str) -> TrainingState | None:
    """The ``last.pth`` of the run folder ``run`` (a training checkpoint of ``kind``), or None when it has none."""
    path = Path(run) / LAST
    if not path.is_file():
        return None
    ckpt = load_checkpoint(path, kind, schema=SCHEMAS.get(kind, TRAINING))
    return TrainingState(path, ckpt["model"], ckpt["optimizer"], ckpt["scheduler"], ckpt.get("scaler"), int(ckpt["iteration"]),
                         ckpt.get("rng_ranks") or [ckpt["rng"]])


def _check_mask_fits(ckpt: dict, detector_sha256: str, path: str | Path) -> None:
    """Raise unless the mask checkpoint ``ckpt`` (at ``path``) was trained on the detector of that SHA-256."""
    if ckpt["detector_sha256"] != detector_sha256:
        raise MaskxError(f"this mask head was trained on another detector (sha256 {ckpt['detector_sha256'][:12]}…, "
                         f"given detector {detector_sha256[:12]}…)", path)


def _mask_head_config(ckpt: dict) -> HeadConfig:
    """The :class:`HeadConfig` of a mask checkpoint (``ckpt["head"]``)."""
    # heads saved before the 1-layer MLP branch existed have no mlp_layers key: theirs had 2 layers
    return from_dict(HeadConfig, {"mlp_layers": 2, **ckpt["head"]})


@dataclass
class RunCheckpoints:
    """A mask run's checkpoint and its detector's, read as they are and checked to fit each other: what
    ``maskx slim`` copies (:func:`write_float16_copy`)."""

    detector: Path
    mask: Path
    _det: dict = dataclasses.field(repr=False)
    _mask: dict = dataclasses.field(repr=False)

    @property
    def mask_config(self) -> dict:
        """The resolved config saved in the mask checkpoint."""
        return self._mask["config"]


def read_run_checkpoints(detector: Path, mask: Path) -> RunCheckpoints:
    """The detector checkpoint ``detector`` and the mask checkpoint ``mask``; one error naming ``mask``
    unless it was trained on that detector."""
    det_ckpt, mask_ckpt = load_checkpoint(detector, "detector"), load_checkpoint(mask, "mask")
    _check_mask_fits(mask_ckpt, sha256_file(detector), mask)
    return RunCheckpoints(Path(detector), Path(mask), det_ckpt, mask_ckpt)


def write_float16_copy(pair: RunCheckpoints, out: Path, written: list[Path]) -> list[str]:
    """``out/model_final.pth`` and ``out/mask_final.pth``: the checkpoints of ``pair`` with their float32
    tensors in float16 (``precision: float16``, :func:`~pipelines.checkpoint.half_precision`), the mask's
    ``detector_sha256`` that of the copied detector, each copy's SHA-256 recorded in ``out``'s manifest
    (:func:`record_checkpoint`). Each path goes to ``written`` before it is written;
    returns the names of the tensors kept in float32 (beyond float16's range)."""
    kept: list[str] = []
    for path, ckpt in ((out / DETECTOR_CKPT, pair._det), (out / MASK_CKPT, pair._mask)):
        if path.name == MASK_CKPT:
            ckpt["detector_sha256"] = sha256_file(out / DETECTOR_CKPT)
        state, left = half_precision(ckpt["model"])
        kept += left
        payload = {k: v for k, v in ckpt.items() if k not in ("format", "kind")}
        written.append(path)
        record_checkpoint(path, save_checkpoint(path, ckpt["kind"], **{**payload, "model": state, "precision": "float16",
                                                                     "float32_kept": left}))
    return kept


def detector_of_mask_run(mask_run: str | Path) -> Path:
    """The detector checkpoint a mask run was trained against (from its manifest). A run folder that
    holds its own detector (an end-to-end run, ``maskx slim``'s copy) finds it there when the path its
    manifest names is gone (the folder was moved, or named from elsewhere); its SHA-256 is checked on loading."""
    manifest = read_manifest(mask_run)
    try:
        named = Path(manifest["inputs"]["detector"]["path"])
    except KeyError:
        raise MaskxError("manifest does not name the detector run: give it as detector", Path(mask_run) / MANIFEST,
                         key="detector") from None
    own = Path(mask_run) / DETECTOR_CKPT
    return own if not named.exists() and own.is_file() else named

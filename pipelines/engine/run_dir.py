"""Run folders: resolved config, manifest of inputs (paths + content hashes), JSON-lines metrics.

A training stage opens its folder with :func:`training_run`, so that a run folder is always in one
of three states its manifest names: ``running`` (or killed), ``failed`` (with the error line and a
checkpoint to ``--resume`` from) or ``finished``. A run that fails before its first checkpoint
leaves nothing new behind.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import platform
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator

import torch

from pipelines import __version__
from pipelines.engine import distributed as dist
from pipelines.errors import MaskxError
from pipelines.io import os_error_reason, read_json, remove_stale_temporaries, sha256_file, write_json, write_yaml

CONFIG = "config.yaml"
MANIFEST = "manifest.json"
METRICS = "metrics.jsonl"
LAST = "last.pth"  # the training checkpoint (pipelines.engine.loop.Trainer)
TENSORBOARD = "tb"
# What one training attempt writes besides its checkpoints: stale once no checkpoint goes with them.
ATTEMPT_FILES = (CONFIG, MANIFEST, METRICS, TENSORBOARD)


def make_output_dir(out: str | Path) -> Path:
    """Create the folder ``out`` (and parents) or raise one clear MaskxError."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MaskxError("output path exists and is not a folder", out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MaskxError(f"cannot create output folder: {exc.strerror}", out) from None
    return out


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
    """
    out = Path(out)
    created = not out.exists()
    if dist.launched_rank() == 0 and not created:  # before the process group is joined, too
        if (out / LAST).is_file() and not resume:
            raise MaskxError(f"holds an unfinished run ({LAST}): add --resume to continue it, or choose another --out", out)
        remove_stale_temporaries(out)
        if not _has_checkpoint(out, finished):
            _remove_attempt(out)
    try:
        yield out
    except BaseException as exc:
        if dist.is_main():
            _record_failure(out, created, finished, exc)
        raise


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
    """Leave nothing new (no checkpoint yet) or a manifest that says the run failed, and why."""
    if not out.is_dir():
        return
    remove_stale_temporaries(out)
    if not _has_checkpoint(out, finished):
        _remove_attempt(out)
        if created and not any(out.iterdir()):
            out.rmdir()
        return
    error = exc.line() if isinstance(exc, MaskxError) else f"{exc.__class__.__name__}: {exc}".splitlines()[0]
    try:
        update_manifest(out, status="failed", error=error)
    except (MaskxError, OSError):
        pass  # e.g. the disk is still full: the error line has been printed, the checkpoint is intact


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

"""Run folders: resolved config, manifest of inputs (paths + content hashes), JSON-lines metrics."""

from __future__ import annotations

import datetime as _dt
import json
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from pipelines import __version__
from pipelines.errors import MaskxError
from pipelines.io import read_json, sha256_file, write_json, write_yaml

CONFIG = "config.yaml"
MANIFEST = "manifest.json"
METRICS = "metrics.jsonl"


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
        **(extra or {}),
    }
    write_json(out / MANIFEST, manifest)
    return out


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
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

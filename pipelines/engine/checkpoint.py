"""Checkpoints: one plain dict per file, written atomically, checked on load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipelines.errors import MaskxError
from pipelines.io import atomic_path

FORMAT = "maskx-checkpoint"


def save_checkpoint(path: str | Path, kind: str, **payload: Any) -> None:
    """Write ``{"format", "kind", **payload}`` to ``path`` via a temporary file and a rename."""
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, "kind": kind, **payload}, tmp)


def load_checkpoint(path: str | Path, kind: str | None = None) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`; ``kind`` must match if given."""
    path = Path(path)
    if not path.is_file():
        raise MaskxError("checkpoint not found", path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - a corrupt or truncated file, whatever the unpickler says
        raise MaskxError(f"checkpoint cannot be read (truncated or corrupt? {exc.__class__.__name__})", path) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise MaskxError("not a maskx checkpoint", path)
    if kind is not None and ckpt.get("kind") != kind:
        raise MaskxError(f"this is a {ckpt.get('kind')} checkpoint, expected a {kind} checkpoint", path)
    return ckpt

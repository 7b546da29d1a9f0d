"""Checkpoints: one plain dict per file, written atomically, read weights-only, checked against its kind's schema.

Reading never runs code from the file: every ``.pth`` maskx opens (its own checkpoints and
third-party weights alike) goes through ``torch.load(..., weights_only=True)``, whose unpickler
builds tensors, numbers, strings, ``None``, lists, tuples and dicts and refuses anything else
before calling it. A checkpoint therefore holds only such data: model, optimizer and schedule
states, random-generator states as tensors and integer lists (:func:`pipelines.engine.loop.rng_state`),
configs as nested dicts, class tables as lists of dicts.

After loading, the dict is checked against the schema of its ``kind`` (:data:`SCHEMAS`: required
keys and their types), so a checkpoint with a missing or mistyped key is one error line naming the
file and the key rather than a ``KeyError`` deep in a stage.
"""

from __future__ import annotations

import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pipelines.errors import MaskxError
from pipelines.io import KeepWriteError, atomic_path, sha256_file

FORMAT = "maskx-checkpoint"

# Training checkpoints written before random-generator states were stored as plain data hold
# numpy's state as a uint32 array. These globals rebuild a uint32 numpy array and nothing else (no
# object arrays: their dtype is not allowed); they are allowed only for such a file, after a first
# strictly weights-only attempt has failed on exactly the first three.
_LEGACY_NUMPY = [np._core.multiarray._reconstruct, np.ndarray, np.dtype]
_LEGACY_NAMES = {f"{g.__module__}.{g.__name__}" for g in _LEGACY_NUMPY}
_LEGACY_ALLOWED = [*_LEGACY_NUMPY, np.dtypes.UInt32DType]


# -- schemas ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Field:
    """What a checkpoint value must be: ``what`` (for the error line) and a predicate."""

    what: str
    check: Callable[[Any], bool]
    required: bool = True

    def optional(self) -> Field:
        return Field(self.what, self.check, required=False)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_rng(v: Any) -> bool:
    """A state of :func:`pipelines.engine.loop.rng_state` (or its pre-plain-data form)."""
    if not isinstance(v, dict) or not isinstance(v.get("torch"), torch.Tensor):
        return False
    n, p = v.get("numpy"), v.get("python")
    numpy_ok = (isinstance(n, dict) and isinstance(n.get("key"), torch.Tensor) and n["key"].numel() == 624) or (
        isinstance(n, tuple) and len(n) == 5 and isinstance(n[1], np.ndarray) and n[1].dtype == np.uint32)
    python_ok = (isinstance(p, dict) and isinstance(p.get("internal"), list)) or (isinstance(p, tuple) and len(p) == 3)
    return numpy_ok and python_ok


STATE = Field("a dict of tensors", lambda v: isinstance(v, dict) and all(
    isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in v.items()))
DICT = Field("a dict", lambda v: isinstance(v, dict))
INT = Field("an integer", _is_int)
BOOL = Field("true or false", lambda v: isinstance(v, bool))
STR = Field("a string", lambda v: isinstance(v, str))
SHA256 = Field("a SHA-256 hex digest", lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None)
IDS = Field("a list of integers", lambda v: isinstance(v, list) and all(_is_int(i) for i in v))
CATEGORIES = Field("a list of categories (dicts with an integer 'id' and a string 'name')", lambda v: isinstance(v, list) and all(
    isinstance(c, dict) and _is_int(c.get("id")) and isinstance(c.get("name"), str) for c in v))
RNG = Field("a random-generator state", _is_rng)
RNG_RANKS = Field("a list of random-generator states", lambda v: isinstance(v, list) and bool(v) and all(_is_rng(s) for s in v))

# What every training checkpoint (``last.pth``, written by :class:`pipelines.engine.loop.Trainer`) holds.
TRAINING: dict[str, Field] = {
    "model": STATE, "optimizer": DICT, "scheduler": DICT, "iteration": INT, "rng": RNG,
    "scaler": DICT.optional(), "rng_ranks": RNG_RANKS.optional(), "world_size": INT.optional(),
}
# What a finished model holds; dotted keys are nested (``config.detector`` is ``ckpt["config"]["detector"]``).
# ``precision``: absent or ``float32`` (as trained), ``float16`` (an inference-only copy, ``maskx slim``).
PRECISIONS = ("float32", "float16")
_FINISHED: dict[str, Field] = {"model": STATE, "config": DICT, "categories": CATEGORIES, "iteration": INT,
                               "end_to_end": BOOL.optional(),
                               "precision": Field(f"one of {', '.join(PRECISIONS)}", lambda v: v in PRECISIONS).optional()}

# One table of every kind maskx writes: file, then required keys and their types.
SCHEMAS: dict[str, dict[str, Field]] = {
    # model_final.pth of detect-train (and of an end-to-end train)
    "detector": {**_FINISHED, "config.detector": DICT},
    # mask_final.pth of mask-train (and of an end-to-end train)
    "mask": {**_FINISHED, "config.data": DICT, "head": DICT, "head.head": STR, "head.input": STR, "head.mlp": BOOL,
             "head.roi_size": INT, "set_a": IDS, "detector_sha256": SHA256, "embed_dim": INT, "in_channels": INT},
    # last.pth of detect-train, mask-train and end-to-end train
    "detector-train": {**TRAINING, "config": DICT, "config.detector": DICT, "categories": CATEGORIES},
    "mask-train": {**TRAINING, "config": DICT, "categories": CATEGORIES, "set_a": IDS},
    "train-e2e": {**TRAINING, "config": DICT, "config.detector": DICT, "categories": CATEGORIES},
}


def check_schema(ckpt: dict, schema: dict[str, Field], path: str | Path) -> None:
    """Raise one MaskxError naming ``path`` and the first key of ``schema`` missing or mistyped in ``ckpt``."""
    kind = ckpt.get("kind")
    for key, field in schema.items():
        node: Any = ckpt
        for part in key.split("."):
            node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
        if node is _MISSING:
            if field.required:
                raise MaskxError(f"this {kind} checkpoint has no '{key}' (cut short, or not written by maskx?)", path)
            continue
        if not field.check(node):
            raise MaskxError(f"this {kind} checkpoint's '{key}' must be {field.what}, got {type(node).__name__}", path)


_MISSING = object()


# -- reading and writing ------------------------------------------------------------------------
def save_checkpoint(path: str | Path, kind: str, **payload: Any) -> str:
    """Write ``{"format", "kind", **payload}`` to ``path`` via a temporary file and a rename; return
    the SHA-256 of the bytes written (read back from the temporary file before the rename).

    A failed write (a full disk) is one MaskxError naming ``path``; the file there before is intact.
    """
    with atomic_path(path) as tmp:
        with open(tmp, "wb", buffering=0) as f:
            writer = KeepWriteError(f, drop_after_error=False)
            try:
                torch.save({"format": FORMAT, "kind": kind, **payload}, writer)
            except RuntimeError:
                if writer.error is not None:  # torch reports a failed write as "unexpected pos": say why it failed
                    raise writer.error from None
                raise
        return sha256_file(tmp)


def load_weights(path: str | Path, what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with one clear error line for any file it refuses.

    For maskx's checkpoints and third-party weights (torchvision state dicts) alike: a file whose
    pickle needs anything but tensors and plain containers is refused before any of it is called.
    """
    path = Path(path)
    if not path.is_file():
        raise MaskxError(f"{what} not found", path)
    try:
        return _torch_load(path)
    except pickle.UnpicklingError as exc:
        unsafe = _unsafe_globals(path, exc)
        if unsafe and set(unsafe) <= _LEGACY_NAMES:  # an older maskx training checkpoint: numpy's RNG state
            try:
                with torch.serialization.safe_globals(_LEGACY_ALLOWED):
                    return _torch_load(path)
            except Exception:  # noqa: BLE001 - then it is not what it looked like
                pass
        needs = f"loading it would call {', '.join(unsafe)}" if unsafe else f"the weights-only reader refused it: {_refusal(exc)}"
        kind = "a maskx checkpoint" if what == "checkpoint" else f"plain {what}"
        raise MaskxError(f"not {kind}, or one that carries code ({needs}); nothing of it was run", path) from None
    except Exception as exc:  # noqa: BLE001 - a truncated zip, a wrong magic number: whatever the reader says
        raise MaskxError(f"{what} cannot be read (truncated or corrupt? {exc.__class__.__name__})", path) from None


def load_checkpoint(path: str | Path, kind: str | None = None, schema: dict[str, Field] | None = None) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (weights-only) and check it.

    ``kind`` must match if given; the dict is checked against ``schema`` (default: the schema of its
    kind in :data:`SCHEMAS`, if any).
    """
    path = Path(path)
    ckpt = load_weights(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise MaskxError("not a maskx checkpoint (no 'format: maskx-checkpoint' entry)", path)
    if kind is not None and ckpt.get("kind") != kind:
        raise MaskxError(f"this is a {ckpt.get('kind')} checkpoint, expected a {kind} checkpoint", path)
    schema = schema if schema is not None else SCHEMAS.get(str(ckpt.get("kind")))
    if schema:
        check_schema(ckpt, schema, path)
    if ckpt.get("precision") == "float16":
        ckpt["model"] = full_precision(ckpt["model"])
    return ckpt


def half_precision(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``state`` with its float32 tensors in float16, and the names of those kept in float32: a tensor
    with a finite value beyond float16's range (65504) stays as it is, so nothing turns infinite."""
    limit = torch.finfo(torch.float16).max
    half, kept = {}, []
    for name, t in state.items():
        finite = t[torch.isfinite(t)] if t.dtype == torch.float32 else t.new_zeros(0)
        if finite.numel() and float(finite.abs().max()) > limit:
            kept.append(name)
            half[name] = t
        else:
            half[name] = t.half() if t.dtype == torch.float32 else t
    return half, kept


def full_precision(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with its float16 tensors in float32: what a model built in float32 takes (:func:`half_precision` undone,
    but for the rounding)."""
    return {name: t.float() if t.dtype == torch.float16 else t for name, t in state.items()}


def load_state(module: Any, state: dict, path: str | Path, strict: bool = True, what: str = "the weights", assign: bool = False):
    """``module.load_state_dict(state)`` (a module, an optimizer, a schedule), one error line naming ``path`` if it does not fit.

    ``assign``: a module takes the state's tensors themselves (for a module built on the meta device).
    """
    try:
        if isinstance(module, torch.nn.Module):
            return module.load_state_dict(state, strict=strict, assign=assign)
        return module.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        lines = [s.strip() for s in str(exc).splitlines() if s.strip()]
        detail = (lines[1] if len(lines) > 1 else lines[0] if lines else exc.__class__.__name__)[:200]
        raise MaskxError(f"{what} do not fit the model this checkpoint describes ({detail})", path) from None


def _torch_load(path: Path) -> Any:
    with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the outcome is what counts
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", weights_only=True)


def _unsafe_globals(path: Path, exc: Exception) -> list[str]:
    """The globals a refused pickle asks for, read without running it (or named by the refusal)."""
    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - not a zip checkpoint (a bare pickle): read the refusal instead
        return sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(exc))))


def _refusal(exc: Exception) -> str:
    """The reason in torch's long weights-only refusal ("Unsupported operand 149", ...)."""
    text = str(exc)
    tail = text.split("WeightsUnpickler error:", 1)[-1]
    lines = [s.strip() for s in tail.splitlines() if s.strip()]
    return lines[0][:160] if lines else exc.__class__.__name__

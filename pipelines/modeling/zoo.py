"""torchvision's released weights: their names, the file torch keeps each in, fetching, weights-only reading.

A released file lives at ``<torch.hub.get_dir()>/checkpoints/<the file name of its URL>``
(``$TORCH_HOME/hub/checkpoints``; by default ``~/.cache/torch/hub/checkpoints``). It is read from
there when present; otherwise torchvision's weights API (``Weights.get_state_dict``) downloads it
there, checking the hash that its file name carries (no progress bar: one line once it is
there). Without a network the download fails and the
user gets one line: the URL to fetch and the path to put the file at.

Every file is read weights-only (:func:`pipelines.checkpoint.load_weights`): tensors and
plain containers only, nothing in it is executed.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import os
from pathlib import Path
from urllib.parse import urlparse

import torch
from torchvision.models import Weights, WeightsEnum, get_model_weights

from pipelines.checkpoint import load_weights
from pipelines.errors import MaskxError
from pipelines.progress import NULL_PROGRESS, Progress


def weights_enum(model: str) -> type[WeightsEnum]:
    """torchvision's weights enum of builder ``model`` (``resnet50`` -> ``ResNet50_Weights``)."""
    try:
        return get_model_weights(model)
    except (ValueError, KeyError):
        raise MaskxError(f"torchvision has no model '{model}'") from None


def weights_label(weights: Weights) -> str:
    """``ResNet50_Weights.IMAGENET1K_V1``: how torchvision names a release."""
    return f"{type(weights).__name__}.{weights.name}"


def named_weights(model: str, name: str) -> Weights | None:
    """torchvision's weights ``name`` of builder ``model``, or None if ``name`` is none of them.

    ``name`` is a member of the model's enum (``IMAGENET1K_V1``, ``DEFAULT``) or the qualified form
    (``ResNet50_Weights.IMAGENET1K_V1``).
    """
    enum = weights_enum(model)
    member = name.split(".", 1)[1] if name.startswith(enum.__name__ + ".") else name
    return enum.__members__.get(member)


def release_names(model: str) -> list[str]:
    """The names of torchvision's releases for ``model`` (without the DEFAULT alias)."""
    return [w.name for w in weights_enum(model)]


def cached_file(weights: Weights) -> Path:
    """Where torch keeps (or would download) the file of ``weights``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def fetch(weights: Weights, hint: str, progress: Progress = NULL_PROGRESS) -> Path:
    """The file of ``weights`` in torch's cache, downloaded by torchvision's weights API if absent.

    Offline (or on any failed download) raises one MaskxError naming the URL and the path to put
    the file at, followed by ``hint`` (the user's other way, e.g. "or pass --weights FILE").
    """
    path = cached_file(weights)
    if path.is_file():
        return path
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # torch.hub announces the download on stdout
            weights.get_state_dict(progress=False, check_hash=True, weights_only=True, map_location="cpu")
    except (OSError, http.client.HTTPException, RuntimeError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise MaskxError(f"torchvision's {weights_label(weights)} is not in torch's cache and cannot be downloaded "
                         f"({exc.__class__.__name__}: {reason}): download {weights.url} and put it at this path, {hint}",
                         path) from None
    if not path.is_file():  # torch.hub keeps what it downloads under this name; anything else is a surprise
        raise MaskxError(f"torchvision's {weights_label(weights)} was downloaded but is not where torch keeps it", path)
    progress.log(f"downloaded torchvision's {weights_label(weights)} ({path.stat().st_size / 2**20:.0f} MiB) to {path}")
    return path


def read_state_dict(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """A torchvision-format state dict (tensor name -> tensor) read weights-only from ``path``.

    Read by :func:`pipelines.checkpoint.load_weights` (nothing in the file runs). A dict
    whose ``model`` entry is the state dict (a training checkpoint) gives that entry.
    """
    obj = load_weights(path, what)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise MaskxError(f"not a state dict (a mapping of tensor names to tensors), expected {what}", path)
    return obj


def backbone_weights_file(backbone: str, spec: str, progress: Progress = NULL_PROGRESS) -> Path:
    """The ImageNet weights file that ``detector.pretrained_backbone`` names.

    ``spec`` is a file, or the name of torchvision's weights of ``backbone`` (``IMAGENET1K_V1``),
    fetched into torch's cache (see :func:`fetch`).
    """
    path = Path(spec)
    if path.is_file():
        return path
    weights = named_weights(backbone, spec)
    if weights is None:
        raise MaskxError(f"pretrained backbone weights not found (neither a file nor one of torchvision's "
                         f"{weights_enum(backbone).__name__}: {', '.join(release_names(backbone))})", spec)
    return fetch(weights, "or set detector.pretrained_backbone to the file's path", progress)

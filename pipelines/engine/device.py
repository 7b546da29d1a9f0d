"""Device and mixed-precision choice: ``auto`` takes CUDA when present; autocast on GPU, and on CPU when asked."""

from __future__ import annotations

import contextlib

import torch

from pipelines.config import AMP
from pipelines.errors import MaskxError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise MaskxError("device cuda asked for, but no CUDA device is available")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise MaskxError(f"unknown device '{name}' (expected auto | cpu | cuda)")
    return torch.device(name)


def autocast(device: torch.device, amp: str):
    """Mixed-precision context of a training step.

    GPU: bf16 (``auto``, ``bf16``, ``bf16-native``) or fp16 autocast. CPU: bf16 autocast when
    ``amp`` is ``bf16`` (worth it on CPUs with bf16 instructions, AVX-512 BF16 or AMX; slower on
    others), or ``bf16-native`` and the CPU has them (:func:`cpu_has_bf16`); ``auto`` and ``fp16``
    are full precision there. ``off`` is full precision everywhere.
    """
    if amp not in AMP:
        raise MaskxError(f"unknown amp setting '{amp}' (expected {' | '.join(AMP)})")
    if amp == "off":
        return contextlib.nullcontext()
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16 if amp == "fp16" else torch.bfloat16)
    if amp == "bf16" or (amp == "bf16-native" and cpu_has_bf16()):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 instructions that torch's CPU kernels use (AVX-512 BF16 or AMX)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private torch.cpu helpers: absent -> no
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)

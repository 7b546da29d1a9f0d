"""Device and mixed-precision choice: ``auto`` takes CUDA when present; autocast on GPU, and on CPU when asked."""

from __future__ import annotations

import contextlib

import torch

from pipelines.errors import MaskxError

AMP = ("auto", "off", "bf16", "fp16")


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

    GPU: bf16 (``auto``, ``bf16``) or fp16 autocast. CPU: bf16 autocast only when ``amp`` is
    ``bf16`` (worth it on CPUs with bf16 matrix units, e.g. AMX or AVX-512 BF16; slower on others);
    ``auto`` and ``fp16`` are full precision there. ``off`` is full precision everywhere.
    """
    if amp not in AMP:
        raise MaskxError(f"unknown amp setting '{amp}' (expected {' | '.join(AMP)})")
    if amp == "off":
        return contextlib.nullcontext()
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16 if amp == "fp16" else torch.bfloat16)
    if amp == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()

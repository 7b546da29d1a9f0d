"""Device and mixed-precision choice: ``auto`` takes CUDA when present; autocast only on GPU."""

from __future__ import annotations

import contextlib

import torch

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
    """bf16/fp16 autocast on GPU (``auto`` = bf16); a no-op on CPU."""
    if device.type != "cuda" or amp == "off":
        return contextlib.nullcontext()
    if amp not in ("auto", "bf16", "fp16"):
        raise MaskxError(f"unknown amp setting '{amp}' (expected auto | off | bf16 | fp16)")
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    return torch.autocast("cuda", dtype=dtype)

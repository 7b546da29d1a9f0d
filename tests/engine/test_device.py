"""Mixed precision: bf16 autocast on CPU only when asked (or, with bf16-native, when the CPU has bf16 instructions); unknown settings refused."""

from __future__ import annotations

import pytest
import torch

from pipelines.engine.device import autocast
from pipelines.errors import MaskxError


@pytest.mark.parametrize("amp, dtype", [("bf16", torch.bfloat16), ("auto", torch.float32), ("off", torch.float32),
                                        ("fp16", torch.float32)])
def test_cpu_autocast(amp, dtype):
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with autocast(torch.device("cpu"), amp):
        out = a @ b
    assert out.dtype == dtype


def test_unknown_amp_is_refused():
    with pytest.raises(MaskxError, match="unknown amp setting 'fp8'"):
        autocast(torch.device("cpu"), "fp8")


@pytest.mark.parametrize("native, dtype", [(True, torch.bfloat16), (False, torch.float32)])
def test_bf16_native_follows_the_cpu(monkeypatch, native, dtype):
    import pipelines.engine.device as device

    monkeypatch.setattr(device, "cpu_has_bf16", lambda: native)
    with autocast(torch.device("cpu"), "bf16-native"):
        out = torch.randn(4, 8) @ torch.randn(8, 3)
    assert out.dtype == dtype


def test_cpu_has_bf16_reads_the_cpu():
    from pipelines.engine.device import cpu_has_bf16

    assert cpu_has_bf16() == bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())

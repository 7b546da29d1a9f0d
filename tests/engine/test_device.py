"""Mixed precision: bf16 autocast on CPU only when asked; unknown settings refused."""

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

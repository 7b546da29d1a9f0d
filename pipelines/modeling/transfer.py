"""The weight transfer function T (paper §2.1): w_seg = T(w_det; theta)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from pipelines.errors import MaskxError

ACTIVATIONS = ("none", "relu", "leaky_relu")
# fan_out: Caffe2's MSRAFill, the original code's init of T (N(0, 2 / fan_out), fan_out = a layer's output
# size); fan_in: Kaiming's fan-in variant (N(0, 2 / fan_in)), maskx's init before.
INITS = ("fan_out", "fan_in")


class WeightTransfer(nn.Module):
    """Maps class embeddings ``w_det`` [K, in_dim] to mask weights ``w_seg`` [K, out_dim].

    ``layers`` fully connected layers (1 = affine), hidden width ``hidden``, activation between
    them (LeakyReLU slope 0.1 as in the original code). Weights N(0, 2 / fan) with ``init`` =
    ``fan_out`` (the original code's Caffe2 MSRAFill: fan = the layer's output size) or ``fan_in``
    (fan = its input size); zero bias. Optional input regularisation: L2 normalisation of each row
    and dropout on it while training.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden: int = 256,
        layers: int = 2,
        activation: str = "leaky_relu",
        normalize_input: bool = False,
        input_dropout: float = 0.0,
        normalize_output: bool = False,
        init: str = "fan_out",
    ):
        super().__init__()
        if layers not in (1, 2, 3):
            raise MaskxError(f"transfer_layers must be 1, 2 or 3, got {layers}")
        if activation not in ACTIVATIONS:
            raise MaskxError(f"unknown transfer activation '{activation}' (expected {' | '.join(ACTIVATIONS)})")
        if init not in INITS:
            raise MaskxError(f"unknown transfer init '{init}' (expected {' | '.join(INITS)})")
        if not 0.0 <= input_dropout < 1.0:
            raise MaskxError(f"input_dropout must be in [0, 1), got {input_dropout}")
        self.normalize_input = normalize_input
        self.dropout = nn.Dropout(input_dropout) if input_dropout > 0 else nn.Identity()
        dims = [in_dim] + [hidden] * (layers - 1) + [out_dim]
        mods: list[nn.Module] = []
        for i in range(layers):
            fc = nn.Linear(dims[i], dims[i + 1])
            nn.init.kaiming_normal_(fc.weight, mode=init, nonlinearity="relu")
            nn.init.zeros_(fc.bias)
            mods.append(fc)
            if i < layers - 1 and activation != "none":
                mods.append(nn.LeakyReLU(0.1) if activation == "leaky_relu" else nn.ReLU())
        self.mlp = nn.Sequential(*mods)
        # w_seg = exp(log_scale) * T(x) / |T(x)|: every class's mask weights get the same norm
        self.log_scale = nn.Parameter(torch.tensor(float(math.log(2.0)))) if normalize_output else None

    def forward(self, w_det: torch.Tensor) -> torch.Tensor:
        """``w_det`` [K, in_dim] -> ``w_seg`` [K, out_dim]."""
        x = F.normalize(w_det, dim=1) if self.normalize_input else w_det
        w_seg = self.mlp(self.dropout(x))
        if self.log_scale is not None:
            w_seg = self.log_scale.exp() * F.normalize(w_seg, dim=1)
        return w_seg

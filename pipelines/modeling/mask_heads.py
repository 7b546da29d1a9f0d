"""Mask side of Mask^X R-CNN: FCN mask head, class-agnostic MLP branch, mask predictors.

Shapes: RoI features ``[R, C, S, S]`` (S = 14) -> FCN features ``[R, D, M, M]`` (M = 2S = 28) ->
mask logits ``[R, M, M]``: one map per RoI, for that RoI's own class only. Nothing here ever
materialises ``[R, K, M, M]``: with K = 3000 classes that would be 3000x the work and memory.

The mask head body (torchvision's ``mask_head``) is :class:`MaskFCNHead` or :class:`HourglassMaskHead`;
the predictor (torchvision's ``mask_predictor``) is one of three: :class:`TransferPredictor` (Mask^X,
weights from T), :class:`AgnosticPredictor` (baseline), :class:`OraclePredictor` (upper bound), each
with the optional class-agnostic :class:`MLPMaskBranch`. :class:`MaskSide` holds a body and a
predictor: what stage 2 trains.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads

from pipelines.config import HeadConfig
from pipelines.errors import MaskxError
from pipelines.modeling.transfer import WeightTransfer

class MaskFCNHead(nn.Module):
    """``num_convs`` x (3x3 conv + ReLU) (torchvision's MaskRCNNHeads), then 2x2 deconv + ReLU.

    ``[R, in_channels, S, S]`` -> ``[R, dim, 2S, 2S]``.
    """

    def __init__(self, in_channels: int, dim: int = 256, num_convs: int = 4):
        super().__init__()
        if num_convs < 1:
            raise MaskxError(f"num_convs must be at least 1, got {num_convs}")
        self.convs = MaskRCNNHeads(in_channels, [dim] * num_convs, dilation=1)
        self.upsample = nn.ConvTranspose2d(dim, dim, 2, stride=2)
        nn.init.kaiming_normal_(self.upsample.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.upsample.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.upsample(self.convs(x)))


FCNS = ("convs", "hourglass")


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    nn.init.zeros_(conv.bias)
    return nn.Sequential(conv, nn.ReLU(inplace=True))


class HourglassMaskHead(nn.Module):
    """A small hourglass (encoder-decoder with skip connections) in place of the plain FCN.

    ``[R, in_channels, S, S]`` -> stem -> ``depth`` stride-2 downsamplings (S -> ceil(S/2) -> ...),
    each followed by a 3x3 conv -> as many nearest upsamplings, each added to the skip of the same
    scale and followed by a 3x3 conv -> 2x2 deconv + ReLU -> ``[R, dim, 2S, 2S]``. Each RoI sees a
    wider context than through ``num_convs`` 3x3 convs (the receptive field covers the whole RoI).
    """

    def __init__(self, in_channels: int, dim: int = 256, depth: int = 2):
        super().__init__()
        if depth < 1:
            raise MaskxError(f"hourglass depth must be at least 1, got {depth}")
        self.stem = _conv(in_channels, dim)
        self.down = nn.ModuleList([nn.Sequential(_conv(dim, dim, stride=2), _conv(dim, dim)) for _ in range(depth)])
        self.up = nn.ModuleList([_conv(dim, dim) for _ in range(depth)])
        self.upsample = nn.ConvTranspose2d(dim, dim, 2, stride=2)
        nn.init.kaiming_normal_(self.upsample.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.upsample.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        skips = []
        for down in self.down:
            skips.append(x)
            x = down(x)
        for up, skip in zip(self.up, reversed(skips)):
            x = up(F.interpolate(x, size=skip.shape[-2:], mode="nearest") + skip)
        return F.relu(self.upsample(x))


def build_fcn(kind: str, in_channels: int, dim: int, num_convs: int) -> nn.Module:
    """The mask head body: ``convs`` (:class:`MaskFCNHead`) or ``hourglass`` (:class:`HourglassMaskHead`).

    Both map ``[R, in_channels, S, S]`` -> ``[R, dim, 2S, 2S]``. For the hourglass, ``num_convs``
    sets the depth as ``max(1, num_convs // 2)`` downsamplings (4 -> 2).
    """
    if kind == "convs":
        return MaskFCNHead(in_channels, dim, num_convs)
    if kind == "hourglass":
        return HourglassMaskHead(in_channels, dim, max(1, num_convs // 2))
    raise MaskxError(f"unknown mask head body '{kind}' (expected {' | '.join(FCNS)})")


MLP_LAYERS = (1, 2)


class MLPMaskBranch(nn.Module):
    """Class-agnostic MLP mask branch (§2.4): FCN features ``[R, D, M, M]`` -> ``[R, M, M]`` logits.

    The features are average-pooled to ``input_size`` first when smaller than M (M = 28 reads the
    full map, as the original code does). ``layers``:

    * 1 (the original code's default branch): one FC layer ``D * input_size**2 -> M * M``
      (``fc``), N(0, 0.001) init; about 157.4 M parameters for D = 256, M = 28;
    * 2: FC ``-> hidden`` (``fc1``, Kaiming fan-in init) + ReLU + FC ``-> M * M`` (``fc2``,
      N(0, 0.001) init): maskx's earlier branch, kept as it was (the original code's optional
      ``2_layer`` branch differs in ``fc1``'s init: Caffe2's MSRAFill, by fan-out).

    Biases start at zero.
    """

    def __init__(self, dim: int, resolution: int = 28, hidden: int = 1024, input_size: int = 28, layers: int = 1):
        super().__init__()
        if layers not in MLP_LAYERS:
            raise MaskxError(f"mlp_layers must be 1 or 2, got {layers}")
        self.resolution = resolution
        self.input_size = input_size
        self.layers = layers
        in_features, out_features = dim * input_size * input_size, resolution * resolution
        if layers == 1:
            self.fc = nn.Linear(in_features, out_features)
            logits = self.fc
        else:
            self.fc1 = nn.Linear(in_features, hidden)
            self.fc2 = nn.Linear(hidden, out_features)
            nn.init.kaiming_normal_(self.fc1.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(self.fc1.bias)
            logits = self.fc2
        nn.init.normal_(logits.weight, std=0.001)
        nn.init.zeros_(logits.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.input_size:
            x = F.adaptive_avg_pool2d(x, self.input_size)
        x = x.flatten(1)
        out = self.fc(x) if self.layers == 1 else self.fc2(F.relu(self.fc1(x)))
        return out.view(-1, self.resolution, self.resolution)


def mlp_settings(cfg: HeadConfig) -> dict:
    """Map size and MLP-branch settings of a predictor, from a :class:`HeadConfig` (maps are 2 x roi_size)."""
    resolution = 2 * cfg.roi_size
    return {"resolution": resolution, "mlp": cfg.mlp, "mlp_hidden": cfg.mlp_hidden,
            "mlp_input_size": min(cfg.mlp_input_size, resolution), "mlp_layers": cfg.mlp_layers}


class MaskPredictor(nn.Module):
    """Per-RoI mask logits from FCN features, for the RoI's own class: ``[R, D, M, M]`` -> ``[R, M, M]``.

    A subclass says where each class's 1x1-conv weights (and bias) come from
    (:meth:`class_mask_weights`); this base gathers one weight vector per RoI and applies it with one
    ``einsum('rdhw,rd->rhw')`` -- never ``[R, K, M, M]`` -- and adds the class-agnostic MLP branch's
    map (§2.4) when there is one. Labels are contiguous class indices 1..K (0 = background is never
    passed).
    """

    mlp: MLPMaskBranch | None
    uses_transfer: ClassVar[bool] = False  # its weights come from T(w_det): it needs a class embedding table
    # it learns weights of its own for every class, so it trains on the masks of every class (the
    # oracle), not only set A's: the set-A rule's mask classes (pipelines/data/splits.py mask_classes)
    trains_every_class: ClassVar[bool] = False

    @classmethod
    def build(cls, cfg: HeadConfig, num_classes: int, w_det: torch.Tensor | None) -> MaskPredictor:
        """The predictor of a :class:`HeadConfig` for ``num_classes`` classes (``w_det`` [K, E]: T's input)."""
        raise NotImplementedError

    def _add_mlp_branch(self, dim: int, resolution: int, mlp: bool, hidden: int, input_size: int, layers: int = 1) -> None:
        # called after a subclass's own parameters: their random initialisation comes first
        self.mlp = MLPMaskBranch(dim, resolution, hidden, input_size, layers) if mlp else None

    def class_mask_weights(self, classes: torch.Tensor, w_det: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mask weights ``[len(classes), D]`` and biases ``[len(classes)]`` (or None) of 0-based classes."""
        raise NotImplementedError

    def forward(self, features: torch.Tensor, labels: torch.Tensor, w_det: torch.Tensor | None = None) -> torch.Tensor:
        """``features`` [R, D, M, M], ``labels`` [R] in 1..K -> logits [R, M, M]."""
        if features.shape[0] == 0:
            return features.new_zeros((0,) + features.shape[-2:])
        classes, inverse = torch.unique(labels - 1, return_inverse=True)
        weight, bias = self.class_mask_weights(classes, w_det)
        logits = torch.einsum("rdhw,rd->rhw", features, weight[inverse].to(features.dtype))
        if bias is not None:
            logits = logits + bias[inverse].to(features.dtype)[:, None, None]
        if self.mlp is not None:
            logits = logits + self.mlp(features)
        return logits


class TransferPredictor(MaskPredictor):
    """Mask^X: ``w_seg[c] = T(w_det[c])`` (no bias, as in the original code).

    ``w_det`` [K, E] is the class embedding table (detector weights, GloVe or random vectors), a
    buffer; a live table passed to ``forward`` (end-to-end training, read from the box predictor)
    replaces it. While training, T runs on the rows of the batch's classes only; in eval mode the
    whole ``w_seg`` table is computed once and reused until the module is trained again.
    """

    uses_transfer = True

    @classmethod
    def build(cls, cfg, num_classes, w_det):
        if w_det.shape[0] != num_classes:
            raise MaskxError(f"class embedding table has {w_det.shape[0]} rows for {num_classes} classes")
        transfer = WeightTransfer(w_det.shape[1], cfg.mask_dim, cfg.transfer_hidden, cfg.transfer_layers, cfg.transfer_activation,
                                  cfg.normalize_input, cfg.input_dropout, cfg.normalize_output, cfg.transfer_init)
        return cls(transfer, w_det, cfg.mask_dim, **mlp_settings(cfg))

    def __init__(self, transfer: WeightTransfer, w_det: torch.Tensor, dim: int, resolution: int = 28, mlp: bool = True,
                 mlp_hidden: int = 1024, mlp_input_size: int = 28, mlp_layers: int = 1):
        super().__init__()
        self.num_classes = w_det.shape[0]
        self.transfer = transfer
        self.register_buffer("w_det", w_det.detach().clone().float())
        self._w_seg_cache: torch.Tensor | None = None
        self._add_mlp_branch(dim, resolution, mlp, mlp_hidden, mlp_input_size, mlp_layers)

    def train(self, mode: bool = True):
        self._w_seg_cache = None
        return super().train(mode)

    def class_mask_weights(self, classes, w_det=None):
        table = self.w_det if w_det is None else w_det
        if not self.training and w_det is None:
            if self._w_seg_cache is None:
                with torch.no_grad():
                    self._w_seg_cache = self.transfer(table)
            return self._w_seg_cache[classes], None
        return self.transfer(table[classes]), None


class AgnosticPredictor(MaskPredictor):
    """The class-agnostic baseline: one shared 1x1 conv (+ bias) for every class."""

    @classmethod
    def build(cls, cfg, num_classes, w_det):
        return cls(cfg.mask_dim, **mlp_settings(cfg))

    def __init__(self, dim: int, resolution: int = 28, mlp: bool = True, mlp_hidden: int = 1024, mlp_input_size: int = 28,
                 mlp_layers: int = 1):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, dim) * 0.001)
        self.bias = nn.Parameter(torch.zeros(1))
        self._add_mlp_branch(dim, resolution, mlp, mlp_hidden, mlp_input_size, mlp_layers)

    def class_mask_weights(self, classes, w_det=None):
        return self.weight.expand(len(classes), -1), self.bias.expand(len(classes))


class OraclePredictor(MaskPredictor):
    """The upper bound: class-specific 1x1 conv weights and biases learned directly (masks of every class)."""

    trains_every_class = True

    @classmethod
    def build(cls, cfg, num_classes, w_det):
        return cls(num_classes, cfg.mask_dim, **mlp_settings(cfg))

    def __init__(self, num_classes: int, dim: int, resolution: int = 28, mlp: bool = True, mlp_hidden: int = 1024,
                 mlp_input_size: int = 28, mlp_layers: int = 1):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, dim))
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        self.bias = nn.Parameter(torch.zeros(num_classes))
        self._add_mlp_branch(dim, resolution, mlp, mlp_hidden, mlp_input_size, mlp_layers)

    def class_mask_weights(self, classes, w_det=None):
        return self.weight[classes], self.bias[classes]


# head.head -> predictor class: the one place a head's name is read
PREDICTORS: dict[str, type[MaskPredictor]] = {"transfer": TransferPredictor, "agnostic": AgnosticPredictor, "oracle": OraclePredictor}


def uses_transfer(head: str) -> bool:
    """Whether head ``head`` (a key of :data:`PREDICTORS`) predicts its weights with T from ``w_det``."""
    return head in PREDICTORS and PREDICTORS[head].uses_transfer


def trains_every_class(head: str) -> bool:
    """Whether head ``head`` (a key of :data:`PREDICTORS`) trains on the masks of every class, not only set A's."""
    return head in PREDICTORS and PREDICTORS[head].trains_every_class


class MaskSide(nn.Module):
    """Everything stage 2 trains: FCN mask head + predictor. ``[R, C, S, S]`` -> ``[R, 2S, 2S]``."""

    def __init__(self, fcn: nn.Module, predictor: MaskPredictor):
        super().__init__()
        self.fcn = fcn
        self.predictor = predictor

    def forward(self, roi_features: torch.Tensor, labels: torch.Tensor, w_det: torch.Tensor | None = None) -> torch.Tensor:
        return self.predictor(self.fcn(roi_features), labels, w_det)

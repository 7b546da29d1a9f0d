"""A trained Mask^X R-CNN as a plain torchvision ``MaskRCNN``: T baked into the class-specific predictor.

Once training is over, T's output is a fixed table: ``w_seg = T(w_det)`` ``[K, D]`` holds, for every
class, exactly the weights of a class-specific 1x1 conv on the FCN mask features, which is what
torchvision's ``MaskRCNNPredictor.mask_fcn_logits`` is (``Conv2d(D, K + 1, 1)``, background at
index 0). So a mask side without the MLP branch *is* torchvision's Mask R-CNN mask side:

=======================================  =================================================================
maskx (:class:`~pipelines.modeling.mask_heads.MaskSide`)   torchvision ``MaskRCNN.roi_heads``
=======================================  =================================================================
``fcn.convs`` (``MaskRCNNHeads``)        ``mask_head`` (the same class: the same keys)
``fcn.upsample`` (2x2 deconv) + ReLU     ``mask_predictor.conv5_mask`` + ``relu``
``class_mask_weights(all classes)``      ``mask_predictor.mask_fcn_logits`` weight ``[K + 1, D, 1, 1]``, bias ``[K + 1]``
=======================================  =================================================================

The same holds for the baseline (one shared row, repeated) and the oracle (its free rows): each
predictor's :meth:`~pipelines.modeling.mask_heads.MaskPredictor.class_mask_weights` is the one rule.
A head with the class-agnostic MLP branch (§2.4) needs one small extra module,
:class:`MLPMaskRCNNPredictor`: torchvision's predictor plus the MLP's map ``[R, M, M]`` added to every
class's logits, as :meth:`MaskPredictor.forward` adds it. The detector's tensors keep their names:
maskx's detector is torchvision's ``FasterRCNN`` layout.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FrozenBatchNorm2d

from pipelines.config import DetectorConfig, HeadConfig
from pipelines.errors import MaskxError
from pipelines.modeling.detector import detector_arguments
from pipelines.modeling.mask_heads import MaskFCNHead, MaskSide, mlp_settings
from pipelines.modeling.maskx_rcnn import build_mask_roi_pool

MASK_HEAD = "roi_heads.mask_head."
MASK_PREDICTOR = "roi_heads.mask_predictor."


class MLPMaskRCNNPredictor(nn.Module):
    """torchvision's ``MaskRCNNPredictor`` plus the class-agnostic MLP branch (§2.4).

    ``[R, D, S, S]`` (``mask_head``'s output) -> ``conv5_mask`` (2x2 deconv) + ReLU -> features
    ``[R, D, M, M]`` (M = 2S) -> ``mask_fcn_logits`` (1x1 conv) ``[R, K + 1, M, M]`` + the MLP's
    ``[R, 1, M, M]``, broadcast over the classes: the logits maskx computes for each RoI's class.
    ``mlp``: the features average-pooled to ``input_size`` (when smaller than M; ``AvgPool2d(M // input_size)``,
    which is the MLP branch's adaptive pooling when ``input_size`` divides M, and exports to ONNX), flattened, then
    ``fc`` (1 layer) or ``fc1`` + ReLU + ``fc2`` (2 layers), as :class:`MLPMaskBranch`.
    """

    def __init__(self, dim: int, num_classes: int, resolution: int = 28, input_size: int = 28, layers: int = 1,
                 hidden: int = 1024):
        super().__init__()
        self.conv5_mask = nn.ConvTranspose2d(dim, dim, 2, 2, 0)
        self.mask_fcn_logits = nn.Conv2d(dim, num_classes, 1, 1, 0)
        parts: list[tuple[str, nn.Module]] = [
            ("pool", nn.AvgPool2d(resolution // input_size) if input_size != resolution else nn.Identity()),
            ("flatten", nn.Flatten(1))]
        in_features, out_features = dim * input_size * input_size, resolution * resolution
        if layers == 1:
            parts.append(("fc", nn.Linear(in_features, out_features)))
        else:
            parts += [("fc1", nn.Linear(in_features, hidden)), ("relu", nn.ReLU()), ("fc2", nn.Linear(hidden, out_features))]
        self.mlp = nn.Sequential(OrderedDict(parts))
        self.resolution = resolution

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [R, D, S, S] -> logits [R, K + 1, 2S, 2S]."""
        x = F.relu(self.conv5_mask(x))
        return self.mask_fcn_logits(x) + self.mlp(x).view(-1, 1, self.resolution, self.resolution)


def check_bakeable(side: MaskSide, path=None) -> None:
    """Refuse a mask side with no torchvision form: one error naming ``path``. Only the plain FCN body
    (``head.fcn: convs``) has one, and an MLP branch whose pooled size divides the mask size."""
    if not isinstance(side.fcn, MaskFCNHead):
        raise MaskxError(f"its mask head body ({type(side.fcn).__name__}, head.fcn hourglass) has no torchvision Mask R-CNN "
                         "form: only head.fcn convs exports", path, key="head.fcn")
    mlp = side.predictor.mlp
    if mlp is not None and mlp.resolution % mlp.input_size:
        raise MaskxError(f"its MLP branch pools the {mlp.resolution}x{mlp.resolution} mask features to {mlp.input_size}x"
                         f"{mlp.input_size} (head.mlp_input_size), which does not divide them: only a divisor exports",
                         path, key="head.mlp_input_size")


@torch.no_grad()
def bake_transfer(side: MaskSide, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The class-specific 1x1 mask predictor of a trained mask side: weight ``[K + 1, D, 1, 1]``, bias ``[K + 1]``.

    Row ``c`` (1..K) is ``class_mask_weights`` of class c: ``w_seg = T(w_det)`` for the transfer head
    (no bias: zero), the shared row for the baseline, the oracle's own row; row 0 (background, never
    selected) is zero. Computed in eval mode (no dropout on T's input), in float32.
    """
    predictor = side.predictor
    was_training = predictor.training
    predictor.eval()
    try:
        device = next(iter(predictor.state_dict().values())).device
        weight, bias = predictor.class_mask_weights(torch.arange(num_classes, device=device))
    finally:
        predictor.train(was_training)
    return _with_background(weight.float(), None if bias is None else bias.float())


def _with_background(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """[K, D] and [K] (or None) -> [K + 1, D, 1, 1] and [K + 1], row 0 zero."""
    k, d = weight.shape
    full_w = weight.new_zeros(k + 1, d)
    full_w[1:] = weight
    full_b = weight.new_zeros(k + 1)
    if bias is not None:
        full_b[1:] = bias
    return full_w[:, :, None, None], full_b


def torchvision_mask_rcnn(detector: DetectorConfig, head: HeadConfig, num_classes: int, in_channels: int,
                          score_thresh: float | None = None) -> MaskRCNN:
    """An untrained torchvision ``MaskRCNN`` of the shape of a maskx detector + mask side, from torchvision's parts.

    The detector's parts and settings are :func:`detector_arguments`'; ``mask_head`` is torchvision's
    ``MaskRCNNHeads(in_channels, [D] * num_convs, 1)``, ``mask_predictor`` its ``MaskRCNNPredictor(D, D, K + 1)``
    or, with the MLP branch, :class:`MLPMaskRCNNPredictor`; ``mask_roi_pool`` the mask RoIAlign of
    ``head.roi_size``; ``score_thresh`` (default: the detector's ``box_score_thresh``) the box score a
    detection needs. Built on the meta device: it takes :func:`baked_state_dict` with ``assign=True``.
    """
    with torch.device("meta"):
        arguments = detector_arguments(detector, num_classes, pretrained=False)
        if score_thresh is not None:
            arguments["box_score_thresh"] = score_thresh
        dim = head.mask_dim
        mask_head = MaskRCNNHeads(in_channels, [dim] * head.num_convs, 1)
        if head.mlp:
            mlp = mlp_settings(head)
            predictor: nn.Module = MLPMaskRCNNPredictor(dim, num_classes + 1, mlp["resolution"], mlp["mlp_input_size"],
                                                        head.mlp_layers, head.mlp_hidden)
        else:
            predictor = MaskRCNNPredictor(dim, dim, num_classes + 1)
        return MaskRCNN(**arguments, mask_roi_pool=build_mask_roi_pool(head.roi_size), mask_head=mask_head,
                        mask_predictor=predictor)


def baked_state_dict(detector: nn.Module, side: MaskSide, num_classes: int, path=None) -> dict[str, torch.Tensor]:
    """The state dict of :func:`torchvision_mask_rcnn`: the detector's tensors as they are (maskx's
    detector has torchvision's names), the FCN under ``roi_heads.mask_head`` / ``mask_predictor.conv5_mask``,
    :func:`bake_transfer`'s table as ``mask_predictor.mask_fcn_logits`` and the MLP branch (if any)
    under ``mask_predictor.mlp`` (``fc`` or ``fc1`` / ``fc2``). Float32, on the CPU.

    A frozen BatchNorm layer also gets a ``num_batches_tracked`` entry (0): torchvision's builders make
    ``nn.BatchNorm2d`` layers when given no weights, which need it, and ``FrozenBatchNorm2d`` drops it
    when loading. A mask side :func:`check_bakeable` refuses is one error naming ``path`` (its checkpoint).
    """
    check_bakeable(side, path)
    state = {k: _cpu32(v) for k, v in detector.state_dict().items()}
    for name, module in detector.named_modules():
        if isinstance(module, FrozenBatchNorm2d):
            state[f"{name}.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    parts = {MASK_HEAD: side.fcn.convs, MASK_PREDICTOR + "conv5_mask.": side.fcn.upsample}
    if side.predictor.mlp is not None:
        parts[MASK_PREDICTOR + "mlp."] = side.predictor.mlp
    for prefix, module in parts.items():
        state.update({prefix + k: _cpu32(v) for k, v in module.state_dict().items()})
    weight, bias = bake_transfer(side, num_classes)
    state[MASK_PREDICTOR + "mask_fcn_logits.weight"] = weight.cpu()
    state[MASK_PREDICTOR + "mask_fcn_logits.bias"] = bias.cpu()
    return state


def _cpu32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().cpu() if t.is_floating_point() else t.detach().cpu()


# torchvision.models.detection.maskrcnn_resnet50_fpn's layout, in maskx's settings
RESNET50_FPN = {"backbone": "resnet50", "fpn_channels": 256, "box_representation": 1024, "box_head": "2fc", "fpn_norm": "none",
                "rpn_head_convs": 1, "anchor_sizes": [32, 64, 128, 256, 512]}
RESNET50_FPN_MASK = {"fcn": "convs", "mask_dim": 256, "num_convs": 4, "roi_size": 14, "mlp": False}


def torchvision_builder(detector: DetectorConfig, head: HeadConfig, num_classes: int, score_thresh: float) -> dict | None:
    """``{"name": "maskrcnn_resnet50_fpn", "kwargs": {...}, "norm_eps": eps}`` when torchvision's builder
    makes this model's layout (ResNet-50-FPN, the 2-FC box head, torchvision's anchors, a 4-conv FCN of
    256 channels, RoIs of 14, no MLP branch): ``maskrcnn_resnet50_fpn(weights=None, weights_backbone=None,
    **kwargs)`` then takes :func:`baked_state_dict`. Its ResNet then has ``nn.BatchNorm2d`` layers of eps
    1e-5: the same in eval mode as maskx's frozen ones of eps ``norm_eps``. None for any other layout."""
    if any(getattr(detector, k) != v for k, v in RESNET50_FPN.items()) or detector.norm not in ("frozen_bn", "bn"):
        return None
    if any(getattr(head, k) != v for k, v in RESNET50_FPN_MASK.items()):
        return None
    kwargs = {"num_classes": num_classes + 1, "min_size": detector.min_size, "max_size": detector.max_size,
              "rpn_pre_nms_top_n_test": detector.rpn_pre_nms_top_n_test, "rpn_post_nms_top_n_test": detector.rpn_post_nms_top_n_test,
              "box_score_thresh": score_thresh, "box_nms_thresh": detector.box_nms_thresh,
              "box_detections_per_img": detector.box_detections_per_img}
    return {"name": "maskrcnn_resnet50_fpn", "kwargs": kwargs, "norm_eps": detector.norm_eps}

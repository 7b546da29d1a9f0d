"""Faster R-CNN with an FPN backbone, built from torchvision's parts.

The box predictor is torchvision's ``FastRCNNPredictor``: ``cls_score`` Linear(D, K+1) and
``bbox_pred`` Linear(D, 4(K+1)), background at index 0. Per class c, ``w_cls[c]`` is row c of
``cls_score.weight`` (D values) and ``w_box[c]`` the four rows of ``bbox_pred.weight`` for c,
``bbox_pred.weight.view(K+1, 4*D)[c]`` (4D values) -- the paper's 1024-d and 4096-d vectors for
D = 1024.

The layout is torchvision's: ``2fc`` box head and 1-conv RPN head by default (the paper's and
``fasterrcnn_resnet50_fpn``'s), or the ``4conv1fc`` box head, normed FPN and 2-conv RPN head of
``fasterrcnn_resnet50_fpn_v2`` (``DetectorConfig.box_head``, ``fpn_norm``, ``rpn_head_convs``), so
torchvision's COCO detectors load as they are (``pipelines/stages/detect_import.py``).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from pipelines.config import DetectorConfig
from pipelines.engine.checkpoint import load_state
from pipelines.errors import MaskxError
from pipelines.modeling.zoo import backbone_weights_file, read_state_dict
from pipelines.progress import NULL_PROGRESS, Progress

RESNETS = {
    "resnet18": (resnet.resnet18, [64, 128, 256, 512]),
    "resnet34": (resnet.resnet34, [64, 128, 256, 512]),
    "resnet50": (resnet.resnet50, [256, 512, 1024, 2048]),
    "resnet101": (resnet.resnet101, [256, 512, 1024, 2048]),
}
FPN_LEVELS = ["0", "1", "2", "3"]
BOX_HEADS = ("2fc", "4conv1fc")
NORMS = ("frozen_bn", "bn", "gn")


def norm_layer(kind: str, eps: float = 1e-5, key: str = "detector.norm", allow_none: bool = False):
    """The norm layer ``kind`` as a constructor ``channels -> module``; ``None`` for ``none`` where allowed.

    ``key`` names the config key in the error for an unknown ``kind``.
    """
    if kind == "frozen_bn":
        return partial(FrozenBatchNorm2d, eps=eps)
    if kind == "bn":
        return partial(nn.BatchNorm2d, eps=eps)
    if kind == "gn":
        return lambda c: nn.GroupNorm(32 if c >= 32 else 1, c, eps=eps)
    if kind == "none" and allow_none:
        return None
    choices = ("none", *NORMS) if allow_none else NORMS
    raise MaskxError(f"unknown {key} '{kind}' (expected {' | '.join(choices)})")


def build_backbone(cfg: DetectorConfig, pretrained: bool = True, progress: Progress = NULL_PROGRESS) -> BackboneWithFPN:
    """ResNet + FPN. Output: dict of 5 maps ('0'..'3', 'pool') with ``cfg.fpn_channels`` channels.

    With ``pretrained`` the ResNet starts from ``cfg.pretrained_backbone`` (a file, or torchvision's
    weights of that name, fetched into torch's cache); a detector about to receive a whole
    checkpoint passes ``pretrained=False``.
    """
    if cfg.backbone not in RESNETS:
        raise MaskxError(f"unknown backbone '{cfg.backbone}' (expected {' | '.join(RESNETS)})")
    ctor, in_channels = RESNETS[cfg.backbone]
    body = ctor(weights=None, norm_layer=norm_layer(cfg.norm, cfg.norm_eps))
    fpn_norm = norm_layer(cfg.fpn_norm, key="detector.fpn_norm", allow_none=True)
    if cfg.pretrained_backbone and pretrained:
        path = backbone_weights_file(cfg.backbone, cfg.pretrained_backbone, progress)
        state = read_state_dict(path, "pretrained backbone weights")  # weights-only: a shared file runs no code
        missing, unexpected = load_state(body, state, path, strict=False, what=f"{cfg.backbone} backbone weights")
        if len(missing) > 10:
            raise MaskxError(f"backbone weights do not fit {cfg.backbone} ({len(missing)} tensors missing)", path)
    if not 0 <= cfg.trainable_backbone_layers <= 5:
        raise MaskxError("detector.trainable_backbone_layers must be between 0 and 5")
    trainable = ["layer4", "layer3", "layer2", "layer1", "conv1"][: cfg.trainable_backbone_layers]
    if cfg.trainable_backbone_layers == 5:
        trainable.append("bn1")
    for name, param in body.named_parameters():
        if all(not name.startswith(layer) for layer in trainable):
            param.requires_grad_(False)
    return BackboneWithFPN(
        body,
        return_layers={"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
        in_channels_list=in_channels,
        out_channels=cfg.fpn_channels,
        extra_blocks=LastLevelMaxPool(),
        norm_layer=fpn_norm,
    )


def build_box_head(cfg: DetectorConfig) -> nn.Module:
    """RoI features ``[R, C, 7, 7]`` -> ``[R, D]`` (C = ``fpn_channels``, D = ``box_representation``).

    ``2fc``: torchvision's ``TwoMLPHead`` (fc6, fc7). ``4conv1fc``: torchvision's
    ``FastRCNNConvFCHead`` with four 3x3 convs of C channels (each followed by ``box_head_norm``)
    and one FC layer, the box head of ``fasterrcnn_resnet50_fpn_v2``.
    """
    c, d = cfg.fpn_channels, cfg.box_representation
    if cfg.box_head == "2fc":
        return TwoMLPHead(c * 7 * 7, d)
    if cfg.box_head == "4conv1fc":
        norm = norm_layer(cfg.box_head_norm, key="detector.box_head_norm", allow_none=True)
        return FastRCNNConvFCHead((c, 7, 7), [c] * 4, [d], norm_layer=norm)
    raise MaskxError(f"unknown detector.box_head '{cfg.box_head}' (expected {' | '.join(BOX_HEADS)})")


def build_detector(cfg: DetectorConfig, num_classes: int, pretrained: bool = True, progress: Progress = NULL_PROGRESS) -> FasterRCNN:
    """Faster R-CNN for ``num_classes`` object classes (plus background).

    ``pretrained=False`` skips reading ``cfg.pretrained_backbone`` (the caller loads a whole
    detector checkpoint next).
    """
    if num_classes < 1:
        raise MaskxError("the detector needs at least one class")
    if cfg.rpn_head_convs < 1:
        raise MaskxError("detector.rpn_head_convs must be at least 1")
    backbone = build_backbone(cfg, pretrained, progress)
    if len(cfg.anchor_sizes) != 5:
        raise MaskxError("detector.anchor_sizes needs 5 sizes, one per FPN level")
    anchors = AnchorGenerator(tuple((s,) for s in cfg.anchor_sizes), ((0.5, 1.0, 2.0),) * 5)
    box_roi_pool = MultiScaleRoIAlign(FPN_LEVELS, output_size=7, sampling_ratio=2)
    box_head = build_box_head(cfg)
    box_predictor = FastRCNNPredictor(cfg.box_representation, num_classes + 1)
    # after the box parts, where FasterRCNN makes its own RPN head: a seeded run initialises as it always did
    rpn_head = RPNHead(cfg.fpn_channels, anchors.num_anchors_per_location()[0], conv_depth=cfg.rpn_head_convs)
    return FasterRCNN(
        backbone,
        num_classes=None,
        min_size=cfg.min_size,
        max_size=cfg.max_size,
        rpn_anchor_generator=anchors,
        rpn_head=rpn_head,
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
        box_roi_pool=box_roi_pool,
        box_head=box_head,
        box_predictor=box_predictor,
        box_batch_size_per_image=cfg.box_batch_size_per_image,
        box_detections_per_img=cfg.box_detections_per_img,
        box_score_thresh=cfg.box_score_thresh,
        box_nms_thresh=cfg.box_nms_thresh,
    )


def detector_from_state(cfg: DetectorConfig, num_classes: int, state: dict[str, torch.Tensor],
                        path: str | Path | None = None) -> FasterRCNN:
    """The detector of ``cfg`` holding the tensors of ``state`` (a whole detector's state dict).

    Built on the meta device and given the state's tensors (no random initialisation, no copy:
    about a seventh of the time of building it and then loading); names and shapes are checked as
    ``load_state_dict(strict=True)`` checks them, a mismatch is one MaskxError naming ``path``.
    """
    with torch.device("meta"):
        model = build_detector(cfg, num_classes, pretrained=False)
    load_state(model, state, path, assign=True)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # a tensor no state dict holds (none in torchvision's detection parts today)
        raise MaskxError(f"the detector checkpoint does not hold {left[0]}", path)
    return model


def detection_weights(box_predictor: FastRCNNPredictor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-class detection weights of the K object classes (background row dropped).

    Returns ``w_cls`` [K, D], ``w_box`` [K, 4D], ``b_cls`` [K], ``b_box`` [K, 4]; views of the live
    parameters (gradients flow unless the caller detaches).
    """
    w_cls = box_predictor.cls_score.weight  # [K+1, D]
    n, d = w_cls.shape
    w_box = box_predictor.bbox_pred.weight.view(n, 4 * d)
    return w_cls[1:], w_box[1:], box_predictor.cls_score.bias[1:], box_predictor.bbox_pred.bias.view(n, 4)[1:]

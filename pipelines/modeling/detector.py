"""Faster R-CNN with an FPN backbone, built from torchvision's parts.

The box predictor is torchvision's ``FastRCNNPredictor``: ``cls_score`` Linear(D, K+1) and
``bbox_pred`` Linear(D, 4(K+1)), background at index 0. Per class c, ``w_cls[c]`` is row c of
``cls_score.weight`` (D values) and ``w_box[c]`` the four rows of ``bbox_pred.weight`` for c,
``bbox_pred.weight.view(K+1, 4*D)[c]`` (4D values) -- the paper's 1024-d and 4096-d vectors for
D = 1024.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from pipelines.config import DetectorConfig
from pipelines.engine.checkpoint import load_state, load_weights
from pipelines.errors import MaskxError

RESNETS = {
    "resnet18": (resnet.resnet18, [64, 128, 256, 512]),
    "resnet34": (resnet.resnet34, [64, 128, 256, 512]),
    "resnet50": (resnet.resnet50, [256, 512, 1024, 2048]),
    "resnet101": (resnet.resnet101, [256, 512, 1024, 2048]),
}
FPN_LEVELS = ["0", "1", "2", "3"]


def _norm_layer(kind: str):
    if kind == "frozen_bn":
        return FrozenBatchNorm2d
    if kind == "bn":
        return nn.BatchNorm2d
    if kind == "gn":
        return lambda c: nn.GroupNorm(32 if c >= 32 else 1, c)
    raise MaskxError(f"unknown norm '{kind}' (expected frozen_bn | bn | gn)")


def build_backbone(cfg: DetectorConfig) -> BackboneWithFPN:
    """ResNet + FPN. Output: dict of 5 maps ('0'..'3', 'pool') with ``cfg.fpn_channels`` channels."""
    if cfg.backbone not in RESNETS:
        raise MaskxError(f"unknown backbone '{cfg.backbone}' (expected {' | '.join(RESNETS)})")
    ctor, in_channels = RESNETS[cfg.backbone]
    body = ctor(weights=None, norm_layer=_norm_layer(cfg.norm))
    if cfg.pretrained_backbone:
        path = Path(cfg.pretrained_backbone)
        state = load_weights(path, "pretrained backbone weights")  # weights-only: a shared file runs no code
        if not isinstance(state, dict):
            raise MaskxError("pretrained backbone weights are not a state dict", path)
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
    )


def build_detector(cfg: DetectorConfig, num_classes: int) -> FasterRCNN:
    """Faster R-CNN for ``num_classes`` object classes (plus background)."""
    if num_classes < 1:
        raise MaskxError("the detector needs at least one class")
    backbone = build_backbone(cfg)
    if len(cfg.anchor_sizes) != 5:
        raise MaskxError("detector.anchor_sizes needs 5 sizes, one per FPN level")
    anchors = AnchorGenerator(tuple((s,) for s in cfg.anchor_sizes), ((0.5, 1.0, 2.0),) * 5)
    box_roi_pool = MultiScaleRoIAlign(FPN_LEVELS, output_size=7, sampling_ratio=2)
    box_head = TwoMLPHead(cfg.fpn_channels * 7 * 7, cfg.box_representation)
    box_predictor = FastRCNNPredictor(cfg.box_representation, num_classes + 1)
    return FasterRCNN(
        backbone,
        num_classes=None,
        min_size=cfg.min_size,
        max_size=cfg.max_size,
        rpn_anchor_generator=anchors,
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


def detection_weights(box_predictor: FastRCNNPredictor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-class detection weights of the K object classes (background row dropped).

    Returns ``w_cls`` [K, D], ``w_box`` [K, 4D], ``b_cls`` [K], ``b_box`` [K, 4]; views of the live
    parameters (gradients flow unless the caller detaches).
    """
    w_cls = box_predictor.cls_score.weight  # [K+1, D]
    n, d = w_cls.shape
    w_box = box_predictor.bbox_pred.weight.view(n, 4 * d)
    return w_cls[1:], w_box[1:], box_predictor.cls_score.bias[1:], box_predictor.bbox_pred.bias.view(n, 4)[1:]

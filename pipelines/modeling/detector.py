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

Two settings follow the original code (Detectron, ``lib/modeling/fast_rcnn_heads.py``) or torchvision:
the box predictor's initialisation (``DetectorConfig.predictor_init``, :data:`PREDICTOR_INITS`) and the
smooth-L1 beta of the box loss (``DetectorConfig.box_loss_beta``, applied by :class:`BoxRoIHeads`).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models import resnet
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads
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


class TorchvisionPredictorInit:
    """``FastRCNNPredictor`` as torchvision makes it: ``nn.Linear``'s default, uniform within 1/sqrt(D)
    (weights and biases). Draws nothing more, so a seeded detector starts as it did before."""

    def apply(self, predictor: FastRCNNPredictor) -> None:
        pass


class DetectronPredictorInit:
    """The original code's (``add_fast_rcnn_outputs``, ``lib/modeling/fast_rcnn_heads.py``): ``cls_score``
    weights N(0, 0.01^2), ``bbox_pred`` weights N(0, 0.001^2), zero biases."""

    cls_std = 0.01
    box_std = 0.001

    def apply(self, predictor: FastRCNNPredictor) -> None:
        nn.init.normal_(predictor.cls_score.weight, std=self.cls_std)
        nn.init.normal_(predictor.bbox_pred.weight, std=self.box_std)
        nn.init.zeros_(predictor.cls_score.bias)
        nn.init.zeros_(predictor.bbox_pred.bias)


PREDICTOR_INITS = {"torchvision": TorchvisionPredictorInit(), "detectron": DetectronPredictorInit()}


def build_box_predictor(cfg: DetectorConfig, num_classes: int) -> FastRCNNPredictor:
    """``cls_score`` Linear(D, K+1) and ``bbox_pred`` Linear(D, 4(K+1)), initialised by ``cfg.predictor_init``."""
    if cfg.predictor_init not in PREDICTOR_INITS:
        raise MaskxError(f"unknown detector.predictor_init '{cfg.predictor_init}' (expected {' | '.join(PREDICTOR_INITS)})",
                         key="detector.predictor_init")
    predictor = FastRCNNPredictor(cfg.box_representation, num_classes + 1)
    PREDICTOR_INITS[cfg.predictor_init].apply(predictor)
    return predictor


def box_losses(class_logits: torch.Tensor, box_regression: torch.Tensor, labels: list[torch.Tensor],
               regression_targets: list[torch.Tensor], beta: float) -> dict[str, torch.Tensor]:
    """torchvision's ``fastrcnn_loss`` with the smooth-L1 ``beta`` as a parameter (torchvision fixes 1/9).

    ``class_logits`` [R, K+1], ``box_regression`` [R, 4(K+1)], ``labels`` and ``regression_targets``
    per image ([R_i] int64, [R_i, 4]). Cross-entropy over the R RoIs; smooth-L1 of the foreground RoIs'
    deltas of their own class, summed and divided by R (Detectron's SmoothL1Loss normalises the same way).
    """
    labels_all = torch.cat(labels)
    targets = torch.cat(regression_targets)
    loss_classifier = F.cross_entropy(class_logits, labels_all)
    pos = torch.where(labels_all > 0)[0]
    deltas = box_regression.reshape(box_regression.shape[0], -1, 4)[pos, labels_all[pos]]
    loss_box = F.smooth_l1_loss(deltas, targets[pos], beta=beta, reduction="sum") / labels_all.numel()
    return {"loss_classifier": loss_classifier, "loss_box_reg": loss_box}


class BoxRoIHeads(RoIHeads):
    """torchvision's box ``RoIHeads`` with the box loss's smooth-L1 ``box_loss_beta`` as a setting.

    Inference is torchvision's; training samples RoIs as torchvision does and computes
    :func:`box_losses`. The other arguments are torchvision's ``RoIHeads``'.
    """

    def __init__(self, *args, box_loss_beta: float = 1 / 9, **kwargs):
        super().__init__(*args, **kwargs)
        if box_loss_beta <= 0:
            raise MaskxError(f"detector.box_loss_beta must be positive, got {box_loss_beta}", key="detector.box_loss_beta")
        self.box_loss_beta = box_loss_beta

    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        proposals, _, labels, regression_targets = self.select_training_samples(proposals, targets)
        class_logits, box_regression = self.box_predictor(self.box_head(self.box_roi_pool(features, proposals, image_shapes)))
        return [], box_losses(class_logits, box_regression, labels, regression_targets, self.box_loss_beta)


def box_roi_heads(box: RoIHeads, box_loss_beta: float) -> BoxRoIHeads:
    """A :class:`BoxRoIHeads` with the parts and settings of ``box`` (the same modules, no copy)."""
    return BoxRoIHeads(
        box.box_roi_pool, box.box_head, box.box_predictor, box.proposal_matcher.high_threshold, box.proposal_matcher.low_threshold,
        box.fg_bg_sampler.batch_size_per_image, box.fg_bg_sampler.positive_fraction, box.box_coder.weights,
        box.score_thresh, box.nms_thresh, box.detections_per_img, box_loss_beta=box_loss_beta)


def detector_arguments(cfg: DetectorConfig, num_classes: int, pretrained: bool = True,
                       progress: Progress = NULL_PROGRESS) -> dict:
    """The parts and settings of the detector of ``cfg``: keyword arguments of torchvision's ``FasterRCNN``
    (and so of its ``MaskRCNN``, which takes the same ones plus the mask parts).

    Made in the order that fixes a seeded detector's random initialisation: backbone, box parts, RPN head.
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
    box_predictor = build_box_predictor(cfg, num_classes)
    # after the box parts, where FasterRCNN makes its own RPN head: a seeded run initialises as it always did
    rpn_head = RPNHead(cfg.fpn_channels, anchors.num_anchors_per_location()[0], conv_depth=cfg.rpn_head_convs)
    return dict(
        backbone=backbone,
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


def build_detector(cfg: DetectorConfig, num_classes: int, pretrained: bool = True, progress: Progress = NULL_PROGRESS) -> FasterRCNN:
    """Faster R-CNN for ``num_classes`` object classes (plus background), from :func:`detector_arguments`.

    ``pretrained=False`` skips reading ``cfg.pretrained_backbone`` (the caller loads a whole
    detector checkpoint next).
    """
    model = FasterRCNN(**detector_arguments(cfg, num_classes, pretrained, progress))
    model.roi_heads = box_roi_heads(model.roi_heads, cfg.box_loss_beta)
    return model


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

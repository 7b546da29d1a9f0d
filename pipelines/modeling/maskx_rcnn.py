"""Assembly: the mask side built from a config, and Mask^X R-CNN = torchvision Faster R-CNN + mask side.

``MaskXRoIHeads`` is a small subclass of torchvision's ``RoIHeads``: boxes exactly as torchvision
does them; masks through :class:`MaskSide`, one map per RoI for its own class, the mask loss only
on RoIs whose matched ground truth has a mask (set A), and ``w_seg = T(stop_grad(w_det))`` with
``w_det`` read live from the box predictor when trained end to end.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss, project_masks_on_boxes
from torchvision.ops import MultiScaleRoIAlign

from pipelines.config import HeadConfig
from pipelines.modeling.detector import FPN_LEVELS, detection_weights
from pipelines.modeling.embeddings import detector_embedding
from pipelines.modeling.mask_heads import MaskPredictor, MaskSide, build_fcn
from pipelines.modeling.transfer import WeightTransfer


def build_mask_roi_pool(roi_size: int) -> MultiScaleRoIAlign:
    """RoIAlign over the FPN levels: boxes -> ``[R, C, roi_size, roi_size]``."""
    return MultiScaleRoIAlign(FPN_LEVELS, output_size=roi_size, sampling_ratio=2)


def build_mask_side(cfg: HeadConfig, num_classes: int, in_channels: int, w_det: torch.Tensor | None, embed_dim: int | None = None) -> MaskSide:
    """FCN head + predictor for ``num_classes`` classes from a :class:`HeadConfig`.

    ``w_det`` [K, E] is the class embedding table for ``head='transfer'`` (``embed_dim`` = E when the
    table is supplied later, e.g. live from the detector in end-to-end training).
    """
    transfer = None
    if cfg.head == "transfer":
        in_dim = embed_dim if w_det is None else w_det.shape[1]
        transfer = WeightTransfer(in_dim, cfg.mask_dim, cfg.transfer_hidden, cfg.transfer_layers, cfg.transfer_activation,
                                  cfg.normalize_input, cfg.input_dropout, cfg.normalize_output)
    resolution = 2 * cfg.roi_size
    predictor = MaskPredictor(cfg.head, num_classes, cfg.mask_dim, resolution, w_det=w_det, mlp=cfg.mlp,
                              mlp_hidden=cfg.mlp_hidden, mlp_input_size=min(cfg.mlp_input_size, resolution), transfer=transfer)
    return MaskSide(build_fcn(cfg.fcn, in_channels, cfg.mask_dim, cfg.num_convs), predictor)


def mask_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of logits [R, M, M] against 0/1 targets [R, M, M] (0 if R == 0)."""
    if logits.numel() == 0:
        return logits.sum() * 0
    return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))


class MaskXRoIHeads(RoIHeads):
    """torchvision ``RoIHeads`` with the Mask^X mask side.

    ``embedding``: ``None`` (the predictor's own table), or ``cls`` / ``box`` / ``cls+box`` to read
    ``w_det`` from this model's box predictor on every forward (end-to-end training), detached
    when ``stop_gradient``.
    """

    def __init__(self, base: RoIHeads, mask_roi_pool: MultiScaleRoIAlign, mask_side: MaskSide,
                 embedding: str | None = None, stop_gradient: bool = True):
        nn.Module.__init__(self)
        # share every box part of the base heads (same modules, same parameters)
        self.__dict__.update({k: v for k, v in base.__dict__.items() if k not in ("_modules", "_parameters", "_buffers")})
        self._modules = dict(base._modules)
        self._parameters = dict(base._parameters)
        self._buffers = dict(base._buffers)
        self.maskx_roi_pool = mask_roi_pool
        self.mask_side = mask_side
        self.embedding = embedding
        self.stop_gradient = stop_gradient

    def live_w_det(self) -> torch.Tensor | None:
        if self.embedding is None:
            return None
        w_cls, w_box, _, _ = detection_weights(self.box_predictor)
        w_det = detector_embedding(self.embedding, w_cls, w_box)
        return w_det.detach() if self.stop_gradient else w_det

    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training:
            result, _ = super().forward(features, proposals, image_shapes)
            boxes = [r["boxes"] for r in result]
            labels = [r["labels"] for r in result]
            if sum(len(b) for b in boxes):
                roi_features = self.maskx_roi_pool(features, boxes, image_shapes)
                probs = self.mask_side(roi_features, torch.cat(labels), self.live_w_det()).sigmoid()
            else:
                m = 2 * self.maskx_roi_pool.output_size[0]
                probs = features[FPN_LEVELS[0]].new_zeros((0, m, m))
            for r, p in zip(result, probs.split([len(b) for b in boxes])):
                r["masks"] = p[:, None]
            return result, {}

        proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
        losses = {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}

        # mask loss: positive RoIs whose matched ground truth has a mask (set A)
        mask_props, mask_matched, mask_labels = [], [], []
        for props, matched, labs, t in zip(proposals, matched_idxs, labels, targets):
            keep = labs > 0
            if "has_mask" in t:
                keep &= t["has_mask"][matched]
            idx = torch.where(keep)[0]
            mask_props.append(props[idx])
            mask_matched.append(matched[idx])
            mask_labels.append(labs[idx])
        m = 2 * self.maskx_roi_pool.output_size[0]
        roi_features = self.maskx_roi_pool(features, mask_props, image_shapes)
        logits = self.mask_side(roi_features, torch.cat(mask_labels), self.live_w_det())
        mask_targets = torch.cat([
            project_masks_on_boxes(t["masks"], p, mt, m) if len(p) else p.new_zeros((0, m, m))
            for t, p, mt in zip(targets, mask_props, mask_matched)
        ])
        losses["loss_mask"] = mask_loss(logits, mask_targets)
        return [], losses


def build_maskx_rcnn(detector: FasterRCNN, mask_side: MaskSide, roi_size: int, embedding: str | None = None,
                     stop_gradient: bool = True) -> FasterRCNN:
    """Put the mask side into a Faster R-CNN (in place) and return it: a Mask^X R-CNN."""
    detector.roi_heads = MaskXRoIHeads(detector.roi_heads, build_mask_roi_pool(roi_size), mask_side, embedding, stop_gradient)
    return detector

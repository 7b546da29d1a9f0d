"""Mask^X R-CNN: the mask side built from a config, its RoI heads, and prediction.

Built like torchvision's ``MaskRCNN``: :class:`MaskXRoIHeads` is a torchvision ``RoIHeads`` made
from its parts (``box_roi_pool``, ``box_head``, ``box_predictor``, ``mask_roi_pool``, ``mask_head``,
``mask_predictor``). Boxes exactly as torchvision does them; masks one map per RoI for its own class,
the mask loss only on the RoIs the set-A rule picks (:func:`pipelines.data.splits.takes_mask_loss`),
and, trained end to end, ``w_seg = T(stop_grad(w_det))`` with ``w_det`` read live from the box
predictor (§2.2). :func:`detect_and_segment` is prediction: a frozen detector once per image, then
any number of mask sides on the same detections.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.roi_heads import expand_boxes, expand_masks, project_masks_on_boxes
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import MultiScaleRoIAlign

from pipelines.config import HeadConfig
from pipelines.data.splits import takes_mask_loss
from pipelines.errors import MaskxError
from pipelines.modeling.detector import FPN_LEVELS, BoxRoIHeads, box_losses, detection_weights
from pipelines.modeling.embeddings import INPUTS, RANDN_FORMS, detector_embedding
from pipelines.modeling.mask_heads import FCNS, MLP_LAYERS, PREDICTORS, MaskPredictor, MaskSide, build_fcn, uses_transfer
from pipelines.modeling.transfer import ACTIVATIONS, INITS


def build_mask_roi_pool(roi_size: int) -> MultiScaleRoIAlign:
    """RoIAlign over the FPN levels: boxes -> ``[R, C, roi_size, roi_size]``."""
    return MultiScaleRoIAlign(FPN_LEVELS, output_size=roi_size, sampling_ratio=2)


def check_head(h: HeadConfig) -> None:
    """Refuse a mask side :func:`build_mask_side` cannot build, before anything is loaded or trained."""
    if h.head not in PREDICTORS:
        raise MaskxError(f"unknown head.head '{h.head}' (expected {' | '.join(PREDICTORS)})", key="head.head")
    if h.input not in INPUTS:
        raise MaskxError(f"unknown head.input '{h.input}' (expected {' | '.join(INPUTS)})", key="head.input")
    if h.e2e_mask_targets not in MASK_TARGETS:
        raise MaskxError(f"unknown head.e2e_mask_targets '{h.e2e_mask_targets}' (expected {' | '.join(MASK_TARGETS)})",
                         key="head.e2e_mask_targets")
    if h.randn not in RANDN_FORMS:
        raise MaskxError(f"unknown head.randn '{h.randn}' (expected {' | '.join(RANDN_FORMS)})", key="head.randn")
    if uses_transfer(h.head) and h.input == "glove" and not h.glove:
        raise MaskxError("input glove needs a GloVe text file: set head.glove", key="head.glove")
    if h.transfer_layers not in (1, 2, 3):
        raise MaskxError(f"head.transfer_layers must be 1, 2 or 3, got {h.transfer_layers}", key="head.transfer_layers")
    if h.transfer_activation not in ACTIVATIONS:
        raise MaskxError(f"unknown head.transfer_activation '{h.transfer_activation}' (expected {' | '.join(ACTIVATIONS)})",
                         key="head.transfer_activation")
    if h.transfer_init not in INITS:
        raise MaskxError(f"unknown head.transfer_init '{h.transfer_init}' (expected {' | '.join(INITS)})", key="head.transfer_init")
    if h.fcn not in FCNS:
        raise MaskxError(f"unknown head.fcn '{h.fcn}' (expected {' | '.join(FCNS)})", key="head.fcn")
    if h.mlp_layers not in MLP_LAYERS:
        raise MaskxError(f"head.mlp_layers must be 1 or 2, got {h.mlp_layers}", key="head.mlp_layers")


def build_mask_side(cfg: HeadConfig, num_classes: int, in_channels: int, w_det: torch.Tensor | None = None,
                    embed_dim: int | None = None) -> MaskSide:
    """Mask head body + predictor (``PREDICTORS[cfg.head]``) for ``num_classes`` classes from a :class:`HeadConfig`.

    ``w_det`` [K, E] is the class embedding table of a head with T (without one, a zero table of
    width ``embed_dim``, to be loaded from a checkpoint or replaced live end to end). The predictor
    is made before the body, which fixes their random initialisation for a given seed.
    """
    check_head(cfg)
    predictor_cls = PREDICTORS[cfg.head]
    if predictor_cls.uses_transfer and w_det is None:
        w_det = torch.zeros(num_classes, embed_dim or 0)
    predictor = predictor_cls.build(cfg, num_classes, w_det)
    return MaskSide(build_fcn(cfg.fcn, in_channels, cfg.mask_dim, cfg.num_convs), predictor)


class SoftMaskTargets:
    """The instance's mask cut to the RoI by RoIAlign (torchvision's ``project_masks_on_boxes``), as it is: [0, 1]."""

    def __call__(self, targets: torch.Tensor) -> torch.Tensor:
        """``targets`` float [R, M, M] -> the same."""
        return targets


class BinaryMaskTargets:
    """The same thresholded at 0.5: 0 / 1, as the original code's (the polygon rasterised in the RoI,
    ``polys_to_mask_wrt_box`` in ``lib/utils/segms.py``, ``mask > 0`` in ``lib/roi_data/mask_rcnn.py``) and the stage-2 cache's."""

    threshold = 0.5

    def __call__(self, targets: torch.Tensor) -> torch.Tensor:
        """``targets`` float [R, M, M] -> 0. / 1. of the same dtype and shape."""
        return (targets >= self.threshold).to(targets.dtype)


MASK_TARGETS = {"soft": SoftMaskTargets(), "binary": BinaryMaskTargets()}


def mask_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of logits [R, M, M] against targets in [0, 1] [R, M, M] (0 if R == 0)."""
    if logits.numel() == 0:
        return logits.sum() * 0
    return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))


class MaskXRoIHeads(BoxRoIHeads):
    """torchvision ``RoIHeads`` with the Mask^X mask side (and the box loss's ``box_loss_beta`` of :class:`BoxRoIHeads`).

    ``mask_head`` maps RoI features ``[R, C, S, S]`` to ``[R, D, 2S, 2S]``; ``mask_predictor`` (a
    :class:`~pipelines.modeling.mask_heads.MaskPredictor`) gives one ``[2S, 2S]`` map per RoI for
    its class. ``mask_labels`` bool ``[K + 1]``: the classes whose masks train (set A; None: every
    class), applied with each instance's ``has_mask`` by the set-A rule. ``embedding``: None (the
    predictor's own table) or ``cls`` / ``box`` / ``cls+box``, to read ``w_det`` from this model's
    box predictor on every forward, detached when ``stop_gradient`` (§2.2). ``mask_targets``: a key of
    :data:`MASK_TARGETS` (``soft`` or ``binary`` targets for the mask loss). The other arguments are
    torchvision's ``RoIHeads``'.
    """

    def __init__(self, box_roi_pool, box_head, box_predictor, mask_roi_pool: MultiScaleRoIAlign, mask_head: nn.Module,
                 mask_predictor: MaskPredictor, *, fg_iou_thresh: float = 0.5, bg_iou_thresh: float = 0.5,
                 batch_size_per_image: int = 512, positive_fraction: float = 0.25, bbox_reg_weights=None,
                 score_thresh: float = 0.05, nms_thresh: float = 0.5, detections_per_img: int = 100,
                 mask_labels: torch.Tensor | None = None, embedding: str | None = None, stop_gradient: bool = True,
                 box_loss_beta: float = 1 / 9, mask_targets: str = "soft"):
        super().__init__(box_roi_pool, box_head, box_predictor, fg_iou_thresh, bg_iou_thresh, batch_size_per_image,
                         positive_fraction, bbox_reg_weights, score_thresh, nms_thresh, detections_per_img,
                         mask_roi_pool=mask_roi_pool, mask_head=mask_head, mask_predictor=mask_predictor,
                         box_loss_beta=box_loss_beta)
        if mask_labels is None:
            mask_labels = torch.ones(box_predictor.cls_score.out_features, dtype=torch.bool)
            mask_labels[0] = False
        self.register_buffer("mask_labels", mask_labels.clone(), persistent=False)
        self.embedding = embedding
        self.stop_gradient = stop_gradient
        if mask_targets not in MASK_TARGETS:
            raise MaskxError(f"unknown head.e2e_mask_targets '{mask_targets}' (expected {' | '.join(MASK_TARGETS)})",
                             key="head.e2e_mask_targets")
        self.mask_targets = MASK_TARGETS[mask_targets]

    def live_w_det(self) -> torch.Tensor | None:
        """``w_det`` [K, E] read from the box predictor (None: the predictor uses its own table)."""
        if self.embedding is None:
            return None
        w_cls, w_box, _, _ = detection_weights(self.box_predictor)
        w_det = detector_embedding(self.embedding, w_cls, w_box)
        return w_det.detach() if self.stop_gradient else w_det

    def mask_logits(self, features, boxes: list[torch.Tensor], labels: torch.Tensor, image_shapes) -> torch.Tensor:
        """Logits ``[R, 2S, 2S]`` of the RoIs ``boxes`` (per image) for their classes ``labels`` [R]."""
        if not self.training and sum(len(b) for b in boxes) == 0:
            m = 2 * self.mask_roi_pool.output_size[0]
            return features[FPN_LEVELS[0]].new_zeros((0, m, m))
        x = self.mask_head(self.mask_roi_pool(features, boxes, image_shapes))
        return self.mask_predictor(x, labels, self.live_w_det())

    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training:
            box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
            class_logits, box_regression = self.box_predictor(box_features)
            boxes, scores, labels = self.postprocess_detections(class_logits, box_regression, proposals, image_shapes)
            probs = self.mask_logits(features, boxes, torch.cat(labels), image_shapes).sigmoid()
            result = [{"boxes": b, "labels": lab, "scores": s, "masks": p[:, None]}
                      for b, lab, s, p in zip(boxes, labels, scores, probs.split([len(b) for b in boxes]))]
            return result, {}

        proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        losses = box_losses(class_logits, box_regression, labels, regression_targets, self.box_loss_beta)

        mask_props, mask_matched, mask_labels = [], [], []
        for props, matched, labs, t in zip(proposals, matched_idxs, labels, targets):
            has_mask = t["has_mask"][matched] if "has_mask" in t else None
            idx = torch.where(takes_mask_loss(labs, self.mask_labels, has_mask))[0]
            mask_props.append(props[idx])
            mask_matched.append(matched[idx])
            mask_labels.append(labs[idx])
        m = 2 * self.mask_roi_pool.output_size[0]
        logits = self.mask_logits(features, mask_props, torch.cat(mask_labels), image_shapes)
        mask_targets = torch.cat([
            project_masks_on_boxes(t["masks"], p, mt, m) if len(p) else p.new_zeros((0, m, m))
            for t, p, mt in zip(targets, mask_props, mask_matched)
        ])
        loss_mask = mask_loss(logits, self.mask_targets(mask_targets))
        if len(logits) == 0 and _distributed():
            loss_mask = loss_mask + self.mask_side_in_graph()
        return [], {**losses, "loss_mask": loss_mask}

    def mask_side_in_graph(self) -> torch.Tensor:
        """0, as a sum over every trainable parameter of the mask side (FCN body and predictor).

        Added to the mask loss of a batch in which no RoI takes it, under DistributedDataParallel: there
        every process must give every parameter a gradient in every step (here zeros), or the processes'
        gradient all-reduces no longer match and training dies (``Expected to have finished reduction in
        the prior iteration``). A single process keeps such parameters without a gradient, as before, so
        its numbers do not change (SGD skips a parameter with none: no weight decay, no momentum step).
        """
        params = [p for m in (self.mask_head, self.mask_predictor) for p in m.parameters() if p.requires_grad]
        return sum((p.sum() * 0.0 for p in params), torch.zeros((), device=self.mask_labels.device))


def _distributed() -> bool:
    """Whether this process trains in a torch.distributed process group (``torchrun``)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def build_maskx_rcnn(detector: FasterRCNN, mask_side: MaskSide, roi_size: int, embedding: str | None = None,
                     stop_gradient: bool = True, mask_labels: torch.Tensor | None = None,
                     mask_targets: str = "soft") -> FasterRCNN:
    """Mask^X R-CNN from a Faster R-CNN (in place, returned): its box parts and settings, plus the mask side.

    As torchvision's ``MaskRCNN`` adds its mask parts to Faster R-CNN's ``RoIHeads``; see
    :class:`MaskXRoIHeads` for ``embedding``, ``stop_gradient``, ``mask_labels`` and ``mask_targets``. The box loss's
    beta is the detector's (``detector.box_loss_beta``; torchvision's 1/9 for a plain torchvision one).
    """
    box = detector.roi_heads
    detector.roi_heads = MaskXRoIHeads(
        box.box_roi_pool, box.box_head, box.box_predictor, build_mask_roi_pool(roi_size), mask_side.fcn, mask_side.predictor,
        fg_iou_thresh=box.proposal_matcher.high_threshold, bg_iou_thresh=box.proposal_matcher.low_threshold,
        batch_size_per_image=box.fg_bg_sampler.batch_size_per_image, positive_fraction=box.fg_bg_sampler.positive_fraction,
        bbox_reg_weights=box.box_coder.weights, score_thresh=box.score_thresh, nms_thresh=box.nms_thresh,
        detections_per_img=box.detections_per_img, mask_labels=mask_labels, embedding=embedding, stop_gradient=stop_gradient,
        box_loss_beta=getattr(box, "box_loss_beta", 1 / 9), mask_targets=mask_targets)
    return detector


class PastedMasks:
    """The masks of one image's detections, pasted into the image one at a time when read.

    ``probs`` float ``[N, M, M]`` (mask probabilities in each detection's box), ``boxes`` float
    ``[N, 4]`` (x1, y1, x2, y2 in the image's pixels), ``size`` the image's (H, W). Iterating gives
    each mask as uint8 ``[H, W]`` (probability >= ``threshold``), the pixels torchvision's
    ``paste_masks_in_image`` gives, thresholded; ``masks[i]`` pastes mask ``i`` alone. Only one
    full-size mask exists at a time, so memory does not grow with the number of detections.
    :meth:`numpy` stacks them all (uint8 ``[N, H, W]``).
    """

    def __init__(self, probs: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int], threshold: float):
        self.probs, self.boxes, self.size, self.threshold = probs, boxes, (int(size[0]), int(size[1])), threshold

    def __len__(self) -> int:
        return len(self.probs)

    def __getitem__(self, i: int):
        """Mask ``i`` pasted: uint8 ``[H, W]`` (a numpy array)."""
        return paste_mask(self.probs[i], self.boxes[i], self.size, self.threshold).cpu().numpy()

    def __iter__(self):
        for i in range(len(self.probs)):
            yield self[i]

    def numpy(self):
        import numpy as np

        out = np.empty((len(self), *self.size), dtype=np.uint8)
        for i, mask in enumerate(self):
            out[i] = mask
        return out


def paste_mask(prob: torch.Tensor, box: torch.Tensor, size: tuple[int, int], threshold: float) -> torch.Tensor:
    """One mask ``prob`` float ``[M, M]`` of the box ``box`` ``[4]`` pasted into an image of ``size`` (H, W)
    as uint8 ``[H, W]`` (probability >= ``threshold``).

    torchvision's ``paste_masks_in_image`` (padding 1: the mask and its box grown by one cell, the
    box rounded to whole pixels, the mask resized to it bilinearly) for one mask, written straight
    into a uint8 image: the float resize covers the box only, never the whole image.
    """
    height, width = size
    padded, scale = expand_masks(prob[None, None].float(), padding=1)
    x0, y0, x1, y1 = (int(v) for v in expand_boxes(box[None].float(), scale).to(torch.int64)[0])
    w, h = max(x1 - x0 + 1, 1), max(y1 - y0 + 1, 1)
    resized = F.interpolate(padded, size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    out = torch.full((height, width), int(0.0 >= threshold), dtype=torch.uint8, device=prob.device)
    cx0, cx1, cy0, cy1 = max(x0, 0), min(x1 + 1, width), max(y0, 0), min(y1 + 1, height)
    if cx1 > cx0 and cy1 > cy0:
        out[cy0:cy1, cx0:cx1] = (resized[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0] >= threshold).to(torch.uint8)
    return out


@torch.no_grad()
def detect_and_segment(model: FasterRCNN, roi_pool: MultiScaleRoIAlign, heads: dict[str, nn.Module], images: list[torch.Tensor],
                       device: torch.device, mask_threshold: float = 0.5, only_labels: torch.Tensor | None = None,
                       given: list[dict] | None = None, paste: bool = True) -> dict[str, list[dict]]:
    """Run the detector once on a batch of images, then every mask side on the same detections.

    ``model`` is a torchvision Faster R-CNN in eval mode on ``device``; ``roi_pool`` the mask RoIAlign
    (``[R, C, S, S]`` features per detection); ``heads`` name -> :class:`MaskSide`; ``images``
    float32 ``[3, H_i, W_i]`` in [0, 1], any sizes. ``only_labels`` (bool ``[K + 1]``, optional) keeps
    the detections of the labels it marks and drops the others before masks are computed. ``given`` (optional, one dict per
    image: ``boxes`` float32 ``[N_i, 4]`` in the image's pixels, ``labels`` int64 ``[N_i]``, optional
    ``scores`` float32 ``[N_i]``) replaces the detector's detections: those boxes are segmented, with
    their scores or score 1 (mask quality alone). Each
    head computes one ``2S x 2S`` map per detection, for its own class, so memory does not grow with
    the number of classes.

    Returns head name -> one dict per image, on the CPU: ``boxes`` float32 ``[N, 4]`` (x1, y1, x2, y2
    in the image's pixels), ``scores`` float32 ``[N]``, ``labels`` int64 ``[N]`` (1..K) and ``masks``
    (mask probability >= ``mask_threshold``): uint8 ``[N, H_i, W_i]``, or with ``paste=False`` a
    :class:`PastedMasks` that pastes them one at a time when read (for large images: memory of one
    full-size mask, not of ``N``).
    """
    original_sizes = [tuple(im.shape[-2:]) for im in images]
    image_list, _ = model.transform([im.to(device) for im in images])
    features = model.backbone(image_list.tensors)
    if given is None:
        proposals, _ = model.rpn(image_list, features)
        detections, _ = model.roi_heads(features, proposals, image_list.image_sizes)
    else:
        detections = [{"boxes": resize_boxes(g["boxes"].to(device), size, new_size), "labels": g["labels"].to(device),
                       "scores": g["scores"].to(device) if "scores" in g else torch.ones(len(g["boxes"]), device=device)}
                      for g, size, new_size in zip(given, original_sizes, image_list.image_sizes)]
    if only_labels is not None:
        detections = [{k: v[only_labels.to(v.device)[d["labels"]]] for k, v in d.items()} for d in detections]
    boxes = [d["boxes"] for d in detections]
    labels = torch.cat([d["labels"] for d in detections])
    counts = [len(b) for b in boxes]
    roi_features = roi_pool(features, boxes, image_list.image_sizes) if sum(counts) else None
    # boxes in the original images' pixels (torchvision's postprocess without masks)
    dets = model.transform.postprocess([{k: v for k, v in d.items() if k != "masks"} for d in detections],
                                       image_list.image_sizes, original_sizes)
    out: dict[str, list[dict]] = {}
    for name, head in heads.items():
        if roi_features is not None:
            probs = head(roi_features, labels).sigmoid()
        else:
            m = 2 * roi_pool.output_size[0]
            probs = features[FPN_LEVELS[0]].new_zeros((0, m, m))
        out[name] = []
        for d, p, size in zip(dets, probs.split(counts), original_sizes):
            masks = PastedMasks(p.float(), d["boxes"].float(), size, mask_threshold)  # pasted on the device, one at a time
            out[name].append({"boxes": d["boxes"].float().cpu(), "scores": d["scores"].float().cpu(), "labels": d["labels"].cpu(),
                              "masks": masks if not paste else torch.from_numpy(masks.numpy())})
    return out

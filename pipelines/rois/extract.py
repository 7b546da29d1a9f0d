"""Running the frozen detector for RoIs: backbone and RPN on a batch of images, the RoIs drawn by
:mod:`pipelines.rois.sampling`, their RoIAligned FPN features and their mask targets."""

from __future__ import annotations

import contextlib

import torch
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.roi_heads import project_masks_on_boxes
from torchvision.ops import MultiScaleRoIAlign

from pipelines.config import CacheConfig
from pipelines.rois.sampling import keep_at_most, kept_per_image, sample_detectron, sample_instance
from pipelines.rois.store import RoIBatch


def proposals_per_image(model: FasterRCNN, cfg: CacheConfig) -> int:
    """How many RPN proposals per image the RoIs are drawn from: ``cache.rpn_proposals``, else the
    detector's own (``rpn_post_nms_top_n_test``, the RPN in eval mode)."""
    return cfg.rpn_proposals or int(model.rpn.post_nms_top_n())


@contextlib.contextmanager
def rpn_keeping(model: FasterRCNN, n: int):
    """Inside, the detector's RPN (in eval mode) keeps ``n`` proposals per image after NMS (0: its own
    setting); as before after."""
    kept = model.rpn._post_nms_top_n  # torchvision's {"training": n, "testing": n}
    saved = dict(kept)
    kept["testing"] = n or kept["testing"]
    try:
        yield
    finally:
        kept.update(saved)


def _generators(generator, n: int) -> list[torch.Generator]:
    return list(generator) if isinstance(generator, (list, tuple)) else [generator] * n


def _draw(cfg: CacheConfig, gt: torch.Tensor, proposals: torch.Tensor, generator: torch.Generator):
    """(RoIs [R, 4], matched instance [R], is_gt [R]) of one image by ``cfg.sampling``."""
    if cfg.sampling == "detectron":
        return sample_detectron(gt, proposals, cfg.rois_per_image, cfg.fg_fraction, cfg.min_iou, generator)
    return sample_instance(gt, proposals, cfg.proposals_per_instance, cfg.min_iou, generator)


@torch.no_grad()
def extract_rois(model: FasterRCNN, roi_pool: MultiScaleRoIAlign, images: list[torch.Tensor], targets: list[dict],
                 cfg: CacheConfig, generator: torch.Generator | list[torch.Generator]) -> RoIBatch:
    """Run the frozen detector's backbone and RPN on ``images`` and cut out the RoIs of masked instances.

    The RPN keeps :func:`proposals_per_image` proposals per image (``cache.rpn_proposals``).
    ``targets`` are CocoDataset targets (``boxes`` of every instance, ``masks`` and ``has_mask``);
    RoIs are drawn with ``cfg.sampling`` over every instance and kept when their matched
    instance has ``has_mask``. ``generator``: one for all images, or one per image. Boxes and
    masks are resized with the detector's own transform. Per image, RoIs come in the sampler's
    order (instance: GT boxes first, then each instance's proposals); ``index`` [R] gives each
    RoI's instance as a position among the masked instances of all images. Features are
    [R, C, S, S] (S = the pool's output size), masks uint8[R, 2S, 2S].
    """
    device = next(model.parameters()).device
    gens = _generators(generator, len(images))
    has_mask = [t["has_mask"].to(device) for t in targets]
    tgts = [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device), "masks": t["masks"][t["has_mask"]].to(device)}
            for t in targets]
    in_sizes = [tuple(im.shape[-2:]) for im in images]
    image_list, tgts = model.transform([im.to(device, non_blocking=True) for im in images], tgts)
    features = model.backbone(image_list.tensors)
    with rpn_keeping(model, cfg.rpn_proposals):
        proposals, _ = model.rpn(image_list, features)
    rois, matched_mask, labels, index, boxes, is_gt, instance, image = [], [], [], [], [], [], [], []
    offset = 0
    for i, (props, t, hm, g) in enumerate(zip(proposals, tgts, has_mask, gens)):
        r, matched, gt_flag = _draw(cfg, t["boxes"], props, g)
        keep = hm[matched]
        r, matched, gt_flag = r[keep], matched[keep], gt_flag[keep]
        if cfg.sampling == "detectron" and (few := keep_at_most(len(r), kept_per_image(cfg), g)) is not None:
            few = few.to(r.device)
            r, matched, gt_flag = r[few], matched[few], gt_flag[few]
        pos = torch.cumsum(hm.long(), 0) - 1  # position of each instance among this image's masked ones
        mi = pos[matched]
        rois.append(r)
        matched_mask.append(mi)
        labels.append(t["labels"][matched])
        index.append(mi + offset)
        offset += int(hm.sum())
        (h0, w0), (h1, w1) = in_sizes[i], image_list.image_sizes[i]
        scale = torch.tensor([w1 / w0, h1 / h0, w1 / w0, h1 / h0], device=r.device)
        boxes.append((r / scale).float())
        is_gt.append(gt_flag)
        instance.append(matched)
        image.append(torch.full((len(r),), i, dtype=torch.long, device=device))
    m = 2 * roi_pool.output_size[0]
    feats = roi_pool(features, rois, image_list.image_sizes)
    masks = torch.cat([
        project_masks_on_boxes(t["masks"], r, mi, m) if len(r) else feats.new_zeros((0, m, m))
        for t, r, mi in zip(tgts, rois, matched_mask)
    ])
    cpu = lambda xs: torch.cat(xs).cpu()  # noqa: E731
    return RoIBatch(feats, (masks >= 0.5).to(torch.uint8), torch.cat(labels), cpu(index), cpu(boxes), cpu(is_gt),
                    cpu(instance), cpu(image))

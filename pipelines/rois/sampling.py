"""Which RoIs of an image stage 2 trains on: the two samplings of the feature cache.

Both take the image's ground-truth boxes (every class, crowd regions excluded) and the frozen
detector's RPN proposals, and return ``(boxes [R, 4], matched [R], is_gt [R])``: the RoIs, the
ground-truth instance each one is matched to (its mask is the RoI's target, its class the label)
and whether the RoI is a ground-truth box itself. Callers keep the RoIs whose matched instance
has a mask of the cached classes. Because every instance takes part in the draw whichever classes
are kept, the RoIs of a class do not depend on which other classes a cache holds.

- ``instance`` (maskx's own): per instance its ground-truth box, then up to
  ``proposals_per_instance`` proposals with IoU >= ``min_iou`` with it, drawn at random. About a
  third of the RoIs are exact ground-truth boxes (with 2 proposals per instance).
- ``detectron`` (the official code's, ``lib/roi_data/fast_rcnn.py::_sample_rois``): the
  candidates are the ground-truth boxes and the proposals; a candidate is foreground when its
  highest IoU with a ground-truth box is >= ``min_iou`` (``TRAIN.FG_THRESH``) and is matched to that
  box; at most ``round(fg_fraction * rois_per_image)`` foreground candidates are drawn at random
  without replacement (``TRAIN.FG_FRACTION`` x ``TRAIN.BATCH_SIZE_PER_IM`` = 0.25 x 512 = 128).
  Background RoIs carry no mask target and are not cached. Of the drawn RoIs of the cached classes,
  at most :func:`kept_per_image` are kept per image copy (``cache.fg_per_image``, or what the disk
  budget ``cache.max_gb`` allows), a random subset: the official draw when it is 128.

:func:`image_generator` gives each image (and its flipped copy) its own random stream, so a
cache's content does not depend on how its images were batched or on DataLoader workers.
"""

from __future__ import annotations

import torch
from torchvision.ops import box_iou

from pipelines.config import CacheConfig

SAMPLINGS = ("instance", "detectron")


def sampling_settings(cfg: CacheConfig) -> dict:
    """The settings that decide which RoIs are drawn (only those of the chosen sampling; ``rpn_proposals``
    only when set, so the keys of caches built with the detector's own proposal count stay as they were)."""
    rpn = {"rpn_proposals": cfg.rpn_proposals} if cfg.rpn_proposals else {}
    if cfg.sampling == "detectron":
        return {"sampling": "detectron", "rois_per_image": cfg.rois_per_image, "fg_fraction": cfg.fg_fraction, "min_iou": cfg.min_iou,
                "fg_per_image": kept_per_image(cfg), **rpn}
    return {"sampling": "instance", "proposals_per_instance": cfg.proposals_per_instance, "min_iou": cfg.min_iou, **rpn}


def image_generator(seed: int, image_id: int | str, flipped: bool = False) -> torch.Generator:
    """The random stream of one image's RoI draw: a function of (seed, image id, flipped) alone."""
    ident = image_id if isinstance(image_id, int) else int.from_bytes(str(image_id).encode()[:7].ljust(7, b"\0"), "little")
    return torch.Generator().manual_seed(((seed * 1_000_003 + ident) * 2 + int(bool(flipped))) % (2**63))


def fg_per_image(rois_per_image: int, fg_fraction: float) -> int:
    """Detectron's cap of foreground RoIs per image: ``int(round(fg_fraction * rois_per_image))``."""
    return int(round(fg_fraction * rois_per_image))


def kept_per_image(cfg: CacheConfig) -> int:
    """detectron sampling: foreground RoIs of the cached classes kept per image copy at most -- the official
    draw's cap (:func:`fg_per_image`), or ``cache.fg_per_image`` when that is set and smaller."""
    cap = fg_per_image(cfg.rois_per_image, cfg.fg_fraction)
    return min(cap, cfg.fg_per_image) if cfg.fg_per_image > 0 else cap


def keep_at_most(n: int, k: int, generator: torch.Generator) -> torch.Tensor | None:
    """Positions (sorted) of ``k`` of ``n`` drawn RoIs chosen at random, or None when ``n <= k`` (keep all)."""
    if n <= k:
        return None
    return torch.randperm(n, generator=generator)[:k].sort().values


def _empty(boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dev = boxes.device
    return boxes.new_zeros((0, 4)), torch.zeros(0, dtype=torch.long, device=dev), torch.zeros(0, dtype=torch.bool, device=dev)


def sample_instance(gt: torch.Tensor, proposals: torch.Tensor, proposals_per_instance: int, min_iou: float,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per instance: its ground-truth box, then up to ``proposals_per_instance`` proposals with IoU >= ``min_iou``.

    ``gt`` float[G, 4], ``proposals`` float[P, 4] (x1, y1, x2, y2). Returns the G ground-truth
    boxes first, then each instance's proposals in instance order.
    """
    dev = gt.device
    if len(gt) == 0:
        return _empty(gt)
    boxes, matched = [gt], [torch.arange(len(gt), device=dev)]
    if len(proposals) and proposals_per_instance > 0:
        iou = box_iou(gt, proposals)  # [G, P]
        for g in range(len(gt)):
            cand = torch.where(iou[g] >= min_iou)[0]
            if len(cand) > proposals_per_instance:
                pick = torch.randperm(len(cand), generator=generator)[:proposals_per_instance]
                cand = cand[pick.to(dev)]
            boxes.append(proposals[cand])
            matched.append(torch.full((len(cand),), g, device=dev, dtype=torch.long))
    matched_t = torch.cat(matched)
    is_gt = torch.zeros(len(matched_t), dtype=torch.bool, device=dev)
    is_gt[: len(gt)] = True
    return torch.cat(boxes), matched_t, is_gt


def sample_detectron(gt: torch.Tensor, proposals: torch.Tensor, rois_per_image: int, fg_fraction: float, min_iou: float,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Detectron's foreground sample: at most ``round(fg_fraction * rois_per_image)`` of the candidates
    (ground-truth boxes + proposals) whose highest IoU with a ground-truth box is >= ``min_iou``.

    ``gt`` float[G, 4], ``proposals`` float[P, 4]. The drawn RoIs are returned in candidate order
    (ground-truth boxes first), each matched to the ground-truth box it overlaps most.
    """
    if len(gt) == 0:
        return _empty(gt)
    cand = torch.cat([gt, proposals]) if len(proposals) else gt
    best, matched = box_iou(cand, gt).max(dim=1)  # [G + P]
    fg = torch.where(best >= min_iou)[0]
    n = min(fg_per_image(rois_per_image, fg_fraction), len(fg))
    pick = fg[torch.randperm(len(fg), generator=generator)[:n].to(fg.device)].sort().values
    return cand[pick], matched[pick], pick < len(gt)

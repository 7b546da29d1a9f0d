"""Building a feature cache: every image through the frozen detector once, its RoIs written to the store."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from torchvision.models.detection import FasterRCNN
from torchvision.ops import MultiScaleRoIAlign

from pipelines.config import CacheConfig
from pipelines.data.coco import collate
from pipelines.errors import MaskxError
from pipelines.progress import NULL_PROGRESS, Progress
from pipelines.rois.extract import extract_rois, proposals_per_image
from pipelines.rois.instances import flip_source, instance_counts
from pipelines.rois.plan import CachePlan, check_room, plan_cache
from pipelines.rois.sampling import image_generator, sampling_settings
from pipelines.rois.store import CHUNK, CacheWriter, FeatureCache, layout_of, open_cache

_ERROR = "maskx-error"


class _Guarded(torch.utils.data.Dataset):
    """``dataset`` whose MaskxError (an unreadable image, ...) reaches the main process as one line, not a worker traceback."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        try:
            return self.dataset[i]
        except MaskxError as exc:
            return (_ERROR, exc.message, exc.path)


def _collate_guarded(batch):
    """:func:`collate`, or the first ``(_ERROR, message, path)`` item of the batch."""
    return next((item for item in batch if isinstance(item[0], str)), None) or collate(batch)


def build_cache(model: FasterRCNN, roi_pool: MultiScaleRoIAlign, dataset, cfg: CacheConfig, path: Path, key: str,
                channels: int, progress: Progress = NULL_PROGRESS, batch_images: int = 8, seed: int = 0,
                chunk_rows: int = CHUNK, workers: int = 0, attrs: dict | None = None, plan: CachePlan | None = None) -> FeatureCache:
    """Compute the cache for every image of ``dataset`` and write it to ``path``; return it opened.

    ``dataset``: a :class:`CocoDataset` whose ``has_mask`` marks the cached classes, or
    :class:`FlippedCopies` of one. Images and masks are decoded in ``workers`` DataLoader
    processes, the detector runs on batches of ``batch_images``. Rows follow the dataset's order,
    image by image; each image's RoIs are drawn from :func:`image_generator` (``seed``, image id,
    flipped), so the content does not depend on batching or workers. Row chunks hold
    ``chunk_rows`` RoIs. ``plan`` (default: :func:`plan_cache` of ``cfg``) decides how many RoIs are
    kept; it is printed first and written into the description. Refuses to start (MaskxError) when
    the disk cannot hold the plan's least size.
    """
    base, copies = flip_source(dataset)
    counts = instance_counts(dataset)
    if sum(n for n, _ in counts) == 0:
        raise MaskxError("no training instance of the mask classes (set A): nothing to train the mask head on", base.image_root)
    roi_size = roi_pool.output_size[0]
    layout = layout_of(channels, roi_size, cfg.dtype)
    plan = plan or plan_cache(counts, cfg, layout, proposals_per_image(model, cfg))
    cfg = plan.cfg
    path.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path.parent).free
    warning = check_room(plan.least_rows * plan.roi_bytes, plan.bytes, free, path.parent)
    progress.log(f"building feature cache: {plan.describe(free)} -> {path}")
    if warning:
        progress.log(warning)
    device = next(model.parameters()).device
    task = progress.task("feature cache", len(dataset))
    loader = torch.utils.data.DataLoader(_Guarded(dataset), batch_size=batch_images, collate_fn=_collate_guarded, num_workers=workers,
                                         pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None)
    with CacheWriter(path, key, channels, roi_size, cfg.dtype, chunk_rows) as w:
        for item in loader:
            if isinstance(item[0], str):  # (_ERROR, message, path) from a worker
                raise MaskxError(item[1], item[2])
            images, targets = item
            gens = [image_generator(seed, t["image_id"], t.get("flipped", False)) for t in targets]
            batch = extract_rois(model, roi_pool, list(images), list(targets), cfg, gens)
            img = batch.image.numpy()
            w.append(batch.features, batch.masks, batch.labels, boxes=batch.boxes, instance=batch.instance, is_gt=batch.is_gt,
                     image_id=np.array([targets[i]["image_id"] for i in img], np.int64),
                     flipped=np.array([bool(targets[i].get("flipped", False)) for i in img], np.uint8))
            task.advance(len(images))
        w.attrs.update({"instances": plan.instances, "images": len(dataset), "hflip": copies == 2, "seed": seed,
                        "classes": np.array(sorted(base.mask_cats), np.int64), **sampling_settings(cfg), **plan.attrs(),
                        **(attrs or {})})
    task.close()
    cache = open_cache(path, key)
    assert cache is not None
    return cache

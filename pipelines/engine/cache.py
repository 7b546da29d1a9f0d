"""The stage-2 feature cache: what the frozen detector gives the mask side, computed once.

For every training instance with a mask (of the cached classes) the cache holds RoIs = its
ground-truth box plus up to ``proposals_per_instance`` RPN proposals with IoU >= ``min_iou``, and
for each RoI: RoIAligned FPN features ``[C, S, S]`` (half precision by default), the 28x28 mask
target ``uint8[M, M]`` and the class label (1..K). Stored in HDF5, chunked, masks compressed, under
a key made of the detector checkpoint's hash, the annotation file's hash and the RoI settings.
A cache is written under a temporary name and renamed when complete, so a partial cache never
carries the final name; one that is unreadable or whose key differs is rebuilt.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.roi_heads import project_masks_on_boxes
from torchvision.ops import MultiScaleRoIAlign, box_iou

from pipelines.config import CacheConfig
from pipelines.data.coco import CocoDataset, collate
from pipelines.errors import MaskxError
from pipelines.io import atomic_path, sha256_json
from pipelines.progress import NULL_PROGRESS, Progress

FORMAT = "maskx-feature-cache"
VERSION = 1
CHUNK = 64
DTYPES = {"float16": np.float16, "float32": np.float32}


@dataclass
class RoIBatch:
    """RoIs of a batch of images: features [R, C, S, S], mask targets uint8[R, M, M], labels int64[R]."""

    features: torch.Tensor
    masks: torch.Tensor
    labels: torch.Tensor


def cache_key(detector_sha256: str, data_sha256: str, class_ids: list[int], roi_size: int, cfg: CacheConfig, images: int) -> str:
    return sha256_json({
        "version": VERSION, "detector": detector_sha256, "data": data_sha256, "classes": sorted(class_ids),
        "roi_size": roi_size, "proposals_per_instance": cfg.proposals_per_instance, "min_iou": cfg.min_iou,
        "dtype": cfg.dtype, "images": images,
    })


@torch.no_grad()
def extract_rois(model: FasterRCNN, roi_pool: MultiScaleRoIAlign, images: list[torch.Tensor], targets: list[dict],
                 cfg: CacheConfig, generator: torch.Generator) -> RoIBatch:
    """Run the frozen detector's backbone and RPN on ``images`` and cut out the RoIs of masked instances.

    ``targets`` are CocoDataset targets with ``masks`` and ``has_mask``; only instances with
    ``has_mask`` are used. Boxes and masks are resized with the detector's own transform.
    """
    device = next(model.parameters()).device
    keep = [t["has_mask"] for t in targets]
    tgts = [{"boxes": t["boxes"][k].to(device), "labels": t["labels"][k].to(device), "masks": t["masks"][k].to(device)}
            for t, k in zip(targets, keep)]
    image_list, tgts = model.transform([im.to(device) for im in images], tgts)
    features = model.backbone(image_list.tensors)
    proposals, _ = model.rpn(image_list, features)
    rois, matched = [], []
    for props, t in zip(proposals, tgts):
        gt = t["boxes"]
        boxes, idx = [gt], [torch.arange(len(gt), device=device)]
        if len(gt) and len(props) and cfg.proposals_per_instance > 0:
            iou = box_iou(gt, props)  # [G, P]
            for g in range(len(gt)):
                cand = torch.where(iou[g] >= cfg.min_iou)[0]
                if len(cand) > cfg.proposals_per_instance:
                    pick = torch.randperm(len(cand), generator=generator)[: cfg.proposals_per_instance]
                    cand = cand[pick.to(cand.device)]
                boxes.append(props[cand])
                idx.append(torch.full((len(cand),), g, device=device, dtype=torch.long))
        rois.append(torch.cat(boxes))
        matched.append(torch.cat(idx))
    m = 2 * roi_pool.output_size[0]
    feats = roi_pool(features, rois, image_list.image_sizes)
    masks = torch.cat([
        project_masks_on_boxes(t["masks"], r, mi, m) if len(r) else feats.new_zeros((0, m, m))
        for t, r, mi in zip(tgts, rois, matched)
    ])
    labels = torch.cat([t["labels"][mi] for t, mi in zip(tgts, matched)])
    return RoIBatch(feats, (masks >= 0.5).to(torch.uint8), labels)


def estimate_bytes(instances: int, channels: int, roi_size: int, cfg: CacheConfig) -> int:
    """Upper bound of a cache's size: every instance with all its proposals, features uncompressed."""
    rois = instances * (1 + cfg.proposals_per_instance)
    per_roi = channels * roi_size * roi_size * np.dtype(DTYPES[cfg.dtype]).itemsize + (2 * roi_size) ** 2 + 8
    return rois * per_roi


class FeatureCache:
    """A finished cache file. ``len(cache)`` RoIs; ``read(start, stop)`` or ``load()`` them."""

    def __init__(self, path: Path):
        self.path = path
        self.file = h5py.File(path, "r")
        self.features = self.file["features"]
        self.masks = self.file["masks"]
        self.labels = self.file["labels"][()]
        self.key = str(self.file.attrs["key"])

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.features.size * self.features.dtype.itemsize + self.masks.size)

    def read(self, start: int, stop: int) -> RoIBatch:
        return RoIBatch(torch.from_numpy(self.features[start:stop]), torch.from_numpy(self.masks[start:stop]),
                        torch.from_numpy(self.labels[start:stop]))

    def load(self) -> RoIBatch:
        return self.read(0, len(self))

    def close(self) -> None:
        self.file.close()


def open_cache(path: Path, key: str) -> FeatureCache | None:
    """The cache at ``path`` if it is complete and was built for ``key``; None otherwise."""
    if not path.is_file():
        return None
    try:
        cache = FeatureCache(path)
    except (OSError, KeyError):
        return None
    try:
        f = cache.file
        ok = (f.attrs.get("format") == FORMAT and int(f.attrs.get("version", -1)) == VERSION and f.attrs.get("complete")
              and cache.key == key and cache.features.shape[0] == len(cache) == cache.masks.shape[0])
    except (OSError, KeyError, TypeError):
        ok = False
    if not ok:
        cache.close()
        return None
    return cache


def build_cache(model: FasterRCNN, roi_pool: MultiScaleRoIAlign, dataset: CocoDataset, cfg: CacheConfig, path: Path, key: str,
                channels: int, progress: Progress = NULL_PROGRESS, batch_images: int = 8, seed: int = 0) -> FeatureCache:
    """Compute the cache for every image of ``dataset`` and write it to ``path``; return it opened.

    Refuses to start (MaskxError) when the disk cannot hold the estimated size.
    """
    instances = sum(len([a for a in dataset.anns_by_image.get(im["id"], []) if a["category_id"] in dataset.mask_cats])
                    for im in dataset.images)
    if instances == 0:
        raise MaskxError("no training instance of the mask classes (set A): nothing to train the mask head on", dataset.image_root)
    roi_size = roi_pool.output_size[0]
    estimate = estimate_bytes(instances, channels, roi_size, cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path.parent).free
    if estimate > free:
        raise MaskxError(f"feature cache needs up to {estimate / 2**30:.1f} GiB but only {free / 2**30:.1f} GiB is free "
                         f"(lower cache.proposals_per_instance or use cache.dtype=float16)", path.parent)
    progress.log(f"building feature cache: {instances} instances, up to {estimate / 2**20:.0f} MiB -> {path}")
    generator = torch.Generator().manual_seed(seed)
    s, m = roi_size, 2 * roi_size
    dtype = DTYPES[cfg.dtype]
    task = progress.task("feature cache", len(dataset))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_images, collate_fn=collate, num_workers=0)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            feats = f.create_dataset("features", (0, channels, s, s), maxshape=(None, channels, s, s), dtype=dtype,
                                     chunks=(CHUNK, channels, s, s))
            masks = f.create_dataset("masks", (0, m, m), maxshape=(None, m, m), dtype=np.uint8, chunks=(CHUNK, m, m),
                                     compression="lzf")
            labels: list[np.ndarray] = []
            n = 0
            for images, targets in loader:
                batch = extract_rois(model, roi_pool, list(images), list(targets), cfg, generator)
                r = batch.labels.shape[0]
                if r:
                    feats.resize(n + r, axis=0)
                    masks.resize(n + r, axis=0)
                    feats[n : n + r] = batch.features.cpu().numpy().astype(dtype)
                    masks[n : n + r] = batch.masks.cpu().numpy()
                    labels.append(batch.labels.cpu().numpy())
                    n += r
                task.advance(len(images))
            f.create_dataset("labels", data=np.concatenate(labels) if labels else np.zeros(0, np.int64))
            f.attrs.update({"format": FORMAT, "version": VERSION, "key": key, "complete": True, "instances": instances})
    task.close()
    cache = open_cache(path, key)
    assert cache is not None
    return cache

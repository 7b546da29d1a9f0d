"""RoI sources: what stage 2 draws its training batches from (``rois`` RoIs, ``batch(iteration)`` ->
:class:`RoIBatch`, ``close()``), restricted to the RoIs the set-A rule keeps
(:func:`pipelines.data.splits.takes_mask_loss`).

:class:`InMemoryRoIs` (the cache in RAM, a full permutation per epoch),
:class:`pipelines.rois.streaming.StreamingRoIs` (a cache larger than the RAM budget, read chunk by
chunk from disk) -- :func:`cache_source` picks one -- or :class:`DetectorRoIs` (no cache: the
frozen detector runs on every step).
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.models.detection import FasterRCNN
from torchvision.ops import MultiScaleRoIAlign

from pipelines.config import CacheConfig
from pipelines.data.splits import takes_mask_loss
from pipelines.engine.sampler import IterationBatches
from pipelines.errors import MaskxError
from pipelines.rois.extract import extract_rois
from pipelines.rois.instances import flip_source, masked_instances
from pipelines.rois.store import FeatureCache, RoIBatch
from pipelines.rois.streaming import StreamingRoIs


def kept_rows(labels: np.ndarray, mask_labels: torch.Tensor) -> np.ndarray:
    """Rows (int64) the set-A rule keeps: label ``l`` with ``mask_labels[l]`` True (``mask_labels`` bool[K+1]).

    Every cached RoI has a mask, so the rule reduces to the class.
    """
    return np.flatnonzero(takes_mask_loss(torch.from_numpy(np.asarray(labels, np.int64)), mask_labels).numpy()).astype(np.int64)


class InMemoryRoIs:
    """The kept rows of a cache, read into RAM once; batches in :class:`IterationBatches` order.

    ``batch(i)`` -> :class:`RoIBatch` of ``batch_size`` RoIs (this process's share under DDP),
    ``index`` = the RoIs' rows in the cache file. Each epoch is a full random permutation.
    """

    def __init__(self, cache: FeatureCache, rows: np.ndarray, batch_size: int, iterations: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        rows = np.sort(np.asarray(rows, dtype=np.int64))
        whole = cache.read_batch(rows)  # as stored: 8-bit features stay 8-bit in memory, with their scale
        self.features, self.masks, self.scale = whole.features, whole.masks, whole.scale
        self.rows = torch.from_numpy(rows)
        self.labels = torch.from_numpy(cache.labels[rows])
        self.rois = len(rows)
        self.batches = IterationBatches(self.rois, batch_size, iterations, seed, rank=rank, world_size=world_size)

    def batch(self, iteration: int) -> RoIBatch:
        idx = torch.tensor(self.batches.batch(iteration), dtype=torch.long)
        return RoIBatch(self.features[idx], self.masks[idx], self.labels[idx], self.rows[idx],
                        scale=None if self.scale is None else self.scale[idx])

    def close(self) -> None:
        pass


class DetectorRoIs:
    """No cache: training RoIs computed by the frozen detector on every step (instance sampling).

    ``dataset``: a :class:`CocoDataset` or its :class:`FlippedCopies`. Iteration ``i`` draws
    ``max(1, batch_size // (1 + proposals_per_instance))`` of the instances the set-A rule keeps
    (:func:`masked_instances`; in dataset order, flipped copies after the originals, as the cache's
    rows) in :class:`IterationBatches` order, runs :func:`extract_rois` on their images and returns
    their RoIs in that order (per instance: GT box, then its proposals). With
    ``proposals_per_instance = 0`` the RoIs, their order and ``rois`` equal those of
    :class:`InMemoryRoIs` over a cache of the same data, so both routes train on identical
    batches; ``index`` holds the instances' positions in :attr:`instances`. ``mask_labels`` (bool
    ``[K + 1]``, default: the dataset's mask classes) picks the instances by the set-A rule.
    """

    def __init__(self, model: FasterRCNN, roi_pool: MultiScaleRoIAlign, dataset, cfg: CacheConfig,
                 batch_size: int, iterations: int, seed: int, rank: int = 0, world_size: int = 1,
                 mask_labels: torch.Tensor | None = None):
        if cfg.sampling != "instance":
            raise MaskxError("cache.sampling=detectron needs the feature cache (cache.enabled=true); "
                             "training through the frozen detector samples instances (cache.sampling=instance)",
                             key="cache.sampling")
        self.model, self.roi_pool, self.dataset, self.cfg = model, roi_pool, dataset, cfg
        base, copies = flip_source(dataset)
        kept = masked_instances(base, mask_labels)
        self.instances = [(k * len(base) + i, j) for k in range(copies) for i, j in kept]
        self.rois = len(self.instances)
        per_step = max(1, batch_size // (1 + cfg.proposals_per_instance))
        self.batches = IterationBatches(self.rois, per_step, iterations, seed, rank=rank, world_size=world_size)
        self.generator = torch.Generator().manual_seed(seed)

    def batch(self, iteration: int) -> RoIBatch:
        chosen = self.batches.batch(iteration)
        per_image: dict[int, list[int]] = {}
        for pos, k in enumerate(chosen):
            per_image.setdefault(self.instances[k][0], []).append(pos)
        images, targets, positions = [], [], []
        for img, poss in per_image.items():
            image, t = self.dataset[img]
            sel = torch.tensor([self.instances[chosen[p]][1] for p in poss], dtype=torch.long)
            images.append(image)
            has_mask = t["has_mask"][sel]  # False only for a mask that rasterises to nothing: no RoI, no target
            targets.append({"boxes": t["boxes"][sel], "labels": t["labels"][sel], "masks": t["masks"][sel],
                            "has_mask": has_mask})
            positions.extend(p for p, kept in zip(poss, has_mask.tolist()) if kept)
        out = extract_rois(self.model, self.roi_pool, images, targets, self.cfg, self.generator)
        pos = torch.tensor(positions, dtype=torch.long)[out.index]
        order = torch.argsort(pos, stable=True)
        dev = out.features.device
        return RoIBatch(out.features[order.to(dev)], out.masks[order.to(dev)], out.labels[order.to(dev)],
                        torch.tensor(chosen, dtype=torch.long)[pos[order]])

    def close(self) -> None:
        pass


def cache_source(cache: FeatureCache, mask_labels: torch.Tensor, batch_size: int, iterations: int, seed: int,
                 cfg: CacheConfig, rank: int = 0, world_size: int = 1) -> InMemoryRoIs | StreamingRoIs:
    """In-memory batches when the kept rows fit ``cfg.ram_budget_gb``, streaming ones otherwise.

    Raises MaskxError when the cache holds no RoI of the kept labels.
    """
    rows = kept_rows(cache.labels, mask_labels)
    if len(rows) == 0:
        raise MaskxError("the feature cache holds no RoI of the training classes", cache.path)
    if len(rows) * cache.row_bytes <= cfg.ram_budget_gb * 2**30:
        return InMemoryRoIs(cache, rows, batch_size, iterations, seed, rank, world_size)
    return StreamingRoIs(cache, rows, batch_size, iterations, seed, cfg.shuffle_window, rank=rank, world_size=world_size,
                         chunk_rows=cfg.stream_chunk_rows)

"""The stage-2 feature cache: what the frozen detector gives the mask side, computed once.

For every training instance with a mask (of the cached classes) the cache holds RoIs = its
ground-truth box plus up to ``proposals_per_instance`` RPN proposals with IoU >= ``min_iou``, and
for each RoI: RoIAligned FPN features ``[C, S, S]`` (half precision by default), the 28x28 mask
target ``uint8[M, M]`` and the class label (1..K). Stored in HDF5, chunked, masks compressed, under
a key made of the detector checkpoint's hash, the annotation file's hash and the RoI settings.
A cache is written under a temporary name and renamed when complete, so a partial cache never
carries the final name; one that is unreadable or whose key differs is rebuilt.

:func:`ensure_cache` finds the cache of a (detector, training data, RoI settings) or builds it; one
cache holds the RoIs of every class's masks, so agnostic, transfer and oracle runs of any set A share
it. Stage 2 then reads training batches from a *RoI source* (``rois`` RoIs, ``batch(iteration)`` ->
:class:`RoIBatch`), restricted to the RoIs the set-A rule keeps
(:func:`pipelines.data.splits.takes_mask_loss`): :class:`InMemoryRoIs` (the cache in RAM, a full
permutation per epoch), :class:`StreamingRoIs` (a cache larger than the RAM budget, read chunk by
chunk from disk by a background thread, shuffled at chunk granularity) -- :func:`cache_source` picks
one -- or :class:`DetectorRoIs` (no cache: the frozen detector runs on every step). See
``docs/cache.md``.
"""

from __future__ import annotations

import math
import queue
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.roi_heads import project_masks_on_boxes
from torchvision.ops import MultiScaleRoIAlign, box_iou

from pipelines.config import CacheConfig, DataConfig
from pipelines.data.coco import CocoDataset, collate
from pipelines.data.splits import label_table, takes_mask_loss
from pipelines.engine.run_dir import DetectorRun
from pipelines.engine.sampler import IterationBatches
from pipelines.errors import MaskxError
from pipelines.io import hdf5_file, sha256_file, sha256_json
from pipelines.modeling.maskx_rcnn import build_mask_roi_pool
from pipelines.progress import NULL_PROGRESS, Progress

FORMAT = "maskx-feature-cache"
VERSION = 1
CHUNK = 64
DTYPES = {"float16": np.float16, "float32": np.float32}
CACHE_SEED = 0  # proposal sampling of the cache: fixed, so a cache's content is a function of its key


@dataclass
class RoIBatch:
    """A batch of RoIs: features [R, C, S, S], mask targets uint8[R, M, M], labels int64[R] (1..K).

    ``index`` int64[R] (optional) says where each RoI comes from: its row in the cache file for
    cache batches; its instance (position in the batch's instance list) for :func:`extract_rois`.
    """

    features: torch.Tensor
    masks: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor | None = None


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
    Per image, RoIs come instance by instance (GT boxes first, then each instance's proposals);
    ``index`` [R] gives each RoI's instance as a position among the kept instances of all images.
    """
    device = next(model.parameters()).device
    keep = [t["has_mask"] for t in targets]
    tgts = [{"boxes": t["boxes"][k].to(device), "labels": t["labels"][k].to(device), "masks": t["masks"][k].to(device)}
            for t, k in zip(targets, keep)]
    image_list, tgts = model.transform([im.to(device) for im in images], tgts)
    features = model.backbone(image_list.tensors)
    proposals, _ = model.rpn(image_list, features)
    rois, matched, instance, offset = [], [], [], 0
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
        instance.append(matched[-1] + offset)
        offset += len(gt)
    m = 2 * roi_pool.output_size[0]
    feats = roi_pool(features, rois, image_list.image_sizes)
    masks = torch.cat([
        project_masks_on_boxes(t["masks"], r, mi, m) if len(r) else feats.new_zeros((0, m, m))
        for t, r, mi in zip(tgts, rois, matched)
    ])
    labels = torch.cat([t["labels"][mi] for t, mi in zip(tgts, matched)])
    return RoIBatch(feats, (masks >= 0.5).to(torch.uint8), labels, torch.cat(instance).cpu())


def estimate_bytes(instances: int, channels: int, roi_size: int, cfg: CacheConfig) -> int:
    """Upper bound of a cache's size: every instance with all its proposals, features uncompressed."""
    return instances * (1 + cfg.proposals_per_instance) * row_bytes(channels, roi_size, cfg.dtype)


def row_bytes(channels: int, roi_size: int, dtype: str) -> int:
    """Bytes of one RoI in memory: features [C, S, S] of ``dtype``, uint8 mask [2S, 2S], int64 label."""
    return channels * roi_size * roi_size * np.dtype(DTYPES[dtype]).itemsize + (2 * roi_size) ** 2 + 8


class FeatureCache:
    """A finished cache file: ``len(cache)`` RoIs; ``read(start, stop)`` or ``load()`` them.

    ``labels`` (int64[N], 1..K) is read into memory at once; features and masks stay on disk.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.file = h5py.File(path, "r")
        self.features = self.file["features"]
        self.masks = self.file["masks"]
        self.labels = self.file["labels"][()]
        self.key = str(self.file.attrs["key"])

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def chunk_rows(self) -> int:
        """RoIs per HDF5 chunk of the feature dataset (the unit the streaming reader reads)."""
        return int(self.features.chunks[0]) if self.features.chunks else CHUNK

    @property
    def row_bytes(self) -> int:
        """Bytes of one RoI once read into memory (features + mask + label)."""
        f = self.features
        return int(np.prod(f.shape[1:])) * f.dtype.itemsize + int(np.prod(self.masks.shape[1:])) + 8

    @property
    def nbytes(self) -> int:
        """Bytes of the whole cache once read into memory."""
        return len(self) * self.row_bytes

    def read(self, start: int, stop: int) -> RoIBatch:
        return RoIBatch(torch.from_numpy(self.features[start:stop]), torch.from_numpy(self.masks[start:stop]),
                        torch.from_numpy(self.labels[start:stop]), torch.arange(start, stop))

    def load(self) -> RoIBatch:
        return self.read(0, len(self))

    def info(self) -> dict:
        """What ``maskx cache info`` shows: counts, shapes, dtype, sizes, key."""
        labels, counts = np.unique(self.labels, return_counts=True)
        return {
            "path": str(self.path), "rois": len(self), "instances": int(self.file.attrs.get("instances", -1)),
            "classes": int(len(labels)), "feature_shape": list(self.features.shape[1:]), "dtype": str(self.features.dtype),
            "chunk_rows": self.chunk_rows, "memory_bytes": self.nbytes, "file_bytes": self.path.stat().st_size,
            "key": self.key, "rois_per_class": {int(k): int(v) for k, v in zip(labels, counts)},
        }

    def close(self) -> None:
        self.file.close()


def open_cache(path: Path, key: str | None) -> FeatureCache | None:
    """The cache at ``path`` if it is complete and was built for ``key`` (any key if None); None otherwise.

    A truncated or otherwise unreadable file, one without the completion mark, or one whose key
    differs gives None (the caller rebuilds it). Temporary ``.tmp`` files are never opened.
    """
    path = Path(path)
    if not path.is_file() or path.suffix == ".tmp":
        return None
    try:
        cache = FeatureCache(path)
    except (OSError, KeyError, ValueError, TypeError):
        return None
    try:
        f = cache.file
        ok = bool(f.attrs.get("format") == FORMAT and int(f.attrs.get("version", -1)) == VERSION and f.attrs.get("complete")
                  and (key is None or cache.key == key) and cache.features.shape[0] == len(cache) == cache.masks.shape[0])
        if ok and len(cache):  # the last rows must be readable (a truncated file fails here at the latest)
            last = len(cache) - 1
            cache.features[last : last + 1]
            cache.masks[last : last + 1]
    except (OSError, KeyError, ValueError, TypeError):
        ok = False
    if not ok:
        cache.close()
        return None
    return cache


def build_cache(model: FasterRCNN, roi_pool: MultiScaleRoIAlign, dataset: CocoDataset, cfg: CacheConfig, path: Path, key: str,
                channels: int, progress: Progress = NULL_PROGRESS, batch_images: int = 8, seed: int = 0,
                chunk_rows: int = CHUNK) -> FeatureCache:
    """Compute the cache for every image of ``dataset`` and write it to ``path``; return it opened.

    Rows follow the dataset's image order, instance by instance (see :func:`extract_rois`);
    ``seed`` drives the choice of proposals. HDF5 chunks hold ``chunk_rows`` RoIs. Refuses to
    start (MaskxError) when the disk cannot hold the estimated size.
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
    with hdf5_file(path) as f:  # a full disk: one error line, not an HDF5 crash
        feats = f.create_dataset("features", (0, channels, s, s), maxshape=(None, channels, s, s), dtype=dtype,
                                 chunks=(chunk_rows, channels, s, s))
        masks = f.create_dataset("masks", (0, m, m), maxshape=(None, m, m), dtype=np.uint8, chunks=(chunk_rows, m, m),
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
        f.attrs.update({"format": FORMAT, "version": VERSION, "key": key, "instances": instances, "roi_size": roi_size,
                        "channels": channels, "dtype": cfg.dtype, "proposals_per_instance": cfg.proposals_per_instance,
                        "images": len(dataset)})
        f.attrs["complete"] = True  # written last
    task.close()
    cache = open_cache(path, key)
    assert cache is not None
    return cache


# --------------------------------------------------------------------------------------------
# RoI sources: what stage 2 draws its training batches from
def kept_rows(labels: np.ndarray, keep_label: torch.Tensor) -> np.ndarray:
    """Rows (int64) the set-A rule keeps: label ``l`` with ``keep_label[l]`` True (``keep_label`` bool[K+1]).

    Every cached RoI has a mask, so the rule reduces to the class.
    """
    return np.flatnonzero(takes_mask_loss(torch.from_numpy(np.asarray(labels, np.int64)), keep_label).numpy()).astype(np.int64)


class InMemoryRoIs:
    """The kept rows of a cache, read into RAM once; batches in :class:`IterationBatches` order.

    ``batch(i)`` -> :class:`RoIBatch` of ``batch_size`` RoIs (this process's share under DDP),
    ``index`` = the RoIs' rows in the cache file. Each epoch is a full random permutation.
    """

    def __init__(self, cache: FeatureCache, rows: np.ndarray, batch_size: int, iterations: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        rows = np.sort(np.asarray(rows, dtype=np.int64))
        f, m = cache.features, cache.masks
        self.features = torch.empty((len(rows),) + f.shape[1:], dtype=torch.from_numpy(np.zeros(0, f.dtype)).dtype)
        self.masks = torch.empty((len(rows),) + m.shape[1:], dtype=torch.uint8)
        block, done = 64 * cache.chunk_rows, 0  # read in blocks: never the whole file, only the kept rows
        for a in range(0, len(cache), block):
            sel = rows[(rows >= a) & (rows < a + block)]
            if len(sel):
                self.features[done : done + len(sel)] = torch.from_numpy(f[a : a + block][sel - a])
                self.masks[done : done + len(sel)] = torch.from_numpy(m[a : a + block][sel - a])
                done += len(sel)
        self.rows = torch.from_numpy(rows)
        self.labels = torch.from_numpy(cache.labels[rows])
        self.rois = len(rows)
        self.batches = IterationBatches(self.rois, batch_size, iterations, seed, rank=rank, world_size=world_size)

    def batch(self, iteration: int) -> RoIBatch:
        idx = torch.tensor(self.batches.batch(iteration), dtype=torch.long)
        return RoIBatch(self.features[idx], self.masks[idx], self.labels[idx], self.rows[idx])

    def close(self) -> None:
        pass


class StreamingRoIs:
    """The kept rows of a cache, streamed from disk: never more than a few chunks in memory.

    Order (a function of ``seed`` and the cache alone, so a resumed run sees the same batches):
    epoch ``e`` visits the HDF5 chunks in a random order drawn from ``seed * 100003 + e``, in
    windows of ``window`` chunks; within a window its kept RoIs are shuffled. Windows are read
    with their chunks in file order. As with :class:`IterationBatches`, iteration ``i`` takes
    positions ``[i*B, (i+1)*B)`` of the concatenated epochs. A background thread reads ahead
    up to ``prefetch`` batches. Memory: about ``(2 * window * chunk_rows + prefetch * B)`` RoIs.
    """

    def __init__(self, cache: FeatureCache, rows: np.ndarray, batch_size: int, iterations: int, seed: int,
                 window: int = 8, prefetch: int = 4, rank: int = 0, world_size: int = 1):
        if len(rows) == 0:
            raise ValueError("no rows to stream")
        self.cache, self.batch_size, self.iterations, self.seed = cache, batch_size, iterations, seed
        self.window, self.prefetch, self.rank, self.world_size = max(1, window), max(1, prefetch), rank, world_size
        self.rois = len(rows)
        self.chunk = cache.chunk_rows
        n = len(cache)
        kept = np.zeros(n, bool)
        kept[rows] = True
        n_chunks = math.ceil(n / self.chunk)
        self._chunk_rows = [np.flatnonzero(kept[c * self.chunk : (c + 1) * self.chunk]) + c * self.chunk for c in range(n_chunks)]
        self._chunks = [c for c in range(n_chunks) if len(self._chunk_rows[c])]
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._next = -1

    def windows(self, epoch: int) -> list[tuple[list[int], np.ndarray]]:
        """(chunk ids, rows in visiting order) of each window of ``epoch``."""
        g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        order = [self._chunks[i] for i in torch.randperm(len(self._chunks), generator=g).tolist()]
        out = []
        for w in range(0, len(order), self.window):
            chunks = order[w : w + self.window]
            rows = np.concatenate([self._chunk_rows[c] for c in chunks])
            out.append((chunks, rows[torch.randperm(len(rows), generator=g).numpy()]))
        return out

    def epoch_order(self, epoch: int) -> np.ndarray:
        """All kept rows in the order epoch ``epoch`` visits them."""
        return np.concatenate([rows for _, rows in self.windows(epoch)])

    def _read_window(self, chunks: list[int], rows: np.ndarray) -> tuple[torch.Tensor, ...]:
        """Read ``chunks`` (merged into sequential runs) and pick ``rows`` in the given order."""
        f, m = self.cache.features, self.cache.masks
        n = len(self.cache)
        offset = {}
        feats, masks, pos = [], [], 0
        ordered = sorted(chunks)
        runs: list[list[int]] = []
        for c in ordered:
            if runs and runs[-1][-1] == c - 1:
                runs[-1].append(c)
            else:
                runs.append([c])
        for run in runs:
            a, b = run[0] * self.chunk, min((run[-1] + 1) * self.chunk, n)
            feats.append(f[a:b])
            masks.append(m[a:b])
            for c in run:
                offset[c] = pos + (c - run[0]) * self.chunk
            pos += b - a
        local = rows - (rows // self.chunk) * self.chunk + np.array([offset[c] for c in rows // self.chunk], dtype=np.int64)
        fa = feats[0] if len(feats) == 1 else np.concatenate(feats)
        ma = masks[0] if len(masks) == 1 else np.concatenate(masks)
        return (torch.from_numpy(fa[local]), torch.from_numpy(ma[local]), torch.from_numpy(self.cache.labels[rows]),
                torch.from_numpy(rows.copy()))

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, start_iter: int) -> None:
        try:
            b = self.batch_size
            epoch, skip = divmod(start_iter * b, self.rois)
            it, pending = start_iter, None
            while it < self.iterations:
                for chunks, rows in self.windows(epoch):
                    if skip >= len(rows):
                        skip -= len(rows)
                        continue
                    part = self._read_window(chunks, rows[skip:])
                    skip = 0
                    pending = part if pending is None else tuple(torch.cat([x, y]) for x, y in zip(pending, part))
                    while pending[0].shape[0] >= b and it < self.iterations:
                        share = slice(self.rank, b, self.world_size)
                        if not self._put((it, RoIBatch(*(t[share] for t in pending)))):
                            return
                        pending = tuple(t[b:] for t in pending)
                        it += 1
                    if it >= self.iterations:
                        break
                epoch += 1
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            self._put(exc)

    def _start(self, iteration: int) -> None:
        self.close()
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._thread = threading.Thread(target=self._produce, args=(iteration,), name="maskx-cache-reader", daemon=True)
        self._thread.start()
        self._next = iteration

    def batch(self, iteration: int) -> RoIBatch:
        """The batch of ``iteration`` (sequential calls are served from the read-ahead queue)."""
        if not 0 <= iteration < self.iterations:
            raise IndexError(f"iteration {iteration} outside 0..{self.iterations - 1}")
        if self._thread is None or iteration != self._next:
            self._start(iteration)
        item = self._queue.get()
        if isinstance(item, BaseException):
            self.close()
            raise MaskxError(f"feature cache could not be read ({item.__class__.__name__}: {item}); delete it to rebuild",
                             self.cache.path) from item
        self._next = item[0] + 1
        return item[1]

    def close(self) -> None:
        """Stop the reader thread (the cache file itself stays open)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None


class DetectorRoIs:
    """No cache: training RoIs computed by the frozen detector on every step.

    Iteration ``i`` draws ``max(1, batch_size // (1 + proposals_per_instance))`` masked instances
    of ``dataset`` (those with ``has_mask``) in :class:`IterationBatches` order, runs
    :func:`extract_rois` on their images and returns their RoIs in that order (per instance: GT
    box, then its proposals). With ``proposals_per_instance = 0`` the RoIs, their order and
    ``rois`` equal those of :class:`InMemoryRoIs` over a cache of the same data, so both routes
    train on identical batches; ``index`` holds the instances' positions in :attr:`instances`.
    ``mask_labels`` (bool ``[K + 1]``, default: the dataset's mask classes) picks the instances by the
    set-A rule.
    """

    def __init__(self, model: FasterRCNN, roi_pool: MultiScaleRoIAlign, dataset: CocoDataset, cfg: CacheConfig,
                 batch_size: int, iterations: int, seed: int, rank: int = 0, world_size: int = 1,
                 mask_labels: torch.Tensor | None = None):
        self.model, self.roi_pool, self.dataset, self.cfg = model, roi_pool, dataset, cfg
        if mask_labels is None:  # the dataset's mask classes
            mask_labels = label_table(dataset.mask_cats, dataset.data["categories"])
        every = [(i, j, a) for i, im in enumerate(dataset.images) for j, a in enumerate(dataset.anns_by_image.get(im["id"], []))]
        labels = torch.tensor([dataset.label_of[a["category_id"]] for _, _, a in every], dtype=torch.int64)
        has_mask = torch.tensor([dataset.has_mask(a) for _, _, a in every], dtype=torch.bool)
        kept = takes_mask_loss(labels, mask_labels, has_mask).tolist()
        self.instances = [(i, j) for (i, j, _), k in zip(every, kept) if k]
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
            targets.append({"boxes": t["boxes"][sel], "labels": t["labels"][sel], "masks": t["masks"][sel],
                            "has_mask": torch.ones(len(sel), dtype=torch.bool)})
            positions.extend(poss)
        out = extract_rois(self.model, self.roi_pool, images, targets, self.cfg, self.generator)
        pos = torch.tensor(positions, dtype=torch.long)[out.index]
        order = torch.argsort(pos, stable=True)
        dev = out.features.device
        return RoIBatch(out.features[order.to(dev)], out.masks[order.to(dev)], out.labels[order.to(dev)],
                        torch.tensor(chosen, dtype=torch.long)[pos[order]])

    def close(self) -> None:
        pass


def cache_source(cache: FeatureCache, keep_label: torch.Tensor, batch_size: int, iterations: int, seed: int,
                 cfg: CacheConfig, rank: int = 0, world_size: int = 1) -> InMemoryRoIs | StreamingRoIs:
    """In-memory batches when the kept rows fit ``cfg.ram_budget_gb``, streaming ones otherwise.

    Raises MaskxError when the cache holds no RoI of the kept labels.
    """
    rows = kept_rows(cache.labels, keep_label)
    if len(rows) == 0:
        raise MaskxError("the feature cache holds no RoI of the training classes", cache.path)
    if len(rows) * cache.row_bytes <= cfg.ram_budget_gb * 2**30:
        return InMemoryRoIs(cache, rows, batch_size, iterations, seed, rank, world_size)
    return StreamingRoIs(cache, rows, batch_size, iterations, seed, cfg.shuffle_window, rank=rank, world_size=world_size)


# --------------------------------------------------------------------------------------------
# Finding or building the cache of a detector and its training data
@dataclass
class CacheResult:
    """An opened, complete cache (``cache``; close it when done) and where it came from."""

    path: Path
    key: str
    built: bool
    cache: FeatureCache

    @property
    def rois(self) -> int:
        return len(self.cache)


def check_cache_config(cfg: CacheConfig) -> None:
    if cfg.dtype not in DTYPES:
        raise MaskxError(f"cache.dtype must be float16 or float32, got '{cfg.dtype}'", key="cache.dtype")
    if cfg.proposals_per_instance < 0:
        raise MaskxError(f"cache.proposals_per_instance must be 0 or more, got {cfg.proposals_per_instance}",
                         key="cache.proposals_per_instance")
    if cfg.ram_budget_gb < 0:
        raise MaskxError(f"cache.ram_budget_gb must be 0 or more, got {cfg.ram_budget_gb}", key="cache.ram_budget_gb")


def cache_dataset(data: dict, data_cfg: DataConfig) -> CocoDataset:
    """Every training image with an annotation; masks of every class (the cache's input)."""
    all_ids = [c["id"] for c in data["categories"]]
    full = CocoDataset(data, data_cfg.train_images, with_masks=True, mask_category_ids=all_ids,
                       max_images=data_cfg.max_train_images)
    full.images = [im for im in full.images if full.anns_by_image.get(im["id"])]
    return full


def ensure_cache(det: DetectorRun, data: dict, data_cfg: DataConfig, cfg: CacheConfig, roi_size: int,
                 progress: Progress = NULL_PROGRESS) -> CacheResult:
    """The complete cache for (detector, training data, RoI settings): reused if present, else built.

    The cache lives in ``cfg.dir`` (default ``<detector run>/cache``) as ``features-<key[:16]>.h5``.
    The detector must already be on the device it should run on.
    """
    check_cache_config(cfg)
    full = cache_dataset(data, data_cfg)
    if not full.images:
        raise MaskxError("no training image has an annotation", data_cfg.train_json)
    all_ids = [c["id"] for c in det.categories]
    key = cache_key(det.sha256, sha256_file(data_cfg.train_json), all_ids, roi_size, cfg, len(full))
    path = (Path(cfg.dir) if cfg.dir else det.run_dir / "cache") / f"features-{key[:16]}.h5"
    cache = open_cache(path, key)
    if cache is not None:
        return CacheResult(path, key, False, cache)
    cache = build_cache(det.model, build_mask_roi_pool(roi_size), full, cfg, path, key, det.model.backbone.out_channels,
                        progress, seed=CACHE_SEED)
    return CacheResult(path, key, True, cache)

"""The stage-2 feature cache: what the frozen detector gives the mask side, computed once.

For every training image (and, with flips, its mirrored copy) the cache holds the RoIs that
:mod:`pipelines.engine.roi_sampling` draws (``instance``: each instance's GT box plus up to
``proposals_per_instance`` proposals; ``detectron``: the official foreground sample), for the
instances of the cached classes only, and for each RoI: RoIAligned FPN features ``[C, S, S]``
(half precision by default), the 28x28 mask target ``uint8[M, M]`` and the class label (1..K).

Layout (``docs/cache.md``): ``features-<key>.rows``, a raw file of fixed-size records (features
then mask, no header), beside ``features-<key>.h5``, the HDF5 file that describes it (labels,
the RoIs' boxes, images and flags, the settings and the key). Both are written under temporary
names and renamed when complete, the HDF5 file last, so a partial cache never carries the final
name; one that is unreadable, shorter than its rows or whose key differs is rebuilt.

:func:`ensure_cache` finds the cache of a (detector, training data, RoI settings, classes) or
builds it. By default (``cache.classes=train``) a cache holds the RoIs of the run's mask classes
only (:func:`pipelines.data.splits.mask_classes`: set A, every class for the oracle);
``cache.classes=all`` caches every class, so agnostic, transfer and oracle runs of any set A share
it, and a cache of more classes built with the same settings is always reused. Concurrent runs that
need the same cache take a lock file beside it: the first builds, the others wait and reuse it.
Stage 2 then reads training batches from a *RoI source* (``rois`` RoIs, ``batch(iteration)`` ->
:class:`RoIBatch`), restricted to the RoIs the set-A rule keeps
(:func:`pipelines.data.splits.takes_mask_loss`): :class:`InMemoryRoIs` (the cache in RAM, a full
permutation per epoch), :class:`StreamingRoIs` (a cache larger than the RAM budget, read chunk by
chunk from disk by parallel reader threads, shuffled at chunk granularity, each process of a
``torchrun`` job reading its own share of every epoch) -- :func:`cache_source` picks one -- or
:class:`DetectorRoIs` (no cache: the frozen detector runs on every step). See ``docs/cache.md``.
"""

from __future__ import annotations

import contextlib
import math
import queue
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.roi_heads import project_masks_on_boxes
from torchvision.ops import MultiScaleRoIAlign

from pipelines.config import CacheConfig, DataConfig
from pipelines.data.annotations import has_usable_mask
from pipelines.data.coco import CocoDataset, collate
from pipelines.data.splits import label_table, takes_mask_loss
from pipelines.data.transforms import FlippedCopies
from pipelines.engine.roi_sampling import SAMPLINGS, fg_per_image, image_generator, sample_detectron, sample_instance
from pipelines.engine.rowfile import RowFile, RowWriter
from pipelines.engine.run_dir import DetectorRun
from pipelines.engine.sampler import IterationBatches
from pipelines.errors import MaskxError
from pipelines.io import atomic_path, file_lock, format_size, hdf5_file, make_parent, sha256_file, sha256_json
from pipelines.modeling.maskx_rcnn import build_mask_roi_pool
from pipelines.progress import NULL_PROGRESS, Progress

FORMAT = "maskx-feature-cache"
VERSION = 2
CHUNK = 64
DTYPES = {"float16": np.float16, "float32": np.float32}
CACHE_SEED = 0  # RoI sampling of the cache: fixed, so a cache's content is a function of its key
BUILD_BATCH_IMAGES = 8  # images per detector batch while building
TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32}
# per-RoI datasets of the HDF5 description: dtype, shape of one entry, value when not given
META = {"labels": (np.int64, (), None), "boxes": (np.float32, (4,), np.nan), "image_id": (np.int64, (), -1),
        "instance": (np.int32, (), -1), "flipped": (np.uint8, (), 0), "is_gt": (np.uint8, (), 0)}
META_BYTES = sum(np.dtype(d).itemsize * int(np.prod(shape)) for k, (d, shape, _) in META.items() if k != "labels")  # 30


@dataclass
class RoIBatch:
    """A batch of RoIs: features [R, C, S, S], mask targets uint8[R, M, M], labels int64[R] (1..K).

    ``index`` int64[R] (optional) says where each RoI comes from: its row in the cache file for
    cache batches; its instance (position among the masked instances of the batch's images) for
    :func:`extract_rois`, which also fills ``boxes`` float32[R, 4] (the RoI in the input image's
    pixels), ``is_gt`` bool[R] (the RoI is a ground-truth box), ``instance`` int64[R] (the
    matched instance's position in its image's target) and ``image`` int64[R] (its image's
    position in the batch).
    """

    features: torch.Tensor
    masks: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor | None = None
    boxes: torch.Tensor | None = None
    is_gt: torch.Tensor | None = None
    instance: torch.Tensor | None = None
    image: torch.Tensor | None = None


def sampling_settings(cfg: CacheConfig) -> dict:
    """The settings that decide which RoIs are drawn (only those of the chosen sampling; ``rpn_proposals``
    only when set, so the keys of caches built with the detector's own proposal count stay as they were)."""
    rpn = {"rpn_proposals": cfg.rpn_proposals} if cfg.rpn_proposals else {}
    if cfg.sampling == "detectron":
        return {"sampling": "detectron", "rois_per_image": cfg.rois_per_image, "fg_fraction": cfg.fg_fraction, "min_iou": cfg.min_iou,
                **rpn}
    return {"sampling": "instance", "proposals_per_instance": cfg.proposals_per_instance, "min_iou": cfg.min_iou, **rpn}


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


def settings_key(detector_sha256: str, data_sha256: str, roi_size: int, cfg: CacheConfig, images: int, hflip: bool = False) -> str:
    """What a cache's rows are, whichever classes it holds: detector, data, RoI settings, flips."""
    return sha256_json({"version": VERSION, "detector": detector_sha256, "data": data_sha256, "roi_size": roi_size,
                        "dtype": cfg.dtype, "images": images, "hflip": bool(hflip), **sampling_settings(cfg)})


def cache_key(detector_sha256: str, data_sha256: str, class_ids: list[int], roi_size: int, cfg: CacheConfig, images: int,
              hflip: bool = False) -> str:
    """The key of the cache of ``class_ids`` for these settings (see :func:`settings_key`)."""
    return sha256_json({"settings": settings_key(detector_sha256, data_sha256, roi_size, cfg, images, hflip),
                        "classes": sorted(class_ids)})


def _generators(generator, n: int) -> list[torch.Generator]:
    return list(generator) if isinstance(generator, (list, tuple)) else [generator] * n


@torch.no_grad()
def extract_rois(model: FasterRCNN, roi_pool: MultiScaleRoIAlign, images: list[torch.Tensor], targets: list[dict],
                 cfg: CacheConfig, generator: torch.Generator | list[torch.Generator]) -> RoIBatch:
    """Run the frozen detector's backbone and RPN on ``images`` and cut out the RoIs of masked instances.

    The RPN keeps :func:`proposals_per_image` proposals per image (``cache.rpn_proposals``). ``targets`` are CocoDataset targets (``boxes`` of every instance, ``masks`` and ``has_mask``);
    RoIs are drawn with ``cfg.sampling`` over every instance and kept when their matched
    instance has ``has_mask``. ``generator``: one for all images, or one per image. Boxes and
    masks are resized with the detector's own transform. Per image, RoIs come in the sampler's
    order (instance: GT boxes first, then each instance's proposals); ``index`` [R] gives each
    RoI's instance as a position among the masked instances of all images.
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
        if cfg.sampling == "detectron":
            r, matched, gt_flag = sample_detectron(t["boxes"], props, cfg.rois_per_image, cfg.fg_fraction, cfg.min_iou, g)
        else:
            r, matched, gt_flag = sample_instance(t["boxes"], props, cfg.proposals_per_instance, cfg.min_iou, g)
        keep = hm[matched]
        r, matched, gt_flag = r[keep], matched[keep], gt_flag[keep]
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


# --------------------------------------------------------------------------------------------
# Sizes
def row_bytes(channels: int, roi_size: int, dtype: str) -> int:
    """Bytes of one RoI in memory: features [C, S, S] of ``dtype``, uint8 mask [2S, 2S], int64 label."""
    return record_bytes(channels, roi_size, dtype) + 8


def record_bytes(channels: int, roi_size: int, dtype: str) -> int:
    """Bytes of one record of the row file: features [C, S, S] of ``dtype``, then the uint8 mask [2S, 2S]."""
    return channels * roi_size * roi_size * np.dtype(DTYPES[dtype]).itemsize + (2 * roi_size) ** 2


def disk_row_bytes(channels: int, roi_size: int, dtype: str) -> int:
    """Bytes of one RoI on disk: its record, its label and its metadata."""
    return row_bytes(channels, roi_size, dtype) + META_BYTES


def estimate_rows(instances: list[tuple[int, int]], cfg: CacheConfig, proposals: int) -> int:
    """Upper bound of a cache's RoIs. ``instances``: per image (and flipped copy), (masked instances, all instances).

    instance: every masked instance with all its proposals. detectron: per image with a masked
    instance, the foreground cap or every candidate (all GT boxes + ``proposals``), the smaller.
    """
    if cfg.sampling == "detectron":
        cap = fg_per_image(cfg.rois_per_image, cfg.fg_fraction)
        return sum(min(cap, n_all + proposals) for n_masked, n_all in instances if n_masked)
    return sum(n_masked for n_masked, _ in instances) * (1 + cfg.proposals_per_instance)


def minimum_rows(instances: list[tuple[int, int]], cfg: CacheConfig) -> int:
    """Lower bound of a cache's RoIs: what the build writes whatever the detector proposes.

    instance: the same as :func:`estimate_rows` (every masked instance gets all its proposals or
    its GT box again). detectron: every masked instance's GT box is a foreground candidate (IoU 1),
    so per image at least the masked instances, up to the foreground cap.
    """
    if cfg.sampling == "detectron":
        cap = fg_per_image(cfg.rois_per_image, cfg.fg_fraction)
        return sum(min(cap, n_masked) for n_masked, _ in instances)
    return estimate_rows(instances, cfg, 0)


def estimate_bytes(rows: int, channels: int, roi_size: int, dtype: str) -> int:
    """Bytes on disk of ``rows`` RoIs (record + label + metadata)."""
    return rows * disk_row_bytes(channels, roi_size, dtype)


def split_records(records: torch.Tensor, channels: int, roi_size: int, dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8[n, record_bytes] -> (features [n, C, S, S] of ``dtype``, masks uint8[n, 2S, 2S]), new contiguous tensors."""
    n, s = records.shape[0], roi_size
    fb = record_bytes(channels, roi_size, dtype) - (2 * s) ** 2
    tdtype = TORCH_DTYPES[dtype]
    feats = records[:, :fb].contiguous().view(tdtype).view(n, channels, s, s)
    return feats, records[:, fb:].contiguous().view(n, 2 * s, 2 * s)


# --------------------------------------------------------------------------------------------
# Writing and opening
class CacheWriter:
    """Write a cache: the row file under a temporary name, renamed on success, then its HDF5 description.

    ``with CacheWriter(path, key, channels, roi_size, dtype) as w: w.append(...); w.attrs.update(...)``.
    On an exception neither file is left behind; the HDF5 file, written last, marks the cache complete.
    """

    def __init__(self, path: Path, key: str, channels: int, roi_size: int, dtype: str, chunk_rows: int = CHUNK):
        self.path, self.key = Path(path), key
        self.rows_path = self.path.with_suffix(".rows")
        self.channels, self.roi_size, self.dtype, self.chunk_rows = channels, roi_size, dtype, chunk_rows
        self.record_bytes = record_bytes(channels, roi_size, dtype)
        self.attrs: dict = {}
        self._meta: dict[str, list[np.ndarray]] = {k: [] for k in META}

    def __enter__(self) -> CacheWriter:
        make_parent(self.path)
        self._rows_ctx = atomic_path(self.rows_path)
        self._rows = RowWriter(self._rows_ctx.__enter__(), self.record_bytes)
        return self

    @property
    def rows(self) -> int:
        return self._rows.rows

    def append(self, features: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor, **meta) -> None:
        """Append RoIs: features [n, C, S, S], masks uint8[n, 2S, 2S], labels [n], and optionally the other
        per-RoI datasets of :data:`META` (``boxes`` [n, 4], ``image_id``, ``instance``, ``flipped``, ``is_gt`` [n])."""
        n = int(labels.shape[0])
        if n == 0:
            return
        f = features.detach().cpu().numpy().astype(DTYPES[self.dtype], copy=False).reshape(n, -1)
        m = masks.detach().cpu().numpy().astype(np.uint8, copy=False).reshape(n, -1)
        rec = np.empty((n, self.record_bytes), np.uint8)
        rec[:, : f.shape[1] * f.itemsize] = f.view(np.uint8)
        rec[:, f.shape[1] * f.itemsize :] = m
        self._rows.append(rec)
        if set(meta) - set(META):
            raise TypeError(f"unknown per-RoI dataset(s) {sorted(set(meta) - set(META))} (known: {', '.join(META)})")
        meta["labels"] = labels
        for k, (dtype, shape, fill) in META.items():
            v = meta.get(k)
            if v is None:
                v = np.full((n, *shape), fill, dtype)
            v = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
            self._meta[k].append(v.astype(dtype, copy=False))

    def _write_description(self) -> None:
        cat = {k: np.concatenate(v) if v else np.zeros((0, *META[k][1]), META[k][0]) for k, v in self._meta.items()}
        with hdf5_file(self.path) as f:  # atomic, and a full disk is one error line (not an HDF5 crash)
            for k, v in cat.items():
                f.create_dataset(k, data=v)
            f.attrs.update({"format": FORMAT, "version": VERSION, "key": self.key, "roi_size": self.roi_size,
                            "channels": self.channels, "dtype": self.dtype, "chunk_rows": self.chunk_rows,
                            "record_bytes": self.record_bytes, "rows": self.rows, "rows_file": self.rows_path.name})
            f.attrs.update(self.attrs)
            f.attrs["complete"] = True  # written last

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:  # the row file's temporary goes, the error goes on
            try:
                self._rows.close()
            except OSError:
                pass
            return self._rows_ctx.__exit__(exc_type, exc, tb)
        try:
            self._rows.close()
        except OSError as err:  # (a full disk at the last flush: one error line, no temporary left)
            self._rows_ctx.__exit__(type(err), err, err.__traceback__)
            raise
        self._rows_ctx.__exit__(None, None, None)  # the row file under its name, then its description (the completion mark)
        try:
            self._write_description()
        except BaseException:
            self.rows_path.unlink(missing_ok=True)  # a row file without its description is nothing: remove it
            raise
        return False


class FeatureCache:
    """A finished cache: ``len(cache)`` RoIs; ``read(start, stop)``, ``read_rows(rows)`` or ``load()`` them.

    ``labels`` (int64[N], 1..K) is read into memory at once; ``features`` [N, C, S, S] and
    ``masks`` [N, 2S, 2S] are read-only memory maps of the row file (handy for inspection);
    ``rowfile`` reads it in parallel. ``meta(name)`` reads a per-RoI metadata dataset.
    """

    def __init__(self, path: Path, threads: int = 4):
        self.path = Path(path)
        self.file = h5py.File(path, "r")
        self.rowfile: RowFile | None = None
        try:
            a = self.file.attrs
            self.labels = self.file["labels"][()]
            self.key = str(a["key"])
            self.channels, self.roi_size, self.dtype = int(a["channels"]), int(a["roi_size"]), str(a["dtype"])
            self.record_bytes = record_bytes(self.channels, self.roi_size, self.dtype)
            if int(a["record_bytes"]) != self.record_bytes:
                raise ValueError("record size does not match the stored shapes")
            self.rows_path = self.path.with_name(str(a["rows_file"]))
            self.rowfile = RowFile(self.rows_path, self.record_bytes, threads)
            c, s, m = self.channels, self.roi_size, 2 * self.roi_size
            if self.rowfile.size != len(self) * self.record_bytes:
                raise ValueError(f"row file holds {self.rowfile.size} bytes, not {len(self)} x {self.record_bytes}")
            rec = np.dtype([("features", np.dtype(DTYPES[self.dtype]).newbyteorder("<"), (c, s, s)), ("masks", np.uint8, (m, m))])
            if len(self):
                self._map = np.memmap(self.rows_path, dtype=rec, mode="r", shape=(len(self),))
                self.features, self.masks = self._map["features"], self._map["masks"]
            else:
                self._map = None
                self.features, self.masks = np.zeros((0, c, s, s), DTYPES[self.dtype]), np.zeros((0, m, m), np.uint8)
        except BaseException:
            self.close()
            raise

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def chunk_rows(self) -> int:
        """RoIs per chunk: the unit the streaming reader reads and shuffles."""
        return int(self.file.attrs.get("chunk_rows", CHUNK))

    @property
    def row_bytes(self) -> int:
        """Bytes of one RoI once read into memory (features + mask + label)."""
        return self.record_bytes + 8

    @property
    def nbytes(self) -> int:
        """Bytes of the whole cache once read into memory."""
        return len(self) * self.row_bytes

    def meta(self, name: str) -> np.ndarray:
        """A per-RoI metadata dataset: ``boxes`` float32[N, 4], ``image_id``, ``instance``, ``flipped``, ``is_gt``."""
        return self.file[name][()]

    def split(self, records: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return split_records(records, self.channels, self.roi_size, self.dtype)

    def read(self, start: int, stop: int) -> RoIBatch:
        feats, masks = self.split(self.rowfile.read(start, stop))
        return RoIBatch(feats, masks, torch.from_numpy(self.labels[start:stop]), torch.arange(start, stop))

    def read_rows(self, rows: np.ndarray, block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [n, C, S, S], masks [n, 2S, 2S]) of the sorted ``rows``: the blocks of ``block`` rows
        that hold any are read in parallel, each row straight into its place."""
        rows = np.asarray(rows, dtype=np.int64)
        block = block or 4 * self.chunk_rows
        n, rec = len(rows), self.record_bytes
        fb = rec - (2 * self.roi_size) ** 2
        feats = torch.empty((n, fb), dtype=torch.uint8)
        masks = torch.empty((n, rec - fb), dtype=torch.uint8)
        fv, mv = memoryview(feats.numpy()).cast("B"), memoryview(masks.numpy()).cast("B")
        futures = []
        for a in np.unique(rows // block) * block:
            a, z = int(a), int(min(a + block, len(self)))
            lo, hi = np.searchsorted(rows, [a, z])
            views: list = [None] * (z - a)
            for j in range(lo, hi):
                views[rows[j] - a] = [fv[j * fb : (j + 1) * fb], mv[j * (rec - fb) : (j + 1) * (rec - fb)]]
            futures.append(self.rowfile.submit_scatter(a, views))
        for f in futures:
            f.result()
        s = self.roi_size
        tdtype = TORCH_DTYPES[self.dtype]
        return feats.view(tdtype).view(n, self.channels, s, s), masks.view(n, 2 * s, 2 * s)

    def load(self) -> RoIBatch:
        return self.read(0, len(self))

    def info(self) -> dict:
        """What ``maskx cache info`` shows: counts, shapes, dtype, settings, sizes, key."""
        labels, counts = np.unique(self.labels, return_counts=True)
        a = self.file.attrs
        sampling = str(a.get("sampling", "instance"))
        settings = ({"rois_per_image": int(a.get("rois_per_image", 0)), "fg_fraction": float(a.get("fg_fraction", 0))}
                    if sampling == "detectron" else {"proposals_per_instance": int(a.get("proposals_per_instance", 0))})
        return {
            "path": str(self.path), "rows_file": str(self.rows_path), "rois": len(self),
            "instances": int(a.get("instances", -1)), "images": int(a.get("images", -1)),
            "classes": int(len(labels)), "feature_shape": [self.channels, self.roi_size, self.roi_size], "dtype": self.dtype,
            "sampling": sampling, **settings, "hflip": bool(a.get("hflip", False)),
            "chunk_rows": self.chunk_rows, "memory_bytes": self.nbytes,
            "file_bytes": self.path.stat().st_size + self.rows_path.stat().st_size,
            "key": self.key, "rois_per_class": {int(k): int(v) for k, v in zip(labels, counts)},
        }

    def close(self) -> None:
        if self.rowfile is not None:
            self.rowfile.close()
        self._map = None
        self.features = self.masks = None
        self.file.close()


def open_cache(path: Path, key: str | None, threads: int = 4) -> FeatureCache | None:
    """The cache at ``path`` if it is complete and was built for ``key`` (any key if None); None otherwise.

    A truncated or otherwise unreadable file, one without the completion mark, one whose row file
    is missing or of the wrong size, or whose key differs gives None (the caller rebuilds it).
    Temporary ``.tmp`` files are never opened.
    """
    path = Path(path)
    if not path.is_file() or path.suffix == ".tmp":
        return None
    try:
        f = h5py.File(path, "r")
    except (OSError, KeyError, ValueError, TypeError):
        return None
    try:
        ok = bool(f.attrs.get("format") == FORMAT and int(f.attrs.get("version", -1)) == VERSION and f.attrs.get("complete")
                  and (key is None or str(f.attrs.get("key")) == key))
    except (OSError, KeyError, ValueError, TypeError):
        ok = False
    finally:
        f.close()
    if not ok:
        return None
    try:
        cache = FeatureCache(path, threads)
    except (OSError, KeyError, ValueError, TypeError):
        return None
    try:
        if len(cache):  # the last row must be readable
            cache.rowfile.read(len(cache) - 1, len(cache))
    except (OSError, ValueError):
        cache.close()
        return None
    return cache


def _flip_source(dataset) -> tuple[CocoDataset, int]:
    """(the CocoDataset under ``dataset``, 2 for FlippedCopies else 1)."""
    return (dataset.dataset, 2) if isinstance(dataset, FlippedCopies) else (dataset, 1)


def masked_instances(dataset: CocoDataset, mask_labels: torch.Tensor | None = None) -> list[tuple[int, int]]:
    """(image index, annotation index) of each instance of ``dataset`` the set-A rule keeps
    (:func:`takes_mask_loss`: a class of ``mask_labels``, bool ``[K + 1]``, default the dataset's mask
    classes, and a mask annotation), in dataset order."""
    if mask_labels is None:
        mask_labels = label_table(dataset.mask_cats, dataset.data["categories"])
    every = [(i, j, a) for i, im in enumerate(dataset.images) for j, a in enumerate(dataset.anns_by_image.get(im["id"], []))]
    if not every:
        return []
    labels = torch.tensor([dataset.label_of[a["category_id"]] for _, _, a in every], dtype=torch.int64)
    has_mask = torch.tensor([has_usable_mask(a) for _, _, a in every], dtype=torch.bool)
    kept = takes_mask_loss(labels, mask_labels, has_mask).tolist()
    return [(i, j) for (i, j, _), k in zip(every, kept) if k]


def instance_counts(dataset) -> list[tuple[int, int]]:
    """Per image of ``dataset`` (flipped copies included): (instances the set-A rule keeps, all instances)."""
    base, copies = _flip_source(dataset)
    kept = np.bincount(np.array([i for i, _ in masked_instances(base)], np.int64), minlength=len(base.images))
    return [(int(kept[i]), len(base.anns_by_image.get(im["id"], []))) for i, im in enumerate(base.images)] * copies


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


_ERROR = "maskx-error"


def _collate_guarded(batch):
    """:func:`collate`, or the first ``(_ERROR, message, path)`` item of the batch."""
    return next((item for item in batch if isinstance(item[0], str)), None) or collate(batch)


def describe_build(instances: int, rows: int, per_row: int, cfg: CacheConfig, copies: int) -> str:
    """The line printed before a build: what is cached and how large it can get."""
    what = (f"GT box + up to {cfg.proposals_per_instance} proposals per instance" if cfg.sampling == "instance"
            else f"up to {fg_per_image(cfg.rois_per_image, cfg.fg_fraction)} foreground RoIs per image (detectron sampling)")
    flips = " (images and their flipped copies)" if copies == 2 else ""
    return f"{instances} instances{flips}, {what}: up to {rows} RoIs x {per_row} bytes = {format_size(rows * per_row)}"


def build_cache(model: FasterRCNN, roi_pool: MultiScaleRoIAlign, dataset, cfg: CacheConfig, path: Path, key: str,
                channels: int, progress: Progress = NULL_PROGRESS, batch_images: int = 8, seed: int = 0,
                chunk_rows: int = CHUNK, workers: int = 0, attrs: dict | None = None) -> FeatureCache:
    """Compute the cache for every image of ``dataset`` and write it to ``path``; return it opened.

    ``dataset``: a :class:`CocoDataset` whose ``has_mask`` marks the cached classes, or
    :class:`FlippedCopies` of one. Images and masks are decoded in ``workers`` DataLoader
    processes, the detector runs on batches of ``batch_images``. Rows follow the dataset's order,
    image by image; each image's RoIs are drawn from :func:`image_generator` (``seed``, image id,
    flipped), so the content does not depend on batching or workers. Row chunks hold
    ``chunk_rows`` RoIs. Refuses to start (MaskxError) when the disk cannot hold the estimate.
    """
    base, copies = _flip_source(dataset)
    counts = instance_counts(dataset)
    instances = sum(n for n, _ in counts)
    if instances == 0:
        raise MaskxError("no training instance of the mask classes (set A): nothing to train the mask head on", base.image_root)
    roi_size = roi_pool.output_size[0]
    per_row = disk_row_bytes(channels, roi_size, cfg.dtype)
    estimate = estimate_rows(counts, cfg, proposals_per_image(model, cfg))
    least = minimum_rows(counts, cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path.parent).free
    if least * per_row > free:
        at_least = "up to" if least == estimate else "at least"
        raise MaskxError(f"feature cache needs {at_least} {format_size(least * per_row)} but only {format_size(free)} is free "
                         f"(lower cache.proposals_per_instance or cache.rois_per_image, set cache.classes=train, "
                         f"data.hflip=false or cache.dtype=float16)", path.parent)
    progress.log(f"building feature cache: {describe_build(instances, estimate, per_row, cfg, copies)} "
                 f"({format_size(free)} free) -> {path}")
    if estimate * per_row > free:
        # detectron sampling: how many proposals reach the IoU threshold is known only while building;
        # a disk that fills stops the build with one line and leaves no cache behind
        progress.log(f"the cache may not fit: at least {format_size(least * per_row)}, at most "
                     f"{format_size(estimate * per_row)}, {format_size(free)} free; a full disk stops the build "
                     f"with one error line and leaves nothing behind")
    s = roi_size
    device = next(model.parameters()).device
    task = progress.task("feature cache", len(dataset))
    loader = torch.utils.data.DataLoader(_Guarded(dataset), batch_size=batch_images, collate_fn=_collate_guarded, num_workers=workers,
                                         pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None)
    with CacheWriter(path, key, channels, s, cfg.dtype, chunk_rows) as w:
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
        w.attrs.update({"instances": instances, "images": len(dataset), "hflip": copies == 2, "seed": seed,
                        "classes": np.array(sorted(base.mask_cats), np.int64), **sampling_settings(cfg), **(attrs or {})})
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
        self.features, self.masks = cache.read_rows(rows)
        self.rows = torch.from_numpy(rows)
        self.labels = torch.from_numpy(cache.labels[rows])
        self.rois = len(rows)
        self.batches = IterationBatches(self.rois, batch_size, iterations, seed, rank=rank, world_size=world_size)

    def batch(self, iteration: int) -> RoIBatch:
        idx = torch.tensor(self.batches.batch(iteration), dtype=torch.long)
        return RoIBatch(self.features[idx], self.masks[idx], self.labels[idx], self.rows[idx])

    def close(self) -> None:
        pass


def _use_count(t: torch.Tensor) -> int:
    """How many tensors (views included) share ``t``'s storage, plus one for the storage handle asked for."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


class _BatchBuffers:
    """Reusable batch buffers (features uint8[b, fb], masks uint8[b, mb] and their memoryviews).

    Fresh memory costs a page fault per 4 KiB on first touch, which made reading a batch from the
    page cache about 4x slower than reading into memory used before. A buffer is handed out again
    only when no tensor outside this pool refers to its storage any more (the consumer has let go
    of the batch and every view of it), so reuse can never overwrite a batch still in use.
    """

    def __init__(self, b: int, fb: int, mb: int, keep: int = 16):
        self.b, self.fb, self.mb, self.keep = b, fb, mb, keep
        self.entries: list[list] = []  # [features, masks, views, base use counts, being filled]
        self.counting = hasattr(torch._C, "_storage_Use_Count")

    def get(self):
        for e in self.entries:
            if not e[4] and (_use_count(e[0]), _use_count(e[1])) == e[3]:
                e[4] = True
                return e[0], e[1], e[2]
        f, m = torch.empty((self.b, self.fb), dtype=torch.uint8), torch.empty((self.b, self.mb), dtype=torch.uint8)
        views = (memoryview(f.numpy()).cast("B"), memoryview(m.numpy()).cast("B"))
        if self.counting and len(self.entries) < self.keep:
            self.entries.append([f, m, views, (_use_count(f), _use_count(m)), True])
        return f, m, views

    def filled(self, f: torch.Tensor) -> None:
        """The buffer of ``f`` is complete and handed to the consumer: reusable once it lets go."""
        for e in self.entries:
            if e[0] is f:
                e[4] = False


class StreamingRoIs:
    """The kept rows of a cache, streamed from disk: never more than a few windows of chunks in memory.

    Order (a function of ``seed``, the cache, ``rank`` and ``world_size`` alone, so a resumed run
    sees the same batches): epoch ``e`` visits the chunks (``chunk_rows`` consecutive rows, by default
    the cache's ``chunk_rows``)
    holding kept rows in a random order drawn from ``seed * 100003 + e``. That order is cut into
    ``world_size`` consecutive shares of about equal kept rows, and process ``rank`` reads only its
    own share (:meth:`shard`), so every kept row is read by exactly one process per epoch. A share
    is visited in windows of ``window`` chunks whose kept rows are shuffled together. Each process
    concatenates its shares of epochs 0, 1, ... and iteration ``i`` takes positions
    ``[i*b, (i+1)*b)`` of that stream, ``b = batch_size / world_size``. A background thread gives
    every row of the next windows its slot in a batch and the cache's reader threads read each chunk
    straight into those slots (no copy after the read), several chunks in flight; finished batches
    wait in a queue of ``prefetch``. Memory: about ``(ahead * window * chunk_rows + prefetch * b)`` RoIs.
    """

    def __init__(self, cache: FeatureCache, rows: np.ndarray, batch_size: int, iterations: int, seed: int,
                 window: int = 8, prefetch: int = 4, rank: int = 0, world_size: int = 1, chunk_rows: int = 0):
        if len(rows) == 0:
            raise ValueError("no rows to stream")
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} is not divisible by {world_size} processes")
        self.cache, self.batch_size, self.iterations, self.seed = cache, batch_size, iterations, seed
        self.window, self.prefetch, self.rank, self.world_size = max(1, window), max(1, prefetch), rank, world_size
        self.local_batch = batch_size // world_size
        self.rois = len(rows)
        self.chunk = chunk_rows or cache.chunk_rows
        n = len(cache)
        kept = np.zeros(n, bool)
        kept[rows] = True
        n_chunks = math.ceil(n / self.chunk)
        self._chunk_rows = [np.flatnonzero(kept[c * self.chunk : (c + 1) * self.chunk]) + c * self.chunk for c in range(n_chunks)]
        self._chunks = [c for c in range(n_chunks) if len(self._chunk_rows[c])]
        self._counts = np.array([len(self._chunk_rows[c]) for c in range(n_chunks)], dtype=np.int64)
        if len(self._chunks) < world_size:
            raise MaskxError(f"the training rows lie in {len(self._chunks)} chunks, too few to share among {world_size} "
                             f"processes: raise cache.ram_budget_gb (they fit in memory)", cache.path)
        self.ahead = max(2, math.ceil(2 * cache.rowfile.threads / self.window))  # windows read ahead
        fb = cache.record_bytes - (2 * cache.roi_size) ** 2
        ahead_batches = max(1, math.ceil(self.ahead * self.window * self.chunk / self.local_batch))
        self._buffers = _BatchBuffers(self.local_batch, fb, cache.record_bytes - fb, keep=self.prefetch + ahead_batches + 3)
        self.bytes_read = 0
        self._epoch_lengths: dict[int, int] = {}
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._next = -1

    def shard(self, epoch: int) -> list[int]:
        """The chunk ids this process reads in ``epoch``, in visiting order."""
        g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        order = np.array(self._chunks)[torch.randperm(len(self._chunks), generator=g).numpy()]
        if self.world_size == 1:
            return order.tolist()
        counts = self._counts[order]
        mid = np.cumsum(counts) - counts / 2
        part = np.minimum((mid * self.world_size / counts.sum()).astype(np.int64), self.world_size - 1)
        if len(np.unique(part)) < self.world_size:  # a chunk larger than a share: deal the chunks out in turn
            part = np.arange(len(order)) % self.world_size
        return order[part == self.rank].tolist()

    def windows(self, epoch: int) -> list[tuple[list[int], np.ndarray]]:
        """(chunk ids, rows in visiting order) of each window of this process's share of ``epoch``."""
        g = torch.Generator().manual_seed((self.seed * 100003 + epoch) * 1024 + self.rank)
        share = self.shard(epoch)
        out = []
        for w in range(0, len(share), self.window):
            chunks = share[w : w + self.window]
            rows = np.concatenate([self._chunk_rows[c] for c in chunks])
            out.append((chunks, rows[torch.randperm(len(rows), generator=g).numpy()]))
        return out

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The kept rows this process visits in ``epoch``, in order."""
        return np.concatenate([rows for _, rows in self.windows(epoch)])

    def epoch_length(self, epoch: int) -> int:
        """Kept rows in this process's share of ``epoch``."""
        if epoch not in self._epoch_lengths:
            self._epoch_lengths[epoch] = int(self._counts[self.shard(epoch)].sum())
        return self._epoch_lengths[epoch]

    def _windows_from(self, iteration: int):
        pos, epoch = iteration * self.local_batch, 0
        while pos >= self.epoch_length(epoch):
            pos -= self.epoch_length(epoch)
            epoch += 1
        while True:
            for chunks, rows in self.windows(epoch):
                if pos >= len(rows):
                    pos -= len(rows)
                    continue
                yield chunks, rows[pos:]
                pos = 0
            epoch += 1

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, start_iter: int) -> None:
        """Assemble batches ``start_iter ..``: each window's rows are assigned their batch slots and its
        chunks read straight into them (:meth:`RowFile.scatter_into`); a batch is handed over when
        every read that fills it has finished."""
        b, c, s = self.local_batch, self.cache.channels, self.cache.roi_size
        n, rec = len(self.cache), self.cache.record_bytes
        fb = rec - (2 * s) ** 2
        tdtype = TORCH_DTYPES[self.cache.dtype]
        end = (self.iterations - start_iter) * b  # rows to deliver: nothing is read beyond them
        ahead = max(1, math.ceil(self.ahead * self.window * self.chunk / b))  # batches being read ahead (as in __init__)
        batches: dict[int, list] = {}  # iteration -> [features, masks, rows, views, futures]
        pos = 0
        wins = self._windows_from(start_iter)

        def slot(k: int) -> list:
            if k not in batches:
                f, m, views = self._buffers.get()
                batches[k] = [f, m, np.empty(b, np.int64), views, []]
            return batches[k]

        def submit_window() -> None:
            nonlocal pos
            chunks, rows = next(wins)
            dest: dict[int, tuple[int, int]] = {}
            for r in rows[: end - pos]:
                k, j = divmod(pos, b)
                slot(start_iter + k)[2][j] = r
                dest[int(r)] = (start_iter + k, j)
                pos += 1
            for ch in sorted(chunks):
                lo, hi = ch * self.chunk, min((ch + 1) * self.chunk, n)
                views, touched = [], set()
                for r in range(lo, hi):
                    d = dest.get(r)
                    if d is None:
                        views.append(None)
                        continue
                    k, j = d
                    fv, mv = batches[k][3]
                    views.append([fv[j * fb : (j + 1) * fb], mv[j * (rec - fb) : (j + 1) * (rec - fb)]])
                    touched.add(k)
                if touched:
                    future = self.cache.rowfile.submit_scatter(lo, views)
                    self.bytes_read += (hi - lo) * rec
                    for k in touched:
                        batches[k][4].append(future)

        try:
            for it in range(start_iter, self.iterations):
                while pos < min(end, (it - start_iter + 1 + ahead) * b):
                    submit_window()
                f, m, rows, _, futures = batches.pop(it)
                for fut in futures:
                    fut.result()
                self._buffers.filled(f)
                batch = RoIBatch(f.view(tdtype).view(b, c, s, s), m.view(b, 2 * s, 2 * s),
                                 torch.from_numpy(self.cache.labels[rows]), torch.from_numpy(rows))
                if not self._put((it, batch)):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            self._put(exc)
        finally:
            for pending in batches.values():  # reads still writing into buffers: let them finish
                for fut in pending[4]:
                    if not fut.cancel():
                        try:
                            fut.result()
                        except BaseException:  # noqa: BLE001 - the batch is not used any more
                            pass

    def _start(self, iteration: int) -> None:
        self.close()
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._thread = threading.Thread(target=self._produce, args=(iteration,), name="maskx-cache-reader", daemon=True)
        self._thread.start()
        self._next = iteration

    def batch(self, iteration: int) -> RoIBatch:
        """This process's batch of ``iteration`` (sequential calls are served from the read-ahead queue)."""
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
        """Stop the assembling thread (the cache file itself stays open)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None


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
        base, copies = _flip_source(dataset)
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
    return StreamingRoIs(cache, rows, batch_size, iterations, seed, cfg.shuffle_window, rank=rank, world_size=world_size,
                         chunk_rows=cfg.stream_chunk_rows)


# --------------------------------------------------------------------------------------------
# Finding or building the cache of a detector and its training data
@dataclass
class CacheResult:
    """An opened, complete cache (``cache``; close it when done) and where it came from."""

    path: Path
    key: str
    built: bool
    cache: FeatureCache
    warnings: list[str] = field(default_factory=list)  # what loading skipped (degenerate boxes) and the file lacks (set-A masks)

    @property
    def rois(self) -> int:
        return len(self.cache)


def check_cache_config(cfg: CacheConfig) -> None:
    def bad(key: str, message: str):
        raise MaskxError(f"cache.{key} {message}", key=f"cache.{key}")

    if cfg.dtype not in DTYPES:
        bad("dtype", f"must be float16 or float32, got '{cfg.dtype}'")
    if cfg.sampling not in SAMPLINGS:
        bad("sampling", f"must be {' or '.join(SAMPLINGS)}, got '{cfg.sampling}'")
    if cfg.classes not in ("train", "all"):
        bad("classes", f"must be train or all, got '{cfg.classes}'")
    if cfg.proposals_per_instance < 0:
        bad("proposals_per_instance", f"must be 0 or more, got {cfg.proposals_per_instance}")
    if cfg.rpn_proposals < 0:
        bad("rpn_proposals", f"must be 0 (the detector's own) or more, got {cfg.rpn_proposals}")
    if cfg.rois_per_image < 1:
        bad("rois_per_image", f"must be 1 or more, got {cfg.rois_per_image}")
    if not 0 < cfg.fg_fraction <= 1:
        bad("fg_fraction", f"must be in (0, 1], got {cfg.fg_fraction}")
    if not 0 < cfg.min_iou <= 1:
        bad("min_iou", f"must be in (0, 1], got {cfg.min_iou}")
    if cfg.ram_budget_gb < 0:
        bad("ram_budget_gb", f"must be 0 or more, got {cfg.ram_budget_gb}")
    for key in ("reader_threads", "shuffle_window"):
        if getattr(cfg, key) < 1:
            bad(key, f"must be 1 or more, got {getattr(cfg, key)}")
    for key in ("workers", "stream_chunk_rows"):
        if getattr(cfg, key) < 0:
            bad(key, f"must be 0 or more, got {getattr(cfg, key)}")


def cache_dataset(data: dict, data_cfg: DataConfig, class_ids: list[int] | None = None):
    """The cache's input: training images with an instance of ``class_ids`` (every class if None) that
    the set-A rule keeps, masks of those classes; with ``data.hflip`` followed by their flipped copies
    (:class:`FlippedCopies`)."""
    ids = [c["id"] for c in data["categories"]] if class_ids is None else list(class_ids)
    full = CocoDataset(data, data_cfg.train_images, with_masks=True, mask_category_ids=ids, max_images=data_cfg.max_train_images)
    keep = {i for i, _ in masked_instances(full)}
    full.images = [im for i, im in enumerate(full.images) if i in keep]
    return FlippedCopies(full) if data_cfg.hflip else full


def find_superset(folder: Path, settings: str, class_ids: list[int], threads: int = 4) -> FeatureCache | None:
    """A complete cache in ``folder`` built with ``settings`` whose classes include ``class_ids``
    (the one with the fewest classes), or None."""
    wanted, found = set(class_ids), []
    for p in sorted(folder.glob("features-*.h5")):
        try:
            with h5py.File(p, "r") as f:
                if str(f.attrs.get("settings_key")) == settings and f.attrs.get("complete"):
                    classes = {int(c) for c in f.attrs["classes"]}
                    if wanted <= classes:
                        found.append((len(classes), p, str(f.attrs["key"])))
        except (OSError, KeyError, ValueError, TypeError):
            continue
    for _, p, key in sorted(found):
        cache = open_cache(p, key, threads)
        if cache is not None:
            return cache
    return None


def ensure_cache(det: DetectorRun, data: dict, data_cfg: DataConfig, cfg: CacheConfig, roi_size: int,
                 progress: Progress = NULL_PROGRESS, class_ids: list[int] | None = None) -> CacheResult:
    """The complete cache for (detector, training data, RoI settings, classes): reused if present, else built.

    ``class_ids``: the run's mask classes (:func:`pipelines.data.splits.mask_classes`; every class if
    None or ``cache.classes=all``). The cache lives in ``cfg.dir`` (default ``<detector run>/cache``)
    as ``features-<key[:16]>.h5`` + ``.rows``; a complete cache of more classes with the same settings
    is reused. The build holds a lock file beside it. The detector must already be on the device it
    should run on.
    """
    check_cache_config(cfg)
    all_ids = [c["id"] for c in det.categories]
    wanted = all_ids if class_ids is None or cfg.classes == "all" else sorted(set(class_ids))
    args = (det.sha256, sha256_file(data_cfg.train_json))
    settings = settings_key(*args, roi_size, cfg, data_cfg.max_train_images, data_cfg.hflip)
    key = cache_key(*args, wanted, roi_size, cfg, data_cfg.max_train_images, data_cfg.hflip)
    folder = Path(cfg.dir) if cfg.dir else det.run_dir / "cache"
    path = folder / f"features-{key[:16]}.h5"
    lock = folder / f".features-{settings[:16]}.lock"
    with file_lock(lock, on_wait=lambda: progress.log(f"another process is building this feature cache: waiting for it ({lock})")):
        cache = open_cache(path, key, cfg.reader_threads) or find_superset(folder, settings, wanted, cfg.reader_threads)
        if cache is not None:
            return CacheResult(cache.path, cache.key, False, cache)
        full = cache_dataset(data, data_cfg, wanted)
        if not len(full):
            raise MaskxError("no training image has a mask of the cached classes", data_cfg.train_json)
        cache = build_cache(det.model, build_mask_roi_pool(roi_size), full, cfg, path, key, det.model.backbone.out_channels,
                            progress, batch_images=BUILD_BATCH_IMAGES, seed=CACHE_SEED, workers=cfg.workers,
                            attrs={"settings_key": settings})
    return CacheResult(path, key, True, cache)

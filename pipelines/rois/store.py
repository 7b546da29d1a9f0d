"""The feature cache on disk: one record layout, the writer and the reader.

A cache is a row file of fixed-size records (``features-<key>.rows``, no header) beside its HDF5
description (``features-<key>.h5``: per-RoI labels and metadata, the settings, the key); see
``docs/cache.md``. :class:`RecordLayout` is the one place that knows what a record holds and in
which order -- the writer packs records with it, the reader cuts them with it (into fresh tensors,
into batch slots, or as a numpy memory map), and the sizes come from it.

Both files are written under temporary names and renamed when complete, the HDF5 file last, so a
partial cache never carries the final name; :func:`open_cache` refuses one that is unreadable,
incomplete, of another key or format, or whose row file has the wrong size.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import h5py
import numpy as np
import torch
import xxhash

from pipelines.errors import MaskxError
from pipelines.io import atomic_path, hdf5_file, make_parent
from pipelines.rois.rowfile import RowFile, RowWriter
from pipelines.rois.storage import STORAGES, decode_features

FORMAT = "maskx-feature-cache"
VERSION = 3  # 3: per-row checksums (xxh3), 8-bit storage
CHUNK = 64  # rows per chunk: the unit a streamed cache is read and shuffled in
# per-RoI datasets of the HDF5 description: dtype, shape of one entry, value when not given
# (xxh3: the 64-bit XXH3 hash of the RoI's record, written by the writer, checked by every read)
META = {"labels": (np.int64, (), None), "boxes": (np.float32, (4,), np.nan), "image_id": (np.int64, (), -1),
        "instance": (np.int32, (), -1), "flipped": (np.uint8, (), 0), "is_gt": (np.uint8, (), 0), "xxh3": (np.uint64, (), 0)}
META_BYTES = sum(np.dtype(d).itemsize * int(np.prod(shape)) for k, (d, shape, _) in META.items() if k != "labels")  # 38
LABEL_BYTES = 8  # int64 label of a RoI, kept in memory beside its record
SAMPLED_CHECKS = 16  # rows whose checksum is verified when a cache is opened (the first, the last, evenly between)


def record_checksum(slots) -> int:
    """The 64-bit XXH3 hash of one record given as its consecutive parts (bytes-like, in file order)."""
    h = xxhash.xxh3_64()
    for part in slots:
        h.update(part)
    return h.intdigest()


@dataclass
class RoIBatch:
    """A batch of RoIs: features [R, C, S, S], mask targets uint8[R, M, M], labels int64[R] (1..K).

    ``index`` int64[R] (optional) says where each RoI comes from: its row in the cache file for
    cache batches; its instance (position among the masked instances of the batch's images) for
    :func:`pipelines.rois.extract.extract_rois`, which also fills ``boxes`` float32[R, 4] (the RoI
    in the input image's pixels), ``is_gt`` bool[R] (the RoI is a ground-truth box), ``instance``
    int64[R] (the matched instance's position in its image's target) and ``image`` int64[R] (its
    image's position in the batch).
    """

    features: torch.Tensor
    masks: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor | None = None
    boxes: torch.Tensor | None = None
    is_gt: torch.Tensor | None = None
    instance: torch.Tensor | None = None
    image: torch.Tensor | None = None
    scale: torch.Tensor | None = None  # float32 [R, C] of 8-bit stored features (``features`` then holds the codes)

    def features_on(self, device: torch.device | str) -> torch.Tensor:
        """The features as float32 [R, C, S, S] on ``device`` (8-bit storage converted back there)."""
        return decode_features(self.features, self.scale, device)


@dataclass(frozen=True)
class RecordLayout:
    """What one record of the row file holds: features ``[C, S, S]`` stored as ``dtype`` (:data:`STORAGES`),
    for 8-bit storage their scale ``float32[C]``, then the mask ``uint8[2S, 2S]``.

    Little-endian, C-ordered, back to back. Every reader and writer of records goes through this
    type: :meth:`pack` (tensors -> records), :meth:`split` (records -> tensors), :meth:`buffers` /
    :meth:`row_views` / :meth:`unpack` (reading rows straight into batch slots), :meth:`numpy_dtype`
    (a memory map), and the sizes (:attr:`record_bytes`, :attr:`memory_bytes`, :attr:`disk_bytes`).
    """

    channels: int
    roi_size: int
    dtype: str = "float16"

    @cached_property
    def storage(self):
        return STORAGES[self.dtype]

    @cached_property
    def fields(self) -> tuple[tuple[str, np.dtype, tuple[int, ...]], ...]:
        """(name, numpy dtype, shape) of each part of a record, in file order."""
        c, s = self.channels, self.roi_size
        scale = (("scale", np.dtype("<f4"), (c,)),) if self.storage.scaled else ()
        return (("features", np.dtype(self.storage.np_dtype).newbyteorder("<"), (c, s, s)), *scale,
                ("masks", np.dtype(np.uint8), (2 * s, 2 * s)))

    @cached_property
    def field_bytes(self) -> tuple[int, ...]:
        return tuple(d.itemsize * int(np.prod(shape)) for _, d, shape in self.fields)

    @cached_property
    def record_bytes(self) -> int:
        """Bytes of one record of the row file."""
        return sum(self.field_bytes)

    @cached_property
    def memory_bytes(self) -> int:
        """Bytes of one RoI once read into memory: its record and its int64 label."""
        return self.record_bytes + LABEL_BYTES

    @cached_property
    def disk_bytes(self) -> int:
        """Bytes of one RoI on disk: its record, its label and its metadata in the description."""
        return self.memory_bytes + META_BYTES

    def numpy_dtype(self) -> np.dtype:
        """The structured dtype of a record (for ``numpy.memmap``)."""
        return np.dtype([(name, d, shape) for name, d, shape in self.fields])

    def pack(self, features: torch.Tensor, masks: torch.Tensor) -> np.ndarray:
        """features [n, C, S, S] (any float dtype), masks [n, 2S, 2S] -> records uint8[n, record_bytes]."""
        n = int(features.shape[0])
        stored, scale = self.storage.encode(features.detach().cpu())
        parts = {"features": stored.numpy(), "scale": None if scale is None else scale.numpy(),
                 "masks": masks.detach().cpu().numpy().astype(np.uint8, copy=False)}
        rec = np.empty((n, self.record_bytes), np.uint8)
        at = 0
        for (name, d, _), nb in zip(self.fields, self.field_bytes):
            rec[:, at : at + nb] = np.ascontiguousarray(parts[name].astype(d, copy=False)).reshape(n, -1).view(np.uint8)
            at += nb
        return rec

    def buffers(self, n: int) -> list[torch.Tensor]:
        """Empty uint8 slots for ``n`` records, one tensor ``[n, field_bytes]`` per field."""
        return [torch.empty((n, nb), dtype=torch.uint8) for nb in self.field_bytes]

    def row_views(self, buffers: list[torch.Tensor]) -> list[memoryview]:
        """Byte views of ``buffers`` (one per field); :meth:`row_slot` cuts a row's slots from them."""
        return [memoryview(b.numpy()).cast("B") for b in buffers]

    def row_slot(self, views: list[memoryview], j: int) -> list[memoryview]:
        """The slots of row ``j`` in ``views`` (what :meth:`RowFile.scatter_into` reads one record into)."""
        return [v[j * nb : (j + 1) * nb] for v, nb in zip(views, self.field_bytes)]

    def unpack(self, buffers: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Filled slots -> (stored features [n, C, S, S], their scale float32[n, C] or None, masks uint8[n, 2S, 2S]),
        views of the slots (no copy). Float features come in their own dtype; float8 as its raw bytes (uint8)."""
        n, s = buffers[0].shape[0], self.roi_size
        feats = buffers[0].view(torch.uint8 if self.storage.np_dtype is np.uint8 else self.storage.torch_dtype)
        scale = buffers[1].view(torch.float32) if self.storage.scaled else None
        return feats.view(n, self.channels, s, s), scale, buffers[-1].view(n, 2 * s, 2 * s)

    def split(self, records: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """uint8[n, record_bytes] -> :meth:`unpack`'s (features, scale, masks), new contiguous tensors."""
        bounds = np.cumsum((0,) + self.field_bytes)
        return self.unpack([records[:, a:z].contiguous() for a, z in zip(bounds[:-1], bounds[1:])])


def layout_of(channels: int, roi_size: int, dtype: str) -> RecordLayout:
    return RecordLayout(int(channels), int(roi_size), str(dtype))


class CacheWriter:
    """Write a cache: the row file under a temporary name, renamed on success, then its HDF5 description.

    ``with CacheWriter(path, key, channels, roi_size, dtype) as w: w.append(...); w.attrs.update(...)``.
    On an exception neither file is left behind; the HDF5 file, written last, marks the cache complete.
    Each record's XXH3 hash goes into the description (``xxh3``).
    """

    def __init__(self, path: Path, key: str, channels: int, roi_size: int, dtype: str, chunk_rows: int = CHUNK):
        self.path, self.key = Path(path), key
        self.rows_path = self.path.with_suffix(".rows")
        self.layout = layout_of(channels, roi_size, dtype)
        self.chunk_rows = chunk_rows
        self.attrs: dict = {}
        self._meta: dict[str, list[np.ndarray]] = {k: [] for k in META}

    def __enter__(self) -> CacheWriter:
        make_parent(self.path)
        self._rows_ctx = atomic_path(self.rows_path)
        self._rows = RowWriter(self._rows_ctx.__enter__(), self.layout.record_bytes)
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
        if set(meta) - (set(META) - {"xxh3"}):
            raise TypeError(f"unknown per-RoI dataset(s) {sorted(set(meta) - set(META))} (known: {', '.join(META)})")
        records = self.layout.pack(features, masks)
        self._rows.append(records)
        meta["labels"] = labels
        meta["xxh3"] = np.array([xxhash.xxh3_64_intdigest(r) for r in records], np.uint64)
        for k, (dtype, shape, fill) in META.items():
            v = meta.get(k)
            if v is None:
                v = np.full((n, *shape), fill, dtype)
            v = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
            self._meta[k].append(v.astype(dtype, copy=False))

    def _write_description(self) -> None:
        cat = {k: np.concatenate(v) if v else np.zeros((0, *META[k][1]), META[k][0]) for k, v in self._meta.items()}
        lay = self.layout
        with hdf5_file(self.path) as f:  # atomic, and a full disk is one error line (not an HDF5 crash)
            for k, v in cat.items():
                f.create_dataset(k, data=v)
            f.attrs.update({"format": FORMAT, "version": VERSION, "key": self.key, "roi_size": lay.roi_size,
                            "channels": lay.channels, "dtype": lay.dtype, "chunk_rows": self.chunk_rows,
                            "record_bytes": lay.record_bytes, "rows": self.rows, "rows_file": self.rows_path.name})
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
    """A finished cache: ``len(cache)`` RoIs; ``read(start, stop)``, ``read_rows(rows)``, ``read_batch(rows)`` or ``load()``.

    ``labels`` (int64[N], 1..K) and ``checksums`` (uint64[N], each record's XXH3) are read into memory at
    once; ``features`` [N, C, S, S] (the stored values: for 8-bit storage the codes, ``scale`` [N, C]
    beside them) and ``masks`` [N, 2S, 2S] are read-only memory maps of the row file (handy for
    inspection); ``rowfile`` reads it in parallel; ``layout`` says what a record is. ``meta(name)``
    reads a per-RoI metadata dataset. Every read checks the rows it returns against their checksums
    (a mismatch is one MaskxError naming the row file).
    """

    def __init__(self, path: Path, threads: int = 4):
        self.path = Path(path)
        self.file = h5py.File(path, "r")
        self.rowfile: RowFile | None = None
        try:
            a = self.file.attrs
            self.labels = self.file["labels"][()]
            self.checksums = self.file["xxh3"][()]
            self.key = str(a["key"])
            self.layout = layout_of(a["channels"], a["roi_size"], a["dtype"])
            if int(a["record_bytes"]) != self.record_bytes:
                raise ValueError("record size does not match the stored shapes")
            self.rows_path = self.path.with_name(str(a["rows_file"]))
            self.rowfile = RowFile(self.rows_path, self.record_bytes, threads)
            if self.rowfile.size != len(self) * self.record_bytes:
                raise ValueError(f"row file holds {self.rowfile.size} bytes, not {len(self)} x {self.record_bytes}")
            if len(self):
                self._map = np.memmap(self.rows_path, dtype=self.layout.numpy_dtype(), mode="r", shape=(len(self),))
                self.features, self.masks = self._map["features"], self._map["masks"]
            else:
                self._map = None
                empty = self.layout.split(torch.empty((0, self.record_bytes), dtype=torch.uint8))
                self.features, self.masks = empty[0].numpy(), empty[-1].numpy()
        except BaseException:
            self.close()
            raise

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def channels(self) -> int:
        return self.layout.channels

    @property
    def roi_size(self) -> int:
        return self.layout.roi_size

    @property
    def dtype(self) -> str:
        return self.layout.dtype

    @property
    def record_bytes(self) -> int:
        return self.layout.record_bytes

    @property
    def chunk_rows(self) -> int:
        """RoIs per chunk: the unit the streaming reader reads and shuffles."""
        return int(self.file.attrs.get("chunk_rows", CHUNK))

    @property
    def row_bytes(self) -> int:
        """Bytes of one RoI once read into memory (features + mask + label)."""
        return self.layout.memory_bytes

    @property
    def nbytes(self) -> int:
        """Bytes of the whole cache once read into memory."""
        return len(self) * self.row_bytes

    def meta(self, name: str) -> np.ndarray:
        """A per-RoI metadata dataset: ``boxes`` float32[N, 4], ``image_id``, ``instance``, ``flipped``, ``is_gt``, ``xxh3``."""
        return self.file[name][()]

    def check(self, start: int, dests: list) -> None:
        """Raise MaskxError (naming the row file) unless each row ``start + i`` read into ``dests[i]`` (its
        parts, in file order; None: not wanted) has its checksum."""
        for i, parts in enumerate(dests):
            if parts is not None and record_checksum(parts) != int(self.checksums[start + i]):
                raise MaskxError(f"feature cache row {start + i} does not match its checksum: the file is damaged; "
                                 f"delete it ({self.path.name} and {self.rows_path.name}) and the next run rebuilds it",
                                 self.rows_path)

    def submit_scatter(self, start: int, dests: list):
        """:meth:`RowFile.submit_scatter` whose reader thread also checks the rows it read (:meth:`check`)."""
        return self.rowfile.submit_scatter(start, dests, after=self.check)

    def split(self, records: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Records uint8[n, record_bytes] -> (features [n, C, S, S], masks [n, 2S, 2S]); 8-bit features as float32."""
        feats, scale, masks = self.layout.split(records)
        return (feats if scale is None else decode_features(feats, scale)), masks

    def read(self, start: int, stop: int) -> RoIBatch:
        records = self.rowfile.read(start, stop)
        self.check(start, [[r.numpy()] for r in records])
        feats, masks = self.split(records)
        return RoIBatch(feats, masks, torch.from_numpy(self.labels[start:stop]), torch.arange(start, stop))

    def read_batch(self, rows: np.ndarray, block: int | None = None) -> RoIBatch:
        """The sorted ``rows`` as stored (8-bit features with their ``scale``), ``index`` = the rows: the
        blocks of ``block`` rows that hold any are read in parallel, each row straight into its place."""
        rows = np.asarray(rows, dtype=np.int64)
        block = block or 4 * self.chunk_rows
        buffers = self.layout.buffers(len(rows))
        views = self.layout.row_views(buffers)
        futures = []
        for a in np.unique(rows // block) * block:
            a, z = int(a), int(min(a + block, len(self)))
            lo, hi = np.searchsorted(rows, [a, z])
            dests: list = [None] * (z - a)
            for j in range(lo, hi):
                dests[rows[j] - a] = self.layout.row_slot(views, j)
            futures.append(self.submit_scatter(a, dests))
        for f in futures:
            f.result()
        feats, scale, masks = self.layout.unpack(buffers)
        return RoIBatch(feats, masks, torch.from_numpy(self.labels[rows]), torch.from_numpy(rows), scale=scale)

    def read_rows(self, rows: np.ndarray, block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [n, C, S, S], masks [n, 2S, 2S]) of the sorted ``rows`` (:meth:`read_batch`; 8-bit features as float32)."""
        b = self.read_batch(rows, block)
        return (b.features if b.scale is None else b.features_on("cpu")), b.masks

    def load(self) -> RoIBatch:
        return self.read(0, len(self))

    def info(self) -> dict:
        """What ``maskx cache info`` shows: counts, shapes, dtype, settings, sizes, the build's plan, key."""
        labels, counts = np.unique(self.labels, return_counts=True)
        a = self.file.attrs
        sampling = str(a.get("sampling", "instance"))
        settings = ({"rois_per_image": int(a.get("rois_per_image", 0)), "fg_fraction": float(a.get("fg_fraction", 0)),
                     "fg_per_image": int(a.get("fg_per_image", 0))}
                    if sampling == "detectron" else {"proposals_per_instance": int(a.get("proposals_per_instance", 0))})
        plan = {k[len("plan_"):]: a[k].item() if hasattr(a[k], "item") else a[k] for k in a if k.startswith("plan_")}
        return {
            "path": str(self.path), "rows_file": str(self.rows_path), "rois": len(self),
            "instances": int(a.get("instances", -1)), "images": int(a.get("images", -1)),
            "classes": int(len(labels)), "feature_shape": [self.channels, self.roi_size, self.roi_size], "dtype": self.dtype,
            "sampling": sampling, **settings, "hflip": bool(a.get("hflip", False)),
            "chunk_rows": self.chunk_rows, "memory_bytes": self.nbytes, "roi_bytes": self.roi_bytes(),
            "file_bytes": self.path.stat().st_size + self.rows_path.stat().st_size, "plan": plan,
            "key": self.key, "rois_per_class": {int(k): int(v) for k, v in zip(labels, counts)},
        }

    def roi_bytes(self) -> int:
        """Bytes the RoIs take on disk, measured: the row file and the stored per-RoI datasets (without the
        description's headers and attributes)."""
        return self.rows_path.stat().st_size + sum(int(self.file[k].id.get_storage_size()) for k in META)

    def close(self) -> None:
        if self.rowfile is not None:
            self.rowfile.close()
        self._map = None
        self.features = self.masks = None
        self.file.close()


def inspect_cache(path: Path, key: str | None, threads: int = 4) -> tuple[FeatureCache | None, str | None]:
    """(the cache at ``path``, None) if it is complete, of this format, built for ``key`` (any key if None)
    and its sampled rows (:data:`SAMPLED_CHECKS`) match their checksums; else (None, what is wrong), the
    reason None when there is no file at all. Temporary ``.tmp`` files are never opened."""
    path = Path(path)
    if not path.is_file() or path.suffix == ".tmp":
        return None, None
    try:
        f = h5py.File(path, "r")
    except (OSError, KeyError, ValueError, TypeError):
        return None, "cannot be read (truncated or overwritten)"
    try:
        a = f.attrs
        if a.get("format") != FORMAT or int(a.get("version", -1)) != VERSION:
            why = f"is not a version-{VERSION} maskx feature cache"
        elif not a.get("complete"):
            why = "is incomplete"
        elif key is not None and str(a.get("key")) != key:
            why = "was built for other settings"
        else:
            why = None
    except (OSError, KeyError, ValueError, TypeError):
        why = "cannot be read (truncated or overwritten)"
    finally:
        f.close()
    if why:
        return None, why
    try:
        cache = FeatureCache(path, threads)
    except (OSError, KeyError, ValueError, TypeError) as exc:
        return None, f"cannot be read: {exc.strerror if isinstance(exc, OSError) else exc}"
    try:
        for r in np.unique(np.linspace(0, len(cache) - 1, SAMPLED_CHECKS).round().astype(np.int64)) if len(cache) else []:
            cache.check(int(r), [[cache.rowfile.read(int(r), int(r) + 1)[0].numpy()]])
    except (OSError, ValueError, MaskxError) as exc:
        cache.close()
        return None, f"has damaged rows ({exc.message if isinstance(exc, MaskxError) else exc})"
    return cache, None


def open_cache(path: Path, key: str | None, threads: int = 4) -> FeatureCache | None:
    """The cache at ``path`` if :func:`inspect_cache` finds nothing wrong with it; None otherwise (the caller rebuilds it)."""
    return inspect_cache(path, key, threads)[0]

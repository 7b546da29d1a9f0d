"""Streaming a feature cache larger than the RAM budget: chunk by chunk from disk, shuffled at chunk
granularity, each process of a ``torchrun`` job reading its own share of every epoch."""

from __future__ import annotations

import math
import queue
import threading

import numpy as np
import torch

from pipelines.errors import MaskxError
from pipelines.rois.store import FeatureCache, RecordLayout, RoIBatch


READ_BYTES = 16 * 2**20  # a streamed read reaches at least this many bytes (docs/cache.md: 26 MB reads, ~1x dd cold)
MIN_CHUNKS = 64  # ... as long as the cache keeps this many chunks to shuffle


def default_chunk_rows(rows: int, cache_chunk: int, record_bytes: int) -> int:
    """RoIs per streamed chunk when ``cache.stream_chunk_rows`` is 0: the cache's own chunks read ``2**k`` at a time,
    the fewest whose read reaches :data:`READ_BYTES`, as long as the cache still has :data:`MIN_CHUNKS` chunks.

    COCO's records (101,136 bytes float16, 51,984 int8): 256 and 512 RoIs, 26 MB reads. Reading 6.5 MB
    chunks in a random order streamed a cold disk at 0.6x ``dd``'s sequential read; 26 MB ones at 1.0x.
    """
    chunk = max(1, cache_chunk)
    while chunk * record_bytes < READ_BYTES and rows // (2 * chunk) >= MIN_CHUNKS:
        chunk *= 2
    return chunk


def _use_count(t: torch.Tensor) -> int:
    """How many tensors (views included) share ``t``'s storage, plus one for the storage handle asked for."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


class _BatchBuffers:
    """Reusable batch buffers: one uint8 tensor ``[b, field_bytes]`` per field of the record layout, and their views.

    Fresh memory costs a page fault per 4 KiB on first touch, which made reading a batch from the
    page cache about 4x slower than reading into memory used before. A buffer is handed out again
    only when no tensor outside this pool refers to its storage any more (the consumer has let go
    of the batch and every view of it), so reuse can never overwrite a batch still in use.
    """

    def __init__(self, layout: RecordLayout, b: int, keep: int = 16):
        self.layout, self.b, self.keep = layout, b, keep
        self.entries: list[list] = []  # [buffers, row slots, base use counts, being filled]
        self.counting = hasattr(torch._C, "_storage_Use_Count")

    def get(self) -> tuple[list[torch.Tensor], list[list[memoryview]]]:
        """(buffers, the slots of each of their ``b`` rows: what :meth:`RowFile.scatter_into` reads a record into).

        The slots are made once per buffer and reused with it: making them for every row read (three
        small objects a row) kept Python's garbage collector busy for a third of the reader's time."""
        for e in self.entries:
            if not e[3] and tuple(_use_count(t) for t in e[0]) == e[2]:
                e[3] = True
                return e[0], e[1]
        bufs = self.layout.buffers(self.b)
        views = self.layout.row_views(bufs)
        slots = [self.layout.row_slot(views, j) for j in range(self.b)]
        if self.counting and len(self.entries) < self.keep:
            self.entries.append([bufs, slots, tuple(_use_count(t) for t in bufs), True])
        return bufs, slots

    def filled(self, bufs: list[torch.Tensor]) -> None:
        """The buffers ``bufs`` are complete and handed to the consumer: reusable once it lets go."""
        for e in self.entries:
            if e[0] is bufs:
                e[3] = False


class StreamingRoIs:
    """The kept rows of a cache, streamed from disk: never more than a few windows of chunks in memory.

    Order (a function of ``seed``, the cache, ``rank`` and ``world_size`` alone, so a resumed run
    sees the same batches): epoch ``e`` visits the chunks (``chunk_rows`` consecutive rows, by default
    :func:`default_chunk_rows`)
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
        self.chunk = chunk_rows or default_chunk_rows(len(cache), cache.chunk_rows, cache.record_bytes)
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
        ahead_batches = max(1, math.ceil(self.ahead * self.window * self.chunk / self.local_batch))
        self._buffers = _BatchBuffers(cache.layout, self.local_batch, keep=self.prefetch + ahead_batches + 3)
        self.bytes_read = 0
        self._epoch_lengths: dict[int, int] = {}
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._next = -1

    @property
    def first_reused_batch(self) -> int:
        """The first batch drawn into a reused batch buffer. The batches before it each fill fresh memory (the
        kernel zeroes a page per 4 KiB as rows land), a cost a training run pays once; rates from it on are the
        reader's steady state."""
        return self._buffers.keep + 1

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
        b, layout = self.local_batch, self.cache.layout
        n, rec = len(self.cache), self.cache.record_bytes
        end = (self.iterations - start_iter) * b  # rows to deliver: nothing is read beyond them
        ahead = max(1, math.ceil(self.ahead * self.window * self.chunk / b))  # batches being read ahead (as in __init__)
        batches: dict[int, list] = {}  # iteration -> [buffers, rows, row slots, futures]
        pos = 0
        wins = self._windows_from(start_iter)

        def submit_window() -> None:
            nonlocal pos
            chunks, rows = next(wins)
            rows = rows[: end - pos]
            at = np.arange(pos, pos + len(rows))
            its, js = start_iter + at // b, at % b  # each row's batch and place in it
            pos += len(rows)
            for k in np.unique(its).tolist():
                if k not in batches:
                    bufs, slots = self._buffers.get()
                    batches[k] = [bufs, np.empty(b, np.int64), slots, []]
                batches[k][1][js[its == k]] = rows[its == k]
            for ch in sorted(chunks):
                lo, hi = ch * self.chunk, min((ch + 1) * self.chunk, n)
                here = (rows >= lo) & (rows < hi)
                if not here.any():
                    continue
                dests: list = [None] * (hi - lo)  # None: read and dropped
                for r, k, j in zip((rows[here] - lo).tolist(), its[here].tolist(), js[here].tolist()):
                    dests[r] = batches[k][2][j]
                future = self.cache.submit_scatter(lo, dests)  # read, then checked against the checksums
                self.bytes_read += (hi - lo) * rec
                for k in np.unique(its[here]).tolist():
                    batches[k][3].append(future)

        try:
            for it in range(start_iter, self.iterations):
                while pos < min(end, (it - start_iter + 1 + ahead) * b):
                    submit_window()
                bufs, rows, _, futures = batches.pop(it)
                for fut in futures:
                    fut.result()
                self._buffers.filled(bufs)
                feats, scale, masks = layout.unpack(bufs)
                batch = RoIBatch(feats, masks, torch.from_numpy(self.cache.labels[rows]), torch.from_numpy(rows), scale=scale)
                if not self._put((it, batch)):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            self._put(exc)
        finally:
            for pending in batches.values():  # reads still writing into buffers: let them finish
                for fut in pending[3]:
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
            if isinstance(item, MaskxError):  # (a row that fails its checksum: the message names the file)
                raise item
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



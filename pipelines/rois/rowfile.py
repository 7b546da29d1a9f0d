"""Fixed-size records in a raw file: appended in order while a cache is built, read in parallel later.

A *row file* is ``N`` records of ``record_bytes`` bytes each, back to back, no header (what the
records mean is described by the HDF5 file beside it; see ``docs/cache.md``). Row ``r`` starts at
byte ``r * record_bytes``, so any run of rows is one contiguous read. :class:`RowFile` reads runs
with ``os.preadv`` straight into the caller's tensor: the system call releases Python's global
lock (unlike h5py, whose calls hold one lock for the whole process), so a pool of threads keeps
several large reads in flight and a cold file streams at the disk's sequential speed.
"""

from __future__ import annotations

import errno
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

IOV_MAX = 1024  # buffers per os.preadv call (Linux's limit)


class RowWriter:
    """Append records to a new raw file: ``append(uint8[n, record_bytes])``; ``rows`` so far."""

    def __init__(self, path: Path, record_bytes: int):
        self.path, self.record_bytes, self.rows = Path(path), int(record_bytes), 0
        self._file = open(self.path, "wb")

    def append(self, records: np.ndarray) -> None:
        if records.dtype != np.uint8 or records.ndim != 2 or records.shape[1] != self.record_bytes:
            raise ValueError(f"records must be uint8[n, {self.record_bytes}], got {records.dtype}{list(records.shape)}")
        self._file.write(np.ascontiguousarray(records).data)
        self.rows += records.shape[0]

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()


class RowFile:
    """An open row file of ``rows`` records; thread-safe positional reads.

    ``read_into(start, out)`` fills ``out`` (uint8[n, record_bytes], contiguous, on the CPU) with rows
    ``start .. start + n``; ``submit_scatter(start, dests)`` scatters rows into views on the pool of
    ``threads`` reader threads and returns a Future. After ``close()`` every read raises ``OSError(EBADF)``.
    """

    def __init__(self, path: Path, record_bytes: int, threads: int = 4):
        self.path, self.record_bytes = Path(path), int(record_bytes)
        self._fd = os.open(self.path, os.O_RDONLY)
        size = os.fstat(self._fd).st_size
        self.rows = size // self.record_bytes if self.record_bytes else 0
        self.size = size
        self.threads = max(1, int(threads))
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._scratch: memoryview | None = None  # where rows read but not wanted go

    def read_into(self, start: int, out: torch.Tensor) -> int:
        """Read ``out.shape[0]`` rows from row ``start`` into ``out``; return the bytes read."""
        n = out.shape[0]
        if out.dtype != torch.uint8 or not out.is_contiguous() or tuple(out.shape[1:]) != (self.record_bytes,):
            raise ValueError(f"out must be a contiguous uint8[n, {self.record_bytes}] tensor")
        if start < 0 or start + n > self.rows:
            raise ValueError(f"rows {start}..{start + n} outside 0..{self.rows}")
        view = memoryview(out.numpy()).cast("B")
        offset, done, want = start * self.record_bytes, 0, n * self.record_bytes
        while done < want:
            fd = self._fd
            if fd < 0:
                raise OSError(errno.EBADF, "row file is closed", str(self.path))
            got = os.preadv(fd, [view[done:]], offset + done)
            if got == 0:
                raise OSError(errno.EIO, f"unexpected end of file at byte {offset + done} (file shorter than its rows)",
                              str(self.path))
            done += got
        return done

    def scatter_into(self, start: int, dests: list[list[memoryview] | None]) -> int:
        """Read rows ``start .. start + len(dests)`` in one pass, row ``i`` into the buffers ``dests[i]``.

        The buffers of a row (e.g. its features' and its mask's slots in two batch tensors) must
        hold exactly ``record_bytes`` together; a row whose ``dests`` is None is read and dropped.
        Rows go straight from the file to their final places (``os.preadv``): no copy after the read.
        Returns the bytes read.
        """
        if start < 0 or start + len(dests) > self.rows:
            raise ValueError(f"rows {start}..{start + len(dests)} outside 0..{self.rows}")
        if self._scratch is None:
            self._scratch = memoryview(bytearray(self.record_bytes))
        iov = [v for d in dests for v in (d if d is not None else [self._scratch])]
        offset, total = start * self.record_bytes, 0
        for g in range(0, len(iov), IOV_MAX):
            group = iov[g : g + IOV_MAX]
            want = sum(map(len, group))
            while True:
                fd = self._fd
                if fd < 0:
                    raise OSError(errno.EBADF, "row file is closed", str(self.path))
                got = os.preadv(fd, group, offset)
                if got == 0:
                    raise OSError(errno.EIO, f"unexpected end of file at byte {offset} (file shorter than its rows)",
                                  str(self.path))
                offset, total, want = offset + got, total + got, want - got
                if want == 0:
                    break
                i = 0  # a short read: go on from where it stopped
                while got >= len(group[i]):
                    got -= len(group[i])
                    i += 1
                group = [group[i][got:], *group[i + 1 :]]
        return total

    def submit_scatter(self, start: int, dests: list[list[memoryview] | None], after=None) -> Future:
        """:meth:`scatter_into` on the reader threads, then ``after(start, dests)`` there (e.g. a check of the rows)."""
        return self._executor().submit(self._scatter_then, start, dests, after)

    def _scatter_then(self, start: int, dests: list[list[memoryview] | None], after) -> int:
        done = self.scatter_into(start, dests)
        if after is not None:
            after(start, dests)
        return done

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start .. stop`` as a new uint8[stop - start, record_bytes] tensor."""
        out = torch.empty((max(0, stop - start), self.record_bytes), dtype=torch.uint8)
        if len(out):
            self.read_into(start, out)
        return out

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="maskx-rows")
            return self._pool

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if fd >= 0:
            os.close(fd)

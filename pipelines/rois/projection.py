"""How long a feature cache takes to build and one stage-2 experiment takes to train, from measured rates.

:func:`measure_rates` times, on this machine, the five things a cache's life is made of -- reading
the disk, decoding an image, the frozen detector (backbone + RPN) on one image, the mask side
(forward + backward) on a batch of RoIs, and the streaming reader's own rate (its CPU work, from the
page cache) -- in seconds, on tiny inputs of the recipe's real shapes (random weights: the time does
not depend on them). :class:`Rates` can also be read from a JSON file
(``maskx cache plan --json`` writes one; ``--rates`` reads it back), e.g. rates measured on a GPU.
:func:`project` turns a :class:`~pipelines.rois.plan.CachePlan` and rates into times and names the
bottleneck of each phase.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from pipelines.config import CacheConfig, DetectorConfig, HeadConfig
from pipelines.errors import MaskxError
from pipelines.rois.plan import CachePlan

READ_PROBE_BYTES = 128 * 2**20  # the file read to time the disk
COCO_IMAGE = (480, 640)  # a typical COCO image, decoded to time the data loader


@dataclass
class Rates:
    """Per-second rates on one machine: ``read_mb_s`` (the disk, sequential, page cache emptied for the file),
    ``decode_images_s`` (one process decoding JPEGs of COCO's size), ``detect_images_s`` (backbone + RPN of
    the recipe's detector, one image at its input size), ``train_rois_s`` (the recipe's mask side,
    forward + backward), ``stream_rois_s`` (one process's streaming reader from the page cache, in the
    recipe's storage type ``stream_dtype``: the most a faster disk could give; 0 = not measured, e.g. a rates
    file written before it was); ``device`` and ``source`` ("measured here in N s" or the file they came from)."""

    read_mb_s: float
    decode_images_s: float
    detect_images_s: float
    train_rois_s: float
    stream_rois_s: float = 0.0
    stream_dtype: str = ""
    device: str = "cpu"
    source: str = ""

    @classmethod
    def from_dict(cls, d, source: str | Path) -> Rates:
        """Rates from a mapping (a ``cache plan --json`` report's ``rates``, or the rates themselves) read from
        ``source``; MaskxError naming it when a rate is missing or not a positive number."""
        d = d.get("rates", d) if isinstance(d, dict) else {}
        d = d if isinstance(d, dict) else {}
        rates = ("read_mb_s", "decode_images_s", "detect_images_s", "train_rois_s")
        bad = [k for k in rates if not _finite(d.get(k)) or d[k] <= 0]
        if bad:
            raise MaskxError(f"rates file needs a positive number for {', '.join(bad)} (write one with 'maskx cache plan --json')",
                             source)
        stream = d.get("stream_rois_s", 0.0)
        if not _finite(stream) or stream < 0:
            raise MaskxError(f"rates file's stream_rois_s must be a number >= 0 (0: not measured), got {stream!r}", source)
        return cls(*(float(d[k]) for k in rates), stream_rois_s=float(stream), stream_dtype=str(d.get("stream_dtype", "")),
                   device=str(d.get("device") or "unknown device"), source=str(source))


def _finite(x) -> bool:
    """A real number (not a bool, NaN or infinity)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, repeats: int, device: torch.device) -> float:
    """Seconds of one call of ``fn`` (the best of ``repeats``, after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def measure_read(folder: Path, nbytes: int = READ_PROBE_BYTES) -> float:
    """MB/s of a sequential read of a fresh file of ``nbytes`` in ``folder`` whose pages were dropped from the page cache."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".maskx-read-probe-") as f:
        block = np.random.default_rng(0).integers(0, 256, 4 * 2**20, dtype=np.uint8).tobytes()
        for _ in range(max(1, nbytes // len(block))):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        fd = os.open(f.name, os.O_RDONLY)
        try:
            t0 = time.perf_counter()
            while os.read(fd, 16 * 2**20):
                pass
            dt = time.perf_counter() - t0
        finally:
            os.close(fd)
    return max(1, nbytes // len(block)) * len(block) / dt / 1e6


def measure_decode() -> float:
    """Images/s one process decodes: a JPEG of COCO's size with a photo's amount of detail."""
    from PIL import Image

    h, w = COCO_IMAGE
    g = np.random.default_rng(0)
    smooth = np.kron(g.integers(0, 256, (h // 8, w // 8, 3)), np.ones((8, 8, 1))) + g.normal(0, 12, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(smooth.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    return 1.0 / _timed(lambda: Image.open(io.BytesIO(data)).convert("RGB").load(), 5, torch.device("cpu"))


@torch.no_grad()
def measure_detect(det: DetectorConfig, device: torch.device) -> float:
    """Images/s of the frozen detector's backbone + RPN on one COCO-sized image at the recipe's input size."""
    from pipelines.modeling.detector import build_detector

    model = build_detector(det, 2, pretrained=False).eval().to(device)
    image = torch.rand(3, *COCO_IMAGE, device=device)

    def once():
        images, _ = model.transform([image])
        model.rpn(images, model.backbone(images.tensors))

    return 1.0 / _timed(once, 2, device)


def measure_train(head: HeadConfig, channels: int, device: torch.device, batch: int = 32) -> float:
    """RoIs/s of the recipe's mask side, forward + backward + an SGD step, on ``batch`` RoIs."""
    from pipelines.modeling.maskx_rcnn import build_mask_side, mask_loss

    k = 80
    side = build_mask_side(head, k, channels, torch.randn(k, 1024)).to(device)
    opt = torch.optim.SGD(side.parameters(), lr=1e-3)
    x = torch.randn(batch, channels, head.roi_size, head.roi_size, device=device)
    labels = torch.randint(1, k + 1, (batch,), device=device)
    targets = (torch.rand(batch, 2 * head.roi_size, 2 * head.roi_size, device=device) > 0.5).float()

    def step():
        opt.zero_grad()
        mask_loss(side(x, labels), targets).backward()
        opt.step()

    return batch / _timed(step, 2, device)


def write_random_cache(path: Path, key: str, rows: int, channels: int, roi_size: int, dtype: str, block: int = 256) -> None:
    """A cache of ``rows`` RoIs of shape ``[channels, roi_size, roi_size]`` stored as ``dtype``, with random features
    (as incompressible as real ones), random masks and random labels in 1..80: what reading speeds are timed on."""
    from pipelines.rois.store import CHUNK, CacheWriter

    g = torch.Generator().manual_seed(0)
    block = min(block, rows)
    feats = torch.randn(block, channels, roi_size, roi_size, generator=g).relu()
    masks = (torch.rand(block, 2 * roi_size, 2 * roi_size, generator=g) > 0.5).to(torch.uint8)
    with CacheWriter(path, key, channels, roi_size, dtype, chunk_rows=CHUNK) as w:
        for a in range(0, rows, block):
            n = min(block, rows - a)
            w.append(feats[:n], masks[:n], torch.randint(1, 81, (n,), generator=g))
        w.attrs.update({"instances": rows})


def measure_stream(folder: Path, channels: int, roi_size: int, cache: CacheConfig, batch: int, windows: int = 16) -> float:
    """RoIs/s one process's streaming reader delivers from the page cache once its batch buffers are reused.

    That is the reader's own limit -- each row's batch slot, its checksum, the copies -- which a faster disk
    does not raise. Measured on a probe cache written in ``folder`` (removed after): 4 chunks of the rows a
    large cache streams at a time (``cache.stream_chunk_rows``, 0 = :func:`default_chunk_rows`'s ~16 MiB reads)
    of the recipe's record shape ``[channels, roi_size, roi_size]`` in ``cache.dtype``, read in batches of
    ``batch`` with ``cache.reader_threads`` threads and ``cache.shuffle_window``, timed from the first batch
    into a reused buffer over ``windows`` shuffle windows' rows. A window's batches are completed together
    and the reader runs up to 2 windows ahead, so a short timing would count batches read before it began;
    over 16 windows that lead is at most 1/8 of the rows timed (~3 GB read from memory at COCO's records).
    """
    from pipelines.rois.store import CHUNK, layout_of, open_cache
    from pipelines.rois.streaming import StreamingRoIs, default_chunk_rows

    layout = layout_of(channels, roi_size, cache.dtype)
    chunk = cache.stream_chunk_rows or default_chunk_rows(2**40, CHUNK, layout.record_bytes)
    rows = 4 * chunk
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".maskx-reader-probe-") as tmp:
        path = Path(tmp) / "features-probe.h5"
        write_random_cache(path, "probe", rows, channels, roi_size, cache.dtype)
        probe = open_cache(path, "probe", cache.reader_threads)
        if probe is None:
            raise MaskxError("the reader's probe cache could not be read back", path)
        src = StreamingRoIs(probe, np.arange(rows), batch, 1, seed=0, window=cache.shuffle_window, chunk_rows=chunk)
        try:
            first, steady = src.first_reused_batch, math.ceil(windows * max(1, cache.shuffle_window) * chunk / batch)
            src.iterations = first + steady
            for i in range(first):
                src.batch(i)
            t0 = time.perf_counter()
            n = sum(src.batch(i).labels.shape[0] for i in range(first, first + steady))
            dt = time.perf_counter() - t0
        finally:
            src.close()
            probe.close()
    return n / dt


def measure_rates(det: DetectorConfig, head: HeadConfig, folder: Path, device: torch.device,
                  cache: CacheConfig | None = None, batch: int = 512) -> Rates:
    """The rates, measured here (a few seconds to a minute on a CPU); the reader's only with ``cache`` (its
    storage type, threads and window; ``batch``: RoIs a training step reads)."""
    t0 = time.perf_counter()
    stream = measure_stream(folder, det.fpn_channels, head.roi_size, cache, batch) if cache is not None else 0.0
    r = Rates(measure_read(folder), measure_decode(), measure_detect(det, device), measure_train(head, det.fpn_channels, device),
              stream_rois_s=stream, stream_dtype=cache.dtype if cache is not None else "", device=str(device))
    r.source = f"measured here in {time.perf_counter() - t0:.0f} s"
    return r


@dataclass
class Projection:
    """Seconds of each part of the build and of one experiment's training, and each one's bottleneck."""

    build_parts: dict[str, float]
    train_parts: dict[str, float]
    streamed: bool

    @property
    def build_s(self) -> float:
        return max(self.build_parts.values())

    @property
    def train_s(self) -> float:
        return max(self.train_parts.values())

    @staticmethod
    def _slowest(parts: dict[str, float]) -> str:
        return max(parts, key=parts.get)

    @property
    def build_bottleneck(self) -> str:
        return self._slowest(self.build_parts)

    @property
    def train_bottleneck(self) -> str:
        return self._slowest(self.train_parts)

    def to_dict(self) -> dict:
        return {**asdict(self), "build_s": self.build_s, "train_s": self.train_s, "build_bottleneck": self.build_bottleneck,
                "train_bottleneck": self.train_bottleneck}


def project(plan: CachePlan, image_copies: int, rates: Rates, workers: int, ram_budget_gb: float) -> Projection:
    """Times of the build (the image copies decoded in ``workers`` processes, the detector on each, the
    plan's bytes written at the disk's rate) and of training (the plan's RoI visits through the mask side;
    a cache over ``ram_budget_gb`` is read from disk once per pass -- and through the streaming reader, at
    its own rate when measured --, one that fits is read once). The parts of each run side by side (decoding
    in workers, reads in threads), so the slowest sets the time."""
    build = {"decode": image_copies / (rates.decode_images_s * max(1, workers)), "compute": image_copies / rates.detect_images_s,
             "disk": plan.bytes / (rates.read_mb_s * 1e6)}
    streamed = plan.rows * plan.roi_bytes > ram_budget_gb * 2**30
    reads = plan.visits if streamed else plan.rows
    train = {"compute": plan.visits / rates.train_rois_s, "disk": reads * plan.roi_bytes / (rates.read_mb_s * 1e6)}
    if streamed and rates.stream_rois_s > 0:
        train["reader"] = plan.visits / rates.stream_rois_s
    return Projection(build, train, streamed)


def hours(seconds: float) -> str:
    """A duration as people say it: 42 s, 12 min, 3.4 h."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"

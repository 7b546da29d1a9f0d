"""Size arithmetic of a feature cache: how many RoIs it will hold, decided before anything is built.

``counts`` is, per image (and flipped copy), (instances the set-A rule keeps, all instances), as
:func:`pipelines.rois.instances.instance_counts` gives them from the annotation file.

:func:`plan_cache` sizes a cache to the budget ``cache.max_gb``: it picks the largest number of
foreground RoIs kept per image copy (detectron sampling; proposals per instance for instance
sampling) whose upper bound of bytes fits the budget, so the cache surely fits; the plan is printed
before the build and written into the cache's description (``plan_*`` attributes).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pipelines.config import CacheConfig
from pipelines.errors import MaskxError
from pipelines.io import format_size
from pipelines.rois.sampling import fg_per_image, kept_per_image
from pipelines.rois.store import RecordLayout, layout_of

# Bytes of a cache's description beyond its per-RoI data (HDF5 headers, attributes, the class list), at
# most: kept free within the budget (measured: 9.2 KiB for 20 classes, 9.5 KiB for 80, on a 40-image world)
DESCRIPTION_RESERVE = 256 * 1024


def estimate_rows(instances: list[tuple[int, int]], cfg: CacheConfig, proposals: int) -> int:
    """Upper bound of a cache's RoIs. ``instances``: per image (and flipped copy), (masked instances, all instances).

    instance: every masked instance with all its proposals. detectron: per image with a masked
    instance, the RoIs kept per image (:func:`kept_per_image`) or every candidate (all GT boxes +
    ``proposals``), the smaller.
    """
    if cfg.sampling == "detectron":
        cap = kept_per_image(cfg)
        return sum(min(cap, n_all + proposals) for n_masked, n_all in instances if n_masked)
    return sum(n_masked for n_masked, _ in instances) * (1 + cfg.proposals_per_instance)


def minimum_rows(instances: list[tuple[int, int]], cfg: CacheConfig) -> int:
    """What the build writes whatever the detector proposes, when the draw favours the cached classes.

    instance: the same as :func:`estimate_rows` (every masked instance gets all its proposals or
    its GT box again). detectron: every masked instance's GT box is a foreground candidate (IoU 1),
    so per image the masked instances, up to the RoIs kept per image (fewer only where the draw
    picks other classes' foreground instead).
    """
    if cfg.sampling == "detectron":
        cap = kept_per_image(cfg)
        return sum(min(cap, n_masked) for n_masked, _ in instances)
    return estimate_rows(instances, cfg, 0)


def disk_row_bytes(channels: int, roi_size: int, dtype: str) -> int:
    """Bytes of one RoI on disk: its record, its label and its metadata (:attr:`RecordLayout.disk_bytes`)."""
    return layout_of(channels, roi_size, dtype).disk_bytes


@dataclass
class CachePlan:
    """What a build will write, decided from the annotation file's counts before it starts.

    ``cfg``: the settings the build uses (``fg_per_image`` or ``proposals_per_instance`` as the budget
    allows); ``rows``: RoIs at most; ``roi_bytes``: bytes per RoI on disk; ``budget``: ``cache.max_gb``
    in bytes (0: none); ``visits``: RoI visits of the training schedule (iterations x batch; 0: unknown).
    """

    cfg: CacheConfig
    instances: int
    images: int
    rows: int
    least_rows: int
    roi_bytes: int
    budget: int
    visits: int = 0

    @property
    def bytes(self) -> int:
        """Bytes of the RoIs on disk at most (records, labels, metadata, checksums)."""
        return self.rows * self.roi_bytes

    @property
    def passes(self) -> float:
        """Times the schedule visits each RoI, at least (0 when the schedule is unknown)."""
        return self.visits / self.rows if self.rows else 0.0

    def what(self) -> str:
        c = self.cfg
        if c.sampling == "detectron":
            official = fg_per_image(c.rois_per_image, c.fg_fraction)
            return f"up to {kept_per_image(c)} foreground RoIs per image copy (the official draw: {official})"
        return f"GT box + up to {c.proposals_per_instance} proposals per instance"

    def describe(self, free: int | None = None) -> str:
        """One line: instances, what is kept, RoIs and bytes at most (the free space), the budget, passes per RoI."""
        free_s = f" ({format_size(free)} free)" if free is not None else ""
        budget = f"budget cache.max_gb={self.budget / 1e9:g}" if self.budget else "no budget (cache.max_gb=0)"
        passes = f", {self.passes:.1f}+ passes per RoI over {self.visits} RoI visits" if self.visits else ""
        return (f"{self.instances} set-A instances in {self.images} image copies, {self.what()}: up to {self.rows} RoIs x "
                f"{self.roi_bytes} bytes = {format_size(self.bytes)}{free_s}; {budget}{passes}")

    def attrs(self) -> dict:
        """The plan as attributes of the cache's description."""
        return {"plan_rois": self.rows, "plan_bytes": self.bytes, "plan_budget_bytes": self.budget, "plan_instances": self.instances,
                "plan_images": self.images, "plan_visits": self.visits, "plan_passes": self.passes}


def _largest(lo: int, hi: int, fits) -> int:
    """The largest k in [lo, hi] with fits(k) (fits is monotone, fits(lo) holds)."""
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def plan_cache(counts: list[tuple[int, int]], cfg: CacheConfig, layout: RecordLayout, proposals: int, visits: int = 0) -> CachePlan:
    """The cache of ``counts`` under ``cfg`` and the budget ``cfg.max_gb``: how many RoIs it keeps so that it surely fits.

    ``proposals``: RPN proposals per image; ``layout``: the record of one RoI. detectron sampling
    keeps the most foreground RoIs per image copy (up to the official cap, or ``cache.fg_per_image``
    when set) whose bound fits; instance sampling the most proposals per instance (up to
    ``cache.proposals_per_instance``). Raises MaskxError naming ``cache.max_gb`` and the least size
    when the budget cannot hold one RoI per set-A instance, and naming ``cache.fg_per_image`` when a
    cap set by hand cannot fit.
    """
    per = layout.disk_bytes
    instances = sum(m for m, _ in counts)
    images = sum(1 for m, _ in counts if m)
    budget = int(cfg.max_gb * 1e9)
    room = budget - DESCRIPTION_RESERVE
    if budget and instances * per > room:
        raise MaskxError(f"cache.max_gb={cfg.max_gb:g} is too small for this cache: it needs at least "
                         f"{format_size(instances * per + DESCRIPTION_RESERVE)} (one RoI per set-A instance: {instances} x "
                         f"{per} bytes and its description)", key="cache.max_gb")
    fits = lambda c: estimate_rows(counts, c, proposals) * per <= room  # noqa: E731
    if cfg.sampling == "detectron":
        top = kept_per_image(cfg)
        k = _largest(1, top, lambda k: fits(dataclasses.replace(cfg, fg_per_image=k))) if budget and not cfg.fg_per_image else top
        eff = dataclasses.replace(cfg, fg_per_image=k)
    else:
        p = _largest(0, cfg.proposals_per_instance, lambda p: fits(dataclasses.replace(cfg, proposals_per_instance=p)))
        eff = dataclasses.replace(cfg, proposals_per_instance=p if budget else cfg.proposals_per_instance)
    rows = estimate_rows(counts, eff, proposals)
    if budget and rows * per > room:
        raise MaskxError(f"cache.fg_per_image={cfg.fg_per_image} needs up to {format_size(rows * per)} on disk, over "
                         f"cache.max_gb={cfg.max_gb:g}: lower cache.fg_per_image (0: as many as the budget holds) or raise "
                         f"cache.max_gb (0: no budget)", key="cache.fg_per_image")
    return CachePlan(eff, instances, images, rows, minimum_rows(counts, eff), per, budget if budget > 0 else 0, visits)


def check_room(least: int, most: int, free: int, folder) -> str | None:
    """Refuse (MaskxError naming ``folder`` and the knobs) when ``free`` bytes cannot hold ``least``;
    the warning to print when they may not hold ``most``, else None."""
    if least > free:
        at_least = "up to" if least == most else "at least"
        raise MaskxError(f"feature cache needs {at_least} {format_size(least)} but only {format_size(free)} is free "
                         f"(lower cache.max_gb, cache.proposals_per_instance or cache.rois_per_image, set cache.classes=train, "
                         f"data.hflip=false or cache.dtype=int8)", folder)
    if most > free:
        # how many proposals reach the IoU threshold is known only while building; a disk that fills
        # stops the build with one line and leaves no cache behind
        return (f"the cache may not fit: at least {format_size(least)}, at most {format_size(most)}, {format_size(free)} free; "
                f"a full disk stops the build with one error line and leaves nothing behind (lower cache.max_gb to be sure)")
    return None

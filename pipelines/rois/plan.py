"""Size arithmetic of a feature cache: how many RoIs it can hold, before anything is built.

``counts`` is, per image (and flipped copy), (instances the set-A rule keeps, all instances), as
:func:`pipelines.rois.instances.instance_counts` gives them.
"""

from __future__ import annotations

from pipelines.config import CacheConfig
from pipelines.errors import MaskxError
from pipelines.io import format_size
from pipelines.rois.sampling import fg_per_image
from pipelines.rois.store import layout_of


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


def describe_build(instances: int, rows: int, per_row: int, cfg: CacheConfig, copies: int) -> str:
    """The line printed before a build: what is cached and how large it can get."""
    what = (f"GT box + up to {cfg.proposals_per_instance} proposals per instance" if cfg.sampling == "instance"
            else f"up to {fg_per_image(cfg.rois_per_image, cfg.fg_fraction)} foreground RoIs per image (detectron sampling)")
    flips = " (images and their flipped copies)" if copies == 2 else ""
    return f"{instances} instances{flips}, {what}: up to {rows} RoIs x {per_row} bytes = {format_size(rows * per_row)}"


def check_room(least: int, most: int, free: int, folder) -> str | None:
    """Refuse (MaskxError naming ``folder`` and the knobs) when ``free`` bytes cannot hold ``least``;
    the warning to print when they may not hold ``most``, else None."""
    if least > free:
        at_least = "up to" if least == most else "at least"
        raise MaskxError(f"feature cache needs {at_least} {format_size(least)} but only {format_size(free)} is free "
                         f"(lower cache.proposals_per_instance or cache.rois_per_image, set cache.classes=train, "
                         f"data.hflip=false or cache.dtype=float16)", folder)
    if most > free:
        # detectron sampling: how many proposals reach the IoU threshold is known only while building;
        # a disk that fills stops the build with one line and leaves no cache behind
        return (f"the cache may not fit: at least {format_size(least)}, at most {format_size(most)}, {format_size(free)} free; "
                f"a full disk stops the build with one error line and leaves nothing behind")
    return None


def disk_row_bytes(channels: int, roi_size: int, dtype: str) -> int:
    """Bytes of one RoI on disk: its record, its label and its metadata (:attr:`RecordLayout.disk_bytes`)."""
    return layout_of(channels, roi_size, dtype).disk_bytes

"""Export the frozen per-class detection weights (``w_cls``, ``w_box``) to HDF5, with provenance.

Schema (see docs/embeddings.md): datasets ``w_cls`` float32[K, D], ``w_box`` float32[K, 4D],
``b_cls`` float32[K], ``b_box`` float32[K, 4], ``class_ids`` int64[K], ``class_names`` str[K],
``coco_ids`` int64[K] (-1: not a COCO class), ``set_a`` bool[K]; attributes ``format``,
``version``, ``detector_sha256``, ``detector_checkpoint``, ``mask_classes``, ``config`` (YAML),
``created``, ``maskx_version``, ``torch_version``.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
import yaml

from pipelines import __version__
from pipelines.data.splits import coco_id_of, resolve_split
from pipelines.errors import MaskxError
from pipelines.io import hdf5_file
from pipelines.modeling.detector import detection_weights
from pipelines.stages.common import DetectorRun, load_detector_run

FORMAT = "maskx-embeddings"
VERSION = 1


@dataclass
class Embeddings:
    """The contents of an embeddings file. Row k is category ``class_ids[k]`` (label k+1)."""

    w_cls: torch.Tensor  # [K, D]
    w_box: torch.Tensor  # [K, 4D]
    b_cls: torch.Tensor  # [K]
    b_box: torch.Tensor  # [K, 4]
    class_ids: list[int]
    class_names: list[str]
    coco_ids: list[int | None]
    set_a: list[bool]
    detector_sha256: str
    mask_classes: str
    path: Path | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_ids)


@dataclass
class ExportResult:
    path: Path
    num_classes: int
    dim_cls: int
    dim_box: int
    set_a: int


def export_embeddings(run: str | Path, out: str | Path, mask_classes: str | None = None) -> ExportResult:
    """Write the detector's class weights to ``out`` (HDF5). ``mask_classes`` defaults to the run's."""
    det = load_detector_run(run)
    spec = mask_classes or det.config.get("data", {}).get("mask_classes", "voc")
    set_a_ids = set(resolve_split(spec, det.categories))
    w_cls, w_box, b_cls, b_box = (t.detach().float().cpu().numpy() for t in detection_weights(det.model.roi_heads.box_predictor))
    cats = det.categories
    with hdf5_file(out) as f:
        f.create_dataset("w_cls", data=w_cls)
        f.create_dataset("w_box", data=w_box)
        f.create_dataset("b_cls", data=b_cls)
        f.create_dataset("b_box", data=b_box)
        f.create_dataset("class_ids", data=np.array([c["id"] for c in cats], np.int64))
        f.create_dataset("class_names", data=np.array([c["name"] for c in cats], dtype=h5py.string_dtype()))
        f.create_dataset("coco_ids", data=np.array([-1 if coco_id_of(c) is None else coco_id_of(c) for c in cats], np.int64))
        f.create_dataset("set_a", data=np.array([c["id"] in set_a_ids for c in cats], bool))
        f.attrs.update({
            "format": FORMAT,
            "version": VERSION,
            "detector_sha256": det.sha256,
            "detector_checkpoint": str(det.checkpoint),
            "mask_classes": spec,
            "config": yaml.safe_dump(det.config, sort_keys=False),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "maskx_version": __version__,
            "torch_version": str(torch.__version__),
        })
    return ExportResult(Path(out), len(cats), w_cls.shape[1], w_box.shape[1], len(set_a_ids))


# The datasets of the file (docs/embeddings.md): dtype kind ("f" float, "i" integer, "b" bool, "S"
# string) and shape, in terms of K (classes) and D (the box head's width).
DATASETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "w_cls": ("f", ("K", "D")),
    "w_box": ("f", ("K", "4D")),
    "b_cls": ("f", ("K",)),
    "b_box": ("f", ("K", "4")),
    "class_ids": ("i", ("K",)),
    "class_names": ("S", ("K",)),
    "coco_ids": ("i", ("K",)),
    "set_a": ("b", ("K",)),
}
_KINDS = {"f": "float", "i": "integer", "b": "bool", "S": "string"}


def _check_datasets(f: h5py.File, path: Path) -> None:
    """Every dataset of :data:`DATASETS` present, of its dtype and of a shape consistent with the others."""
    for name in DATASETS:
        if name not in f or not isinstance(f[name], h5py.Dataset):
            raise MaskxError(f"embeddings file has no '{name}' dataset", path)
    k = f["class_ids"].shape[0] if f["class_ids"].ndim == 1 else None
    d = f["w_cls"].shape[1] if f["w_cls"].ndim == 2 else None
    sizes = {"K": k, "D": d, "4D": None if d is None else 4 * d, "4": 4}
    for name, (kind, dims) in DATASETS.items():
        ds = f[name]
        dt = ds.dtype
        actual = "S" if h5py.check_string_dtype(dt) is not None or dt.kind in "SUO" else ("i" if dt.kind in "iu" else dt.kind)
        if actual != kind:
            raise MaskxError(f"embeddings dataset '{name}' is {dt}, expected {_KINDS[kind]} (docs/embeddings.md)", path)
        want = tuple(sizes[s] for s in dims)
        if ds.shape != want:
            spec = " × ".join(f"{s}={sizes[s]}" if s != "4" and sizes[s] is not None else s for s in dims)
            raise MaskxError(f"embeddings dataset '{name}' has shape {list(ds.shape)}, expected [{spec}] "
                             f"(K from class_ids, D from w_cls; docs/embeddings.md)", path)


def read_embeddings(path: str | Path) -> Embeddings:
    """Read and check an embeddings file written by :func:`export_embeddings`.

    Every dataset is checked against the schema (:data:`DATASETS`, docs/embeddings.md): one
    MaskxError naming the file and the dataset for a missing one, a wrong dtype or a shape that
    does not agree with ``class_ids`` (K) and ``w_cls`` (D).
    """
    path = Path(path)
    if not path.is_file():
        raise MaskxError("embeddings file not found", path)
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != FORMAT:
                raise MaskxError("not a maskx embeddings file (no 'format' attribute)", path)
            if int(f.attrs.get("version", -1)) != VERSION:
                raise MaskxError(f"embeddings format version {f.attrs.get('version')} is not supported (expected {VERSION})", path)
            for attr in ("detector_sha256", "mask_classes"):
                if attr not in f.attrs:
                    raise MaskxError(f"embeddings file has no '{attr}' attribute", path)
            _check_datasets(f, path)
            coco = f["coco_ids"][()].tolist()
            return Embeddings(
                w_cls=torch.from_numpy(f["w_cls"][()].astype(np.float32)),
                w_box=torch.from_numpy(f["w_box"][()].astype(np.float32)),
                b_cls=torch.from_numpy(f["b_cls"][()].astype(np.float32)),
                b_box=torch.from_numpy(f["b_box"][()].astype(np.float32)),
                class_ids=f["class_ids"][()].tolist(),
                class_names=[n.decode() if isinstance(n, bytes) else str(n) for n in f["class_names"][()]],
                coco_ids=[None if c < 0 else c for c in coco],
                set_a=f["set_a"][()].astype(bool).tolist(),
                detector_sha256=str(f.attrs["detector_sha256"]),
                mask_classes=str(f.attrs["mask_classes"]),
                path=path,
            )
    except MaskxError:
        raise
    except (OSError, KeyError) as exc:
        raise MaskxError(f"embeddings file cannot be read (truncated or corrupt? {exc})", path) from None


def check_embeddings_fit(emb: Embeddings, det: DetectorRun) -> None:
    """Raise unless ``emb`` was exported from ``det``: its hash, its class list, its box head's width D."""
    path = emb.path
    if emb.detector_sha256 != det.sha256:
        raise MaskxError(f"embeddings were exported from another detector (checkpoint sha256 {emb.detector_sha256[:12]}…, "
                         f"this detector's is {det.sha256[:12]}…): run 'maskx export-embeddings' on it", path)
    if emb.class_ids != [c["id"] for c in det.categories]:
        raise MaskxError("the embeddings' class list does not match the detector's", path)
    width = det.model.roi_heads.box_predictor.cls_score.in_features
    if emb.w_cls.shape[1] != width:
        raise MaskxError(f"embeddings dataset 'w_cls' is {emb.w_cls.shape[1]} wide but the detector's box head is "
                         f"{width} wide: not exported from this detector", path)

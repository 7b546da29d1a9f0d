"""Class embedding tables, the input of T: detector weights, GloVe vectors or fixed random vectors.

:func:`class_embedding_table` builds ``w_det`` for every route (stage 2 from an embeddings file, end
to end from the live box predictor). The embeddings file (HDF5, ``maskx export-embeddings``) is
written by :func:`write_embeddings` and read by :func:`read_embeddings`; schema (see
``docs/embeddings.md``): datasets ``w_cls`` float32[K, D], ``w_box`` float32[K, 4D], ``b_cls``
float32[K], ``b_box`` float32[K, 4], ``class_ids`` int64[K], ``class_names`` str[K], ``coco_ids``
int64[K] (-1: not a COCO class), ``set_a`` bool[K]; attributes ``format``, ``version``,
``detector_sha256``, ``detector_checkpoint``, ``mask_classes``, ``config`` (YAML), ``created``,
``maskx_version``, ``torch_version``.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
import yaml
from torch.nn import functional as F

from pipelines import __version__
from pipelines.config import HeadConfig
from pipelines.errors import MaskxError
from pipelines.io import hdf5_file
from pipelines.modeling.mask_heads import uses_transfer

INPUTS = ("randn", "glove", "cls", "box", "cls+box")
FORMAT = "maskx-embeddings"
VERSION = 1


def detector_embedding(kind: str, w_cls: torch.Tensor, w_box: torch.Tensor) -> torch.Tensor:
    """``w_det`` [K, E] from ``w_cls`` [K, D] and ``w_box`` [K, 4D]: cls (E=D), box (4D), cls+box (5D)."""
    if kind == "cls":
        return w_cls
    if kind == "box":
        return w_box
    if kind == "cls+box":
        return torch.cat([w_cls, w_box], dim=1)
    raise MaskxError(f"'{kind}' is not a detector-weight input (expected cls | box | cls+box)")


def randn_embedding(num_classes: int, dim: int, seed: int) -> torch.Tensor:
    """A fixed random Gaussian vector per class, ``[K, dim]``, the same for the same seed."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(num_classes, dim, generator=g)


class UnitRandn:
    """The original code's form of Table 3.1's ``randn`` input: one fixed 300-d vector per class (the file
    ``fixed_embedding_mat_coco_randn_0.npy``, 80 x 300, read by ``add_embeddings_to_weights.py``); here
    each row drawn N(0, I) and L2-normalised (that file's rows have norms 0.68-1.08, mean 0.94)."""

    dim = 300

    def table(self, num_classes: int, box_width: int, seed: int) -> torch.Tensor:
        """``[K, 300]``, every row of norm 1; ``box_width`` (D) is not used."""
        return F.normalize(randn_embedding(num_classes, self.dim, seed), dim=1)


class GaussianRandn:
    """maskx's earlier form: N(0, 1) entries, as wide as the detector's cls+box input (5D)."""

    def table(self, num_classes: int, box_width: int, seed: int) -> torch.Tensor:
        """``[K, 5D]`` for the box head's width D."""
        return randn_embedding(num_classes, 5 * box_width, seed)


RANDN_FORMS = {"unit": UnitRandn(), "gaussian": GaussianRandn()}


def read_glove(path: str | Path, words: set[str]) -> dict[str, np.ndarray]:
    """The vectors of ``words`` from a GloVe text file (``word v1 v2 ...`` per line)."""
    path = Path(path)
    if not path.is_file():
        raise MaskxError("GloVe file not found", path)
    found: dict[str, np.ndarray] = {}
    dim = None
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            word, _, rest = line.rstrip("\n").partition(" ")
            if dim is None:
                dim = len(rest.split())
                if dim < 2:
                    raise MaskxError(f"line {lineno} is not 'word v1 v2 ...': not a GloVe text file", path)
            if word in words:
                vec = np.asarray(rest.split(), dtype=np.float32)
                if vec.shape[0] != dim:
                    raise MaskxError(f"line {lineno} has {vec.shape[0]} values, expected {dim}", path)
                found[word] = vec
    if dim is None:
        raise MaskxError("GloVe file is empty", path)
    return found


def glove_embedding(names: list[str], path: str | Path, max_missing_fraction: float = 0.5) -> tuple[torch.Tensor, list[str]]:
    """GloVe vectors per class name ``[K, 300]``: multi-word names averaged over their words.

    Returns the table and the class names none of whose words were found (those rows are zero).
    Raises MaskxError when more than ``max_missing_fraction`` of the classes have no vector.
    """
    tokens = [n.lower().replace("_", " ").replace("-", " ").split(".")[0].split() for n in names]
    vocab = read_glove(path, {w for t in tokens for w in t})
    if not vocab:
        raise MaskxError(f"none of the {len(names)} class names has a vector in this GloVe file", path)
    dim = len(next(iter(vocab.values())))
    table = np.zeros((len(names), dim), np.float32)
    missing = []
    for i, words in enumerate(tokens):
        vecs = [vocab[w] for w in words if w in vocab]
        if vecs:
            table[i] = np.mean(vecs, axis=0)
        else:
            missing.append(names[i])
    if len(missing) > max_missing_fraction * len(names):
        raise MaskxError(
            f"{len(missing)} of {len(names)} class names have no GloVe vector (e.g. '{missing[0]}')", path
        )
    return torch.from_numpy(table), missing


def class_embedding_table(head: HeadConfig, w_cls: torch.Tensor, w_box: torch.Tensor, names: list[str],
                          seed: int) -> tuple[torch.Tensor | None, list[str]]:
    """``w_det`` float32 [K, E], the input of T for ``head.input``, and the class names GloVe lacks.

    ``w_cls`` [K, D] and ``w_box`` [K, 4D] are the detector's class weights (from an embeddings file,
    or the live box predictor end to end); ``cls`` / ``box`` / ``cls+box`` take them (E = D, 4D, 5D),
    ``randn`` draws fixed vectors from ``seed`` in the form ``head.randn`` (:data:`RANDN_FORMS`: ``unit``
    E = 300, rows of norm 1; ``gaussian`` E = 5D, N(0, 1)), ``glove`` averages ``head.glove``'s vectors
    of each of ``names`` (E = 300). None for a head without T (agnostic, oracle).
    """
    if not uses_transfer(head.head):
        return None, []
    if head.input in ("cls", "box", "cls+box"):
        return detector_embedding(head.input, w_cls, w_box).detach().float(), []
    if head.input == "randn":
        return RANDN_FORMS[head.randn].table(len(names), w_cls.shape[1], seed), []
    return glove_embedding(names, head.glove)


# --------------------------------------------------------------------------------------------
# The embeddings file
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


def write_embeddings(path: str | Path, weights: tuple[np.ndarray, ...], categories: list[dict], coco_ids: list[int | None],
                     set_a_ids: set[int], provenance: dict) -> None:
    """Write ``(w_cls, w_box, b_cls, b_box)`` float32 arrays and the class table atomically to ``path``.

    ``provenance``: ``detector_sha256``, ``detector_checkpoint``, ``mask_classes``, ``config`` (dict).
    """
    w_cls, w_box, b_cls, b_box = weights
    with hdf5_file(path) as f:
        f.create_dataset("w_cls", data=w_cls)
        f.create_dataset("w_box", data=w_box)
        f.create_dataset("b_cls", data=b_cls)
        f.create_dataset("b_box", data=b_box)
        f.create_dataset("class_ids", data=np.array([c["id"] for c in categories], np.int64))
        f.create_dataset("class_names", data=np.array([c["name"] for c in categories], dtype=h5py.string_dtype()))
        f.create_dataset("coco_ids", data=np.array([-1 if c is None else c for c in coco_ids], np.int64))
        f.create_dataset("set_a", data=np.array([c["id"] in set_a_ids for c in categories], bool))
        f.attrs.update({
            "format": FORMAT,
            "version": VERSION,
            "detector_sha256": provenance["detector_sha256"],
            "detector_checkpoint": str(provenance["detector_checkpoint"]),
            "mask_classes": provenance["mask_classes"],
            "config": yaml.safe_dump(provenance["config"], sort_keys=False),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "maskx_version": __version__,
            "torch_version": str(torch.__version__),
        })


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


def _finite(f, name: str, path: Path) -> torch.Tensor:
    """Dataset ``name`` as float32, refused (naming the file, the dataset and the first class row) if
    it holds NaN or an infinity: T would turn it into non-finite mask weights and a loss of NaN."""
    values = f[name][()].astype(np.float32)
    bad = ~np.isfinite(values)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise MaskxError(f"embeddings dataset '{name}' holds {int(bad.sum())} non-finite value(s) (NaN or infinity; first in "
                         f"row {row}, class id {int(f['class_ids'][row])}): the file is damaged, or exported from a detector "
                         "whose training diverged", path)
    return torch.from_numpy(values)


def read_embeddings(path: str | Path) -> Embeddings:
    """Read and check an embeddings file written by :func:`write_embeddings`.

    Every dataset is checked against the schema (:data:`DATASETS`, docs/embeddings.md): one
    MaskxError naming the file and the dataset for a missing one, a wrong dtype, a shape that
    does not agree with ``class_ids`` (K) and ``w_cls`` (D), or NaN or infinite weights.
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
            weights = {name: _finite(f, name, path) for name in ("w_cls", "w_box", "b_cls", "b_box")}
            return Embeddings(
                **weights,
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

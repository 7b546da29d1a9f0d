"""Class embedding tables, the input of T: detector weights, GloVe vectors or fixed random vectors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipelines.errors import MaskxError

INPUTS = ("randn", "glove", "cls", "box", "cls+box")


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

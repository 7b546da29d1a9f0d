"""Deterministic, resumable batch order: iteration i always sees the same images.

The index stream is the concatenation of per-epoch permutations drawn from ``seed + epoch``;
iteration ``i`` takes positions ``[i*B, (i+1)*B)`` of it. Under ``torchrun`` each of the W
processes takes every W-th index of that global batch, so a resumed or re-sharded run sees the
same images in the same order.
"""

from __future__ import annotations

import torch


class IterationBatches:
    """Yields lists of dataset indices, one list per iteration, from ``start_iter`` to ``iterations``."""

    def __init__(self, size: int, batch_size: int, iterations: int, seed: int, start_iter: int = 0, rank: int = 0, world_size: int = 1):
        if size <= 0:
            raise ValueError("empty dataset")
        self.size, self.batch_size, self.iterations = size, batch_size, iterations
        self.seed, self.start_iter, self.rank, self.world_size = seed, start_iter, rank, world_size
        self._epoch = -1
        self._perm: list[int] = []

    def _index(self, pos: int) -> int:
        epoch, offset = divmod(pos, self.size)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            self._perm = torch.randperm(self.size, generator=g).tolist()
            self._epoch = epoch
        return self._perm[offset]

    def batch(self, iteration: int) -> list[int]:
        start = iteration * self.batch_size
        full = [self._index(p) for p in range(start, start + self.batch_size)]
        return full[self.rank :: self.world_size]

    def __len__(self) -> int:
        return self.iterations - self.start_iter

    def __iter__(self):
        for it in range(self.start_iter, self.iterations):
            yield self.batch(it)

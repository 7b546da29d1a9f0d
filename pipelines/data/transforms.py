"""Horizontal flips of training images, as Detectron's ``TRAIN.USE_FLIPPED`` does them.

The official code (Detectron) appends a horizontally flipped copy of every training image to the
training set, so each epoch sees every image once as it is and once mirrored. :class:`FlippedCopies`
does the same for any dataset of ``(image, target)`` pairs in torchvision's detection format: index
``i < N`` is image ``i`` as it is, index ``N + i`` is image ``i`` flipped. Whether an item is
flipped is a function of its index alone, so the deterministic, resumable batch order of
:class:`pipelines.engine.sampler.IterationBatches` stays deterministic and resumable, also with
DataLoader workers.
"""

from __future__ import annotations

import torch


def hflip_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """Boxes ``float[N, 4]`` (x1, y1, x2, y2, pixels) of an image ``width`` pixels wide, mirrored."""
    out = boxes.clone()
    out[:, 0] = width - boxes[:, 2]
    out[:, 2] = width - boxes[:, 0]
    return out


def hflip(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
    """Mirror an image ``[C, H, W]`` and its target (``boxes`` [N, 4], ``masks`` [N, H, W] if present).

    Other target fields (``labels``, ``image_id``, ``has_mask``, ...) are kept; the target gets
    ``flipped = True``. Flipping twice gives back the original image, boxes and masks exactly.
    """
    width = image.shape[-1]
    out = dict(target)
    out["boxes"] = hflip_boxes(target["boxes"], width)
    if "masks" in target:
        out["masks"] = target["masks"].flip(-1)
    out["flipped"] = True
    return image.flip(-1), out


class FlippedCopies(torch.utils.data.Dataset):
    """``dataset`` followed by its horizontally flipped copy: ``len = 2 * len(dataset)``.

    ``self[i]`` is ``dataset[i]`` for ``i < N`` and ``hflip(*dataset[i - N])`` for ``N <= i < 2N``.
    ``source(i)`` gives ``(index into dataset, flipped)``.
    """

    def __init__(self, dataset: torch.utils.data.Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return 2 * len(self.dataset)

    def source(self, index: int) -> tuple[int, bool]:
        n = len(self.dataset)
        if not 0 <= index < 2 * n:
            raise IndexError(f"index {index} outside 0..{2 * n - 1}")
        return index % n, index >= n

    def __getitem__(self, index: int):
        i, flipped = self.source(index)
        image, target = self.dataset[i]
        return hflip(image, target) if flipped else (image, target)


def training_images(dataset: torch.utils.data.Dataset, hflip: bool) -> torch.utils.data.Dataset:
    """The images a training stage iterates over: ``FlippedCopies(dataset)`` with ``hflip`` (``data.hflip``), else ``dataset``."""
    return FlippedCopies(dataset) if hflip else dataset

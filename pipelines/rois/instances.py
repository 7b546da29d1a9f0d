"""Which instances a feature cache holds RoIs of: the set-A rule applied to the training images."""

from __future__ import annotations

import numpy as np
import torch

from pipelines.config import DataConfig
from pipelines.data.annotations import has_usable_mask
from pipelines.data.coco import CocoDataset
from pipelines.data.splits import label_table, takes_mask_loss
from pipelines.data.transforms import FlippedCopies


def flip_source(dataset) -> tuple[CocoDataset, int]:
    """(the CocoDataset under ``dataset``, 2 for FlippedCopies else 1)."""
    return (dataset.dataset, 2) if isinstance(dataset, FlippedCopies) else (dataset, 1)


def masked_instances(dataset: CocoDataset, mask_labels: torch.Tensor | None = None) -> list[tuple[int, int]]:
    """(image index, annotation index) of each instance of ``dataset`` the set-A rule keeps
    (:func:`takes_mask_loss`: a class of ``mask_labels``, bool ``[K + 1]``, default the dataset's mask
    classes, and a mask annotation), in dataset order."""
    if mask_labels is None:
        mask_labels = label_table(dataset.mask_cats, dataset.data["categories"])
    every = [(i, j, a) for i, im in enumerate(dataset.images) for j, a in enumerate(dataset.anns_by_image.get(im["id"], []))]
    if not every:
        return []
    labels = torch.tensor([dataset.label_of[a["category_id"]] for _, _, a in every], dtype=torch.int64)
    has_mask = torch.tensor([has_usable_mask(a) for _, _, a in every], dtype=torch.bool)
    kept = takes_mask_loss(labels, mask_labels, has_mask).tolist()
    return [(i, j) for (i, j, _), k in zip(every, kept) if k]


def instance_counts(dataset) -> list[tuple[int, int]]:
    """Per image of ``dataset`` (flipped copies included): (instances the set-A rule keeps, all instances)."""
    base, copies = flip_source(dataset)
    kept = np.bincount(np.array([i for i, _ in masked_instances(base)], np.int64), minlength=len(base.images))
    return [(int(kept[i]), len(base.anns_by_image.get(im["id"], []))) for i, im in enumerate(base.images)] * copies


def cache_dataset(data: dict, data_cfg: DataConfig, class_ids: list[int] | None = None):
    """The cache's input: training images with an instance of ``class_ids`` (every class if None) that
    the set-A rule keeps, masks of those classes; with ``data.hflip`` followed by their flipped copies
    (:class:`FlippedCopies`)."""
    ids = [c["id"] for c in data["categories"]] if class_ids is None else list(class_ids)
    full = CocoDataset(data, data_cfg.train_images, with_masks=True, mask_category_ids=ids, max_images=data_cfg.max_train_images)
    keep = {i for i, _ in masked_instances(full)}
    full.images = [im for i, im in enumerate(full.images) if i in keep]
    return FlippedCopies(full) if data_cfg.hflip else full

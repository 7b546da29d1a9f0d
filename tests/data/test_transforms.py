"""Horizontal flips: exact round trips of image, boxes and masks; flipped copies after the originals."""

from __future__ import annotations

import torch

from pipelines.data.transforms import FlippedCopies, hflip, hflip_boxes


def _sample(h: int = 6, w: int = 10):
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, h, w, generator=g)
    masks = torch.zeros(2, h, w, dtype=torch.uint8)
    masks[0, 1:3, 0:4] = 1  # columns 0..3
    masks[1, 2:6, 7:10] = 1  # columns 7..9
    target = {"boxes": torch.tensor([[0.0, 1.0, 4.0, 3.0], [7.0, 2.0, 10.0, 6.0]]), "labels": torch.tensor([3, 5]),
              "masks": masks, "image_id": 7}
    return image, target


def test_hflip_boxes_known_values():
    assert hflip_boxes(torch.tensor([[0.0, 1.0, 4.0, 3.0]]), 10).tolist() == [[6.0, 1.0, 10.0, 3.0]]


def test_hflip_moves_masks_with_boxes():
    image, target = _sample()
    fimage, ft = hflip(image, target)
    assert torch.equal(fimage[..., 0], image[..., -1])
    assert ft["boxes"].tolist() == [[6.0, 1.0, 10.0, 3.0], [0.0, 2.0, 3.0, 6.0]]
    for m, b in zip(ft["masks"], ft["boxes"]):  # every flipped mask lies in its flipped box
        cols = torch.where(m.any(0))[0]
        assert cols.min() >= b[0] and cols.max() + 1 <= b[2]
    assert ft["flipped"] is True and ft["labels"].tolist() == [3, 5] and ft["image_id"] == 7
    assert "flipped" not in target  # the input is not modified


def test_hflip_twice_is_identity():
    image, target = _sample()
    back_image, back = hflip(*hflip(image, target))
    assert torch.equal(back_image, image)
    assert torch.equal(back["boxes"], target["boxes"])
    assert torch.equal(back["masks"], target["masks"])


def test_flipped_copies_order():
    items = [_sample() for _ in range(3)]
    ds = FlippedCopies(items)
    assert len(ds) == 6
    assert [ds.source(i) for i in range(6)] == [(0, False), (1, False), (2, False), (0, True), (1, True), (2, True)]
    image, target = ds[4]
    assert torch.equal(image, items[1][0].flip(-1)) and target["flipped"] is True
    assert "flipped" not in ds[1][1]


def test_training_dataset_flips_round_trip(tiny_world):
    """Through the path the training stages read: a flipped copy of a real training image (decoded from
    its file, boxes and masks from its COCO annotations), flipped back, equals the original."""
    from pipelines.data.coco import CocoDataset, load_coco
    from pipelines.data.transforms import training_images

    data, _ = load_coco(tiny_world.train_json, require_masks=True)
    base = CocoDataset(data, tiny_world.train_dir, with_masks=True, mask_category_ids=[1, 2, 3], drop_empty=True)
    assert training_images(base, False) is base
    ds = training_images(base, True)
    n = len(base)
    assert len(ds) == 2 * n
    for i in (0, n // 2, n - 1):
        image, target = base[i]
        fimage, ft = ds[n + i]
        assert ft["flipped"] is True and not torch.equal(fimage, image)
        assert torch.equal(ft["boxes"][:, [1, 3]], target["boxes"][:, [1, 3]])  # rows unchanged
        back_image, back = hflip(fimage, ft)
        assert torch.equal(back_image, image)
        for k in ("boxes", "masks", "labels", "has_mask"):
            assert torch.equal(back[k], target[k]), k
        assert back["image_id"] == target["image_id"]
        assert torch.equal(ds[i][0], image)  # the first half is the data set as it is

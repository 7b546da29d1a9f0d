"""One mask pasted at a time into uint8 gives torchvision's pasted-and-thresholded pixels exactly."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image

from pipelines.modeling.maskx_rcnn import PastedMasks, paste_mask


@pytest.mark.parametrize("threshold", [0.5, 0.3, 0.0])
def test_paste_mask_equals_torchvision_paste_then_threshold(threshold):
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(40, 28, 28, generator=g)
    size = (97, 130)
    xy = torch.rand(40, 2, generator=g) * torch.tensor([125.0, 95.0]) - 10  # some boxes cross the image's edges
    wh = torch.rand(40, 2, generator=g) * 60 + 12  # (a box wholly outside is not pasted right by torchvision)
    boxes = torch.cat([xy, xy + wh], dim=1)
    boxes[0] = torch.tensor([0.0, 0.0, 129.0, 96.0])  # the whole image
    boxes[1] = torch.tensor([50.0, 40.0, 50.3, 40.2])  # under a pixel
    expected = (paste_masks_in_image(probs[:, None], boxes, size)[:, 0] >= threshold).to(torch.uint8)
    for i in range(len(probs)):
        got = paste_mask(probs[i], boxes[i], size, threshold)
        assert got.dtype == torch.uint8 and got.shape == size
        assert torch.equal(got, expected[i]), i
    lazy = PastedMasks(probs, boxes, size, threshold)
    assert len(lazy) == 40
    assert torch.equal(torch.from_numpy(lazy.numpy()), expected)
    assert [m.shape for m in lazy] == [size] * 40

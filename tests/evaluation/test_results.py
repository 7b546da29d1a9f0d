import numpy as np
import pytest
from pycocotools import mask as mask_utils

from pipelines.evaluation import encode_masks, to_coco_results

# pycocotools' decode under numpy 2 warns about __array__(copy=...); not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.mark.parametrize("dtype", [np.bool_, np.uint8])
def test_encode_masks_round_trip(dtype):
    rng = np.random.default_rng(0)
    masks = (rng.random((5, 37, 53)) < 0.3).astype(dtype)
    rles = encode_masks(masks)
    assert len(rles) == 5
    for m, rle in zip(masks, rles):
        assert isinstance(rle["counts"], str)
        assert rle["size"] == [37, 53]
        np.testing.assert_array_equal(mask_utils.decode(rle), m.astype(np.uint8))


def test_encode_masks_empty_and_bad_input():
    assert encode_masks(np.zeros((0, 10, 10), np.uint8)) == []
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        encode_masks(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match="binary"):
        encode_masks(np.zeros((1, 10, 10), np.float32))


def test_to_coco_results_round_trip():
    masks = np.zeros((2, 20, 30), np.uint8)
    masks[0, 2:5, 3:9] = 1
    masks[1, 10:20, 0:30] = 1
    boxes = np.array([[3.0, 2.0, 9.0, 5.0], [0.5, 10.25, 30.0, 20.0]], np.float32)
    out = to_coco_results(7, boxes, np.array([0.9, 0.25], np.float32), np.array([18, 3]), masks)
    assert [r["image_id"] for r in out] == [7, 7]
    assert [r["category_id"] for r in out] == [18, 3]
    assert [r["score"] for r in out] == [pytest.approx(0.9), 0.25]
    assert out[0]["bbox"] == [3.0, 2.0, 6.0, 3.0]
    assert out[1]["bbox"] == [0.5, 10.25, 29.5, 9.75]
    for r in out:
        assert all(type(v) is float for v in r["bbox"]) and type(r["score"]) is float and type(r["category_id"]) is int
    for m, r in zip(masks, out):
        np.testing.assert_array_equal(mask_utils.decode(r["segmentation"]), m)
    # the mask's own box agrees with the given box for whole-pixel boxes
    assert list(mask_utils.toBbox(out[0]["segmentation"])) == out[0]["bbox"]


def test_to_coco_results_without_masks_and_mismatched_lengths():
    out = to_coco_results(1, np.zeros((0, 4)), np.zeros(0), np.zeros(0, int), None)
    assert out == []
    out = to_coco_results(1, np.array([[1, 2, 3, 4]]), np.array([1.0]), np.array([5]), None)
    assert out == [{"image_id": 1, "category_id": 5, "score": 1.0, "bbox": [1.0, 2.0, 2.0, 2.0]}]
    with pytest.raises(ValueError, match="scores"):
        to_coco_results(1, np.zeros((2, 4)), np.zeros(1), np.zeros(2, int), None)
    with pytest.raises(ValueError, match="masks"):
        to_coco_results(1, np.zeros((2, 4)), np.zeros(2), np.zeros(2, int), np.zeros((1, 4, 4), np.uint8))

"""data.hflip reaches the image-level training stages: detect-train and end-to-end train read flipped copies."""

from __future__ import annotations

import pytest
import torch

from pipelines.config import DetectTrainConfig, TrainE2EConfig, load_config
from pipelines.data.coco import CocoDataset
from pipelines.data.transforms import FlippedCopies
from tests.conftest import tiny_overrides


class Captured(Exception):
    pass


def capture_dataset(monkeypatch, module) -> dict:
    seen: dict = {}

    def fake_train_on_images(model, dataset, *args, **kwargs):
        seen["dataset"] = dataset
        raise Captured

    monkeypatch.setattr(module, "train_on_images", fake_train_on_images)
    return seen


@pytest.mark.parametrize("hflip", [True, False])
def test_detect_train_reads_flipped_copies(tiny_world, tmp_path, monkeypatch, hflip):
    import pipelines.stages.detect_train as stage

    seen = capture_dataset(monkeypatch, stage)
    cfg = load_config(DetectTrainConfig, "synthetic", tiny_overrides(tiny_world) + [f"data.hflip={hflip}"])
    with pytest.raises(Captured):
        stage.detect_train(cfg, tmp_path / "det")
    ds = seen["dataset"]
    if hflip:
        assert isinstance(ds, FlippedCopies) and isinstance(ds.dataset, CocoDataset) and len(ds) == 2 * len(ds.dataset) == 96
        assert ds[48][1]["flipped"] is True and "flipped" not in ds[0][1]
    else:
        assert isinstance(ds, CocoDataset) and len(ds) == 48


@pytest.mark.parametrize("hflip", [True, False])
def test_end_to_end_train_reads_flipped_copies_with_masks(tiny_world, tmp_path, monkeypatch, hflip):
    import pipelines.stages.train_e2e as stage

    seen = capture_dataset(monkeypatch, stage)
    cfg = load_config(TrainE2EConfig, "synthetic", tiny_overrides(tiny_world) + [f"data.hflip={hflip}", "head.mask_dim=8"])
    with pytest.raises(Captured):
        stage.train_e2e(cfg, tmp_path / "e2e")
    ds = seen["dataset"]
    assert len(ds) == (96 if hflip else 48)
    if hflip:
        image, target = ds[48]
        plain_image, plain = ds.dataset[0]
        assert target["flipped"] is True and target["masks"].shape == plain["masks"].shape
        assert torch.equal(target["masks"].flip(-1), plain["masks"]) and torch.equal(target["has_mask"], plain["has_mask"])

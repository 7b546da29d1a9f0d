"""Pieces the stages share: loading a detector run, data for a split, set A / B."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.models.detection import FasterRCNN

from pipelines.config import DetectorConfig, from_dict
from pipelines.data.coco import LoadReport, load_coco
from pipelines.engine.checkpoint import load_checkpoint
from pipelines.errors import MaskxError
from pipelines.io import sha256_file
from pipelines.modeling.detector import detector_from_state

DETECTOR_CKPT = "model_final.pth"
MASK_CKPT = "mask_final.pth"


@dataclass
class DetectorRun:
    run_dir: Path
    checkpoint: Path
    sha256: str
    config: dict
    categories: list[dict]
    model: FasterRCNN


def detector_checkpoint_path(run: str | Path) -> Path:
    run = Path(run)
    if run.is_file():
        return run
    if not run.is_dir():
        raise MaskxError("detector run not found", run)
    path = run / DETECTOR_CKPT
    if not path.is_file():
        raise MaskxError(f"no {DETECTOR_CKPT} here: not a finished detector run (train it with 'maskx detect-train')", run)
    return path


def load_detector_run(run: str | Path) -> DetectorRun:
    """The frozen detector of a ``detect-train`` run folder (or its checkpoint file), in eval mode."""
    path = detector_checkpoint_path(run)
    ckpt = load_checkpoint(path, "detector")
    det_cfg = from_dict(DetectorConfig, ckpt["config"]["detector"])
    model = detector_from_state(det_cfg, len(ckpt["categories"]), ckpt["model"], path)
    model.eval().requires_grad_(False)
    return DetectorRun(path.parent, path, sha256_file(path), ckpt["config"], ckpt["categories"], model)


def load_split(json_path: str, what: str, require_masks: bool = False) -> tuple[dict, LoadReport]:
    if not json_path:
        raise MaskxError(f"no {what} annotation file given (data.{what}_json)")
    data, report = load_coco(json_path, require_masks=require_masks)
    if not data["images"]:
        raise MaskxError(f"the {what} split has no images", json_path)
    return data, report


def label_tensor(category_ids: list[int], categories: list[dict]) -> torch.Tensor:
    """Contiguous labels (1..K, category order) of the given category ids, as int64[N]."""
    index = {c["id"]: i + 1 for i, c in enumerate(categories)}
    return torch.tensor([index[c] for c in category_ids], dtype=torch.int64)

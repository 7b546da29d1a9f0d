"""End-to-end training (paper §2.2, Table 3.4): detector and mask side trained together.

Box losses on every class (A and B), the mask loss on set-A instances only (all classes for the
oracle head), and for the transfer head ``w_seg = T(w_det)`` with ``w_det`` read live from the box
predictor on every step (``cls`` / ``box`` / ``cls+box``), detached unless ``stop_gradient`` is off.

A finished run folder holds two checkpoints so that every other command reads it as is:

- ``model_final.pth``: the detector part, in ``detect-train``'s format (``export-embeddings``,
  ``eval --detector`` and ``mask-train`` accept the folder as a detector run);
- ``mask_final.pth``: the mask side, in ``mask-train``'s format, with ``detector_sha256`` of the
  ``model_final.pth`` written beside it and the class table ``w_det`` frozen at its final value,
  and a manifest naming that detector, so ``maskx eval RUN`` works unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipelines.config import (
    DataConfig,
    DetectorConfig,
    HeadConfig,
    MaskTrainConfig,
    SolverConfig,
    apply_overrides,
    from_dict,
    resolve_config_path,
    to_dict,
)
from pipelines.data.coco import CocoDataset, check_same_categories
from pipelines.data.splits import resolve_split
from pipelines.engine import distributed as dist
from pipelines.engine.checkpoint import load_checkpoint, save_checkpoint
from pipelines.engine.device import resolve_device
from pipelines.engine.loop import TrainStats, seed_everything
from pipelines.engine.run_dir import file_record, prepare_run_dir, training_run, update_manifest
from pipelines.errors import MaskxError
from pipelines.io import read_yaml, sha256_file
from pipelines.modeling.detector import build_detector, detection_weights, detector_from_state
from pipelines.modeling.embeddings import detector_embedding, glove_embedding, randn_embedding
from pipelines.modeling.maskx_rcnn import build_mask_side, build_maskx_rcnn
from pipelines.progress import NULL_PROGRESS, Progress
from pipelines.stages.common import DETECTOR_CKPT, MASK_CKPT, detector_checkpoint_path, load_split
from pipelines.stages.detect_train import train_on_images
from pipelines.stages.mask_train import check_head_config

LIVE_INPUTS = ("cls", "box", "cls+box")


@dataclass
class TrainE2EConfig:
    """Everything end-to-end training reads: data, detector, mask side and one solver for both."""

    data: DataConfig = field(default_factory=DataConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    init_detector: str = ""  # start from a detect-train run's weights (a short e2e fine-tune) instead of scratch


@dataclass
class TrainE2EResult:
    run_dir: Path
    detector_checkpoint: Path
    mask_checkpoint: Path
    head: str
    set_a: list[int]
    train_images: int
    stats: TrainStats
    missing_glove: list[str]
    data_warnings: list[str]  # what loading the annotations skipped, one line each (with the first annotation ids)


def load_e2e_config(recipe: str | Path | None, overrides: list[str] | None = None) -> TrainE2EConfig:
    """The end-to-end config from a recipe and ``key=value`` overrides.

    A recipe's ``train_e2e:`` section is used when present; otherwise ``detector`` and ``solver``
    come from its ``detect_train:`` section (end-to-end training is a detector schedule) and
    ``head`` from its ``mask_train:`` section; the top-level ``data:`` applies to both.
    """
    data: dict = {}
    path = None
    if recipe:
        path = resolve_config_path(recipe)
        loaded = read_yaml(path, "config file") or {}
        if not isinstance(loaded, dict):
            raise MaskxError("config must be a mapping", path)
        if "train_e2e" in loaded:
            data = dict(loaded["train_e2e"] or {})
        else:
            det, mask = loaded.get("detect_train") or {}, loaded.get("mask_train") or {}
            data = {k: v for k, v in (("detector", det.get("detector")), ("solver", det.get("solver")),
                                      ("head", mask.get("head"))) if v is not None}
        data["data"] = {**(loaded.get("data") or {}), **(data.get("data") or {})}
    try:
        return from_dict(TrainE2EConfig, apply_overrides(data, overrides or []))
    except MaskxError as exc:
        if exc.path is None and path is not None:
            raise MaskxError(exc.message, path) from None
        raise


def _check(cfg: TrainE2EConfig) -> None:
    check_head_config(MaskTrainConfig(data=cfg.data, head=cfg.head, solver=cfg.solver))
    if cfg.head.head == "transfer" and cfg.head.input == "glove" and not Path(cfg.head.glove).is_file():
        raise MaskxError("GloVe file not found", cfg.head.glove)


def fixed_embedding_table(cfg: TrainE2EConfig, categories: list[dict]) -> tuple[torch.Tensor | None, list[str]]:
    """``[K, E]`` table for ``randn`` / ``glove`` inputs (None for inputs read live from the detector)."""
    h = cfg.head
    if h.head != "transfer" or h.input in LIVE_INPUTS:
        return None, []
    if h.input == "randn":
        return randn_embedding(len(categories), 5 * cfg.detector.box_representation, cfg.solver.seed), []
    return glove_embedding([c["name"] for c in categories], h.glove)


def live_embed_dim(kind: str, box_representation: int) -> int:
    """Length of ``w_det`` read from a box predictor of width D: cls D, box 4D, cls+box 5D."""
    return {"cls": 1, "box": 4, "cls+box": 5}[kind] * box_representation


def train_e2e(cfg: TrainE2EConfig, out: str | Path, progress: Progress = NULL_PROGRESS, resume: bool = False) -> TrainE2EResult:
    """Train detector + mask side together; write ``out/model_final.pth`` and ``out/mask_final.pth``.

    Every check (head combination, GloVe file and its coverage, class split, data) runs before the
    model is built, so a wrong combination fails in a second, not after training.
    """
    _check(cfg)
    out = Path(out)
    if (out / MASK_CKPT).exists() and not resume:
        raise MaskxError(f"already holds a finished end-to-end run ({MASK_CKPT}); choose another --out", out)
    with training_run(out, resume, (DETECTOR_CKPT, MASK_CKPT)):
        return _train_e2e(cfg, out, progress, resume)


def _train_e2e(cfg: TrainE2EConfig, out: Path, progress: Progress, resume: bool) -> TrainE2EResult:
    data, report = load_split(cfg.data.train_json, "train", require_masks=True)
    categories = data["categories"]
    set_a = resolve_split(cfg.data.mask_classes, categories)
    mask_classes = [c["id"] for c in categories] if cfg.head.head == "oracle" else set_a
    table, missing = fixed_embedding_table(cfg, categories)
    init_state = None
    if cfg.init_detector:
        init_path = detector_checkpoint_path(cfg.init_detector)
        init = load_checkpoint(init_path, "detector")
        check_same_categories(init["categories"], categories, "the initial detector's classes", cfg.data.train_json)
        if from_dict(DetectorConfig, init["config"]["detector"]) != cfg.detector:
            raise MaskxError("the initial detector was built with another detector config than this run's", init_path)
        init_state = init["model"]

    device = resolve_device(cfg.solver.device)
    dist.init_from_env(device)
    device = dist.local_device(device)  # cuda:LOCAL_RANK under torchrun
    seed_everything(cfg.solver.seed + dist.rank())
    dataset = CocoDataset(data, cfg.data.train_images, with_masks=True, mask_category_ids=mask_classes,
                          max_images=cfg.data.max_train_images, drop_empty=True)
    if len(dataset) == 0:
        raise MaskxError("the training split has no image with a box annotation", cfg.data.train_json)

    if init_state is not None:
        detector = detector_from_state(cfg.detector, len(categories), init_state, init_path)
    else:
        detector = build_detector(cfg.detector, len(categories), progress=progress)
    live = cfg.head.head == "transfer" and cfg.head.input in LIVE_INPUTS
    embed_dim = live_embed_dim(cfg.head.input, cfg.detector.box_representation) if live else None
    side = build_mask_side(cfg.head, len(categories), cfg.detector.fpn_channels, table, embed_dim=embed_dim)
    model = build_maskx_rcnn(detector, side, cfg.head.roi_size, cfg.head.input if live else None, cfg.head.stop_gradient).to(device)

    inputs = {"train_json": cfg.data.train_json, **({"init_detector": init_path} if init_state is not None else {})}
    if dist.is_main():
        prepare_run_dir(out, "train-e2e", to_dict(cfg), inputs, extra={"set_a": set_a, "train_classes": len(mask_classes)})
    dist.barrier()
    stats = train_on_images(model, dataset, cfg.solver, out, "train-e2e", {"config": to_dict(cfg), "categories": categories},
                            device, progress, resume, f"train e2e [{cfg.head.head}{'+mlp' if cfg.head.mlp else ''}]",
                            target_keys=("boxes", "labels", "masks", "has_mask"))

    det_path, mask_path = out / DETECTOR_CKPT, out / MASK_CKPT
    if dist.is_main():
        det_config = {"data": to_dict(cfg.data), "detector": to_dict(cfg.detector), "solver": to_dict(cfg.solver)}
        det_state = {k: v for k, v in model.state_dict().items() if not k.startswith("roi_heads.mask_side.")}
        save_checkpoint(det_path, "detector", model=det_state, config=det_config, categories=categories,
                        iteration=cfg.solver.iterations, end_to_end=True)
        if live:  # freeze the final class table into the stand-alone mask side (what eval reads)
            w_cls, w_box, _, _ = detection_weights(model.roi_heads.box_predictor)
            side.predictor.w_det.copy_(detector_embedding(cfg.head.input, w_cls, w_box).detach())
        w_det_dim = embed_dim if live else (int(table.shape[1]) if table is not None else 0)
        mask_cfg = MaskTrainConfig(data=cfg.data, head=cfg.head, solver=cfg.solver)
        save_checkpoint(mask_path, "mask", model=side.state_dict(), config=to_dict(mask_cfg), head=to_dict(cfg.head),
                        categories=categories, set_a=set_a, detector_sha256=sha256_file(det_path), embed_dim=w_det_dim,
                        in_channels=cfg.detector.fpn_channels, iteration=cfg.solver.iterations, end_to_end=True)
        update_manifest(out, status="finished", inputs={**{k: file_record(v) for k, v in inputs.items()}, "detector": file_record(det_path)},
                        train_images=len(dataset), degenerate_boxes_skipped=report.degenerate_boxes,
                        seconds=round(stats.seconds, 1), world_size=dist.world_size(), missing_glove=missing)
    dist.barrier()
    return TrainE2EResult(out, det_path, mask_path, cfg.head.head, set_a, len(dataset), stats, missing,
                          report.warnings(cfg.data.train_json))

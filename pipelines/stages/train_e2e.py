"""End-to-end training (paper §2.2, Table 3.4): detector and mask side trained together.

Box losses on every class (A and B), the mask loss on the RoIs the set-A rule picks (set-A
instances; all classes for the oracle head), and for the transfer head ``w_seg = T(w_det)`` with
``w_det`` read live from the box predictor on every step (``cls`` / ``box`` / ``cls+box``),
detached unless ``stop_gradient`` is off.

A finished run folder holds two checkpoints so that every other command reads it as is:

- ``model_final.pth``: the detector part, in ``detect-train``'s format (``export-embeddings``,
  ``eval --detector`` and ``mask-train`` accept the folder as a detector run);
- ``mask_final.pth``: the mask side, in ``mask-train``'s format, with ``detector_sha256`` of the
  ``model_final.pth`` written beside it and the class table ``w_det`` frozen at its final value,
  and a manifest naming that detector, so ``maskx eval RUN`` works unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipelines.config import MaskTrainConfig, TrainE2EConfig, to_dict
from pipelines.data.coco import CocoDataset, check_same_categories, load_split
from pipelines.data.splits import label_table, training_sets
from pipelines.data.transforms import training_images
from pipelines.engine import distributed as dist
from pipelines.engine.loop import TrainStats, stage_process, train_on_images
from pipelines.engine.run_dir import (DETECTOR_CKPT, MASK_CKPT, check_not_finished, file_record, prepare_run_dir,
                                      read_detector_weights, save_detector, save_mask, training_run, update_manifest)
from pipelines.engine.solver import check_solver
from pipelines.errors import MaskxError
from pipelines.modeling.detector import build_detector, detection_weights, detector_from_state
from pipelines.modeling.embeddings import class_embedding_table, detector_embedding
from pipelines.modeling.mask_heads import trains_every_class, uses_transfer
from pipelines.modeling.maskx_rcnn import build_mask_side, build_maskx_rcnn, check_head
from pipelines.progress import NULL_PROGRESS, Progress

LIVE_INPUTS = ("cls", "box", "cls+box")
MASK_PREFIXES = ("roi_heads.mask_head.", "roi_heads.mask_predictor.")


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
    data_warnings: list[str]  # what loading the annotations skipped or lacks, one line each (with the first annotation ids)
    categories: list[dict]


def _check(cfg: TrainE2EConfig) -> None:
    check_head(cfg.head)
    check_solver(cfg.solver)
    if uses_transfer(cfg.head.head) and cfg.head.input == "glove" and not Path(cfg.head.glove).is_file():
        raise MaskxError("GloVe file not found", cfg.head.glove)


def _initial_detector(cfg: TrainE2EConfig, categories: list[dict]) -> tuple[dict | None, Path | None]:
    """(state dict, checkpoint) of ``cfg.init_detector``, checked against this run's classes and detector config."""
    if not cfg.init_detector:
        return None, None
    init = read_detector_weights(cfg.init_detector)
    check_same_categories(init.categories, categories, "the initial detector's classes", cfg.data.train_json)
    if init.detector != cfg.detector:
        raise MaskxError("the initial detector was built with another detector config than this run's", init.checkpoint)
    return init.state, init.checkpoint


def train_e2e(cfg: TrainE2EConfig, out: str | Path, progress: Progress = NULL_PROGRESS, resume: bool = False) -> TrainE2EResult:
    """Train detector + mask side together; write ``out/model_final.pth`` and ``out/mask_final.pth``.

    Every check (head combination, GloVe file and its coverage, class split, data) runs before the
    run folder is written, so a wrong combination fails in seconds, not after training.
    """
    _check(cfg)
    out = Path(out)
    if not resume:
        check_not_finished(out, MASK_CKPT, "end-to-end run")
    with training_run(out, resume, (DETECTOR_CKPT, MASK_CKPT)), stage_process(cfg.solver, progress) as proc:
        return _train_e2e(cfg, out, proc.progress, resume, proc.device)


def _train_e2e(cfg: TrainE2EConfig, out: Path, progress: Progress, resume: bool, device: torch.device) -> TrainE2EResult:
    data, report = load_split(cfg.data.train_json, "train")
    categories = data["categories"]
    sets = training_sets(cfg.data.mask_classes, trains_every_class(cfg.head.head), categories, data, cfg.data.train_json)
    set_a, train_classes = sets.set_a, sets.train_classes
    init_state, init_path = _initial_detector(cfg, categories)
    dataset = CocoDataset(data, cfg.data.train_images, with_masks=True, mask_category_ids=train_classes,
                          max_images=cfg.data.max_train_images, drop_empty=True)
    if len(dataset) == 0:
        raise MaskxError("the training split has no image with a box annotation", cfg.data.train_json)

    if init_state is not None:
        detector = detector_from_state(cfg.detector, len(categories), init_state, init_path)
    else:
        detector = build_detector(cfg.detector, len(categories), progress=progress)
    w_cls, w_box, _, _ = detection_weights(detector.roi_heads.box_predictor)
    table, missing = class_embedding_table(cfg.head, w_cls, w_box, [c["name"] for c in categories], cfg.solver.seed)
    live = uses_transfer(cfg.head.head) and cfg.head.input in LIVE_INPUTS
    side = build_mask_side(cfg.head, len(categories), cfg.detector.fpn_channels, table)
    model = build_maskx_rcnn(detector, side, cfg.head.roi_size, cfg.head.input if live else None, cfg.head.stop_gradient,
                             mask_labels=label_table(train_classes, categories),
                             mask_targets=cfg.head.e2e_mask_targets).to(device)

    inputs = {"train_json": cfg.data.train_json, **({"init_detector": init_path} if init_path is not None else {})}
    dist.main_first(lambda: prepare_run_dir(out, "train-e2e", to_dict(cfg), inputs, extra={
        "set_a": set_a, "train_classes": len(train_classes), "set_a_unmasked_annotations": len(sets.unmasked)}), others=False)
    stats = train_on_images(model, training_images(dataset, cfg.data.hflip), cfg.solver, out, "train-e2e", {"config": to_dict(cfg), "categories": categories},
                            device, progress, resume, f"train e2e [{cfg.head.head}{'+mlp' if cfg.head.mlp else ''}]",
                            target_keys=("boxes", "labels", "masks", "has_mask"))

    det_path, mask_path = out / DETECTOR_CKPT, out / MASK_CKPT

    def finish() -> None:
        det_config = {"data": to_dict(cfg.data), "detector": to_dict(cfg.detector), "solver": to_dict(cfg.solver)}
        det_state = {k: v for k, v in model.state_dict().items() if not k.startswith(MASK_PREFIXES)}
        det_sha256 = save_detector(det_path, det_state, det_config, categories, cfg.solver.iterations, end_to_end=True)
        if live:  # freeze the final class table into the stand-alone mask side (what eval reads)
            final_cls, final_box, _, _ = detection_weights(model.roi_heads.box_predictor)
            with torch.no_grad():
                side.predictor.w_det.copy_(detector_embedding(cfg.head.input, final_cls, final_box))
        mask_cfg = MaskTrainConfig(data=cfg.data, head=cfg.head, solver=cfg.solver)
        save_mask(mask_path, side, to_dict(mask_cfg), cfg.head, categories, set_a, det_sha256,
                  cfg.detector.fpn_channels, cfg.solver.iterations, end_to_end=True)
        update_manifest(out, status="finished", inputs={**{k: file_record(v) for k, v in inputs.items()}, "detector": file_record(det_path)},
                        train_images=len(dataset), degenerate_boxes_skipped=report.degenerate_boxes,
                        seconds=round(stats.seconds, 1), world_size=dist.world_size(), missing_glove=missing)

    dist.main_first(finish, others=False)  # rank 0 writes; the others wait for it
    return TrainE2EResult(out, det_path, mask_path, cfg.head.head, set_a, len(dataset), stats, missing,
                          report.warnings(cfg.data.train_json) + sets.warnings, categories)

"""A tiny synthetic world and tiny stage configs for the engine and prediction tests (seconds on a CPU)."""

from __future__ import annotations

from pathlib import Path

from pipelines.config import DetectTrainConfig, MaskTrainConfig, load_config
from pipelines.data.synthetic import SynthConfig, generate

DETECTOR = [
    "detector.fpn_channels=16", "detector.box_representation=64", "detector.min_size=64", "detector.max_size=64",
    "detector.anchor_sizes=[8,16,32,64,128]", "detector.rpn_pre_nms_top_n_train=100", "detector.rpn_post_nms_top_n_train=50",
    "detector.rpn_pre_nms_top_n_test=50", "detector.rpn_post_nms_top_n_test=20", "detector.box_batch_size_per_image=16",
    "detector.rpn_batch_size_per_image=32", "detector.box_detections_per_img=10",
    "solver.batch_size=4", "solver.reference_batch_size=8", "solver.warmup_iters=2", "solver.log_every=1",
    "solver.workers=0", "solver.device=cpu",
]
HEAD = [
    "head.mask_dim=16", "head.num_convs=1", "head.mlp_hidden=32", "head.mlp_input_size=7", "head.transfer_hidden=32",
    "head.roi_size=7", "solver.batch_size=16", "solver.reference_batch_size=16", "solver.warmup_iters=2",
    "solver.log_every=1", "solver.workers=0", "solver.device=cpu", "cache.proposals_per_instance=1",
]


def make_world(root: Path, train_images: int = 32, val_images: int = 4):
    """A 64-px synthetic world (80 COCO-named classes) under ``root/world``."""
    return generate(SynthConfig(train_images=train_images, val_images=val_images, image_size=64, seed=0), root / "world")


def data_overrides(world) -> list[str]:
    return [f"data.train_json={world.train_json}", f"data.train_images={world.train_dir}",
            f"data.val_json={world.val_json}", f"data.val_images={world.val_dir}"]


def detect_config(world, *extra: str) -> DetectTrainConfig:
    return load_config(DetectTrainConfig, "synthetic", data_overrides(world) + DETECTOR + list(extra), section="detect_train")


def mask_config(world, *extra: str) -> MaskTrainConfig:
    return load_config(MaskTrainConfig, "synthetic", data_overrides(world) + HEAD + list(extra), section="mask_train")


def cli_overrides(world, *extra: str) -> list[str]:
    """``--set`` arguments for ``maskx detect-train --config synthetic`` with the tiny detector."""
    args: list[str] = []
    for item in data_overrides(world) + DETECTOR + list(extra):
        args += ["--set", item]
    return args


def train_detector_and_mask(root: Path, train_images: int = 16, val_images: int = 3):
    """A tiny world, a detector (2 iterations) in ``root/det``, its embeddings and a transfer mask run
    (2 iterations) in ``root/mask``; returns the world."""
    from pipelines.stages.detect_train import detect_train
    from pipelines.stages.export_embeddings import export_embeddings
    from pipelines.stages.mask_train import mask_train

    world = make_world(root, train_images=train_images, val_images=val_images)
    detect_train(detect_config(world, "solver.iterations=2"), root / "det")
    export_embeddings(root / "det", root / "emb.h5")
    mask_train(mask_config(world, "solver.iterations=2"), root / "det", root / "emb.h5", root / "mask")
    return world

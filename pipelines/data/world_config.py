"""The synthetic world's settings: :class:`SynthConfig` and the values of its options.

Plain Python (no torch, numpy or OpenCV), so that the command line declares the world's options
without importing what generating a world needs; :mod:`pipelines.data.synthetic` generates it.
"""

from __future__ import annotations

from dataclasses import dataclass

CLASS_FREQS = ("uniform", "coco")
SHAPES = ("random", "class")
APPEARANCES = ("flat", "photo")


@dataclass
class SynthConfig:
    num_classes: int = 80
    train_images: int = 2000
    val_images: int = 300
    image_size: int = 128
    min_objects: int = 2
    max_objects: int = 4
    # object radius range in pixels at image_size 128 (scaled with the image); larger objects are
    # easier to detect and leave more room between the class-agnostic head and the oracle
    min_radius: float = 14.0
    max_radius: float = 34.0
    seed: int = 0
    # how often each class occurs: "uniform" (every class alike) or "coco" (COCO train2017's
    # instance counts raised to class_freq_power: 1 = COCO's own long tail, 0 = uniform)
    class_freq: str = "uniform"
    class_freq_power: float = 1.0
    # object shapes: "random" (blobs unrelated to the class) or "class" (a shape family and aspect
    # ratio per class, jittered per instance)
    shapes: str = "random"
    # how images look: "flat" (objects of one look on a dim grey-ish gradient) or "photo"
    # (unannotated regions of any colour behind them, a part of another colour on every object,
    # shading, uneven light)
    appearance: str = "flat"
    # one's own data (pipelines/data/mixed.py): "coco" (the first 80 classes are COCO's, with coco_id) or
    # "own" (ids 1..K, names that are not COCO's, no coco_id, as a labelling tool writes them)
    names: str = "coco"
    # classes whose training annotations have boxes only (segmentation absent, null, [] in turn)
    box_only_classes: int = 0
    # share of the other classes' training annotations without a mask ([])
    unmasked_fraction: float = 0.0

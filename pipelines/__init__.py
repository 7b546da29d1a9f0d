"""maskx library: partially supervised instance segmentation (Mask^X R-CNN) on torchvision.

Each stage in :mod:`pipelines.stages` is a plain function of a typed config that returns a result.
Nothing in this package prints; progress is reported through :class:`pipelines.progress.Progress`.
"""

__version__ = "0.1.0"

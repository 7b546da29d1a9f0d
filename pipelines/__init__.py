"""maskx library: partially supervised instance segmentation (Mask^X R-CNN) on torchvision.

Each stage in :mod:`pipelines.stages` is a plain function of a typed config that returns a result.
Nothing in this package prints; progress is reported through :class:`pipelines.progress.Progress`.

``DISTRIBUTION`` is the name maskx is installed under (``pip install maskx-rcnn``: the PyPI name
``maskx`` belongs to another project); ``__version__`` is that distribution's version, read from its
installed metadata, so ``pyproject.toml`` is the one place it is written.
"""

from importlib.metadata import PackageNotFoundError, version

DISTRIBUTION = "maskx-rcnn"

try:
    __version__ = version(DISTRIBUTION)
except PackageNotFoundError:  # the sources on sys.path without an install (no metadata to read)
    __version__ = "0+unknown"

"""Typed configs: one way to load them (YAML file + ``key=value`` overrides) and to dump them.

Every stage takes one of the ``*Config`` dataclasses below. ``load_config(MaskTrainConfig, path,
["head.input=cls", "solver.lr=0.01"])`` reads a YAML recipe, applies dotted overrides, checks every
key and type, and returns the dataclass; ``to_dict`` gives the resolved form saved beside results.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from pipelines.errors import MaskxError
from pipelines.io import read_yaml

C = TypeVar("C")

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class DataConfig:
    """COCO-format annotation files and their image folders."""

    train_json: str = ""
    train_images: str = ""
    val_json: str = ""
    val_images: str = ""
    # Set A, the classes whose masks are used for training: voc | nonvoc | all | random:N:SEED | ids:1,2,3
    mask_classes: str = "voc"
    # Keep at most this many training / validation images (0 = all); handy for smoke runs.
    max_train_images: int = 0
    max_val_images: int = 0


@dataclass
class DetectorConfig:
    """Faster R-CNN with an FPN backbone (torchvision)."""

    backbone: str = "resnet50"  # resnet18 | resnet34 | resnet50 | resnet101
    fpn_channels: int = 256
    box_representation: int = 1024  # width of the box head: w_cls is this long, w_box 4x
    trainable_backbone_layers: int = 3
    # ImageNet weights of the ResNet, optional: a torchvision state dict file, or the name of one of
    # torchvision's weights for this backbone (IMAGENET1K_V1, ...), fetched into torch's cache
    pretrained_backbone: str = ""
    norm: str = "frozen_bn"  # norm layers of the ResNet: frozen_bn | bn | gn
    norm_eps: float = 1e-5  # their eps (torchvision's COCO_V1 fasterrcnn_resnet50_fpn release: 0.0)
    fpn_norm: str = "none"  # norm after each FPN conv: none | frozen_bn | bn | gn (fasterrcnn_resnet50_fpn_v2: bn)
    rpn_head_convs: int = 1  # 3x3 convs of the RPN head (fasterrcnn_resnet50_fpn_v2: 2)
    # box head: 2fc (two FC layers, the paper's and fasterrcnn_resnet50_fpn's) | 4conv1fc (four 3x3
    # convs of fpn_channels, then one FC layer; fasterrcnn_resnet50_fpn_v2's); both box_representation wide
    box_head: str = "2fc"
    box_head_norm: str = "none"  # norm after each conv of the 4conv1fc head: none | frozen_bn | bn | gn
    min_size: int = 800
    max_size: int = 1333
    anchor_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    rpn_batch_size_per_image: int = 256
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    box_batch_size_per_image: int = 512
    box_detections_per_img: int = 100
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5


@dataclass
class SolverConfig:
    """SGD with linear warm-up and step decay (the Mask R-CNN recipe: 16 images, LR 0.02)."""

    optimizer: str = "sgd"  # sgd (the paper's) | adamw (decoupled weight decay; used for the synthetic stage 2)
    batch_size: int = 16  # images per step, summed over all processes
    lr: float = 0.02  # for `reference_batch_size` images; scaled linearly with batch_size
    reference_batch_size: int = 16
    scale_lr: bool = True
    momentum: float = 0.9
    weight_decay: float = 1e-4
    iterations: int = 90000
    warmup_iters: int = 1000
    warmup_factor: float = 0.001
    lr_steps: list[float] = field(default_factory=lambda: [60000 / 90000, 80000 / 90000])
    lr_gamma: float = 0.1
    clip_grad_norm: float = 0.0
    seed: int = 0
    workers: int = 2
    device: str = "auto"  # auto | cpu | cuda
    amp: str = "auto"  # auto | off | bf16 | fp16 (auto: bf16 on GPU, off on CPU)
    checkpoint_every: int = 5000
    log_every: int = 20

    def effective_lr(self) -> float:
        if not self.scale_lr:
            return self.lr
        return self.lr * self.batch_size / self.reference_batch_size


@dataclass
class HeadConfig:
    """The mask side: mask head, weight transfer function T, optional MLP branch (paper §2)."""

    head: str = "transfer"  # transfer | agnostic | oracle
    mlp: bool = True  # fuse the class-agnostic MLP branch (§2.4)
    input: str = "cls+box"  # input of T: randn | glove | cls | box | cls+box
    glove: str = ""  # GloVe text file, for input=glove
    transfer_layers: int = 2  # 1, 2 or 3 fully connected layers
    transfer_activation: str = "leaky_relu"  # none | relu | leaky_relu
    transfer_hidden: int = 256
    normalize_input: bool = True  # L2-normalise w_det before T (see docs/synthetic_world.md)
    input_dropout: float = 0.5  # dropout on T's input while training
    normalize_output: bool = False  # w_seg = s * T(w_det) / |T(w_det)|, one learned scale s for every class
    stop_gradient: bool = True  # w_seg = T(stop_grad(w_det)) (§2.2); matters only end-to-end
    mask_dim: int = 256  # channels of the FCN mask head
    num_convs: int = 4  # 3x3 convs of the FCN mask head (8 = a heavier head)
    fcn: str = "convs"  # mask head body: convs (num_convs 3x3 convs) | hourglass (encoder-decoder with skips)
    mlp_hidden: int = 1024
    mlp_input_size: int = 28  # the MLP branch reads the FCN features average-pooled to this size
    roi_size: int = 14  # RoIAlign output; masks are predicted at 2x this


@dataclass
class CacheConfig:
    """Cached frozen-detector state for stage 2 (RoI features + mask targets)."""

    enabled: bool = True
    dir: str = ""  # default: <detector run>/cache
    proposals_per_instance: int = 2  # sampled positive proposals per instance, beside its GT box
    dtype: str = "float16"  # float16 | float32
    min_iou: float = 0.5
    # Caches up to this size are read into memory once; larger ones stream from disk (docs/cache.md).
    ram_budget_gb: float = 4.0
    # Streaming shuffle: random order of HDF5 chunks per epoch, RoIs shuffled within this many chunks.
    shuffle_window: int = 8


@dataclass
class DetectTrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)


@dataclass
class DetectImportConfig:
    """A torchvision COCO detector imported as a detector run (``maskx detect-import``)."""

    source: str = "torchvision:fasterrcnn_resnet50_fpn"  # torchvision:<model> (pipelines/stages/detect_import.py)
    weights: str = ""  # its state dict file; "" = torchvision's COCO release, from torch's cache or downloaded
    # data.train_json names the data set whose categories the detector gets (by COCO id); the whole
    # section is kept for the later stages, as detect-train keeps it
    data: DataConfig = field(default_factory=DataConfig)
    # settings over the source's layout (min_size, box_score_thresh, trainable_backbone_layers, ...);
    # the layout itself (backbone, FPN, heads, widths) is the source's
    detector: dict[str, Any] = field(default_factory=dict)


@dataclass
class MaskTrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    solver: SolverConfig = field(
        default_factory=lambda: SolverConfig(iterations=20000, warmup_iters=500, batch_size=512, reference_batch_size=512, lr=0.02)
    )
    cache: CacheConfig = field(default_factory=CacheConfig)


@dataclass
class EvalConfig:
    split: str = "nonvoc"  # which classes are reported as set B: voc | nonvoc | all | random:N:SEED
    score_thresh: float = 0.05
    max_images: int = 0
    backend: str = "faster"  # faster (faster-coco-eval) | reference (pycocotools' COCOeval / lvis' LVISEval): same numbers
    gt_boxes: bool = False  # segment the ground-truth boxes and classes (score 1) instead of detections: mask quality alone


# --------------------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise MaskxError(f"config key '{key}' must be a mapping, got {value!r}")
        return _from_dict(tp, value, key + ".")
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise MaskxError(f"config key '{key}' must be a list, got {value!r}")
        return [_coerce(v, item_tp, key) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise MaskxError(f"config key '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if origin in (types.UnionType, typing.Union):
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise MaskxError(f"config key '{key}' must be true or false, got {value!r}")
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    if tp in (int, float) and isinstance(value, str):
        try:
            return tp(value)
        except ValueError:
            pass
    if tp is Any:
        return value
    raise MaskxError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")


def _from_dict(cls: type[C], data: dict, prefix: str = "") -> C:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise MaskxError(f"unknown config key '{prefix}{unknown[0]}' (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def from_dict(cls: type[C], data: dict, prefix: str = "") -> C:
    """Build a config dataclass from a (possibly partial) nested dict, checking keys and types.

    ``prefix`` (``"detector."``) is how errors name the keys of a nested section.
    """
    return _from_dict(cls, data or {}, prefix)


def to_dict(cfg: Any) -> dict:
    """The resolved config as plain data (what is saved as ``config.yaml``)."""
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise MaskxError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise MaskxError(f"override '{item}': '{part}' is not a section")
        node[parts[-1]] = value
    return data


def resolve_shipped(name: str | Path, directory: Path, what: str) -> Path:
    """``name`` if it is a file, else the YAML file of that name shipped in ``directory``."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = directory / (path.name if path.suffix else f"{path.name}.yaml")
    if shipped.is_file():
        return shipped
    known = ", ".join(sorted(p.stem for p in directory.glob("*.yaml")))
    raise MaskxError(f"{what} not found (nor a shipped one of that name: {known})", name)


def resolve_config_path(name: str | Path) -> Path:
    """A config file path, or the name of a recipe shipped in ``pipelines/configs`` (``synthetic``)."""
    return resolve_shipped(name, CONFIG_DIR, "config file")


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None, section: str | None = None) -> C:
    """Load a typed config: YAML recipe (optional) + dotted overrides.

    ``section`` picks one top-level key of a recipe that holds several stages (``detect_train:``,
    ``mask_train:``, ``eval:``); other top-level sections are ignored.
    """
    data: dict = {}
    if path:
        resolved = resolve_config_path(path)
        loaded = read_yaml(resolved, "config file") or {}
        if not isinstance(loaded, dict):
            raise MaskxError("config must be a mapping", resolved)
        if section is not None:
            sec = dict(loaded.get(section) or {})
            if "data" in {f.name for f in dataclasses.fields(cls)} and ("data" in loaded or "data" in sec):
                sec["data"] = {**(loaded.get("data") or {}), **(sec.get("data") or {})}
            loaded = sec
        data = loaded
        try:
            return from_dict(cls, apply_overrides(data, overrides or []))
        except MaskxError as exc:
            if exc.path is None:
                raise MaskxError(exc.message, resolved) from None
            raise
    return from_dict(cls, apply_overrides(data, overrides or []))

"""Typed configs, and the one way to load them.

Every recipe config -- what one stage or command reads -- is a dataclass of this module:
``DetectTrainConfig``, ``DetectImportConfig``, ``MaskTrainConfig``, ``TrainE2EConfig`` and ``EvalConfig`` are
the sections of a recipe (``pipelines/configs/<name>.yaml``: ``data:``, ``detect_train:``,
``detect_import:``, ``mask_train:``, ``train_e2e:``, ``eval:``); a sweep spec file
(``pipelines/configs/sweeps/``) is a ``SweepSpec`` of :mod:`pipelines.stages.sweep_spec`, read by the same loader.

``load_config(cls, path, overrides)`` reads the file (for a recipe: the section of ``cls``, with the
top-level ``data:`` merged under it), applies the overrides in order and returns the dataclass, with
every key and type checked. An override is either a mapping of typed values (what the library and
the command-line options pass, e.g. ``{"solver": {"iterations": 5}}``) or a ``section.key=value``
string written by a user (``--set``, a sweep row); strings are parsed here and nowhere else
(:func:`parse_override`). Unknown keys at any depth of any section of a recipe are errors naming
the file and the key; an error that an override causes names the override. ``to_dict`` gives the
resolved form saved beside every result.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from pipelines.errors import MaskxError
from pipelines.io import load_yaml, read_yaml

C = TypeVar("C")

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class DataConfig:
    """COCO-format annotation files and their image folders."""

    train_json: str = ""
    train_images: str = ""
    val_json: str = ""
    val_images: str = ""
    # Set A, the classes whose masks are used for training: annotated (the classes with masks in the
    # training file: your own data) | voc | nonvoc (COCO's categories only) | all | random:N:SEED | ids:1,2,3
    mask_classes: str = "annotated"
    # Keep at most this many training / validation images (0 = all); handy for smoke runs.
    max_train_images: int = 0
    max_val_images: int = 0
    # Horizontal flips while training (Detectron's TRAIN.USE_FLIPPED): every training image once as it
    # is and once mirrored (pipelines/data/transforms.py). Read by detect-train and train; for stage 2 the
    # flipped copies are extra rows of the cache (docs/cache.md).
    hflip: bool = True


# The data keys that name files and folders (what later stages inherit from a detector run, key by key).
DATA_PATH_KEYS = ("train_json", "train_images", "val_json", "val_images")


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
    # init of the box predictor (the class weights w_cls, w_box: T's input): torchvision (FastRCNNPredictor's
    # own, uniform within 1/sqrt(box_representation), maskx's before) | detectron (cls_score N(0, 0.01),
    # bbox_pred N(0, 0.001), zero biases: the original code's; the real-data recipes')
    predictor_init: str = "torchvision"
    # beta of the box head's smooth-L1 loss: torchvision's 1/9 (maskx's before) | 1.0 (Detectron's
    # SmoothL1Loss for the box head, the original code's; the real-data recipes')
    box_loss_beta: float = 1 / 9


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
    # the biases of conv and FC layers train at bias_lr_factor x the LR and bias_weight_decay_factor x the
    # weight decay: 1.0 and 1.0 (maskx's before: like the weights) | 2.0 and 0.0 (the original code's,
    # Detectron's lib/modeling/optimizer.py; the real-data recipes')
    bias_lr_factor: float = 1.0
    bias_weight_decay_factor: float = 1.0
    seed: int = 0
    workers: int = 2
    device: str = "auto"  # auto | cpu | cuda
    amp: str = "auto"  # auto | off | bf16 | bf16-native | fp16 (auto: bf16 on GPU, off on CPU; bf16-native: bf16 on GPU and on CPUs with bf16 instructions)
    checkpoint_every: int = 5000
    log_every: int = 20

    def effective_lr(self) -> float:
        if not self.scale_lr:
            return self.lr
        return self.lr * self.batch_size / self.reference_batch_size


OPTIMIZERS = ("sgd", "adamw")
AMP = ("auto", "off", "bf16", "bf16-native", "fp16")
# What each solver value may be, checked whenever a config is loaded (check_values): key -> (rule, test).
SOLVER_VALUES: dict[str, tuple[str, typing.Callable[[Any], bool]]] = {
    "optimizer": ("one of " + " | ".join(OPTIMIZERS), lambda v: v in OPTIMIZERS),
    "batch_size": (">= 1", lambda v: v >= 1),
    "lr": ("> 0", lambda v: v > 0),
    "reference_batch_size": (">= 1", lambda v: v >= 1),
    "momentum": (">= 0 and < 1", lambda v: 0 <= v < 1),
    "weight_decay": (">= 0", lambda v: v >= 0),
    "iterations": (">= 1", lambda v: v >= 1),
    "warmup_iters": (">= 0", lambda v: v >= 0),
    "warmup_factor": ("> 0 and <= 1", lambda v: 0 < v <= 1),
    "lr_steps": ("fractions of the iterations, each >= 0 and <= 1", lambda v: all(0 <= x <= 1 for x in v)),
    "lr_gamma": ("> 0", lambda v: v > 0),
    "clip_grad_norm": (">= 0 (0: no clipping)", lambda v: v >= 0),
    "seed": (">= 0", lambda v: v >= 0),
    "workers": (">= 0", lambda v: v >= 0),
    "device": ("auto | cpu | cuda | cuda:N", lambda v: v in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", v) is not None),
    "amp": ("one of " + " | ".join(AMP), lambda v: v in AMP),
    "checkpoint_every": (">= 0 (0: only at the end)", lambda v: v >= 0),
    "log_every": (">= 1", lambda v: v >= 1),
    "bias_lr_factor": ("> 0", lambda v: v > 0),
    "bias_weight_decay_factor": (">= 0", lambda v: v >= 0),
}
# The configs whose values have rules beside their types.
VALUE_RULES: dict[type, dict[str, tuple[str, typing.Callable[[Any], bool]]]] = {SolverConfig: SOLVER_VALUES}


@dataclass
class HeadConfig:
    """The mask side: mask head, weight transfer function T, optional MLP branch (paper §2)."""

    head: str = "transfer"  # transfer | agnostic | oracle
    mlp: bool = True  # fuse the class-agnostic MLP branch (§2.4)
    input: str = "cls+box"  # input of T: randn | glove | cls | box | cls+box
    glove: str = ""  # GloVe text file, for input=glove
    # input=randn: gaussian (5D-wide N(0, 1) rows, maskx's before) | unit (300-d rows of norm 1, the form of the
    # original code's fixed 80 x 300 matrix; the real-data recipes')
    randn: str = "gaussian"
    transfer_layers: int = 2  # 1, 2 or 3 fully connected layers
    transfer_activation: str = "leaky_relu"  # none | relu | leaky_relu
    transfer_hidden: int = 256
    transfer_init: str = "fan_out"  # fan_out (Caffe2's MSRAFill, the original code's) | fan_in (Kaiming fan-in)
    # The paper's T reads w_det as it is; the synthetic recipe regularises it (docs/synthetic_world.md)
    normalize_input: bool = False  # L2-normalise w_det before T
    input_dropout: float = 0.0  # dropout on T's input while training
    normalize_output: bool = False  # w_seg = s * T(w_det) / |T(w_det)|, one learned scale s for every class
    stop_gradient: bool = True  # w_seg = T(stop_grad(w_det)) (§2.2); matters only end-to-end
    # mask targets of end-to-end training: soft (RoIAlign of the instance's mask in the RoI, values in [0, 1];
    # maskx's before) | binary (the same thresholded at 0.5: the original code's 0/1 targets; the real-data
    # recipes'). The stage-2 cache's targets are binary either way.
    e2e_mask_targets: str = "soft"
    mask_dim: int = 256  # channels of the FCN mask head
    num_convs: int = 4  # 3x3 convs of the FCN mask head (8 = a heavier head)
    fcn: str = "convs"  # mask head body: convs (num_convs 3x3 convs) | hourglass (encoder-decoder with skips)
    mlp_layers: int = 1  # FC layers of the MLP branch: 1 (the original code's: 256x28x28 -> 28x28) | 2 (through mlp_hidden)
    mlp_hidden: int = 1024  # hidden width of the 2-layer MLP branch
    mlp_input_size: int = 28  # the MLP branch reads the FCN features average-pooled to this size
    roi_size: int = 14  # RoIAlign output; masks are predicted at 2x this


@dataclass
class CacheConfig:
    """Cached frozen-detector state for stage 2 (RoI features + mask targets); see docs/cache.md."""

    enabled: bool = True
    dir: str = ""  # default: <detector run>/cache
    # Which classes' RoIs are cached: train = only the run's training classes (set A; every class for
    # the oracle) | all = every class (one cache for every head and split; a superset is always reused).
    classes: str = "train"
    # RoIs per image: instance = each instance's GT box + up to proposals_per_instance proposals |
    # detectron = the official sampler (up to fg_fraction x rois_per_image foreground RoIs, GT boxes included).
    sampling: str = "instance"
    proposals_per_instance: int = 2  # instance sampling: sampled positive proposals per instance, beside its GT box
    rois_per_image: int = 512  # detectron sampling: TRAIN.BATCH_SIZE_PER_IM of the official stage-wise configs
    fg_fraction: float = 0.25  # detectron sampling: TRAIN.FG_FRACTION
    min_iou: float = 0.5  # a proposal is a positive (foreground) RoI of an instance at this IoU
    # RPN proposals per image the RoIs are drawn from (the frozen detector's RPN, after NMS): 0 = the
    # detector's own rpn_post_nms_top_n_test (maskx's before) | 2000 (as many as the original stage-wise
    # configs' proposal files: TEST.RPN_POST_NMS_TOP_N of rpn_R-50-FPN_1x.yaml; the real-data recipes')
    rpn_proposals: int = 0
    # How RoI features are stored: float16 | float32 | int8 | float8 (8-bit: one scale per RoI and channel,
    # converted back to float32 as batches are used; about half float16's bytes; docs/cache.md)
    dtype: str = "float16"
    # A budget for the cache on disk, in GB (10^9 bytes), from which the build derives, before it starts and
    # from the annotation file's instance counts, how many RoIs it keeps (detectron: foreground RoIs per image
    # copy; instance: proposals per instance) so that the cache surely fits; the free space is checked too.
    # 0 = no budget (the official draw, refused only when the disk cannot hold its least size).
    max_gb: float = 250.0
    # detectron sampling: foreground RoIs kept per image copy at most; 0 = as many as cache.max_gb holds, up
    # to round(fg_fraction x rois_per_image) (128: the official draw)
    fg_per_image: int = 0
    # Caches up to this size are read into memory once; larger ones stream from disk (docs/cache.md).
    ram_budget_gb: float = 4.0
    # Streaming shuffle: random order of chunks per epoch, RoIs shuffled within this many chunks.
    shuffle_window: int = 8
    # RoIs per chunk, the unit a streamed cache is read and shuffled in (0: the cache's own chunks, doubled until a
    # read is >= 16 MiB while 64 chunks remain: 256 COCO float16 RoIs, 512 int8; docs/cache.md).
    stream_chunk_rows: int = 0
    reader_threads: int = 4  # parallel reads of a streamed (or loaded) cache
    workers: int = 2  # DataLoader workers decoding images and masks while a cache is built


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
    # which classes are reported as set B: empty = the classes the evaluated run had no masks for
    # (with a results file and no run: nonvoc on COCO's categories) | voc | nonvoc | random:N:SEED | ids:1,2,3
    split: str = ""
    score_thresh: float = 0.05
    max_images: int = 0
    backend: str = "faster"  # faster (faster-coco-eval) | reference (pycocotools' COCOeval / lvis' LVISEval): same numbers but for the last bit
    gt_boxes: bool = False  # segment the ground-truth boxes and classes (score 1) instead of detections: mask quality alone


@dataclass
class TrainE2EConfig:
    """End-to-end training (``maskx train``): data, detector, mask side and one solver for both.

    Its recipe section is ``train_e2e:``; a recipe without one gives ``detector`` and ``solver`` from
    ``detect_train:`` (end-to-end training is a detector schedule) and ``head`` from ``mask_train:``.
    """

    data: DataConfig = field(default_factory=DataConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    init_detector: str = ""  # start from a detect-train run's weights (a short e2e fine-tune) instead of scratch


# A recipe's sections and the config each one is read into (``data:`` is merged into the others).
RECIPE_SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "detect_train": DetectTrainConfig,
    "detect_import": DetectImportConfig,
    "mask_train": MaskTrainConfig,
    "train_e2e": TrainE2EConfig,
    "eval": EvalConfig,
}
SECTION_OF: dict[type, str] = {cls: name for name, cls in RECIPE_SECTIONS.items() if name != "data"}


# --------------------------------------------------------------------------------------------
# Overrides: user-written section.key=value strings, parsed here and nowhere else
@dataclass(frozen=True)
class Override:
    """One ``section.key=value`` override (``value`` parsed as YAML) and where it was written."""

    key: str
    value: Any
    text: str
    source: str = "override"  # what errors call it: "--set", a spec file, ...

    @property
    def label(self) -> str:
        return f"{self.source} {self.text}"

    def as_mapping(self) -> dict:
        node: Any = self.value
        for part in reversed(self.key.split(".")):
            node = {part: node}
        return node


def parse_override(item: str | Override, source: str = "override") -> Override:
    """``"solver.lr=0.01"`` -> ``Override("solver.lr", 0.01, ...)``; MaskxError naming it if malformed."""
    if isinstance(item, Override):
        return item
    key, eq, raw = str(item).partition("=")
    key = key.strip()
    if not eq or not key or not all(key.split(".")):
        raise MaskxError("is not of the form key=value (e.g. solver.lr=0.01)", f"{source} {item}")
    try:
        value = load_yaml(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise MaskxError(f"value is not valid YAML ({str(exc).splitlines()[0]})", f"{source} {item}") from None
    return Override(key, value, str(item), source)


def parse_overrides(items: Sequence[str | Override], source: str = "override") -> list[Override]:
    return [parse_override(item, source) for item in items]


def stage_overrides(cls: type, overrides: Sequence[Override]) -> list[Override]:
    """The overrides meant for stage config ``cls`` among overrides written for every stage.

    ``eval.key=value`` goes to :class:`EvalConfig` (as ``key=value``); any other one goes to the
    configs that have its first section (``solver.*`` to every training stage, ``detector.*`` to
    detect-train and end-to-end training, ...).
    """
    if cls is EvalConfig:
        return [dataclasses.replace(o, key=o.key[len("eval."):]) for o in overrides if o.key.startswith("eval.")]
    sections = {f.name for f in dataclasses.fields(cls)}
    return [o for o in overrides if o.key.split(".", 1)[0] in sections]


STAGE_SECTIONS = sorted({f.name for c in (DetectTrainConfig, MaskTrainConfig, TrainE2EConfig) for f in dataclasses.fields(c)} | {"eval"})


def check_stage_overrides(overrides: Sequence[Override]) -> None:
    """Refuse an override written for every stage that no stage config has a section for."""
    for o in overrides:
        if o.key.split(".", 1)[0] not in STAGE_SECTIONS:
            raise MaskxError(f"'{o.key.split('.', 1)[0]}' is not a section of any stage config "
                             f"(known: {', '.join(STAGE_SECTIONS)})", o.label)


# --------------------------------------------------------------------------------------------
# Checking keys and types
class _KeyError(MaskxError):
    """A bad key or value at ``key`` (dotted); ``load_config`` names the file or override it came from."""

    def __init__(self, key: str, message: str):
        super().__init__(message, key=key)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, noun: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _KeyError(key, f"{noun} '{key}' must be a mapping, got {value!r}")
        return _from_dict(tp, value, key + ".", noun)
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = load_yaml(value) if value.startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise _KeyError(key, f"{noun} '{key}' must be a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]" if dataclasses.is_dataclass(item_tp) else key, noun) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _KeyError(key, f"{noun} '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if origin in (types.UnionType, typing.Union):
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise _KeyError(key, f"{noun} '{key}' must be true or false, got {value!r}")
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
    raise _KeyError(key, f"{noun} '{key}' must be {_type_name(tp)}, got {value!r}")


def _from_dict(cls: type[C], data: dict, prefix: str = "", noun: str = "config key") -> C:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    unknown = sorted(set(data) - names)
    if unknown:
        hint = UNKNOWN_KEY_HINTS.get((cls.__name__, prefix + unknown[0]), "")
        raise _KeyError(prefix + unknown[0], f"unknown {noun} '{prefix}{unknown[0]}' (known: {', '.join(sorted(names))}){hint}")
    cfg = cls(**{k: _coerce(v, hints[k], prefix + k, noun) for k, v in data.items()})
    check_values(cfg, prefix)
    return cfg


def check_values(cfg: Any, prefix: str = "") -> None:
    """Raise (naming the key, ``prefix`` + field) at the first value of ``cfg`` outside its rule
    (:data:`VALUE_RULES`): ``solver.lr must be > 0, got -1``. A float must also be finite."""
    for name, (rule, test) in VALUE_RULES.get(type(cfg), {}).items():
        value = getattr(cfg, name)
        finite = all(math.isfinite(v) for v in (value if isinstance(value, list) else [value]) if isinstance(v, float))
        if not finite or not test(value):
            shown = f"{value:g}" if isinstance(value, float) else repr(value)
            raise _KeyError(prefix + name, f"{prefix}{name} must be {rule}, got {shown}")


def from_dict(cls: type[C], data: dict, prefix: str = "") -> C:
    """Build a config dataclass from a (possibly partial) nested dict, checking keys and types.

    ``prefix`` (``"detector."``) is how errors name the keys of a nested section.
    """
    return _from_dict(cls, data or {}, prefix)


def to_dict(cfg: Any) -> dict:
    """The resolved config as plain data (what is saved as ``config.yaml``)."""
    return dataclasses.asdict(cfg)


# --------------------------------------------------------------------------------------------
# Files
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
    """A recipe path, or the name of a recipe shipped in ``pipelines/configs`` (``synthetic``)."""
    return resolve_shipped(name, CONFIG_DIR, "config file")


def _section(raw: dict, name: str, path: Path) -> dict:
    """The data of recipe section ``name`` as its config reads it (top-level ``data:`` merged in)."""
    for key in ("data", name) + (("detect_train", "mask_train") if name == "train_e2e" else ()):
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            raise MaskxError(f"recipe section '{key}' must be a mapping, got {raw[key]!r}", path)
    if name == "data":
        return dict(raw.get("data") or {})
    if name == "train_e2e" and "train_e2e" not in raw:
        det, mask = raw.get("detect_train") or {}, raw.get("mask_train") or {}
        sec = {k: v for k, v in (("detector", det.get("detector")), ("solver", det.get("solver")),
                                 ("head", mask.get("head"))) if v is not None}
    else:
        sec = dict(raw.get(name) or {})
    has_data = "data" in {f.name for f in dataclasses.fields(RECIPE_SECTIONS[name])}
    if has_data and ("data" in raw or "data" in sec):
        sec["data"] = {**(raw.get("data") or {}), **(sec.get("data") or {})}
    return sec


def _check_recipe(raw: dict, path: Path) -> None:
    """Every key of every section of a recipe must be known and well typed, not only in the section
    being read; errors name the file and the key as the recipe spells it (``mask_train.head.input``)."""
    unknown = sorted(set(raw) - set(RECIPE_SECTIONS))
    if unknown:
        raise MaskxError(f"unknown recipe section '{unknown[0]}' (known: {', '.join(RECIPE_SECTIONS)})", path)
    for name, cls in RECIPE_SECTIONS.items():
        if name in raw:
            try:
                _from_dict(cls, _section(raw, name, path), f"{name}.")
            except _KeyError as exc:
                raise MaskxError(exc.message, path) from None


def _merge(into: dict, layer: Mapping, origin: dict[str, str | None], label: str | None, prefix: str = "") -> None:
    """Merge nested ``layer`` into ``into`` (mappings key by key, other values replaced); note each
    leaf's ``label`` in ``origin`` (dotted key -> the file or override it came from)."""
    for key, value in layer.items():
        dotted = prefix + str(key)
        if isinstance(value, Mapping):
            node = into.setdefault(key, {})
            if not isinstance(node, dict):
                raise MaskxError(f"'{dotted}' is not a section (it holds {node!r})", label)
            _merge(node, value, origin, label, dotted + ".")
        else:
            into[key] = value
            origin[dotted] = label


def _origin(origin: dict[str, str | None], key: str) -> str | None:
    """Where the value at ``key`` came from: its own entry, a section above it, or the first below it."""
    above = [k for k in origin if key == k or key.startswith((k + ".", k + "["))]
    if above:
        return origin[max(above, key=len)]
    return next((label for k, label in origin.items() if k.startswith(key + ".")), None)


NOUNS = {"SweepSpec": "sweep key"}
# Where a key that is not this config's lives instead: (config class, key) -> the hint appended to the error.
_FROM_DETECTOR = ("; the detector's settings (image size detector.min_size / max_size, thresholds, ...) come from the "
                  "detector run: set them on detect-train or detect-import")
UNKNOWN_KEY_HINTS = {("MaskTrainConfig", "detector"): _FROM_DETECTOR, ("EvalConfig", "detector"): _FROM_DETECTOR}


def load_config(cls: type[C], path: str | Path | None = None, overrides: Sequence[str | Override | Mapping] = (),
                section: str | None = None, source: str = "override") -> C:
    """Load a typed config: a YAML file (optional), then ``overrides`` in order, every key and type checked.

    ``path``: a recipe (a file or the name of a shipped one) or, for a config that is not a recipe
    section (a sweep spec, ``pipelines.stages.sweep_spec.SweepSpec``), its file. ``section``: the recipe section to read (default: the one
    of ``cls``, e.g. ``mask_train`` for :class:`MaskTrainConfig`); the whole recipe is checked.
    ``overrides``: mappings of typed values and ``section.key=value`` strings (``source`` names the
    strings in errors, e.g. ``"--set"``). A bad key or value raises MaskxError naming the file or the
    override it came from.
    """
    data: dict = {}
    origin: dict[str, str | None] = {}
    noun = NOUNS.get(cls.__name__, "config key")
    if path:
        file = resolve_config_path(path)
        raw = read_yaml(file, "config file")
        raw = {} if raw is None else raw
        if not isinstance(raw, dict):
            raise MaskxError("config must be a mapping", file)
        section = section or SECTION_OF.get(cls)
        if section:
            _check_recipe(raw, file)
            raw = _section(raw, section, file)
        _merge(data, raw, origin, str(file))
    for item in overrides:
        if isinstance(item, Mapping):
            _merge(data, item, origin, None)
        else:
            o = parse_override(item, source)
            _merge(data, o.as_mapping(), origin, o.label)
    try:
        return _from_dict(cls, data, noun=noun)
    except _KeyError as exc:
        where = _origin(origin, exc.key)
        # a value of no file or override (a command-line option, a library mapping) keeps its key: a command shows its flag
        raise MaskxError(exc.message, where, key=exc.key if where is None else None) from None

"""Stage 1 without training: a torchvision COCO detector imported as a detector run.

The run folder is what ``detect-train`` writes (``model_final.pth`` of kind ``detector`` with the
same payload, ``config.yaml``, ``manifest.json``), so ``export-embeddings``, ``mask-train``,
``eval``, ``predict`` and ``train --init-detector`` read it as they read a trained one.

Supported sources (``torchvision:<model>``; the models torchvision builds, with their COCO_V1 release):

- ``fasterrcnn_resnet50_fpn``: ResNet-50-FPN, 2-FC box head of 1,024 (the paper's stage-1 layout);
  box AP 37.0 on COCO val2017.
- ``fasterrcnn_resnet50_fpn_v2``: normed FPN, 2-conv RPN head, a 4-conv + 1-FC box head with
  BatchNorm, 1,024 wide; box AP 46.7.
- ``maskrcnn_resnet50_fpn`` / ``maskrcnn_resnet50_fpn_v2``: only the box part (backbone, FPN, RPN,
  box head and predictor) is imported; the mask head is dropped. Its backbone has seen the masks
  of every COCO class, so it does not belong at the start of a partially supervised experiment.

torchvision's COCO models have 91 outputs indexed by COCO category id (0 = background, ten unused
ids named "N/A"). The imported predictor keeps the background row and, for each category of the
data set (in its order), the row of its COCO id (``coco_id`` when the category has one, else its
``id``, whose name must then be COCO's); a category the checkpoint does not cover is refused. The
softmax then runs over the data set's classes: scores equal torchvision's where the dropped rows'
logits are negligible (as for the unused ids of a trained model).

``norm_eps``: torchvision builds its ``fasterrcnn_resnet50_fpn`` / ``maskrcnn_resnet50_fpn`` COCO_V1
models with FrozenBatchNorm eps 0. A file whose SHA-256 starts with the release's hash (the digits
in its file name) gets the release's eps; any other file the default 1e-5 (what torchvision uses
for a model it builds itself), unless ``detector.norm_eps`` is given.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torchvision

from pipelines.config import DetectImportConfig, DetectorConfig, DetectTrainConfig, SolverConfig, from_dict, to_dict
from pipelines.data.coco import load_split
from pipelines.data.splits import coco_id_of
from pipelines.engine.run_dir import (DETECTOR_CKPT, check_not_finished, prepare_run_dir, save_detector, training_run,
                                      update_manifest, write_recipe)
from pipelines.errors import MaskxError
from pipelines.io import sha256_file
from pipelines.modeling.detector import build_detector, detector_from_state
from pipelines.modeling.zoo import cached_file, fetch, read_state_dict, weights_enum, weights_label
from pipelines.progress import NULL_PROGRESS, Progress

PREFIX = "torchvision:"
RELEASE = "COCO_V1"
_V1 = dict(backbone="resnet50", fpn_channels=256, box_representation=1024, norm="frozen_bn", fpn_norm="none",
           rpn_head_convs=1, box_head="2fc", box_head_norm="none", anchor_sizes=[32, 64, 128, 256, 512])
_V2 = {**_V1, "fpn_norm": "bn", "rpn_head_convs": 2, "box_head": "4conv1fc", "box_head_norm": "bn"}
# norm layers whose tensors load either way (a BatchNorm in eval mode is a FrozenBatchNorm)
_INTERCHANGEABLE_NORMS = ("frozen_bn", "bn")
_PREDICTOR = "roi_heads.box_predictor."


@dataclass(frozen=True)
class Source:
    """A torchvision detection model that imports as a maskx detector."""

    model: str  # torchvision's builder name
    layout: dict  # the DetectorConfig fields its architecture fixes
    release_eps: float  # norm eps torchvision gives the ResNet of its COCO_V1 release
    box_only: bool = False  # a Mask R-CNN: its mask head is dropped

    @property
    def release(self):
        return weights_enum(self.model)[RELEASE]


SOURCES = {
    "fasterrcnn_resnet50_fpn": Source("fasterrcnn_resnet50_fpn", _V1, 0.0),
    "fasterrcnn_resnet50_fpn_v2": Source("fasterrcnn_resnet50_fpn_v2", _V2, 1e-5),
    "maskrcnn_resnet50_fpn": Source("maskrcnn_resnet50_fpn", _V1, 0.0, box_only=True),
    "maskrcnn_resnet50_fpn_v2": Source("maskrcnn_resnet50_fpn_v2", _V2, 1e-5, box_only=True),
}


@dataclass
class DetectImportResult:
    run_dir: Path
    checkpoint: Path
    source: str
    weights: Path
    release: str | None  # torchvision's release the file is (``FasterRCNN_ResNet50_FPN_Weights.COCO_V1``), if it is one
    num_classes: int
    dropped_rows: int  # rows of the 91-way predictor not imported (unused ids and classes the data set lacks)


def parse_source(spec: str) -> Source:
    """``torchvision:<model>`` -> its :class:`Source`."""
    name = spec[len(PREFIX):] if spec.startswith(PREFIX) else None
    if name not in SOURCES:
        raise MaskxError(f"unknown detector source '{spec}' (supported: {', '.join(PREFIX + s for s in SOURCES)})")
    return SOURCES[name]


def detector_config(source: Source, settings: dict) -> DetectorConfig:
    """The source's layout with ``settings`` (detector keys) over it; the layout itself cannot change.

    A setting of a layout key must repeat the source's value, except that BatchNorm and
    FrozenBatchNorm may stand for each other (same tensors); ``pretrained_backbone`` is refused
    (the whole detector comes from the checkpoint).
    """
    known = {f.name for f in fields(DetectorConfig)}
    for key, value in settings.items():
        if key not in known:
            continue  # from_dict below names it
        if key == "pretrained_backbone" and value:
            raise MaskxError("detector.pretrained_backbone does not apply to an imported detector (its checkpoint holds the backbone)")
        fixed = source.layout.get(key)
        if key in source.layout and value != fixed and not (fixed in _INTERCHANGEABLE_NORMS and value in _INTERCHANGEABLE_NORMS):
            raise MaskxError(f"detector.{key} is fixed by torchvision's {source.model} ({fixed!r}), got {value!r}")
    return from_dict(DetectorConfig, {**source.layout, **settings}, "detector.")


def predictor_rows(categories: list[dict], coco_names: list[str], path: str | Path) -> list[int]:
    """Rows of torchvision's COCO predictor for [background, category 1, ..., category K].

    ``coco_names`` are the checkpoint's output names (``__background__``, COCO names, ``N/A`` for
    the unused ids). A category maps by its ``coco_id`` if it carries one, else by its ``id``, whose
    name must then be COCO's. Raises one MaskxError (naming ``path``) for a category not covered.
    """
    rows, seen = [0], {}
    covered = [i for i, n in enumerate(coco_names) if i > 0 and n != "N/A"]
    for c in categories:
        cid = coco_id_of(c)
        if cid is None or not isinstance(cid, int) or cid not in covered:
            raise MaskxError(f"category {c['id']} ('{c['name']}') is not one of the checkpoint's {len(covered)} COCO categories "
                             f"(COCO ids {covered[0]}-{covered[-1]}, by 'coco_id' or else 'id')", path)
        if "coco_id" not in c and c["name"] != coco_names[cid]:
            raise MaskxError(f"category {cid} is '{c['name']}' here but '{coco_names[cid]}' in the checkpoint (COCO ids); "
                             "give the category a 'coco_id' to map it explicitly", path)
        if cid in seen:
            raise MaskxError(f"categories {seen[cid]} and {c['id']} both map to COCO id {cid}", path)
        seen[cid] = c["id"]
        rows.append(cid)
    return rows


def guess_model(keys: set[str]) -> str | None:
    """Which supported torchvision model a state dict's tensor names look like (None: no detector)."""
    if "backbone.body.conv1.weight" not in keys or _PREDICTOR + "cls_score.weight" not in keys:
        return None
    mask = any(k.startswith("roi_heads.mask_") for k in keys)
    v2 = "rpn.head.conv.1.0.weight" in keys
    return f"{'maskrcnn' if mask else 'fasterrcnn'}_resnet50_fpn{'_v2' if v2 else ''}"


def torchvision_state(raw: dict[str, torch.Tensor], source: Source, path: str | Path) -> dict[str, torch.Tensor]:
    """The file's tensors as torchvision's current ``source.model`` names them, checked against it.

    The file is loaded into torchvision's own model (built on the meta device, 91 outputs), so
    torchvision's renames of older files apply (older versions named ``rpn.head.conv.weight``
    what it now calls ``rpn.head.conv.0.0.weight``, the FPN's blocks alike). Raises one MaskxError naming ``path`` for a
    file of another model (with the supported model it looks like, if any) or other shapes.
    """
    outputs = len(source.release.meta["categories"])
    cls = raw.get(_PREDICTOR + "cls_score.weight")
    if cls is not None and cls.dim() == 2 and cls.shape[0] != outputs:
        raise MaskxError(f"the box predictor has {cls.shape[0]} outputs; torchvision's COCO models have {outputs} "
                         "(background + COCO ids 1-90)", path)
    with torch.device("meta"):
        model = torchvision.models.get_model(source.model, weights=None, weights_backbone=None)
    try:
        missing, unexpected = model.load_state_dict(raw, strict=False, assign=True)
    except RuntimeError as exc:
        detail = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc).splitlines()[0])
        raise MaskxError(f"does not fit torchvision's {source.model}: {detail}", path) from None
    missing = sorted(k for k in missing if not k.endswith("num_batches_tracked"))
    if missing or unexpected:
        guess = guess_model(set(raw))
        hint = f"; it looks like torchvision's {guess}: use --from {PREFIX}{guess}" if guess and guess != source.model else ""
        parts = ([f"{len(missing)} tensors missing (e.g. {missing[0]})"] if missing else []) + \
                ([f"{len(unexpected)} unexpected (e.g. {sorted(unexpected)[0]})"] if unexpected else [])
        raise MaskxError(f"does not fit torchvision's {source.model}: {', '.join(parts)}{hint}", path)
    return model.state_dict()


def maskx_state(state: dict[str, torch.Tensor], source: Source, rows: list[int],
                target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision's state dict (as :func:`torchvision_state` gives it) -> the maskx detector's.

    The box predictor keeps ``rows`` (``cls_score``: ``[91, D] -> [K+1, D]``; ``bbox_pred``: the 4
    rows per class, ``[4*91, D] -> [4(K+1), D]``); a Mask R-CNN's ``roi_heads.mask_*`` tensors are
    dropped; BatchNorm's ``num_batches_tracked`` counters are not needed by FrozenBatchNorm and
    start at 0 where ``target`` has BatchNorm and the file has none. ``target`` (the maskx
    detector's state dict, possibly on the meta device) gives the names.
    """
    src = {k: v for k, v in state.items() if (k in target or not k.endswith("num_batches_tracked"))
           and not (source.box_only and k.startswith("roi_heads.mask_"))}
    w = src[_PREDICTOR + "cls_score.weight"]
    n, d = w.shape
    idx = torch.tensor(rows)
    src[_PREDICTOR + "cls_score.weight"] = w[idx]
    src[_PREDICTOR + "cls_score.bias"] = src[_PREDICTOR + "cls_score.bias"][idx]
    src[_PREDICTOR + "bbox_pred.weight"] = src[_PREDICTOR + "bbox_pred.weight"].view(n, 4, d)[idx].reshape(-1, d)
    src[_PREDICTOR + "bbox_pred.bias"] = src[_PREDICTOR + "bbox_pred.bias"].view(n, 4)[idx].reshape(-1)
    # a BatchNorm counter the file lacks starts at 0; any other difference fails the strict load that follows
    return {**src, **{k: torch.zeros((), dtype=torch.long) for k in target if k not in src and k.endswith("num_batches_tracked")}}


def release_sha256_prefix(weights) -> str:
    """The leading SHA-256 digits a release's file name carries (``...coco-258fb6c6.pth``)."""
    match = torch.hub.HASH_REGEX.search(cached_file(weights).name)
    return match.group(1) if match else ""


def detect_import(cfg: DetectImportConfig, out: str | Path, progress: Progress = NULL_PROGRESS,
                  recipe: str | Path | None = None) -> DetectImportResult:
    """Import ``cfg.source`` for the categories of ``cfg.data.train_json``; write the run to ``out``.

    Every check (source, settings, data set's categories, file, tensor names and shapes) runs
    before anything is written. ``recipe`` (optional) is kept as ``out/recipe.yaml``, as
    ``detect-train`` keeps it.
    """
    out = Path(out)
    check_not_finished(out, DETECTOR_CKPT, "detector")
    source = parse_source(cfg.source)
    det_cfg = detector_config(source, cfg.detector)
    data, _ = load_split(cfg.data.train_json, "train")
    categories = data["categories"]
    release = source.release
    rows = predictor_rows(categories, release.meta["categories"], cfg.data.train_json)

    path = Path(cfg.weights) if cfg.weights else fetch(release, "or pass --weights FILE", progress)
    if cfg.weights and not path.is_file():
        raise MaskxError("weights file not found", path)
    prefix = release_sha256_prefix(release)
    is_release = bool(prefix) and sha256_file(path).startswith(prefix)
    if not cfg.weights and not is_release:
        raise MaskxError(f"this file in torch's cache is not torchvision's {weights_label(release)} (its SHA-256 does not "
                         f"start with {prefix}): delete it and run again, or pass --weights FILE", path)
    if is_release and "norm_eps" not in cfg.detector:
        det_cfg.norm_eps = source.release_eps
    state = read_state_dict(path, f"{source.model} weights")
    state = torchvision_state(state, source, path)
    with torch.device("meta"):  # names only
        target = build_detector(det_cfg, len(categories), pretrained=False).state_dict()
    state = maskx_state(state, source, rows, target)
    detector_from_state(det_cfg, len(categories), state, path)  # strict: loads as every later stage will load it

    record = DetectTrainConfig(data=cfg.data, detector=det_cfg, solver=SolverConfig(iterations=0))
    label = weights_label(release) if is_release else None
    final = out / DETECTOR_CKPT
    with training_run(out, False, (DETECTOR_CKPT,)):  # a write that fails (a full disk) leaves nothing new
        prepare_run_dir(out, "detect-import", {"source": cfg.source, "weights": cfg.weights, **to_dict(record)},
                        {"weights": path, "train_json": cfg.data.train_json})
        if recipe:
            write_recipe(out, recipe)
        save_detector(final, state, to_dict(record), categories, 0)
        update_manifest(out, status="finished", source=cfg.source, torchvision=torchvision.__version__,
                        torchvision_release=label, release_url=release.url, norm_eps=det_cfg.norm_eps,
                        classes=len(categories), predictor_rows=rows, mask_head_dropped=source.box_only)
    return DetectImportResult(out, final, cfg.source, path, label, len(categories), len(release.meta["categories"]) - len(rows))

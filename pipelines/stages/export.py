"""``maskx export``: a trained Mask^X R-CNN as files that run without maskx.

A mask run and its detector become one torchvision ``MaskRCNN`` (:mod:`pipelines.modeling.baked`:
T's output baked into the class-specific mask predictor; with the MLP branch, the predictor is
:class:`~pipelines.modeling.baked.MLPMaskRCNNPredictor`), written in the formats asked for
(:data:`FORMATS`), with ``model.json`` describing it. Files in ``out``:

- ``model_torchvision.pth``: its state dict, plain tensors (``torch.load(..., weights_only=True)``);
  it loads into ``torchvision.models.detection.maskrcnn_resnet50_fpn(num_classes=K + 1)`` when the run
  has that layout (``model.json`` ``torchvision_builder``), else into the model of
  :func:`~pipelines.modeling.baked.torchvision_mask_rcnn` (torchvision's parts; :func:`load_torchvision`);
- ``model.ts``: TorchScript (``torch.jit.load``; needs torch and torchvision only): called with a list
  of images float32 ``[3, H, W]`` in [0, 1], it returns ``(losses, detections)`` as scripted torchvision
  detection models do;
- ``model.onnx``: ONNX (opset :data:`OPSET`) of one image: input ``image`` float32 ``[3, H, W]`` in
  [0, 1], outputs ``boxes`` ``[N, 4]``, ``labels`` int64 ``[N]``, ``scores`` ``[N]``, ``masks`` float32
  ``[N, 1, H, W]`` (probabilities; a pixel is in the mask at ``mask_threshold``);
- ``model.json``: what the files hold (:func:`export_spec`), written last.

Every output is a torchvision detection dict: boxes above ``score_thresh`` (``maskx predict``'s
default, 0.5), masks as probabilities. ``check`` images are predicted by maskx and by every written
file; the differences are in ``model.json`` and must stay within :data:`TOLERANCE`. A failed export
leaves none of its files behind, nor an earlier export's ``model.json`` (which would describe them wrongly).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torchvision.models.detection import MaskRCNN

from pipelines.config import DetectorConfig, HeadConfig, from_dict, to_dict
from pipelines.data.coco import read_image
from pipelines.engine.checkpoint import load_weights
from pipelines.engine.run_dir import (detector_of_mask_run, load_detector_run, load_mask_run, make_output_dir,
                                      mask_checkpoint_path, mask_head_config)
from pipelines.errors import MaskxError
from pipelines.evaluation.predictions import Predictor, predictor_of
from pipelines.io import atomic_path, discard, read_json, sha256_file, write_json
from pipelines.modeling.baked import baked_state_dict, torchvision_builder, torchvision_mask_rcnn
from pipelines.progress import NULL_PROGRESS, Progress

OPSET = 17
SPEC = "model.json"
SPEC_FORMAT = "maskx-export"
Run = Callable[[torch.Tensor], dict]  # one image float32 [3, H, W] -> boxes, labels, scores, masks [N, 1, H, W] (numpy)


@dataclass(frozen=True)
class Tolerance:
    """How far an exported file's output may be from maskx's on the same image: the same detections,
    boxes within ``box_px`` pixels, scores within ``score``, and at most ``mask_pixels`` of the mask
    pixels on the other side of the mask threshold (float32 sums taken in another order)."""

    box_px: float = 1e-3
    score: float = 1e-4
    mask_pixels: float = 1e-4


TOLERANCE = Tolerance()


class TorchvisionStateDict:
    """``model_torchvision.pth``: the baked state dict, plain tensors."""

    name = "torchvision"
    file = "model_torchvision.pth"

    def write(self, model: MaskRCNN, path: Path, example: torch.Tensor) -> None:
        with atomic_path(path) as tmp:
            torch.save(model.state_dict(), tmp)

    def runner(self, path: Path, spec: dict) -> Run:
        model = load_torchvision(path.parent, spec)
        return lambda image: _numpy(model([image])[0])


class TorchScriptFile:
    """``model.ts``: the whole model, ``torch.jit.script``-ed (torchvision's detection models script as they are)."""

    name = "torchscript"
    file = "model.ts"

    def write(self, model: MaskRCNN, path: Path, example: torch.Tensor) -> None:
        with warnings.catch_warnings():  # torch.jit's deprecation notice: the file is what counts
            warnings.simplefilter("ignore")
            scripted = torch.jit.script(model)
        with atomic_path(path) as tmp:
            scripted.save(str(tmp))

    def runner(self, path: Path, spec: dict) -> Run:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = torch.jit.load(str(path), map_location="cpu")

        def run(image: torch.Tensor) -> dict:
            with warnings.catch_warnings():  # "RCNN always returns a (Losses, Detections) tuple in scripting"
                warnings.simplefilter("ignore")
                return _numpy(model([image])[1][0])
        return run


class OnnxFile:
    """``model.onnx``: the whole model traced on ``example`` by torch's TorchScript-based ONNX exporter
    (torchvision's detection models export through it; opset :data:`OPSET`), height and width dynamic."""

    name = "onnx"
    file = "model.onnx"
    inputs = ["image"]
    outputs = ["boxes", "labels", "scores", "masks"]

    def write(self, model: MaskRCNN, path: Path, example: torch.Tensor) -> None:
        axes = {"image": {1: "height", 2: "width"}, **{k: {0: "detections"} for k in self.outputs}}
        axes["masks"] = {0: "detections", 2: "height", 3: "width"}
        with warnings.catch_warnings(), atomic_path(path) as tmp:
            warnings.simplefilter("ignore")  # tracer and deprecation notices: the checks below are what counts
            torch.onnx.export(model, ([example],), str(tmp), dynamo=False, opset_version=OPSET, input_names=self.inputs,
                              output_names=self.outputs, dynamic_axes=axes)

    def runner(self, path: Path, spec: dict) -> Run:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda image: dict(zip(self.outputs, session.run(None, {"image": image.numpy()})))


FORMATS = {f.name: f for f in (TorchvisionStateDict(), TorchScriptFile(), OnnxFile())}


@dataclass
class ExportResult:
    out: Path
    spec: Path
    files: dict[str, Path]  # format name -> file
    sizes: dict[str, int]  # format name -> bytes
    mlp: bool  # the mask predictor carries the MLP branch (MLPMaskRCNNPredictor)
    builder: str | None  # torchvision's builder that takes the state dict, if one does
    checks: list[dict] = field(default_factory=list)  # per check image and format: the differences from maskx
    seconds: float = 0.0


def export(mask_run: str | Path, out: str | Path, detector: str | Path | None = None, formats: list[str] | None = None,
           score_thresh: float = 0.5, mask_threshold: float = 0.5, check: list[str | Path] | None = None,
           progress: Progress = NULL_PROGRESS) -> ExportResult:
    """Export the mask run ``mask_run`` and its detector (``detector``, default: the one it was trained on)
    to ``out`` in ``formats`` (names of :data:`FORMATS`, default all), keeping detections scoring above
    ``score_thresh``. ``check``: images that maskx and every written file predict, compared within
    :data:`TOLERANCE` (an export outside it is an error). See the module docstring for the files."""
    t0 = time.perf_counter()
    names = list(formats or FORMATS)
    unknown = [n for n in names if n not in FORMATS]
    if unknown:
        raise MaskxError(f"unknown export format '{unknown[0]}' (expected {' | '.join(FORMATS)})", key="formats")
    if not 0.0 <= score_thresh <= 1.0:
        raise MaskxError(f"score_thresh must be in [0, 1], got {score_thresh}", key="score_thresh")
    images = [read_image(Path(p)) for p in check or []]
    det = load_detector_run(detector or detector_of_mask_run(mask_run))
    side, ckpt = load_mask_run(mask_run, det)
    checkpoint = mask_checkpoint_path(mask_run)
    pred = predictor_of(det, side, ckpt, "cpu", score_thresh)
    det_cfg, head, k = from_dict(DetectorConfig, det.config["detector"]), mask_head_config(ckpt), len(det.categories)
    model = torchvision_mask_rcnn(det_cfg, head, k, ckpt["in_channels"], score_thresh)
    model.load_state_dict(baked_state_dict(det.model, side, k, checkpoint), assign=True)
    model.eval()
    created = not Path(out).exists()
    out = make_output_dir(out)
    spec = export_spec(det_cfg, head, pred, ckpt["in_channels"], score_thresh, mask_threshold, checkpoint)
    written: list[Path] = [out / SPEC]  # an earlier export's description no longer describes the folder
    try:
        task = progress.task("export", len(names))
        example = torch.rand(3, det_cfg.min_size, det_cfg.min_size, generator=torch.Generator().manual_seed(0))
        files: dict[str, Path] = {}
        for name in names:
            fmt = FORMATS[name]
            files[name] = out / fmt.file
            written.append(files[name])
            with torch.no_grad():
                fmt.write(model, files[name], images[0] if images else example)
            spec["files"][name] = {"file": fmt.file, "bytes": files[name].stat().st_size, "sha256": sha256_file(files[name])}
            task.advance(1)
        task.close()
        spec["checks"] = check_files(pred, files, spec, images, [str(p) for p in check or []], mask_threshold)
        write_json(out / SPEC, spec)
    except BaseException:
        for path in written:
            discard(path)
        if created and not any(out.iterdir()):
            out.rmdir()
        raise
    sizes = {n: spec["files"][n]["bytes"] for n in files}
    return ExportResult(out, out / SPEC, files, sizes, head.mlp, (spec["torchvision_builder"] or {}).get("name"),
                        spec["checks"], time.perf_counter() - t0)


def export_spec(det_cfg: DetectorConfig, head: HeadConfig, pred: Predictor, in_channels: int, score_thresh: float,
                mask_threshold: float, checkpoint: Path) -> dict:
    """``model.json``: the source run, the model's layout (the detector and head settings, torchvision's
    builder if one makes it), the classes (label ``i`` is ``categories[i - 1]``, with its set), thresholds,
    the ONNX signature; ``files`` and ``checks`` are filled in as they are written."""
    in_a = set(pred.set_a)
    categories = [{"label": i + 1, "id": c["id"], "name": c["name"], "set": "A" if c["id"] in in_a else "B"}
                  for i, c in enumerate(pred.categories)]
    return {
        "format": SPEC_FORMAT, "version": 1,
        "mask_run": {"checkpoint": str(checkpoint), "sha256": sha256_file(checkpoint)},
        "detector": {"checkpoint": str(pred.detector), "sha256": sha256_file(pred.detector)},
        "num_classes": len(categories) + 1, "categories": categories, "set_a": sorted(in_a),
        "score_thresh": score_thresh, "mask_threshold": mask_threshold,
        "mask_predictor": "MLPMaskRCNNPredictor" if head.mlp else "MaskRCNNPredictor",
        "torchvision_builder": torchvision_builder(det_cfg, head, len(categories), score_thresh),
        "detector_config": to_dict(det_cfg), "head": to_dict(head), "in_channels": in_channels,
        "onnx": {"opset": OPSET, "inputs": {"image": "float32 [3, height, width], RGB in [0, 1]"},
                 "outputs": {"boxes": "float32 [N, 4] x1, y1, x2, y2 in pixels", "labels": "int64 [N] 1..K",
                             "scores": "float32 [N]", "masks": "float32 [N, 1, height, width] probabilities"}},
        "tolerance": asdict(TOLERANCE),
        "files": {},
    }


def load_torchvision(folder: str | Path, spec: dict | None = None) -> MaskRCNN:
    """The torchvision ``MaskRCNN`` of an export folder, in eval mode: :func:`torchvision_mask_rcnn` of its
    ``model.json`` holding ``model_torchvision.pth``."""
    folder = Path(folder)
    spec = spec or read_json(folder / SPEC, "export description")
    if spec.get("format") != SPEC_FORMAT:
        raise MaskxError(f"not a maskx export description (no 'format: {SPEC_FORMAT}')", folder / SPEC)
    det_cfg = from_dict(DetectorConfig, spec["detector_config"])
    head = from_dict(HeadConfig, spec["head"])
    model = torchvision_mask_rcnn(det_cfg, head, spec["num_classes"] - 1, spec["in_channels"], spec["score_thresh"])
    path = folder / TorchvisionStateDict.file
    state = load_weights(path, "torchvision state dict")
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as exc:
        raise MaskxError(f"does not fit the model {SPEC} describes ({str(exc).splitlines()[-1].strip()[:200]})", path) from None
    return model.eval()


def _numpy(d: dict) -> dict:
    return {k: d[k].detach().cpu().numpy() for k in OnnxFile.outputs}


@torch.no_grad()
def check_files(pred: Predictor, files: dict[str, Path], spec: dict, images: list[torch.Tensor], names: list[str],
                mask_threshold: float) -> list[dict]:
    """Each image predicted by maskx (``pred``) and by each file; one row per image and format with the
    differences (:func:`differences`). Raises a MaskxError naming the file for a row outside :data:`TOLERANCE`."""
    rows = []
    runners = {name: FORMATS[name].runner(path, spec) for name, path in files.items()} if images else {}
    for image, name in zip(images, names):
        ours = pred.run([image], mask_threshold)[0]
        for fmt, run in runners.items():
            diff = differences(ours, run(image), mask_threshold)
            rows.append({"image": name, "format": fmt, **diff})
            if not diff["within_tolerance"]:
                raise MaskxError(f"differs from maskx's prediction of {name} beyond the tolerance ({diff})", files[fmt])
    return rows


def differences(ours: dict, theirs: dict, mask_threshold: float) -> dict:
    """How far ``theirs`` (boxes, labels, scores, masks [N, 1, H, W] probabilities, numpy) is from maskx's
    ``ours`` (a :meth:`Predictor.run` dict: masks uint8 [N, H, W]): detection counts, the largest box and
    score differences, differing labels, and the fraction of mask pixels on the other side of the threshold."""
    n, m = len(ours["boxes"]), len(theirs["boxes"])
    row = {"detections": n, "exported_detections": m}
    if n != m:
        return {**row, "within_tolerance": False}
    if n == 0:
        return {**row, "box_px": 0.0, "score": 0.0, "labels": 0, "mask_pixels": 0.0, "within_tolerance": True}
    masks = np.asarray(theirs["masks"])[:, 0] >= mask_threshold
    row.update(box_px=float(np.abs(ours["boxes"].numpy() - theirs["boxes"]).max()),
               score=float(np.abs(ours["scores"].numpy() - theirs["scores"]).max()),
               labels=int((ours["labels"].numpy() != np.asarray(theirs["labels"])).sum()),
               mask_pixels=float((ours["masks"].numpy().astype(bool) != masks).mean()))
    t = TOLERANCE
    row["within_tolerance"] = (row["box_px"] <= t.box_px and row["score"] <= t.score and row["labels"] == 0
                               and row["mask_pixels"] <= t.mask_pixels)
    return row

"""``maskx slim``: an inference-only, half-precision copy of a finished mask run and its detector.

A stage-2 run folder with the paper's MLP branch holds 157 M parameters in float32 (about 630 MB)
beside a detector run with its feature cache. The copy in ``out`` keeps only what prediction reads,
its weights in float16, and is a run folder every command that reads a mask run takes as it is
(``maskx predict --mask OUT``, ``maskx eval OUT``, ``maskx segment``, ``maskx export OUT``,
``pipelines.api.load(OUT)``), as an end-to-end run folder is:

- ``model_final.pth``: the detector checkpoint, its float32 tensors in float16 (``precision: float16``);
- ``mask_final.pth``: the mask checkpoint, likewise, its ``detector_sha256`` that of the
  ``model_final.pth`` beside it;
- ``config.yaml`` (the mask run's) and ``manifest.json`` (stage ``slim``, the two source checkpoints
  with their SHA-256, and the detector beside it).

Loading casts the weights back to float32 (:func:`pipelines.engine.checkpoint.load_checkpoint`), so
predictions differ from the source run's only by float16's rounding of the weights (a relative 2^-11 at
most; ``docs/deploy.md`` gives the differences measured). A tensor beyond float16's range stays in
float32 (:func:`~pipelines.engine.checkpoint.half_precision`). A failed copy leaves none of its files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipelines.engine.checkpoint import half_precision, load_checkpoint, save_checkpoint
from pipelines.engine.run_dir import (CONFIG, DETECTOR_CKPT, MASK_CKPT, check_mask_fits, check_not_finished, detector_checkpoint_path,
                                      detector_of_mask_run, file_record, make_output_dir, mask_checkpoint_path, prepare_run_dir,
                                      update_manifest)
from pipelines.errors import MaskxError
from pipelines.io import discard, read_yaml, sha256_file


@dataclass
class SlimResult:
    out: Path
    detector: Path  # the float16 detector checkpoint
    mask: Path  # the float16 mask checkpoint
    source_bytes: dict[str, int]  # "detector" / "mask" -> bytes of the source checkpoint
    bytes: dict[str, int]  # the same, of the copies
    kept_float32: list[str]  # tensors left in float32 (beyond float16's range)


def slim(mask_run: str | Path, out: str | Path, detector: str | Path | None = None) -> SlimResult:
    """Write the inference-only float16 copy of ``mask_run`` and its detector (``detector``, default: the one
    it was trained on) to the run folder ``out`` (see the module docstring)."""
    det_path = detector_checkpoint_path(detector or detector_of_mask_run(mask_run))
    mask_path = mask_checkpoint_path(mask_run)
    out = Path(out)
    if out.resolve() in (mask_path.parent.resolve(), det_path.parent.resolve()):
        raise MaskxError("is the source run's own folder: write the copy to another folder", out)
    check_not_finished(out, MASK_CKPT, "mask run")
    det_ckpt = load_checkpoint(det_path, "detector")
    mask_ckpt = load_checkpoint(mask_path, "mask")
    check_mask_fits(mask_ckpt, sha256_file(det_path), mask_path)
    created = not out.exists()
    written: list[Path] = []
    try:
        make_output_dir(out)
        config = read_yaml(mask_path.parent / CONFIG, "run config") if (mask_path.parent / CONFIG).is_file() else {}
        config.pop("stage", None)
        prepare_run_dir(out, "slim", config or mask_ckpt["config"], {})
        written += [out / CONFIG, out / "manifest.json"]
        kept: list[str] = []
        for path, ckpt in ((out / DETECTOR_CKPT, det_ckpt), (out / MASK_CKPT, mask_ckpt)):
            if path.name == MASK_CKPT:
                ckpt["detector_sha256"] = sha256_file(out / DETECTOR_CKPT)
            state, left = half_precision(ckpt["model"])
            kept += left
            payload = {k: v for k, v in ckpt.items() if k not in ("format", "kind")}
            written.append(path)
            save_checkpoint(path, ckpt["kind"], **{**payload, "model": state, "precision": "float16", "float32_kept": left})
        update_manifest(out, status="finished", inputs={"mask": file_record(mask_path), "source_detector": file_record(det_path),
                                                        "detector": file_record(out / DETECTOR_CKPT)})
    except BaseException:
        for path in written:
            discard(path)
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    return SlimResult(out, out / DETECTOR_CKPT, out / MASK_CKPT,
                      {"detector": det_path.stat().st_size, "mask": mask_path.stat().st_size},
                      {"detector": (out / DETECTOR_CKPT).stat().st_size, "mask": (out / MASK_CKPT).stat().st_size}, kept)

"""maskx slim: the float16 inference-only copy, loaded by predict / the Python API as the run it copies.

Tolerance (docs/deploy.md): every detection of the source run has one in the copy of the same class with
its box within 0.05 px and its score within 1e-4 (the copy's order may differ where scores tie to 1e-5),
and the masks of the same boxes differ in at most 0.1% of their pixels.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from maskx_cli.main import app
from pipelines import api
from pipelines.engine.checkpoint import full_precision, half_precision, load_checkpoint
from pipelines.errors import MaskxError
from pipelines.io import sha256_file
from pipelines.stages.slim import slim

pytestmark = pytest.mark.slow
BOX_PX, SCORE, MASK_PIXELS = 0.05, 1e-4, 1e-3


def test_half_precision_keeps_what_float16_cannot_hold():
    state = {"w": torch.tensor([1 / 3, -2.5e-3, 1e-6]), "big": torch.tensor([1.0, 7e4]), "inf": torch.tensor([float("inf"), 1.0]),
             "n": torch.tensor(7), "h": torch.tensor([0.5], dtype=torch.float16)}
    half, kept = half_precision(state)
    assert kept == ["big"] and half["big"] is state["big"]
    assert half["w"].dtype == half["inf"].dtype == half["h"].dtype == torch.float16 and half["n"].dtype == torch.int64
    back = full_precision(half)
    assert back["w"].dtype == torch.float32 and back["n"].dtype == torch.int64
    assert torch.allclose(back["w"][:2], state["w"][:2], rtol=2**-11, atol=0)  # float16's rounding: 11 significant bits
    assert abs(back["w"][2].item() - 1e-6) < 2**-24  # a subnormal: float16's smallest step
    assert back["inf"][0].item() == float("inf")


@pytest.fixture(scope="module")
def slim_copy(tiny_pipeline, tmp_path_factory):
    out = tmp_path_factory.mktemp("slim") / "transfer16"
    result = CliRunner().invoke(app, ["slim", str(tiny_pipeline["runs"]["transfer"]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out, result.stdout.splitlines()


def test_slim_copy_is_float16_half_the_size_and_prints_sizes(tiny_pipeline, slim_copy):
    out, lines = slim_copy
    source = tiny_pipeline["runs"]["transfer"]
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "manifest.json", "mask_final.pth", "model_final.pth"]
    det_src, mask_src = tiny_pipeline["detector"] / "model_final.pth", source / "mask_final.pth"
    for name, src in (("model_final.pth", det_src), ("mask_final.pth", mask_src)):
        assert 0.45 < (out / name).stat().st_size / src.stat().st_size < 0.55
    assert lines[0].startswith("detector: ") and lines[0].endswith(" MiB (float16)") and " -> " in lines[0]
    assert lines[1].startswith("mask: ") and lines[2] == f"run: {out}"

    raw = torch.load(out / "mask_final.pth", weights_only=True)
    assert raw["precision"] == "float16" and raw["float32_kept"] == []
    assert {t.dtype for t in raw["model"].values()} == {torch.float16}
    assert raw["detector_sha256"] == sha256_file(out / "model_final.pth")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "slim" and manifest["status"] == "finished"
    assert manifest["inputs"]["mask"]["sha256"] == sha256_file(mask_src)
    assert manifest["inputs"]["source_detector"]["sha256"] == sha256_file(det_src)

    loaded, original = load_checkpoint(out / "model_final.pth", "detector"), load_checkpoint(det_src, "detector")
    for name, t in original["model"].items():
        assert loaded["model"][name].dtype == t.dtype
        if t.is_floating_point():
            assert torch.allclose(loaded["model"][name], t, rtol=2**-11, atol=2**-24), name


def test_slim_copy_predicts_as_the_source_run(tiny_pipeline, tiny_world, slim_copy, tmp_path):
    out, _ = slim_copy
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)  # elsewhere: it finds its own detector beside it
    ours = api.load(tiny_pipeline["runs"]["transfer"], device="cpu", score_thresh=0.0)
    half = api.load(moved, device="cpu", score_thresh=0.0)
    matched = pixels = differing = 0
    for image in sorted(Path(tiny_world.val_dir).glob("*.png"))[:2]:
        a, b = ours.predict(image), half.predict(image)
        assert len(a["boxes"]) == len(b["boxes"]) == 30
        for box, label, score in zip(a["boxes"], a["labels"], a["scores"]):
            hit = torch.where((b["labels"] == label) & ((b["boxes"] - box).abs().amax(1) <= BOX_PX))[0]
            assert len(hit) >= 1 and (b["scores"][hit] - score).abs().min() <= SCORE
            matched += 1
        same_boxes = half.segment(image, a["boxes"], a["labels"])
        pixels += a["masks"].numel()
        differing += int((same_boxes["masks"] != a["masks"]).sum())
    assert matched == 60 and differing / pixels <= MASK_PIXELS


def test_cli_predict_reads_the_slim_copy(tiny_world, slim_copy, tmp_path):
    out, _ = slim_copy
    image = sorted(Path(tiny_world.val_dir).glob("*.png"))[0]
    result = CliRunner().invoke(app, ["predict", str(image), "--mask", str(out), "--score-thresh", "0", "--out", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    assert len(json.loads((tmp_path / "p" / "predictions.json").read_text())) == 30


def test_slim_refusals(tiny_pipeline, slim_copy):
    out, _ = slim_copy
    source = tiny_pipeline["runs"]["transfer"]
    with pytest.raises(MaskxError) as exc:
        slim(source, source)
    assert exc.value.line() == f"{source}: is the source run's own folder: write the copy to another folder"
    with pytest.raises(MaskxError) as exc:
        slim(source, out)
    assert exc.value.line() == f"{out}: already holds a finished mask run (mask_final.pth); choose another output folder"
    result = CliRunner().invoke(app, ["slim", str(tiny_pipeline["runs"]["agnostic"]), "--out", str(out.parent / "x"), "--detector",
                                      str(out)])
    assert result.exit_code == 2 and not (out.parent / "x").exists()
    assert result.output.strip().startswith(f"error: {tiny_pipeline['runs']['agnostic'] / 'mask_final.pth'}: this mask head was "
                                            "trained on another detector")

"""maskx predict: COCO results with file names, pictures, filters, unreadable images, mismatched runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from typer.testing import CliRunner

from maskx_cli.main import app
from pipelines.checkpoint import load_checkpoint, save_checkpoint
from pipelines.errors import MaskxError
from pipelines.io import sha256_file
from pipelines.stages.predict import class_filter, find_images, predict
from pipelines.visualize import add_legend
from tests.engine.tiny_runs import train_detector_and_mask

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny detector + transfer mask run, and an input folder of 3 images and 1 corrupt file."""
    root = tmp_path_factory.mktemp("predict")
    torch.set_num_threads(1)
    world = train_detector_and_mask(root)
    inputs = root / "inputs"
    shutil.copytree(world.val_dir, inputs)
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return root, inputs


def test_predict_writes_coco_results_and_pictures(trained):
    root, inputs = trained
    r = predict(root / "mask", [inputs], root / "out", score_thresh=0.0, visualize=True)
    good = sorted(p for p in inputs.iterdir() if p.name != "broken.png")
    assert r.images == 3 and len(r.pictures) == 3
    assert [p for p, _ in r.skipped] == [str(inputs / "broken.png")]
    assert "image cannot be read" in r.skipped[0][1]

    results = json.loads(r.predictions.read_text())
    assert len(results) == r.detections > 0
    categories = {c["id"]: c for c in load_checkpoint(root / "det" / "model_final.pth")["categories"]}
    assert {d["file_name"] for d in results} <= {str(p) for p in good}
    for d in results:
        assert d["category_name"] == categories[d["category_id"]]["name"]
        assert 0.0 <= d["score"] <= 1.0 and len(d["bbox"]) == 4
        m = mask_utils.decode({"size": d["segmentation"]["size"], "counts": d["segmentation"]["counts"].encode()})
        assert m.shape == (64, 64) and set(np.unique(m)) <= {0, 1}
    per_image = {}
    for d in results:
        per_image[d["image_id"]] = per_image.get(d["image_id"], 0) + 1
    assert max(per_image.values()) <= 10  # detector.box_detections_per_img

    images = json.loads((root / "out" / "images.json").read_text())
    assert [im["file_name"] for im in images["images"]] == [str(p) for p in good]
    assert images["skipped"][0]["file_name"] == str(inputs / "broken.png")
    for picture, source in zip(r.pictures, good):
        assert picture.name == source.stem + ".png"
        with Image.open(picture) as im, Image.open(source) as src:
            assert im.format == "PNG" and im.size == add_legend(src, 0)[0].size  # the input's size, a legend strip below
            # detections were drawn: the picture is not the input image
            drawn = np.asarray(im.convert("RGB"))[:src.height, :src.width]
            assert not np.array_equal(drawn, np.asarray(src.convert("RGB")))
    assert r.not_drawn == 0  # at most 10 detections per image (detector.box_detections_per_img), all drawn


def test_score_threshold_and_class_filters(trained):
    root, inputs = trained
    everything = json.loads(predict(root / "mask", [inputs], root / "all", score_thresh=0.0).predictions.read_text())
    assert everything
    set_a = set(load_checkpoint(root / "mask" / "mask_final.pth")["set_a"])
    b_only = json.loads(predict(root / "mask", [inputs], root / "b", score_thresh=0.0, only="B").predictions.read_text())
    assert b_only and all(d["category_id"] not in set_a for d in b_only)
    top = max(everything, key=lambda d: d["score"])
    named = predict(root / "mask", [inputs], root / "named", score_thresh=0.0, classes=[top["category_name"]])
    assert {d["category_name"] for d in json.loads(named.predictions.read_text())} == {top["category_name"]}
    above = predict(root / "mask", [inputs], root / "high", score_thresh=top["score"] - 1e-6)
    assert 1 <= above.detections < len(everything)
    with pytest.raises(MaskxError, match="unknown class name 'unicorn'"):
        predict(root / "mask", [inputs], root / "x", classes=["unicorn"])


def test_class_filter_masks():
    cats = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 9, "name": "boat"}]
    assert class_filter(cats, [1]).tolist() == [False, True, True, True]
    assert class_filter(cats, [1], only="A").tolist() == [False, True, False, False]
    assert class_filter(cats, [1], only="B").tolist() == [False, False, True, True]
    assert class_filter(cats, [1], classes=["boat"]).tolist() == [False, False, False, True]
    with pytest.raises(MaskxError, match="leave no class"):
        class_filter(cats, [1], classes=["person"], only="B")


def test_cli_predict_visualize_scaled_and_counts_skipped(trained):
    root, inputs = trained
    out = root / "cli"
    result = CliRunner().invoke(app, ["predict", str(inputs), "--mask", str(root / "mask"), "--detector", str(root / "det"),
                                      "--out", str(out), "--visualize", "--scale", "2", "--score-thresh", "0.0",
                                      "--max-drawn", "2"])
    assert result.exit_code == 0, result.output
    assert "predicted 3 images" in result.output and "1 unreadable skipped" in result.output
    assert f"warning: {inputs / 'broken.png'}: skipped: image cannot be read" in result.output
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 3
    per_image: dict[str, int] = {}
    for d in json.loads((out / "predictions.json").read_text()):
        per_image[Path(d["file_name"]).stem] = per_image.get(Path(d["file_name"]).stem, 0) + 1
    left_out = {stem: max(0, n - 2) for stem, n in per_image.items()}
    assert sum(left_out.values()) > 0
    assert f"pictures: 3 PNG files in {out}; {sum(left_out.values())} more left out (--max-drawn 2)" in result.output
    for png in pngs:  # 2 x the 64-px input, and the legend strip below (one more line when detections were left out)
        with Image.open(png) as im:
            assert im.size == add_legend(Image.new("RGB", (128, 128)), left_out.get(png.stem, 0))[0].size
            assert im.height > 128


def test_predict_notes_exif_orientation_it_does_not_apply(trained, tmp_path):
    """Predictions are on the stored pixel grid, as training reads images; the turned images are named."""
    root, inputs = trained
    first = sorted(p for p in inputs.iterdir() if p.name != "broken.png")[0]
    exif = Image.Exif()
    exif[0x0112] = 8  # viewers turn it 90 degrees counter-clockwise
    with Image.open(first) as im:
        im.save(tmp_path / "turned.png", exif=exif)
        size = im.size
    shutil.copy(first, tmp_path / "plain.png")
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "turned.png"), str(tmp_path / "plain.png"), "--mask",
                                      str(root / "mask"), "--out", str(tmp_path / "out"), "--score-thresh", "0.0"])
    assert result.exit_code == 0, result.output
    assert (f"note: 1 image(s) carry an EXIF orientation, not applied (first: {tmp_path / 'turned.png'}): boxes and masks "
            "are on the stored pixel grid, as training reads images; a viewer shows these turned") in result.output
    records = json.loads((tmp_path / "out" / "images.json").read_text())["images"]
    assert [(r["file_name"], r.get("exif_orientation"), (r["width"], r["height"])) for r in records] == [
        (str(tmp_path / "turned.png"), 8, size), (str(tmp_path / "plain.png"), None, size)]
    detections = json.loads((tmp_path / "out" / "predictions.json").read_text())
    by_file = {name: [(d["bbox"], d["category_id"]) for d in detections if d["file_name"] == name]
               for name in (str(tmp_path / "turned.png"), str(tmp_path / "plain.png"))}
    assert by_file[str(tmp_path / "turned.png")] == by_file[str(tmp_path / "plain.png")]  # the same pixels, not turned


def test_mask_run_of_another_detector_is_refused(trained, tmp_path):
    root, inputs = trained
    ckpt = load_checkpoint(root / "det" / "model_final.pth")
    other = tmp_path / "other_det"
    save_checkpoint(other / "model_final.pth", "detector", **{k: v for k, v in ckpt.items() if k not in ("format", "kind")},
                    note="another detector")
    with pytest.raises(MaskxError, match="this mask head was trained on another detector"):
        predict(root / "mask", [inputs], tmp_path / "out", detector=other)
    result = CliRunner().invoke(app, ["predict", str(inputs), "--mask", str(root / "mask"), "--detector", str(other),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    trained_on = load_checkpoint(root / "mask" / "mask_final.pth")["detector_sha256"][:12]
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].endswith(
        f"this mask head was trained on another detector (sha256 {trained_on}…, given detector "
        f"{sha256_file(other / 'model_final.pth')[:12]}…)")


def test_missing_input_and_no_images(tmp_path):
    with pytest.raises(MaskxError, match="no such image file or folder"):
        find_images([tmp_path / "nope"])
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(MaskxError, match="no image files found"):
        find_images([tmp_path])


def test_a_full_disk_on_predictions_json_leaves_no_pictures_and_nothing_else(trained, tmp_path, monkeypatch):
    """Was: the pictures written before the disk filled stayed, with no predictions.json beside them."""
    import errno
    import os

    import pipelines.evaluation.predictions as predictions
    from pipelines.io import atomic_path

    root, inputs = trained
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("kept")  # what the folder held before stays as it was

    def full_disk(path, text):  # the disk fills while predictions.json is written, after the three pictures
        with atomic_path(path) as tmp:
            tmp.write_text(text[: len(text) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(predictions, "write_text", full_disk)
    args = ["predict", str(inputs), "--mask", str(root / "mask"), "--out", str(out), "--visualize", "--score-thresh", "0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert [s for s in result.output.splitlines() if s.startswith("error:")] == [
        f"error: {out / 'predictions.json'}: could not be written: No space left on device"]
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]  # no picture, no JSON, no staging folder

    monkeypatch.undo()
    assert CliRunner().invoke(app, args).exit_code == 0  # a clean rerun writes every file
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["mine.txt", "predictions.json", "images.json"] + [p.stem + ".png" for p in inputs.iterdir() if p.name != "broken.png"])


def test_predict_pastes_each_mask_on_its_own(trained, tmp_path, monkeypatch):
    """Masks are pasted, encoded and drawn one at a time (a large image held N full-size float masks at once:
    16.8 GB for one 8000 x 8000 image), with the same results as torchvision's paste of them all."""
    import torchvision.models.detection.transform as tv_transform

    from pipelines.modeling import maskx_rcnn
    from pipelines.visualize import MAX_DRAWN

    root, inputs = trained
    full = tmp_path / "full"
    one_by_one = tmp_path / "one"
    predict(root / "mask", [inputs], full, score_thresh=0.0)  # as before: uint8 [N, H, W] stacked ...
    expected = json.loads((full / "predictions.json").read_text())
    pasted = []
    real = maskx_rcnn.paste_mask
    monkeypatch.setattr(maskx_rcnn, "paste_mask", lambda *a: pasted.append(a[2]) or real(*a))
    monkeypatch.setattr(tv_transform, "paste_masks_in_image", lambda *a, **k: pytest.fail("all masks pasted at once"))
    predict(root / "mask", [inputs], one_by_one, score_thresh=0.0, visualize=True)
    assert json.loads((one_by_one / "predictions.json").read_text()) == expected
    per_image: dict[str, int] = {}
    for d in expected:
        per_image[d["file_name"]] = per_image.get(d["file_name"], 0) + 1
    drawn = sum(min(n, MAX_DRAWN) for n in per_image.values())  # the pictures paste the masks they draw
    assert len(pasted) == len(expected) + drawn and len(expected) > 0
    assert set(pasted) == {(64, 64)}

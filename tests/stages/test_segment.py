"""maskx segment: masks for a results file's or a ground truth's boxes, equal to detect_and_segment's on the same boxes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from typer.testing import CliRunner

from maskx_cli.main import app
from pipelines.data.annotations import has_usable_mask
from pipelines.data.coco import read_image
from pipelines.errors import MaskxError
from pipelines.evaluation.predictions import load_predictor
from pipelines.modeling.maskx_rcnn import detect_and_segment
from pipelines.stages.segment import segment
from pipelines.visualize import add_legend
from tests.engine.tiny_runs import train_detector_and_mask

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny detector + transfer mask run, its world, and a results file of the validation boxes
    (scores 0.9, 0.8, ...; no file names) with 2 boxes of a class the detector lacks."""
    root = tmp_path_factory.mktemp("segment")
    torch.set_num_threads(1)
    world = train_detector_and_mask(root)
    gt = json.loads(world.val_json.read_text())
    names = {c["id"]: c["name"] for c in gt["categories"]}
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "category_name": names[a["category_id"]],
                "bbox": a["bbox"], "score": round(0.9 - 0.01 * i, 2)} for i, a in enumerate(gt["annotations"])]
    results += [{"image_id": gt["images"][0]["id"], "category_id": 999, "category_name": "unicorn", "bbox": [1, 1, 9, 9],
                 "score": 0.5}] * 2
    (root / "results.json").write_text(json.dumps(results))
    return root, world, results


def _decode(row: dict) -> np.ndarray:
    return mask_utils.decode({"size": row["segmentation"]["size"], "counts": row["segmentation"]["counts"].encode()})


def _reference_masks(root, world, results) -> dict[tuple, np.ndarray]:
    """(image id, bbox) -> mask of detect_and_segment(given=...) on each image's known-class boxes."""
    pred = load_predictor(root / "mask", device="cpu")
    gt = json.loads(world.val_json.read_text())
    labels = {c["id"]: i + 1 for i, c in enumerate(pred.categories)}
    out = {}
    for im in gt["images"]:
        rows = [r for r in results if r["image_id"] == im["id"] and r["category_id"] in labels]
        xywh = torch.tensor([r["bbox"] for r in rows], dtype=torch.float32)
        given = [{"boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1),
                  "labels": torch.tensor([labels[r["category_id"]] for r in rows])}]
        d = detect_and_segment(pred.model, pred.roi_pool, {"m": pred.head}, [read_image(world.val_dir / im["file_name"])],
                               pred.device, given=given)["m"][0]
        assert d["scores"].tolist() == [1.0] * len(rows)  # given boxes without scores: score 1
        for r, m in zip(rows, d["masks"].numpy()):
            out[(im["id"], tuple(r["bbox"]))] = m
    return out


def test_segment_results_file_reproduces_detect_and_segment(trained):
    root, world, results = trained
    r = segment(root / "mask", root / "results.json", world.val_dir, root / "out", gt=world.val_json, device="cpu")
    rows = json.loads(r.predictions.read_text())
    known = results[:-2]
    assert r.images == 3 and r.boxes == len(rows) == len(known) > 0
    assert r.unknown == {"unicorn (id 999)": 2} and r.skipped == [] and r.annotations is None
    reference = _reference_masks(root, world, results)
    assert len(reference) == len(known)
    some_pixels = 0
    for row, src in zip(rows, known):
        assert (row["image_id"], row["category_id"], row["category_name"]) == (src["image_id"], src["category_id"],
                                                                                src["category_name"])
        assert row["score"] == pytest.approx(src["score"]) and row["bbox"] == pytest.approx(src["bbox"])
        m = _decode(row)
        assert np.array_equal(m, reference[(row["image_id"], tuple(src["bbox"]))])
        some_pixels += int(m.sum())
    assert some_pixels > 0
    images = json.loads((root / "out" / "images.json").read_text())
    assert images["unknown_classes"] == {"unicorn (id 999)": 2} and len(images["images"]) == 3


def test_match_by_name_when_ids_differ(trained, tmp_path):
    root, world, results = trained
    shifted = [{**r, "category_id": r["category_id"] + 1000} for r in results]
    (tmp_path / "shifted.json").write_text(json.dumps(shifted))
    by_id = segment(root / "mask", tmp_path / "shifted.json", world.val_dir, tmp_path / "id", gt=world.val_json, device="cpu")
    assert by_id.boxes == 0 and by_id.images == 0 and sum(by_id.unknown.values()) == len(results)
    by_name = segment(root / "mask", tmp_path / "shifted.json", world.val_dir, tmp_path / "name", gt=world.val_json,
                      match="name", device="cpu")
    plain = json.loads(segment(root / "mask", root / "results.json", world.val_dir, tmp_path / "plain", gt=world.val_json,
                               device="cpu").predictions.read_text())
    rows = json.loads(by_name.predictions.read_text())
    assert by_name.unknown == {"unicorn (id 1999)": 2}
    assert [r["category_id"] for r in rows] == [r["category_id"] + 1000 for r in plain]  # the input's ids kept
    assert [r["segmentation"] for r in rows] == [r["segmentation"] for r in plain]
    with pytest.raises(MaskxError, match="unknown match 'colour'"):
        segment(root / "mask", tmp_path / "shifted.json", world.val_dir, tmp_path / "x", gt=world.val_json, match="colour")


def test_ground_truth_boxes_become_mask_annotations(trained, tmp_path):
    root, world, _ = trained
    gt = json.loads(world.val_json.read_text())
    for a in gt["annotations"][::2]:  # every other annotation box-only, as a labelling tool writes it
        a["segmentation"] = []
    (tmp_path / "boxes_gt.json").write_text(json.dumps(gt))
    r = segment(root / "mask", tmp_path / "boxes_gt.json", world.val_dir, tmp_path / "out", device="cpu")
    rows = json.loads(r.predictions.read_text())
    assert r.boxes == len(gt["annotations"]) and r.unknown == {}
    assert {row["score"] for row in rows} == {1.0}
    filled = json.loads(r.annotations.read_text())
    assert r.filled == len(gt["annotations"][::2])
    for i, (before, after, row) in enumerate(zip(gt["annotations"], filled["annotations"], rows)):
        assert after["id"] == before["id"] and after["bbox"] == before["bbox"]
        if i % 2 == 0:  # box-only: now the predicted mask
            assert has_usable_mask(after) and after["segmentation"] == row["segmentation"]
            assert after["area"] == float(_decode(row).sum())
        else:  # had a mask: as it was
            assert after["segmentation"] == before["segmentation"]


def test_cli_segment_warns_once_and_draws(trained, tmp_path):
    root, world, _ = trained
    out = tmp_path / "cli"
    args = ["segment", str(root / "results.json"), "--images", str(world.val_dir), "--mask", str(root / "mask"),
            "--gt", str(world.val_json), "--out", str(out), "--visualize", "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: 2 box(es) of 1 class(es) the detector does not have were skipped (matched by id): "
                        "unicorn (id 999)"]
    n = len(json.loads((out / "predictions.json").read_text()))
    assert f"segmented {n} boxes on 3 images" in result.output
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 3
    with Image.open(pngs[0]) as im:  # the 64-px image and the legend strip below it
        assert im.size == add_legend(Image.new("RGB", (64, 64)), 0)[0].size and im.height > 64

    no_names = CliRunner().invoke(app, args[:4] + ["--mask", str(root / "mask"), "--out", str(tmp_path / "x")])
    assert no_names.exit_code == 2
    errors = [line for line in no_names.output.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {root / 'results.json'}: result 0 has no 'file_name' and no images list was given: give "
                      "--gt (the ground truth or an images list) to find the images of these image ids"]

"""GrabCut baselines: masks inside their boxes, deterministic, annotation files rewritten for chosen classes only."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from typer.testing import CliRunner

from maskx_cli.main import app
from pipelines.data.grabcut import grabcut_annotations, grabcut_in_box, grabcut_masks

runner = CliRunner()


def _scene():
    """A 96x96 grey-noise image with a red disc (centre 40,44, radius 18) and a blue square nearby."""
    rng = np.random.default_rng(0)
    img = (110 + rng.integers(-15, 15, (96, 96, 3))).astype(np.uint8)
    yy, xx = np.mgrid[:96, :96]
    disc = (yy - 44) ** 2 + (xx - 40) ** 2 <= 18**2
    img[disc] = (220, 30, 30)
    img[60:90, 62:92] = (30, 40, 220)
    return img, disc


def test_mask_within_box_and_close_to_object():
    img, disc = _scene()
    box = (19.5, 23.2, 61.0, 65.0)
    m = grabcut_in_box(img, box)
    assert m.shape == (96, 96) and m.dtype == np.uint8
    outside = np.ones_like(m, bool)
    outside[23:65, 19:61] = False
    assert m[outside].sum() == 0
    iou = (m.astype(bool) & disc).sum() / (m.astype(bool) | disc).sum()
    assert iou > 0.8, iou
    assert np.array_equal(m, grabcut_in_box(img, box))  # deterministic


def test_degenerate_boxes_fall_back_to_the_box():
    img, _ = _scene()
    tiny = grabcut_in_box(img, (10, 10, 11, 30))  # 1 px wide: no GrabCut
    assert tiny.sum() == 20 and tiny[10:30, 10].all()
    whole = grabcut_in_box(img, (0, 0, 96, 96))  # nothing outside to model as background
    assert whole.all()
    assert grabcut_in_box(img, (50, 50, 50, 60)).sum() == 0  # empty box
    many = grabcut_masks(img, np.array([[19, 23, 61, 65], [60, 58, 94, 94]], np.float32))
    assert many.shape == (2, 96, 96)
    assert many[1][:58].sum() == 0 and many[1][:, :60].sum() == 0


def test_annotation_file_rewritten_for_chosen_classes(tmp_path):
    img, disc = _scene()
    (tmp_path / "im").mkdir()
    Image.fromarray(img).save(tmp_path / "im" / "a.png")
    square = np.zeros((96, 96), np.uint8)
    square[60:90, 62:92] = 1
    rle = mask_utils.encode(np.asfortranarray(square))
    rle["counts"] = rle["counts"].decode()
    data = {
        "images": [{"id": 1, "file_name": "a.png", "width": 96, "height": 96}],
        "categories": [{"id": 1, "name": "person"}, {"id": 8, "name": "truck"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 8, "bbox": [20, 24, 40, 40], "segmentation": [[20, 24, 60, 24, 60, 64]]},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [62, 60, 30, 30], "segmentation": rle},
        ],
    }
    src = tmp_path / "train.json"
    src.write_text(json.dumps(data))
    r = runner.invoke(app, ["data", "grabcut", "--in", str(src), "--images", str(tmp_path / "im"), "--classes", "nonvoc",
                            "--out", str(tmp_path / "gc.json")])
    assert r.exit_code == 0, r.output
    out = json.loads((tmp_path / "gc.json").read_text())
    truck, person = out["annotations"]
    assert truck["grabcut"] is True and "grabcut" not in person
    assert person["segmentation"] == rle  # set A untouched
    m = mask_utils.decode(truck["segmentation"])
    assert m[:24].sum() == 0 and m[:, :20].sum() == 0 and m[64:].sum() == 0 and m[:, 60:].sum() == 0
    assert truck["area"] == float(m.sum()) and (m.astype(bool) & disc).sum() > 0.8 * disc.sum()
    res = grabcut_annotations(src, tmp_path / "im", "all", tmp_path / "all.json")
    assert res.replaced == 2 and res.images == 1


def test_eval_grabcut_command(tiny_pipeline, tmp_path):
    out = tmp_path / "gc.json"
    r = runner.invoke(app, ["eval-grabcut", "--detector", str(tiny_pipeline["detector"]), "--split", "nonvoc",
                            "--max-images", "2", "--json", str(out)])
    assert r.exit_code == 0, r.output
    rec = json.loads(out.read_text())
    assert rec["images"] == 2 and set(rec["heads"]["grabcut"]["segm"]) == {"B", "A", "all"}

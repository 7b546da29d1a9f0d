"""COCO 2017 reading: masks in every encoding, crowd regions, odd JPEGs, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from pipelines.data.coco import CocoDataset, annotation_mask, load_coco, missing_images, read_image, unreadable_images
from pipelines.data.splits import COCO_CATEGORIES, VOC_COCO_IDS, complement, resolve_split
from pipelines.errors import MaskxError

H, W = 20, 30


def _square_mask(x0, y0, x1, y1):
    m = np.zeros((H, W), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def _uncompressed_rle(m: np.ndarray) -> dict:
    """COCO's crowd encoding: counts as a list of run lengths, column-major, starting with zeros."""
    flat = m.flatten(order="F")
    counts, cur, run = [], 0, 0
    for v in flat:
        if v != cur:
            counts.append(run)
            cur, run = v, 0
        run += 1
    counts.append(run)
    return {"size": [H, W], "counts": [int(c) for c in counts]}


def _compressed_rle(m: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(m))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def write_coco(tmp_path: Path, mutate=None, name="instances.json") -> Path:
    """A tiny COCO file: 4 images (RGB, grayscale, CMYK, one without annotations), every mask encoding."""
    img_dir = tmp_path / "images"
    img_dir.mkdir(exist_ok=True)
    Image.new("RGB", (W, H), (200, 10, 10)).save(img_dir / "rgb.jpg")
    Image.new("L", (W, H), 128).save(img_dir / "gray.jpg")
    Image.new("CMYK", (W, H), (0, 255, 255, 0)).save(img_dir / "cmyk.jpg")
    Image.new("RGB", (W, H), (0, 0, 0)).save(img_dir / "empty.jpg")
    data = {
        "images": [
            {"id": 1, "file_name": "rgb.jpg", "width": W, "height": H},
            {"id": 2, "file_name": "gray.jpg", "width": W, "height": H},
            {"id": 3, "file_name": "cmyk.jpg", "width": W, "height": H},
            {"id": 4, "file_name": "empty.jpg", "width": W, "height": H},
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 90, "name": "toothbrush"}],
        "annotations": [
            # polygon: the square x 2..10, y 3..9
            {"id": 10, "image_id": 1, "category_id": 1, "bbox": [2, 3, 8, 6], "area": 48, "iscrowd": 0,
             "segmentation": [[2, 3, 10, 3, 10, 9, 2, 9]]},
            # compressed RLE
            {"id": 11, "image_id": 1, "category_id": 18, "bbox": [12, 2, 6, 5], "area": 30, "iscrowd": 0,
             "segmentation": _compressed_rle(_square_mask(12, 2, 18, 7))},
            # crowd region, uncompressed RLE
            {"id": 12, "image_id": 2, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 1,
             "segmentation": _uncompressed_rle(_square_mask(0, 0, 10, 10))},
            {"id": 13, "image_id": 2, "category_id": 90, "bbox": [15, 5, 5, 5], "area": 25, "iscrowd": 0,
             "segmentation": [[15, 5, 20, 5, 20, 10, 15, 10]]},
            {"id": 14, "image_id": 3, "category_id": 18, "bbox": [1, 1, 4, 4], "area": 16, "iscrowd": 0,
             "segmentation": [[1, 1, 5, 1, 5, 5, 1, 5]]},
        ],
    }
    if mutate:
        mutate(data)
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


# -- masks ---------------------------------------------------------------------------------------
def test_every_mask_encoding_decodes_to_the_same_pixels():
    m = _square_mask(3, 4, 9, 11)
    poly = {"segmentation": [[3, 4, 9, 4, 9, 11, 3, 11]]}
    for ann in (poly, {"segmentation": _uncompressed_rle(m)}, {"segmentation": _compressed_rle(m)}):
        got = annotation_mask(ann, H, W)
        assert got.dtype == np.uint8 and got.shape == (H, W)
        if ann is poly:  # polygon rasterisation is within a pixel of the square
            assert abs(int(got.sum()) - int(m.sum())) <= 14 and got[6, 5] == 1 and got[15, 20] == 0
        else:
            np.testing.assert_array_equal(got, m)


def test_too_short_polygons_give_an_empty_mask_not_a_box():
    assert annotation_mask({"segmentation": [[1, 1, 5, 5]]}, H, W).sum() == 0
    assert annotation_mask({"segmentation": []}, H, W).sum() == 0


# -- loading, crowd, empty images, odd JPEGs ------------------------------------------------------
def test_load_keeps_crowd_for_eval_but_never_as_a_target(tmp_path):
    data, report = load_coco(write_coco(tmp_path), require_masks=True)
    assert {a["id"] for a in data["annotations"]} == {10, 11, 12, 13, 14}
    assert report.crowd_annotations == 1 and report.degenerate_boxes == 0
    assert report.images_without_annotations == 1
    ds = CocoDataset(data, tmp_path / "images", with_masks=True, mask_category_ids=[1, 18])
    assert len(ds) == 4
    _, t = ds[1]  # image 2: a crowd person + a toothbrush
    assert t["labels"].tolist() == [3]  # toothbrush is the third category: contiguous labels in category order
    assert t["has_mask"].tolist() == [False]  # toothbrush is not in set A: box only
    assert t["masks"].shape == (1, H, W)
    _, t = ds[0]
    assert t["labels"].tolist() == [1, 2] and t["has_mask"].tolist() == [True, True]
    assert t["boxes"].tolist()[1] == [12.0, 2.0, 18.0, 7.0]
    assert int(t["masks"][1].sum()) == 30
    _, t = ds[3]  # the image without annotations is kept as a negative
    assert t["boxes"].shape == (0, 4) and t["masks"].shape == (0, H, W)
    assert len(CocoDataset(data, tmp_path / "images", drop_empty=True)) == 3


def test_grayscale_and_cmyk_jpegs_read_as_rgb(tmp_path):
    write_coco(tmp_path)
    for name in ("rgb.jpg", "gray.jpg", "cmyk.jpg"):
        im = read_image(tmp_path / "images" / name)
        assert im.shape == (3, H, W) and im.dtype.is_floating_point
        assert 0.0 <= float(im.min()) and float(im.max()) <= 1.0
    gray = read_image(tmp_path / "images" / "gray.jpg")
    assert float((gray[0] - gray[1]).abs().max()) == 0.0  # grey stays grey in all three channels
    cmyk = read_image(tmp_path / "images" / "cmyk.jpg")
    assert cmyk[0].mean() > 0.8 and cmyk[1].mean() < 0.2  # C=0, M=Y=255 is red


def _gradient16() -> np.ndarray:
    """A 16-bit grayscale gradient over the whole 0-65535 range (H x W)."""
    return np.linspace(0, 65535, H * W).round().astype(np.uint16).reshape(H, W)


def test_16_bit_grayscale_png_is_scaled_to_8_bits_not_white(tmp_path):
    """Was: Pillow's conversion clipped every value above 255, so the image read as all white."""
    values = _gradient16()
    Image.fromarray(values).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as im:
        assert im.mode == "I;16"
    im = read_image(tmp_path / "deep.png")
    expected = np.rint(values / 257).astype(np.float32) / 255  # 0-65535 -> 0-255, as 8 bits
    assert im.shape == (3, H, W)
    assert np.array_equal(im[0].numpy(), expected) and np.array_equal(im[2].numpy(), expected)
    assert float(im.min()) == 0.0 and float(im.max()) == 1.0 and 0.45 < float(im.mean()) < 0.55
    # training reads it the same way
    data = {"images": [{"id": 1, "file_name": "deep.png", "width": W, "height": H}], "categories": [{"id": 1, "name": "person"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 3, 8, 6], "area": 48, "iscrowd": 0,
                             "segmentation": [[2, 3, 10, 3, 10, 9, 2, 9]]}]}
    image, _ = CocoDataset(data, tmp_path)[0]
    assert np.array_equal(image[1].numpy(), expected)


def test_images_without_a_value_range_to_scale_from_are_refused(tmp_path):
    Image.fromarray(np.full((H, W), 0.5, np.float32)).save(tmp_path / "float.tif")
    Image.fromarray(np.full((H, W), 70000, np.int32)).save(tmp_path / "wide.tif")
    with pytest.raises(MaskxError, match="floating-point image .* has no defined value range") as err:
        read_image(tmp_path / "float.tif")
    assert err.value.path == str(tmp_path / "float.tif")
    with pytest.raises(MaskxError, match=r"integer values from 70000 to 70000 are beyond 16 bits"):
        read_image(tmp_path / "wide.tif")


def test_exif_orientation_is_read_but_not_applied(tmp_path):
    """COCO's annotations refer to the stored pixel grid: an image tagged 'rotate 90' is read as stored."""
    from pipelines.data.coco import exif_orientation

    stored = np.zeros((H, W, 3), np.uint8)
    stored[:, : W // 2] = 255  # left half white, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # viewers turn it 90 degrees clockwise
    Image.fromarray(stored).save(tmp_path / "turned.png", exif=exif)
    Image.fromarray(stored).save(tmp_path / "plain.png")
    assert (exif_orientation(tmp_path / "turned.png"), exif_orientation(tmp_path / "plain.png")) == (6, 1)
    im = read_image(tmp_path / "turned.png")
    assert im.shape == (3, H, W)  # not W x H
    assert float(im[:, :, : W // 2].min()) == 1.0 and float(im[:, :, W // 2:].max()) == 0.0


# -- errors ---------------------------------------------------------------------------------------
def test_truncated_json_is_one_error_naming_the_file(tmp_path):
    path = write_coco(tmp_path)
    path.write_text(path.read_text()[:200])
    with pytest.raises(MaskxError) as err:
        load_coco(path)
    assert err.value.path == str(path) and "truncated" in err.value.message
    assert "\n" not in err.value.line()


def test_missing_image_file_is_named_when_read(tmp_path):
    data, _ = load_coco(write_coco(tmp_path))
    (tmp_path / "images" / "cmyk.jpg").unlink()
    assert missing_images(data, tmp_path / "images") == ["cmyk.jpg"]
    ds = CocoDataset(data, tmp_path / "images")
    with pytest.raises(MaskxError) as err:
        ds[2]
    assert err.value.path.endswith("cmyk.jpg") and "not found" in err.value.message and "image id 3" in err.value.message


def test_unknown_category_id_is_one_error_naming_the_record(tmp_path):
    path = write_coco(tmp_path, lambda d: d["annotations"][3].update(category_id=12))
    with pytest.raises(MaskxError) as err:
        load_coco(path)
    assert err.value.path == str(path)
    assert "annotation 13" in err.value.message and "category 12" in err.value.message


def test_annotation_of_unknown_image_and_bad_rle_size_are_errors(tmp_path):
    with pytest.raises(MaskxError, match="annotation 10 points at image 99"):
        load_coco(write_coco(tmp_path, lambda d: d["annotations"][0].update(image_id=99)))
    with pytest.raises(MaskxError, match="annotation 11 has an RLE mask of size"):
        load_coco(write_coco(tmp_path, lambda d: d["annotations"][1]["segmentation"].update(size=[5, 5])))


def test_degenerate_boxes_are_skipped_and_counted(tmp_path):
    def mutate(d):
        d["annotations"][0]["bbox"] = [2, 3, 0, 6]  # zero width
        d["annotations"][1]["bbox"] = [12, 2, 6, -5]  # negative height
        d["annotations"][4]["bbox"] = [W + 5, 1, 4, 4]  # wholly outside the image

    data, report = load_coco(write_coco(tmp_path, mutate))
    assert report.degenerate_boxes == 3 and report.first_degenerate == [10, 11, 14]
    assert {a["id"] for a in data["annotations"]} == {12, 13}
    (warning,) = report.warnings("instances.json")
    assert "skipped 3 annotation(s)" in warning and "10, 11, 14" in warning
    assert report.images_without_annotations == 3


# -- class splits by COCO id ------------------------------------------------------------------------
def _coco_cats(shuffle_seed=None):
    cats = [{"id": i, "name": n} for i, n in COCO_CATEGORIES]
    if shuffle_seed is not None:
        np.random.default_rng(shuffle_seed).shuffle(cats)
    return cats


def test_voc_nonvoc_use_coco_ids_not_positions():
    cats = _coco_cats(shuffle_seed=3)
    voc = resolve_split("voc", cats)
    assert set(voc) == set(VOC_COCO_IDS) and len(voc) == 20
    names = {c["id"]: c["name"] for c in cats}
    assert {names[i] for i in voc} >= {"person", "dining table", "tv", "potted plant", "couch"}
    nonvoc = resolve_split("nonvoc", cats)
    assert len(nonvoc) == 60 and not set(voc) & set(nonvoc)
    assert complement(voc, cats) == nonvoc


def test_random_split_is_reproducible_and_depends_on_the_seed():
    cats = _coco_cats()
    a = resolve_split("random:40:1", cats)
    assert a == resolve_split("random:40:1", cats) and len(a) == 40
    assert set(a) == set(resolve_split("random:40:1", _coco_cats(shuffle_seed=5)))  # the file's category order does not matter
    assert set(a) != set(resolve_split("random:40:2", cats))
    with pytest.raises(MaskxError):
        resolve_split("random:0:1", cats)


# -- CLI: maskx data check ----------------------------------------------------------------------------
def _run(args):
    from typer.testing import CliRunner

    from maskx_cli.main import app

    return CliRunner().invoke(app, args, env={"MASKX_CONSOLE_WIDTH": "200", "COLUMNS": "200"})


def test_cli_check_counts_skipped_boxes_and_fails_on_a_missing_image(tmp_path):
    path = write_coco(tmp_path, lambda d: d["annotations"][0].update(bbox=[2, 3, 0, 6]))
    res = _run(["data", "check", str(path), "--images", str(tmp_path / "images"), "--masks"])
    assert res.exit_code == 0, res.output
    assert "warning:" in res.output and "skipped 1 annotation(s)" in res.output and "crowd regions" in res.output
    (tmp_path / "images" / "gray.jpg").unlink()
    res = _run(["data", "check", str(path), "--images", str(tmp_path / "images")])
    assert res.exit_code == 2
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "gray.jpg" in errors[0] and "Traceback" not in res.output
    path.write_text(path.read_text()[:-30])
    res = _run(["data", "check", str(path)])
    assert res.exit_code == 2 and "instances.json" in res.output and "truncated" in res.output


def test_cli_check_flags_file_names_outside_the_image_folder(tmp_path):
    """Was: '../rgb.jpg' and absolute file names passed silently (training reads them from wherever they point)."""
    outside = tmp_path / "elsewhere.jpg"

    def point_out(d):
        d["images"][1]["file_name"] = "../images/gray.jpg"
        d["images"][2]["file_name"] = str(outside)

    path = write_coco(tmp_path, point_out)
    Image.new("RGB", (W, H)).save(outside)
    res = _run(["data", "check", str(path), "--images", str(tmp_path / "images")])
    assert res.exit_code == 0, res.output
    warnings = [ln for ln in res.output.splitlines() if ln.startswith("warning:")]
    assert warnings == [f"warning: {path}: 2 image file_name(s) are absolute or climb out of the image folder with '..' "
                        f"(image id 2 '../images/gray.jpg', image id 3 '{outside}'): they are read from there, not from the "
                        f"image folder"]
    inside = write_coco(tmp_path, lambda d: d["images"][1].update(file_name="sub/../gray.jpg"), name="inside.json")
    (tmp_path / "images" / "sub").mkdir()
    res = _run(["data", "check", str(inside), "--images", str(tmp_path / "images")])
    assert res.exit_code == 0 and "warning:" not in res.output, res.output


def test_which_file_names_leave_their_folder():
    from pipelines.io import leaves_folder

    assert [leaves_folder(n) for n in ("a.jpg", "d/a.jpg", "./a.jpg", "d/../a.jpg", "../a.jpg", "d/../../a.jpg",
                                       "/abs/a.jpg", "C:/a.jpg", "..\\a.jpg")] == [
        False, False, False, False, True, True, True, True, True]


def test_truncated_json_names_line_and_column(tmp_path):
    path = tmp_path / "cut.json"
    path.write_text('{"images": [{"file_name": "a.jp')
    with pytest.raises(MaskxError) as err:
        load_coco(path)
    assert err.value.message == "not valid JSON (truncated or corrupt?): Unterminated string starting at line 1, column 27"
    path.write_text('{"images": [\n  {"id": 1,')
    with pytest.raises(MaskxError) as err:
        load_coco(path)
    assert err.value.message == "not valid JSON (truncated or corrupt?): Expecting property name enclosed in double quotes at line 2, column 12"


def test_cli_check_images_opens_every_image_and_reports_the_unreadable(tmp_path):
    path = write_coco(tmp_path)
    (tmp_path / "images" / "gray.jpg").write_bytes(b"")  # 0 bytes
    (tmp_path / "images" / "cmyk.jpg").write_text("not an image at all")
    res = _run(["data", "check", str(path), "--images", str(tmp_path / "images")])
    assert res.exit_code == 2, res.output
    warnings = [ln for ln in res.output.splitlines() if ln.startswith("warning:")]
    assert warnings == [
        f"warning: {tmp_path / 'images' / 'gray.jpg'}: image cannot be read: the file is empty (0 bytes)",
        f"warning: {tmp_path / 'images' / 'cmyk.jpg'}: image cannot be read: not an image file (or a format Pillow does not know)",
    ]
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: {tmp_path / 'images'}: 2 of the 4 image file(s) listed in instances.json are missing or cannot "
                      f"be read, first: gray.jpg (image cannot be read: the file is empty (0 bytes))"]
    assert "Traceback" not in res.output


def test_unreadable_images_reports_truncated_and_missized_images(tmp_path):
    data, _ = load_coco(write_coco(tmp_path))
    rgb = tmp_path / "images" / "rgb.jpg"
    rgb.write_bytes(rgb.read_bytes()[:150])  # cut mid-stream
    Image.new("RGB", (W + 1, H), (0, 0, 0)).save(tmp_path / "images" / "empty.jpg")
    (tmp_path / "images" / "gray.jpg").unlink()
    bad = dict(unreadable_images(data, tmp_path / "images"))
    assert sorted(bad) == ["empty.jpg", "gray.jpg", "rgb.jpg"]
    assert bad["gray.jpg"] == "image file not found"
    assert bad["empty.jpg"] == f"image is {W + 1}x{H} but its record (id 4) says {W}x{H}"
    assert bad["rgb.jpg"].startswith("image cannot be read (OSError:")


# --------------------------------------------------------------------------------------------
# Box-only annotations: one rule for "has a mask"
@pytest.mark.parametrize("seg, usable", [
    (None, False), ([], False), ([[1, 2, 3, 4]], False), ({"size": [H, W], "counts": ""}, False),
    ([[1, 1, 5, 1, 5, 5]], True), ([[], [1, 1, 5, 1, 5, 5]], True), ({"size": [H, W], "counts": "abc"}, True),
])
def test_has_usable_mask(seg, usable):
    from pipelines.data.annotations import has_usable_mask

    assert has_usable_mask({"segmentation": seg}) is usable
    assert has_usable_mask({}) is False


def test_box_only_annotations_load_and_are_never_mask_targets(tmp_path):
    """segmentation absent, null and [] load as box-only: counted, has_mask False, their mask row all zero."""
    def mutate(d):
        d["annotations"][0].pop("segmentation")
        d["annotations"][1]["segmentation"] = None
        d["annotations"][3]["segmentation"] = []  # [2] is a crowd region

    path = write_coco(tmp_path, mutate)
    data, report = load_coco(path)
    assert report.box_only == 3
    from pipelines.data.annotations import mask_coverage

    cov = {c.category_id: (c.instances, c.with_mask) for c in mask_coverage(data)}
    assert sum(i for i, _ in cov.values()) - sum(m for _, m in cov.values()) == 3
    ds = CocoDataset(data, tmp_path / "images", with_masks=True)
    seen = 0
    for i in range(len(ds)):
        _, t = ds[i]
        anns = ds.anns_by_image.get(ds.images[i]["id"], [])
        for a, hm, m in zip(anns, t["has_mask"].tolist(), t["masks"]):
            if a["id"] in (10, 11, 13):
                assert hm is False and int(m.sum()) == 0
                seen += 1
            else:
                assert hm is True and int(m.sum()) > 0
    assert seen == 3
    with pytest.raises(MaskxError, match=r"annotation 10 has no mask \(segmentation absent\)"):
        load_coco(path, require_masks=True)


def test_a_polygon_outside_its_image_is_no_target(tmp_path):
    def mutate(d):
        d["annotations"][0]["segmentation"] = [[100, 100, 110, 100, 110, 110]]  # beyond the 30x20 image

    data, _ = load_coco(write_coco(tmp_path, mutate))
    ds = CocoDataset(data, tmp_path / "images", with_masks=True)
    _, t = ds[0]
    assert t["has_mask"].tolist()[0] is False


def test_voc_on_categories_that_are_not_cocos_is_refused():
    own = [{"id": 1, "name": "bolt"}, {"id": 2, "name": "nut"}, {"id": 3, "name": "washer"}]
    with pytest.raises(MaskxError, match=r"not COCO's \(id 1 is 'bolt', COCO's id 1 is 'person'\)"):
        resolve_split("voc", own)
    with pytest.raises(MaskxError, match="not COCO's"):
        resolve_split("nonvoc", own)
    # COCO's names (any case, _ for space) and explicit coco_id fields are trusted
    assert resolve_split("voc", [{"id": 1, "name": "Person"}, {"id": 10, "name": "traffic_light"}]) == [1]
    assert resolve_split("voc", [{"id": 1, "name": "bolt", "coco_id": 18}, {"id": 2, "name": "nut", "coco_id": None}]) == [1]
    # ids beyond COCO's are not COCO classes: no objection
    assert resolve_split("nonvoc", [{"id": 1, "name": "person"}, {"id": 500, "name": "bolt"}]) == [500]


def test_annotated_split_is_the_classes_with_masks():
    data = {"categories": [{"id": 4, "name": "a"}, {"id": 7, "name": "b"}, {"id": 9, "name": "c"}],
            "annotations": [{"id": 1, "category_id": 4, "segmentation": [[1, 1, 5, 1, 5, 5]]},
                            {"id": 2, "category_id": 7, "segmentation": []},
                            {"id": 3, "category_id": 9, "segmentation": None},
                            {"id": 4, "category_id": 9, "segmentation": [[1, 1, 5, 1, 5, 5]], "iscrowd": 1}]}
    assert resolve_split("annotated", data["categories"], data) == [4]  # a crowd region is no training mask
    with pytest.raises(MaskxError, match="needs the training annotations"):
        resolve_split("annotated", data["categories"])
    from pipelines.data.splits import training_sets

    with pytest.raises(MaskxError, match=r"holds 1 box-only class\(es\).*: b \(7\)"):
        training_sets("ids:4,7", False, data["categories"], data, "t.json")
    data["annotations"].append({"id": 5, "category_id": 4, "segmentation": []})
    sets = training_sets("annotated", False, data["categories"], data, "t.json")
    assert (sets.set_a, sets.unmasked) == ([4], [5])
    assert sets.warnings == ["t.json: 1 set-A annotation(s) have no mask (segmentation absent, null or empty): they train "
                             "boxes only, no mask loss (annotation id 5)"]
    assert training_sets("annotated", True, data["categories"], data).train_classes == [4, 7, 9]

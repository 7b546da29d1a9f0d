"""Visual Genome 3k preparation: synset counting, COCO alignment, the val2017 hold-out, and errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from typer.testing import CliRunner

from pipelines.data.coco import load_coco
from pipelines.data.splits import coco_id_of, resolve_split
from pipelines.data.visual_genome import (
    VGPrepareConfig,
    align_coco_to_synsets,
    file_name_from_url,
    prepare_vg,
    synset_lemma,
)
from pipelines.errors import MaskxError

URL = "https://cs.stanford.edu/people/rak248/"
COCO_CATS = [
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 11, "name": "fire hydrant", "supercategory": "outdoor"},
    {"id": 13, "name": "stop sign", "supercategory": "outdoor"},
    {"id": 23, "name": "bear", "supercategory": "animal"},
    {"id": 33, "name": "suitcase", "supercategory": "accessory"},
    {"id": 90, "name": "toothbrush", "supercategory": "indoor"},  # no VG class: reported
]


def _obj(oid, synsets, x=1, y=1, w=5, h=5, name="thing"):
    return {"object_id": oid, "x": x, "y": y, "w": w, "h": h, "names": [name], "synsets": synsets}


def vg_v14():
    """image_data.json and objects.json in the v1.4 layout.

    Frequencies (distinct object ids, every synset of an object counted): person 4, tree 4,
    water_faucet 2, sign 2, bag.n.06 2, bear 1, shirt 1, man 1, zebra 1.
    """
    image_data = [
        {"image_id": 1, "url": URL + "VG_100K/1.jpg", "width": 40, "height": 30, "coco_id": 100, "flickr_id": None},
        {"image_id": 2, "url": URL + "VG_100K/2.jpg", "width": 40, "height": 30, "coco_id": 200, "flickr_id": 7},
        {"image_id": 3, "url": URL + "VG_100K_2/3.jpg", "width": 40, "height": 30, "coco_id": None, "flickr_id": None},
        {"image_id": 4, "url": URL + "VG_100K_2/4.jpg", "width": 40, "height": 30, "coco_id": None, "flickr_id": None},
        {"image_id": 5, "url": URL + "VG_100K_2/5.jpg", "width": 40, "height": 30, "coco_id": None, "flickr_id": None},
    ]
    objects = [
        {"image_id": 1, "objects": [
            _obj(101, ["person.n.01"], name="man"), _obj(102, ["person.n.01"], name="woman"),
            _obj(103, ["water_faucet.n.01"], name="fire hydrant"),
        ]},
        {"image_id": 2, "objects": [
            _obj(201, ["person.n.01"], name="person"), _obj(202, ["sign.n.02"], name="stop sign"),
            _obj(203, ["bag.n.06"], name="suitcase"), _obj(204, ["tree.n.01"]), _obj(205, ["tree.n.01"]),
            _obj(206, ["tree.n.01"]),
            _obj(101, ["person.n.01"], name="man"),  # repeated object id: dropped, counted
        ]},
        {"image_id": 3, "objects": [
            _obj(301, [], name="blob"),  # no synset
            _obj(302, ["shirt.n.01", "man.n.01"], name="man in shirt"),  # several synsets
            _obj(303, ["bear.n.01"], x=30, y=20, w=20, h=20, name="bear"),  # clipped to 10x10
            _obj(304, ["tree.n.01"], w=0),  # zero width: dropped
            _obj(305, ["person.n.01"], x=50, y=1),  # outside the 40-px-wide image: dropped
            _obj(306, ["water_faucet.n.01"], name="hydrant"), _obj(307, ["sign.n.02"]), _obj(308, ["bag.n.06"]),
        ]},
        {"image_id": 4, "objects": [_obj(401, ["zebra.n.01"], name="zebra")]},
        {"image_id": 5, "objects": []},
    ]
    return image_data, objects


def to_v12(image_data, objects):
    """The older layout: ``id`` for images and objects, ``name`` instead of ``names``."""
    imgs = [{("id" if k == "image_id" else k): v for k, v in r.items()} for r in image_data]
    objs = []
    for rec in objects:
        o = []
        for ob in rec["objects"]:
            d = {("id" if k == "object_id" else k): v for k, v in ob.items() if k != "names"}
            d["name"] = ob["names"][0]
            o.append(d)
        objs.append({"id": rec["image_id"], "objects": o})
    return imgs, objs


def _rle(h, w, box):
    m = np.zeros((h, w), np.uint8)
    x, y, bw, bh = box
    m[y:y + bh, x:x + bw] = 1
    r = mask_utils.encode(np.asfortranarray(m))
    return {"size": [h, w], "counts": r["counts"].decode("ascii")}


def coco_files(root: Path) -> tuple[Path, Path]:
    ann = root / "coco" / "annotations"
    ann.mkdir(parents=True, exist_ok=True)
    val = {
        "images": [{"id": 100, "file_name": "000000000100.jpg", "width": 40, "height": 30}],
        "categories": COCO_CATS,
        "annotations": [
            {"id": 1, "image_id": 100, "category_id": 1, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0, "segmentation": _rle(30, 40, (1, 1, 5, 5))},
            {"id": 2, "image_id": 100, "category_id": 11, "bbox": [10, 1, 5, 5], "area": 25, "iscrowd": 0, "segmentation": [[10, 1, 15, 1, 15, 6, 10, 6]]},
            {"id": 3, "image_id": 100, "category_id": 90, "bbox": [20, 1, 5, 5], "area": 25, "iscrowd": 0, "segmentation": [[20, 1, 25, 1, 25, 6, 20, 6]]},
        ],
    }
    train = {
        "images": [{"id": 200, "file_name": "000000000200.jpg", "width": 40, "height": 30}],
        "categories": COCO_CATS,
        "annotations": [
            {"id": 4, "image_id": 200, "category_id": 33, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0, "segmentation": [[1, 1, 6, 1, 6, 6, 1, 6]]},
            {"id": 5, "image_id": 200, "category_id": 1, "bbox": [0, 0, 20, 20], "area": 400, "iscrowd": 1, "segmentation": _rle(30, 40, (0, 0, 20, 20))},
        ],
    }
    (ann / "instances_val2017.json").write_text(json.dumps(val))
    (ann / "instances_train2017.json").write_text(json.dumps(train))
    return ann / "instances_train2017.json", ann / "instances_val2017.json"


def vg_files(root: Path, layout: str = "v1.4", images: bool = True) -> Path:
    vg = root / "vg"
    vg.mkdir(parents=True, exist_ok=True)
    image_data, objects = vg_v14()
    if layout == "v1.2":
        image_data, objects = to_v12(image_data, objects)
    (vg / "image_data.json").write_text(json.dumps(image_data))
    (vg / "objects.json").write_text(json.dumps(objects))
    if images:
        for sub, n in (("VG_100K", 1), ("VG_100K", 2), ("VG_100K_2", 3), ("VG_100K_2", 4), ("VG_100K_2", 5)):
            (vg / sub).mkdir(exist_ok=True)
            Image.new("RGB", (40, 30)).save(vg / sub / f"{n}.jpg")
    return vg


def _cfg(root: Path, layout="v1.4", **kw) -> VGPrepareConfig:
    vg = vg_files(root, layout)
    train, val = coco_files(root)
    return VGPrepareConfig(image_data=str(vg / "image_data.json"), objects=str(vg / "objects.json"), coco_train=str(train),
                           coco_val=str(val), out=str(root / "out"), images=str(vg), **{"num_classes": 8, **kw})


# ------------------------------------------------------------------------------------------------
def test_helpers():
    assert synset_lemma("traffic_light.n.01") == "traffic light"
    assert file_name_from_url(URL + "VG_100K_2/17.jpg") == "VG_100K_2/17.jpg"


def test_prepare_vg_classes_alignment_and_counts(tmp_path):
    r = prepare_vg(_cfg(tmp_path))
    s = r.stats
    assert s["duplicate_object_ids_dropped"] == 1
    assert s["objects_without_synset"] == 1 and s["objects_with_several_synsets"] == 1
    assert s["degenerate_boxes_dropped"] == 2 and s["boxes_clipped_to_image"] == 1
    # 9 synsets, 8 kept: of the four with frequency 1 (bear, man, shirt, zebra) zebra loses the tie by name
    assert s["distinct_synsets"] == 9 and r.num_classes == 8 and s["objects_not_in_classes"] == 1
    assert r.coco_unmatched == ["toothbrush"] and any("toothbrush" in w for w in r.warnings)

    out = Path(r.out)
    train = json.loads((out / "vg_train.json").read_text())
    cats = train["categories"]
    # the COCO classes first, in COCO id order, with their COCO ids; the rest by frequency, coco_id null
    assert [(c["name"], c["synset"], c["coco_id"]) for c in cats[:5]] == [
        ("person", "person.n.01", 1), ("fire hydrant", "water_faucet.n.01", 11), ("stop sign", "sign.n.02", 13),
        ("bear", "bear.n.01", 23), ("suitcase", "bag.n.06", 33),
    ]
    assert [c["synset"] for c in cats[5:]] == ["tree.n.01", "man.n.01", "shirt.n.01"]
    assert all(c["coco_id"] is None for c in cats[5:]) and [c["id"] for c in cats] == list(range(1, 9))
    assert [coco_id_of(c) for c in cats[5:]] == [None] * 3
    assert resolve_split("voc", cats) == [1]  # person is the only VOC class here, found by coco_id
    assert cats[1]["match"] == "hand" and cats[0]["match"] == "name" and cats[1]["vg_name"] in ("fire hydrant", "hydrant")

    # COCO val2017 images (VG image 1, coco_id 100) are validation, never training
    val = json.loads((out / "vg_val.json").read_text())
    assert [i["id"] for i in val["images"]] == [1] and val["images"][0]["file_name"] == "VG_100K/1.jpg"
    assert sorted(i["id"] for i in train["images"]) == [2, 3, 4, 5]
    assert not {a["image_id"] for a in train["annotations"]} & {1}
    assert sorted(a["id"] for a in val["annotations"]) == [101, 102, 103]
    assert sorted(a["id"] for a in train["annotations"]) == [201, 202, 203, 204, 205, 206, 303, 306, 307, 308]
    bear = next(a for a in train["annotations"] if a["id"] == 303)
    assert bear["bbox"] == [30.0, 20.0, 10.0, 10.0] and bear["category_id"] == 4 and "segmentation" not in bear
    # the written files are valid COCO files for the rest of the pipeline
    data, report = load_coco(out / "vg_train.json")
    assert len(data["annotations"]) == 10 and report.degenerate_boxes == 0

    # COCO masks on VG class ids, with the full VG class list; toothbrush's mask is left out
    cm_val = json.loads((out / "coco_masks_val.json").read_text())
    assert cm_val["categories"] == cats
    assert sorted((a["id"], a["category_id"]) for a in cm_val["annotations"]) == [(1, 1), (2, 2)]
    cm_train = json.loads((out / "coco_masks_train.json").read_text())
    assert sorted((a["id"], a["category_id"], a["iscrowd"]) for a in cm_train["annotations"]) == [(4, 5, 0), (5, 1, 1)]
    assert s["coco_masks_of_unmatched_classes_dropped"] == 1
    load_coco(out / "coco_masks_train.json", require_masks=True)

    rows = (out / "classes.tsv").read_text().splitlines()
    assert rows[0].split("\t")[:5] == ["id", "synset", "name", "coco_id", "frequency"]
    assert rows[2].split("\t")[:5] == ["2", "water_faucet.n.01", "fire hydrant", "11", "2"]
    assert rows[6].split("\t")[:5] == ["6", "tree.n.01", "tree", "", "4"]
    report_json = json.loads((out / "prepare_report.json").read_text())
    assert report_json["coco_alignment"]["suitcase"] == {"coco_id": 33, "synset": "bag.n.06", "match": "hand"}


def test_both_vg_layouts_give_the_same_files(tmp_path):
    a = prepare_vg(_cfg(tmp_path / "a", "v1.4"))
    b = prepare_vg(_cfg(tmp_path / "b", "v1.2"))
    for name in ("vg_train.json", "vg_val.json", "coco_masks_train.json", "classes.tsv"):
        assert (Path(a.out) / name).read_text() == (Path(b.out) / name).read_text(), name
    assert "'id'" in b.layout and "'image_id'" in a.layout


def test_unknown_vg_layout_is_one_error_naming_the_file(tmp_path):
    cfg = _cfg(tmp_path)
    Path(cfg.objects).write_text(json.dumps([{"img": 1, "boxes": []}]))
    with pytest.raises(MaskxError) as err:
        prepare_vg(cfg)
    assert err.value.path == cfg.objects and "unknown Visual Genome layout" in err.value.message
    Path(cfg.image_data).write_text(json.dumps({"images": []}))
    with pytest.raises(MaskxError) as err:
        prepare_vg(cfg)
    assert err.value.path == cfg.image_data
    assert not (tmp_path / "out" / "vg_train.json").exists()  # nothing half-written


def test_vg_files_that_do_not_belong_together_are_refused_both_ways(tmp_path):
    cfg = _cfg(tmp_path)
    image_data = json.loads(Path(cfg.image_data).read_text())
    objects = json.loads(Path(cfg.objects).read_text())
    # objects.json longer: a record of an image image_data.json does not list
    Path(cfg.image_data).write_text(json.dumps(image_data[:-1]))
    with pytest.raises(MaskxError, match=r"objects record of image 5, which is not in image_data.json: the two files do "
                                         r"not belong together") as err:
        prepare_vg(cfg)
    assert err.value.path == cfg.objects
    # objects.json shorter (cut short, or of another release): images with no objects record at all
    Path(cfg.image_data).write_text(json.dumps(image_data))
    Path(cfg.objects).write_text(json.dumps(objects[:-2]))
    with pytest.raises(MaskxError) as err:
        prepare_vg(cfg)
    assert err.value.path == cfg.objects
    assert err.value.message == ("2 of the 5 images of image_data.json have no objects record here (first: image 4): the "
                                 "two files do not belong together, or this one is cut short")
    assert not (tmp_path / "out" / "vg_train.json").exists()


def test_missing_vg_image_fails_unless_allowed(tmp_path):
    cfg = _cfg(tmp_path)
    (Path(cfg.images) / "VG_100K_2" / "3.jpg").unlink()
    with pytest.raises(MaskxError, match=r"1 of 5 images .* first: VG_100K_2/3.jpg"):
        prepare_vg(cfg)
    cfg.allow_missing_images = True
    r = prepare_vg(cfg)
    assert r.stats["missing_images_dropped"] == 1 and r.train_images == 3


def test_alignment_rules():
    cats = [{"id": 1, "name": "person"}, {"id": 38, "name": "kite"}, {"id": 11, "name": "fire hydrant"}]
    # by name, the most frequent synset of that lemma wins; the hand map's first candidate present wins
    matched, unmatched = align_coco_to_synsets(cats, ["kite.n.03", "person.n.01", "kite.n.01", "fireplug.n.01"])
    assert matched == {1: ("person.n.01", "name"), 38: ("kite.n.03", "name"), 11: ("fireplug.n.01", "hand")}
    assert unmatched == []
    matched, unmatched = align_coco_to_synsets(cats, ["person.n.01"], {"kite": ["person.n.01"]})
    assert unmatched == ["fire hydrant", "kite (person.n.01 is already 'person')"]


def test_hand_map_file_overrides(tmp_path):
    hm = tmp_path / "hand.json"
    hm.write_text(json.dumps({"toothbrush": ["shirt.n.01"]}))
    r = prepare_vg(_cfg(tmp_path, hand_map=str(hm)))
    assert r.coco_unmatched == [] and r.coco_classes_matched == 6


# -- CLI -------------------------------------------------------------------------------------------
def _run(args):
    from maskx_cli.main import app

    return CliRunner().invoke(app, args, env={"MASKX_CONSOLE_WIDTH": "120", "COLUMNS": "120"})


def test_cli_prepare_vg_prints_statistics(tmp_path):
    vg = vg_files(tmp_path)
    coco_files(tmp_path)
    res = _run(["data", "prepare-vg", "--vg", str(vg), "--coco", str(tmp_path / "coco"), "--out", str(tmp_path / "out"), "--num-classes", "8"])
    assert res.exit_code == 0, res.output
    assert "classes kept" in res.output and "val images (in COCO val2017)" in res.output
    assert "toothbrush" in res.output and "warning" in res.output
    assert (tmp_path / "out" / "coco_masks_val.json").is_file()


def test_cli_errors_are_one_line_and_exit_2(tmp_path):
    vg = vg_files(tmp_path)
    coco_files(tmp_path)
    (vg / "objects.json").write_text('[{"image_id": 1, "objects": [')  # truncated
    res = _run(["data", "prepare-vg", "--vg", str(vg), "--coco", str(tmp_path / "coco"), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and "objects.json" in errors[0] and "truncated" in errors[0]
    assert "Traceback" not in res.output
    res = _run(["data", "prepare-vg", "--vg", str(vg), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and "--coco-train" in res.output


def test_hand_mapped_synset_beyond_the_top_classes_is_kept_as_an_extra_class(tmp_path):
    # 4 classes: person, tree (4 objects each), then of the 2-object synsets bag.n.06 and sign.n.02 win the
    # tie by name; fire hydrant's hand-mapped water_faucet.n.01 (2 objects) is not among them. The original
    # preparation keeps such a class (its VG3k configs: 3,000 + 1 classes), so it becomes class 2 of 5.
    r = prepare_vg(_cfg(tmp_path, num_classes=4))
    out = Path(r.out)
    cats = json.loads((out / "vg_train.json").read_text())["categories"]
    assert [(c["synset"], c["coco_id"], c["match"]) for c in cats] == [
        ("person.n.01", 1, "name"), ("water_faucet.n.01", 11, "extra"), ("sign.n.02", 13, "hand"),
        ("bag.n.06", 33, "hand"), ("tree.n.01", None, ""),
    ]
    assert r.num_classes == 5 and r.stats["coco_extra_classes"] == 1
    assert r.coco_extra == ["fire hydrant (water_faucet.n.01, 2 objects)"]
    assert any("kept as extra classes" in w and "fire hydrant" in w for w in r.warnings)
    # bear matches by name only, and bear.n.01 is not a class: left out, as before
    assert r.coco_unmatched == ["bear", "toothbrush"]
    # its COCO masks are kept under its VG id (COCO val annotation 2 is a fire hydrant) ...
    cm_val = json.loads((out / "coco_masks_val.json").read_text())
    assert sorted((a["id"], a["category_id"]) for a in cm_val["annotations"]) == [(1, 1), (2, 2)]
    # ... and so are its VG boxes (objects 103 in a val image, 306 in a train image)
    boxes = {k: {a["id"] for a in json.loads((out / f"vg_{k}.json").read_text())["annotations"] if a["category_id"] == 2}
             for k in ("train", "val")}
    assert boxes == {"train": {306}, "val": {103}}
    assert resolve_split("coco", cats) == [1, 2, 3, 4]


def test_extra_class_takes_the_first_hand_candidate_vg_uses():
    cats = [{"id": 11, "name": "fire hydrant"}, {"id": 52, "name": "hot dog"}]
    hand = {"fire hydrant": ["water_faucet.n.01", "hydrant.n.01"], "hot dog": ["hotdog.n.01", "frank.n.02"]}
    matched, unmatched = align_coco_to_synsets(cats, ["person.n.01"], hand, {"person.n.01", "hydrant.n.01"})
    # a candidate among the classes would win; none is, so the first one VG uses, else the first one
    assert matched == {11: ("hydrant.n.01", "extra"), 52: ("hotdog.n.01", "extra")} and unmatched == []


def test_a_full_disk_on_the_third_file_leaves_none_of_the_six(tmp_path, monkeypatch):
    """Was: prepare-vg on a full disk left 2 of its 6 files."""
    import errno
    import os

    import pipelines.data.visual_genome as vgmod
    from pipelines.io import atomic_path

    vg = vg_files(tmp_path)
    coco_files(tmp_path)
    out = tmp_path / "out"
    written = []
    real = vgmod._write_compact_json

    def fills_on_third(path, obj):
        if len(written) == 2:
            with atomic_path(path) as tmp:
                tmp.write_text("{")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written.append(path.name)
        real(path, obj)

    monkeypatch.setattr(vgmod, "_write_compact_json", fills_on_third)
    args = ["data", "prepare-vg", "--vg", str(vg), "--coco", str(tmp_path / "coco"), "--out", str(out), "--num-classes", "8"]
    res = _run(args)
    assert res.exit_code == 2, res.output
    assert written == ["vg_train.json", "vg_val.json"]
    assert [s for s in res.output.splitlines() if s.startswith("error:")] == [
        f"error: {out / 'coco_masks_train.json'}: could not be written: No space left on device"]
    assert list(out.iterdir()) == []  # none of the six, no staging folder
    monkeypatch.undo()
    assert _run(args).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(vgmod.OUTPUT_FILES.values())
    report = json.loads((out / "prepare_report.json").read_text())
    assert report["result"]["files"]["classes"] == str(out / "classes.tsv")  # the files' final places

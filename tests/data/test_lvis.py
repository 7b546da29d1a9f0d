"""LVIS v1: reading into the COCO dict, class splits, and AP with the LVIS API's federated rules
(the comparison with LVISEval run by hand is in tests/evaluation/test_lvis_eval.py)."""

from __future__ import annotations

import copy
import json
import logging

import pytest

from pipelines.data.coco import load_coco, load_lvis
from pipelines.data.lvis import file_name_from_url
from pipelines.data.splits import resolve_split
from pipelines.errors import MaskxError
from pipelines.evaluation import BACKENDS, LVIS_METRICS, evaluate, score
from tests.evaluation.cases import lvis_det as _det, lvis_dict, lvis_perfect as perfect


@pytest.fixture
def gt(tmp_path):
    path = tmp_path / "lvis_v1_val.json"
    path.write_text(json.dumps(lvis_dict()))
    data, _ = load_lvis(path, require_masks=True)
    return data


# -- reading ----------------------------------------------------------------------------------------
def test_load_lvis_derives_file_names_and_coco_ids(tmp_path, gt):
    assert file_name_from_url("http://images.cocodataset.org/val2017/000000397133.jpg") == "val2017/000000397133.jpg"
    assert [i["file_name"] for i in gt["images"]] == ["train2017/000000000001.jpg", "val2017/000000000002.jpg", "train2017/000000000003.jpg"]
    assert [c["coco_id"] for c in gt["categories"]] == [None, 1, 18, 24]
    assert gt["images"][0]["neg_category_ids"] == [3] and gt["images"][1]["not_exhaustive_category_ids"] == [3]
    assert all(a["iscrowd"] == 0 for a in gt["annotations"])
    # every stage's load_coco reads LVIS files the same way
    again, _ = load_coco(tmp_path / "lvis_v1_val.json")
    assert again["images"] == gt["images"] and again["categories"] == gt["categories"]


def test_lvis_errors_name_the_file_and_record(tmp_path):
    d = lvis_dict()
    d["images"][1]["neg_category_ids"] = [77]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    with pytest.raises(MaskxError) as err:
        load_lvis(path)
    assert err.value.path == str(path) and "image record 2" in err.value.message and "77" in err.value.message
    d = lvis_dict()
    del d["images"][0]["not_exhaustive_category_ids"]
    path.write_text(json.dumps(d))
    with pytest.raises(MaskxError, match="image record 1 has no 'not_exhaustive_category_ids'"):
        load_lvis(path)
    path.write_text(json.dumps(lvis_dict())[:-40])
    with pytest.raises(MaskxError, match="truncated"):
        load_lvis(path)


# -- splits -------------------------------------------------------------------------------------------
def test_lvis_splits(gt):
    cats = gt["categories"]
    assert resolve_split("frequency:f", cats) == [2, 4]
    assert resolve_split("frequency:fc", cats) == [2, 3, 4]
    assert resolve_split("coco", cats) == [2, 3, 4] and resolve_split("noncoco", cats) == [1]
    assert resolve_split("voc", cats) == [2, 3]  # person and dog, by COCO id (never LVIS ids 1..20)
    assert resolve_split("nonvoc", cats) == [1, 4]
    assert resolve_split("random:2:0", cats) == resolve_split("random:2:0", cats)
    for bad in ("frequency:x", "frequency:", "rare"):
        with pytest.raises(MaskxError):
            resolve_split(bad, cats)


# -- evaluation ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_perfect_detections_give_ap_one(gt, backend):
    for iou_type in ("segm", "bbox"):
        res = evaluate(gt, perfect(gt), iou_type, backend=backend)
        assert list(res) == LVIS_METRICS
        for k in ("AP", "AP50", "AP75", "APm", "APc", "APf"):
            assert res[k] == pytest.approx(1.0), (iou_type, k)
        assert res["APs"] is None and res["APl"] is None  # no small or large object
        assert res["APr"] is None  # the rare class has no ground truth here
    # a subset (set B): only its classes count
    res = evaluate(gt, perfect(gt)[:1], "segm", cat_ids=[2], backend=backend)  # one of the two persons found
    assert res["AP"] == pytest.approx(0.5, abs=0.01) and res["APc"] is None and res["APf"] == pytest.approx(res["AP"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_federated_rules(gt, backend):
    good = perfect(gt)

    def dog_ap(g, res):
        return evaluate(g, res, "segm", cat_ids=[3], backend=backend)["AP"]

    dog_on_1 = _det(1, 3, 60, 60, 0.95)  # dog on image 1, where dog was checked absent: a false positive
    assert dog_ap(gt, good + [dog_on_1]) == pytest.approx(0.5)
    # the same detection on image 3, which has no dog and does not list dog as absent: ignored
    assert dog_ap(gt, good + [_det(3, 3, 60, 60, 0.95)]) == pytest.approx(1.0)
    # an unmatched dog on image 2, where dog is not exhaustively marked: ignored, not a false positive
    extra_dog_on_2 = _det(2, 3, 0, 55, 0.95)
    assert dog_ap(gt, good + [extra_dog_on_2]) == pytest.approx(1.0)
    exhaustive = copy.deepcopy(gt)
    exhaustive["images"][1]["not_exhaustive_category_ids"] = []
    assert dog_ap(exhaustive, good + [extra_dog_on_2]) == pytest.approx(0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_is_silent_and_leaves_gt_alone(gt, capsys, caplog, backend):
    before = copy.deepcopy(gt)
    with caplog.at_level(logging.DEBUG):
        evaluate(gt, perfect(gt), "segm", backend=backend)
        empty = evaluate(gt, [], "segm", backend=backend)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    assert not [r for r in caplog.records if r.name.startswith("lvis")]
    assert gt == before
    assert empty["AP"] == 0.0 and empty["APr"] is None


def test_eval_errors(gt):
    with pytest.raises(MaskxError, match="result 0 is on image 9, which is not in the ground truth"):
        evaluate(gt, [_det(9, 2, 0, 0, 0.5)], "segm")
    with pytest.raises(MaskxError, match="category 9"):
        evaluate(gt, perfect(gt), "segm", cat_ids=[9])
    broken = {**gt, "images": [{k: v for k, v in i.items() if k != "not_exhaustive_category_ids"} for i in gt["images"]]}
    with pytest.raises(MaskxError, match="not LVIS: image 1"):
        evaluate(broken, perfect(gt), "segm")
    assert score(gt, perfect(gt), {"all": [1, 2, 3, 4]}).protocol == "lvis"

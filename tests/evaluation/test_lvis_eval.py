"""LVIS scoring equals LVISEval run by hand (both backends), and differs from COCOeval where LVIS's rules say so."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from pipelines.evaluation import BACKENDS, LVIS_METRICS, evaluate, evaluate_sets, score
from pipelines.evaluation import lvis_eval
from pipelines.evaluation.lvis_eval import _import_lvis, cap_per_image
from tests.evaluation.cases import random_case, rect_rle

TOL = 1e-12
pytestmark = pytest.mark.filterwarnings("ignore:The .warn. method is deprecated:DeprecationWarning")


def lvisify(gt: dict, seed: int) -> dict:
    """A random COCO case made LVIS: frequencies, neg_category_ids among the absent classes,
    not_exhaustive_category_ids among the present ones, no crowd."""
    rng = np.random.default_rng(seed)
    cats = [c["id"] for c in gt["categories"]]
    for i, c in enumerate(gt["categories"]):
        c["frequency"] = "rcf"[(i + seed) % 3]
    present: dict[int, set[int]] = {}
    for a in gt["annotations"]:
        present.setdefault(a["image_id"], set()).add(a["category_id"])
        a["iscrowd"] = 0
    for im in gt["images"]:
        p = present.get(im["id"], set())
        im["neg_category_ids"] = [c for c in cats if c not in p and rng.random() < 0.5]
        im["not_exhaustive_category_ids"] = sorted(c for c in p if rng.random() < 0.3)
    return gt


def by_hand(tmp_path, gt: dict, results: list[dict], iou_type: str, cat_ids: list[int]) -> list:
    """LVISEval as its README runs it: LVIS(file), LVISResults(gt, results), params.cat_ids = the subset."""
    lvis = _import_lvis()  # the LVIS API with numpy>=1.24's missing np.float restored
    path = tmp_path / "lvis_gt.json"
    path.write_text(json.dumps(gt))
    res = copy.deepcopy(results)
    for r in res:  # segm: mask areas for the size ranges (LVISResults takes box areas when a bbox is there)
        r.pop("bbox" if iou_type == "segm" else "segmentation", None)
    lvis_gt = lvis.LVIS(str(path))
    ev = lvis.LVISEval(lvis_gt, lvis.LVISResults(lvis_gt, res, max_dets=300), iou_type)
    ev.params.cat_ids = cat_ids
    ev.run()
    return [None if ev.results[k] == -1 else float(ev.results[k]) for k in LVIS_METRICS]


def assert_same(got: dict, expected: list) -> None:
    assert list(got) == LVIS_METRICS
    for k, e in zip(LVIS_METRICS, expected):
        if e is None:
            assert got[k] is None, k
        else:
            assert got[k] == pytest.approx(e, abs=TOL), k


def _cases():
    for seed in range(4):
        gt, res = random_case(seed=20 + seed, n_images=14, n_cats=6, crowd=False, empty_images=2)
        if seed % 2:  # tied scores
            for r in res:
                r["score"] = round(r["score"] * 3) / 3
        yield f"random{seed}", lvisify(gt, seed), res


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_equals_lvis_eval_by_hand(tmp_path, backend, iou_type):
    for name, gt, res in _cases():
        cats = [c["id"] for c in gt["categories"]]
        sets = {"all": cats, "B": cats[::2], "one": cats[1:2]}
        got = evaluate_sets(gt, res, sets, (iou_type,), backend=backend)[iou_type]
        for s, ids in sets.items():
            assert_same(got[s], by_hand(tmp_path, gt, res, iou_type, ids))


def test_class_groups_stitch_to_one_run(tmp_path, monkeypatch):
    # tiny groups: every class (and most images) in a faster-coco-eval run of its own
    name, gt, res = next(_cases())
    cats = [c["id"] for c in gt["categories"]]
    monkeypatch.setattr(lvis_eval, "PAIR_BUDGET", 4)
    got = evaluate(gt, res, "segm", backend="faster")
    assert_same(got, by_hand(tmp_path, gt, res, "segm", cats))


def _square(x, y, s):
    return {"bbox": [x, y, s, s], "segmentation": rect_rle(x, y, s, s, 100, 100)}


def three_hundred_case():
    """One image, one 'cat' (common) object; 299 false 'cat' detections of higher score, then the hit."""
    gt = {"images": [{"id": 1, "height": 100, "width": 100, "file_name": "1.png", "neg_category_ids": [2],
                      "not_exhaustive_category_ids": []}],
          "categories": [{"id": 1, "name": "cat", "frequency": "c"}, {"id": 2, "name": "dog", "frequency": "r"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "area": 1600.0, "iscrowd": 0, **_square(50, 50, 40)}]}
    res = [{"image_id": 1, "category_id": 1, "score": 0.9, **_square(i % 40, i // 40, 4)} for i in range(299)]
    res.append({"image_id": 1, "category_id": 1, "score": 0.1, **_square(50, 50, 40)})
    return gt, res


@pytest.mark.parametrize("backend", BACKENDS)
def test_three_hundred_detections_per_image(tmp_path, backend):
    gt, res = three_hundred_case()
    # LVIS keeps 300 per image: the hit is the 300th, precision 1/300 at recall 1 -> AP = 1/300
    assert evaluate(gt, res, "bbox", backend=backend)["AP"] == pytest.approx(1 / 300, abs=TOL)
    assert by_hand(tmp_path, gt, res, "bbox", [1])[0] == pytest.approx(1 / 300, abs=TOL)
    # a 301st detection of higher score pushes the hit out
    more = res + [{"image_id": 1, "category_id": 2, "score": 0.95, **_square(0, 90, 4)}]
    assert evaluate(gt, more, "bbox", [1], backend=backend)["AP"] == 0.0
    # COCO's rules (100 per image and class) drop it as well: without the LVIS fields AP is 0
    coco_gt = {**gt, "images": [{k: v for k, v in gt["images"][0].items() if "category_ids" not in k}],
               "categories": [{"id": c["id"], "name": c["name"]} for c in gt["categories"]]}
    assert score(coco_gt, res, {"all": [1]}).protocol == "coco"
    assert evaluate(coco_gt, res, "bbox", backend=backend)["AP"] == 0.0


def test_cap_per_image_keeps_the_highest_scores_in_file_order():
    res = [{"image_id": 1, "score": s, "n": i} for i, s in enumerate([0.5, 0.9, 0.5, 0.1, 0.9])]
    res += [{"image_id": 2, "score": 0.3, "n": 9}]
    assert [r["n"] for r in cap_per_image(res, 3)] == [1, 4, 0, 9]  # ties keep file order
    assert [r["n"] for r in cap_per_image(res, 5)] == [0, 1, 2, 3, 4, 9]


def test_frequency_groups_follow_the_subset():
    gt, res = three_hundred_case()
    out = score(gt, res[-1:], {"B": [2], "A": [1]})
    assert out.metric_names == LVIS_METRICS and out.max_dets == 300
    assert out.metrics["segm"]["A"]["APc"] == pytest.approx(1.0) and out.metrics["segm"]["A"]["APr"] is None
    assert out.metrics["segm"]["B"] == dict.fromkeys(LVIS_METRICS)  # the dog has no ground truth

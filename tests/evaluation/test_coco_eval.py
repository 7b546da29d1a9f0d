import copy
import contextlib
import io
import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pipelines.errors import MaskxError
from pipelines.evaluation import BACKENDS, METRICS, evaluate, evaluate_sets
from tests.evaluation.cases import all_sizes_gt, categories, det_rect, gt_rect, image, perfect_results, random_case

# pycocotools divides by (tp + fp + np.spacing(1)), so a precision of 1 can come out as 1 - 2.2e-16;
# faster-coco-eval gives 1.0. Hand-computed values are therefore compared to 1e-12.
TOL = 1e-12
LAST_BIT = float(np.finfo(np.float64).eps)  # 2.2e-16: how far the two backends are apart at most (measured, docs/metrics.md)


def assert_metrics(got: dict, expected: dict) -> None:
    assert list(got) == METRICS
    for k in METRICS:
        if expected[k] is None:
            assert got[k] is None, k
        else:
            assert got[k] == pytest.approx(expected[k], abs=TOL), k


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_perfect_predictions_give_ap_one(backend, iou_type):
    gt = all_sizes_gt()
    m = evaluate(gt, perfect_results(gt), iou_type, backend=backend)
    assert_metrics(m, dict.fromkeys(METRICS, 1.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ground_truth_ids_starting_at_zero_still_match(backend):
    # COCOeval reads an id of 0 as "unmatched"; evaluation renumbers ground-truth ids
    gt = all_sizes_gt()
    for i, a in enumerate(gt["annotations"]):
        a["id"] = i
    assert_metrics(evaluate(gt, perfect_results(gt), "segm", backend=backend), dict.fromkeys(METRICS, 1.0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_shifted_prediction_with_known_iou(backend, iou_type):
    # a 40x40 square (medium) shifted by 8 px: IoU = 32*40 / (2*1600 - 1280) = 2/3, matched at the
    # thresholds 0.50, 0.55, 0.60, 0.65 (AP 1 there) and missed at 0.70..0.95 (AP 0): AP = 4/10
    gt = {"images": [image(1)], "annotations": [gt_rect(1, 1, 1, 50, 50, 40, 40)], "categories": categories(1)}
    m = evaluate(gt, [det_rect(1, 1, 0.9, 58, 50, 40, 40)], iou_type, backend=backend)
    assert_metrics(m, {"AP": 0.4, "AP50": 1.0, "AP75": 0.0, "APs": None, "APm": 0.4, "APl": None})


@pytest.mark.parametrize("backend", BACKENDS)
def test_small_object_with_iou_0_6(backend):
    # 10x10 box shifted by 2.5 px: IoU = 75 / 125 = 0.6 exactly (box IoU; masks are whole pixels).
    # np.linspace(.5, .95, 10)[2] == 0.6, and a match needs IoU >= threshold: matched at 0.50, 0.55,
    # 0.60 -> AP = 3/10; the object is small (area 100 < 32**2).
    assert np.linspace(0.5, 0.95, 10)[2] == 0.6
    gt = {"images": [image(1)], "annotations": [gt_rect(1, 1, 1, 50, 50, 10, 10)], "categories": categories(1)}
    res = [{"image_id": 1, "category_id": 1, "score": 0.5, "bbox": [52.5, 50.0, 10.0, 10.0]}]
    m = evaluate(gt, res, "bbox", backend=backend)
    assert_metrics(m, {"AP": 0.3, "AP50": 1.0, "AP75": 0.0, "APs": 0.3, "APm": None, "APl": None})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_false_positive_ranked_above_true_positive(backend, iou_type):
    # two GT, detections by score: TP (0.9), FP (0.8), TP (0.7) -> (precision, recall) = (1, .5), (.5, .5),
    # (2/3, 1). Interpolated precision: 1 at the 51 recall points 0.00..0.50, 2/3 at the 50 points
    # 0.51..1.00 -> AP = (51 + 50 * 2/3) / 101 = 253/303 at every IoU threshold (matches are exact).
    gt = {"images": [image(1)], "categories": categories(1),
          "annotations": [gt_rect(1, 1, 1, 10, 10, 40, 40), gt_rect(2, 1, 1, 100, 100, 40, 40)]}
    res = [det_rect(1, 1, 0.9, 10, 10, 40, 40), det_rect(1, 1, 0.8, 150, 10, 40, 40), det_rect(1, 1, 0.7, 100, 100, 40, 40)]
    ap = 253 / 303
    m = evaluate(gt, res, iou_type, backend=backend)
    assert_metrics(m, {"AP": ap, "AP50": ap, "AP75": ap, "APs": None, "APm": ap, "APl": None})


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_false_positive_above_single_true_positive(backend):
    # one GT; FP (0.9) then TP (0.8): precision 1/2 at recall 1 -> AP = 0.5
    gt = {"images": [image(1)], "categories": categories(1), "annotations": [gt_rect(1, 1, 1, 10, 10, 40, 40)]}
    res = [det_rect(1, 1, 0.9, 120, 120, 40, 40), det_rect(1, 1, 0.8, 10, 10, 40, 40)]
    m = evaluate(gt, res, "segm", backend=backend)
    assert_metrics(m, {"AP": 0.5, "AP50": 0.5, "AP75": 0.5, "APs": None, "APm": 0.5, "APl": None})


@pytest.mark.parametrize("backend", BACKENDS)
def test_crowd_ground_truth_is_ignored(backend):
    # a detection on a crowd region is neither TP nor FP; the crowd GT is not counted
    gt = {"images": [image(1)], "categories": categories(1),
          "annotations": [gt_rect(1, 1, 1, 10, 10, 40, 40), gt_rect(2, 1, 1, 100, 100, 80, 80, iscrowd=1)]}
    res = [det_rect(1, 1, 0.9, 110, 110, 40, 40), det_rect(1, 1, 0.8, 10, 10, 40, 40)]
    m = evaluate(gt, res, "segm", backend=backend)
    assert_metrics(m, {"AP": 1.0, "AP50": 1.0, "AP75": 1.0, "APs": None, "APm": 1.0, "APl": None})


@pytest.mark.parametrize("backend", BACKENDS)
def test_subset_ignores_the_other_set(backend):
    gt = all_sizes_gt()  # class 1 = set A, class 3 = set B
    res = [r for r in perfect_results(gt) if r["category_id"] == 1]
    res += [det_rect(1, 3, 0.99, 150, 0, 40, 40), det_rect(2, 1, 0.1, 150, 150, 30, 30)]  # B: only a FP
    out = evaluate_sets(gt, res, {"B": [3], "A": [1], "all": [1, 3]}, backend=backend)
    assert list(out) == ["segm", "bbox"]
    for t in out:
        assert list(out[t]) == ["B", "A", "all"]
        a, b, both = out[t]["A"], out[t]["B"], out[t]["all"]
        assert_metrics(b, dict.fromkeys(METRICS, 0.0))
        # A: perfect, ranked above the low-score FP of class 1 -> 1.0
        assert_metrics(a, dict.fromkeys(METRICS, 1.0))
        assert_metrics(both, dict.fromkeys(METRICS, 0.5))
    # removing every set-B GT and prediction leaves set A's numbers exactly as they were
    gt_a = copy.deepcopy(gt)
    gt_a["annotations"] = [x for x in gt_a["annotations"] if x["category_id"] == 1]
    res_a = [r for r in res if r["category_id"] == 1]
    for t in ("segm", "bbox"):
        assert evaluate(gt_a, res_a, t, cat_ids=[1], backend=backend) == out[t]["A"]


def _by_hand(tmp_path, gt: dict, results: list[dict], iou_type: str, cat_ids) -> list:
    """pycocotools run directly from a JSON file: COCO(path), loadRes, COCOeval."""
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    res = copy.deepcopy(results)
    if iou_type == "segm":  # COCO segm results carry no bbox (else loadRes takes the box area)
        for r in res:
            r.pop("bbox", None)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(path))
        e = COCOeval(coco_gt, coco_gt.loadRes(res), iou_type)
        if cat_ids is not None:
            e.params.catIds = cat_ids
        e.evaluate()
        e.accumulate()
        e.summarize()
    return [None if v == -1 else float(v) for v in e.stats[:6]]


@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
@pytest.mark.parametrize("cat_ids", [None, [1, 5, 9], [3]])
def test_equals_pycocotools_by_hand(tmp_path, iou_type, cat_ids):
    gt, res = random_case(seed=1, n_images=20)
    expected = _by_hand(tmp_path, gt, res, iou_type, cat_ids)
    assert list(evaluate(gt, res, iou_type, cat_ids, backend="reference").values()) == expected
    got = list(evaluate(gt, res, iou_type, cat_ids, backend="faster").values())
    assert [v is None for v in got] == [v is None for v in expected]
    assert [v for v in got if v is not None] == pytest.approx([v for v in expected if v is not None], abs=TOL)


def _cases():
    for seed in range(6):
        gt, res = random_case(seed=10 + seed, n_images=15, crowd=True, empty_images=3)
        if seed % 2:  # many tied scores
            for r in res:
                r["score"] = round(r["score"] * 3) / 3
        yield f"random{seed}", gt, res
    gt = all_sizes_gt()
    yield "perfect", gt, perfect_results(gt)
    res = perfect_results(gt)[:3] + [det_rect(2, 1, 1.0, 0, 0, 50, 50), det_rect(1, 3, 1.0, 60, 60, 120, 100)]
    yield "ties", gt, res
    yield "empty", gt, []


@pytest.mark.parametrize("name,gt,res", list(_cases()), ids=lambda x: x if isinstance(x, str) else "")
def test_faster_backend_equals_pycocotools(name, gt, res):
    sets = {"A": [1, 3], "B": [c["id"] for c in gt["categories"] if c["id"] not in (1, 3)], "all": [c["id"] for c in gt["categories"]]}
    ref = evaluate_sets(gt, res, sets, backend="reference")
    got = evaluate_sets(gt, res, sets, backend="faster")
    for t in ref:
        for s in ref[t]:
            for k in METRICS:
                if ref[t][s][k] is None:
                    assert got[t][s][k] is None, (t, s, k)
                else:
                    assert abs(got[t][s][k] - ref[t][s][k]) <= LAST_BIT, (t, s, k)  # the bound docs/metrics.md gives


def test_help_and_docs_say_how_far_the_backends_differ():
    """Was 'identical numbers': the two differ in the last bit of a float (pycocotools' tp / (tp + fp + eps))."""
    from pathlib import Path

    from maskx_cli.options import EVAL_BACKEND

    help_text = EVAL_BACKEND["backend"].annotation.__metadata__[0].help
    assert "identical" not in help_text and "at most 2.2e-16 apart" in help_text
    metrics_md = (Path(__file__).parents[2] / "docs" / "metrics.md").read_text()
    assert "at most 2.2e-16 apart" in metrics_md and f"{LAST_BIT:.1e}" == "2.2e-16"


@pytest.mark.parametrize("backend", BACKENDS)
def test_evaluate_sets_equals_separate_runs(backend):
    gt, res = random_case(seed=3, n_images=20)
    sets = {"B": [5, 7, 9, 11], "A": [1, 3], "all": [1, 3, 5, 7, 9, 11], "none": []}
    out = evaluate_sets(gt, res, sets, backend=backend)
    for t in ("segm", "bbox"):
        for name, ids in sets.items():
            assert out[t][name] == evaluate(gt, res, t, cat_ids=ids, backend=backend)
    assert out["segm"]["none"] == dict.fromkeys(METRICS)


@pytest.mark.parametrize("backend", BACKENDS)
def test_image_ids_restrict_the_evaluation(backend):
    gt, res = random_case(seed=4, n_images=10)
    keep = [im["id"] for im in gt["images"][:5]]
    sub = {"images": gt["images"][:5], "categories": gt["categories"],
           "annotations": [a for a in gt["annotations"] if a["image_id"] in keep]}
    sub_res = [r for r in res if r["image_id"] in keep]
    assert evaluate(gt, res, "segm", image_ids=keep, backend=backend) == evaluate(sub, sub_res, "segm", backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_results_give_zero(backend):
    gt = all_sizes_gt()
    for t in ("segm", "bbox"):
        assert evaluate(gt, [], t, backend=backend) == dict.fromkeys(METRICS, 0.0)
    # a metric without ground truth stays undefined (None), results or not
    gt["annotations"] = [a for a in gt["annotations"] if a["area"] < 32**2]
    assert evaluate(gt, [], "segm", backend=backend) == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "APs": 0.0, "APm": None, "APl": None}


def test_undefined_metrics_are_none_and_json_safe():
    gt = all_sizes_gt()
    gt["annotations"] = [a for a in gt["annotations"] if a["category_id"] == 1]
    out = evaluate_sets(gt, perfect_results(gt), {"A": [1], "B": [3]})
    assert out["segm"]["B"] == dict.fromkeys(METRICS)
    json.dumps(out, allow_nan=False)


def test_inputs_are_not_modified_and_nothing_is_printed(capsys):
    gt, res = random_case(seed=5, n_images=8)
    gt["annotations"][0]["id"] = 0
    gt0, res0 = copy.deepcopy(gt), copy.deepcopy(res)
    for backend in BACKENDS:
        evaluate_sets(gt, res, {"all": [c["id"] for c in gt["categories"]]}, backend=backend)
    assert gt == gt0 and res == res0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_polygon_and_uncompressed_results_are_accepted():
    gt = all_sizes_gt()
    res = perfect_results(gt)
    for r in res:
        x, y, w, h = r["bbox"]
        r["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    m = evaluate(gt, res, "segm")
    assert m["AP50"] == pytest.approx(1.0, abs=TOL)


def test_unknown_category_in_results():
    gt = all_sizes_gt()
    res = perfect_results(gt) + [det_rect(1, 999, 0.5, 0, 0, 10, 10)]
    with pytest.raises(MaskxError, match="category 999"):
        evaluate(gt, res, "segm")


def test_result_on_unknown_image():
    gt = all_sizes_gt()
    res = perfect_results(gt) + [det_rect(42, 1, 0.5, 0, 0, 10, 10)]
    with pytest.raises(MaskxError, match="image 42"):
        evaluate(gt, res, "bbox")


@pytest.mark.parametrize("kwargs,match", [
    ({"iou_type": "keypoints"}, "IoU type"),
    ({"iou_type": "segm", "backend": "mystery"}, "backend"),
    ({"iou_type": "segm", "cat_ids": [1, 77]}, "category 77"),
    ({"iou_type": "segm", "image_ids": [1, 5]}, "image 5"),
    ({"iou_type": "segm", "image_ids": []}, "empty"),
])
def test_bad_arguments(kwargs, match):
    gt = all_sizes_gt()
    with pytest.raises(MaskxError, match=match):
        evaluate(gt, perfect_results(gt), **kwargs)


def test_missing_fields():
    gt = all_sizes_gt()
    res = perfect_results(gt)
    del res[2]["segmentation"]
    with pytest.raises(MaskxError, match="result 2 has no 'segmentation'"):
        evaluate(gt, res, "segm")
    assert evaluate(gt, res, "bbox")["AP"] == pytest.approx(1.0, abs=TOL)


@pytest.mark.parametrize("form", ["absent", "null", "empty"])
def test_box_only_ground_truth_leaves_its_class_out_of_mask_ap(form):
    """Class 1 has a box-only instance in the ground truth: mask AP cannot score class 1 (left out, with a
    note), box AP does; class 3 is scored as usual."""
    from pipelines.evaluation.scoring import score

    gt = all_sizes_gt()
    res = perfect_results(gt)
    res[1]["score"] = 0.5  # the detection of the box-only instance
    res[1]["segmentation"] = dict(gt["annotations"][0]["segmentation"])  # a mask elsewhere: a false positive if it were scored
    if form == "absent":
        del gt["annotations"][1]["segmentation"]
    else:
        gt["annotations"][1]["segmentation"] = None if form == "null" else []
    s = score(gt, res, {"B": [1], "A": [3], "all": [1, 3]}, ("segm", "bbox"))
    assert s.metrics["segm"]["B"] == dict.fromkeys(METRICS)  # undefined: no class left to score
    assert s.metrics["segm"]["A"]["AP"] == pytest.approx(1.0, abs=TOL)
    assert s.metrics["segm"]["all"]["AP"] == pytest.approx(1.0, abs=TOL)  # class 3 alone
    assert s.metrics["bbox"]["B"]["AP"] == pytest.approx(1.0, abs=TOL)  # boxes of class 1 all found
    assert s.notes == ["mask AP leaves out 1 class(es) whose ground truth has instances without a mask (box AP covers "
                       "them): class0 (1)"]
    # a crowd region without a mask is refused: it has nothing to be ignored by
    gt["annotations"][1].update(iscrowd=1, segmentation=[])
    with pytest.raises(MaskxError, match="crowd region 2 has no mask"):
        score(gt, res, {"B": [1]}, ("segm",))

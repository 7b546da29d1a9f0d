"""``maskx eval --gt FILE --results FILE``: a COCO results file scored like a mask run, by COCO's or LVIS's rules."""

from __future__ import annotations

import contextlib
import copy
import io
import json

import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from typer.testing import CliRunner

from maskx_cli.main import app
from pipelines.config import EvalConfig
from pipelines.errors import MaskxError
from pipelines.evaluation import LVIS_METRICS, METRICS
from pipelines.stages.eval_results import default_metrics_path, evaluate_results_file
from tests.evaluation.cases import (all_sizes_gt, categories, det_rect, gt_rect, image, lvis_det, lvis_dict, lvis_perfect,
                                    perfect_results, random_case)
from tests.evaluation.test_lvis_eval import by_hand as lvis_by_hand

runner = CliRunner()
TOL = 1e-12
pytestmark = pytest.mark.filterwarnings("ignore:The .warn. method is deprecated:DeprecationWarning")


def write(tmp_path, name: str, obj) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(obj))
    return str(path)


def cli_eval(tmp_path, gt: dict, results, split: str = "nonvoc", *extra: str):
    """Run the command on files made from ``gt`` and ``results``; returns (result, metrics JSON or None)."""
    out = tmp_path / "metrics.json"
    if out.exists():
        out.unlink()
    r = runner.invoke(app, ["eval", "--gt", write(tmp_path, "gt.json", gt), "--results", write(tmp_path, "dets.json", results),
                            "--split", split, "--json", str(out), *extra])
    return r, (json.loads(out.read_text()) if out.exists() else None)


def coco_by_hand(gt_path: str, results: list[dict], iou_type: str, cat_ids: list[int]) -> list:
    """pycocotools as a user runs it: COCO(file), loadRes, params.catIds = the subset (segm results
    without their boxes, so that the size ranges use mask areas)."""
    res = copy.deepcopy(results)
    if iou_type == "segm":
        for r in res:
            r.pop("bbox", None)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(gt_path)
        e = COCOeval(coco_gt, coco_gt.loadRes(res), iou_type)
        e.params.catIds = cat_ids
        e.evaluate()
        e.accumulate()
        e.summarize()
    return [None if v == -1 else float(v) for v in e.stats[:6]]


def assert_close(got: dict, expected: list, names=METRICS) -> None:
    assert list(got) == list(names)
    for k, e in zip(names, expected):
        assert (got[k] is None) if e is None else got[k] == pytest.approx(e, abs=TOL), k


# -- numbers ------------------------------------------------------------------------------------------
def test_perfect_results_give_one_everywhere(tmp_path):
    gt = all_sizes_gt()  # classes 1 and 3
    r, m = cli_eval(tmp_path, gt, perfect_results(gt), "ids:3")
    assert r.exit_code == 0, r.output
    assert "mask AP of dets.json" in r.output and "box AP of dets.json" in r.output and "scored by COCO's rules" in r.output
    assert m["protocol"] == "coco" and m["max_dets"] == 100 and m["sets"] == {"B": [3], "A": [1]}
    for t in ("segm", "bbox"):
        assert list(m[t]) == ["B", "A", "all"]
        for s in m[t]:
            assert m[t][s] == pytest.approx(dict.fromkeys(METRICS, 1.0), abs=TOL)
    assert m["images"] == 2 and m["detections"] == 6 and m["inputs"]["results"]["sha256"]


def test_shifted_box_gives_the_known_value(tmp_path):
    # a 40x40 square shifted by 8 px: IoU 2/3, matched at 0.50..0.65 only -> AP = 4/10, AP50 1, AP75 0
    gt = {"images": [image(1)], "annotations": [gt_rect(1, 1, 1, 50, 50, 40, 40)], "categories": categories(2)}
    r, m = cli_eval(tmp_path, gt, [det_rect(1, 1, 0.9, 58, 50, 40, 40)], "ids:1")
    assert r.exit_code == 0, r.output
    for t in ("segm", "bbox"):
        assert m[t]["B"] == pytest.approx({"AP": 0.4, "AP50": 1.0, "AP75": 0.0, "APs": None, "APm": 0.4, "APl": None}, abs=TOL)
        assert m[t]["A"] == dict.fromkeys(METRICS)  # class 3 has no ground truth


def test_categories_partly_in_the_split_equal_pycocotools_by_hand(tmp_path):
    gt, res = random_case(seed=7, n_images=16, n_cats=6)  # categories 1, 3, ..., 11, results on all of them
    r, m = cli_eval(tmp_path, gt, res, "ids:1,5,9")
    assert r.exit_code == 0, r.output
    gt_path = str(tmp_path / "gt.json")
    sets = {"B": [1, 5, 9], "A": [3, 7, 11], "all": [1, 3, 5, 7, 9, 11]}
    for t in ("segm", "bbox"):
        for s, ids in sets.items():
            assert_close(m[t][s], coco_by_hand(gt_path, res, t, ids))
    # with the boxes left in, pycocotools sizes masks by their boxes: AP, AP50, AP75 are unaffected
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(gt_path)
        e = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(res)), "segm")
        e.params.catIds = sets["B"]
        e.evaluate()
        e.accumulate()
        e.summarize()
    assert [m["segm"]["B"][k] for k in ("AP", "AP50", "AP75")] == pytest.approx(list(e.stats[:3]), abs=TOL)


def test_empty_results_file_gives_zero(tmp_path):
    gt = all_sizes_gt()
    r, m = cli_eval(tmp_path, gt, [], "ids:3")
    assert r.exit_code == 0, r.output
    for t in ("segm", "bbox"):
        for s in ("B", "A", "all"):
            assert m[t][s] == dict.fromkeys(METRICS, 0.0)


def test_results_without_segmentations_give_box_ap_only(tmp_path):
    gt = all_sizes_gt()
    boxes = [{k: v for k, v in d.items() if k != "segmentation"} for d in perfect_results(gt)]
    r, m = cli_eval(tmp_path, gt, boxes, "ids:3")
    assert r.exit_code == 0, r.output
    assert "note:" in r.output and "the results have no segmentations: box AP only" in r.output
    assert "mask AP" not in r.output and "box AP of dets.json" in r.output
    assert "segm" not in m and m["bbox"]["B"]["AP"] == pytest.approx(1.0, abs=TOL)
    assert m["notes"] == ["the results have no segmentations: box AP only"]


# -- bad input: one line, exit 2, no metrics file -------------------------------------------------------
def _bad_size(gt):
    res = perfect_results(gt)
    res[4]["segmentation"] = {"size": [100, 200], "counts": res[4]["segmentation"]["counts"]}
    return res


@pytest.mark.parametrize("make,message", [
    (lambda gt: {"annotations": perfect_results(gt)},
     "not a COCO results file: the top level is an object (expected a list of detections)"),
    (lambda gt: perfect_results(gt) + [det_rect(42, 1, 0.5, 0, 0, 10, 10)],
     "result 6 is on image 42, which is not in the ground truth (1 unknown image id(s) in the file)"),
    (lambda gt: perfect_results(gt)[:2] + [det_rect(1, 999, 0.5, 0, 0, 10, 10)] + perfect_results(gt)[2:],
     "result 2 has category 999, which is not in the ground truth's category list"),
    (_bad_size, "result 4 has a mask of size [100, 200] but its image 2 is 200x200 (height x width)"),
    (lambda gt: [{k: v for k, v in d.items() if not (i == 3 and k == "segmentation")} for i, d in enumerate(perfect_results(gt))],
     "result 3 has no 'segmentation' but 5 other result(s) have one"),
    (lambda gt: [dict(d, score="high") if i == 1 else d for i, d in enumerate(perfect_results(gt))],
     "result 1 has score 'high' (expected a finite number)"),
    (lambda gt: [dict(d, score=float("nan")) if i == 2 else d for i, d in enumerate(perfect_results(gt))],
     "result 2 has score nan (expected a finite number)"),
    (lambda gt: [dict(d, bbox=[0, 0, float("inf"), 4]) if i == 5 else d for i, d in enumerate(perfect_results(gt))],
     "result 5 has bbox [0, 0, inf, 4] (expected [x, y, width, height] numbers)"),
    (lambda gt: [dict(d, bbox=[30, 40, -10, 20]) if i == 3 else d for i, d in enumerate(perfect_results(gt))],
     "result 3 has bbox [30, 40, -10, 20] with a negative width or height (expected [x, y, width, height], width and height >= 0)"),
    (lambda gt: [dict(d, bbox=[30, 40, 10, -0.5]) if i == 4 else d for i, d in enumerate(perfect_results(gt))],
     "result 4 has bbox [30, 40, 10, -0.5] with a negative width or height"),
    (lambda gt: [dict(d, category_id=[1]) if i == 1 else d for i, d in enumerate(perfect_results(gt))],
     "result 1 has category [1], which is not in the ground truth's category list"),
    (lambda gt: [{"image_id": 1, "category_id": 1, "score": 0.5}], "result 0 has neither 'segmentation' nor 'bbox'"),
])
def test_bad_results_file_is_one_error_line(tmp_path, make, message):
    gt = all_sizes_gt()
    r, m = cli_eval(tmp_path, gt, make(gt), "ids:3")
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {tmp_path / 'dets.json'}: ") and message in lines[0], r.output
    assert m is None


def test_truncated_results_file_and_bad_combinations(tmp_path):
    gt_path = write(tmp_path, "gt.json", all_sizes_gt())
    (tmp_path / "cut.json").write_text(json.dumps(perfect_results(all_sizes_gt()))[:-30])
    r = runner.invoke(app, ["eval", "--gt", gt_path, "--results", str(tmp_path / "cut.json")])
    assert r.exit_code == 2 and "cut.json: not valid JSON (truncated or corrupt?)" in r.output
    r = runner.invoke(app, ["eval", "--results", str(tmp_path / "cut.json")])
    assert r.exit_code == 2 and "--results needs the ground truth: --gt FILE" in r.output
    r = runner.invoke(app, ["eval", str(tmp_path), "--gt", gt_path, "--results", str(tmp_path / "cut.json")])
    assert r.exit_code == 2 and "give --gt, not mask runs" in r.output
    r = runner.invoke(app, ["eval"])
    assert r.exit_code == 2 and "nothing to evaluate" in r.output
    with pytest.raises(MaskxError, match="max_images and gt_boxes apply to mask runs, not to a results file"):
        evaluate_results_file(gt_path, tmp_path / "cut.json", EvalConfig(max_images=3))
    assert default_metrics_path(tmp_path / "dets.json", "random:4:0") == tmp_path / "dets_metrics_random_4_0.json"


# -- LVIS ---------------------------------------------------------------------------------------------
def test_lvis_ground_truth_uses_lvis_rules(tmp_path):
    """A dog detection on image 3 (no dog there, dog not checked absent) is ignored by LVIS's rules and
    is a false positive by COCO's: LVISEval gives 1.0 for the dog, COCOeval 0.5; the command reports 1.0."""
    gt = lvis_dict()
    res = lvis_perfect(gt) + [lvis_det(3, 3, 60, 60, 0.95)]
    r, m = cli_eval(tmp_path, gt, res, "ids:3")
    assert r.exit_code == 0, r.output
    assert "scored by LVIS's rules" in r.output and "APr" in r.output and "APf" in r.output
    assert m["protocol"] == "lvis" and m["max_dets"] == 300
    for t in ("segm", "bbox"):
        assert list(m[t]["B"]) == LVIS_METRICS
        assert m[t]["B"]["AP"] == pytest.approx(1.0) and m[t]["B"]["APc"] == pytest.approx(1.0) and m[t]["B"]["APr"] is None
        for s, ids in {"B": [3], "A": [1, 2, 4], "all": [1, 2, 3, 4]}.items():
            assert_close(m[t][s], lvis_by_hand(tmp_path, gt, res, t, ids), LVIS_METRICS)
    # COCOeval on the same annotations (LVIS has no iscrowd field; COCOeval needs one) says 0.5
    as_coco = {**gt, "annotations": [dict(a, iscrowd=0) for a in gt["annotations"]]}
    assert coco_by_hand(write(tmp_path, "as_coco.json", as_coco), res, "segm", [3])[0] == pytest.approx(0.5)
    # the reference backend (LVISEval itself) prints the same numbers
    r2, m2 = cli_eval(tmp_path, gt, res, "ids:3", "--backend", "reference")
    assert r2.exit_code == 0, r2.output
    for t in ("segm", "bbox"):
        for s in m[t]:
            assert m2[t][s] == pytest.approx(m[t][s], abs=TOL)

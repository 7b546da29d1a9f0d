"""The one evaluation path: producers and inference_on_dataset (limits, predictions, scores per job)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from torch.utils.data import Subset

from pipelines.config import EvalConfig
from pipelines.errors import MaskxError
from pipelines.evaluation.inference import EvalData, HeadPredictions, ResultsFile, inference_on_dataset
from pipelines.evaluation.scoring import score
from tests.evaluation.cases import random_case


def test_a_results_file_is_scored_per_job_as_score_scores_it(tmp_path):
    gt, results = random_case(3)
    path = tmp_path / "dets.json"
    path.write_text(json.dumps(results))
    ids = [c["id"] for c in gt["categories"]]
    sets_1, sets_2 = {"B": ids[:2], "A": ids[2:]}, {"B": ids[3:], "A": ids[:3]}
    producer = ResultsFile.read(path)
    r = inference_on_dataset(producer, EvalData(gt, gt_path=tmp_path / "gt.json"), {"one": ("results", sets_1), "two": ("results", sets_2)},
                             EvalConfig())
    assert set(r.scores) == {"one", "two"} and r.predictions == {"results": results}
    assert r.metrics["one"] == score(gt, results, sets_1, None).metrics  # every gt image, what the rows carry
    assert r.metrics["two"] == score(gt, results, sets_2, None).metrics
    assert r.metrics["one"] != r.metrics["two"]
    assert producer.source == path and producer.detector is None


def test_no_job_predicts_only_and_the_limits_are_set_first():
    model = SimpleNamespace(roi_heads=SimpleNamespace(score_thresh=0.5, detections_per_img=100))
    seen = []

    class Producer:
        detector, iou_types, source = SimpleNamespace(model=model), None, None

        def predict(self, data, progress):
            seen.append(model.roi_heads.score_thresh)
            return {"x": [{"image_id": 1}]}

    r = inference_on_dataset(Producer(), EvalData({"images": [], "categories": []}), {}, EvalConfig(score_thresh=0.2))
    assert seen == [0.2] and r.scores == {} and r.predictions == {"x": [{"image_id": 1}]}


def test_eval_data_names_the_images_it_predicts_on():
    dataset = SimpleNamespace(images=[{"id": 5}, {"id": 7}, {"id": 9}])
    assert EvalData({}, dataset).image_ids == [5, 7, 9]
    assert EvalData({}, Subset(dataset, [2, 0])).image_ids == [9, 5]
    assert EvalData({}).image_ids is None  # a results file: every ground-truth image


def test_mask_runs_of_different_roi_sizes_are_refused_together():
    def run(size):
        return SimpleNamespace(head=SimpleNamespace(roi_size=size), side=object())

    det = SimpleNamespace()
    heads = HeadPredictions.of_runs(det, {"a": run(14), "b": run(14)}, gt_boxes=True)
    assert heads.roi_size == 14 and set(heads.heads) == {"a", "b"} and heads.gt_boxes
    with pytest.raises(MaskxError, match=r"different RoI sizes \(\[14, 16\]\); evaluate them separately") as e:
        HeadPredictions.of_runs(det, {"a": run(14), "b": run(16)}, where="spec.yaml")
    assert e.value.line().startswith("spec.yaml: ")

"""``maskx eval RUN`` on an LVIS ground truth: LVIS's rules, through the CLI, on the tiny pipeline's masks."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from maskx_cli.main import app
from pipelines.config import EvalConfig
from pipelines.evaluation import LVIS_METRICS, class_sets, score
from pipelines.evaluation.inference import EvalData, inference_on_dataset
from pipelines.stages.evaluate import evaluate_heads
from tests.evaluation.test_lvis_eval import by_hand

runner = CliRunner()
pytestmark = pytest.mark.filterwarnings("ignore:The .warn. method is deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def lvis_val(tiny_world, tmp_path_factory):
    """The tiny world's validation file in LVIS v1 form: a frequency per class, nothing checked
    absent, and every class present in an image marked not exhaustively annotated there (so an
    unmatched mask is ignored by LVIS's rules and a false positive by COCO's)."""
    data = json.loads(tiny_world.val_json.read_text())
    present: dict[int, set[int]] = {}
    for a in data["annotations"]:
        present.setdefault(a["image_id"], set()).add(a["category_id"])
    for i, c in enumerate(data["categories"]):
        c["frequency"] = "rcf"[i % 3]
        c["coco_id"] = c["id"]  # keeps voc / nonvoc meaning the same classes
    for im in data["images"]:
        im["neg_category_ids"] = []
        im["not_exhaustive_category_ids"] = sorted(present.get(im["id"], ()))
    path = tmp_path_factory.mktemp("lvis") / "lvis_val.json"
    path.write_text(json.dumps(data))
    return path, data


def test_run_mode_on_lvis_ground_truth_uses_lvis_rules(tiny_pipeline, tiny_world, lvis_val, tmp_path):
    path, data = lvis_val
    run = tiny_pipeline["runs"]["transfer"]
    r = evaluate_heads({"transfer": run}, EvalConfig(split="nonvoc", gt_boxes=True), val_json=path, val_images=tiny_world.val_dir)
    assert r.protocol == "lvis" and r.metric_names == LVIS_METRICS
    dets = r.detections["transfer"]
    sets = class_sets("nonvoc", data["categories"])
    for s, ids in sets.items():
        expected = by_hand(tmp_path, data, dets, "segm", ids)
        got = r.metrics["transfer"]["segm"][s]
        for k, e in zip(LVIS_METRICS, expected):
            assert (got[k] is None) if e is None else got[k] == pytest.approx(e, abs=1e-12), (s, k)
    # COCO's rules on the same masks count the unmatched ones as false positives: another (lower) AP
    coco = {**data, "categories": [{"id": c["id"], "name": c["name"]} for c in data["categories"]],
            "images": [{k: v for k, v in im.items() if "category_ids" not in k} for im in data["images"]]}
    coco_ap = score(coco, dets, sets, ("segm",)).metrics["segm"]["all"]["AP"]
    assert coco_ap < r.metrics["transfer"]["segm"]["all"]["AP"] - 1e-4

    # the same through the command line: LVIS's table and the protocol in the metrics file
    out = tmp_path / "m.json"
    cli = runner.invoke(app, ["eval", str(run), "--gt", str(path), "--images", str(tiny_world.val_dir), "--gt-boxes",
                              "--split", "nonvoc", "--json", str(out)])
    assert cli.exit_code == 0, cli.output
    assert "scored by LVIS's rules" in cli.output and "APr" in cli.output
    m = json.loads(out.read_text())
    assert m["protocol"] == "lvis" and m["max_dets"] == 300
    assert m["heads"]["transfer"]["segm"] == r.metrics["transfer"]["segm"]


def test_lvis_ground_truth_keeps_300_detections_per_image():
    """The limits are set by the one evaluation path, inference_on_dataset, on the producer's detector."""
    model = SimpleNamespace(roi_heads=SimpleNamespace(score_thresh=0.5, detections_per_img=100))

    class Producer:  # predicts nothing: only the limits it runs under are looked at
        detector, iou_types, source = SimpleNamespace(model=model), None, None
        seen = []

        def predict(self, data, progress):
            self.seen.append((model.roi_heads.score_thresh, model.roi_heads.detections_per_img))
            return {}

    def run(gt, cfg):
        return inference_on_dataset(Producer(), EvalData(gt), {}, cfg)

    r = run({"images": [{"id": 1, "neg_category_ids": []}], "categories": []}, EvalConfig(score_thresh=0.01))
    assert Producer.seen[-1] == (0.01, 300) and r.scores == {} and r.predictions == {}
    run({"images": [{"id": 1}], "categories": [{"id": 1, "name": "a"}]}, EvalConfig())
    assert Producer.seen[-1] == (0.05, 300)  # a COCO ground truth leaves the detector's own limit
    model.roi_heads.detections_per_img = 100
    run({"images": [{"id": 1}], "categories": [{"id": 1, "name": "a"}]}, EvalConfig())
    assert model.roi_heads.detections_per_img == 100

"""The four stages on a tiny synthetic world: files, shapes, provenance, errors."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from maskx_cli.main import app
from pipelines.config import EvalConfig, MaskTrainConfig, load_config
from pipelines.errors import MaskxError
from pipelines.io import sha256_file
from pipelines.engine.run_dir import load_detector_run, load_eval_config, load_mask_run, record_checkpoint
from pipelines.modeling.embeddings import read_embeddings
from pipelines.stages.evaluate import evaluate_heads
from pipelines.stages.export_embeddings import export_embeddings
from pipelines.stages.mask_train import mask_train

runner = CliRunner()


def test_detector_run_folder(tiny_pipeline):
    det = tiny_pipeline["detector"]
    for name in ("model_final.pth", "config.yaml", "manifest.json", "metrics.jsonl"):
        assert (det / name).is_file(), name
    cfg = yaml.safe_load((det / "config.yaml").read_text())
    assert cfg["stage"] == "detect-train" and cfg["solver"]["iterations"] == 3
    manifest = json.loads((det / "manifest.json").read_text())
    train_json = manifest["inputs"]["train_json"]
    assert train_json["sha256"] == sha256_file(train_json["path"])
    lines = [json.loads(l) for l in (det / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["iteration"] == 3 and np.isfinite(lines[-1]["loss"])
    assert not list(det.glob(".*.tmp")), "no temporary files left behind"
    # the recipe, kept by the library for the stages that read this detector
    from pipelines.config import resolve_config_path

    assert (det / "recipe.yaml").read_text() == resolve_config_path("synthetic").read_text()


def test_embeddings_round_trip(tiny_pipeline):
    det = load_detector_run(tiny_pipeline["detector"])
    emb = read_embeddings(tiny_pipeline["embeddings"])
    pred = det.model.roi_heads.box_predictor
    k, d = 80, pred.cls_score.in_features
    assert emb.w_cls.shape == (k, d) and emb.w_box.shape == (k, 4 * d)
    assert torch.equal(emb.w_cls, pred.cls_score.weight[1:])
    assert torch.equal(emb.w_box, pred.bbox_pred.weight.view(k + 1, 4 * d)[1:])
    assert torch.equal(emb.b_cls, pred.cls_score.bias[1:])
    assert emb.class_ids == [c["id"] for c in det.categories]
    assert emb.class_names[0] == "person" and emb.coco_ids[:3] == [1, 2, 3]
    assert sum(emb.set_a) == 20 and emb.set_a[0] is True  # voc: person is in set A
    assert emb.detector_sha256 == det.sha256 == sha256_file(det.checkpoint)
    with h5py.File(tiny_pipeline["embeddings"], "r") as f:
        assert f.attrs["format"] == "maskx-embeddings" and "detector" in yaml.safe_load(f.attrs["config"])


def test_export_with_other_split(tiny_pipeline, tmp_path):
    r = export_embeddings(tiny_pipeline["detector"], tmp_path / "e.h5", "random:40:1")
    assert len(r.set_a) == 40 and sum(read_embeddings(tmp_path / "e.h5").set_a) == 40


def test_mask_runs_and_eval(tiny_pipeline, tiny_world, tmp_path):
    runs = tiny_pipeline["runs"]
    det = load_detector_run(tiny_pipeline["detector"])
    assert det.data.val_json == str(tiny_world.val_json) and det.detector.min_size == 96  # a detector run's settings, typed
    run = load_mask_run(runs["transfer"], det)
    assert run.head.head == "transfer" and len(run.set_a) == 20 and run.run_dir == runs["transfer"]
    assert run.detector_sha256 == det.sha256 and run.data.val_json == str(tiny_world.val_json)
    assert run.description() == {"head": "transfer", "mlp": run.head.mlp, "input": run.head.input, "trained_set_a": run.set_a}
    side = run.side
    feats = torch.randn(5, det.model.backbone.out_channels, 14, 14)
    out = side(feats, torch.tensor([1, 2, 3, 80, 80]))
    assert out.shape == (5, 28, 28)
    out_json = tmp_path / "metrics.json"
    r = evaluate_heads(runs, EvalConfig(split="nonvoc"), json_out=out_json)
    assert set(r.metrics) == {"transfer", "agnostic"}
    assert len(r.sets["B"]) == 60 and len(r.sets["A"]) == 20
    saved = json.loads(out_json.read_text())
    for name in ("transfer", "agnostic"):
        for iou in ("segm", "bbox"):
            for s in ("A", "B", "all"):
                ap = saved["heads"][name][iou][s]["AP"]
                assert ap is None or 0.0 <= ap <= 1.0
    # boxes come from the same detector: identical box AP for both heads
    assert saved["heads"]["transfer"]["bbox"] == saved["heads"]["agnostic"]["bbox"]
    assert saved["inputs"]["detector"]["sha256"] == det.sha256


def test_cache_reused_by_second_head(tiny_pipeline):
    manifest = json.loads((tiny_pipeline["runs"]["agnostic"] / "manifest.json").read_text())
    assert manifest["cache_built"] is False  # the transfer run built it; same detector + data reuse it
    first = json.loads((tiny_pipeline["runs"]["transfer"] / "manifest.json").read_text())
    assert first["cache_built"] is True and first["cache"] == manifest["cache"]


def _mask_cfg(tiny_pipeline, *extra):
    over = [o for o in tiny_pipeline["overrides"] if not o.startswith("detector.")]
    return load_config(MaskTrainConfig, "synthetic", over + ["solver.iterations=1", "head.mask_dim=16", "head.mlp_hidden=32", *extra],
                       section="mask_train")


def test_embeddings_from_another_detector(tiny_pipeline, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_pipeline["detector"], other)
    ckpt = torch.load(other / "model_final.pth", weights_only=True)
    ckpt["iteration"] = 999  # another checkpoint: another hash, recorded in its run's manifest as a run writes it
    torch.save(ckpt, other / "model_final.pth")
    record_checkpoint(other / "model_final.pth", sha256_file(other / "model_final.pth"))
    with pytest.raises(MaskxError, match="another detector"):
        mask_train(_mask_cfg(tiny_pipeline), other, tiny_pipeline["embeddings"], tmp_path / "m")
    assert not (tmp_path / "m").exists(), "nothing written before the inputs were checked"


def test_class_list_mismatch(tiny_pipeline, tmp_path):
    data = json.loads(open(_mask_cfg(tiny_pipeline).data.train_json).read())
    data["categories"][5]["name"] = "unicorn"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    cfg = _mask_cfg(tiny_pipeline, f"data.train_json={bad}")
    with pytest.raises(MaskxError, match="class list does not match.*unicorn"):
        mask_train(cfg, tiny_pipeline["detector"], tiny_pipeline["embeddings"], tmp_path / "m")


def test_empty_split(tiny_pipeline, tmp_path):
    data = json.loads(open(_mask_cfg(tiny_pipeline).data.train_json).read())
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] not in (1, 2, 3)]
    path = tmp_path / "no_person.json"
    path.write_text(json.dumps(data))
    cfg = _mask_cfg(tiny_pipeline, f"data.train_json={path}", "data.mask_classes=ids:1,2,3")
    with pytest.raises(MaskxError, match="no training image has a mask"):
        mask_train(cfg, tiny_pipeline["detector"], tiny_pipeline["embeddings"], tmp_path / "m")


def test_cli_errors_are_one_line(tiny_pipeline, tmp_path):
    corrupt = tmp_path / "emb.h5"
    corrupt.write_bytes(b"\x89HDF\r\n garbage")
    r = runner.invoke(app, ["mask-train", "--detector", str(tiny_pipeline["detector"]), "--embeddings", str(corrupt),
                            "--out", str(tmp_path / "m")])
    assert r.exit_code == 2
    lines = [l for l in r.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "emb.h5" in lines[0]
    assert "Traceback" not in r.output

    r = runner.invoke(app, ["export-embeddings", str(tmp_path / "nowhere"), "--out", str(tmp_path / "e.h5")])
    assert r.exit_code == 2 and "detector run not found" in r.output
    assert not (tmp_path / "e.h5").exists()

    trunc = tmp_path / "model_final.pth"
    trunc.write_bytes((tiny_pipeline["detector"] / "model_final.pth").read_bytes()[:1000])
    r = runner.invoke(app, ["export-embeddings", str(trunc), "--out", str(tmp_path / "e.h5")])
    assert r.exit_code == 2 and "truncated or corrupt" in r.output and not (tmp_path / "e.h5").exists()


def test_cli_bad_variant_fails_before_training(tiny_pipeline, tmp_path):
    r = runner.invoke(app, ["mask-train", "--detector", str(tiny_pipeline["detector"]), "--embeddings",
                            str(tiny_pipeline["embeddings"]), "--out", str(tmp_path / "m"), "--input", "glove"])
    assert r.exit_code == 2 and "--glove" in r.output and not (tmp_path / "m").exists()


def test_cli_eval_prints_table_and_writes_json(tiny_pipeline, tmp_path):
    out = tmp_path / "m.json"
    r = runner.invoke(app, ["eval", str(tiny_pipeline["runs"]["transfer"]), "--split", "nonvoc", "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "mask AP" in r.output and "transfer · B" in r.output
    assert json.loads(out.read_text())["split"] == "nonvoc"


def test_eval_unknown_split(tiny_pipeline):
    r = runner.invoke(app, ["eval", str(tiny_pipeline["runs"]["transfer"]), "--split", "vocc"])
    assert r.exit_code == 2 and "unknown class split 'vocc'" in r.output


def test_eval_refuses_heads_with_different_roi_sizes(tiny_pipeline, tmp_path):
    over = [o for o in tiny_pipeline["overrides"] if not o.startswith("detector.")]
    cfg = load_config(MaskTrainConfig, "synthetic", over + ["solver.iterations=1", "head.mask_dim=16", "head.mlp_hidden=32",
                                                             "head.roi_size=7", "head.mlp_input_size=14"], section="mask_train")
    mask_train(cfg, tiny_pipeline["detector"], tiny_pipeline["embeddings"], tmp_path / "r7")
    runs = {"r14": tiny_pipeline["runs"]["transfer"], "r7": tmp_path / "r7"}
    with pytest.raises(MaskxError, match="different RoI sizes"):
        evaluate_heads(runs, EvalConfig(split="nonvoc"))


def test_eval_gt_boxes_segments_every_ground_truth_box(tiny_pipeline, tiny_world, tmp_path):
    """--gt-boxes: one result per ground-truth instance, its own box and class, score 1 -> box AP 1.0."""
    runs = {"agnostic": tiny_pipeline["runs"]["agnostic"]}
    r = evaluate_heads(runs, EvalConfig(split="nonvoc", max_images=6, gt_boxes=True), json_out=tmp_path / "g.json")
    gt = json.loads(tiny_world.val_json.read_text())
    first = {im["id"] for im in gt["images"][:6]}
    anns = sorted((a["image_id"], a["category_id"], *a["bbox"]) for a in gt["annotations"] if a["image_id"] in first)
    dets = sorted((d["image_id"], d["category_id"], *d["bbox"]) for d in r.detections["agnostic"])
    assert len(dets) == len(anns)
    for a, d in zip(anns, dets):
        assert a[:2] == d[:2] and all(abs(x - y) < 1e-2 for x, y in zip(a[2:], d[2:]))
    assert all(d["score"] == 1.0 for d in r.detections["agnostic"])
    for s in ("A", "B", "all"):
        assert r.metrics["agnostic"]["bbox"][s]["AP"] == pytest.approx(1.0)
    assert json.loads((tmp_path / "g.json").read_text())["config"]["gt_boxes"] is True


def test_cli_eval_gt_boxes(tiny_pipeline, tmp_path):
    r = runner.invoke(app, ["eval", str(tiny_pipeline["runs"]["transfer"]), "--gt-boxes", "--max-images", "3",
                            "--json", str(tmp_path / "g.json")])
    assert r.exit_code == 0, r.output
    assert "ground-truth boxes" in r.output and "box AP" not in r.output


def test_cli_eval_reads_the_recipes_eval_section(tiny_pipeline, tmp_path):
    """maskx eval reads eval: of --config (by default of the detector's recipe.yaml); options win over it."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"eval": {"split": "voc", "max_images": 2, "backend": "pycocotools"}}))
    out = tmp_path / "m.json"
    r = runner.invoke(app, ["eval", str(tiny_pipeline["runs"]["agnostic"]), "--config", str(recipe), "--json", str(out)])
    assert r.exit_code == 0, r.output
    saved = json.loads(out.read_text())
    assert (saved["split"], saved["images"], saved["config"]["backend"]) == ("voc", 2, "pycocotools")
    assert len(saved["sets"]["B"]) == 20
    assert "warning: split 'voc' puts 20 class(es) that agnostic trained masks on into set B" in " ".join(r.output.split())
    assert len(saved["warnings"]) == 1
    r = runner.invoke(app, ["eval", str(tiny_pipeline["runs"]["agnostic"]), "--config", str(recipe), "--split", "nonvoc",
                            "--set", "max_images=3", "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert (json.loads(out.read_text())["split"], json.loads(out.read_text())["images"]) == ("nonvoc", 3)
    # by default the detector's recipe (synthetic: no eval.split): B = the classes the run had no masks for
    r = runner.invoke(app, ["eval", str(tiny_pipeline["runs"]["agnostic"]), "--max-images", "1"])
    assert r.exit_code == 0, r.output
    saved = json.loads((tiny_pipeline["runs"]["agnostic"] / "metrics.json").read_text())
    assert saved["split"] == "run" and saved["config"]["split"] == "" and len(saved["sets"]["B"]) == 60
    recipe.write_text(yaml.safe_dump({"eval": {"splt": "voc"}}))
    r = runner.invoke(app, ["eval", str(tiny_pipeline["runs"]["agnostic"]), "--config", str(recipe)])
    assert r.exit_code == 2 and f"{recipe}: unknown config key 'eval.splt'" in r.output


def test_the_default_recipe_is_the_detector_runs_for_library_callers_too(tmp_path):
    """Evaluation reads the eval: section of the detector run's recipe.yaml unless a recipe is named."""
    det_dir = tmp_path / "det"
    det_dir.mkdir()
    (det_dir / "recipe.yaml").write_text("eval: {score_thresh: 0.3, split: voc}\n")
    (det_dir / "model_final.pth").write_bytes(b"")
    for run in (det_dir, det_dir / "model_final.pth"):
        cfg = load_eval_config(None, run, [{"max_images": 2}])
        assert (cfg.score_thresh, cfg.split, cfg.max_images) == (0.3, "voc", 2)
    assert load_eval_config("synthetic", det_dir) == load_config(EvalConfig, "synthetic")
    assert load_eval_config(None, None) == EvalConfig()


def test_eval_of_a_run_warns_counted_about_zero_area_ground_truth_boxes(tiny_pipeline, tiny_world, tmp_path):
    """Was: skipped silently by 'maskx eval RUN' (detect-train, mask-train and eval --results warn)."""
    gt = json.loads(tiny_world.val_json.read_text())
    zeroed = [gt["annotations"][0]["id"], gt["annotations"][3]["id"]]
    for a in gt["annotations"]:
        if a["id"] in zeroed:
            a["bbox"][2] = 0.0
    bad = tmp_path / "val_zero.json"
    bad.write_text(json.dumps(gt))
    out = tmp_path / "m.json"
    r = runner.invoke(app, ["eval", str(tiny_pipeline["runs"]["transfer"]), "--gt", str(bad), "--images", str(tiny_world.val_dir),
                            "--max-images", "2", "--json", str(out)])
    assert r.exit_code == 0, r.output
    line = (f"{bad}: skipped 2 annotation(s) with a zero-area, negative or out-of-image box (annotation id "
            f"{zeroed[0]}, {zeroed[1]})")
    assert [s for s in r.output.splitlines() if s.startswith("warning:")] == [f"warning: {line}"]
    assert json.loads(out.read_text())["warnings"] == [line]

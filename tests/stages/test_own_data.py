"""One's own data: one COCO file where some classes have masks and others only boxes, through every stage.

The data is the synthetic world written as a labelling tool's export (``--names own
--box-only-classes 6 --unmasked-fraction 0.05``): 14 classes numbered 1..14 with names that are not
COCO's, 6 of them boxed only (``segmentation`` absent, ``null`` and ``[]`` in turn), and a few
annotations of the other 8 without a mask. The README's own-data commands run here as written.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from maskx_cli.main import app
from pipelines.config import MaskTrainConfig
from pipelines.data.annotations import annotated_classes, has_usable_mask
from pipelines.data.coco import load_coco
from pipelines.rois.store import open_cache
from pipelines.engine.run_dir import load_mask_run, load_stage_config, read_manifest

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()
OWN_NAMES_IN_A = None  # filled from the file: the classes with masks


def command_block(path: Path) -> list[str]:
    """The ``maskx`` lines of the bash block that follows ``<!-- own-data-commands -->`` in ``path``."""
    text = path.read_text()
    block = text.split("<!-- own-data-commands -->", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.splitlines() if line.strip().startswith("maskx ")]


def invoke(line: str):
    args = shlex.split(line)[1:]
    return runner.invoke(app, args)


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """The README's own-data commands, run as written in a fresh folder; their outputs by command."""
    root = tmp_path_factory.mktemp("own")
    here = os.getcwd()
    os.chdir(root)
    outputs = {}
    try:
        for line in command_block(ROOT / "README.md"):
            r = invoke(line)
            assert r.exit_code == 0, f"{line}\n{r.output}"
            outputs[line] = r.output
    finally:
        os.chdir(here)
    train, _ = load_coco(root / "mine/instances_train.json")
    return {"root": root, "outputs": outputs, "train": train, "world": json.loads((root / "mine/world.json").read_text())}


def test_docs_show_the_readme_commands():
    assert command_block(ROOT / "docs/own_data.md") == command_block(ROOT / "README.md")
    assert len(command_block(ROOT / "README.md")) >= 8


def test_the_file_is_mixed_in_every_form(own):
    dropped = own["world"]["masks_dropped"]
    assert set(dropped["box_only_annotations"]) == {"absent", "null", "empty"}
    assert all(n > 0 for n in dropped["box_only_annotations"].values())
    raw = json.loads((own["root"] / "mine/instances_train.json").read_text())
    forms = {"absent": 0, "null": 0, "empty": 0}
    for a in raw["annotations"]:
        if "segmentation" not in a:
            forms["absent"] += 1
        elif a["segmentation"] is None:
            forms["null"] += 1
        elif a["segmentation"] == []:
            forms["empty"] += 1
    planted = dict(dropped["box_only_annotations"])
    planted["empty"] += len(dropped["unmasked_annotations"])
    assert forms == planted
    assert len(dropped["unmasked_annotations"]) > 0
    assert all(c.get("coco_id") is None and "coco_id" not in c for c in raw["categories"])
    assert [c["id"] for c in raw["categories"]] == list(range(1, 15))


def test_set_a_is_the_annotated_classes_by_name(own):
    train = own["train"]
    box_only = set(own["world"]["masks_dropped"]["box_only_classes"])
    annotated = annotated_classes(train)
    assert set(annotated) == {c["id"] for c in train["categories"]} - box_only and len(annotated) == 8
    names = [c["name"] for c in train["categories"] if c["id"] in set(annotated)]
    for line, out in own["outputs"].items():
        if line.startswith(("maskx export-embeddings", "maskx mask-train")):
            assert "set A ('annotated', 8 of 14 classes)" in out
            assert all(f"{n} (" in out for n in names), out
    for run in ("transfer", "agnostic"):
        assert read_manifest(own["root"] / "runs" / run)["set_a"] == annotated
        assert load_mask_run(own["root"] / "runs" / run).set_a == annotated


def test_unmasked_set_a_annotations_are_counted_never_targets(own):
    planted = own["world"]["masks_dropped"]["unmasked_annotations"]
    line = next(l for l in own["outputs"] if l.startswith("maskx mask-train") and "transfer" in l)
    out = " ".join(own["outputs"][line].split())
    assert f"{len(planted)} set-A annotation(s) have no mask" in out and "no mask loss" in out
    assert read_manifest(own["root"] / "runs/transfer")["set_a_unmasked_annotations"] == len(planted)

    # the cache: which annotation each row is, and its target
    train = own["train"]
    by_image: dict[int, list[dict]] = {}
    for a in train["annotations"]:
        if not a["iscrowd"]:
            by_image.setdefault(a["image_id"], []).append(a)
    caches = sorted((own["root"] / "runs/det/cache").glob("features-*.h5"))
    assert len(caches) == 1  # transfer and agnostic share set A, so one cache
    cache = open_cache(caches[0], None)
    try:
        anns = [by_image[int(i)][int(k)] for i, k in zip(cache.meta("image_id"), cache.meta("instance"))]
        masks = np.asarray(cache.masks)
        is_gt = cache.meta("is_gt").astype(bool)
    finally:
        cache.close()
    assert all(has_usable_mask(a) for a in anns)  # no row of a box-only or mask-less annotation
    assert not {a["id"] for a in anns} & set(planted)
    set_a = set(annotated_classes(train))
    expected = {a["id"] for a in train["annotations"] if a["category_id"] in set_a and has_usable_mask(a)}
    assert {a["id"] for a in anns} == expected  # every masked set-A instance, nothing else
    assert (masks.reshape(len(masks), -1).max(1) > 0).all()  # no blank target in any row
    assert is_gt.sum() == len(expected)


def test_eval_scores_the_runs_own_set_b(own):
    metrics = json.loads((own["root"] / "runs/transfer/metrics.json").read_text())
    box_only = own["world"]["masks_dropped"]["box_only_classes"]
    assert metrics["split"] == "run"
    assert metrics["sets"]["B"] == box_only
    assert metrics["sets"]["A"] == annotated_classes(own["train"])
    assert metrics["warnings"] == [] and metrics["notes"] == []


def test_eval_warns_when_a_split_puts_trained_classes_in_b(own, monkeypatch):
    monkeypatch.chdir(own["root"])  # the runs name their data relative to where they were made
    r = runner.invoke(app, ["eval", str(own["root"] / "runs/transfer"), "--split", "ids:1,2,3",
                            "--json", str(own["root"] / "overlap.json")])
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    assert "warning: split 'ids:1,2,3' puts 2 class(es) that transfer trained masks on into set B: bolt (1), nut (2)" in out
    assert json.loads((own["root"] / "overlap.json").read_text())["warnings"]


def test_predict_with_gt_is_scored_as_it_is(own, monkeypatch, tmp_path):
    """predict --gt takes the ground truth's image ids: eval --gt --results on it equals eval of the run.
    (Score threshold 0 for both: the README's 20-iteration detector, with the recipe's Detectron init, scores
    every box near 1 / (K + 1), below the recipe's 0.05.)"""
    monkeypatch.chdir(own["root"])  # the runs name their data relative to where they were made
    root = own["root"]
    r = runner.invoke(app, ["predict", str(root / "mine/val"), "--mask", str(root / "runs/transfer"), "--gt",
                            str(root / "mine/instances_val.json"), "--score-thresh", "0.0", "--out", str(tmp_path / "p")])
    assert r.exit_code == 0, r.output
    val = json.loads((root / "mine/instances_val.json").read_text())
    ids = {im["file_name"]: im["id"] for im in val["images"]}
    preds = json.loads((tmp_path / "p/predictions.json").read_text())
    assert preds and all(p["image_id"] == ids[Path(p["file_name"]).name] for p in preds)
    split = "ids:" + ",".join(map(str, own["world"]["masks_dropped"]["box_only_classes"]))
    r = runner.invoke(app, ["eval", "--gt", str(root / "mine/instances_val.json"), "--results", str(tmp_path / "p/predictions.json"),
                            "--split", split, "--json", str(tmp_path / "m.json")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["eval", str(root / "runs/transfer"), "--split", split, "--set", "score_thresh=0.0",
                            "--json", str(tmp_path / "run.json")])
    assert r.exit_code == 0, r.output
    from_results = json.loads((tmp_path / "m.json").read_text())
    from_run = json.loads((tmp_path / "run.json").read_text())["heads"]["transfer"]
    assert from_run["bbox"]["all"]["AP"] > 0
    for iou in ("segm", "bbox"):
        for s in ("B", "A", "all"):
            assert from_results[iou][s] == pytest.approx(from_run[iou][s], abs=1e-12), (iou, s)


def test_predict_gt_skips_images_it_does_not_list(own, monkeypatch, tmp_path):
    monkeypatch.chdir(own["root"])  # the runs name their data relative to where they were made
    root = own["root"]
    val = json.loads((root / "mine/instances_val.json").read_text())
    val["images"] = val["images"][:3]
    val["annotations"] = [a for a in val["annotations"] if a["image_id"] in {im["id"] for im in val["images"]}]
    (tmp_path / "three.json").write_text(json.dumps(val))
    r = runner.invoke(app, ["predict", str(root / "mine/val"), "--mask", str(root / "runs/transfer"), "--gt",
                            str(tmp_path / "three.json"), "--out", str(tmp_path / "p")])
    assert r.exit_code == 0, r.output
    images = json.loads((tmp_path / "p/images.json").read_text())
    assert [im["id"] for im in images["images"]] == [im["id"] for im in val["images"]]
    assert len(images["skipped"]) == 9 and all("not in the ground truth" in s["reason"] for s in images["skipped"])


def test_voc_is_refused_on_own_classes(own, monkeypatch, tmp_path):
    monkeypatch.chdir(own["root"])  # the runs name their data relative to where they were made
    root = own["root"]
    r = runner.invoke(app, ["mask-train", "-d", str(root / "runs/det"), "-e", str(root / "runs/det/emb.h5"),
                            "--mask-classes", "voc", "--iterations", "2", "--out", str(tmp_path / "m")])
    assert r.exit_code == 2 and not (tmp_path / "m").exists()
    line = " ".join(r.output.split())
    assert ("split 'voc' picks classes by COCO category id, but these categories are not COCO's "
            "(id 1 is 'bolt', COCO's id 1 is 'person')") in line and "'annotated'" in line
    r = runner.invoke(app, ["data", "check", str(root / "mine/instances_train.json"), "--split", "nonvoc"])
    assert r.exit_code == 0 and "these categories are not COCO's" in r.output


def test_a_set_a_class_without_masks_is_refused(own, monkeypatch, tmp_path):
    monkeypatch.chdir(own["root"])  # the runs name their data relative to where they were made
    root = own["root"]
    box_only = own["world"]["masks_dropped"]["box_only_classes"][0]
    r = runner.invoke(app, ["mask-train", "-d", str(root / "runs/det"), "-e", str(root / "runs/det/emb.h5"),
                            "--mask-classes", f"ids:1,{box_only}", "--iterations", "2", "--out", str(tmp_path / "m")])
    assert r.exit_code == 2 and not (tmp_path / "m").exists()
    assert re.search(r"set A \('ids:1,\d+'\) holds 1 box-only class\(es\), with no mask in the training file", " ".join(r.output.split()))


def test_data_check_counts_per_class(own):
    line = next(l for l in own["outputs"] if l.startswith("maskx data check"))
    out = own["outputs"][line]
    dropped = own["world"]["masks_dropped"]
    n_box_only = sum(dropped["box_only_annotations"].values()) + len(dropped["unmasked_annotations"])
    assert re.search(rf"box-only annotations \(no mask\)\s+│\s+{n_box_only}\b", out), out
    assert "8 of 14 classes have masks" in out
    cats = {c["id"]: c for c in own["train"]["categories"]}
    for cid in dropped["box_only_classes"]:
        row = next(l for l in out.splitlines() if re.search(rf"│\s+{cid} │ {cats[cid]['name']}\s", l))
        cells = [c.strip() for c in row.split("│")[1:-1]]
        assert cells[3] == "0" and cells[4] == cells[2] and cells[5] == "B"


def test_no_cache_route_and_end_to_end_on_the_mixed_file(own, monkeypatch, tmp_path):
    """mask-train through the frozen detector, then maskx train end to end, then eval: exit 0, set A by name."""
    monkeypatch.chdir(own["root"])  # the runs name their data relative to where they were made
    root = own["root"]
    r = runner.invoke(app, ["mask-train", "-d", str(root / "runs/det"), "-e", str(root / "runs/det/emb.h5"),
                            "--mask-classes", "annotated", "--no-cache", "--iterations", "3", "--out", str(tmp_path / "nc")])
    assert r.exit_code == 0, r.output
    assert "set A ('annotated', 8 of 14 classes)" in r.output
    mine = root / "mine"
    r = runner.invoke(app, ["train", "--config", "synthetic", "--train-data", str(mine / "instances_train.json"),
                            "--train-images", str(mine / "train"), "--val-data", str(mine / "instances_val.json"),
                            "--val-images", str(mine / "val"), "--mask-classes", "annotated", "--iterations", "3",
                            "--set", "detector.min_size=96", "--set", "detector.max_size=96", "--set", "solver.batch_size=4",
                            "--out", str(tmp_path / "e2e")])
    assert r.exit_code == 0, r.output
    assert "set-A annotation(s) have no mask" in " ".join(r.output.split())
    r = runner.invoke(app, ["eval", str(tmp_path / "e2e"), "--json", str(tmp_path / "e2e.json")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "e2e.json").read_text())["sets"]["B"] == own["world"]["masks_dropped"]["box_only_classes"]


def test_stage_two_takes_the_detector_runs_data_key_by_key(own):
    det = own["root"] / "runs/det"
    run_cfg = json.loads(json.dumps(__import__("yaml").safe_load((det / "config.yaml").read_text())))["data"]
    # a recipe with its own COCO paths: the detector run's files win, key by key
    cfg = load_stage_config(MaskTrainConfig, "coco_voc_tv_r50", det, [])
    for k in ("train_json", "train_images", "val_json", "val_images"):
        assert getattr(cfg.data, k) == run_cfg[k]
    cfg = load_stage_config(MaskTrainConfig, None, det, ["data.train_json=other.json"], source="--set")
    assert cfg.data.train_json == "other.json" and cfg.data.train_images == run_cfg["train_images"]


def test_mask_train_says_which_degenerate_boxes_it_skipped(own, monkeypatch, tmp_path):
    """A zero-area box in the training file: skipped by stage 2 too, with the counted warning detect-train gives."""
    monkeypatch.chdir(own["root"])
    data = json.loads((own["root"] / "mine/instances_train.json").read_text())
    first = next(a for a in data["annotations"] if has_usable_mask(a))
    data["annotations"].append({**first, "id": 99999, "bbox": [first["bbox"][0], first["bbox"][1], 0, 5]})
    (tmp_path / "t.json").write_text(json.dumps(data))
    r = runner.invoke(app, ["mask-train", "-d", "runs/det", "-e", "runs/det/emb.h5", "--mask-classes", "annotated",
                            "--train-data", str(tmp_path / "t.json"), "--iterations", "1", "--no-cache", "--out", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    assert "skipped 1 annotation(s) with a zero-area, negative or out-of-image box (annotation id 99999)" in " ".join(r.output.split())


def test_cache_build_reuses_the_mask_train_cache_and_warns_once(own, monkeypatch):
    monkeypatch.chdir(own["root"])
    r = runner.invoke(app, ["cache", "build", "-d", "runs/det", "--mask-classes", "annotated"])
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    assert "already there, reused" in out
    assert out.count("set-A annotation(s) have no mask") == 1


def test_export_annotated_needs_the_runs_training_file(own, monkeypatch, tmp_path):
    from pipelines.engine.run_dir import DetectorRun
    from pipelines.errors import MaskxError
    from pipelines.stages.export_embeddings import export_embeddings

    monkeypatch.setattr(DetectorRun, "data_paths", lambda self: {})
    with pytest.raises(MaskxError, match="set A 'annotated' is read from the training file the detector was made with, "
                                         "and this run names none"):
        export_embeddings(own["root"] / "runs/det", tmp_path / "e.h5", "annotated")
    assert not (tmp_path / "e.h5").exists()

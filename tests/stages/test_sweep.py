"""The sweep: one detector for every stage-2 variant, one JSON per run, a paper-style table, resume."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from maskx_cli.main import app
from pipelines.config import EvalConfig, load_config
from pipelines.data.coco import collate
from pipelines.engine.run_dir import load_detector_run
from pipelines.evaluation.inference import load_validation
from pipelines.evaluation.results import to_coco_results
from pipelines.evaluation.scoring import score
from pipelines.stages.sweep_spec import SPEC_DIR, load_spec
from pipelines.errors import MaskxError
from pipelines.evaluation.report import timing_text
from pipelines.stages.sweep import TIMED, run_sweep
from pipelines.stages.sweep_rows import ROW_KINDS, RowKind

runner = CliRunner()
TINY_STAGE2 = ["solver.iterations=2", "solver.warmup_iters=1", "solver.batch_size=16", "head.mask_dim=8", "head.mlp_hidden=16"]


def _spec(tmp_path, **extra):
    spec = {
        "title": "tiny table",
        "recipe": "synthetic",
        "directions": ["voc"],
        "seeds": [0],
        "max_val_images": 3,
        "stage2": TINY_STAGE2,
        "rows": [
            {"name": "class-agnostic", "set": ["head.head=agnostic", "head.mlp=false"]},
            {"name": "transfer+MLP", "set": ["head.head=transfer", "head.mlp=true"]},
            {"name": "transfer w/ GloVe", "set": ["head.head=transfer", "head.input=glove"]},
            {"name": "GrabCut at test", "train": "grabcut-test"},
        ],
        **extra,
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_sweep_writes_table_and_resumes(tiny_pipeline, tmp_path):
    out = tmp_path / "sweep"
    r = runner.invoke(app, ["sweep", str(_spec(tmp_path)), "--out", str(out), "--detector", str(tiny_pipeline["detector"])])
    assert r.exit_code == 0, r.output
    results = sorted((out / "results").glob("*.json"))
    assert [p.name for p in results] == ["class-agnostic__voc__s0.json", "grabcut-at-test__voc__s0.json",
                                         "transfer-mlp__voc__s0.json", "transfer-w-glove__voc__s0.json"]
    rec = json.loads((out / "results" / "transfer-mlp__voc__s0.json").read_text())
    assert rec["train"] == "stagewise" and len(rec["set_a"]) == 20 and len(rec["set_b"]) == 60
    assert set(rec["metrics"]["segm"]) == {"B", "A"} and rec["val_images"] == 3
    assert json.loads((out / "results" / "transfer-w-glove__voc__s0.json").read_text())["note"].startswith("skipped")
    table = (out / "table.md").read_text()
    assert "| method | voc→nonvoc: AP on B | voc→nonvoc: AP on A |" in table
    assert table.count("\n| ") == 5  # header + 4 rows
    assert "| transfer w/ GloVe | n/a | n/a |" in table and "needs a GloVe file" in table

    timings = json.loads((out / "summary.json").read_text())["timings"]
    assert list(timings) == list(TIMED)  # every part, in order; the detector was given, no world made
    assert timings["world"] == 0 and timings["stage 1"] == 0
    assert timings["stage 2 setup (feature cache)"] > 0 and timings["evaluation"] > 0  # building the cache, scoring
    assert timings["stage 2 training"] >= 0  # 2 steps a run: may round to 0.0 s
    assert f"({timing_text(timings)})" in r.output  # the split is printed (parts of 1 s or more)

    ckpt = out / "runs" / "transfer-mlp__voc__s0" / "mask_final.pth"
    stamp = ckpt.stat().st_mtime_ns
    again = run_sweep(load_spec(_spec(tmp_path)), out, tiny_pipeline["detector"])
    assert again.ran == 0 and again.skipped == 4
    assert again.timings["stage 2 training"] == 0 and again.timings["stage 2 setup (feature cache)"] == 0
    (out / "results" / "transfer-mlp__voc__s0.json").unlink()
    third = run_sweep(load_spec(_spec(tmp_path)), out, tiny_pipeline["detector"])
    assert third.ran == 1 and ckpt.stat().st_mtime_ns == stamp  # re-evaluated, not retrained
    assert json.loads((out / "results" / "transfer-mlp__voc__s0.json").read_text())["metrics"] == rec["metrics"]


def test_random_splits_figure(tiny_pipeline, tmp_path):
    spec = _spec(tmp_path, random_splits={"sizes": [20, 30, 40], "trials": 1},
                 figure={"numerator": "transfer+MLP", "denominator": "class-agnostic"})
    s = load_spec(spec)
    s.rows = s.rows[:2]
    r = run_sweep(s, tmp_path / "fig", tiny_pipeline["detector"])
    assert r.figure is not None and r.figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    points = json.loads(r.summary_json.read_text())["figure_points"]
    assert [p["direction"] for p in points] == ["random:20:0", "random:30:0", "random:40:0"]
    assert [p["size_a"] for p in points] == [20, 30, 40] and all(p["masks_per_class_a"] > 0 for p in points)
    # three directions: one table row per direction, methods as columns
    table = (r.out / "table.md").read_text().splitlines()
    assert "| set A | class-agnostic: AP on B | class-agnostic: AP on A | transfer+MLP: AP on B | transfer+MLP: AP on A |" in table
    body = [line.split(" | ")[0] for line in table if line.startswith("| ") and not line.startswith("| set A")]
    assert body == ["| random:20:0", "| random:30:0", "| random:40:0"]
    point = next(p for p in points if p["direction"] == "random:40:0")
    row = next(line for line in table if line.startswith("| random:40:0 |")).split(" | ")
    assert row[1] == f"{100 * point['ap_b_denominator']:.1f}" and row[3] == f"{100 * point['ap_b_numerator']:.1f}"


def test_shipped_specs_load():
    names = sorted(p.stem for p in SPEC_DIR.glob("*.yaml"))
    assert names == ["figure_3_1", "quickstart", "table_3_1", "table_3_2", "table_3_3", "table_3_4", "table_3_5"]
    for n in names:
        s = load_spec(n)
        assert s.rows and s.all_directions()
    assert len(load_spec("figure_3_1").all_directions()) == 25


def test_bad_spec_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rows: [{name: a, train: sideways}]\n")
    with pytest.raises(MaskxError, match="train must be one of"):
        load_spec(bad)
    bad.write_text("rowz: []\n")
    r = runner.invoke(app, ["sweep", str(bad), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "unknown sweep key 'rowz'" in r.output and "bad.yaml" in r.output


def test_world_flags_replace_only_the_given_fields_of_the_spec_world(tmp_path, monkeypatch):
    import pipelines.stages.sweep as sweep_module

    seen = {}

    def fake_run_sweep(spec, out, *args, **kwargs):
        seen["world"] = spec.world
        raise MaskxError("stopped before stage 1")

    monkeypatch.setattr(sweep_module, "run_sweep", fake_run_sweep)
    r = runner.invoke(app, ["sweep", "table_3_1", "--out", str(tmp_path / "o"), "--world-seed", "1",
                            "--class-freq", "coco", "--shapes", "class", "--appearance", "photo"])
    assert r.exit_code == 2 and "stopped before stage 1" in r.output
    w = seen["world"]
    assert (w.seed, w.class_freq, w.shapes, w.appearance) == (1, "coco", "class", "photo")
    shipped = load_spec("table_3_1").world
    assert (w.train_images, w.val_images, w.num_classes, w.min_radius) == (
        shipped.train_images, shipped.val_images, shipped.num_classes, shipped.min_radius)

    seen.clear()
    r = runner.invoke(app, ["sweep", "table_3_1", "--out", str(tmp_path / "o")])
    assert seen["world"] == shipped  # no world flag: the spec's world as it is

    monkeypatch.undo()  # the real sweep: the world is checked before anything is trained
    r = runner.invoke(app, ["sweep", "table_3_1", "--out", str(tmp_path / "o"), "--class-freq", "zipf"])
    assert r.exit_code == 2 and "class_freq must be one of uniform | coco" in r.output and "zipf" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["sweep", "table_3_1", "--out", str(tmp_path / "o"), "--detector", str(tmp_path),
                            "--world-seed", "3"])
    assert r.exit_code == 2 and "--world-seed" in r.output and "with --detector" in r.output


def test_timing_text_lists_the_parts_that_took_time():
    assert timing_text({"world": 0.2, "stage 1": 612.4, "stage 2 training": 98.6}) == "stage 1 612 s, stage 2 training 99 s"
    assert timing_text({"world": 0.0}) == "every part reused"


def _mlp_of(row) -> bool:
    sets = dict(item.split("=", 1) for item in row.set)
    return sets["head.mlp"] == "true"


def test_figure_3_1_compares_the_heads_without_mlp_branch():
    """As the original random-split configs (template_clsbox_2_layer.yaml, template_baseline.yaml)."""
    spec = load_spec("figure_3_1")
    rows = {r.name: r for r in spec.rows}
    numerator, denominator = rows[spec.figure.numerator], rows[spec.figure.denominator]
    assert (numerator.set, denominator.set) == (["head.head=transfer", "head.mlp=false"], ["head.head=agnostic", "head.mlp=false"])
    assert not _mlp_of(numerator) and not _mlp_of(denominator)
    assert all("extra row" in name for name, r in rows.items() if _mlp_of(r))


def test_table_3_1_randn_row_is_the_official_unit_300d_input():
    """randn_2_layer.yaml: fixed 300-d rows; maskx's form of them is ``head.randn=unit`` (rows of norm 1)."""
    import torch

    from pipelines.modeling.embeddings import RANDN_FORMS

    row = next(r for r in load_spec("table_3_1").rows if "randn" in r.name)
    sets = dict(item.split("=", 1) for item in row.set)
    assert (sets["head.input"], sets["head.randn"]) == ("randn", "unit")
    table = RANDN_FORMS[sets["head.randn"]].table(80, 1024, seed=0)
    assert table.shape == (80, 300)
    assert torch.allclose(table.norm(dim=1), torch.ones(80), atol=1e-5)


def test_table_3_5_baselines_have_no_mlp_branch():
    rows = {r.name: r for r in load_spec("table_3_5").rows if r.train == "e2e"}
    assert {name: _mlp_of(r) for name, r in rows.items()} == {
        "class-agnostic": False, "Mask R-CNN trained w/ GrabCut": False, "Mask^X R-CNN (transfer+MLP)": True,
        "fully supervised (oracle)": False}


def test_set_means_every_stage_and_stage2_every_mask_side_run(tmp_path, monkeypatch):
    """``--set`` is what the spec's ``overrides:`` are (every stage), as in ``maskx quickstart``;
    ``--stage2`` what its ``stage2:`` are (every mask-side run)."""
    import pipelines.stages.sweep as sweep_module

    seen = {}

    def fake_run_sweep(spec, out, detector=None, stage2=(), glove=None, progress=None, overrides=(), keep_images=0):
        seen.update(stage2=[o.label for o in stage2], overrides=[o.label for o in overrides])
        raise MaskxError("stopped before stage 1")

    monkeypatch.setattr(sweep_module, "run_sweep", fake_run_sweep)
    r = runner.invoke(app, ["sweep", "table_3_1", "--out", str(tmp_path / "o"), "--set", "solver.amp=off",
                            "--stage2", "solver.iterations=7"])
    assert r.exit_code == 2 and "stopped before stage 1" in r.output
    assert seen == {"overrides": ["--set solver.amp=off"], "stage2": ["--stage2 solver.iterations=7"]}


@dataclass
class BoxMaskPredictions:
    """The worked example of docs/architecture.md ("How to add a baseline row to a sweep"): the
    detector's boxes, each filled as its own mask."""

    detector: object
    name: str = "boxes"
    batch_images: int = 4
    iou_types: tuple = ("segm", "bbox")
    source: object = None

    @torch.no_grad()
    def predict(self, data, progress=None):
        model = self.detector.model.eval()
        cat_ids = torch.tensor([c["id"] for c in self.detector.categories])
        results = []
        loader = torch.utils.data.DataLoader(data.dataset, batch_size=self.batch_images, collate_fn=collate)
        for images, targets in loader:
            for im, d, t in zip(images, model(list(images)), targets):
                boxes = d["boxes"].numpy()
                masks = np.zeros((len(boxes), *im.shape[1:]), np.uint8)
                for m, (x1, y1, x2, y2) in zip(masks, boxes.round().astype(int)):
                    m[y1:y2, x1:x2] = 1
                results.extend(to_coco_results(int(t["image_id"]), boxes, d["scores"].numpy(), cat_ids[d["labels"] - 1].numpy(), masks))
        return {self.name: results}


class BoxesAtTest(RowKind):
    """"Faster R-CNN tested w/ filled boxes": every detected box filled as its mask; nothing trained."""

    name = "boxes-test"

    def evaluation_key(self, job):
        return "boxes at test"

    def producer(self, ctx, jobs):
        producer = BoxMaskPredictions(ctx.det)
        return producer, {j.result: producer.name for j in jobs}


def test_a_new_baseline_row_is_one_class(tiny_pipeline, tiny_world, tmp_path, monkeypatch):
    spec = _spec(tmp_path, rows=[{"name": "boxes at test", "train": "boxes-test"}])
    with pytest.raises(MaskxError, match=re.escape("train must be one of stagewise | e2e | grabcut-test, got 'boxes-test'")):
        load_spec(spec)
    monkeypatch.setitem(ROW_KINDS, BoxesAtTest.name, BoxesAtTest)  # what registering it in the table does
    r = run_sweep(load_spec(spec), tmp_path / "boxes", tiny_pipeline["detector"])
    rec = r.records[0]
    assert (rec["row"], rec["train"], rec["run"], r.ran) == ("boxes at test", "boxes-test", None, 1)
    # scored through the one evaluation path: the same numbers as scoring the producer's predictions by hand
    det = load_detector_run(tiny_pipeline["detector"])
    data = load_validation(det, tiny_world.val_json, tiny_world.val_dir, 3)
    det.model.roi_heads.score_thresh = load_config(EvalConfig, "synthetic").score_thresh
    by_hand = score(data.gt, BoxMaskPredictions(det).predict(data)["boxes"], {"B": rec["set_b"], "A": rec["set_a"]},
                    image_ids=data.image_ids).metrics
    assert rec["metrics"] == by_hand and by_hand["segm"]["B"]["AP"] is not None


def test_end_to_end_row_trained_on_grabcut_masks(tiny_pipeline, tmp_path):
    """Table 3.5's "Mask R-CNN trained w/ GrabCut": its training file (set B's masks by GrabCut) is made
    for an end-to-end row too, and the run reads it."""
    detector_keys = [o for o in tiny_pipeline["overrides"] if o.startswith("detector.")]
    spec = _spec(tmp_path, overrides=detector_keys, e2e={"init": "stage1", "iterations": 1},
                 stage2=TINY_STAGE2 + ["solver.batch_size=2"],
                 rows=[{"name": "trained w/ GrabCut", "train": "e2e", "masks": "grabcut", "set": ["head.mlp=false"]}])
    out = tmp_path / "gc"
    r = run_sweep(load_spec(spec), out, tiny_pipeline["detector"])
    rec = r.records[0]
    assert (rec["train"], rec["masks"], r.ran) == ("e2e", "grabcut", 1)
    made = out / "grabcut" / "train_grabcut_voc.json"
    config = yaml.safe_load((out / "runs" / "trained-w-grabcut__voc__s0" / "config.yaml").read_text())
    assert made.is_file() and config["data"]["train_json"] == str(made) and config["head"]["head"] == "oracle"
    assert set(rec["metrics"]["segm"]) == {"B", "A"}

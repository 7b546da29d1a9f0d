"""Run folders: a failed run leaves nothing new or says it failed; a rerun starts clean; temporaries are swept."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from maskx_cli.main import app
from pipelines.config import DetectTrainConfig
from pipelines.data.coco import CocoDataset
from pipelines.engine.run_dir import read_manifest, training_run
from pipelines.stages.detect_train import start_warnings
from tests.engine.test_resume import sigterm_after
from tests.engine.tiny_runs import cli_overrides, make_world

pytestmark = pytest.mark.slow
runner = CliRunner()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("runs"), train_images=4, val_images=1)


def detect_train(world, out, *extra: str, iterations: int = 2, resume: bool = False):
    return runner.invoke(app, ["detect-train", "--config", "synthetic", "--out", str(out), "--iterations", str(iterations),
                               *(["--resume"] if resume else []), *cli_overrides(world, "solver.checkpoint_every=1", *extra)])


def errors(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("error:")]


def stopped_run(world, out, monkeypatch) -> None:
    """A 3-iteration run stopped by SIGTERM in iteration 2: ``last.pth`` at iteration 2, no final checkpoint."""
    with monkeypatch.context() as m:  # 4 images per step: the 5th image read is in iteration 2
        m.setattr(CocoDataset, "__getitem__", sigterm_after(5, CocoDataset.__getitem__))
        r = detect_train(world, out, iterations=3)
    assert r.exit_code == 2 and "stopped by SIGTERM at iteration 2" in errors(r)[0], r.output
    assert (out / "last.pth").is_file() and not (out / "model_final.pth").exists()


def broken_world(world, tmp_path):
    """A copy of ``world`` whose first training image is missing (training fails on its first step)."""
    root = tmp_path / "broken"
    shutil.copytree(world.out_dir, root)
    data = json.loads((root / "instances_train.json").read_text())
    (root / "train" / data["images"][0]["file_name"]).unlink()
    return [f"data.train_json={root / 'instances_train.json'}", f"data.train_images={root / 'train'}"]


def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing(world, tmp_path):
    """Was: config.yaml, manifest.json and tb/ left in a folder with no checkpoint."""
    out = tmp_path / "run"
    broken = broken_world(world, tmp_path)
    r = detect_train(world, out, *broken)
    assert r.exit_code == 2 and len(errors(r)) == 1 and "image file not found" in errors(r)[0], r.output
    assert not out.exists()

    # in a folder that was there before, only the run's own files go
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = detect_train(world, out, *broken)
    assert r.exit_code == 2
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_a_rerun_without_resume_starts_clean(world, tmp_path):
    """What an earlier failed attempt left (no checkpoint) is removed: no stale metrics lines or TensorBoard events."""
    out = tmp_path / "run"
    (out / "tb").mkdir(parents=True)
    (out / "tb" / "events.out.tfevents.1.old.0.0").write_bytes(b"stale events")
    (out / "metrics.jsonl").write_text("".join(json.dumps({"iteration": i, "loss": 9.0}) + "\n" for i in range(1, 11)))
    (out / "manifest.json").write_text(json.dumps({"stage": "detect-train", "status": "running"}))
    (out / ".last.pth.k2j4h5g6.tmp").write_bytes(b"cut short by kill -9")
    r = detect_train(world, out)
    assert r.exit_code == 0, r.output
    assert [json.loads(line)["iteration"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert not any(p.name.endswith(".old.0.0") for p in (out / "tb").iterdir())
    assert not list(out.glob(".*.tmp"))
    assert read_manifest(out)["status"] == "finished"
    assert sorted(p.name for p in out.glob("*.pth")) == ["model_final.pth"]  # a finished run keeps no last.pth
    assert "warning:" not in r.output  # a recipe was given


def test_a_folder_with_an_unfinished_run_is_refused_without_resume(world, tmp_path, monkeypatch):
    """A folder holding a run that can be resumed is not thrown away without a word; resumed, it ends without last.pth."""
    out = tmp_path / "run"
    stopped_run(world, out, monkeypatch)
    r = detect_train(world, out, iterations=3)
    assert r.exit_code == 2
    assert errors(r) == [f"error: {out}: holds an unfinished run (last.pth): add --resume to continue it, or choose another output folder"]
    assert (out / "last.pth").is_file()
    r = detect_train(world, out, iterations=3, resume=True)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.glob("*.pth")) == ["model_final.pth"]
    assert [json.loads(line)["iteration"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_a_run_that_fails_after_a_checkpoint_says_so_in_its_manifest(world, tmp_path, monkeypatch):
    out = tmp_path / "run"
    stopped_run(world, out, monkeypatch)
    r = detect_train(world, out, *broken_world(world, tmp_path), iterations=3, resume=True)
    assert r.exit_code == 2, r.output
    manifest = read_manifest(out)
    assert manifest["status"] == "failed" and "image file not found" in manifest["error"]
    assert manifest["error"] == errors(r)[0].removeprefix("error: ")
    assert (out / "last.pth").is_file()


def test_degenerate_box_warning_gives_the_annotation_ids(world, tmp_path):
    """data/README.md promises the count and the first annotation ids."""
    data = json.loads(world.train_json.read_text())
    for ann in data["annotations"][:2]:
        ann["bbox"][2] = 0
    path = tmp_path / "instances_train.json"
    path.write_text(json.dumps(data))
    r = detect_train(world, tmp_path / "run", f"data.train_json={path}", iterations=1)
    assert r.exit_code == 0, r.output
    ids = ", ".join(str(a["id"]) for a in data["annotations"][:2])
    warnings = [line for line in r.output.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {path}: skipped 2 annotation(s) with a zero-area, negative or out-of-image box "
                        f"(annotation id {ids})"]


def test_the_folder_of_another_stage_is_never_swept(tmp_path, monkeypatch):
    """``mask-train --out`` pointed at a detector run: its config, manifest and logs stay, whatever happens."""
    out = tmp_path / "det"
    out.mkdir()
    for name in ("model_final.pth", "config.yaml", "manifest.json", "metrics.jsonl"):
        (out / name).write_text("the detector's")
    with pytest.raises(RuntimeError, match="boom"):
        with training_run(out, resume=False, finished=("mask_final.pth",)):
            raise RuntimeError("boom")
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "manifest.json", "metrics.jsonl", "model_final.pth"]


def test_only_the_first_process_sweeps_even_before_it_joins_the_group(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("stale\n")
    monkeypatch.setenv("RANK", "1")  # as torchrun sets it, before init_process_group
    with training_run(out, resume=False, finished=()):
        assert (out / "metrics.jsonl").is_file()
    monkeypatch.setenv("RANK", "0")
    with training_run(out, resume=False, finished=()):
        assert not (out / "metrics.jsonl").exists()


def test_detect_train_without_a_recipe_warns_once_of_a_random_backbone(tmp_path):
    missing = tmp_path / "none.json"
    r = runner.invoke(app, ["detect-train", "--out", str(tmp_path / "run"), "--train-data", str(missing)])
    assert r.exit_code == 2 and len(errors(r)) == 1 and str(missing) in errors(r)[0]
    warnings = [line for line in r.output.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: no recipe and no detector.pretrained_backbone: the resnet50 backbone starts from random "
                        "weights, which needs far longer training; set detector.pretrained_backbone=IMAGENET1K_V1 (or a "
                        "weights file), or start from a recipe"]
    assert start_warnings(DetectTrainConfig(), "synthetic") == []
    named = DetectTrainConfig()
    named.detector.pretrained_backbone = "IMAGENET1K_V1"
    assert start_warnings(named, None) == []
    assert len(start_warnings(DetectTrainConfig(), None)) == 1

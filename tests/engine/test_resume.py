"""Resume: a run stopped by SIGTERM and resumed reaches the same weights as an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from pipelines.data.coco import CocoDataset
from pipelines.data.transforms import FlippedCopies
from pipelines.checkpoint import load_checkpoint
from pipelines.engine.run_dir import read_manifest
from pipelines.errors import MaskxError
from pipelines.stages.detect_train import detect_train
from pipelines.stages.export_embeddings import export_embeddings
from pipelines.stages.mask_train import mask_train
from tests.engine.tiny_runs import detect_config, make_world, mask_config

pytestmark = pytest.mark.slow
ITERS = ["solver.iterations=6", "solver.checkpoint_every=3"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The world, an uninterrupted 6-iteration detector run and its embeddings."""
    root = tmp_path_factory.mktemp("resume")
    torch.set_num_threads(1)
    world = make_world(root)
    detect_train(detect_config(world, *ITERS), root / "det_full")
    export_embeddings(root / "det_full", root / "emb.h5")
    return root, world


def sigterm_after(calls: int, fn):
    """Wrap ``fn`` so that its ``calls``-th call sends SIGTERM to this process (as a scheduler would)."""
    count = {"n": 0}

    def wrapper(*args, **kwargs):
        count["n"] += 1
        if count["n"] == calls:
            os.kill(os.getpid(), signal.SIGTERM)
        return fn(*args, **kwargs)

    return wrapper


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_detector_stopped_by_sigterm_then_resumed_matches_uninterrupted(runs, monkeypatch):
    root, world = runs
    out = root / "det_stopped"
    # 4 images per step: the 10th image read is in iteration 3 (0-based 2), so the run stops after it
    monkeypatch.setattr(CocoDataset, "__getitem__", sigterm_after(10, CocoDataset.__getitem__))
    with pytest.raises(MaskxError, match="stopped by SIGTERM at iteration 3; checkpoint saved"):
        detect_train(detect_config(world, *ITERS), out)
    monkeypatch.undo()
    assert load_checkpoint(out / "last.pth")["iteration"] == 3
    assert not (out / "model_final.pth").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    manifest = read_manifest(out)
    assert manifest["status"] == "failed" and manifest["error"].startswith(f"{out}: stopped by SIGTERM at iteration 3")
    stale = out / ".last.pth.x1y2z3w4.tmp"  # what a kill -9 in the middle of a checkpoint write leaves
    stale.write_bytes(b"cut short")

    detect_train(detect_config(world, *ITERS), out, resume=True)
    assert not stale.exists() and read_manifest(out)["status"] == "finished"
    assert not (out / "last.pth").exists()  # finished: the final checkpoint holds the weights
    full = load_checkpoint(root / "det_full" / "model_final.pth")["model"]
    resumed = load_checkpoint(out / "model_final.pth")["model"]
    assert_same_state(full, resumed)
    # the same losses at every iteration, one line per iteration (none repeated by the resume)
    assert [m["iteration"] for m in metrics(out)] == list(range(1, 7))
    assert metrics(out) == metrics(root / "det_full")


def test_detector_with_flips_stopped_then_resumed_matches_uninterrupted(runs, monkeypatch):
    """With data.hflip the batches come from the flipped copies (2x the images): still bit-identical."""
    root, world = runs
    flips = [*ITERS, "data.hflip=true"]
    detect_train(detect_config(world, *flips), root / "det_flip_full")
    full = load_checkpoint(root / "det_flip_full" / "model_final.pth")["model"]
    plain = load_checkpoint(root / "det_full" / "model_final.pth")["model"]
    assert any(not torch.equal(full[k], plain[k]) for k in full)  # flips changed what was trained on

    out = root / "det_flip_stopped"
    read: list[bool] = []
    getitem = FlippedCopies.__getitem__

    def reading(self, index):
        read.append(self.source(index)[1])
        return getitem(self, index)

    monkeypatch.setattr(FlippedCopies, "__getitem__", sigterm_after(10, reading))
    with pytest.raises(MaskxError, match="stopped by SIGTERM at iteration 3; checkpoint saved"):
        detect_train(detect_config(world, *flips), out)
    monkeypatch.undo()
    assert any(read) and not all(read)  # both mirrored and unmirrored images were read before the stop
    detect_train(detect_config(world, *flips), out, resume=True)
    assert_same_state(full, load_checkpoint(out / "model_final.pth")["model"])
    assert metrics(out) == metrics(root / "det_flip_full")


def test_mask_head_stopped_then_resumed_matches_uninterrupted(runs, monkeypatch):
    import pipelines.stages.mask_train as mt

    root, world = runs
    det, emb = root / "det_full", root / "emb.h5"
    mask_train(mask_config(world, *ITERS), det, emb, root / "mask_full")
    out = root / "mask_stopped"
    monkeypatch.setattr(mt, "mask_loss", sigterm_after(2, mt.mask_loss))
    with pytest.raises(MaskxError, match="stopped by SIGTERM at iteration 2"):
        mask_train(mask_config(world, *ITERS), det, emb, out)
    monkeypatch.undo()
    ckpt = load_checkpoint(out / "last.pth")
    assert ckpt["iteration"] == 2 and "optimizer" in ckpt and "rng" in ckpt
    mask_train(mask_config(world, *ITERS), det, emb, out, resume=True)
    assert_same_state(load_checkpoint(root / "mask_full" / "mask_final.pth")["model"],
                      load_checkpoint(out / "mask_final.pth")["model"])
    assert metrics(out) == metrics(root / "mask_full")

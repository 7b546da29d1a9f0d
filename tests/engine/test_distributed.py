"""torchrun: 2 CPU processes (gloo) run detect-train and mask-train with the single-process contract."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from pipelines.engine.checkpoint import load_checkpoint
from pipelines.stages.detect_train import detect_train
from pipelines.stages.export_embeddings import export_embeddings
from pipelines.stages.mask_train import mask_train
from tests.engine.tiny_runs import HEAD, cli_overrides, detect_config, make_world, mask_config

pytestmark = pytest.mark.slow

# Runs the CLI commands in each torchrun worker: detect-train, export-embeddings (rank 0), mask-train.
DRIVER = textwrap.dedent('''
    import json, sys
    from maskx_cli.main import app
    from pipelines.engine import distributed as dist

    def call(args):
        code = app(args, standalone_mode=False)
        if code:
            sys.exit(code)

    plan = json.loads(sys.argv[1])
    call(plan["detect"])
    if dist.is_main():
        call(plan["export"])
    dist.barrier()
    call(plan["mask"])
''')


def lines(path):
    return [json.loads(s) for s in path.read_text().splitlines()]


def test_torchrun_two_processes_match_single_process_contract(tmp_path):
    world = make_world(tmp_path, train_images=16, val_images=1)
    iters = ["solver.iterations=3", "solver.checkpoint_every=2"]
    det, emb, mask = tmp_path / "ddp_det", tmp_path / "ddp_emb.h5", tmp_path / "ddp_mask"
    mask_sets = [a for item in HEAD + iters for a in ("--set", item)]
    plan = {
        "detect": ["detect-train", "--config", "synthetic", "--out", str(det), *cli_overrides(world, *iters)],
        "export": ["export-embeddings", str(det), "--out", str(emb)],
        "mask": ["mask-train", "--detector", str(det), "--embeddings", str(emb), "--out", str(mask), *mask_sets],
    }
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(driver), json.dumps(plan)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # the single-process reference, in this process
    torch.set_num_threads(1)
    detect_train(detect_config(world, *iters), tmp_path / "one_det")
    export_embeddings(tmp_path / "one_det", tmp_path / "one_emb.h5")
    mask_train(mask_config(world, *iters), tmp_path / "one_det", tmp_path / "one_emb.h5", tmp_path / "one_mask")

    for ddp_run, one_run, final in [(det, tmp_path / "one_det", "model_final.pth"), (mask, tmp_path / "one_mask", "mask_final.pth")]:
        ddp_final, one_final = load_checkpoint(ddp_run / final), load_checkpoint(one_run / final)
        assert ddp_final.keys() == one_final.keys()
        assert ddp_final["model"].keys() == one_final["model"].keys()  # no DDP "module." prefix
        assert all(torch.isfinite(v).all() for v in ddp_final["model"].values() if v.is_floating_point())
        ddp_last, one_last = load_checkpoint(ddp_run / "last.pth"), load_checkpoint(one_run / "last.pth")
        assert ddp_last.keys() == one_last.keys() and ddp_last["iteration"] == 2
        assert len(ddp_last["rng_ranks"]) == 2 and ddp_last["world_size"] == 2
        # metrics written once: one line per iteration (log_every=1), means over the 2 ranks
        metrics = lines(ddp_run / "metrics.jsonl")
        assert [m["iteration"] for m in metrics] == [1, 2, 3]
        assert all(math.isfinite(v) for m in metrics for v in m.values())
        assert metrics[0].keys() == lines(one_run / "metrics.jsonl")[0].keys()
        assert len(list((ddp_run / "tb").glob("events.out.tfevents.*"))) == 1
        manifest = json.loads((ddp_run / "manifest.json").read_text())
        assert manifest["world_size"] == 2
    # linear scaling rule: global batch 4 against the reference 8 -> half the recipe's LR
    assert json.loads((det / "manifest.json").read_text())["effective_lr"] == pytest.approx(0.02 * 4 / 8)
    assert json.loads((det / "manifest.json").read_text())["images_per_process"] == 2

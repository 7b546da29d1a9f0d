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

from pipelines.checkpoint import load_checkpoint
from pipelines.stages.detect_train import detect_train
from pipelines.stages.export_embeddings import export_embeddings
from pipelines.stages.mask_train import mask_train
from tests.engine.tiny_runs import HEAD, cli_overrides, data_overrides, detect_config, make_world, mask_config

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


def torchrun_two(driver_code: str, plan: dict, tmp_path) -> None:
    """Run ``driver_code`` (given ``plan`` as JSON in argv[1]) in 2 torchrun processes; fail with their stderr."""
    driver = tmp_path / "driver.py"
    driver.write_text(driver_code)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(driver), json.dumps(plan)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]


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
    torchrun_two(DRIVER, plan, tmp_path)

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
        assert not (ddp_run / "last.pth").exists() and not (one_run / "last.pth").exists()  # removed when finished
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


# Each torchrun worker: a streamed mask-train run (rank 0 builds the cache), one epoch of the streamed
# cache read by this process (the rows it reads from disk logged), then the same run stopped by SIGTERM
# after 2 iterations and resumed.
SHARD_DRIVER = textwrap.dedent('''
    import json, os, signal, sys
    from pathlib import Path
    import torch
    from pipelines.config import MaskTrainConfig, load_config
    from pipelines.engine import distributed as dist
    from pipelines.rois.sources import kept_rows
    from pipelines.rois.store import open_cache
    from pipelines.rois.streaming import StreamingRoIs
    from pipelines.errors import MaskxError
    import pipelines.stages.mask_train as mt

    plan = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    cfg = load_config(MaskTrainConfig, "synthetic", plan["overrides"], section="mask_train")
    full = mt.mask_train(cfg, plan["det"], plan["emb"], plan["full"])
    rank, world = dist.rank(), dist.world_size()

    cache = open_cache(full.cache_path, None)
    read = []
    real = cache.rowfile.scatter_into
    def logged(start, dests):
        read.extend(range(start, start + len(dests)))
        return real(start, dests)
    cache.rowfile.scatter_into = logged
    keep = torch.zeros(int(cache.labels.max()) + 1, dtype=torch.bool)
    keep[sorted(set(cache.labels.tolist()))] = True
    rows = kept_rows(cache.labels, keep)
    b = cfg.solver.batch_size
    probe = StreamingRoIs(cache, rows, b, 10**6, 0, cfg.cache.shuffle_window, rank=rank, world_size=world,
                          chunk_rows=cfg.cache.stream_chunk_rows)
    probe.iterations = probe.epoch_length(0) // (b // world)  # stop within epoch 0: nothing read beyond it
    seen = [int(r) for i in range(probe.iterations) for r in probe.batch(i).index]
    probe.close()
    json.dump({"read": read, "seen": seen, "epoch": probe.epoch_order(0).tolist(), "rows": rows.tolist(),
               "bytes_read": probe.bytes_read, "record_bytes": cache.record_bytes},
              open(Path(plan["logs"]) / f"rank{rank}.json", "w"))
    cache.close()

    calls = {"n": 0}
    loss = mt.mask_loss
    def stop_after_two(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3 and rank == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss(*a, **k)
    mt.mask_loss = stop_after_two
    try:
        mt.mask_train(cfg, plan["det"], plan["emb"], plan["stopped"])
        sys.exit("the run was not stopped")
    except MaskxError as exc:
        assert "stopped by" in str(exc), exc
    mt.mask_loss = loss
    dist.barrier()
    if rank == 0:  # the checkpoint of the stop holds both processes' random states
        from pipelines.checkpoint import load_checkpoint
        last = load_checkpoint(Path(plan["stopped"]) / "last.pth")
        json.dump({"iteration": last["iteration"], "rng_ranks": len(last["rng_ranks"]), "world_size": last["world_size"]},
                  open(Path(plan["logs"]) / "stopped_last.json", "w"))
    mt.mask_train(cfg, plan["det"], plan["emb"], plan["stopped"], resume=True)
''')


def test_torchrun_streamed_cache_is_sharded_and_a_sharded_run_resumes_bit_identically(tmp_path):
    world = make_world(tmp_path, train_images=16, val_images=1)
    torch.set_num_threads(1)
    detect_train(detect_config(world, "solver.iterations=1"), tmp_path / "det")
    export_embeddings(tmp_path / "det", tmp_path / "emb.h5")
    logs = tmp_path / "logs"
    logs.mkdir()
    overrides = [*data_overrides(world), *HEAD, "solver.iterations=5", "solver.checkpoint_every=0", "data.hflip=true",
                 "data.mask_classes=all", "cache.ram_budget_gb=0", "cache.stream_chunk_rows=8", "cache.shuffle_window=2",
                 f"cache.dir={tmp_path / 'cache'}"]
    plan = {"overrides": overrides, "det": str(tmp_path / "det"), "emb": str(tmp_path / "emb.h5"),
            "full": str(tmp_path / "full"), "stopped": str(tmp_path / "stopped"), "logs": str(logs)}
    torchrun_two(SHARD_DRIVER, plan, tmp_path)

    r0, r1 = (json.loads((logs / f"rank{r}.json").read_text()) for r in (0, 1))
    rows = r0["rows"]
    assert rows == r1["rows"] and len(rows) > 4 * 8
    # over an epoch the two processes' rows are every kept row exactly once
    assert sorted(r0["epoch"] + r1["epoch"]) == sorted(rows)
    # each process reads from disk only rows of its own share, each once; the shares do not meet
    for r in (r0, r1):
        assert r["read"] and len(r["read"]) == len(set(r["read"])) and r["bytes_read"] == len(r["read"]) * r["record_bytes"]
        assert set(r["seen"]) <= set(r["read"]) and r["seen"] == r["epoch"][: len(r["seen"])]
    assert not set(r0["read"]) & set(r1["read"])
    # the sharded streaming run stopped after 2 iterations and resumed = the uninterrupted one
    full, resumed = load_checkpoint(tmp_path / "full" / "mask_final.pth"), load_checkpoint(tmp_path / "stopped" / "mask_final.pth")
    assert full["model"].keys() == resumed["model"].keys()
    for k in full["model"]:
        assert torch.equal(full["model"][k], resumed["model"][k]), k
    assert lines(tmp_path / "stopped" / "metrics.jsonl") == lines(tmp_path / "full" / "metrics.jsonl")
    stopped_last = json.loads((logs / "stopped_last.json").read_text())
    assert stopped_last["rng_ranks"] == 2 and stopped_last["world_size"] == 2 and 1 <= stopped_last["iteration"] < 5
    assert not (tmp_path / "stopped" / "last.pth").exists()  # the resumed run finished
    manifest = json.loads((tmp_path / "full" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["cache_built"]


E2E_DRIVER = textwrap.dedent('''
    import json, sys
    from maskx_cli.main import app

    code = app(json.loads(sys.argv[1])["train"], standalone_mode=False)
    sys.exit(code or 0)
''')


def test_torchrun_end_to_end_when_a_process_batch_has_no_set_a_mask(tmp_path):
    """Was: 'Expected to have finished reduction in the prior iteration' (gloo: a collective mismatch) as soon as one
    process's batch had no set-A mask: its mask side got no gradients, the other's did."""
    world = make_world(tmp_path, train_images=8, val_images=1)
    data = json.loads(world.train_json.read_text())
    images_of = {}
    for a in data["annotations"]:
        images_of.setdefault(a["category_id"], set()).add(a["image_id"])
    set_a = min(c for c, ims in images_of.items() if len(ims) == 1)  # a class in one training image only
    iters = 4  # x 2 processes x 1 image = the 8 images once: 7 of the 8 process-steps have no set-A mask
    out = tmp_path / "e2e"
    run = ["train", "--config", "synthetic", "--out", str(out),
           *cli_overrides(world, f"solver.iterations={iters}", "solver.batch_size=2", "solver.checkpoint_every=0",
                          f"data.mask_classes=ids:{set_a}", "data.hflip=false", "head.mask_dim=16", "head.mlp_hidden=32",
                          "head.transfer_hidden=32")]
    torchrun_two(E2E_DRIVER, {"train": run}, tmp_path)

    mask = load_checkpoint(out / "mask_final.pth")
    assert mask["set_a"] == [set_a] and mask["iteration"] == iters
    assert all(torch.isfinite(v).all() for v in mask["model"].values() if v.is_floating_point())
    assert [m["iteration"] for m in lines(out / "metrics.jsonl")] == list(range(1, iters + 1))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["world_size"] == 2

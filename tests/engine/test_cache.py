"""The stage-2 feature cache: reuse, rebuild on change, corruption, streaming, disk refusal, and
stage 2 from the cache equal to stage 2 through the frozen detector."""

from __future__ import annotations

import json
import shutil
from collections import namedtuple
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pipelines.config import CacheConfig, DataConfig, DetectorConfig, DetectTrainConfig, HeadConfig, MaskTrainConfig, SolverConfig, to_dict
from pipelines.data.coco import CocoDataset, load_split
from pipelines.data.synthetic import SynthConfig, generate
from pipelines.engine import cache as cache_mod
from pipelines.engine.cache import (DetectorRoIs, InMemoryRoIs, StreamingRoIs, build_cache, cache_dataset, cache_source, ensure_cache,
                                    kept_rows, open_cache)
from pipelines.engine.checkpoint import load_checkpoint, save_checkpoint
from pipelines.engine.run_dir import load_detector_run
from pipelines.errors import MaskxError
from pipelines.io import write_yaml
from pipelines.modeling.detector import build_detector
from pipelines.modeling.maskx_rcnn import build_mask_roi_pool
from pipelines.stages.export_embeddings import export_embeddings
from pipelines.stages.mask_train import mask_train

ROI = 7  # RoIAlign size of these tests (masks 14x14)
DET = DetectorConfig(backbone="resnet18", fpn_channels=16, box_representation=32, norm="bn", min_size=64, max_size=64,
                     anchor_sizes=[8, 16, 32, 64, 128], rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=100)
HEAD = HeadConfig(mask_dim=8, num_convs=1, mlp_hidden=16, mlp_input_size=7, transfer_hidden=16, roi_size=ROI, input_dropout=0.0)

World = namedtuple("World", "data_cfg data det_dir")


def _save_detector(data_cfg: DataConfig, run: Path, seed: int) -> Path:
    """An untrained detector saved as a finished detect-train run (checkpoint + config.yaml)."""
    torch.manual_seed(seed)
    data, _ = load_split(data_cfg.train_json, "train")
    model = build_detector(DET, len(data["categories"]))
    cfg = DetectTrainConfig(data=data_cfg, detector=DET)
    save_checkpoint(run / "model_final.pth", "detector", model=model.state_dict(), config=to_dict(cfg),
                    categories=data["categories"], iteration=0)
    write_yaml(run / "config.yaml", to_dict(cfg))
    return run


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("cache_world")
    w = generate(SynthConfig(num_classes=12, train_images=8, val_images=1, image_size=64, seed=1), root / "world")
    data_cfg = DataConfig(train_json=str(w.train_json), train_images=str(w.train_dir), val_json=str(w.val_json),
                          val_images=str(w.val_dir), mask_classes="voc")
    det_dir = _save_detector(data_cfg, root / "det", seed=0)
    data, _ = load_split(data_cfg.train_json, "train", require_masks=True)
    return World(data_cfg, data, det_dir)


@pytest.fixture(scope="module")
def gt_cache(world, tmp_path_factory) -> Path:
    """A built GT-boxes-only cache file (copy it into a test's cache folder to reuse it)."""
    r = _ensure(world, CacheConfig(dir=str(tmp_path_factory.mktemp("gt_cache")), proposals_per_instance=0))
    r.cache.close()
    return r.path


def _copy_in(src: Path, tmp_path: Path) -> Path:
    (tmp_path / "cache").mkdir(exist_ok=True)
    return Path(shutil.copy(src, tmp_path / "cache" / src.name))


def _ensure(world: World, cfg: CacheConfig, det_dir: Path | None = None, data=None, data_cfg=None):
    det = load_detector_run(det_dir or world.det_dir)
    return ensure_cache(det, data or world.data, data_cfg or world.data_cfg, cfg, ROI)


def _cfg(tmp_path: Path, **kw) -> CacheConfig:
    return CacheConfig(dir=str(tmp_path / "cache"), **kw)


def test_reused_then_rebuilt_when_detector_data_or_roi_setting_changes(world, gt_cache, tmp_path):
    cfg = _cfg(tmp_path, proposals_per_instance=1)
    _copy_in(gt_cache, tmp_path)
    first = _ensure(world, cfg)
    assert first.built and first.path.is_file() and first.rois >= 20
    labels = first.cache.labels.copy()
    first.cache.close()
    mtime = first.path.stat().st_mtime_ns

    again = _ensure(world, cfg)
    assert not again.built and again.path == first.path and again.path.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(again.cache.labels, labels)
    again.cache.close()

    # RoI setting
    other = _ensure(world, replace(cfg, proposals_per_instance=0))  # (the copied GT-only cache: not rebuilt)
    assert other.path.name == gt_cache.name and other.path != first.path and other.key != first.key
    assert other.rois == other.cache.file.attrs["instances"] < first.rois  # GT boxes only
    other.cache.close()
    # detector (other weights -> other checkpoint hash)
    det2 = _save_detector(world.data_cfg, tmp_path / "det2", seed=1)
    by_det2 = _ensure(world, cfg, det_dir=det2)
    assert by_det2.built and by_det2.key != first.key
    by_det2.cache.close()
    # data: the same annotations minus one image's
    data = json.loads(Path(world.data_cfg.train_json).read_text())
    gone = data["images"][0]["id"]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != gone]
    data["images"] = data["images"][1:]
    jpath = tmp_path / "fewer.json"
    jpath.write_text(json.dumps(data))
    data_cfg = replace(world.data_cfg, train_json=str(jpath))
    fewer = _ensure(world, cfg, data=load_split(str(jpath), "train")[0], data_cfg=data_cfg)
    assert fewer.built and fewer.key != first.key and fewer.rois < first.rois
    fewer.cache.close()
    # the RAM budget and the shuffle window do not change what is cached
    same = _ensure(world, replace(cfg, ram_budget_gb=0.0, shuffle_window=2))
    assert not same.built and same.path == first.path
    same.cache.close()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "incomplete"])
def test_damaged_cache_is_detected_and_rebuilt(world, gt_cache, tmp_path, damage):
    cfg = _cfg(tmp_path, proposals_per_instance=0)
    path = _copy_in(gt_cache, tmp_path)
    first = _ensure(world, cfg)
    assert not first.built and first.path == path
    feats = first.cache.features[()]
    first.cache.close()
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) * 2 // 3])
    elif damage == "garbage":
        path.write_bytes(b"\0" * 4096 + raw[4096:])
    else:
        import h5py

        with h5py.File(path, "a") as f:
            del f.attrs["complete"]
    assert open_cache(path, first.key) is None
    rebuilt = _ensure(world, cfg)
    assert rebuilt.built and rebuilt.path == path
    np.testing.assert_array_equal(rebuilt.cache.features[()], feats)
    rebuilt.cache.close()


def test_tmp_leftover_is_never_read_and_a_failed_build_leaves_nothing(world, gt_cache, tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, proposals_per_instance=0)
    leftover = tmp_path / "cache" / f".{gt_cache.name}.abc123.tmp"
    _copy_in(gt_cache, tmp_path).rename(leftover)  # a complete-looking file under a temporary name
    key = h5_key(leftover)
    assert open_cache(leftover, key) is None

    # a build that fails halfway leaves neither the final file nor a temporary one (besides the old leftover)
    calls = {"n": 0}
    real = cache_mod.extract_rois

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("detector died")
        return real(*args, **kwargs)

    monkeypatch.setattr(cache_mod, "extract_rois", failing)
    det = load_detector_run(world.det_dir)
    with pytest.raises(RuntimeError, match="detector died"):
        build_cache(det.model, build_mask_roi_pool(ROI), cache_dataset(world.data, world.data_cfg), cfg,
                    tmp_path / "cache" / gt_cache.name, key, 16, batch_images=2)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [leftover.name]
    monkeypatch.undo()
    rebuilt = _ensure(world, cfg)  # the leftover is ignored, the cache built afresh
    assert rebuilt.built and rebuilt.key == key and rebuilt.path == tmp_path / "cache" / gt_cache.name
    rebuilt.cache.close()


def h5_key(path: Path) -> str:
    import h5py

    with h5py.File(path, "r") as f:
        return str(f.attrs["key"])


def test_disk_refusal_names_the_folder_and_the_knobs(world, tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, proposals_per_instance=2)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(MaskxError, match=r"feature cache needs up to .* GiB but only 0\.0 GiB is free.*proposals_per_instance") as e:
        _ensure(world, cfg)
    assert e.value.path == str(tmp_path / "cache")
    assert not any((tmp_path / "cache").iterdir())


def test_streaming_covers_the_same_rois_as_in_memory(world, tmp_path):
    cfg = _cfg(tmp_path, proposals_per_instance=1)
    det = load_detector_run(world.det_dir)
    path = tmp_path / "small_chunks.h5"
    cache = build_cache(det.model, build_mask_roi_pool(ROI), cache_dataset(world.data, world.data_cfg), cfg, path, "k", 16,
                        chunk_rows=4)
    keep = torch.ones(13, dtype=torch.bool)
    keep[[0, int(np.bincount(cache.labels).argmax())]] = False  # chunks hold kept and dropped rows
    rows = kept_rows(cache.labels, keep)
    n, b = len(rows), 4
    assert cache.chunk_rows == 4 and n > 3 * b and n < len(cache)
    iters = 2 * n // b + 1  # two epochs and a bit
    mem = InMemoryRoIs(cache, rows, b, iters, seed=3)
    stream = StreamingRoIs(cache, rows, b, iters, seed=3, window=2, prefetch=2)
    got_mem = [mem.batch(i) for i in range(iters)]
    got_stream = [stream.batch(i) for i in range(iters)]
    idx_mem = torch.cat([x.index for x in got_mem]).numpy()
    idx_stream = torch.cat([x.index for x in got_stream]).numpy()
    # every epoch visits every kept row exactly once, on both routes
    for e in range(2):
        assert sorted(idx_stream[e * n : (e + 1) * n]) == sorted(rows.tolist()) == sorted(idx_mem[e * n : (e + 1) * n])
    np.testing.assert_array_equal(idx_stream[: 2 * n], np.concatenate([stream.epoch_order(0), stream.epoch_order(1)]))
    assert not np.array_equal(idx_stream[:n], np.sort(idx_stream[:n]))  # shuffled
    # the same RoI carries the same features, mask and label on both routes
    feats = {int(r): (f, m, lab) for x in got_mem for r, f, m, lab in zip(x.index, x.features, x.masks, x.labels)}
    for x in got_stream:
        assert x.features.shape == (b, 16, ROI, ROI) and x.features.dtype == torch.float16 and x.masks.shape == (b, 2 * ROI, 2 * ROI)
        for r, f, m, lab in zip(x.index, x.features, x.masks, x.labels):
            f0, m0, l0 = feats[int(r)]
            assert torch.equal(f, f0) and torch.equal(m, m0) and int(lab) == int(l0) and keep[int(lab)]
    # jumping to an iteration (resume) gives the batch a sequential read gave
    again = stream.batch(iters - 3)
    assert torch.equal(again.index, got_stream[iters - 3].index) and torch.equal(again.features, got_stream[iters - 3].features)
    # DDP: two processes split each global batch
    halves = [StreamingRoIs(cache, rows, b, iters, seed=3, window=2, rank=r, world_size=2).batch(1) for r in (0, 1)]
    assert sorted(torch.cat([h.index for h in halves]).tolist()) == sorted(got_stream[1].index.tolist())
    stream.close()
    # the RAM budget picks the route
    assert isinstance(cache_source(cache, keep, b, iters, 0, replace(cfg, ram_budget_gb=0.0)), StreamingRoIs)
    assert isinstance(cache_source(cache, keep, b, iters, 0, cfg), InMemoryRoIs)
    with pytest.raises(MaskxError, match="no RoI of the training classes"):
        cache_source(cache, torch.zeros(13, dtype=torch.bool), b, iters, 0, cfg)
    cache.close()


def test_streaming_read_error_is_one_clear_line(world, gt_cache, tmp_path):
    cfg = _cfg(tmp_path, proposals_per_instance=0)
    _copy_in(gt_cache, tmp_path)
    r = _ensure(world, cfg)
    rows = np.arange(len(r.cache))
    stream = StreamingRoIs(r.cache, rows, 4, 3, seed=0)
    r.cache.close()  # the file is gone from under the reader
    with pytest.raises(MaskxError, match="feature cache could not be read") as e:
        stream.batch(0)
    assert e.value.path == str(r.path)


def _mask_cfg(world: World, tmp_path: Path, **cache) -> MaskTrainConfig:
    return MaskTrainConfig(data=world.data_cfg, head=HEAD,
                           solver=SolverConfig(batch_size=8, reference_batch_size=8, lr=0.05, iterations=4, warmup_iters=0,
                                               lr_steps=[], log_every=1, checkpoint_every=0, workers=0, device="cpu", seed=7),
                           cache=_cfg(tmp_path, **cache))


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss_mask"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_stage2_from_cache_equals_stage2_through_the_frozen_detector(world, tmp_path):
    emb = tmp_path / "emb.h5"
    export_embeddings(world.det_dir, emb)
    cfg = _mask_cfg(world, tmp_path, proposals_per_instance=0, dtype="float32")
    via_cache = mask_train(cfg, world.det_dir, emb, tmp_path / "cached")
    via_detector = mask_train(replace(cfg, cache=replace(cfg.cache, enabled=False)), world.det_dir, emb, tmp_path / "through")
    streamed = mask_train(replace(cfg, cache=replace(cfg.cache, ram_budget_gb=0.0)), world.det_dir, emb, tmp_path / "streamed")
    assert via_cache.cache_built and not streamed.cache_built and via_detector.cache_path is None
    assert via_cache.train_rois == via_detector.train_rois == streamed.train_rois > 8
    a, b = _losses(tmp_path / "cached"), _losses(tmp_path / "through")
    assert len(a) == 4 and a[0] != a[-1]
    np.testing.assert_allclose(a, b, rtol=1e-5)
    wa = load_checkpoint(via_cache.checkpoint)["model"]
    wb = load_checkpoint(via_detector.checkpoint)["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)
    # streaming trains on other batches (chunk-level shuffle), the same RoIs
    assert len(_losses(tmp_path / "streamed")) == 4

    # batch by batch: through the frozen detector == from the cache (same RoIs, order, targets)
    det = load_detector_run(world.det_dir)
    cats = world.data["categories"]
    set_a = [c["id"] for c in cats if c["id"] in (1, 2, 3, 4, 5, 6, 7, 9)]  # the voc classes among the first 12
    keep = torch.zeros(len(cats) + 1, dtype=torch.bool)
    keep[[i + 1 for i, c in enumerate(cats) if c["id"] in set_a]] = True
    dataset = CocoDataset(world.data, world.data_cfg.train_images, with_masks=True, mask_category_ids=set_a)
    dataset.images = [im for im in dataset.images if any(a["category_id"] in set_a for a in dataset.anns_by_image.get(im["id"], []))]
    through = DetectorRoIs(det.model, build_mask_roi_pool(ROI), dataset, cfg.cache, 6, 2, seed=5)
    r = _ensure(world, cfg.cache)
    cached = cache_source(r.cache, keep, 6, 2, 5, cfg.cache)
    assert not r.built and through.rois == cached.rois == via_cache.train_rois
    for i in range(2):
        x, y = through.batch(i), cached.batch(i)
        assert torch.equal(x.labels, y.labels) and torch.equal(x.masks, y.masks) and len(x.labels) == 6
        torch.testing.assert_close(x.features, y.features, rtol=1e-5, atol=1e-6)
    r.cache.close()


def test_cli_cache_build_then_mask_train_reuses_it(world, tmp_path):
    from maskx_cli.main import app

    runner = CliRunner(env={"MASKX_CONSOLE_WIDTH": "200"})
    sets = ["--set", f"cache.dir={tmp_path / 'cache'}", "--set", f"head.roi_size={ROI}", "--set", "cache.proposals_per_instance=0"]
    res = runner.invoke(app, ["cache", "build", "--detector", str(world.det_dir), "--device", "cpu", *sets])
    assert res.exit_code == 0, res.output
    assert "feature cache built" in res.output and "RoIs" in res.output
    (path,) = (tmp_path / "cache").glob("features-*.h5")
    res2 = runner.invoke(app, ["cache", "build", "--detector", str(world.det_dir), "--device", "cpu", *sets])
    assert res2.exit_code == 0 and "reused" in res2.output
    reused = _ensure(world, _cfg(tmp_path, proposals_per_instance=0))
    assert not reused.built and reused.path == path
    n = reused.rois
    reused.cache.close()
    info = runner.invoke(app, ["cache", "info", str(path)])
    assert info.exit_code == 0 and f"rois: {n}" in info.output
    path.write_bytes(b"not hdf5")
    bad = runner.invoke(app, ["cache", "info", str(path)])
    assert bad.exit_code == 2 and "not a complete maskx feature cache" in bad.output

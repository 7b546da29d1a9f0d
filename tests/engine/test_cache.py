"""The stage-2 feature cache: reuse, rebuild on change, corruption, streaming and its sharding, disk
refusal, flips, both RoI samplings, classes, workers, the build lock, and stage 2 from the cache
equal to stage 2 through the frozen detector."""

from __future__ import annotations

import json
import re
import shutil
import threading
from collections import namedtuple
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pipelines.config import CacheConfig, DataConfig, DetectorConfig, DetectTrainConfig, HeadConfig, MaskTrainConfig, SolverConfig, to_dict
from pipelines.data.coco import CocoDataset, load_split
from pipelines.data.splits import mask_classes, resolve_split
from pipelines.data.synthetic import SynthConfig, generate
from pipelines.data.transforms import FlippedCopies
from pipelines.rois import build as build_mod
from pipelines.rois import ensure as ensure_mod
from pipelines.rois import plan as plan_mod
from pipelines.rois.build import build_cache
from pipelines.rois.ensure import ensure_cache
from pipelines.rois.instances import cache_dataset, instance_counts
from pipelines.rois.sampling import sample_detectron, sample_instance
from pipelines.rois.sources import DetectorRoIs, InMemoryRoIs, cache_source, kept_rows
from pipelines.rois.store import open_cache
from pipelines.rois.streaming import StreamingRoIs
from pipelines.checkpoint import load_checkpoint, save_checkpoint
from pipelines.engine.run_dir import load_detector_run
from pipelines.errors import MaskxError
from pipelines.io import write_yaml
from pipelines.modeling.detector import build_detector
from pipelines.modeling.maskx_rcnn import build_mask_roi_pool
from pipelines.progress import NULL_PROGRESS, NullProgress
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
    """Copy a cache (its HDF5 description and its row file) into ``tmp_path/cache``."""
    (tmp_path / "cache").mkdir(exist_ok=True)
    shutil.copy(src.with_suffix(".rows"), tmp_path / "cache" / src.with_suffix(".rows").name)
    return Path(shutil.copy(src, tmp_path / "cache" / src.name))


def _ensure(world: World, cfg: CacheConfig, det_dir: Path | None = None, data=None, data_cfg=None, class_ids=None, progress=None):
    det = load_detector_run(det_dir or world.det_dir)
    return ensure_cache(det, data or world.data, data_cfg or world.data_cfg, cfg, ROI,
                        progress or NULL_PROGRESS, class_ids)


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


@pytest.mark.parametrize("damage", ["truncate", "garbage", "incomplete", "short_rows", "no_rows"])
def test_damaged_cache_is_detected_and_rebuilt(world, gt_cache, tmp_path, damage):
    cfg = _cfg(tmp_path, proposals_per_instance=0)
    path = _copy_in(gt_cache, tmp_path)
    first = _ensure(world, cfg)
    assert not first.built and first.path == path
    feats = np.array(first.cache.features)
    first.cache.close()
    raw = path.read_bytes()
    rows_file = path.with_suffix(".rows")
    if damage == "short_rows":
        rows_file.write_bytes(rows_file.read_bytes()[:-1])
    elif damage == "no_rows":
        rows_file.unlink()
    elif damage == "truncate":
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
    leftover.parent.mkdir()
    shutil.copy(gt_cache, leftover)  # a complete-looking file under a temporary name
    key = h5_key(leftover)
    assert open_cache(leftover, key) is None

    # a build that fails halfway leaves neither the final file nor a temporary one (besides the old leftover)
    calls = {"n": 0}
    real = build_mod.extract_rois

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("detector died")
        return real(*args, **kwargs)

    monkeypatch.setattr(build_mod, "extract_rois", failing)
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
    with pytest.raises(MaskxError, match=r"feature cache needs up to .* but only 1000 bytes is free.*proposals_per_instance.*hflip") as e:
        _ensure(world, cfg)
    assert e.value.path == str(tmp_path / "cache")
    assert re.match(r"feature cache needs up to \d+\.\d (KiB|MiB) but", e.value.message)  # was "0.0 GiB" for a cache of MiBs
    assert not any((tmp_path / "cache").iterdir())


def test_size_bounds_of_each_sampling():
    """(masked, all) instances per image: instance sampling's bound is exact in its count; detectron's
    lies between the GT boxes of set A (always foreground) and the foreground cap."""
    counts = [(3, 5), (0, 4), (200, 210)]
    inst = CacheConfig(sampling="instance", proposals_per_instance=2)
    assert plan_mod.estimate_rows(counts, inst, 100) == plan_mod.minimum_rows(counts, inst) == 203 * 3
    det = CacheConfig(sampling="detectron", rois_per_image=512, fg_fraction=0.25)
    assert plan_mod.estimate_rows(counts, det, 100) == min(128, 105) + 128
    assert plan_mod.minimum_rows(counts, det) == 3 + 128


class _Log(NullProgress):
    def __init__(self):
        self.lines: list[str] = []

    def log(self, message: str) -> None:
        self.lines.append(message)


def test_detectron_cache_is_refused_below_its_least_size_and_warned_below_its_most(world, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    cfg = _cfg(tmp_path, sampling="detectron")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(MaskxError, match=r"feature cache needs at least \d+\.\d (KiB|MiB) but only 1000 bytes is free"):
        _ensure(world, cfg)
    assert not any((tmp_path / "cache").iterdir())
    # room for every set-A GT box but not for the foreground cap of every image: built, with a warning
    counts = instance_counts(cache_dataset(world.data, world.data_cfg))
    per_row = plan_mod.disk_row_bytes(16, ROI, cfg.dtype)
    least = plan_mod.minimum_rows(counts, cfg) * per_row
    most = plan_mod.estimate_rows(counts, cfg, DET.rpn_post_nms_top_n_test) * per_row
    assert least < most
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**12, 0, (least + most) // 2))
    log = _Log()
    built = _ensure(world, cfg, progress=log)
    assert built.built and built.rois >= plan_mod.minimum_rows(counts, cfg)
    assert any(line.startswith("the cache may not fit: at least") for line in log.lines)
    built.cache.close()


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
    stream.close()
    # the RAM budget picks the route
    assert isinstance(cache_source(cache, keep, b, iters, 0, replace(cfg, ram_budget_gb=0.0)), StreamingRoIs)
    assert isinstance(cache_source(cache, keep, b, iters, 0, cfg), InMemoryRoIs)
    with pytest.raises(MaskxError, match="no RoI of the training classes"):
        cache_source(cache, torch.zeros(13, dtype=torch.bool), b, iters, 0, cfg)
    cache.close()


def test_streaming_shards_each_epoch_so_that_every_row_is_read_by_one_process(world, tmp_path):
    cfg = _cfg(tmp_path, proposals_per_instance=1)
    det = load_detector_run(world.det_dir)
    cache = build_cache(det.model, build_mask_roi_pool(ROI), cache_dataset(world.data, world.data_cfg), cfg,
                        tmp_path / "c.h5", "k", 16, chunk_rows=4)
    keep = torch.ones(13, dtype=torch.bool)
    keep[int(np.bincount(cache.labels).argmax())] = False
    rows = kept_rows(cache.labels, keep)
    read: dict[int, list[int]] = {0: [], 1: []}
    caches = [open_cache(cache.path, "k") for _ in (0, 1)]  # one per process, each logging the rows it reads

    def logger(r, real):
        def logged(start, dests):
            read[r].extend(range(start, start + len(dests)))
            return real(start, dests)
        return logged

    for r, c in enumerate(caches):
        c.rowfile.scatter_into = logger(r, c.rowfile.scatter_into)
    b, n = 8, len(rows)
    shares = [StreamingRoIs(caches[r], rows, b, 3 * n // b, seed=5, window=2, rank=r, world_size=2) for r in (0, 1)]
    for e in range(3):
        orders = [s.epoch_order(e) for s in shares]
        assert sorted(np.concatenate(orders).tolist()) == rows.tolist()  # every kept row exactly once per epoch
        assert abs(len(orders[0]) - len(orders[1])) <= 2 * cache.chunk_rows  # shares of about equal size
        chunks = [set(s.shard(e)) for s in shares]
        assert not chunks[0] & chunks[1]
    assert not np.array_equal(shares[0].epoch_order(0), shares[0].epoch_order(1))  # a new order every epoch
    # what each process actually reads: its own share's chunks, every row of an epoch by one process only
    iters = min(s.epoch_length(0) for s in shares) // (b // 2)  # a run that ends within epoch 0
    for r, share in enumerate(shares):
        share.iterations = iters
        got = [share.batch(i) for i in range(iters)]
        share.close()
        seen = torch.cat([x.index for x in got]).numpy()
        assert all(x.features.shape[0] == b // 2 for x in got)  # each process: its half of the global batch
        np.testing.assert_array_equal(seen, share.epoch_order(0)[: len(seen)])
        share_rows = {x for c in share.shard(0) for x in range(c * 4, min(c * 4 + 4, len(cache)))}
        assert set(read[r]) <= share_rows and set(seen.tolist()) <= set(read[r])
        assert len(read[r]) == len(set(read[r])) and share.bytes_read == len(read[r]) * cache.record_bytes  # each row once
    assert read[0] and read[1] and not set(read[0]) & set(read[1])
    # a resumed reader (any iteration) continues the same stream
    again = StreamingRoIs(cache, rows, b, 3 * n // b, seed=5, window=2, rank=1, world_size=2)
    k = 2 * n // b
    assert torch.equal(again.batch(k).index, torch.from_numpy(np.concatenate([again.epoch_order(e) for e in range(4)])
                                                               [k * b // 2 : (k + 1) * b // 2]))
    again.close()
    for c in caches + [cache]:
        c.close()


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
    assert cfg.data.hflip  # both routes see every image as it is and mirrored
    through = DetectorRoIs(det.model, build_mask_roi_pool(ROI), FlippedCopies(dataset), cfg.cache, 6, 2, seed=5)
    r = _ensure(world, cfg.cache, class_ids=set_a)
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
    assert "building feature cache:" in res.output  # the size, printed before the build: a tiny cache's in KiB or MiB
    assert re.search(r"RoIs x \d+ bytes = \d+\.\d (KiB|MiB) \(\d+\.\d [KMG]iB free\)", res.output) and "0.0 GiB" not in res.output
    (path,) = (tmp_path / "cache").glob("features-*.h5")
    res2 = runner.invoke(app, ["cache", "build", "--detector", str(world.det_dir), "--device", "cpu", *sets])
    assert res2.exit_code == 0 and "reused" in res2.output
    set_a = mask_classes(False, resolve_split("voc", world.data["categories"]), world.data["categories"])
    reused = _ensure(world, _cfg(tmp_path, proposals_per_instance=0), class_ids=set_a)  # what mask-train asks for
    assert not reused.built and reused.path == path
    assert set(np.unique(reused.cache.labels)) <= {i + 1 for i, c in enumerate(world.data["categories"]) if c["id"] in set_a}
    n = reused.rois
    reused.cache.close()
    info = runner.invoke(app, ["cache", "info", str(path)])
    assert info.exit_code == 0 and f"rois: {n}" in info.output and "sampling: instance" in info.output
    # mask-train reuses it; --ram-budget-gb 0 streams it from disk
    export_embeddings(world.det_dir, tmp_path / "emb.h5")
    train = runner.invoke(app, ["mask-train", "--detector", str(world.det_dir), "--embeddings", str(tmp_path / "emb.h5"),
                                "--out", str(tmp_path / "run"), "--iterations", "1", "--ram-budget-gb", "0", "--device", "cpu",
                                *sets, "--set", "solver.batch_size=8", "--set", "solver.workers=0"])
    assert train.exit_code == 0, train.output
    assert "(cache reused)" in train.output and "streaming from" in train.output
    path.write_bytes(b"not hdf5")
    bad = runner.invoke(app, ["cache", "info", str(path)])
    assert bad.exit_code == 2 and "not a complete maskx feature cache" in bad.output


def _build(world: World, path: Path, cfg: CacheConfig, hflip: bool = True, class_ids=None, **kw):
    det = load_detector_run(world.det_dir)
    dataset = cache_dataset(world.data, replace(world.data_cfg, hflip=hflip), class_ids)
    return build_cache(det.model, build_mask_roi_pool(ROI), dataset, cfg, path, path.stem, 16, **kw)


def test_flipped_copies_are_extra_rows_with_mirrored_boxes_and_targets(world, tmp_path):
    from torchvision.models.detection.roi_heads import project_masks_on_boxes

    from pipelines.data.coco import annotation_mask

    cfg = _cfg(tmp_path, proposals_per_instance=0)
    plain = _build(world, tmp_path / "plain.h5", cfg, hflip=False, batch_images=1)
    flipped = _build(world, tmp_path / "flipped.h5", cfg, hflip=True, batch_images=1)
    n = len(plain)
    assert len(flipped) == 2 * n and flipped.file.attrs["hflip"] and not plain.file.attrs["hflip"]
    # rows 0..n-1: the images as they are (the plain cache itself); rows n..2n-1: their mirrored copies
    np.testing.assert_array_equal(flipped.features[:n], plain.features)
    np.testing.assert_array_equal(flipped.masks[:n], plain.masks)
    fl, ids, inst = flipped.meta("flipped"), flipped.meta("image_id"), flipped.meta("instance")
    assert not fl[:n].any() and fl[n:].all() and flipped.meta("is_gt").all()
    np.testing.assert_array_equal(ids[n:], ids[:n])
    np.testing.assert_array_equal(inst[n:], inst[:n])
    np.testing.assert_array_equal(flipped.labels[n:], flipped.labels[:n])
    widths = {im["id"]: im["width"] for im in world.data["images"]}
    boxes = flipped.meta("boxes")
    w = np.array([widths[i] for i in ids[:n]], np.float32)
    np.testing.assert_allclose(boxes[n:, 0], w - boxes[:n, 2], atol=1e-4)
    np.testing.assert_allclose(boxes[n:, 2], w - boxes[:n, 0], atol=1e-4)
    np.testing.assert_allclose(boxes[n:, 1::2], boxes[:n, 1::2], atol=1e-4)
    assert not np.array_equal(flipped.features[n:], flipped.features[:n])
    # the flipped copy's target = the original's mirrored; with torchvision's RoIAlign (aligned=False)
    # a mirror samples the mask one pixel to the side: exactly the target of the mask shifted by +1 px
    anns = CocoDataset(world.data, world.data_cfg.train_images).anns_by_image
    checked = 0
    for r in range(n):
        x1, x2 = boxes[r, 0], boxes[r, 2]
        if x1 < 1 or x2 > w[r] - 1:
            continue
        ann = anns[int(ids[r])][int(inst[r])]
        m = torch.from_numpy(annotation_mask(ann, ann_h := next(im["height"] for im in world.data["images"] if im["id"] == ids[r]),
                                             int(w[r])))
        shifted = torch.zeros_like(m)
        shifted[:, 1:] = m[:, :-1]
        expect = project_masks_on_boxes(shifted[None], torch.from_numpy(boxes[r : r + 1]), torch.tensor([0]), 2 * ROI)
        assert ann_h > 0 and np.array_equal(flipped.masks[n + r], (expect[0] >= 0.5).numpy().astype(np.uint8)[:, ::-1]), r
        checked += 1
    assert checked >= n // 2
    plain.close()
    flipped.close()


def test_a_cache_built_with_workers_equals_one_built_without(world, tmp_path):
    cfg = _cfg(tmp_path, proposals_per_instance=1)
    a = _build(world, tmp_path / "a.h5", cfg, batch_images=3, workers=0)
    b = _build(world, tmp_path / "b.h5", cfg, batch_images=3, workers=2)
    assert len(a) == len(b) > 20
    for name in ("boxes", "image_id", "instance", "flipped", "is_gt"):
        np.testing.assert_array_equal(a.meta(name), b.meta(name))
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.masks, b.masks)
    np.testing.assert_allclose(a.features.astype(np.float32), b.features.astype(np.float32), rtol=1e-3, atol=1e-3)
    a.close()
    b.close()


def test_an_unreadable_image_in_a_build_worker_is_one_line_naming_it(world, tmp_path):
    images = Path(shutil.copytree(world.data_cfg.train_images, tmp_path / "images"))
    victim = images / world.data["images"][-1]["file_name"]
    victim.write_bytes(b"not an image")
    data_cfg = replace(world.data_cfg, train_images=str(images))
    det = load_detector_run(world.det_dir)
    with pytest.raises(MaskxError) as e:
        build_cache(det.model, build_mask_roi_pool(ROI), cache_dataset(world.data, data_cfg), _cfg(tmp_path), tmp_path / "c.h5",
                    "k", 16, workers=2, batch_images=2)
    assert e.value.path == str(victim) and "image cannot be read" in e.value.message and "\n" not in e.value.line()
    assert not list(tmp_path.glob("c.*")) and not list(tmp_path.glob(".c.*"))


def test_a_cache_of_set_a_holds_the_set_a_rows_of_the_all_class_cache_which_it_reuses(world, tmp_path):
    cats = world.data["categories"]
    set_a = mask_classes(False, resolve_split("voc", cats), cats)
    labels_a = {i + 1 for i, c in enumerate(cats) if c["id"] in set_a}
    cfg = _cfg(tmp_path, proposals_per_instance=1)
    every = _ensure(world, cfg)
    only_a = _ensure(world, replace(cfg, dir=str(tmp_path / "other")), class_ids=set_a)
    assert every.built and only_a.built and set(np.unique(only_a.cache.labels)) <= labels_a
    rows = np.flatnonzero(np.isin(every.cache.labels, list(labels_a)))
    assert len(only_a.cache) == len(rows) < len(every.cache)
    np.testing.assert_array_equal(only_a.cache.labels, every.cache.labels[rows])
    np.testing.assert_array_equal(only_a.cache.masks, every.cache.masks[rows])
    for name in ("boxes", "image_id", "instance", "flipped", "is_gt"):
        np.testing.assert_array_equal(only_a.cache.meta(name), every.cache.meta(name)[rows])
    np.testing.assert_allclose(only_a.cache.features.astype(np.float32), every.cache.features[rows].astype(np.float32),
                               rtol=1e-3, atol=1e-3)
    only_a.cache.close()
    # a set-A run next to the all-class cache reuses it (no second build); cache.classes=all asks for it
    reused = _ensure(world, cfg, class_ids=set_a)
    assert not reused.built and reused.path == every.path
    reused.cache.close()
    assert _ensure(world, replace(cfg, classes="all"), class_ids=set_a).path == every.path
    every.cache.close()


def test_detectron_sampler_caps_the_foreground_and_keeps_the_iou_threshold():
    g = torch.Generator().manual_seed(0)
    gt = torch.tensor([[10.0, 10.0, 50.0, 50.0], [60.0, 20.0, 100.0, 90.0], [0.0, 60.0, 30.0, 100.0]])
    props = [gt + torch.randn(3, 4, generator=g) * 6 for _ in range(40)] + [torch.rand(60, 4, generator=g) * 100]
    props = torch.cat(props)
    props[:, 2:] = torch.maximum(props[:, 2:], props[:, :2] + 2)
    props = torch.cat([props, torch.tensor([[10.0, 10.0, 50.0, 30.0], [10.0, 10.0, 50.0, 29.6]])])  # IoU 0.5 and just below
    from torchvision.ops import box_iou

    cand = torch.cat([gt, props])
    best, match = box_iou(cand, gt).max(1)
    fg = set(torch.where(best >= 0.5)[0].tolist())
    assert len(fg) > 40 and (len(gt) + len(props) - 2) in fg and (len(gt) + len(props) - 1) not in fg
    drawn: set[int] = set()
    for seed in range(300):
        boxes, matched, is_gt = sample_detectron(gt, props, 64, 0.25, 0.5, torch.Generator().manual_seed(seed))
        assert len(boxes) == 16  # round(0.25 * 64): the cap, fewer than the foreground candidates
        i = box_iou(boxes, gt)
        assert (i.max(1).values >= 0.5).all() and torch.equal(i.argmax(1), matched)
        idx = [int(torch.where((cand == b).all(1))[0][0]) for b in boxes]
        assert set(idx) <= fg and torch.equal(is_gt, torch.tensor([k < len(gt) for k in idx]))
        drawn |= set(idx)
    assert drawn == fg  # every foreground candidate can be drawn, nothing else ever is
    # a large budget takes every foreground candidate, ground-truth boxes included
    boxes, matched, is_gt = sample_detectron(gt, props, 4096, 0.25, 0.5, g)
    assert len(boxes) == len(fg) and int(is_gt.sum()) == 3
    # the instance sampler: GT box first, then at most k proposals of IoU >= min_iou per instance
    boxes, matched, is_gt = sample_instance(gt, props, 2, 0.5, g)
    assert torch.equal(boxes[:3], gt) and is_gt[:3].all() and not is_gt[3:].any() and len(boxes) == 3 + 3 * 2
    assert (box_iou(boxes, gt)[torch.arange(len(boxes)), matched] >= 0.5).all()


def test_a_detectron_sampled_cache_holds_foreground_rois_of_the_cached_classes(world, tmp_path):
    from torchvision.ops import box_iou

    cats = world.data["categories"]
    set_a = mask_classes(False, resolve_split("voc", cats), cats)
    cfg = _cfg(tmp_path, sampling="detectron", rois_per_image=16, fg_fraction=0.25, min_iou=0.5)
    cache = _build(world, tmp_path / "d.h5", cfg, class_ids=set_a)
    ids, inst, fl, boxes = cache.meta("image_id"), cache.meta("instance"), cache.meta("flipped"), torch.from_numpy(cache.meta("boxes"))
    assert cache.file.attrs["sampling"] == "detectron" and len(cache) > 0
    anns = CocoDataset(world.data, world.data_cfg.train_images).anns_by_image
    widths = {im["id"]: im["width"] for im in world.data["images"]}
    per_image = np.unique(np.stack([ids, fl]), axis=1, return_counts=True)[1]
    assert per_image.max() <= 4  # round(0.25 * 16) per image (and per flipped copy)
    for r in range(len(cache)):
        a = anns[int(ids[r])][int(inst[r])]
        x, y, w, h = a["bbox"]
        gt = torch.tensor([[x, y, x + w, y + h]], dtype=torch.float32)
        if fl[r]:
            gt = torch.tensor([[widths[int(ids[r])] - (x + w), y, widths[int(ids[r])] - x, y + h]])
        assert a["category_id"] in set_a and box_iou(boxes[r : r + 1], gt).item() >= 0.5 - 1e-5
    cache.close()
    # without the cache, stage 2 samples instances: detectron sampling is refused with one clear line
    with pytest.raises(MaskxError, match="cache.sampling=detectron needs the feature cache"):
        DetectorRoIs(None, None, None, cfg, 8, 1, 0)


def test_concurrent_runs_build_a_cache_once_the_second_waits_and_reuses_it(world, tmp_path, monkeypatch):

    cfg = _cfg(tmp_path, proposals_per_instance=0)
    started, release, waiting = threading.Event(), threading.Event(), threading.Event()
    builds = []
    real = ensure_mod.build_cache

    def slow_build(*args, **kwargs):
        builds.append(1)
        started.set()
        assert release.wait(120)
        return real(*args, **kwargs)

    class Waiting(NullProgress):
        def log(self, message: str) -> None:
            if "another process is building this feature cache" in message:
                waiting.set()

    monkeypatch.setattr(ensure_mod, "build_cache", slow_build)
    results = {}
    first = threading.Thread(target=lambda: results.setdefault("first", _ensure(world, cfg)))
    first.start()
    assert started.wait(120)
    second = threading.Thread(target=lambda: results.setdefault("second", _ensure(world, cfg, progress=Waiting())))
    second.start()
    assert waiting.wait(120) and "second" not in results  # blocked on the lock while the first builds
    (lock,) = (tmp_path / "cache").glob(".features-*.lock")
    release.set()
    first.join(120)
    second.join(120)
    assert len(builds) == 1 and results["first"].built and not results["second"].built
    assert results["first"].path == results["second"].path and results["second"].rois == results["first"].rois
    assert not lock.exists()  # removed when released
    for r in results.values():
        r.cache.close()


def test_row_file_reads_survive_short_reads_and_scatter_rows_into_place(world, gt_cache, tmp_path, monkeypatch):
    import os as os_mod

    from pipelines.rois import rowfile

    path = _copy_in(gt_cache, tmp_path)
    cache = open_cache(path, None)
    whole = cache.rowfile.read(0, len(cache)).clone()
    real = os_mod.preadv
    monkeypatch.setattr(rowfile.os, "preadv", lambda fd, bufs, off: real(fd, [bufs[0][:777]], off))  # at most 777 bytes a call
    assert torch.equal(cache.rowfile.read(0, len(cache)), whole)
    rows = np.array([1, 3, len(cache) - 1])
    feats, masks = cache.read_rows(rows, block=2)
    ref_f, ref_m = cache.split(whole[rows])
    assert torch.equal(feats, ref_f) and torch.equal(masks, ref_m)
    cache.close()
    with pytest.raises(OSError):
        cache.rowfile.read(0, 1)  # closed


def test_row_file_scatters_more_buffers_than_one_preadv_takes(tmp_path, monkeypatch):
    """3,000 rows of 10 bytes, each read into two slots (6,000 buffers: more than IOV_MAX a call), whole and
    through short reads that stop inside a buffer; rows given no slot are read and dropped."""
    import os as os_mod

    from pipelines.rois import rowfile

    data = np.random.default_rng(0).integers(0, 256, (3000, 10), dtype=np.uint8)
    (tmp_path / "r.rows").write_bytes(data.tobytes())
    rf = rowfile.RowFile(tmp_path / "r.rows", 10)
    for short in (False, True):
        if short:
            real = os_mod.preadv
            monkeypatch.setattr(rowfile.os, "preadv", lambda fd, bufs, off: real(fd, bufs, off) if len(bufs) < 3 else
                                real(fd, [bufs[0], bufs[1], bufs[2][:3]], off))  # at most two buffers and 3 bytes a call
        out = np.zeros((3000, 10), np.uint8)
        dests = [None if i % 7 == 3 else [memoryview(out[i, :4]), memoryview(out[i, 4:])] for i in range(3000)]
        assert 2 * sum(d is not None for d in dests) > rowfile.IOV_MAX
        assert rf.scatter_into(0, dests) == 30000
        wanted = np.arange(3000) % 7 != 3
        np.testing.assert_array_equal(out[wanted], data[wanted])
        assert not out[~wanted].any()
    rf.close()


def test_streamed_reads_are_large_on_large_caches_and_the_caches_chunks_on_small_ones():
    from pipelines.rois.streaming import READ_BYTES, default_chunk_rows

    # COCO voc->nonvoc at the default budget: 2,345,320 RoIs; float16 and int8 records of R-50-FPN at 14 x 14
    assert default_chunk_rows(2_345_320, 64, 101_136) == 256  # 25.9 MB reads
    assert default_chunk_rows(4_690_640, 64, 51_984) == 512  # 26.6 MB
    assert default_chunk_rows(2_345_320, 64, 202_000) == 128  # float32
    for rows, rec in ((2_345_320, 101_136), (4_690_640, 51_984), (10**6, 3_000)):
        c = default_chunk_rows(rows, 64, rec)
        assert c * rec >= READ_BYTES > c // 2 * rec and c % 64 == 0
    assert default_chunk_rows(3_000, 64, 101_136) == 64  # too few chunks to grow: the cache's own
    assert default_chunk_rows(500, 4, 1_000) == 4
    assert default_chunk_rows(40_000, 64, 101_136) == 256 and 40_000 // 256 >= 64  # still 156 chunks to shuffle

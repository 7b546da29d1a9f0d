"""The feature cache sized to a budget (cache.max_gb), 8-bit storage of its features, and per-row
checksums: the plan before the build, what a build under a budget writes, round trips of the
storage types, damaged caches rebuilt or refused with one line naming the file."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pipelines.config import CacheConfig
from pipelines.data.splits import mask_classes, resolve_split
from pipelines.errors import MaskxError
from pipelines.progress import NullProgress
from pipelines.rois.instances import cache_dataset, instance_counts
from pipelines.rois.plan import DESCRIPTION_RESERVE, plan_cache
from pipelines.rois.sources import cache_source
from pipelines.rois.store import STORAGES, RecordLayout, decode_features, layout_of
from pipelines.rois.streaming import StreamingRoIs
from tests.engine.test_cache import DET, ROI, _build, _cfg, _copy_in, _ensure, gt_cache, world  # noqa: F401 (fixtures)


class _Log(NullProgress):
    def __init__(self):
        self.lines: list[str] = []

    def log(self, message: str) -> None:
        self.lines.append(message)


# -------------------------------------------------------------------------------- storage types
def test_record_sizes_of_each_storage_type_at_cocos_shape():
    """R-50-FPN at roi_size 14: 256 x 14 x 14 features + a 28 x 28 mask (+ 256 float32 scales for 8-bit)."""
    sizes = {d: RecordLayout(256, 14, d).record_bytes for d in STORAGES}
    assert sizes == {"float16": 101_136, "float32": 201_488, "int8": 51_984, "float8": 51_984}
    assert RecordLayout(256, 14, "int8").disk_bytes == 51_984 + 8 + 38  # label, metadata and checksum in the description
    assert sizes["int8"] / sizes["float16"] < 0.52


@pytest.mark.parametrize("dtype", ["int8", "float8"])
def test_8bit_storage_round_trips_within_its_stated_error(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 16, 7, 7, generator=g) * torch.logspace(-3, 2, 16)[None, :, None, None]  # channels of every scale
    x[0, 3] = 0.0  # an all-zero channel
    x[1, 5, 2, 2] = 900.0  # an outlier: its channel's scale follows it
    layout = RecordLayout(16, 7, dtype)
    masks = torch.randint(0, 2, (6, 14, 14), dtype=torch.uint8, generator=g)
    stored, scale, m = layout.split(torch.from_numpy(layout.pack(x, masks)))
    assert stored.dtype == (torch.int8 if dtype == "int8" else torch.uint8) and scale.shape == (6, 16)
    assert torch.equal(m, masks)
    y = decode_features(stored, scale)
    amax = x.abs().amax(dim=(2, 3), keepdim=True)
    bound = (amax / 254 if dtype == "int8" else x.abs() / 16 + amax / (448 * 1024)).expand_as(x)
    err = (y - x).abs()
    assert (err <= bound * (1 + 1e-5) + 1e-30).all(), float((err - bound).max())
    assert torch.equal(y[0, 3], torch.zeros(7, 7)) and abs(float(y[1, 5, 2, 2]) - 900.0) <= float(bound[1, 5, 2, 2])
    assert float(err.max()) > 0  # (it is a lossy type: the bound is what is promised, not exactness)


def test_an_8bit_cache_holds_the_float32_caches_features_within_the_stated_error(world, tmp_path):
    ref = _build(world, tmp_path / "f32.h5", _cfg(tmp_path, proposals_per_instance=0, dtype="float32"), hflip=False)
    q = _build(world, tmp_path / "i8.h5", _cfg(tmp_path, proposals_per_instance=0, dtype="int8"), hflip=False)
    assert len(q) == len(ref) > 10 and q.dtype == "int8" and q.file.attrs["dtype"] == "int8"
    assert q.rows_path.stat().st_size == len(q) * (16 * ROI * ROI + 16 * 4 + (2 * ROI) ** 2)
    rows = np.arange(len(q))
    x, _ = ref.read_rows(rows)
    y, masks = q.read_rows(rows)  # decoded to float32
    amax = x.abs().amax(dim=(2, 3), keepdim=True)
    assert y.dtype == torch.float32 and ((y - x).abs() <= amax / 254 * (1 + 1e-5)).all()
    np.testing.assert_array_equal(masks.numpy(), ref.masks[()])
    # in memory the 8-bit codes stay 8-bit; a batch is widened where it is used
    keep = torch.ones(13, dtype=torch.bool)
    mem = cache_source(q, keep, 4, 2, 0, CacheConfig())
    b = mem.batch(0)
    assert b.features.dtype == torch.int8 and b.scale.shape == (4, 16)
    torch.testing.assert_close(b.features_on("cpu"), y[b.index], rtol=0, atol=0)
    stream = StreamingRoIs(q, rows, 4, 2, seed=0)
    s = stream.batch(1)
    torch.testing.assert_close(s.features_on("cpu"), y[s.index], rtol=0, atol=0)
    stream.close()
    ref.close()
    q.close()


# -------------------------------------------------------------------------------- the plan and the budget
COUNTS = [(3, 5), (0, 4), (2, 2), (1, 9)] * 2  # (set-A instances, all instances) per image copy


def test_the_plan_keeps_the_most_foreground_rois_per_image_copy_that_the_budget_holds():
    layout = RecordLayout(16, 7, "float16")
    per = layout.disk_bytes
    cfg = CacheConfig(sampling="detectron", rois_per_image=512, fg_fraction=0.25)
    for k in (2, 5, 40):  # (2: the least, one RoI per set-A instance)
        budget = 6 * k * per + DESCRIPTION_RESERVE + per // 2  # 6 image copies with a set-A instance
        plan = plan_cache(COUNTS, replace(cfg, max_gb=budget / 1e9), layout, proposals=100, visits=600)
        assert plan.cfg.fg_per_image == k and plan.rows == 6 * k and plan.bytes == 6 * k * per <= budget - DESCRIPTION_RESERVE
        assert plan.instances == 12 and plan.images == 6 and plan.passes == pytest.approx(600 / (6 * k))
    # no budget: the official draw, 128 per image copy (or every candidate)
    assert plan_cache(COUNTS, replace(cfg, max_gb=0), layout, proposals=100).cfg.fg_per_image == 128
    # a cap set by hand is kept when it fits, refused with one line naming it when it does not
    assert plan_cache(COUNTS, replace(cfg, fg_per_image=3, max_gb=1.0), layout, proposals=100).rows == 18
    with pytest.raises(MaskxError, match=r"^cache.fg_per_image=100 needs up to .* over cache.max_gb=0.0003") as e:
        plan_cache(COUNTS, replace(cfg, fg_per_image=100, max_gb=0.0003), layout, proposals=100)
    assert e.value.key == "cache.fg_per_image"
    # instance sampling under a budget: the most proposals per instance that fit
    inst = CacheConfig(sampling="instance", proposals_per_instance=4, max_gb=(12 * 3 * per + DESCRIPTION_RESERVE) / 1e9)
    assert plan_cache(COUNTS, inst, layout, proposals=100).cfg.proposals_per_instance == 2


def test_a_budget_too_small_for_one_roi_per_set_a_instance_is_one_line_naming_the_setting_and_the_least_size():
    layout = RecordLayout(16, 7, "float16")
    least = 12 * layout.disk_bytes + DESCRIPTION_RESERVE
    with pytest.raises(MaskxError) as e:
        plan_cache(COUNTS, CacheConfig(sampling="detectron", max_gb=(least - 1) / 1e9), layout, proposals=100)
    from pipelines.io import format_size

    assert e.value.key == "cache.max_gb" and "\n" not in e.value.line()
    assert e.value.message == (f"cache.max_gb={(least - 1) / 1e9:g} is too small for this cache: it needs at least {format_size(least)} "
                               f"(one RoI per set-A instance: 12 x {layout.disk_bytes} bytes and its description)")
    assert plan_cache(COUNTS, CacheConfig(sampling="detectron", max_gb=least / 1e9), layout, proposals=100).rows >= 6


def test_a_budgeted_build_stays_within_its_budget_and_writes_the_bytes_its_plan_said(world, tmp_path):
    counts = instance_counts(cache_dataset(world.data, world.data_cfg))
    per = layout_of(16, ROI, "float16").disk_bytes
    instances, copies = sum(m for m, _ in counts), sum(1 for m, _ in counts if m)
    # instance sampling, 2 proposals per instance asked, room for 1.5 RoIs per instance: GT boxes only (exact)
    budget = DESCRIPTION_RESERVE + instances * per * 3 // 2
    r = _ensure(world, CacheConfig(dir=str(tmp_path / "i"), classes="all", proposals_per_instance=2, max_gb=budget / 1e9))
    info = r.cache.info()
    assert r.built and r.cache.file.attrs["proposals_per_instance"] == 0 and len(r.cache) == instances
    assert info["plan"]["bytes"] == info["roi_bytes"] == instances * per and info["file_bytes"] <= budget
    assert info["file_bytes"] - info["roi_bytes"] < 64 * 1024  # what DESCRIPTION_RESERVE keeps room for
    r.cache.close()
    # detectron sampling: the foreground RoIs per image copy the budget holds, and never more bytes than it
    least = math.ceil(instances / copies)
    for k in (least, least + 2):
        budget = DESCRIPTION_RESERVE + copies * k * per + per // 2
        log = _Log()
        r = _ensure(world, CacheConfig(dir=str(tmp_path / f"d{k}"), sampling="detectron", classes="all", max_gb=budget / 1e9),
                    progress=log)
        info = r.cache.info()
        assert r.built and r.cache.file.attrs["fg_per_image"] == k and info["plan"]["rois"] == copies * k
        assert info["file_bytes"] <= budget and info["plan"]["bytes"] >= info["roi_bytes"]  # the whole cache, description included
        per_image = np.unique(np.stack([r.cache.meta("image_id"), r.cache.meta("flipped")]), axis=1, return_counts=True)[1]
        assert per_image.max() == k
        line = next(x for x in log.lines if x.startswith("building feature cache:"))
        assert f"up to {k} foreground RoIs per image copy (the official draw: 128)" in line and f"budget cache.max_gb={budget / 1e9:g}" in line
        r.cache.close()


def test_cache_build_prints_the_plan_and_a_too_small_budget_is_one_error_line(world, tmp_path):
    from maskx_cli.main import app

    runner = CliRunner(env={"MASKX_CONSOLE_WIDTH": "250"})
    sets = ["--set", f"cache.dir={tmp_path / 'cache'}", "--set", f"head.roi_size={ROI}", "--set", "cache.sampling=detectron",
            "--set", "solver.iterations=10", "--set", "solver.batch_size=8"]
    small = runner.invoke(app, ["cache", "build", "--detector", str(world.det_dir), "--device", "cpu", *sets, "--set", "cache.max_gb=1e-6"])
    assert small.exit_code == 2
    lines = [x for x in small.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cache.max_gb=1e-06 is too small for this cache: it needs at least ")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    ok = runner.invoke(app, ["cache", "build", "--detector", str(world.det_dir), "--device", "cpu", *sets])
    assert ok.exit_code == 0, ok.output
    assert "budget cache.max_gb=250" in ok.output and "passes per RoI over 80 RoI visits" in ok.output
    (path,) = (tmp_path / "cache").glob("features-*.h5")
    info = runner.invoke(app, ["cache", "info", str(path)])
    assert info.exit_code == 0 and "fg_per_image: 128" in info.output
    assert re.search(r"plan: up to \d+ RoIs, \d+\.\d (KiB|MiB) \(budget 250 GB\), \d+\.\d\+ passes per RoI", info.output), info.output


# -------------------------------------------------------------------------------- checksums
def test_a_cache_zeroed_or_truncated_in_place_is_rebuilt_with_a_line_naming_it(world, gt_cache, tmp_path):
    cfg = _cfg(tmp_path, proposals_per_instance=0)
    for damage in ("zeroed rows", "truncated description"):
        path = _copy_in(gt_cache, tmp_path)
        rows_file = path.with_suffix(".rows")
        if damage == "zeroed rows":  # the same size, every byte zero: as long as it was, and read without an error
            rows_file.write_bytes(b"\0" * rows_file.stat().st_size)
        else:
            path.write_bytes(path.read_bytes()[:2000])
        log = _Log()
        r = _ensure(world, cfg, progress=log)
        assert r.built and r.path == path
        why = "has damaged rows (feature cache row 0 does not match its checksum" if damage == "zeroed rows" else \
            "cannot be read (truncated or overwritten)"
        assert any(x.startswith(f"feature cache {path} {why}") and x.endswith(": rebuilding it") for x in log.lines), log.lines
        assert np.abs(np.asarray(r.cache.features, np.float32)).sum() > 0
        r.cache.close()
        again = _ensure(world, cfg, progress=_Log())
        assert not again.built
        again.cache.close()


def test_a_damaged_row_found_while_training_is_one_error_line_naming_the_row_file(world, gt_cache, tmp_path):
    path = _copy_in(gt_cache, tmp_path)
    cache = _ensure(world, _cfg(tmp_path, proposals_per_instance=0)).cache
    n, rec = len(cache), cache.record_bytes
    sampled = set(np.linspace(0, n - 1, 16).round().astype(int).tolist())
    victim = next(r for r in range(n) if r not in sampled)  # a row the open-time check does not read
    cache.close()
    rows_file = path.with_suffix(".rows")
    with open(rows_file, "r+b") as f:
        f.seek(victim * rec + 10)
        f.write(b"\x7f")
    r = _ensure(world, _cfg(tmp_path, proposals_per_instance=0))
    assert not r.built  # the sampled rows are fine: opened
    keep = torch.ones(13, dtype=torch.bool)
    for ram in (4.0, 0.0):  # read into memory, then streamed
        with pytest.raises(MaskxError) as e:
            src = cache_source(r.cache, keep, 4, math.ceil(n / 4) + 1, 0, _cfg(tmp_path, ram_budget_gb=ram))
            for i in range(math.ceil(n / 4) + 1):
                src.batch(i)
        assert e.value.path == str(rows_file) and "\n" not in e.value.line()
        assert e.value.message.startswith(f"feature cache row {victim} does not match its checksum: the file is damaged; delete it")
    r.cache.close()
    with h5py.File(path, "r") as f:
        assert f["xxh3"].shape == (n,) and f["xxh3"].dtype == np.uint64


# -------------------------------------------------------------------------------- maskx cache plan
def test_cache_plan_prints_rois_bytes_and_the_times_its_rates_give(world, tmp_path):
    from maskx_cli.main import app
    from pipelines.config import MaskTrainConfig, load_config

    rates = {"read_mb_s": 100.0, "decode_images_s": 20.0, "detect_images_s": 2.0, "train_rois_s": 50.0, "device": "cpu"}
    (tmp_path / "rates.json").write_text(json.dumps({"rates": rates}))
    sets = ["--set", "cache.sampling=detectron", "--set", "solver.iterations=100", "--set", "solver.batch_size=64",
            "--set", "cache.ram_budget_gb=0"]
    runner = CliRunner(env={"MASKX_CONSOLE_WIDTH": "300"})
    res = runner.invoke(app, ["cache", "plan", "--config", "synthetic", "--train-data", world.data_cfg.train_json,
                              "--rates", str(tmp_path / "rates.json"), "--json", str(tmp_path / "plan.json"), *sets])
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "plan.json").read_text())
    # the plan a build on this file would make (the synthetic recipe's detector: 64 FPN channels, 100 proposals)
    cfg = load_config(MaskTrainConfig, "synthetic", [s for s in sets if s != "--set"] + [f"data.train_json={world.data_cfg.train_json}"])
    counts = instance_counts(cache_dataset(world.data, cfg.data, mask_classes(False, resolve_split("voc", world.data["categories"]),
                                                                            world.data["categories"])))
    plan = plan_cache(counts, cfg.cache, layout_of(64, 14, "float16"), 100, 6400)
    assert (out["rois"], out["bytes"], out["image_copies"], out["visits"]) == (plan.rows, plan.bytes, len(counts), 6400)
    assert out["fg_per_image"] == 128 and out["roi_bytes"] == 64 * 14 * 14 * 2 + 28 * 28 + 8 + 38
    x = out["projection"]
    assert x["build_parts"] == pytest.approx({"decode": len(counts) / (20.0 * 2), "compute": len(counts) / 2.0,
                                              "disk": plan.bytes / 100e6})
    assert x["train_parts"] == pytest.approx({"compute": 6400 / 50.0, "disk": 6400 * plan.roi_bytes / 100e6})
    assert x["streamed"] and x["build_bottleneck"] == "compute" and x["train_bottleneck"] == "compute"
    assert f"up to {plan.rows} RoIs x {plan.roi_bytes} bytes" in res.output and "bottleneck compute" in res.output
    assert f"build: ~{len(counts) / 2:.0f} s for {len(counts)} image copies" in res.output
    assert "training: ~2 min for 6400 RoI visits" in res.output and "streamed from disk" in res.output
    assert "streaming reader not measured" in res.output  # a rates file without the reader's rate: no reader part
    # the streaming reader's rate, when known, is a part of a streamed run: here slower than compute, so the bottleneck
    (tmp_path / "rates2.json").write_text(json.dumps({"rates": {**rates, "stream_rois_s": 40.0}}))
    res2 = runner.invoke(app, ["cache", "plan", "--config", "synthetic", "--train-data", world.data_cfg.train_json,
                               "--rates", str(tmp_path / "rates2.json"), "--json", str(tmp_path / "plan2.json"), *sets])
    assert res2.exit_code == 0, res2.output
    x2 = json.loads((tmp_path / "plan2.json").read_text())["projection"]
    assert x2["train_parts"] == pytest.approx({**x["train_parts"], "reader": 6400 / 40.0})
    assert x2["train_bottleneck"] == "reader" and "streaming reader 40 RoIs/s" in res2.output
    assert "training: ~3 min for 6400 RoI visits (compute 2 min, disk" in res2.output and "reader 3 min" in res2.output
    # a rates file without the rates: one line naming it
    (tmp_path / "bad.json").write_text(json.dumps({"read_mb_s": 1.0}))
    bad = runner.invoke(app, ["cache", "plan", "--config", "synthetic", "--train-data", world.data_cfg.train_json,
                              "--rates", str(tmp_path / "bad.json")])
    lines = [x for x in bad.output.splitlines() if x.strip()]
    assert bad.exit_code == 2 and len(lines) == 1
    assert lines[0] == (f"error: {tmp_path / 'bad.json'}: rates file needs a positive number for decode_images_s, detect_images_s, "
                        f"train_rois_s (write one with 'maskx cache plan --json')")
    (tmp_path / "bad2.json").write_text(json.dumps({**rates, "stream_rois_s": -1}))
    bad2 = runner.invoke(app, ["cache", "plan", "--config", "synthetic", "--train-data", world.data_cfg.train_json,
                               "--rates", str(tmp_path / "bad2.json")])
    assert bad2.exit_code == 2 and [x for x in bad2.output.splitlines() if x.strip()] == [
        f"error: {tmp_path / 'bad2.json'}: rates file's stream_rois_s must be a number >= 0 (0: not measured), got -1"]


def test_the_rates_measured_here_are_rates(tmp_path):
    from pipelines.rois.projection import measure_decode, measure_read, measure_stream

    assert measure_decode() > 1.0  # images/s: a 640 x 480 JPEG decodes in well under a second
    assert measure_read(Path(".").resolve() / ".pytest_read_probe", 8 * 2**20) > 1.0  # MB/s
    assert not any((Path(".") / ".pytest_read_probe").iterdir())
    (Path(".") / ".pytest_read_probe").rmdir()
    for dtype in ("float16", "int8"):  # the streaming reader on a probe of 4 chunks of 64 small rows, batches of 32
        assert measure_stream(tmp_path, 16, 7, CacheConfig(dtype=dtype, stream_chunk_rows=64), 32, windows=2) > 100.0  # RoIs/s
    assert list(tmp_path.iterdir()) == []  # the probe cache is removed


def test_budget_settings_out_of_range_are_one_line_naming_the_key():
    from pipelines.rois.ensure import check_cache_config

    for kw, line in [({"max_gb": -1.0}, "cache.max_gb must be 0 (no budget) or more, got -1"),
                     ({"fg_per_image": -2}, "cache.fg_per_image must be 0 (as many as cache.max_gb holds) or more, got -2"),
                     ({"dtype": "int4"}, "cache.dtype must be float16, float32, int8, float8, got 'int4'"),
                     ({"sampling": "detectron", "fg_per_image": 200},
                      "cache.fg_per_image must be at most the foreground RoIs the draw gives an image copy, round(cache.fg_fraction "
                      "x cache.rois_per_image) = 128, got 200 (raise cache.rois_per_image for more)")]:
        with pytest.raises(MaskxError) as e:
            check_cache_config(CacheConfig(**kw))
        assert e.value.message == line and e.value.key == line.split(" ")[0]


def test_rates_files_that_are_not_finite_positive_numbers_are_one_line_and_a_reader_rate_of_another_dtype_is_said(world, tmp_path):
    from maskx_cli.main import app

    runner = CliRunner(env={"MASKX_CONSOLE_WIDTH": "300"})
    good = {"read_mb_s": 100.0, "decode_images_s": 10.0, "detect_images_s": 1.0, "train_rois_s": 5.0}

    def plan(rates, *extra):
        (tmp_path / "r.json").write_text(rates if isinstance(rates, str) else json.dumps(rates))
        res = runner.invoke(app, ["cache", "plan", "--config", "synthetic", "--train-data", world.data_cfg.train_json,
                                  "--rates", str(tmp_path / "r.json"), *extra])
        return res.exit_code, [x for x in res.output.splitlines() if x.strip()]

    need = f"error: {tmp_path / 'r.json'}: rates file needs a positive number for "
    assert plan({"rates": None}) == (2, [need + "read_mb_s, decode_images_s, detect_images_s, train_rois_s "
                                                "(write one with 'maskx cache plan --json')"])
    assert plan('{"read_mb_s": 100, "decode_images_s": 10, "detect_images_s": 1, "train_rois_s": NaN}') == (
        2, [need + "train_rois_s (write one with 'maskx cache plan --json')"])
    code, lines = plan({**good, "stream_rois_s": float("inf")})
    assert code == 2 and lines == [f"error: {tmp_path / 'r.json'}: rates file's stream_rois_s must be a number >= 0 (0: not "
                                   f"measured), got inf"]
    code, lines = plan({**good, "stream_rois_s": 1000.0, "stream_dtype": "float16"}, "--set", "cache.dtype=int8")
    assert code == 0 and lines[0] == (f"warning: {tmp_path / 'r.json'}: the streaming reader's rate was measured for float16 "
                                      f"storage, this plan stores int8: its reader time is approximate (measure the rates with "
                                      f"cache.dtype=int8)")
    assert any(x.startswith(f"rates: unknown device, {tmp_path / 'r.json'}: ") for x in lines)  # no device in the file
    code, lines = plan({**good, "stream_rois_s": 1000.0, "stream_dtype": "int8"}, "--set", "cache.dtype=int8")
    assert code == 0 and not any(x.startswith("warning") for x in lines)


def test_cache_info_on_the_row_file_names_the_description_file(tmp_path):
    from maskx_cli.main import app

    rows = tmp_path / "features-0123.rows"
    rows.write_bytes(b"\0" * 64)
    res = CliRunner(env={"MASKX_CONSOLE_WIDTH": "300"}).invoke(app, ["cache", "info", str(rows)])
    assert res.exit_code == 2 and [x for x in res.output.splitlines() if x.strip()] == [
        f"error: {rows}: this is a cache's row file (the rows only): describe its description file instead, features-0123.h5"]
    assert rows.read_bytes() == b"\0" * 64  # untouched

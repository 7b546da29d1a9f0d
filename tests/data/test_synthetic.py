"""The synthetic world: determinism, categories, annotation consistency, reuse, errors, CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from typer.testing import CliRunner

from pipelines.data.coco import load_coco
from pipelines.data.splits import COCO_CATEGORIES, resolve_split
from pipelines.data.synthetic import SynthConfig, generate, min_visible_area, synth_categories
from pipelines.errors import MaskxError

TINY = dict(train_images=6, val_images=3, image_size=64)


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = generate(SynthConfig(**TINY, seed=3), tmp_path / "a")
    b = generate(SynthConfig(**TINY, seed=3), tmp_path / "b")
    c = generate(SynthConfig(**TINY, seed=4), tmp_path / "c")
    assert a.train_json.read_bytes() == b.train_json.read_bytes()
    assert a.val_json.read_bytes() == b.val_json.read_bytes()
    assert (a.train_dir / "000000000001.png").read_bytes() == (b.train_dir / "000000000001.png").read_bytes()
    assert a.train_json.read_bytes() != c.train_json.read_bytes()


def test_categories_default_are_coco_and_cover_every_look_factor():
    cats = synth_categories(80)
    assert [(c["id"], c["name"]) for c in cats] == COCO_CATEGORIES
    assert all(c["coco_id"] == c["id"] for c in cats)
    voc, nonvoc = resolve_split("voc", cats), resolve_split("nonvoc", cats)
    assert (len(voc), len(nonvoc)) == (20, 60)
    looks = {(c["look"]["color_name"], c["look"]["texture"]) for c in cats}
    assert len(looks) == 80  # every class its own (colour, texture) pair
    for subset in (voc, nonvoc):
        sub = [c for c in cats if c["id"] in set(subset)]
        assert len({c["look"]["color_name"] for c in sub}) == 10
        assert len({c["look"]["texture"] for c in sub}) == 8


def test_categories_beyond_coco():
    cats = synth_categories(3000)
    assert len(cats) == 3000 and len({c["id"] for c in cats}) == 3000
    assert cats[80] == {**cats[80], "id": 91, "name": "synth_0081", "coco_id": None}
    assert cats[-1]["id"] == 91 + 2919
    assert resolve_split("voc", cats)[:3] == [1, 2, 3]
    assert [c["name"] for c in synth_categories(3)] == ["person", "bicycle", "car"]


def test_many_classes_tiny_world(tmp_path):
    r = generate(SynthConfig(num_classes=3000, train_images=4, val_images=2, image_size=48, min_objects=1, max_objects=3), tmp_path / "w")
    data, _ = load_coco(r.train_json, require_masks=True)
    assert len(data["categories"]) == 3000
    assert r.train_instances == len(data["annotations"]) > 0


def test_annotations_match_masks_and_images(tmp_path):
    cfg = SynthConfig(train_images=8, val_images=2, image_size=96, min_objects=3, max_objects=5, seed=1)
    r = generate(cfg, tmp_path / "w")
    for path, folder, n in ((r.train_json, r.train_dir, 8), (r.val_json, r.val_dir, 2)):
        data = json.loads(path.read_text())
        assert len(data["images"]) == n
        assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"]) > 0
        cat_ids = {c["id"] for c in data["categories"]}
        for img in data["images"]:
            with Image.open(folder / img["file_name"]) as im:
                assert im.format == "PNG" and im.mode == "RGB" and im.size == (96, 96) == (img["width"], img["height"])
        for ann in data["annotations"]:
            assert ann["iscrowd"] == 0 and ann["category_id"] in cat_ids
            assert isinstance(ann["segmentation"]["counts"], str)
            m = mask_utils.decode(ann["segmentation"])
            assert m.shape == (96, 96)
            ys, xs = np.nonzero(m)
            x, y, w, h = ann["bbox"]
            assert (x, y, w, h) == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
            assert ann["area"] == int(m.sum()) >= min_visible_area(96)
        # visible masks of one image never overlap
        by_image: dict = {}
        for ann in data["annotations"]:
            by_image.setdefault(ann["image_id"], []).append(mask_utils.decode(ann["segmentation"]).astype(int))
        assert all(np.sum(ms, axis=0).max() <= 1 for ms in by_image.values())
    manifest = json.loads((r.out_dir / "world.json").read_text())
    assert manifest["config"]["seed"] == 1 and "version" in manifest
    assert manifest["counts"]["train_instances"] == r.train_instances


def test_rerun_reuses_and_foreign_folder_is_refused(tmp_path):
    cfg = SynthConfig(**TINY)
    r = generate(cfg, tmp_path / "w")
    stamp = r.train_json.stat().st_mtime_ns
    again = generate(cfg, tmp_path / "w")
    assert again == r and r.train_json.stat().st_mtime_ns == stamp
    with pytest.raises(MaskxError, match="not empty") as exc:
        generate(SynthConfig(**{**TINY, "seed": 9}), tmp_path / "w")
    assert str(tmp_path / "w") in str(exc.value)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(MaskxError, match="not empty") as exc:
        generate(cfg, foreign)
    assert str(foreign) in str(exc.value) and (foreign / "notes.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert generate(cfg, empty).train_images == TINY["train_images"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "foreign", "w"]  # no temporary left


def test_interrupted_run_leaves_nothing(tmp_path):
    class Boom(Exception):
        pass

    class Progress:
        def task(self, description, total):
            class T:
                n = 0

                def advance(self, n=1, **fields):
                    T.n += n
                    if T.n == 3:
                        raise Boom

                def close(self):
                    pass

            return T()

        def log(self, message):
            pass

    with pytest.raises(Boom):
        generate(SynthConfig(**TINY), tmp_path / "w", progress=Progress())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(num_classes=1), "num_classes"),
        (dict(image_size=16), "image_size"),
        (dict(min_objects=4, max_objects=2), "min_objects"),
        (dict(min_radius=20, max_radius=10), "min_radius <= max_radius"),
        (dict(min_radius=1), "min_radius"),
        (dict(train_images=0), "image"),
        (dict(val_images=0), "image"),
    ],
)
def test_invalid_config(tmp_path, kwargs, words):
    with pytest.raises(MaskxError, match=words):
        generate(SynthConfig(**{**TINY, **kwargs}), tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_cli_data_synth(tmp_path):
    from maskx_cli.main import app

    out = tmp_path / "world"
    args = ["data", "synth", "--out", str(out), "--train-images", "3", "--val-images", "2", "--image-size", "48", "--seed", "5"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    for name in ("instances_train.json", "instances_val.json", "world.json", "train/000000000003.png", "val/000000000002.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "world.json").read_text())["config"]["seed"] == 5
    bad = CliRunner().invoke(app, ["data", "synth", "--out", str(tmp_path / "x"), "--num-classes", "1"])
    assert bad.exit_code != 0 and not (tmp_path / "x").exists()
    big = CliRunner().invoke(app, ["data", "synth", "--out", str(tmp_path / "big"), "--train-images", "2", "--val-images", "1",
                                   "--image-size", "48", "--min-radius", "12", "--max-radius", "20", "--max-objects", "3"])
    assert big.exit_code == 0, big.output
    config = json.loads((tmp_path / "big" / "world.json").read_text())["config"]
    assert (config["min_radius"], config["max_radius"], config["max_objects"]) == (12.0, 20.0, 3)
    wrong = CliRunner().invoke(app, ["data", "synth", "--out", str(tmp_path / "y"), "--min-radius", "30", "--max-radius", "20"])
    assert wrong.exit_code == 2 and "min_radius <= max_radius" in wrong.output and not (tmp_path / "y").exists()


def test_world_from_before_radius_options_is_reused(tmp_path):
    """A world.json written before min_radius / max_radius existed means the radii of that time (9-24)."""
    legacy = {**TINY, "min_radius": 9.0, "max_radius": 24.0}
    r = generate(SynthConfig(**legacy), tmp_path / "w")
    manifest = json.loads((tmp_path / "w" / "world.json").read_text())
    for key in ("min_radius", "max_radius"):
        manifest["config"].pop(key)
    (tmp_path / "w" / "world.json").write_text(json.dumps(manifest))
    assert generate(SynthConfig(**legacy), tmp_path / "w") == r
    for other in (TINY, {**legacy, "max_radius": 30.0}):  # today's defaults (14-34) are another world
        with pytest.raises(MaskxError, match="another config"):
            generate(SynthConfig(**other), tmp_path / "w")


def test_default_world_has_the_larger_objects():
    cfg = SynthConfig()
    assert (cfg.min_objects, cfg.max_objects, cfg.min_radius, cfg.max_radius) == (2, 4, 14.0, 34.0)


def test_radius_sets_object_size(tmp_path):
    def mean_area(**kw):
        r = generate(SynthConfig(**{**TINY, "train_images": 1, "val_images": 12, "min_objects": 1, "max_objects": 1, **kw}),
                     tmp_path / str(kw))
        anns = json.loads(r.val_json.read_text())["annotations"]
        return np.mean([a["area"] for a in anns])

    small, large = mean_area(min_radius=6, max_radius=8), mean_area(min_radius=20, max_radius=24)
    # one object per image, radius r at 128 px -> about (r/2)^2 * pi * aspect pixels at 64 px
    assert 20 < small < 60 and 200 < large < 500


def test_cli_defaults_are_the_world_defaults():
    """``maskx data synth`` and ``maskx quickstart`` default to exactly SynthConfig's world (their world
    options are made from its fields, one per field)."""
    import inspect

    from maskx_cli.data import synth
    from maskx_cli.quickstart import quickstart_cmd

    cfg = dataclasses.asdict(SynthConfig())
    for command in (synth, quickstart_cmd):
        params = inspect.signature(command).parameters
        for key in cfg:
            assert params[f"world_{key}"].default == cfg[key], (command.__name__, key)

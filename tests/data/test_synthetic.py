"""The synthetic world: determinism, categories, annotation consistency, reuse, errors, CLI."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from typer.testing import CliRunner

from pipelines.data.coco import load_coco
from pipelines.data.splits import COCO_CATEGORIES, resolve_split
from pipelines.data.synthetic import (
    COCO_TRAIN2017_INSTANCES,
    PALETTE,
    SHAPE_FAMILIES,
    SynthConfig,
    class_frequencies,
    class_shape,
    generate,
    min_visible_area,
    render_image,
    synth_categories,
)
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
        (dict(class_freq="zipf"), "class_freq must be one of uniform | coco"),
        (dict(shapes="stars"), "shapes must be one of random | class"),
        (dict(appearance="noise"), "appearance must be one of flat | photo"),
        (dict(class_freq="coco", num_classes=81), "COCO's 80 classes only"),
        (dict(class_freq="coco", class_freq_power=3.0), "class_freq_power"),
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
    real = CliRunner().invoke(app, ["data", "synth", "--out", str(tmp_path / "real"), "--train-images", "2", "--val-images", "1",
                                    "--image-size", "48", "--class-freq", "coco", "--class-freq-power", "0.5", "--shapes", "class",
                                    "--appearance", "photo"])
    assert real.exit_code == 0, real.output
    config = json.loads((tmp_path / "real" / "world.json").read_text())["config"]
    assert (config["class_freq"], config["class_freq_power"], config["shapes"], config["appearance"]) == ("coco", 0.5, "class", "photo")
    bad_shapes = CliRunner().invoke(app, ["data", "synth", "--out", str(tmp_path / "z"), "--shapes", "stars"])
    assert bad_shapes.exit_code == 2 and "shapes must be one of random | class" in bad_shapes.output and not (tmp_path / "z").exists()


def test_world_from_before_radius_options_is_reused(tmp_path):
    """A world.json written before min_radius / max_radius existed means the radii of that time (9-24)."""
    legacy = {**TINY, "min_radius": 9.0, "max_radius": 24.0}
    r = generate(SynthConfig(**legacy), tmp_path / "w")
    manifest = json.loads((tmp_path / "w" / "world.json").read_text())
    for key in ("min_radius", "max_radius", "class_freq", "class_freq_power", "shapes", "appearance"):
        manifest["config"].pop(key)
    (tmp_path / "w" / "world.json").write_text(json.dumps(manifest))
    assert generate(SynthConfig(**legacy), tmp_path / "w") == r
    for other in (TINY, {**legacy, "max_radius": 30.0}, {**legacy, "shapes": "class"}):  # today's defaults (14-34) are another world
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


# --------------------------------------------------------------------------------------------
# The realism options: the old world stays byte for byte, the new one follows its configuration

# sha256 over instances_{train,val}.json and the decoded pixels of every image (sorted by name),
# of worlds made by the generator before the realism options existed
OLD_WORLD_DIGESTS = {
    "tiny64": (dict(train_images=6, val_images=3, image_size=64, seed=3),
               "8e766e31bf97df55fee0bbdc253a6cb639785ec482cf63161f6e795e6bf1fb0b"),
    "small128": (dict(train_images=5, val_images=2, seed=11, min_radius=9, max_radius=24, max_objects=5),
                 "cef13598253089a07eed60634278bec87b55a7524abee3eb541a7f68572dcc34"),
    "extra": (dict(num_classes=120, train_images=3, val_images=2, image_size=48, seed=2),
              "5aa5f485f1a653c16671e87e4d0d14b9d6ba7548de5390cebb2c0d921b598b83"),
}
OLD_FLAGS = dict(class_freq="uniform", shapes="random", appearance="flat")


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for split in ("train", "val"):
        h.update((root / f"instances_{split}.json").read_bytes())
        for p in sorted((root / split).iterdir()):
            h.update(np.asarray(Image.open(p)).tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("name", list(OLD_WORLD_DIGESTS))
def test_old_world_flags_reproduce_the_old_world(tmp_path, name):
    kwargs, digest = OLD_WORLD_DIGESTS[name]
    assert _digest(generate(SynthConfig(**kwargs, **OLD_FLAGS), tmp_path / "w").out_dir) == digest


def test_real_world_options_deterministic_per_seed(tmp_path):
    real = dict(TINY, class_freq="coco", shapes="class", appearance="photo")
    a = generate(SynthConfig(**real, seed=3), tmp_path / "a")
    b = generate(SynthConfig(**real, seed=3), tmp_path / "b")
    c = generate(SynthConfig(**real, seed=4), tmp_path / "c")
    old = generate(SynthConfig(**TINY, seed=3), tmp_path / "old")
    assert _digest(a.out_dir) == _digest(b.out_dir) != _digest(c.out_dir)
    assert _digest(a.out_dir) != _digest(old.out_dir)
    cats = json.loads(a.train_json.read_text())["categories"]
    assert cats[0]["shape"] == class_shape(0) and "shape" not in json.loads(old.train_json.read_text())["categories"][0]
    assert json.loads((a.out_dir / "world.json").read_text())["config"]["appearance"] == "photo"


def _render(n: int, seed: int = 0, **kw) -> list[tuple[np.ndarray, list[tuple[int, np.ndarray]]]]:
    cfg = SynthConfig(image_size=64, seed=seed, **kw)
    looks = [c["look"] for c in synth_categories(cfg.num_classes)]
    return [render_image(np.random.default_rng([seed, 0, i]), cfg, looks, min_visible_area(64)) for i in range(n)]


def test_class_frequencies_follow_cocos_tail():
    p = class_frequencies(SynthConfig(class_freq="coco"))
    assert p.shape == (80,) and p.sum() == pytest.approx(1.0)
    assert p[0] == pytest.approx(262465 / 860001) and p.argmin() == 78  # person; hair drier
    assert class_frequencies(SynthConfig()) is None
    flat = class_frequencies(SynthConfig(class_freq="coco", class_freq_power=0.0))
    assert np.allclose(flat, 1 / 80)
    half = class_frequencies(SynthConfig(class_freq="coco", class_freq_power=0.5))
    assert half[0] / half[78] == pytest.approx((262465 / 198) ** 0.5)
    assert sum(COCO_TRAIN2017_INSTANCES) == 860001

    counts = np.zeros(80, int)
    for _, inst in _render(600, class_freq="coco", min_objects=3, max_objects=3):
        for cls, _ in inst:
            counts[cls] += 1
    n = counts.sum()
    assert n > 1500
    sd = np.sqrt(n * p * (1 - p))
    assert np.all(np.abs(counts - n * p) <= 4 * sd + 3), np.nonzero(np.abs(counts - n * p) > 4 * sd + 3)
    assert 0.27 < counts[0] / n < 0.34
    uniform = np.zeros(80, int)
    for _, inst in _render(600, min_objects=3, max_objects=3):
        for cls, _ in inst:
            uniform[cls] += 1
    assert uniform[0] / uniform.sum() < 0.03  # the old world: person is one class in 80


def _box_stats(shapes: str) -> dict[int, tuple[float, float]]:
    """Per class: mean log(box height / width) and mean fill (mask area / box area) of lone objects."""
    per: dict[int, list[tuple[float, float]]] = {}
    for _, inst in _render(500, num_classes=10, shapes=shapes, min_objects=1, max_objects=1, min_radius=20, max_radius=28):
        for cls, m in inst:
            ys, xs = np.nonzero(m)
            h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
            per.setdefault(cls, []).append((np.log(h / w), m.sum() / (h * w)))
    return {c: tuple(np.mean(v, axis=0)) for c, v in per.items()}


def test_shape_priors_show_in_boxes_and_masks():
    priors = [class_shape(i) for i in range(10)]
    assert all(p["family"] in SHAPE_FAMILIES and 0.4 <= p["aspect"] <= 2.5 for p in priors)
    stats = _box_stats("class")
    assert sorted(stats) == list(range(10))
    want = np.log([priors[c]["aspect"] for c in range(10)])
    got = np.array([stats[c][0] for c in range(10)])
    assert np.corrcoef(want, got)[0, 1] > 0.9  # each class's boxes have its aspect ratio
    assert np.ptp(got) > 1.0  # and the classes differ: mean h/w spans more than e times
    fill = {f: [stats[c][1] for c in range(10) if priors[c]["family"] == f] for f in SHAPE_FAMILIES}
    # rounded rectangles fill their boxes more than ellipses (pi/4), ellipses more than diamonds (1/2)
    assert np.mean(fill["box"]) > np.mean(fill["ellipse"]) + 0.05 and np.mean(fill["ellipse"]) > np.mean(fill["diamond"]) + 0.1
    random = _box_stats("random")
    assert np.ptp([random[c][0] for c in range(10)]) < 0.5  # random blobs: no class has its own aspect ratio


def test_photo_appearance_shares_colours_between_objects_and_background():
    """In a photo-like world, background pixels take object-like colours and objects have a dull part:
    GrabCut's colour models of foreground and background overlap."""
    palette = np.array([c for _, c in PALETTE], np.float32)

    def near(px: np.ndarray, colours: np.ndarray) -> np.ndarray:
        return np.sqrt(((px[:, None, :] - colours[None]) ** 2).sum(-1)).min(1) < 50

    def fractions(appearance: str) -> tuple[float, float]:
        bg_like_objects, dull_object = [], []
        for img, inst in _render(30, appearance=appearance):
            bg = np.ones(img.shape[:2], bool)
            for _, m in inst:
                bg &= ~m
            bg_like_objects.append(float(near(img[bg].astype(np.float32), palette).mean()))
            obj = img[~bg].astype(np.float32)
            dull_object.append(float((obj.max(1) - obj.min(1) < 0.5 * obj.max(1)).mean()))  # HSV saturation < 0.5
        return float(np.mean(bg_like_objects)), float(np.mean(dull_object))

    flat, photo = fractions("flat"), fractions("photo")
    assert flat[0] < 0.03 and photo[0] > 0.1
    assert photo[1] > flat[1] + 0.1

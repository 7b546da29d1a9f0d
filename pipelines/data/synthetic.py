"""The built-in synthetic world: a COCO-format data set that maskx generates instead of downloading.

Every class has a *look* made of two factors, a colour (10 well-separated hues) and a texture
(8 patterns: solid, horizontal / vertical / diagonal stripes, checker, dots, rings, grid). The 80
COCO-named classes are the 80 (colour, texture) pairs, assigned so that the 20 PASCAL VOC classes
(set A of the voc->nonvoc split) cover every colour twice and every texture two or three times,
and the 60 others cover every factor too. Object *shapes* are random blobs, unrelated to the
class, and objects overlap heavily: inside a box, the target's pixels and a distractor's differ
only by their look. So a class-agnostic mask head cannot tell them apart on classes it never saw
masks of, a class-specific one can, and a weight transfer function can learn from set A how a
look (as the detector encodes it in ``w_det``) maps to mask weights, factor by factor, and apply
that to set B. See ``docs/synthetic_world.md`` for the design, the reasons and probe results.

Three options bring the world closer to real photographs (each off by default, so the worlds of
the older results stay reproducible byte for byte): ``class_freq="coco"`` draws classes with
COCO train2017's long-tailed instance frequencies, ``shapes="class"`` gives every class a shape
prior (a shape family and an aspect ratio, jittered per instance), and ``appearance="photo"``
paints unannotated regions of every colour behind the objects, gives every object a part of
another colour and shading, and lights the image unevenly.

Output of :func:`generate` in ``out_dir``::

    world.json                 manifest: format, version, config, counts
    instances_train.json       COCO instances (compressed RLE masks, bbox tight on the visible mask)
    instances_val.json
    train/000000000001.png     RGB uint8 [S, S, 3] images
    val/000000000001.png

The world is a function of :class:`SynthConfig` alone: the same config gives byte-identical JSON.
With ``names="own"``, ``box_only_classes`` and ``unmasked_fraction`` it is one's own mixed data set
instead (:mod:`pipelines.data.mixed`): own class names, and masks on some training classes only.
"""

from __future__ import annotations

import colorsys
import dataclasses
import functools
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from pipelines.data.mixed import drop_masks, own_categories
from pipelines.data.synthetic_paint import (SHAPE_FAMILIES, paint_object, place_object, plain_background, random_blob,
                                            scene_background, shaped_blob)
from pipelines.data.splits import COCO_CATEGORIES, VOC_COCO_IDS
from pipelines.data.world_config import APPEARANCES, CLASS_FREQS, SHAPES, SynthConfig
from pipelines.errors import MaskxError
from pipelines.io import make_parent, os_error_reason
from pipelines.progress import NULL_PROGRESS, Progress

FORMAT = "maskx-synthetic-world"
# Bump whenever the generated content changes for a given config (a cached world is then rebuilt
# only if its folder is removed: a mismatching world.json makes generate() refuse the folder).
VERSION = 2

# The colour factor: 10 hues picked by hand to stay apart under jitter and dark texture marks.
PALETTE: list[tuple[str, tuple[int, int, int]]] = [
    ("red", (220, 40, 40)),
    ("orange", (245, 145, 20)),
    ("yellow", (235, 225, 45)),
    ("green", (50, 185, 60)),
    ("cyan", (40, 210, 215)),
    ("blue", (45, 85, 235)),
    ("purple", (145, 60, 215)),
    ("pink", (240, 110, 200)),
    ("white", (240, 240, 240)),
    ("brown", (150, 95, 45)),
]
# The texture factor: where the pattern is on, the colour is darkened (see texture).
TEXTURES: list[str] = ["solid", "hstripes", "vstripes", "diagonal", "checker", "dots", "rings", "grid"]
BASE_PERIOD = 6.0  # texture period in pixels at image_size 128
NUM_FACTOR_CLASSES = len(PALETTE) * len(TEXTURES)  # 80

# Instances per category in COCO train2017 (instances_train2017.json, crowd regions included;
# 860,001 in all), in COCO order; docs/synthetic_world.md says where the numbers come from.
COCO_TRAIN2017_INSTANCES: list[int] = [
    262465, 7113, 43867, 8725, 5135, 6069, 4571, 9973, 10759, 12884, 1865, 1983, 1285, 9838, 10806,
    4768, 5508, 6587, 9509, 8147, 5513, 1294, 5303, 5131, 8720, 11431, 12354, 6496, 6192, 2682, 6646,
    2685, 6347, 9076, 3276, 3747, 5543, 6126, 4812, 24342, 7913, 20650, 5479, 7770, 6165, 14358, 9458,
    5851, 4373, 6399, 7308, 7852, 2918, 5821, 7179, 6353, 38491, 5779, 8652, 4192, 15714, 4157, 5805,
    4970, 2262, 5703, 2855, 6434, 1673, 3334, 225, 5610, 2637, 24715, 6334, 6613, 1481, 4793, 198, 1954,
]


# A world.json written before an option existed was made with these values (the defaults of that
# time); a key missing from a manifest is read as this value, not as today's default.
LEGACY_CONFIG = {"min_radius": 9.0, "max_radius": 24.0, "class_freq": "uniform", "class_freq_power": 1.0,
                 "shapes": "random", "appearance": "flat", "names": "coco", "box_only_classes": 0, "unmasked_fraction": 0.0}
NAMES = ("coco", "own")


@dataclass
class SynthResult:
    out_dir: Path
    train_json: Path
    val_json: Path
    train_dir: Path
    val_dir: Path
    num_classes: int
    train_images: int
    val_images: int
    train_instances: int
    val_instances: int


def _check_config(cfg: SynthConfig) -> None:
    if cfg.num_classes < 2:
        raise MaskxError(f"synthetic world: num_classes must be at least 2, got {cfg.num_classes}")
    if cfg.image_size < 32:
        raise MaskxError(f"synthetic world: image_size must be at least 32 pixels, got {cfg.image_size}")
    if cfg.min_objects < 1:
        raise MaskxError(f"synthetic world: min_objects must be at least 1, got {cfg.min_objects}")
    if cfg.min_objects > cfg.max_objects:
        raise MaskxError(f"synthetic world: min_objects ({cfg.min_objects}) is larger than max_objects ({cfg.max_objects})")
    if not 3.0 <= cfg.min_radius <= cfg.max_radius <= 48.0:
        raise MaskxError(f"synthetic world: need 3 <= min_radius <= max_radius <= 48 (pixels at 128 px), "
                         f"got {cfg.min_radius} and {cfg.max_radius}")
    for key, allowed in (("class_freq", CLASS_FREQS), ("shapes", SHAPES), ("appearance", APPEARANCES)):
        if getattr(cfg, key) not in allowed:
            raise MaskxError(f"synthetic world: {key} must be one of {' | '.join(allowed)}, got '{getattr(cfg, key)}'")
    if cfg.class_freq == "coco" and cfg.num_classes > len(COCO_TRAIN2017_INSTANCES):
        raise MaskxError(f"synthetic world: class_freq coco knows the frequencies of COCO's {len(COCO_TRAIN2017_INSTANCES)} classes "
                         f"only, got num_classes {cfg.num_classes}")
    if not 0.0 <= cfg.class_freq_power <= 2.0:
        raise MaskxError(f"synthetic world: class_freq_power must be between 0 and 2, got {cfg.class_freq_power}")
    if cfg.names not in NAMES:
        raise MaskxError(f"synthetic world: names must be one of {' | '.join(NAMES)}, got '{cfg.names}'")
    if not 0 <= cfg.box_only_classes < cfg.num_classes:
        raise MaskxError(f"synthetic world: box_only_classes must be between 0 and num_classes - 1 ({cfg.num_classes - 1}), "
                         f"got {cfg.box_only_classes}")
    if not 0.0 <= cfg.unmasked_fraction < 1.0:
        raise MaskxError(f"synthetic world: unmasked_fraction must be in [0, 1), got {cfg.unmasked_fraction}")
    if cfg.train_images < 1 or cfg.val_images < 1:
        raise MaskxError(
            f"synthetic world: needs at least 1 training and 1 validation image, got {cfg.train_images} and {cfg.val_images}"
        )


# --------------------------------------------------------------------------------------------
# Classes and their looks
def _factor_pairs() -> list[tuple[int, int]]:
    """(colour index, texture index) of each of the 80 COCO-named classes, in COCO order.

    VOC class number j (0..19 in COCO order) gets (j mod 10, j mod 8): 20 distinct pairs (by the
    Chinese remainder theorem, j mod 40 is determined) covering every colour twice and every
    texture 2-3 times. The other 60 pairs go to the non-VOC classes in a fixed shuffled order.
    """
    voc_pairs = [(j % len(PALETTE), j % len(TEXTURES)) for j in range(len(VOC_COCO_IDS))]
    rest = [(h, t) for h in range(len(PALETTE)) for t in range(len(TEXTURES)) if (h, t) not in set(voc_pairs)]
    order = np.random.default_rng(2018).permutation(len(rest))
    rest = [rest[i] for i in order]
    pairs, vi, ri = [], 0, 0
    for cid, _ in COCO_CATEGORIES:
        if cid in VOC_COCO_IDS:
            pairs.append(voc_pairs[vi])
            vi += 1
        else:
            pairs.append(rest[ri])
            ri += 1
    return pairs


def _extra_look(index: int) -> dict:
    """Look of a class beyond the 80 factor classes: a colour drawn from the whole colour space."""
    rng = np.random.default_rng([7919, index])
    h, s, v = rng.uniform(0, 1), rng.uniform(0.45, 1.0), rng.uniform(0.55, 1.0)
    rgb = [int(round(255 * c)) for c in colorsys.hsv_to_rgb(h, s, v)]
    return {
        "color": rgb,
        "color_name": None,
        "texture": TEXTURES[int(rng.integers(len(TEXTURES)))],
        "period": float([4.5, 6.0, 8.0][int(rng.integers(3))]),
    }


def class_shape(index: int) -> dict:
    """Shape prior of class number ``index``: ``family`` (a key of SHAPE_FAMILIES) and ``aspect``
    (height / width of the upright shape, 0.4 to 2.5, log-uniform).

    Families go round-robin over the VOC classes and, separately, over the others (in COCO order), so
    set A of the voc split holds every family four times; classes beyond 80 draw theirs at random.
    The aspect ratio is drawn from a generator seeded by the class number.
    """
    rng = np.random.default_rng([4099, index])
    aspect = float(np.exp(rng.uniform(np.log(0.4), np.log(2.5))))
    names = list(SHAPE_FAMILIES)
    if index < len(COCO_CATEGORIES):
        voc = [i for i, (cid, _) in enumerate(COCO_CATEGORIES) if cid in VOC_COCO_IDS]
        rest = [i for i, (cid, _) in enumerate(COCO_CATEGORIES) if cid not in VOC_COCO_IDS]
        family = names[voc.index(index) % len(names)] if index in voc else names[rest.index(index) % len(names)]
    else:
        family = names[int(rng.integers(len(names)))]
    return {"family": family, "aspect": round(aspect, 4)}


def class_frequencies(cfg: SynthConfig) -> np.ndarray | None:
    """Probability of each class per object, float64[num_classes], or None for uniform (the
    generator then draws classes as it always has)."""
    if cfg.class_freq == "uniform":
        return None
    weights = np.asarray(COCO_TRAIN2017_INSTANCES[: cfg.num_classes], np.float64) ** cfg.class_freq_power
    return weights / weights.sum()


def synth_categories(num_classes: int, shapes: bool = False) -> list[dict]:
    """The category list of a world with ``num_classes`` classes.

    The first ``min(80, num_classes)`` are COCO's categories (ids and names in COCO order, with
    ``coco_id`` = id); further ones have ids 91, 92, ... named ``synth_0081``, ... and
    ``coco_id`` None. Each carries ``look``: ``color`` [r, g, b], ``color_name``, ``texture``,
    ``period`` (pixels at image size 128); with ``shapes`` also ``shape`` (:func:`class_shape`).
    """
    pairs = _factor_pairs()
    cats = []
    for i in range(num_classes):
        if i < len(COCO_CATEGORIES):
            cid, name = COCO_CATEGORIES[i]
            h, t = pairs[i]
            look = {"color": list(PALETTE[h][1]), "color_name": PALETTE[h][0], "texture": TEXTURES[t], "period": BASE_PERIOD}
            cats.append({"id": cid, "name": name, "supercategory": "synthetic", "coco_id": cid, "look": look})
        else:
            cats.append(
                {"id": 91 + i - 80, "name": f"synth_{i + 1:04d}", "supercategory": "synthetic", "coco_id": None, "look": _extra_look(i)}
            )
        if shapes:
            cats[-1]["shape"] = class_shape(i)
    return cats


# --------------------------------------------------------------------------------------------
# Rendering (the painting primitives: pipelines/data/synthetic_paint.py)
@functools.lru_cache(maxsize=8)
def _class_shapes(num_classes: int) -> tuple[dict, ...]:
    return tuple(class_shape(i) for i in range(num_classes))


def render_image(
    rng: np.random.Generator,
    cfg: SynthConfig,
    looks: list[dict],
    min_area: int,
    overlap: float = 0.75,
    clutter: bool = True,
) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """One image: ``uint8[S, S, 3]`` and its instances ``(class index, visible mask bool[S, S])``.

    Objects are painted back to front; each new object lands, with probability ``overlap``, on top
    of an existing one (centre within about one radius of it), else anywhere. A placement is
    accepted only if every object keeps at least 35% of its pixels and ``min_area`` visible.
    Classes are drawn uniformly or with :func:`class_frequencies`; shapes are random blobs or
    instances of the class's :func:`class_shape`. With ``appearance="photo"`` the background is a
    scene (:func:`scene_background`), a part of every object (the 20-40% of its pixels beyond a
    random straight cut) takes a dull colour of its own (saturation <= 0.5, value 0.15-0.6, like
    tyres, trousers or a shadowed side), each object is shaded (brightness x 1 +- up to 25% across
    it) and the whole image lit unevenly (x 0.6-1.4).
    ``overlap`` and ``clutter`` exist for the design probes (benchmarks/world_probe.py).
    """
    size = cfg.image_size
    scale = size / 128.0
    palette = np.array([c for _, c in PALETTE], np.float32)
    photo = cfg.appearance == "photo"
    img = (scene_background if photo else plain_background)(rng, size, palette, clutter)
    probs = class_frequencies(cfg)
    priors = _class_shapes(len(looks)) if cfg.shapes == "class" else None
    n_obj = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    full: list[np.ndarray] = []  # full (unoccluded) masks, in paint order
    areas: list[int] = []  # their full areas
    classes: list[int] = []
    centres: list[tuple[float, float, float]] = []
    for _ in range(n_obj):
        cls = int(rng.integers(len(looks))) if probs is None else int(rng.choice(len(looks), p=probs))
        radius = rng.uniform(cfg.min_radius, cfg.max_radius) * scale
        blob = random_blob(rng, radius) if priors is None else shaped_blob(rng, radius, priors[cls])
        placed = place_object(rng, blob, radius, size, centres, full, areas, min_area, overlap)
        if placed is None:
            continue
        m, yi, xi, area = placed
        full = [f & ~m for f in full]  # from now on `full` holds visible masks
        full.append(m)
        areas.append(area)
        classes.append(cls)
        centres.append((float(yi), float(xi), float(radius)))
        paint_object(rng, img, m, looks[cls], yi, xi, radius, scale, photo)
    if photo:  # uneven light over the whole image
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
        gy, gx = rng.normal(0, 0.35, 2)
        img *= np.clip(1.0 + gx * xx + gy * yy, 0.6, 1.4)[..., None]
    img += rng.normal(0, 5.0, img.shape).astype(np.float32)
    out = np.clip(img, 0, 255).astype(np.uint8)
    return out, [(c, v) for c, v in zip(classes, full) if v.sum() >= min_area]


def _encode(mask: np.ndarray) -> tuple[dict, list[int], int]:
    """Compressed RLE (``counts`` as str), tight bbox [x, y, w, h] and area of ``bool[H, W]``."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    ys, xs = np.nonzero(mask)
    bbox = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": rle["counts"]}, bbox, int(mask.sum())


def min_visible_area(image_size: int) -> int:
    """Instances with fewer visible pixels than this are not annotated (and not kept)."""
    return max(12, int(round(40 * (image_size / 128.0) ** 2)))


def _make_split(cfg: SynthConfig, split: str, n_images: int, cats: list[dict], root: Path, task) -> dict:
    split_id = {"train": 0, "val": 1}[split]
    (root / split).mkdir()
    looks = [c["look"] for c in cats]
    min_area = min_visible_area(cfg.image_size)
    images, anns = [], []
    for i in range(1, n_images + 1):
        rng = np.random.default_rng([cfg.seed, split_id, i])
        img, inst = render_image(rng, cfg, looks, min_area)
        name = f"{i:012d}.png"
        Image.fromarray(img).save(root / split / name, compress_level=1)
        images.append({"id": i, "file_name": name, "width": cfg.image_size, "height": cfg.image_size})
        for cls, vis in inst:
            seg, bbox, area = _encode(vis)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i,
                    "category_id": cats[cls]["id"],
                    "bbox": bbox,
                    "area": area,
                    "iscrowd": 0,
                    "segmentation": seg,
                }
            )
        task.advance()
    return {
        "info": {"description": f"maskx synthetic world ({split})", "version": VERSION, "seed": cfg.seed},
        "images": images,
        "annotations": anns,
        "categories": cats,
    }


def _result(out: Path, manifest: dict) -> SynthResult:
    counts = manifest["counts"]
    return SynthResult(
        out_dir=out,
        train_json=out / "instances_train.json",
        val_json=out / "instances_val.json",
        train_dir=out / "train",
        val_dir=out / "val",
        num_classes=manifest["config"]["num_classes"],
        train_images=counts["train_images"],
        val_images=counts["val_images"],
        train_instances=counts["train_instances"],
        val_instances=counts["val_instances"],
    )


def _existing(out: Path, cfg: SynthConfig) -> SynthResult | None:
    """The world already in ``out`` if it is complete and made with ``cfg``; None if ``out`` is empty
    or absent. Raises MaskxError for any other content."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise MaskxError("exists and is not a folder; choose another output folder for the synthetic world", out)
    if not any(out.iterdir()):
        return None
    manifest_path = out / "world.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        manifest = None
    if (
        isinstance(manifest, dict)
        and manifest.get("format") == FORMAT
        and manifest.get("version") == VERSION
        and {**LEGACY_CONFIG, **(manifest.get("config") or {})} == dataclasses.asdict(cfg)
        and all((out / p).exists() for p in ("instances_train.json", "instances_val.json", "train", "val"))
    ):
        return _result(out, manifest)
    what = "a synthetic world made with another config or version" if isinstance(manifest, dict) and manifest.get("format") == FORMAT else "other files"
    raise MaskxError(f"folder is not empty (holds {what}); remove it or choose another output folder", out)


def generate(cfg: SynthConfig, out_dir: str | Path, progress: Progress = NULL_PROGRESS) -> SynthResult:
    """Generate the synthetic world into ``out_dir`` (see the module docstring for the layout).

    Built in a temporary folder beside ``out_dir`` and renamed into place when complete. If
    ``out_dir`` already holds a complete world of the same config and version, it is returned as is;
    if it holds anything else, MaskxError is raised.
    """
    _check_config(cfg)
    out = Path(out_dir)
    found = _existing(out, cfg)
    if found is not None:
        return found
    cats = synth_categories(cfg.num_classes, shapes=cfg.shapes == "class")
    if cfg.names == "own":
        cats = own_categories(cats)
    make_parent(out)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as exc:
        raise MaskxError(f"cannot write here: {os_error_reason(exc)}", out.parent) from exc
    task = progress.task("synthetic world", total=cfg.train_images + cfg.val_images)
    try:
        train = _make_split(cfg, "train", cfg.train_images, cats, tmp, task)
        val = _make_split(cfg, "val", cfg.val_images, cats, tmp, task)
        dropped = drop_masks(train, cfg.box_only_classes, cfg.unmasked_fraction, cfg.seed)
        for name, data in (("instances_train.json", train), ("instances_val.json", val)):
            (tmp / name).write_text(json.dumps(data, separators=(",", ":")))
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "config": dataclasses.asdict(cfg),
            "counts": {
                "train_images": cfg.train_images,
                "val_images": cfg.val_images,
                "train_instances": len(train["annotations"]),
                "val_instances": len(val["annotations"]),
            },
            **({"masks_dropped": dropped} if cfg.box_only_classes or cfg.unmasked_fraction else {}),
        }
        (tmp / "world.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            out.rmdir()  # empty (checked above); rename needs the name free
        os.replace(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise MaskxError(f"could not write the synthetic world: {os_error_reason(exc)}", out) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        task.close()
    return _result(out, manifest)

"""Visual Genome 3k: the paper's §4 data, built from the raw VG and COCO 2017 files.

:func:`prepare_vg` reads VG's ``image_data.json`` and ``objects.json`` (v1.2 or v1.4 layout) and the
COCO 2017 instance files, and writes to ``out``:

- ``vg_train.json`` / ``vg_val.json``: COCO-format box annotations of the ``num_classes`` classes
  (no masks). Validation = the VG images that are COCO ``val2017`` images (via VG's ``coco_id``);
  every other image is training, so no COCO ``val2017`` image is ever trained on;
- ``coco_masks_train.json`` / ``coco_masks_val.json``: COCO 2017 images and instance masks of the
  COCO classes, with COCO category ids replaced by the VG class ids and the full VG category list:
  the mask stage trains on these (set A) with the detector trained on VG;
- ``classes.tsv``: id, synset, name, COCO id, frequency, how the COCO class was matched, and the
  most common VG name of the synset (to check the alignment by eye);
- ``prepare_report.json``: the statistics, the inputs and the COCO-to-synset alignment used.

The six files are written all or none (:func:`pipelines.io.all_or_nothing`).

The rules, following the paper and its authors' release scripts:

1. Objects: an object id seen again (VG repeats some) is dropped and counted. A class's
   frequency is the number of objects that carry its synset (objects with several synsets count
   for each); the ``num_classes`` most frequent synsets are the classes (ties: synset name order).
2. An object becomes a box annotation only if it has exactly one synset and that synset is a
   class. Boxes are clipped to the image; those of zero area (before or after clipping) are
   dropped and counted.
3. Each COCO class is aligned to a synset: first :data:`COCO_TO_VG_HAND_MAP` (the first of its
   candidates that is among the classes), else the first hand-mapped candidate that VG uses at all
   (the first candidate if VG uses none), which then becomes an *extra class* beyond the
   ``num_classes`` (as the authors' preparation keeps it: their VG3k configs have 3,001 classes),
   with its VG boxes and its COCO masks; else by name: the most frequent class synset whose lemma
   (``traffic_light.n.01`` -> ``traffic light``) equals the COCO name. A COCO class with no match
   is reported by name and counted; its masks are left out of ``coco_masks_*.json``.
4. Category ids: the aligned COCO classes first, in COCO id order (ids 1..M, ``coco_id`` = their
   COCO category id), then the other classes by decreasing frequency (``coco_id: null``). There
   are ``num_classes`` + (number of extra classes) categories.

Category names are the COCO names for COCO classes and the synset lemma for the others (the
synset itself where two lemmas collide); every category also carries ``synset``, ``instance_count``
(its frequency: the number of objects that carry the synset, LVIS's name for it), ``match`` (``hand``,
``extra`` (hand-mapped, beyond the ``num_classes`` most frequent) or ``name`` for COCO classes) and
``vg_name`` (the most common VG name of its objects).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipelines.data.coco import check_same_categories, load_coco
from pipelines.errors import MaskxError
from pipelines.io import all_or_nothing, atomic_path, file_name_from_url, make_parent, read_json, write_json, write_text
from pipelines.progress import NULL_PROGRESS, Progress

# COCO class name -> VG synsets that stand for it, tried in order; for the COCO classes whose name
# is not the lemma of the synset VG uses. From the paper's authors' alignment (seg_every_thing's
# VG3k scripts), plus the WordNet synset of the class as a second choice where it differs.
COCO_TO_VG_HAND_MAP: dict[str, list[str]] = {
    "cell phone": ["cellular_telephone.n.01"],  # lemmas: cellphone, cell, mobile phone
    "couch": ["sofa.n.01"],  # lemmas: sofa, couch, lounge
    "dining table": ["dinner_table.n.01", "dining_table.n.01"],
    "donut": ["doughnut.n.02"],
    # VG canonicalises "hydrant" / "fire hydrant" to hydrant.n.01, which WordNet names water_faucet.n.01
    "fire hydrant": ["water_faucet.n.01", "hydrant.n.01", "fireplug.n.01", "fire_hydrant.n.01"],
    "hair drier": ["hand_blower.n.01"],  # lemmas: hair dryer, blow dryer
    "handbag": ["bag.n.04"],  # lemmas: handbag, purse, pocketbook
    "hot dog": ["hotdog.n.01", "hotdog.n.02", "frank.n.02"],
    "orange": ["orange.n.01"],  # the fruit; orange.n.02 is the colour
    "potted plant": ["plant.n.01", "plant.n.02", "pot.n.04"],  # VG labels potted plants "plant"
    "remote": ["remote_control.n.01"],
    "skis": ["ski.n.01"],
    "sports ball": ["ball.n.01", "ball.n.06"],
    "stop sign": ["stop_sign.n.01", "sign.n.02"],  # WordNet 3.0 has no stop sign: VG labels them sign.n.02
    "suitcase": ["bag.n.06"],  # lemmas: bag, traveling bag, suitcase
    "teddy bear": ["teddy.n.01"],
    "tv": ["television.n.01", "television_receiver.n.01"],
    "wine glass": ["wineglass.n.01"],
}


@dataclass
class VGPrepareConfig:
    """Inputs and options of :func:`prepare_vg`."""

    image_data: str  # VG image_data.json
    objects: str  # VG objects.json
    coco_train: str  # COCO instances_train2017.json
    coco_val: str  # COCO instances_val2017.json (its images are VG's validation set)
    out: str  # output folder
    images: str = ""  # VG image root (holding VG_100K/, VG_100K_2/); when set, each listed image must exist
    num_classes: int = 3000
    hand_map: str = ""  # JSON file {coco name: [synset, ...]}: entries replace those of COCO_TO_VG_HAND_MAP
    allow_missing_images: bool = False  # drop (and count) images missing under `images` instead of failing


@dataclass
class VGPrepareResult:
    """What :func:`prepare_vg` wrote and counted."""

    out: str
    layout: str  # the id keys found: image_id / id for images, object_id / id for objects
    num_classes: int
    coco_classes_matched: int
    coco_unmatched: list[str]  # COCO class names with no VG class
    train_images: int
    val_images: int
    train_boxes: int
    val_boxes: int
    coco_mask_train_annotations: int
    coco_mask_val_annotations: int
    coco_extra: list[str] = field(default_factory=list)  # COCO classes kept as extra classes: "name (synset, N objects)"
    stats: dict[str, int] = field(default_factory=dict)  # every count, for the table and the report
    files: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def synset_lemma(synset: str) -> str:
    """``traffic_light.n.01`` -> ``traffic light`` (the synset's head lemma, readable)."""
    parts = synset.rsplit(".", 2)
    head = parts[0] if len(parts) == 3 else synset
    return head.replace("_", " ")


# ------------------------------------------------------------------------------------------------
def _id_key(record: Any, keys: tuple[str, ...], path: Path, what: str) -> str:
    if not isinstance(record, dict):
        raise MaskxError(f"unknown Visual Genome layout: {what} is a {type(record).__name__}, not an object", path)
    for k in keys:
        if k in record:
            return k
    shown = ", ".join(sorted(record)[:8])
    raise MaskxError(
        f"unknown Visual Genome layout: {what} has none of {' / '.join(repr(k) for k in keys)} (keys: {shown}); "
        "expected the v1.2 or v1.4 layout",
        path,
    )


def _read_image_data(path: Path) -> tuple[dict[int, dict], str]:
    raw = read_json(path, "VG image_data.json")
    if not isinstance(raw, list) or not raw:
        raise MaskxError("unknown Visual Genome layout: expected a non-empty list of image records", path)
    key = _id_key(raw[0], ("image_id", "id"), path, "image record #0")
    images: dict[int, dict] = {}
    for n, rec in enumerate(raw):
        if not isinstance(rec, dict) or key not in rec:
            raise MaskxError(f"unknown Visual Genome layout: image record #{n} has no '{key}' (record #0 has)", path)
        iid = rec[key]
        for k in ("width", "height"):
            if not isinstance(rec.get(k), int) or rec[k] <= 0:
                raise MaskxError(f"image record {iid} has no valid '{k}'", path)
        if "url" in rec:
            file_name = file_name_from_url(rec["url"])
        elif "file_name" in rec:
            file_name = rec["file_name"]
        else:
            raise MaskxError(f"unknown Visual Genome layout: image record {iid} has neither 'url' nor 'file_name'", path)
        if iid in images:
            raise MaskxError(f"duplicate image id {iid}", path)
        images[iid] = {"id": iid, "file_name": file_name, "width": rec["width"], "height": rec["height"], "coco_id": rec.get("coco_id")}
    return images, key


def _iter_objects(raw: list, path: Path, layout: dict, on_record=None):
    """Yield ``(image_id, object_id, x, y, w, h, synsets, name)`` for every object; layout checked.

    ``layout`` receives the id keys found (``image``, ``object``); ``on_record()`` is called once per
    image record.
    """
    img_key = _id_key(raw[0], ("image_id", "id"), path, "objects record #0")
    layout["image"] = img_key
    obj_key = None
    for n, rec in enumerate(raw):
        if not isinstance(rec, dict) or img_key not in rec or not isinstance(rec.get("objects"), list):
            raise MaskxError(f"unknown Visual Genome layout: objects record #{n} has no '{img_key}' or no 'objects' list", path)
        iid = rec[img_key]
        if on_record is not None:
            on_record(iid)
        for k, obj in enumerate(rec["objects"]):
            if obj_key is None:
                obj_key = _id_key(obj, ("object_id", "id"), path, f"object #{k} of image {iid}")
                layout["object"] = obj_key
            if not isinstance(obj, dict) or obj_key not in obj:
                raise MaskxError(f"unknown Visual Genome layout: object #{k} of image {iid} has no '{obj_key}'", path)
            for c in ("x", "y", "w", "h"):
                v = obj.get(c)
                if not isinstance(v, (int, float)) or isinstance(v, bool):
                    raise MaskxError(f"object {obj[obj_key]} of image {iid} has no numeric '{c}'", path)
            syn = obj.get("synsets")
            if not isinstance(syn, list):
                raise MaskxError(f"unknown Visual Genome layout: object {obj[obj_key]} of image {iid} has no 'synsets' list", path)
            names = obj.get("names")
            name = names[0] if isinstance(names, list) and names else obj.get("name", "")
            yield iid, obj[obj_key], obj["x"], obj["y"], obj["w"], obj["h"], syn, name


def _write_compact_json(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, separators=(",", ":"))


def _load_hand_map(path: str) -> dict[str, list[str]]:
    hand = {k: list(v) for k, v in COCO_TO_VG_HAND_MAP.items()}
    if not path:
        return hand
    extra = read_json(path, "hand map file")
    if not isinstance(extra, dict) or not all(
        isinstance(v, (str, list)) and all(isinstance(s, str) for s in ([v] if isinstance(v, str) else v)) for v in extra.values()
    ):
        raise MaskxError('hand map must be a JSON object {"coco name": ["synset.n.01", ...]}', path)
    for k, v in extra.items():
        hand[k] = [v] if isinstance(v, str) else list(v)
    return hand


def align_coco_to_synsets(
    coco_categories: list[dict], ranked_synsets: list[str], hand_map: dict[str, list[str]] | None = None,
    vg_synsets: set[str] | None = None,
) -> tuple[dict[int, tuple[str, str]], list[str]]:
    """Match COCO classes to synsets (rule 3 of the module docstring).

    ``ranked_synsets``: the classes, most frequent first; ``vg_synsets``: every synset VG uses (default:
    the classes). Returns ``{coco id: (synset, "hand" | "extra" | "name")}`` (``extra``: a hand-mapped
    synset that is not among the classes, to be added as a class) and the names of the COCO classes
    left unmatched (with the reason).
    """
    hand_map = COCO_TO_VG_HAND_MAP if hand_map is None else hand_map
    vg_synsets = set(ranked_synsets) if vg_synsets is None else vg_synsets
    selected = set(ranked_synsets)
    by_lemma: dict[str, str] = {}
    for s in ranked_synsets:  # most frequent first: keep the first synset of each lemma
        by_lemma.setdefault(synset_lemma(s), s)
    taken: dict[str, str] = {}
    matched: dict[int, tuple[str, str]] = {}
    unmatched: list[str] = []
    for cat in sorted(coco_categories, key=lambda c: c["id"]):
        name = cat["name"]
        synset, how = None, ""
        candidates = hand_map.get(name, [])
        for cand in candidates:
            if cand in selected:
                synset, how = cand, "hand"
                break
        if synset is None and candidates:
            used = [c for c in candidates if c in vg_synsets]
            synset, how = (used or candidates)[0], "extra"
        if synset is None and name in by_lemma:
            synset, how = by_lemma[name], "name"
        if synset is None:
            unmatched.append(name)
            continue
        if synset in taken:
            unmatched.append(f"{name} ({synset} is already '{taken[synset]}')")
            continue
        taken[synset] = name
        matched[cat["id"]] = (synset, how)
    return matched, unmatched


def _read_objects(cfg: VGPrepareConfig, images: dict, stats: Counter, progress: Progress):
    """VG objects (deduplicated by id, one synset each) and the synsets' counts and names."""
    objects_path = Path(cfg.objects)
    task = progress.task("read VG objects.json", 1)
    raw_objects = read_json(objects_path, "VG objects.json")
    task.advance()
    task.close()
    if not isinstance(raw_objects, list) or not raw_objects:
        raise MaskxError("unknown Visual Genome layout: expected a non-empty list of per-image object records", objects_path)
    task = progress.task("count synsets", len(raw_objects))
    seen: set = set()
    objects: list[tuple] = []
    freq: Counter = Counter()
    names: dict[str, Counter] = {}
    layout: dict = {}

    with_record: set = set()

    def on_record(iid) -> None:
        if iid not in images:
            raise MaskxError(
                f"objects record of image {iid}, which is not in {Path(cfg.image_data).name}: the two files do not belong together",
                objects_path,
            )
        with_record.add(iid)
        task.advance()

    for iid, oid, x, y, w, h, syn, name in _iter_objects(raw_objects, objects_path, layout, on_record):
        if oid in seen:
            stats["duplicate_object_ids_dropped"] += 1
            continue
        seen.add(oid)
        stats["vg_objects"] += 1
        for s in syn:
            freq[s] += 1
        if len(syn) == 0:
            stats["objects_without_synset"] += 1
        elif len(syn) > 1:
            stats["objects_with_several_synsets"] += 1
        else:
            objects.append((iid, oid, x, y, w, h, syn[0]))
            names.setdefault(syn[0], Counter())[str(name).strip().lower()] += 1
    task.close()
    del raw_objects
    if len(with_record) < len(images):  # VG lists one objects record (maybe empty) per image
        first = min(set(images) - with_record)
        raise MaskxError(
            f"{len(images) - len(with_record)} of the {len(images)} images of {Path(cfg.image_data).name} have no objects "
            f"record here (first: image {first}): the two files do not belong together, or this one is cut short",
            objects_path,
        )
    stats["distinct_synsets"] = len(freq)
    return objects, freq, names, layout


def _categories(coco_cats: list[dict], ranked: list[str], matched: dict, freq: Counter, names: dict) -> tuple[list[dict], dict[str, int]]:
    """The VG3k class list (COCO-matched classes first, then by frequency) and synset -> class id."""
    coco_name = {c["id"]: c["name"] for c in coco_cats}
    order = [(matched[cid][0], cid) for cid in sorted(matched)]
    coco_synsets = {s for s, _ in order}
    order += [(s, None) for s in ranked if s not in coco_synsets]
    categories: list[dict] = []
    used_names: set = set()
    class_of_synset: dict[str, int] = {}
    for i, (s, cid) in enumerate(order, start=1):
        name = coco_name[cid] if cid is not None else synset_lemma(s)
        if name in used_names:
            name = s
        used_names.add(name)
        top_name = names.get(s, Counter()).most_common(1)
        categories.append({
            "id": i,
            "name": name,
            "synset": s,
            "coco_id": cid,
            "instance_count": freq[s],
            "match": matched[cid][1] if cid is not None else "",
            "vg_name": top_name[0][0] if top_name else "",
        })
        class_of_synset[s] = i
    return categories, class_of_synset


def _drop_missing_images(cfg: VGPrepareConfig, images: dict, stats: Counter, warnings: list[str], progress: Progress) -> None:
    """Check every image file under ``cfg.images`` (if given): fail on missing ones, or leave them out."""
    missing: list[str] = []
    if cfg.images:
        root = Path(cfg.images)
        if not root.is_dir():
            raise MaskxError("VG image folder not found", root)
        task = progress.task("check VG images", len(images))
        for iid, img in list(images.items()):
            if not (root / img["file_name"]).is_file():
                missing.append(img["file_name"])
                del images[iid]
            task.advance()
        task.close()
        if missing and not cfg.allow_missing_images:
            raise MaskxError(
                f"{len(missing)} of {stats['vg_images']} images listed in {Path(cfg.image_data).name} are missing here, "
                f"first: {missing[0]} (set allow_missing_images to leave them out)",
                root, key="allow_missing_images",
            )
        if missing:
            warnings.append(f"left out {len(missing)} image(s) missing under {root}, first: {missing[0]}")
    stats["missing_images_dropped"] = len(missing)


def _box_annotations(objects: list[tuple], class_of_synset: dict[str, int], images: dict, split_of: dict,
                     stats: Counter) -> dict[str, list]:
    """COCO box annotations per split: objects of the kept classes, boxes clipped to the image."""
    anns: dict[str, list] = {"train": [], "val": []}
    for iid, oid, x, y, w, h, s in objects:
        cls = class_of_synset.get(s)
        if cls is None:
            stats["objects_not_in_classes"] += 1
            continue
        if iid not in split_of:  # image missing on disk (allowed)
            continue
        img = images[iid]
        if w <= 0 or h <= 0:
            stats["degenerate_boxes_dropped"] += 1
            continue
        x1, y1 = max(0.0, float(x)), max(0.0, float(y))
        x2, y2 = min(float(img["width"]), float(x + w)), min(float(img["height"]), float(y + h))
        if x2 <= x1 or y2 <= y1:
            stats["degenerate_boxes_dropped"] += 1
            continue
        if (x1, y1, x2, y2) != (x, y, x + w, y + h):
            stats["boxes_clipped_to_image"] += 1
        bw, bh = x2 - x1, y2 - y1
        anns[split_of[iid]].append(
            {"id": oid, "image_id": iid, "category_id": cls, "bbox": [x1, y1, bw, bh], "area": bw * bh, "iscrowd": 0}
        )
    return anns


def _coco_masks(coco: dict[str, dict], vg_of_coco: dict[int, int], categories: list[dict], stats: Counter) -> dict[str, dict]:
    """COCO's mask annotations per split, re-labelled with the VG class ids (unmatched classes dropped)."""
    coco_out = {}
    for k, data in coco.items():
        kept = []
        for a in data["annotations"]:
            vg = vg_of_coco.get(a["category_id"])
            if vg is None:
                stats["coco_masks_of_unmatched_classes_dropped"] += 1
                continue
            kept.append({**a, "category_id": vg})
        coco_out[k] = {"images": data["images"], "annotations": kept, "categories": categories}
        stats[f"coco_mask_{k}_annotations"] = len(kept)
    return coco_out


OUTPUT_FILES = {"vg_train": "vg_train.json", "vg_val": "vg_val.json", "coco_masks_train": "coco_masks_train.json",
                "coco_masks_val": "coco_masks_val.json", "classes": "classes.tsv", "report": "prepare_report.json"}


def _write_files(out: Path, split_images: dict, anns: dict, coco_out: dict, categories: list[dict], task) -> dict[str, Path]:
    """Write five of the files into ``out`` (all but the report); return the path of each of the six."""
    files = {k: out / name for k, name in OUTPUT_FILES.items()}
    for k in ("train", "val"):
        _write_compact_json(files[f"vg_{k}"], {"images": split_images[k], "annotations": anns[k], "categories": categories})
        task.advance()
    for k in ("train", "val"):
        _write_compact_json(files[f"coco_masks_{k}"], coco_out[k])
        task.advance()
    lines = ["id\tsynset\tname\tcoco_id\tfrequency\tmatch\tvg_name"]
    for c in categories:
        lines.append(f"{c['id']}\t{c['synset']}\t{c['name']}\t{'' if c['coco_id'] is None else c['coco_id']}\t{c['instance_count']}\t{c['match']}\t{c['vg_name']}")
    write_text(files["classes"], "\n".join(lines) + "\n")
    task.advance()
    return files


def _align_classes(cfg: VGPrepareConfig, freq: Counter, names: dict, coco_cats: list[dict], hand_map: dict,
                   stats: Counter, warnings: list[str]) -> tuple[dict, list[str], list[str], list[dict], dict]:
    """The VG classes: the ``cfg.num_classes`` most frequent synsets, COCO's classes aligned to them.

    Returns (matched: COCO id -> (synset, how), unmatched COCO names, extra-class descriptions,
    categories, class id of each kept synset); adds the counts to ``stats`` and the notes to ``warnings``.
    """
    ranked = [s for s, _ in sorted(freq.items(), key=lambda kv: (-kv[1], kv[0]))][: cfg.num_classes]
    if len(ranked) < cfg.num_classes:
        warnings.append(f"only {len(ranked)} distinct synsets in {Path(cfg.objects).name}, fewer than the {cfg.num_classes} classes asked for")
    matched, unmatched = align_coco_to_synsets(coco_cats, ranked, hand_map, set(freq))
    extra = [f"{c['name']} ({matched[c['id']][0]}, {freq[matched[c['id']][0]]} objects)" for c in coco_cats
             if c["id"] in matched and matched[c["id"]][1] == "extra"]
    if extra:
        warnings.append(
            f"{len(extra)} COCO class(es) map by hand to a synset outside the {len(ranked)} most frequent, "
            f"kept as extra classes with their boxes and masks: {', '.join(extra)}"
        )
    if unmatched:
        warnings.append(
            f"{len(unmatched)} COCO class(es) have no Visual Genome class among the {len(ranked)} kept, "
            f"their masks are left out: {', '.join(unmatched)}"
        )
    categories, class_of_synset = _categories(coco_cats, ranked, matched, freq, names)
    stats["classes"] = len(categories)
    stats["coco_classes_matched"] = len(matched)
    stats["coco_classes_matched_by_hand"] = sum(1 for _, how in matched.values() if how in ("hand", "extra"))
    stats["coco_extra_classes"] = len(extra)
    return matched, unmatched, extra, categories, class_of_synset


def prepare_vg(cfg: VGPrepareConfig, progress: Progress = NULL_PROGRESS) -> VGPrepareResult:
    """Build the VG3k training files from raw VG and COCO files (see the module docstring).

    Raises MaskxError (naming the file and record) for unreadable or unknown-layout inputs,
    objects of images not in ``image_data.json``, COCO files whose class lists differ, and images
    missing under ``cfg.images`` (unless ``cfg.allow_missing_images``).
    """
    if cfg.num_classes < 1:
        raise MaskxError(f"num_classes must be at least 1, got {cfg.num_classes}", key="num_classes")
    out = Path(cfg.out)
    hand_map = _load_hand_map(cfg.hand_map)
    stats: Counter = Counter()
    warnings: list[str] = []

    task = progress.task("read VG image_data.json", 1)
    images, img_key = _read_image_data(Path(cfg.image_data))
    task.advance()
    task.close()
    stats["vg_images"] = len(images)
    task = progress.task("read COCO annotations", 2)  # COCO val2017's images are VG's validation set
    coco_val, val_report = load_coco(cfg.coco_val)  # a box-only COCO annotation stays box-only
    task.advance()
    coco_train, train_report = load_coco(cfg.coco_train)
    task.advance()
    task.close()
    check_same_categories(coco_val["categories"], coco_train["categories"], str(cfg.coco_val), cfg.coco_train)
    stats["coco_degenerate_boxes_skipped"] = val_report.degenerate_boxes + train_report.degenerate_boxes
    val_coco_ids = {img["id"] for img in coco_val["images"]}

    objects, freq, names, layout = _read_objects(cfg, images, stats, progress)
    coco_cats = sorted(coco_val["categories"], key=lambda c: c["id"])
    matched, unmatched, extra, categories, class_of_synset = _align_classes(cfg, freq, names, coco_cats, hand_map, stats, warnings)

    _drop_missing_images(cfg, images, stats, warnings, progress)
    split_of = {iid: ("val" if img["coco_id"] is not None and img["coco_id"] in val_coco_ids else "train") for iid, img in images.items()}
    anns = _box_annotations(objects, class_of_synset, images, split_of, stats)
    if stats["degenerate_boxes_dropped"]:
        warnings.append(f"skipped {stats['degenerate_boxes_dropped']} VG object(s) with a zero-area or out-of-image box")
    if stats["duplicate_object_ids_dropped"]:
        warnings.append(f"dropped {stats['duplicate_object_ids_dropped']} repeated VG object id(s) (first occurrence kept)")
    split_images = {"train": [], "val": []}
    for iid in sorted(images):
        split_images[split_of[iid]].append(images[iid])
    for k in ("train", "val"):
        stats[f"{k}_images"] = len(split_images[k])
        stats[f"{k}_boxes"] = len(anns[k])
    stats["images_without_boxes"] = len(images) - len({a["image_id"] for k in anns for a in anns[k]})
    vg_of_coco = {cid: class_of_synset[s] for cid, (s, _) in matched.items()}
    coco_out = _coco_masks({"train": coco_train, "val": coco_val}, vg_of_coco, categories, stats)

    task = progress.task("write", 6)
    files = {k: out / name for k, name in OUTPUT_FILES.items()}
    make_parent(files["report"])
    result = VGPrepareResult(
        out=str(out),
        layout=f"image_data: '{img_key}'; objects: '{layout.get('image', '?')}', objects by '{layout.get('object', '?')}'",
        num_classes=len(categories), coco_classes_matched=len(matched), coco_unmatched=unmatched, coco_extra=extra,
        train_images=stats["train_images"], val_images=stats["val_images"], train_boxes=stats["train_boxes"],
        val_boxes=stats["val_boxes"], coco_mask_train_annotations=stats["coco_mask_train_annotations"],
        coco_mask_val_annotations=stats["coco_mask_val_annotations"], stats=dict(stats),
        files={k: str(v) for k, v in files.items()}, warnings=warnings,
    )
    coco_name = {c["id"]: c["name"] for c in coco_cats}
    with all_or_nothing(out) as staging:  # the six files, or none of them
        staged = _write_files(staging, split_images, anns, coco_out, categories, task)
        write_json(staged["report"], {
            "inputs": {k: v for k, v in asdict(cfg).items()},
            "result": result.to_dict(),
            "coco_alignment": {coco_name[cid]: {"coco_id": cid, "synset": s, "match": how} for cid, (s, how) in sorted(matched.items())},
            "hand_map": hand_map,
        })
    task.advance()
    task.close()
    return result

"""Draw a few images of the synthetic world with their instance masks outlined.

    uv run python benchmarks/world_picture.py --out docs/images/synthetic_world.png

Top row: the images as generated. Bottom row: the same images with each annotated instance's
visible mask tinted and outlined, and its class name (look) written at its box.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from _common import add_world_options, world_options  # noqa: E402  (puts the repo on sys.path)
from pipelines.data.coco import annotation_mask
from pipelines.data.synthetic import SynthConfig, generate
from pipelines.io import read_json


def draw(world: Path, n: int, zoom: int) -> np.ndarray:
    """A uint8[2 * S * zoom, n * S * zoom, 3] panel of the first ``n`` validation images."""
    data = read_json(world / "instances_val.json")
    cats = {c["id"]: c for c in data["categories"]}
    rng = np.random.default_rng(0)
    top, bottom = [], []
    for info in data["images"][:n]:
        img = np.asarray(Image.open(world / "val" / info["file_name"]).convert("RGB"))
        big = cv2.resize(img, None, fx=zoom, fy=zoom, interpolation=cv2.INTER_NEAREST)
        over = big.copy()
        for ann in (a for a in data["annotations"] if a["image_id"] == info["id"]):
            m = annotation_mask(ann, info["height"], info["width"])
            m = cv2.resize(m, None, fx=zoom, fy=zoom, interpolation=cv2.INTER_NEAREST)
            colour = tuple(int(c) for c in rng.integers(80, 256, 3))
            over[m > 0] = (0.45 * over[m > 0] + 0.55 * np.array(colour)).astype(np.uint8)
            contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(over, contours, -1, (255, 255, 255), 1)
            x, y, w, h = (v * zoom for v in ann["bbox"])
            cv2.rectangle(over, (x, y), (x + w - 1, y + h - 1), colour, 1)
            look = cats[ann["category_id"]]["look"]
            label = f"{look['color_name'] or 'c'}/{look['texture']}"
            cv2.putText(over, label, (x + 1, max(8, y - 2)), cv2.FONT_HERSHEY_PLAIN, 0.7, (255, 255, 255), 1, cv2.LINE_AA)
        top.append(big)
        bottom.append(over)
    return np.concatenate([np.concatenate(top, 1), np.concatenate(bottom, 1)], 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/images/synthetic_world.png")
    ap.add_argument("--world", default="", help="an existing world folder (default: generate a small one)")
    ap.add_argument("--images", type=int, default=5)
    ap.add_argument("--zoom", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="world seed (when no --world is given)")
    add_world_options(ap)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = SynthConfig(train_images=1, val_images=args.images, seed=args.seed, **world_options(args))
        world = Path(args.world) if args.world else generate(cfg, Path(tmp) / "w").out_dir
        panel = draw(world, args.images, args.zoom)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    # a 256-colour palette keeps the file small (< 300 KB) with no visible loss at this zoom
    Image.fromarray(panel).quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(args.out, optimize=True)


if __name__ == "__main__":
    main()

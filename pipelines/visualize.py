"""Pictures of predictions in the paper's style: set-A classes green, set-B classes red."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

GREEN = (40, 200, 60)
RED = (230, 40, 40)


def draw_predictions(image: np.ndarray, boxes: np.ndarray, names: list[str], scores: np.ndarray, masks: np.ndarray | None,
                     in_set_a: list[bool], scale: int = 1, alpha: float = 0.45) -> Image.Image:
    """Overlay masks, boxes and ``name score`` labels on ``image``.

    ``image`` uint8 [H, W, 3]; ``boxes`` float [N, 4] (x1, y1, x2, y2); ``masks`` bool/uint8 [N, H, W]
    (or N such [H, W] masks one after another, drawn as they come) or None; ``in_set_a`` [N] picks green (set A, had masks in training) or red (set B).
    ``scale`` enlarges small images (nearest neighbour) so that text stays readable.
    """
    canvas = image.astype(np.float32).copy()
    colours = [GREEN if a else RED for a in in_set_a]
    if masks is not None:
        for m, c in zip(masks, colours):
            sel = m.astype(bool)
            canvas[sel] = (1 - alpha) * canvas[sel] + alpha * np.asarray(c, np.float32)
    out = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    if scale != 1:
        out = out.resize((out.width * scale, out.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    for box, name, score, c in zip(boxes, names, scores, colours):
        x1, y1, x2, y2 = (float(v) * scale for v in box)
        draw.rectangle([x1, y1, x2, y2], outline=c, width=max(1, scale))
        label = f"{name} {score:.2f}"
        tw = draw.textlength(label, font=font)
        ty = max(0.0, y1 - 11)
        draw.rectangle([x1, ty, x1 + tw + 2, ty + 11], fill=c)
        draw.text((x1 + 1, ty), label, fill=(255, 255, 255), font=font)
    return out


def grid(images: list[Image.Image], columns: int, titles: list[str] | None = None, pad: int = 4) -> Image.Image:
    """Tile pictures into rows of ``columns`` (optional title above each)."""
    if not images:
        raise ValueError("no images to tile")
    w = max(im.width for im in images)
    h = max(im.height for im in images)
    title_h = 14 if titles else 0
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * (w + pad) + pad, rows * (h + title_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        x, y = pad + c * (w + pad), pad + r * (h + title_h + pad)
        if titles:
            draw.text((x, y), titles[i], fill=(0, 0, 0), font=ImageFont.load_default())
        sheet.paste(im, (x, y + title_h))
    return sheet

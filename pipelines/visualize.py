"""Pictures of predictions in the paper's style: set-A classes green, set-B classes red.

:func:`draw_predictions` draws one image's detections: at most ``max_drawn`` of them (highest scores
first), a ``name score`` label for each where one fits without covering another label
(:func:`place_label`), and a legend strip below the image (:func:`add_legend`) that says what green
and red mean and how many detections were left out. :func:`grid` tiles pictures under column titles.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipelines.errors import MaskxError

GREEN = (40, 200, 60)
RED = (230, 40, 40)
LEGEND = ((GREEN, "mask-trained (set A)"), (RED, "no masks in training (set B)"))
MAX_DRAWN = 10  # detections drawn per picture by default, highest scores first
LEGEND_PAD = 4  # pixels around and between the legend's entries

Rect = tuple[int, int, int, int]  # x1, y1, x2, y2 in picture pixels (x2, y2 exclusive)


@dataclass
class Drawing:
    """One picture and what went into it.

    ``drawn``: indices into the input detections that were drawn, highest score first;
    ``left_out``: detections not drawn (beyond ``max_drawn``); ``labels``: the rectangle of each label
    drawn; ``unlabelled``: drawn detections whose label found no free place; ``legend``: the legend
    strip's rectangle, or None.
    """

    image: Image.Image
    drawn: list[int]
    left_out: int
    labels: list[Rect]
    unlabelled: int
    legend: Rect | None


@lru_cache(maxsize=1)
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def text_size(text: str) -> tuple[int, int]:
    """Width and height in pixels of ``text`` in the pictures' font (its label rectangle less padding)."""
    x1, _, x2, _ = _font().getbbox(text)
    _, _, _, y2 = _font().getbbox("Ag")
    return int(np.ceil(x2 - x1)), int(y2)


def top_detections(scores: np.ndarray, max_drawn: int | None) -> list[int]:
    """Indices of the ``max_drawn`` highest ``scores`` ``[N]`` (all for None), highest first; ties keep input order."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable").tolist()
    return order if max_drawn is None else order[:max_drawn]


def _overlaps(a: Rect, b: Rect) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def place_label(box: Rect, size: tuple[int, int], taken: list[Rect], width: int, height: int) -> Rect | None:
    """Where a label of ``size`` (w, h) goes for ``box``: the first of above the box, inside its top,
    below it, above its right end, inside its bottom (each moved into the ``width`` x ``height``
    picture) that overlaps no rectangle of ``taken``; None when all do (the label is left out)."""
    w, h = size
    x1, y1, x2, y2 = box
    for x, y in ((x1, y1 - h), (x1, y1), (x1, y2), (x2 - w, y1 - h), (x1, y2 - h)):
        x, y = min(max(0, x), max(0, width - w)), min(max(0, y), max(0, height - h))
        rect = (x, y, x + w, y + h)
        if not any(_overlaps(rect, t) for t in taken):
            return rect
    return None


def legend_entries(left_out: int = 0) -> list[tuple[tuple[int, int, int] | None, str]]:
    """The legend's entries, ``(swatch colour or None, text)``: set A, set B, and the detections left out."""
    return [*LEGEND, *([(None, f"{left_out} more detection{'s' if left_out != 1 else ''} not drawn")] if left_out else [])]


def add_legend(picture: Image.Image, left_out: int = 0) -> tuple[Image.Image, Rect]:
    """``picture`` with a white legend strip below it (:func:`legend_entries`, laid out left to right and
    wrapped); the result is as wide as the picture, or as the widest entry if that is wider. Returns
    the new picture and the strip's rectangle."""
    entries = legend_entries(left_out)
    _, th = text_size("Ag")
    sizes = [(text_size(t)[0] + (th + LEGEND_PAD if c else 0), t) for c, t in entries]
    width = max(picture.width, max(w for w, _ in sizes) + 2 * LEGEND_PAD)
    places, x, y = [], LEGEND_PAD, LEGEND_PAD
    for w, _ in sizes:
        if x > LEGEND_PAD and x + w > width - LEGEND_PAD:
            x, y = LEGEND_PAD, y + th + LEGEND_PAD
        places.append((x, y))
        x += w + 3 * LEGEND_PAD
    strip_h = y + th + LEGEND_PAD
    out = Image.new("RGB", (width, picture.height + strip_h), (255, 255, 255))
    out.paste(picture, (0, 0))
    draw = ImageDraw.Draw(out)
    for (colour, text), (x, y) in zip(entries, places):
        y += picture.height
        if colour is not None:
            draw.rectangle([x, y, x + th - 1, y + th - 1], fill=colour)
            x += th + LEGEND_PAD
        draw.text((x, y), text, fill=(0, 0, 0), font=_font())
    return out, (0, picture.height, width, out.height)


def check_picture_settings(scale: int, max_drawn: int) -> None:
    """Refuse picture settings that cannot be drawn: ``scale`` and ``max_drawn`` must be at least 1."""
    if scale < 1:
        raise MaskxError(f"scale must be >= 1 (picture enlargement), got {scale}", key="scale")
    if max_drawn < 1:
        raise MaskxError(f"max_drawn must be >= 1 (detections drawn per picture), got {max_drawn}", key="max_drawn")


def draw_predictions(image: np.ndarray, boxes: np.ndarray, names: list[str], scores: np.ndarray, masks: np.ndarray | None,
                     in_set_a: list[bool], scale: int = 1, alpha: float = 0.45, max_drawn: int | None = MAX_DRAWN,
                     legend: bool = True) -> Drawing:
    """Overlay masks, boxes and ``name score`` labels on ``image``; a legend strip below it.

    ``image`` uint8 [H, W, 3]; ``boxes`` float [N, 4] (x1, y1, x2, y2); ``scores`` [N]; ``masks``
    bool/uint8 [N, H, W], or anything that gives mask ``i`` as ``masks[i]`` (a
    :class:`~pipelines.modeling.maskx_rcnn.PastedMasks`: only the drawn ones are pasted), or None;
    ``in_set_a`` [N] picks green (set A, had masks in training) or red (set B). Only the ``max_drawn`` highest-scoring detections are drawn (None: all); a label is
    left out where it would cover another (:func:`place_label`, highest scores placed first).
    ``scale`` enlarges small images (nearest neighbour) so that text stays readable; the picture is
    ``[H * scale, W * scale]`` plus, with ``legend``, the strip of :func:`add_legend` below.
    """
    check_picture_settings(scale, 1 if max_drawn is None else max_drawn)
    drawn = top_detections(scores, max_drawn)
    canvas = image.astype(np.float32).copy()
    colours = [GREEN if a else RED for a in in_set_a]
    if masks is not None:
        for i in reversed(drawn):  # the highest score's mask on top
            sel = masks[i].astype(bool)
            canvas[sel] = (1 - alpha) * canvas[sel] + alpha * np.asarray(colours[i], np.float32)
    out = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    if scale != 1:
        out = out.resize((out.width * scale, out.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(out)
    for i in drawn:
        draw.rectangle([float(v) * scale for v in boxes[i]], outline=colours[i], width=max(1, scale))
    labels: list[Rect] = []
    for i in drawn:
        text = f"{names[i]} {float(scores[i]):.2f}"
        tw, th = text_size(text)
        rect = place_label(tuple(int(round(float(v) * scale)) for v in boxes[i]), (tw + 2, th), labels, out.width, out.height)
        if rect is not None:
            labels.append(rect)
            draw.rectangle([rect[0], rect[1], rect[2] - 1, rect[3] - 1], fill=colours[i])
            draw.text((rect[0] + 1, rect[1]), text, fill=(255, 255, 255), font=_font())
    left_out = len(scores) - len(drawn)
    strip = None
    if legend:
        out, strip = add_legend(out, left_out)
    return Drawing(out, drawn, left_out, labels, len(drawn) - len(labels), strip)


def grid(images: list[Image.Image], columns: int, column_titles: list[str] | None = None, pad: int = 4) -> Image.Image:
    """Tile pictures into rows of ``columns``, with ``column_titles`` (one per column) above the first row."""
    if not images:
        raise ValueError("no images to tile")
    w = max(im.width for im in images)
    h = max(im.height for im in images)
    title_h = text_size("Ag")[1] + pad if column_titles else 0
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * (w + pad) + pad, title_h + rows * (h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for c, title in enumerate(column_titles or []):
        draw.text((pad + c * (w + pad), pad), title, fill=(0, 0, 0), font=_font())
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        sheet.paste(im, (pad + c * (w + pad), title_h + pad + r * (h + pad)))
    return sheet

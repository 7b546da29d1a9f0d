"""The synthetic world's painting primitives: textures, blob and class-prior shapes, backgrounds, placing
an object among the others and painting it (:mod:`pipelines.data.synthetic` composes them into images).

Arrays: masks ``bool[S, S]`` (or ``bool[n, n]`` for a shape centred in its square), images
``float32[S, S, 3]`` in [0, 255] while painted.
"""

from __future__ import annotations

import colorsys

import cv2
import numpy as np

# Shape families of the class shape priors: superellipse exponent (2 = ellipse, large = rounded
# rectangle, near 1 = diamond), taper (width grows towards the bottom) and lobes (a star-like outline).
SHAPE_FAMILIES: dict[str, dict] = {
    "ellipse": {"exponent": 2.0, "taper": 0.0, "lobes": 0},
    "box": {"exponent": 6.0, "taper": 0.0, "lobes": 0},
    "diamond": {"exponent": 1.2, "taper": 0.0, "lobes": 0},
    "pear": {"exponent": 2.0, "taper": 0.4, "lobes": 0},
    "star": {"exponent": 2.0, "taper": 0.0, "lobes": 5},
}
DARKEN = 0.6  # pattern pixels get colour * (1 - DARKEN)


def texture_pattern(name: str, u: np.ndarray, v: np.ndarray, period: float, angle: float, phase: float) -> np.ndarray:
    """Pattern mask ``float32[h, w]`` in {0, 1} at object-centred coordinates ``u, v`` (pixels)."""
    if name == "solid":
        return np.zeros_like(u)
    c, s = np.cos(angle), np.sin(angle)
    ru, rv = c * u - s * v, s * u + c * v  # small per-instance rotation
    if name == "hstripes":
        return (np.mod(rv / period + phase, 1.0) < 0.5).astype(np.float32)
    if name == "vstripes":
        return (np.mod(ru / period + phase, 1.0) < 0.5).astype(np.float32)
    if name == "diagonal":
        return (np.mod((ru + rv) / (period * 1.41421356) + phase, 1.0) < 0.5).astype(np.float32)
    if name == "checker":
        p = period * 0.75
        return (np.mod(np.floor(ru / p + phase) + np.floor(rv / p + phase), 2) == 1).astype(np.float32)
    if name == "dots":
        du = np.mod(ru / period + phase, 1.0) - 0.5
        dv = np.mod(rv / period + phase, 1.0) - 0.5
        return (du * du + dv * dv < 0.09).astype(np.float32)
    if name == "rings":
        return (np.mod(np.sqrt(u * u + v * v) / period + phase, 1.0) < 0.5).astype(np.float32)
    if name == "grid":
        return ((np.mod(ru / period + phase, 1.0) < 0.3) | (np.mod(rv / period + phase, 1.0) < 0.3)).astype(np.float32)
    raise ValueError(name)


def random_blob(rng: np.random.Generator, radius: float) -> np.ndarray:
    """A random blob ``bool[n, n]`` (n = 2*ceil(1.5*radius)+1) centred in its square.

    Radius as a function of angle: ``radius * (1 + sum_k a_k cos(k theta + phi_k))`` for k = 2..4,
    on coordinates stretched by a random aspect ratio and rotated.
    """
    half = int(np.ceil(radius * 1.5))
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float32)
    rot = rng.uniform(0, np.pi)
    aspect = rng.uniform(0.6, 1.0)
    c, s = np.cos(rot), np.sin(rot)
    xr, yr = c * xx + s * yy, (-s * xx + c * yy) / aspect
    theta = np.arctan2(yr, xr)
    r = np.sqrt(xr * xr + yr * yr)
    bound = np.ones_like(theta)
    for k in (2, 3, 4):
        bound += rng.uniform(0.0, 0.45 / k) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return r <= radius * bound


def plain_background(rng: np.random.Generator, size: int, palette: np.ndarray, clutter: bool = True) -> np.ndarray:
    """Background ``float32[S, S, 3]``: dim low-saturation gradient plus thin clutter lines."""
    base = rng.uniform(45, 105) + rng.normal(0, 8, size=3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    grad = rng.normal(0, 18, size=(2, 3))
    img = base[None, None, :] + xx[..., None] * grad[0] + yy[..., None] * grad[1]
    img = np.ascontiguousarray(img, dtype=np.float32)
    for _ in range(int(rng.integers(2, 7)) if clutter else 0):  # clutter: thin lines of object colours, never annotated
        p0 = tuple(int(x) for x in rng.integers(0, size, 2))
        p1 = tuple(int(x) for x in rng.integers(0, size, 2))
        color = tuple(float(x) for x in palette[rng.integers(len(palette))] * rng.uniform(0.5, 0.9))
        cv2.line(img, p0, p1, color, thickness=1, lineType=cv2.LINE_8)
    return img


def shaped_blob(rng: np.random.Generator, radius: float, prior: dict) -> np.ndarray:
    """An instance of a class shape prior: ``bool[n, n]`` (n = 2*ceil(1.7*radius)+1) centred in its square.

    The class's family (superellipse exponent, taper, lobes) and aspect ratio (height / width;
    the longer half-axis is ``radius``), with per-instance jitter: aspect ratio and exponent
    x exp(N(0, 0.15)) and exp(N(0, 0.1)), a tilt of N(0, 0.15) rad from upright, taper and lobe
    depth x U(0.7, 1.3), a random lobe phase and a small 2nd-4th harmonic wobble.
    """
    family = SHAPE_FAMILIES[prior["family"]]
    half = int(np.ceil(radius * 1.7))
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float32)
    tilt = rng.normal(0.0, 0.15)
    aspect = prior["aspect"] * np.exp(rng.normal(0.0, 0.15))
    a, b = (radius / aspect, radius) if aspect >= 1 else (radius, radius * aspect)  # half width, half height
    c, s = np.cos(tilt), np.sin(tilt)
    u, v = (c * xx + s * yy) / a, (-s * xx + c * yy) / b  # v grows downwards
    taper = family["taper"] * rng.uniform(0.7, 1.3)
    if taper:
        u = u / (1.0 + taper * np.clip(v, -1.0, 1.0))  # narrower at the top, wider at the bottom
    n = family["exponent"] * np.exp(rng.normal(0.0, 0.1))
    r = (np.abs(u) ** n + np.abs(v) ** n) ** (1.0 / n)
    theta = np.arctan2(v, u)
    bound = np.ones_like(theta)
    if family["lobes"]:
        bound += 0.3 * rng.uniform(0.7, 1.3) * np.cos(family["lobes"] * theta + rng.uniform(0, 2 * np.pi))
    for k in (2, 3, 4):
        bound += rng.uniform(0.0, 0.12 / k) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return r <= bound


def scene_background(rng: np.random.Generator, size: int, palette: np.ndarray, clutter: bool = True) -> np.ndarray:
    """Background ``float32[S, S, 3]`` of a photo-like scene: 3-6 unannotated regions (a Voronoi
    partition), each a colour from the whole colour space (saturation 0.1-0.85, value 0.25-0.9) with
    low-frequency grain, plus the thin clutter lines of the plain background."""
    scale = size / 128.0
    k = int(rng.integers(3, 7))
    seeds = rng.uniform(0, size, (k, 2)).astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    label = np.argmin((yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2, axis=-1)
    hsv = np.stack([rng.uniform(0, 1, k), rng.uniform(0.1, 0.85, k), rng.uniform(0.25, 0.9, k)], 1)
    colours = np.array([colorsys.hsv_to_rgb(*c) for c in hsv], np.float32) * 255.0
    grain = cv2.GaussianBlur(rng.normal(0, 1, (size, size)).astype(np.float32), (0, 0), 2.0 * scale)
    grain /= max(float(grain.std()), 1e-6)
    amplitude = rng.uniform(6, 20, k).astype(np.float32)
    img = colours[label] + (grain * amplitude[label])[..., None]
    img = np.ascontiguousarray(img, dtype=np.float32)
    for _ in range(int(rng.integers(2, 7)) if clutter else 0):
        p0 = tuple(int(x) for x in rng.integers(0, size, 2))
        p1 = tuple(int(x) for x in rng.integers(0, size, 2))
        color = tuple(float(x) for x in palette[rng.integers(len(palette))] * rng.uniform(0.5, 0.9))
        cv2.line(img, p0, p1, color, thickness=1, lineType=cv2.LINE_8)
    return img


def place_object(rng: np.random.Generator, blob: np.ndarray, radius: float, size: int, centres: list[tuple[float, float, float]],
           full: list[np.ndarray], areas: list[int], min_area: int, overlap: float) -> tuple[np.ndarray, int, int, int] | None:
    """Where a new object of mask ``blob`` (bool[d, d]) goes: (mask bool[S, S], centre y, x, area), or None.

    Up to 25 tries; with probability ``overlap`` (first 20 tries) near an object already placed. A
    try is kept when the object is mostly inside the image and every earlier object (``full``: their
    visible masks, ``areas``: their full areas) keeps ``min_area`` and 35% of its pixels.
    """
    half = blob.shape[0] // 2
    for attempt in range(25):
        if centres and attempt < 20 and rng.uniform() < overlap:
            cy, cx, cr = centres[int(rng.integers(len(centres)))]
            ang = rng.uniform(0, 2 * np.pi)
            dist = rng.uniform(0.3, 1.0) * (cr + radius) * 0.8
            y, x = cy + dist * np.sin(ang), cx + dist * np.cos(ang)
        else:
            y, x = rng.uniform(radius * 0.6, size - radius * 0.6, 2)
        yi, xi = int(round(y)), int(round(x))
        m = np.zeros((size, size), bool)
        y0, y1, x0, x1 = yi - half, yi + half + 1, xi - half, xi + half + 1
        sy0, sx0 = max(0, -y0), max(0, -x0)
        sy1, sx1 = blob.shape[0] - max(0, y1 - size), blob.shape[1] - max(0, x1 - size)
        if sy1 <= sy0 or sx1 <= sx0:
            continue
        m[max(0, y0) : min(size, y1), max(0, x0) : min(size, x1)] = blob[sy0:sy1, sx0:sx1]
        area = int(m.sum())
        if area < max(min_area, 0.6 * blob.sum()):  # mostly inside the image
            continue
        ok = True
        for f, a0 in zip(full, areas):  # objects already placed lose what m covers
            vis = int((f & ~m).sum())
            if vis < min_area or vis < 0.35 * a0:
                ok = False
                break
        if ok:
            return m, yi, xi, area
    return None


def paint_object(rng: np.random.Generator, img: np.ndarray, m: np.ndarray, look: dict, yi: int, xi: int, radius: float,
           scale: float, photo: bool) -> None:
    """Paint the object of mask ``m`` (bool[S, S], centre ``yi, xi``) with its class's ``look`` into ``img`` (float32[S, S, 3])."""
    ys, xs = np.nonzero(m)
    period = max(3.0, look["period"] * scale * rng.uniform(0.85, 1.15))
    pattern = texture_pattern(
        look["texture"], (xs - xi).astype(np.float32), (ys - yi).astype(np.float32), period, rng.uniform(-0.15, 0.15), rng.uniform(0, 1)
    )
    color = np.asarray(look["color"], np.float32) * rng.uniform(0.85, 1.08) + rng.normal(0, 8, 3)
    if photo:  # shading: brightness changes linearly across the object, in a random direction
        ang, depth = rng.uniform(0, 2 * np.pi), rng.uniform(0.0, 0.25)
        shade = 1.0 + depth * ((xs - xi) * np.cos(ang) + (ys - yi) * np.sin(ang)).astype(np.float32) / radius
        paint = color[None, :] * (1.0 - DARKEN * pattern[:, None])
        cut = rng.uniform(0, 2 * np.pi)  # a part of another colour beyond a straight cut
        proj = (xs - xi) * np.cos(cut) + (ys - yi) * np.sin(cut)
        part = proj >= np.quantile(proj, 1.0 - rng.uniform(0.2, 0.4))
        dull = np.array(colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0, 0.5), rng.uniform(0.15, 0.6)), np.float32) * 255.0
        paint[part] = dull[None, :] + rng.normal(0, 6, (int(part.sum()), 3)).astype(np.float32)
        img[ys, xs] = paint * np.clip(shade, 0.5, 1.5)[:, None]
    else:
        img[ys, xs] = color[None, :] * (1.0 - DARKEN * pattern[:, None])

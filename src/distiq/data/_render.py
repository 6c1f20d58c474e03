"""Rendering of one synthetic edge scene (numpy only; used by :mod:`distiq.data.scenes`).

A scene is an ``(S, S, 3)`` uint8 RGB image of 1–6 objects on a textured or noisy background,
with its instance map. Objects are geometric shapes drawn from exact masks and real handwritten
digits (scikit-learn's ``load_digits``, 8×8, upscaled bilinearly and thresholded), each filled
with one saturated colour (jittered ±``colour_jitter`` per channel). Objects are drawn in order,
so later ones occlude earlier ones; placements are rejected until every object keeps at least
``min_visible`` of its pixels visible and no two objects of the same colour touch (they would
read as one blob). Background values stay in [20, 150] with low saturation,
while every object colour has a channel ≥ 200, so objects separate from the background by colour.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

# Saturated, well separated colours (RGB). A scene config picks a subset by name.
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 190, 50),
    "blue": (40, 80, 240),
    "yellow": (245, 220, 30),
    "purple": (160, 50, 225),
    "cyan": (30, 215, 225),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
SHAPE_PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "diamond": "diamonds",
    "cross": "crosses",
    "digit": "digits",
}
_INT8_STD = float(np.sqrt((256**2 - 1) / 12.0))  # std of a uniform integer on -128..127
DIGIT_THRESHOLD = 6.0  # on load_digits' 0..16 intensity scale, after bilinear upscaling


@dataclass(frozen=True)
class RenderedObject:
    """One drawn object. ``box`` is the tight box of its *visible* pixels, xyxy in pixel-edge
    coordinates (``x1 = last column + 1``); ``area`` is its visible pixel count."""

    category: int  # index into the scene's categories (shapes, then digits)
    colour: int  # index into the scene's colours
    box: tuple[int, int, int, int]
    area: int


@functools.lru_cache(maxsize=256)
def shape_mask(shape: str, size: int) -> np.ndarray:
    """Boolean ``(size, size)`` mask of a shape filling its box (a square is inset so that all
    shapes look about equally large)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    c = size / 2.0
    dx, dy = np.abs(xx - c), np.abs(yy - c)
    if shape == "circle":
        mask = dx**2 + dy**2 <= c**2
    elif shape == "square":
        inset = 0.08 * size
        mask = (dx <= c - inset) & (dy <= c - inset)
    elif shape == "triangle":  # apex at the top, base at the bottom row
        mask = dx <= yy / 2.0
    elif shape == "diamond":
        mask = dx + dy <= c
    elif shape == "cross":
        arm = size / 6.0
        mask = (dx <= arm) | (dy <= arm)
    else:
        raise ValueError(f"unknown shape {shape!r}; known shapes: {', '.join(SHAPES)}")
    mask.setflags(write=False)
    return mask


@functools.lru_cache(maxsize=64)
def _bilinear_matrix(src: int, dst: int) -> np.ndarray:
    """``(dst, src)`` matrix ``A`` such that ``A @ x`` resamples ``x`` bilinearly (half-pixel
    centres, edge clamped), as PIL's bilinear resize does when upscaling."""
    pos = (np.arange(dst) + 0.5) * src / dst - 0.5
    pos = np.clip(pos, 0, src - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, src - 1)
    frac = pos - lo
    matrix = np.zeros((dst, src), dtype=np.float32)
    matrix[np.arange(dst), lo] += 1 - frac
    matrix[np.arange(dst), hi] += frac
    return matrix


def digit_mask(digit_image: np.ndarray, size: int) -> np.ndarray:
    """Boolean ``(size, size)`` mask of an 8×8 ``load_digits`` image (values 0..16)."""
    a = _bilinear_matrix(digit_image.shape[0], size)
    up = a @ digit_image.astype(np.float32) @ a.T
    return up > DIGIT_THRESHOLD


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A float32 ``(size, size, 3)`` background: smooth value noise or low-contrast stripes,
    slightly tinted (pixel noise is added later, over the whole image)."""
    tint = rng.uniform(-12.0, 12.0, size=3).astype(np.float32)
    if rng.random() < 0.5:  # smooth blobs: a coarse random grid upscaled bilinearly
        grid = rng.uniform(35.0, 125.0, size=(5, 5)).astype(np.float32)
        a = _bilinear_matrix(5, size)
        value = a @ grid @ a.T
    else:  # stripes at a random angle and period
        coords = np.arange(size, dtype=np.float32)
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(5.0, 14.0) * size / 64.0
        phase = rng.uniform(0, 2 * np.pi)
        mean, amplitude = rng.uniform(55.0, 105.0), rng.uniform(8.0, 22.0)
        k = np.float32(2 * np.pi / period)
        wave = np.sin(
            (coords[None, :] * np.float32(np.cos(angle) * k))
            + (coords[:, None] * np.float32(np.sin(angle) * k))
            + np.float32(phase)
        )
        value = np.float32(mean) + np.float32(amplitude) * wave
    return value[:, :, None] + tint[None, None, :]


def _place(
    instance: np.ndarray,
    mask: np.ndarray,
    side: int,
    corners: list[list[int]],
    colour: int,
    placed: list[tuple[int, int]],
    boxes: list[tuple[int, int, int, int]],
    visible: list[int],
    full_area: list[int],
    min_visible: float,
) -> tuple[int, int] | None:
    """The first ``(y0, x0)`` of ``corners`` where ``mask`` may go, or ``None``; on success
    ``visible`` is updated for the pixels the new object will cover.

    Rules: the new box (grown by 1 px) overlaps no box of an object of the same colour, and every
    earlier object keeps ``min_visible`` of its full area."""
    for y0, x0 in corners:
        x1, y1 = x0 + side, y0 + side
        overlapping = []
        clash = False
        for index, (bx0, by0, bx1, by1) in enumerate(boxes):
            if bx0 <= x1 and x0 <= bx1 and by0 <= y1 and y0 <= by1:  # touching counts
                if placed[index][1] == colour:
                    clash = True
                    break
                overlapping.append(index)
        if clash:
            continue
        if overlapping:
            covered = instance[y0:y1, x0:x1][mask]
            covered = covered[covered >= 0]
            if covered.size:
                hits = np.bincount(covered, minlength=len(boxes)).tolist()
                after = [v - h for v, h in zip(visible, hits)]
                if any(a < min_visible * f for a, f in zip(after, full_area)):
                    continue
                visible[:] = after
        return y0, x0
    return None


def render_scene(
    rng: np.random.Generator,
    *,
    size: int,
    n_objects: int,
    categories: tuple[str, ...],
    shape_count: int,
    colours: tuple[str, ...],
    digit_bank: dict[int, np.ndarray],
    size_range: tuple[float, float],
    min_visible: float,
    noise_std: float,
    colour_jitter: float,
) -> tuple[np.ndarray, np.ndarray, list[RenderedObject]]:
    """Draw one scene.

    ``categories[:shape_count]`` are shape names, the rest digit names (``"0"``..``"9"``) whose
    8×8 images come from ``digit_bank[int(name)]`` ``(N, 8, 8)``. Returns the uint8 image
    ``(size, size, 3)``, the int16 instance map ``(size, size)`` (-1 = background, ``i`` = the
    ``i``-th returned object) and the objects (those that could not be placed are left out).
    """
    n_cat, n_col = len(categories), len(colours)
    # Few distinct colours / categories per scene, so that counts of one attribute vary widely.
    used_colours = rng.permutation(n_col)[: int(rng.integers(1, min(n_objects, n_col, 3) + 1))]
    used_cats = rng.permutation(n_cat)[: int(rng.integers(1, min(n_objects, n_cat, 3) + 1))]
    pick = rng.integers(0, 6, size=(2, n_objects)).tolist()  # 0..5 mod 1, 2 or 3 is uniform
    colour_of = [int(c) for c in used_colours] + [
        int(used_colours[k % len(used_colours)]) for k in pick[0][len(used_colours) :]
    ]
    cat_of = [int(c) for c in used_cats] + [
        int(used_cats[k % len(used_cats)]) for k in pick[1][len(used_cats) :]
    ]
    order = rng.permutation(n_objects).tolist()
    colour_of = [colour_of[i] for i in order]
    cat_of = [cat_of[i] for i in rng.permutation(n_objects).tolist()]

    image = background(rng, size)
    instance = np.full((size, size), -1, dtype=np.int16)
    full_area: list[int] = []
    visible: list[int] = []  # visible pixel count of each placed object
    placed: list[tuple[int, int]] = []  # (category, colour) of each placed object
    boxes: list[tuple[int, int, int, int]] = []  # full (drawn) box of each placed object, xyxy
    lo, hi = max(4, round(size_range[0] * size)), max(5, round(size_range[1] * size))
    for cat, col in zip(cat_of, colour_of):
        name = categories[cat]
        for _size_attempt in range(3):
            side = int(rng.integers(lo, hi + 1))
            if cat < shape_count:
                mask = shape_mask(name, side)
            else:
                bank = digit_bank[int(name)]
                mask = digit_mask(bank[int(rng.integers(len(bank)))], side)
            corners = rng.integers(0, size - side + 1, size=(16, 2)).tolist()
            position = _place(
                instance, mask, side, corners, col, placed, boxes, visible, full_area, min_visible
            )
            if position is None:
                continue
            y0, x0 = position
            instance[y0 : y0 + side, x0 : x0 + side][mask] = len(placed)
            placed.append((cat, col))
            boxes.append((x0, y0, x0 + side, y0 + side))
            area = int(mask.sum())
            full_area.append(area)
            visible.append(area)
            break

    # One jittered colour per object, then pixel noise over the whole image: uniform, from
    # random bytes (std of a uniform int8 is 73.9), several times cheaper than Gaussian noise.
    if placed:
        base = np.asarray([COLOUR_RGB[colours[col]] for _cat, col in placed], dtype=np.float32)
        jitter = rng.uniform(-colour_jitter, colour_jitter, size=base.shape).astype(np.float32)
        foreground = instance >= 0
        image[foreground] = (base + jitter)[instance[foreground]]
    noise = np.frombuffer(rng.bytes(image.size), dtype=np.int8).reshape(image.shape)
    image += noise * np.float32(noise_std / _INT8_STD)
    image_u8 = np.clip(np.rint(image), 0, 255).astype(np.uint8)

    objects: list[RenderedObject] = []
    for index, ((cat, col), (x0, y0, x1, y1)) in enumerate(zip(placed, boxes)):
        ys, xs = np.nonzero(instance[y0:y1, x0:x1] == index)  # visible pixels lie in its box
        box = (
            x0 + int(xs.min()),
            y0 + int(ys.min()),
            x0 + int(xs.max()) + 1,
            y0 + int(ys.max()) + 1,
        )
        objects.append(RenderedObject(category=cat, colour=col, box=box, area=len(xs)))
    return image_u8, instance, objects

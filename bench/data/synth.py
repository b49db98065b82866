"""The embedded dataset ``synth``: procedurally generated scenes with stuff and thing classes.

Every image is drawn from its own ``numpy`` generator seeded by (dataset seed, image index), so the
dataset is byte-identical for the same seed and ``SYNTH_VERSION`` whatever order it is made in.
It is written once, in the generic folder format (``images/ masks/ classes.txt splits/``), to a
cache folder; the harness then reads it with the same reader as any user dataset.

Scene: a sky with a wavy horizon over one or two ground regions (grass, water, road), small
clutter pebbles that belong to the stuff below them, then 0-4 things (disc, box, triangle, cross)
at random scale, rotation and colour, occluding each other, each outlined by a 1-pixel ignore band
as in VOC. Colours overlap between classes (sky vs water, grass vs things, random thing hues), so
texture, shape and context carry the signal, not colour alone.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from bench.results import remove_orphaned_tmp, tmp_owner

SYNTH_VERSION = 2
IGNORE = 255
CLASSES = ["sky", "grass", "water", "road", "disc", "box", "triangle", "cross"]
SKY, GRASS, WATER, ROAD, DISC, BOX, TRIANGLE, CROSS = range(len(CLASSES))
STUFF = (GRASS, WATER, ROAD)
THINGS = (DISC, BOX, TRIANGLE, CROSS)
THING_HUE = {DISC: 0.0, BOX: 0.15, TRIANGLE: 0.8, CROSS: 0.5}  # red, yellow, purple, cyan


def _hsv_to_rgb(h, s, v):
    """Vectorised HSV -> RGB on arrays in [0, 1]."""
    i = np.floor(h * 6.0).astype(int) % 6
    f = h * 6.0 - np.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    rgb = np.zeros(np.broadcast(h, s, v).shape + (3,))
    for k, (r, g, b) in enumerate(choices):
        sel = i == k
        rgb[..., 0] = np.where(sel, r, rgb[..., 0])
        rgb[..., 1] = np.where(sel, g, rgb[..., 1])
        rgb[..., 2] = np.where(sel, b, rgb[..., 2])
    return rgb


def _colour(rng, hue, sat, val):
    """A jittered RGB colour: each argument is a (low, high) range."""
    return _hsv_to_rgb(np.array(rng.uniform(*hue) % 1.0), np.array(rng.uniform(*sat)), np.array(rng.uniform(*val)))


def _smooth_noise(rng, size, cells):
    """Low-frequency noise in about [-1, 1]: a coarse random grid, bilinearly upsampled."""
    coarse = rng.normal(0, 1, (cells + 1, cells + 1))
    t = np.linspace(0, cells, size)
    i = np.minimum(t.astype(int), cells - 1)
    f = t - i
    rows = coarse[i] * (1 - f)[:, None] + coarse[i + 1] * f[:, None]
    return (rows[:, i] * (1 - f) + rows[:, i + 1] * f) / 1.5


def _stuff_texture(rng, cls, yy, xx, size):
    """Full-image texture for one stuff class in one of three styles, values in [0, 1], [H, W, 3].

    Styles differ a lot within a class (blue, overcast or sunset sky; green, dry or flowered grass;
    rippled, calm or murky water; asphalt, cobbles or dirt road) and resemble other classes
    (overcast sky vs asphalt, sunset sky vs dry grass, calm water vs sky): few labeled images
    cover few of these combinations.
    """
    style = rng.integers(3)
    noise = rng.normal(0, 1, (size, size))[..., None]
    t = (yy / size)[..., None]
    if cls == SKY:
        if style == 0:
            top = _colour(rng, (0.55, 0.66), (0.4, 0.8), (0.6, 1.0))
            bottom = _colour(rng, (0.52, 0.62), (0.1, 0.4), (0.8, 1.0))
        elif style == 1:
            top = _colour(rng, (0, 1), (0.0, 0.08), (0.45, 0.75))
            bottom = _colour(rng, (0, 1), (0.0, 0.08), (0.55, 0.85))
        else:
            top = _colour(rng, (0.7, 0.85), (0.3, 0.6), (0.35, 0.7))
            bottom = _colour(rng, (0.02, 0.12), (0.5, 0.9), (0.8, 1.0))
        clouds = _smooth_noise(rng, size, 4)[..., None] * (0.12 if style == 1 else 0.04)
        return top * (1 - t) + bottom * t + clouds + 0.01 * noise
    if cls == GRASS:
        base = _colour(rng, [(0.22, 0.38), (0.1, 0.16), (0.25, 0.4)][style], (0.4, 0.9), (0.3, 0.75))
        blades = np.sin(xx * rng.uniform(1.5, 2.5) + 0.6 * np.sin(yy * rng.uniform(0.5, 1.2))) * 0.5 + 0.5
        img = base * (0.65 + 0.35 * blades[..., None]) + 0.07 * noise
        if style == 2:  # flowers
            img[rng.random((size, size)) < 0.03] = _colour(rng, (0, 1), (0.2, 0.8), (0.8, 1.0))
        return img
    if cls == WATER:
        base = _colour(rng, [(0.52, 0.64), (0.55, 0.7), (0.3, 0.45)][style], (0.3, 0.9), (0.25, 0.75))
        if style == 1:  # calm: a vertical gradient with long horizontal reflection streaks
            streaks = (np.sin(yy * rng.uniform(0.3, 0.6) + 2 * _smooth_noise(rng, size, 3)) > 0.9)[..., None]
            return base * (0.8 + 0.3 * t) + 0.2 * streaks + 0.01 * noise
        ripples = np.sin(yy * rng.uniform(0.5, 0.9) + 1.5 * np.sin(xx * rng.uniform(0.08, 0.2) + rng.uniform(0, 6.3)))
        ripples = (ripples * 0.5 + 0.5)[..., None]
        return base * (0.7 + 0.3 * ripples) + 0.25 * (ripples > 0.97) + 0.02 * noise
    if style == 0:  # asphalt with a dashed lane marking along a random slope
        img = _colour(rng, (0.0, 1.0), (0.0, 0.12), (0.25, 0.6)) + 0.09 * noise
        cx, slope = rng.uniform(0.3, 0.7) * size, rng.uniform(-0.6, 0.6)
        lane = (np.abs(xx - (cx + slope * (yy - size))) < 1.2) & ((yy // 6) % 2 == 0)
        img[lane] = 0.9
        return img
    if style == 1:  # cobblestones: offset bricks with dark mortar, each stone a little different
        h = int(rng.integers(4, 7))
        row = yy // h
        shifted = xx + (row % 2) * h
        mortar = ((yy % h) == 0) | ((shifted % (2 * h)) == 0)
        shade = 0.85 + 0.15 * np.sin(row * 7.1 + (shifted // (2 * h)) * 3.3)
        stone = _colour(rng, (0.0, 0.12), (0.1, 0.4), (0.35, 0.7)) * shade[..., None]
        return np.where(mortar[..., None], 0.2, stone) + 0.03 * noise
    dirt = _colour(rng, (0.05, 0.11), (0.3, 0.6), (0.3, 0.6))  # dirt track
    return dirt * (1 + 0.15 * _smooth_noise(rng, size, 6))[..., None] + 0.06 * noise


def _thing_mask(rng, cls, yy, xx, cx, cy, r):
    """Boolean mask of one thing of radius ``r`` centred at (cx, cy), randomly rotated."""
    theta = rng.uniform(0, np.pi)
    u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
    v = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
    if cls == DISC:
        return u**2 + (v / rng.uniform(0.8, 1.0)) ** 2 < r**2
    if cls == BOX:
        return (np.abs(u) < r * 0.8) & (np.abs(v) < r * 0.8)
    if cls == TRIANGLE:
        return (v > -0.5 * r) & (np.abs(u) < (r - v) / np.sqrt(3))
    arm = r / 3.0  # cross
    return ((np.abs(u) < r) & (np.abs(v) < arm)) | ((np.abs(u) < arm) & (np.abs(v) < r))


def _thing_texture(rng, cls, yy, xx, cx, cy, r):
    """One of two textures per thing class. Each class has a typical hue (as real objects do), but
    one thing in three takes any hue, so colour is a cue, never the answer."""
    hue = (0.0, 1.0) if rng.random() < 1 / 3 else (THING_HUE[cls] - 0.07, THING_HUE[cls] + 0.07)
    col = _colour(rng, hue, (0.3, 1.0), (0.35, 1.0))
    other = _colour(rng, (0.0, 1.0), (0.0, 1.0), (0.1, 1.0))
    style = rng.integers(2)
    d = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
    if cls == DISC:
        if style == 0:  # shaded like a sphere
            d = np.sqrt((xx - cx + 0.3 * r) ** 2 + (yy - cy + 0.3 * r) ** 2) / (1.6 * r)
            return col * np.clip(1.1 - d, 0.3, 1.0)[..., None]
        return np.where(((d // max(2.0, r / 4)) % 2 == 0)[..., None], col, other)  # target rings
    if cls == BOX:
        if style == 0:  # checkerboard
            period = max(2, int(r / 2))
            check = ((xx // period + yy // period) % 2)[..., None]
            return col * check + other * (1 - check)
        return np.broadcast_to(col, xx.shape + (3,)).copy()  # plain: told apart by shape only
    if cls == TRIANGLE:
        if style == 0:  # diagonal stripes
            stripes = (((xx + yy) // 3) % 2)[..., None]
            return col * stripes + col * 0.45 * (1 - stripes)
        return col * np.clip(0.5 + (yy - cy) / (2 * r), 0.3, 1.0)[..., None]  # vertical gradient
    if style == 0:  # cross: dotted
        dots = ((xx % 4 < 2) & (yy % 4 < 2))[..., None]
        return np.where(dots, other, col)
    return col * np.clip(1.2 - d / (1.5 * r), 0.4, 1.0)[..., None]  # cross: glowing centre


def make_image(seed: int, index: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic (image uint8 [H, W, 3], mask uint8 [H, W]) pair."""
    rng = np.random.default_rng([seed, index, SYNTH_VERSION])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    label = np.empty((size, size), np.uint8)
    image = np.empty((size, size, 3))

    horizon = size * rng.uniform(0.2, 0.55) + size * rng.uniform(0, 0.08) * np.sin(
        xx * rng.uniform(0.03, 0.12) + rng.uniform(0, 6.3))
    ground = rng.choice(STUFF, size=rng.integers(1, 3), replace=False)
    label[:] = ground[0]
    if len(ground) == 2:  # a wavy, slanted border between two ground regions
        border = size * rng.uniform(0.25, 0.75) + rng.uniform(-0.8, 0.8) * (yy - size / 2) + 4 * np.sin(yy * 0.15)
        label[xx > border] = ground[1]
    label[yy < horizon] = SKY
    for cls in (SKY, *ground):
        sel = label == cls
        image[sel] = _stuff_texture(rng, cls, yy, xx, size)[sel]

    # clutter pebbles: part of the stuff they lie on, there to be ignored by a good model
    for _ in range(rng.integers(0, 6)):
        cx, cy, r = rng.uniform(0, size), rng.uniform(size * 0.3, size), rng.uniform(1, 3)
        pebble = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
        image[pebble] = _colour(rng, (0, 1), (0, 0.6), (0.2, 0.9))

    n_things = rng.choice([0, 1, 2, 3, 4], p=[0.1, 0.3, 0.3, 0.2, 0.1])
    for _ in range(n_things):
        cls = rng.choice(THINGS)
        r = size * rng.uniform(0.08, 0.25)
        cx, cy = rng.uniform(0.1, 0.9) * size, rng.uniform(0.15, 0.95) * size
        shape = _thing_mask(rng, cls, yy, xx, cx, cy, r)
        if shape.sum() < 6:
            continue
        image[shape] = _thing_texture(rng, cls, yy, xx, cx, cy, r)[shape]
        # VOC-style ignore band on the outline; later things overwrite it where they occlude
        grown = shape.copy()
        grown[1:] |= shape[:-1]
        grown[:-1] |= shape[1:]
        grown[:, 1:] |= shape[:, :-1]
        grown[:, :-1] |= shape[:, 1:]
        label[grown] = IGNORE
        label[shape] = cls

    # global photometric jitter and sensor noise
    image = image * rng.uniform(0.75, 1.2) + rng.uniform(-0.08, 0.08)
    image = image + rng.normal(0, rng.uniform(0.01, 0.05), image.shape)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8), label


def synth_folder_name(seed: int, num_train: int, num_val: int, size: int) -> str:
    return f"synth-v{SYNTH_VERSION}-seed{seed}-train{num_train}-val{num_val}-{size}px"


def generate(root: Path, seed: int, num_train: int, num_val: int, size: int, progress: bool = True) -> Path:
    """Write the dataset to ``root`` (atomically: a temp folder renamed into place) unless present."""
    root = Path(root)
    if (root / "manifest.sha256").exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    remove_orphaned_tmp(root.parent)  # what a generator killed mid-way left
    tmp = Path(tempfile.mkdtemp(prefix=f"{root.name}.{tmp_owner()}.", suffix=".tmp", dir=root.parent))
    try:
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        (tmp / "splits").mkdir()
        ids = [f"{i:05d}" for i in range(num_train + num_val)]
        iterator = range(len(ids))
        if progress:
            from tqdm import tqdm

            iterator = tqdm(iterator, desc=f"generating synth ({len(ids)} images)", leave=False)
        lines = []
        for i in iterator:
            img, mask = make_image(seed, i, size)
            for sub, arr in (("images", img), ("masks", mask)):
                path = tmp / sub / f"{ids[i]}.png"
                Image.fromarray(arr).save(path, optimize=False, compress_level=6)
                lines.append(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {sub}/{ids[i]}.png")
        (tmp / "splits" / "train.txt").write_text("\n".join(ids[:num_train]) + "\n")
        (tmp / "splits" / "val.txt").write_text("\n".join(ids[num_train:]) + "\n")
        (tmp / "classes.txt").write_text(
            "".join(f"{i} {n}\n" for i, n in enumerate(CLASSES)) + f"{IGNORE} ignore\n")
        (tmp / "manifest.sha256").write_text("\n".join(lines) + "\n")
        try:
            os.replace(tmp, root)
        except OSError:  # another process finished first: keep theirs
            if not (root / "manifest.sha256").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root

"""Synthetic shapes detection dataset in the YOLO layout, so detection runs fully offline.

Images hold 1-4 filled shapes (circle, square, triangle, cross) on noisy backgrounds. The
cross is rare (about 5% of objects) so that class weighting has something to fix. Every
image is drawn from its own seeded generator: the same seed gives byte-identical files.
"""
from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from trainers.utils import LOGGER, UserError

NAMES = ("circle", "square", "triangle", "cross")
CLASS_PROB = (0.32, 0.32, 0.31, 0.05)  # cross is the rare class
SUPERSAMPLE = 4  # shapes are drawn 4x larger and downsampled: smooth, realistic edges
MIN_SIZE, MAX_SIZE = 14 / 96, 40 / 96  # object extent as a fraction of the image side
SHAPES8_COMMENT = (
    "# shapes8: synthetic detection dataset (circles, squares, triangles, rare crosses on\n"
    "# noisy backgrounds) written by trainers.data.shapes.generate_shapes; deterministic by seed.\n"
)


def generate_shapes(out, n_train: int = 480, n_val: int = 120, imgsz: int = 96, seed: int = 0,
                    overwrite: bool = False) -> Path:
    """Write the dataset to ``out`` and return the path of its ``data.yaml``.

    Files are written to a temporary sibling folder and renamed into place, so concurrent
    callers (several workers on one node) never see a half-written dataset.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"dataset folder {out} already exists and is not empty (pass overwrite=True)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for split, n, split_id in (("train", n_train, 0), ("val", n_val, 1)):
            _write_split(tmp, split, n, imgsz, seed, split_id)
        _write_yaml(tmp / "data.yaml", n_train, n_val, imgsz, seed)
        _move_into_place(tmp, out, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out / "data.yaml"


def ensure_shapes8(root="datasets/shapes8", **kwargs) -> Path:
    """The built-in ``shapes8.yaml`` dataset: generated under ``root`` on first use.

    Safe when several processes call it at once; ``kwargs`` go to ``generate_shapes``.
    """
    yaml_path = Path(root) / "data.yaml"
    if yaml_path.is_file():
        return yaml_path
    LOGGER.info(f"Generating the shapes8 dataset in {root} ...")
    try:
        return generate_shapes(root, **kwargs)
    except UserError:
        if yaml_path.is_file():  # another process finished first
            return yaml_path
        raise


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished folder to ``out``; losing a race to an identical writer is fine."""
    if out.exists() and (overwrite or not any(out.iterdir())):
        shutil.rmtree(out)
    try:
        os.rename(tmp, out)
    except OSError:
        if not (out / "data.yaml").is_file():
            raise


def _write_yaml(path: Path, n_train: int, n_val: int, imgsz: int, seed: int) -> None:
    names = "\n".join(f"  {i}: {n}" for i, n in enumerate(NAMES))
    path.write_text(
        SHAPES8_COMMENT
        + f"# generate_shapes(n_train={n_train}, n_val={n_val}, imgsz={imgsz}, seed={seed})\n"
        + "path: .  # dataset root, relative to this file\n"
        + "train: images/train\nval: images/val\n"
        + f"nc: {len(NAMES)}\nnames:\n{names}\n"
    )


def _write_split(root: Path, split: str, n: int, imgsz: int, seed: int, split_id: int) -> None:
    img_dir, lbl_dir = root / "images" / split, root / "labels" / split
    img_dir.mkdir(parents=True)
    lbl_dir.mkdir(parents=True)
    for i in range(n):
        rng = np.random.default_rng([seed, split_id, i])
        image, labels = render_image(rng, imgsz)
        Image.fromarray(image).save(img_dir / f"{i:05d}.png", optimize=False)
        lines = [f"{c} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}" for c, cx, cy, w, h in labels]
        (lbl_dir / f"{i:05d}.txt").write_text("".join(line + "\n" for line in lines))


def render_image(rng: np.random.Generator, imgsz: int) -> tuple[np.ndarray, list[tuple]]:
    """One ``(H, W, 3)`` uint8 image and its labels ``(cls, cx, cy, w, h)`` normalized."""
    canvas = _background(rng, imgsz)
    placed: list[np.ndarray] = []
    labels = []
    for _ in range(int(rng.integers(1, 5))):
        cls = int(rng.choice(len(NAMES), p=CLASS_PROB))
        alpha = _place_shape(rng, cls, imgsz, placed)
        if alpha is None:
            continue
        box = _tight_box(alpha)
        placed.append(box)
        colour = _object_colour(rng, canvas, alpha)
        canvas = canvas * (1 - alpha[..., None]) + colour * alpha[..., None]
        x1, y1, x2, y2 = box / imgsz
        labels.append((cls, (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1))
    canvas += rng.normal(0, rng.uniform(3, 12), canvas.shape)  # sensor noise over everything
    return np.clip(canvas, 0, 255).round().astype(np.uint8), labels


def _background(rng: np.random.Generator, imgsz: int) -> np.ndarray:
    """A colour gradient plus a few faint lines: clutter that is not an object."""
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:imgsz, 0:imgsz] / imgsz
    t = np.clip(0.5 + (xx - 0.5) * math.cos(angle) + (yy - 0.5) * math.sin(angle), 0, 1)
    bg = c0 * (1 - t[..., None]) + c1 * t[..., None]
    im = Image.fromarray(bg.astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(0, 4))):
        pts = [tuple(int(v) for v in rng.integers(0, imgsz, 2)) for _ in range(2)]
        shade = tuple(int(v) for v in np.clip(bg.mean((0, 1)) + rng.uniform(-40, 40, 3), 0, 255))
        draw.line(pts, fill=shade, width=int(rng.integers(1, 3)))
    return np.asarray(im, dtype=np.float64)


def _place_shape(rng, cls: int, imgsz: int, placed: list[np.ndarray]):
    """Alpha mask of a shape whose box overlaps earlier ones only partly; None if no room."""
    for _ in range(20):
        size = rng.uniform(MIN_SIZE, MAX_SIZE) * imgsz
        aspect = rng.uniform(0.8, 1.25)
        w, h = size * math.sqrt(aspect), size / math.sqrt(aspect)
        cx, cy = rng.uniform(w / 2, imgsz - w / 2), rng.uniform(h / 2, imgsz - h / 2)
        alpha = _shape_alpha(rng, cls, imgsz, cx, cy, w, h)
        if alpha.max() < 0.5:
            continue
        if all(_overlap_ok(_tight_box(alpha), other) for other in placed):
            return alpha
    return None


def _overlap_ok(a: np.ndarray, b: np.ndarray) -> bool:
    """Allow overlaps but keep most of each object visible (at most 35% of either box)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return inter <= 0.35 * min(area(a), area(b))


def _shape_alpha(rng, cls: int, imgsz: int, cx: float, cy: float, w: float, h: float) -> np.ndarray:
    """Draw the shape at SUPERSAMPLE resolution and downsample to a soft ``(H, W)`` mask."""
    s = SUPERSAMPLE
    mask = Image.new("L", (imgsz * s, imgsz * s), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy, w, h = cx * s, cy * s, w * s, h * s
    if NAMES[cls] == "circle":
        draw.ellipse([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], fill=255)
    else:
        draw.polygon(_polygon(rng, NAMES[cls], cx, cy, w, h), fill=255)
    small = mask.resize((imgsz, imgsz), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float64) / 255.0


def _polygon(rng, name: str, cx: float, cy: float, w: float, h: float) -> list[tuple]:
    """Vertices of a square, triangle or plus-shaped cross, slightly rotated."""
    if name == "square":
        pts = [(-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5)]
        angle = rng.uniform(-15, 15)
    elif name == "triangle":
        pts = [(0.0, -0.5), (0.5, 0.5), (-0.5, 0.5)]
        angle = rng.uniform(-25, 25)
    else:  # cross: a plus sign with arms one third of the extent wide
        a = 1 / 6
        pts = [(-a, -0.5), (a, -0.5), (a, -a), (0.5, -a), (0.5, a), (a, a), (a, 0.5), (-a, 0.5),
               (-a, a), (-0.5, a), (-0.5, -a), (-a, -a)]
        angle = rng.uniform(-15, 15)
    cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(cx + x * w * cos - y * h * sin, cy + x * w * sin + y * h * cos) for x, y in pts]


def _tight_box(alpha: np.ndarray) -> np.ndarray:
    """Pixel box ``x1 y1 x2 y2`` around the mask's mostly-covered pixels."""
    ys, xs = np.nonzero(alpha >= 0.5)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)


def _object_colour(rng, canvas: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """A saturated colour that differs clearly from the background under the shape."""
    under = (canvas * alpha[..., None]).sum((0, 1)) / max(alpha.sum(), 1e-6)
    best, best_gap = None, -1.0
    for _ in range(8):
        colour = rng.uniform(0, 255, 3)
        colour[rng.integers(0, 3)] = rng.choice([rng.uniform(0, 60), rng.uniform(195, 255)])
        gap = float(np.abs(colour - under).sum())
        if gap > best_gap:
            best, best_gap = colour, gap
        if gap >= 180:
            break
    return best


def main(argv: list[str] | None = None) -> int:
    """``python -m trainers.data.shapes OUT [--seed N]``: write a shapes dataset."""
    import argparse

    parser = argparse.ArgumentParser(description="Write the synthetic shapes detection dataset")
    parser.add_argument("out")
    parser.add_argument("--n-train", type=int, default=480)
    parser.add_argument("--n-val", type=int, default=120)
    parser.add_argument("--imgsz", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    a = parser.parse_args(argv)
    try:
        print(generate_shapes(a.out, a.n_train, a.n_val, a.imgsz, a.seed, a.overwrite))
    except UserError as e:
        print(e, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

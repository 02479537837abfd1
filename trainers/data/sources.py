"""Prediction sources -> batches of ``(paths, images, videos, info)`` with HWC uint8 images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from trainers.utils import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def read_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))  # writable: torch.from_numpy warns on a read-only array
    except (OSError, UnidentifiedImageError) as exc:
        raise UserError(f"image {path} could not be read: {exc}") from None


def _items(source):
    """Yield (name, loader) pairs; images are read lazily so streams stay lazy."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise UserError(f"source folder {path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            for f in files:
                yield str(f), (lambda f=f: read_image(f))
        elif path.is_file():
            yield str(path), (lambda: read_image(path))
        else:
            raise UserError(f"source {source} does not exist" + unsupported_form(str(source)))
    elif torch.is_tensor(source):
        batch = source if source.ndim == 4 else source[None]
        for i, im in enumerate(batch):
            arr = im.detach().float().cpu()
            arr = (arr * 255 if arr.max() <= 1.0 else arr).clamp(0, 255).byte().permute(1, 2, 0).numpy()
            yield f"tensor{i}", (lambda a=arr: a)
    elif isinstance(source, np.ndarray):
        yield "array0", (lambda: source)
    elif isinstance(source, (list, tuple)):
        for i, item in enumerate(source):
            if isinstance(item, np.ndarray):
                yield f"array{i}", (lambda a=item: a)
            else:
                yield from _items(item)
    elif hasattr(source, "convert"):  # a PIL image
        yield "image0", (lambda: np.asarray(source.convert("RGB")))
    elif source is None:
        raise UserError("config key 'source' is required for predict: give an image path, a folder, numpy arrays "
                        "or a tensor batch")
    else:
        raise UserError(f"unsupported predict source of type {type(source).__name__}: "
                        f"give an image path, a folder, numpy arrays or a tensor batch")


def check_source(source) -> None:
    """Fail on a source that names nothing before a model is loaded for it (its first item only:
    a folder is listed, no image read)."""
    next(_items(source), None)


def unsupported_form(source: str) -> str:
    """Why a source that names no file may be meant as something predict does not read."""
    if "://" in source:
        return " (URLs are not read: download the image first)"
    if any(c in source for c in "*?["):
        return " (glob patterns are not expanded: give the folder)"
    return ""


def iter_batches(source, batch: int):
    """Batches of at most ``batch`` images as the 4-tuple ``predictor.batch`` (SPEC §3)."""
    paths, images = [], []
    for name, load in _items(source):
        paths.append(name)
        images.append(load())
        if len(images) == batch:
            yield paths, images, None, [""] * len(paths)
            paths, images = [], []
    if images:
        yield paths, images, None, [""] * len(paths)

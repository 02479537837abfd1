"""Image + box transforms for detection: letterbox, its inverse, and light augmentation.

Boxes here are ``(n, 4)`` float arrays of ``x1 y1 x2 y2`` pixels. Images are ``(H, W, 3)``
uint8 RGB arrays. Each transform returns the image and boxes it moved together.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

PAD_VALUE = 114
DEFAULT_HYP = {"fliplr": 0.5, "scale": 0.5, "translate": 0.1,
               "hsv_h": 0.015, "hsv_s": 0.7, "hsv_v": 0.4}


def letterbox(img: np.ndarray, size: int, pad_value: int = PAD_VALUE):
    """Resize the long side to ``size`` and pad to a centred square.

    Returns ``(image, (gain_x, gain_y), (pad_x, pad_y))``: a point ``(x, y)`` of the input
    lands at ``(x * gain_x + pad_x, y * gain_y + pad_y)``.
    """
    h, w = img.shape[:2]
    r = size / max(h, w)
    nw, nh = max(1, round(w * r)), max(1, round(h * r))
    if (nw, nh) != (w, h):
        img = np.asarray(Image.fromarray(img).resize((nw, nh), Image.Resampling.BILINEAR))
    px, py = (size - nw) // 2, (size - nh) // 2
    out = np.full((size, size, 3), pad_value, dtype=np.uint8)
    out[py:py + nh, px:px + nw] = img
    return out, (nw / w, nh / h), (float(px), float(py))


def apply_letterbox(boxes: np.ndarray, gain, pad) -> np.ndarray:
    """Move pixel boxes of the original image into the letterboxed image."""
    scale = np.array([gain[0], gain[1], gain[0], gain[1]])
    shift = np.array([pad[0], pad[1], pad[0], pad[1]])
    return boxes * scale + shift


def unletterbox_boxes(boxes: torch.Tensor, ratio_pad, ori_shape) -> torch.Tensor:
    """Map xyxy boxes of the letterboxed image back to original pixels (clipped).

    ``ratio_pad`` is the dataset's ``((gain_x, gain_y), (pad_x, pad_y))``; ``ori_shape`` is ``(h, w)``.
    """
    (gx, gy), (px, py) = ratio_pad
    out = boxes.clone()
    out[..., [0, 2]] = ((out[..., [0, 2]] - px) / gx).clamp(0, ori_shape[1])
    out[..., [1, 3]] = ((out[..., [1, 3]] - py) / gy).clamp(0, ori_shape[0])
    return out


def hyp_value(hyp, key: str):
    """Read an augmentation setting from a dict or an args-like object, else the default."""
    if isinstance(hyp, dict):
        value = hyp.get(key)
    else:
        value = getattr(hyp, key, None)
    return DEFAULT_HYP[key] if value is None else float(value)


def augment(img: np.ndarray, boxes: np.ndarray, hyp, rng: np.random.Generator):
    """Random scale/translate, horizontal flip and HSV jitter.

    Returns ``(image, boxes, keep)``; ``keep`` marks which input boxes survive the crop.
    """
    img, boxes, keep = random_affine(img, boxes, hyp_value(hyp, "scale"),
                                     hyp_value(hyp, "translate"), rng)
    if rng.random() < hyp_value(hyp, "fliplr"):
        img, boxes = hflip(img, boxes)
    img = hsv_jitter(img, hyp_value(hyp, "hsv_h"), hyp_value(hyp, "hsv_s"),
                     hyp_value(hyp, "hsv_v"), rng)
    return img, boxes, keep


def hflip(img: np.ndarray, boxes: np.ndarray):
    """Mirror left-right."""
    w = img.shape[1]
    flipped = boxes.copy()
    flipped[:, 0], flipped[:, 2] = w - boxes[:, 2], w - boxes[:, 0]
    return np.ascontiguousarray(img[:, ::-1]), flipped


def random_affine(img: np.ndarray, boxes: np.ndarray, scale: float, translate: float,
                  rng: np.random.Generator, min_visible: float = 0.3):
    """Zoom about the centre by ``1 +- scale`` and shift by ``+- translate`` of the side.

    The canvas keeps its size; boxes are clipped, and dropped when less than
    ``min_visible`` of them (or under 2 px) remains in view.
    """
    h, w = img.shape[:2]
    s = rng.uniform(1 - scale, 1 + scale)
    tx, ty = rng.uniform(-translate, translate) * w, rng.uniform(-translate, translate) * h
    if s == 1 and tx == 0 and ty == 0:
        return img, boxes, np.ones(len(boxes), dtype=bool)
    cx, cy = w / 2 + tx, h / 2 + ty
    # PIL maps output -> input: x_in = (x_out - cx) / s + w / 2
    coeffs = (1 / s, 0, w / 2 - cx / s, 0, 1 / s, h / 2 - cy / s)
    out = Image.fromarray(img).transform((w, h), Image.Transform.AFFINE, coeffs,
                                         Image.Resampling.BILINEAR, fillcolor=(PAD_VALUE,) * 3)
    moved = boxes.copy()
    moved[:, [0, 2]] = (boxes[:, [0, 2]] - w / 2) * s + cx
    moved[:, [1, 3]] = (boxes[:, [1, 3]] - h / 2) * s + cy
    clipped = moved.copy()
    clipped[:, [0, 2]] = clipped[:, [0, 2]].clip(0, w)
    clipped[:, [1, 3]] = clipped[:, [1, 3]].clip(0, h)
    keep = _visible(moved, clipped, min_visible)
    return np.asarray(out), clipped[keep], keep


def _visible(moved: np.ndarray, clipped: np.ndarray, min_visible: float) -> np.ndarray:
    area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # noqa: E731
    big_enough = ((clipped[:, 2] - clipped[:, 0]) > 2) & ((clipped[:, 3] - clipped[:, 1]) > 2)
    return big_enough & (area(clipped) >= min_visible * np.maximum(area(moved), 1e-9))


def hsv_jitter(img: np.ndarray, hgain: float, sgain: float, vgain: float,
               rng: np.random.Generator) -> np.ndarray:
    """Shift hue and scale saturation and value by random gains."""
    if not (hgain or sgain or vgain):
        return img
    hsv = np.asarray(Image.fromarray(img).convert("HSV"), dtype=np.float32)
    hsv[..., 0] = (hsv[..., 0] + rng.uniform(-hgain, hgain) * 256) % 256
    hsv[..., 1] *= rng.uniform(1 - sgain, 1 + sgain)
    hsv[..., 2] *= rng.uniform(1 - vgain, 1 + vgain)
    hsv = hsv.clip(0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))

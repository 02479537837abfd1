"""Prediction results: boxes or class probabilities for one image, with a ``plot()``."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class Boxes:
    """Detections of one image: ``xyxy`` (pixels of the original image), ``conf``, ``cls``."""

    def __init__(self, data: torch.Tensor):
        self.data = data

    xyxy = property(lambda self: self.data[:, :4])
    conf = property(lambda self: self.data[:, 4])
    cls = property(lambda self: self.data[:, 5])

    def __len__(self):
        return len(self.data)


class Probs:
    def __init__(self, data: torch.Tensor):
        self.data = data

    top1 = property(lambda self: int(self.data.argmax()))
    top1conf = property(lambda self: float(self.data.max()))
    top5 = property(lambda self: self.data.topk(min(5, len(self.data))).indices.tolist())


class Results:
    def __init__(self, orig_img: np.ndarray, path: str, names: dict, boxes=None, probs=None):
        self.orig_img, self.path, self.names = orig_img, path, names
        self.boxes = Boxes(boxes) if boxes is not None else None
        self.probs = Probs(probs) if probs is not None else None

    def __len__(self):
        return len(self.boxes) if self.boxes is not None else 1

    def verbose(self) -> str:
        """One line of what was found, as Ultralytics prints it per image: ``2 circles, 1 square``
        (``(no detections)``), or the top-5 classes with their probabilities."""
        if self.probs is not None:
            return ", ".join(f"{self._name(j)} {float(self.probs.data[j]):.2f}" for j in self.probs.top5)
        classes, counts = np.unique(self.boxes.cls.cpu().numpy().astype(int), return_counts=True)
        found = [f"{n} {self._name(c)}{'s' if n > 1 else ''}" for c, n in zip(classes, counts)]
        return ", ".join(found) or "(no detections)"

    def _name(self, index: int) -> str:
        return str(self.names.get(int(index), int(index)))

    def plot(self) -> np.ndarray:
        """The original image (HWC uint8) with boxes and labels drawn, or the top-1 class."""
        from PIL import Image, ImageDraw

        img = self.orig_img
        if img.ndim == 2:
            img = np.stack([img] * 3, -1)
        im = Image.fromarray(np.ascontiguousarray(img.astype(np.uint8)))
        draw = ImageDraw.Draw(im)
        if self.boxes is not None:
            for (x1, y1, x2, y2), conf, cls in zip(self.boxes.xyxy.tolist(), self.boxes.conf.tolist(),
                                                   self.boxes.cls.tolist()):
                color = _color(int(cls))
                draw.rectangle([x1, y1, x2, y2], outline=color, width=2)
                draw.text((x1 + 2, max(y1 - 10, 0)), f"{self.names.get(int(cls), int(cls))} {conf:.2f}", fill=color)
        if self.probs is not None:
            draw.text((2, 2), f"{self.names.get(self.probs.top1, self.probs.top1)} {self.probs.top1conf:.2f}",
                      fill=(255, 0, 0))
        return np.asarray(im)

    def save(self, path) -> str:
        from PIL import Image

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(self.plot()).save(path)
        return str(path)


def _color(i: int) -> tuple[int, int, int]:
    palette = [(255, 56, 56), (72, 249, 10), (0, 194, 255), (255, 157, 151), (146, 204, 23), (132, 56, 255)]
    return palette[i % len(palette)]

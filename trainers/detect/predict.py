"""DetectionPredictor: letterboxed input, NMS, boxes mapped back to each original image."""
from __future__ import annotations

import numpy as np
import torch

from trainers.data.augment import letterbox, unletterbox_boxes
from trainers.engine.predictor import BasePredictor
from trainers.engine.results import Results
from trainers.utils.ops import non_max_suppression

PREDICT_CONF = 0.25  # default confidence when args.conf is None


class DetectionPredictor(BasePredictor):
    def preprocess(self, images):
        """HWC images of any size -> a ``(B, 3, imgsz, imgsz)`` float batch in [0, 1]."""
        self.ratio_pads = []
        batch = []
        for im in images:
            boxed, gain, pad = letterbox(as_rgb_uint8(im), self.args.imgsz)
            self.ratio_pads.append((gain, pad))
            batch.append(torch.from_numpy(np.ascontiguousarray(boxed.transpose(2, 0, 1))))
        return (torch.stack(batch).float() / 255).to(self.device)

    def postprocess(self, preds, x, images, paths):
        decoded = preds[0] if isinstance(preds, (tuple, list)) else preds
        conf = PREDICT_CONF if self.args.conf is None else self.args.conf
        dets = non_max_suppression(decoded, conf=conf, iou=self.args.iou, max_det=self.args.max_det)
        results = []
        for det, im, path, ratio_pad in zip(dets, images, paths, self.ratio_pads):
            det = det.detach().cpu().clone()
            det[:, :4] = unletterbox_boxes(det[:, :4], ratio_pad, im.shape[:2])
            results.append(Results(im, path, self.model.names, boxes=det))
        return results


def as_rgb_uint8(im: np.ndarray) -> np.ndarray:
    """Grey, RGBA or float images as ``(H, W, 3)`` uint8 (floats in [0, 1] are scaled)."""
    im = np.asarray(im)
    if im.ndim == 2:
        im = np.stack([im] * 3, -1)
    elif im.shape[-1] == 1:
        im = np.repeat(im, 3, -1)
    elif im.shape[-1] == 4:
        im = im[..., :3]
    if im.dtype != np.uint8:
        im = im.astype(np.float64)
        im = np.clip(im * 255 if im.max() <= 1.0 else im, 0, 255).round().astype(np.uint8)
    return im

"""ClassificationPredictor: class probabilities per image."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from trainers.engine.predictor import BasePredictor
from trainers.engine.results import Results


class ClassificationPredictor(BasePredictor):
    def preprocess(self, images):
        ch = self.model.yaml.get("ch", 3)
        batch = []
        for im in images:
            im = im if im.ndim == 3 else np.stack([im] * 3, -1)
            t = torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1).float()[None]
            t = F.interpolate(t, size=(self.args.imgsz, self.args.imgsz), mode="bilinear", align_corners=False)
            batch.append(t.mean(1, keepdim=True) if ch == 1 else t)
        return (torch.cat(batch) / 255).to(self.device)

    def postprocess(self, preds, x, images, paths):
        probs = preds.softmax(1).cpu()
        return [Results(im, p, self.model.names, probs=pr) for im, p, pr in zip(images, paths, probs)]


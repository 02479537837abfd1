"""Customization 2: class weights for a rare class, by subclassing the loss, the model and the trainer.

- ``WeightedDetectionLoss`` replaces the classification BCE with one whose ``pos_weight`` is
  the class weights (a rare class's positives count more).
- ``WeightedDetectionModel`` keeps the weights in a buffer (so they are saved in checkpoints and
  restored when best.pt is loaded) and builds the weighted loss in ``init_criterion()``.
- ``WeightedTrainer.get_model()`` builds that model and sets the weights from the training labels.

The classes live in this importable module: a checkpoint names its model class by import path,
so ``Model("runs/detect/train/weights/best.pt")`` finds ``WeightedDetectionModel`` in any process.

Run: ``python examples/custom_class_weights.py``
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from orchestrator import Model
from trainers.detect import DetectionLoss, DetectionModel, DetectionTrainer

MAX_WEIGHT = 10.0  # cap, so a class with a handful of labels does not dominate the loss


class WeightedDetectionLoss(DetectionLoss):
    def __init__(self, model, class_weights: torch.Tensor):
        super().__init__(model)
        self.bce = nn.BCEWithLogitsLoss(reduction="none", pos_weight=class_weights.detach().clone().to(self.device))


class WeightedDetectionModel(DetectionModel):
    def __init__(self, cfg="det-n.yaml", ch: int = 3, nc: int | None = None, verbose: bool = True):
        super().__init__(cfg, ch=ch, nc=nc, verbose=verbose)
        self.register_buffer("class_weights", torch.ones(self.nc))

    def init_criterion(self):
        return WeightedDetectionLoss(self, self.class_weights)


class WeightedTrainer(DetectionTrainer):
    def get_model(self, cfg=None, weights=None, verbose=True):
        model = WeightedDetectionModel(cfg or "det-n.yaml", nc=self.data["nc"], verbose=verbose)
        if weights is not None:
            model.load(weights, verbose=verbose)
        model.class_weights.copy_(class_weights(self.data["train"], self.data["nc"]))
        return model


def class_weights(dataset, nc: int) -> torch.Tensor:
    """Inverse label frequency, normalised so a class of average frequency gets 1 (capped)."""
    dataset = getattr(dataset, "dataset", dataset)  # a fraction= subset wraps the dataset
    labels = np.concatenate([np.asarray(rec["cls"], dtype=np.int64) for rec in dataset.labels] or [np.zeros(0, int)])
    counts = np.bincount(labels, minlength=nc).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / (nc * np.maximum(counts, 1)), 1.0)
    return torch.tensor(np.clip(weights, 1.0 / MAX_WEIGHT, MAX_WEIGHT), dtype=torch.float32)


def main(trainer=None, **overrides):
    """Train with ``WeightedTrainer`` (or a subclass given as ``trainer``); returns the Model."""
    model = Model("det-n.yaml")
    defaults = {"data": "shapes8.yaml", "epochs": 5}
    model.train(trainer=trainer or WeightedTrainer, **{**defaults, **overrides})
    print("class weights:", model.model.class_weights.tolist())
    return model


if __name__ == "__main__":
    # Run the copy imported as ``examples.custom_class_weights``, not this ``__main__`` one: the
    # checkpoint must name a model class that another process can import.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from examples.custom_class_weights import main as module_main

    module_main()

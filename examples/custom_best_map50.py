"""Customization 3: choose best.pt by mAP50 instead of mAP50-95, by overriding ``validate()``.

Whatever ``validate()`` returns as fitness decides best.pt, early stopping (``patience``) and
a sweep's objective, so this one override changes all three consistently.

Run: ``python examples/custom_best_map50.py``
"""
from __future__ import annotations

from orchestrator import Model
from trainers.detect import DetectionTrainer


class MAP50Trainer(DetectionTrainer):
    def validate(self):
        metrics, _ = super().validate()
        return metrics, metrics["metrics/mAP50(B)"]


def main(trainer=None, **overrides):
    """Train with ``MAP50Trainer`` (or a subclass given as ``trainer``); returns the Model."""
    model = Model("det-n.yaml")
    defaults = {"data": "shapes8.yaml", "epochs": 5}
    model.train(trainer=trainer or MAP50Trainer, **{**defaults, **overrides})
    return model


if __name__ == "__main__":
    main()

"""Customization 1: log the F1 score of every class at each epoch end by overriding ``validate()``.

The per-class F1 values (at the confidence that maximizes mean F1) go into the epoch's record
with ``self.log``, so they appear in results.csv and in MLflow as ``f1/<class name>``.

Run: ``python examples/custom_f1.py``
"""
from __future__ import annotations

from orchestrator import Model
from trainers.detect import DetectionTrainer


class F1Trainer(DetectionTrainer):
    def validate(self):
        metrics, fitness = super().validate()
        self.log(per_class_f1(self.validator.metrics))
        return metrics, fitness


def per_class_f1(det_metrics) -> dict[str, float]:
    """``{"f1/<name>": f1}`` for every class that has ground truth in the validation split."""
    box, names = det_metrics.box, det_metrics.names
    return {f"f1/{names.get(int(c), c)}": float(f1) for c, f1 in zip(box.ap_class_index, box.f1)}


def main(trainer=None, **overrides):
    """Train with ``F1Trainer`` (or a subclass given as ``trainer``); returns the Model."""
    model = Model("det-n.yaml")
    defaults = {"data": "shapes8.yaml", "epochs": 5}
    model.train(trainer=trainer or F1Trainer, **{**defaults, **overrides})
    return model


if __name__ == "__main__":
    main()

"""Customization 7: gradient clipping with its own max norm, by overriding ``clip_gradients()``.

The default ``optimizer_step()`` calls ``clip_gradients()`` after unscaling the AMP gradients and
before the optimizer steps, then fires the three step events, zeroes the gradients and updates the
EMA, so this override only clips (an ``optimizer_step()`` override without ``super()`` would own
all of that). The gradient norm before clipping is kept in ``self.grad_norm`` and its epoch mean is logged
as ``train/grad_norm``.

Run: ``python examples/custom_grad_clip.py``
"""
from __future__ import annotations

from torch import nn

from orchestrator import Model
from trainers.detect import DetectionTrainer


class ClipTrainer(DetectionTrainer):
    max_norm = 1.0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.grad_norm, self.grad_norms = None, []
        self.add_callback("on_train_epoch_end", log_grad_norm)

    def clip_gradients(self):
        norm = nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=self.max_norm)
        self.grad_norm = float(norm)
        self.grad_norms.append(self.grad_norm)
        return norm


def log_grad_norm(trainer) -> None:
    """The epoch's mean gradient norm before clipping: how hard the clip worked."""
    if trainer.grad_norms:
        trainer.log({"train/grad_norm": sum(trainer.grad_norms) / len(trainer.grad_norms)})
    trainer.grad_norms = []


def main(trainer=None, **overrides):
    """Train with ``ClipTrainer`` (or a subclass given as ``trainer``); returns the Model."""
    model = Model("det-n.yaml")
    defaults = {"data": "shapes8.yaml", "epochs": 5}
    model.train(trainer=trainer or ClipTrainer, **{**defaults, **overrides})
    return model


if __name__ == "__main__":
    main()

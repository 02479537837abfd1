"""Customization 7: gradient clipping with its own max norm, by overriding ``optimizer_step()``.

The override owns the step (it does not call ``super()``), so it also fires the three step
events in their documented places. The gradient norm before clipping is kept in
``self.grad_norm`` and its epoch mean is logged as ``train/grad_norm``.

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

    def optimizer_step(self):
        self.scaler.unscale_(self.optimizer)  # clip the true gradients, not AMP-scaled ones
        self.grad_norm = float(nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=self.max_norm))
        self.grad_norms.append(self.grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.run_callbacks("optimizer_step")
        self.run_callbacks("on_before_zero_grad")
        self.optimizer.zero_grad()
        self.ema.update(self.model)
        self.run_callbacks("on_params_update")


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

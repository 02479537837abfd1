"""Customization 4: train with the backbone frozen (``freeze=10``), unfreeze it after K epochs.

``UnfreezeAfter`` is a callback object: its ``on_train_epoch_start`` flips ``requires_grad`` back
on and empties ``trainer.freeze_layer_names`` (so the frozen layers' BatchNorm trains again too).
The optimizer already holds every parameter, so it starts updating them at once; under DDP the
trainer re-wraps the model so the unfrozen layers are synchronised across workers.
After a resume past epoch K the callback unfreezes at the first epoch again.

Run: ``python examples/custom_unfreeze.py``
"""
from __future__ import annotations

from orchestrator import Model
from trainers.detect import DetectionTrainer
from trainers.utils import LOGGER, unwrap_model


class UnfreezeAfter:
    def __init__(self, epochs: int):
        self.epochs = epochs

    def on_train_epoch_start(self, trainer) -> None:
        if trainer.epoch < self.epochs or not trainer.freeze_layer_names:
            return
        prefixes = tuple(trainer.freeze_layer_names)
        for name, p in unwrap_model(trainer.model).named_parameters():
            if name.startswith(prefixes):
                p.requires_grad_(True)
        trainer.freeze_layer_names = []
        LOGGER.info(f"epoch {trainer.epoch + 1}: unfroze {len(prefixes)} layers")


class UnfreezeTrainer(DetectionTrainer):
    """Registers the callback itself, so ``trainer=UnfreezeTrainer`` is all a run needs."""

    unfreeze_after = 2

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_callback(UnfreezeAfter(self.unfreeze_after))


def main(trainer=None, **overrides):
    """Train with ``UnfreezeTrainer`` (or a subclass given as ``trainer``); returns the Model."""
    model = Model("det-n.yaml")
    defaults = {"data": "shapes8.yaml", "epochs": 5, "freeze": 10}
    model.train(trainer=trainer or UnfreezeTrainer, **{**defaults, **overrides})
    return model


if __name__ == "__main__":
    main()

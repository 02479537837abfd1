"""Customization 6: SyncBatchNorm across workers, converted in ``set_model_attributes()``.

``set_model_attributes()`` runs with the model on its device and before DDP wraps it, the
one place where swapping layers is safe. With one worker there is nothing to synchronise.
PyTorch synchronises batch statistics on GPUs only, so CPU workers keep plain BatchNorm.

Run: ``python examples/custom_sync_bn.py`` (2 Ray Train workers, on GPUs when there are two).
"""
from __future__ import annotations

import torch
from torch import nn

from orchestrator import Model
from trainers.detect import DetectionTrainer
from trainers.utils import LOGGER


class SyncBNTrainer(DetectionTrainer):
    def set_model_attributes(self):
        super().set_model_attributes()
        if self.world_size <= 1:
            return
        if self.device.type == "cpu":
            LOGGER.warning("SyncBatchNorm needs GPU workers; keeping BatchNorm on CPU")
            return
        self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)


def main(trainer=None, **overrides):
    """Train with ``SyncBNTrainer`` (or a subclass given as ``trainer``); returns the Model."""
    model = Model("det-n.yaml")
    defaults = {"data": "shapes8.yaml", "epochs": 5, "num_workers": 2, "use_gpu": torch.cuda.device_count() >= 2}
    model.train(trainer=trainer or SyncBNTrainer, **{**defaults, **overrides})
    return model


if __name__ == "__main__":
    main()

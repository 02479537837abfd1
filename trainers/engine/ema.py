"""Exponential moving average of model weights; validation and checkpoints use the average."""
from __future__ import annotations

import copy
import math

import torch

from trainers.utils import unwrap_model


class ModelEMA:
    """EMA whose decay ramps up with the number of updates, so early weights do not dominate."""

    def __init__(self, model, decay: float = 0.9999, tau: float = 2000, updates: int = 0):
        self.ema = copy.deepcopy(unwrap_model(model)).eval()
        self.updates = updates
        self.decay_fn = lambda x: decay * (1 - math.exp(-x / tau))
        for p in self.ema.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model) -> None:
        self.updates += 1
        d = self.decay_fn(self.updates)
        source = unwrap_model(model).state_dict()
        for name, value in self.ema.state_dict().items():
            if value.dtype.is_floating_point:
                value.mul_(d).add_(source[name].detach(), alpha=1 - d)
            else:
                value.copy_(source[name])

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
        self._pairs = None  # (source model, float ema tensors, float sources, other ema, other sources)
        for p in self.ema.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model) -> None:
        """One fused lerp over all floating-point tensors: per-tensor Python loops cost more than a
        small model's step."""
        self.updates += 1
        d = self.decay_fn(self.updates)
        _, ema_f, src_f, ema_o, src_o = self._tensors(unwrap_model(model))
        if ema_f:
            torch._foreach_lerp_(ema_f, src_f, 1 - d)
        for e, s in zip(ema_o, src_o):
            e.copy_(s)

    def _tensors(self, source):
        """The matching parameters and buffers of the EMA and ``source``, cached while ``source`` is
        the same module (parameters survive ``load_state_dict`` and ``.to()``; buffers are updated
        in place by the layers that own them)."""
        if self._pairs is not None and self._pairs[0] is source:
            return self._pairs
        ema_state, src_state = _tensors_by_name(self.ema), _tensors_by_name(source)
        floats = [k for k, v in ema_state.items() if v.dtype.is_floating_point]
        others = [k for k in ema_state if k not in set(floats)]
        self._pairs = (source, [ema_state[k] for k in floats], [src_state[k] for k in floats],
                       [ema_state[k] for k in others], [src_state[k] for k in others])
        return self._pairs

    def __getstate__(self):
        return {**self.__dict__, "_pairs": None}


def _tensors_by_name(module) -> dict:
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}

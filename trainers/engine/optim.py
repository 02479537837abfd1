"""Optimizer construction and the learning-rate schedule (warmup + linear or cosine decay)."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from trainers.config import check_optimizer_values
from trainers.utils import LOGGER, UserError

OPTIMIZERS = {"SGD", "Adam", "AdamW", "RMSProp"}


def split_params(model: nn.Module):
    """Three groups as usual: weights with decay, norm weights and biases without decay."""
    decay, no_decay, biases = [], [], []
    norm_types = tuple(v for k, v in nn.__dict__.items() if "Norm" in k and isinstance(v, type))
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if name == "bias":
                biases.append(p)
            elif isinstance(module, norm_types):
                no_decay.append(p)
            else:
                decay.append(p)
    return decay, no_decay, biases


def make_optimizer(model, name: str, lr: float, momentum: float, decay: float,
                   iterations: float, nc: int = 10):
    """Build the optimizer; ``auto`` picks SGD for long runs and a fitted AdamW for short ones."""
    if name == "auto":
        name, lr = ("SGD", 0.01) if iterations > 10_000 else ("AdamW", round(0.002 * 5 / (4 + nc), 6))
        LOGGER.info(f"optimizer: 'auto' chose {name}(lr={lr}, momentum={momentum})")
    if name not in OPTIMIZERS:
        raise UserError(f"config key 'optimizer': {name!r} is not one of auto, {', '.join(sorted(OPTIMIZERS))}")
    check_optimizer_values(name, lr, momentum, decay)  # also what auto chose
    weights, norms, biases = split_params(model)
    if name in {"Adam", "AdamW"}:
        opt = getattr(torch.optim, name)(biases, lr=lr, betas=(momentum, 0.999), weight_decay=0.0)
    elif name == "RMSProp":
        opt = torch.optim.RMSprop(biases, lr=lr, momentum=momentum)
    else:
        opt = torch.optim.SGD(biases, lr=lr, momentum=momentum, nesterov=True)
    opt.param_groups[0]["warmup_bias"] = name == "SGD"  # SGD biases warm up from warmup_bias_lr
    opt.add_param_group({"params": weights, "weight_decay": decay})
    opt.add_param_group({"params": norms, "weight_decay": 0.0})
    return opt


def lr_lambda(epochs: int, lrf: float, cos: bool):
    """Multiplier of each group's base lr at an epoch: 1 -> lrf, linearly or as a half cosine."""
    if cos:
        return lambda x: ((1 - math.cos(x * math.pi / epochs)) / 2) * (lrf - 1) + 1
    return lambda x: max(1 - x / epochs, 0) * (1.0 - lrf) + lrf


def warmup(optimizer, ni: int, nw: int, lf_epoch: float, args) -> None:
    """Ramp lr (and momentum) over the first ``nw`` iterations, keeping each group's own base lr."""
    xi = [0, nw]
    for group in optimizer.param_groups:
        start = args.warmup_bias_lr if group.get("warmup_bias") else 0.0
        group["lr"] = float(np.interp(ni, xi, [start, group["initial_lr"] * lf_epoch]))
        if "momentum" in group:
            group["momentum"] = float(np.interp(ni, xi, [args.warmup_momentum, args.momentum]))
        elif "betas" in group:
            group["betas"] = (float(np.interp(ni, xi, [args.warmup_momentum, args.momentum])),
                              group["betas"][1])

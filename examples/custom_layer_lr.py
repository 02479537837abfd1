"""Customization 5: per-layer learning rates, by overriding ``build_optimizer()``.

The backbone (layers 0-9 of ``det-n.yaml``) learns at ``backbone_lr_scale`` times the head's
rate, ``lr0`` (the optimizer is AdamW whatever ``optimizer`` says). Each part keeps the usual
three groups (weights with decay; norm weights and biases without). Warmup and the LR schedule
scale every group's own base lr, so the ratio holds throughout training.

Run: ``python examples/custom_layer_lr.py``
"""
from __future__ import annotations

import torch
from torch import nn

from orchestrator import Model
from trainers.detect import DetectionTrainer
from trainers.engine.optim import split_params
from trainers.utils import unwrap_model

BACKBONE_LAYERS = 10  # det.yaml: layers 0-9 are the backbone


class LayerLRTrainer(DetectionTrainer):
    backbone_lr_scale = 0.1

    def build_optimizer(self, model, name="auto", lr=0.001, momentum=0.9, decay=1e-5, iterations=1e5):
        layers = unwrap_model(model).model
        parts = {"backbone": (layers[:BACKBONE_LAYERS], lr * self.backbone_lr_scale),
                 "head": (layers[BACKBONE_LAYERS:], lr)}
        groups = []
        for part, (modules, part_lr) in parts.items():
            weights, norms, biases = split_params(nn.ModuleList(modules))
            groups += [{"params": weights, "lr": part_lr, "weight_decay": decay, "name": f"{part}.weights"},
                       {"params": norms, "lr": part_lr, "weight_decay": 0.0, "name": f"{part}.norms"},
                       {"params": biases, "lr": part_lr, "weight_decay": 0.0, "name": f"{part}.biases"}]
        return torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999))


def main(trainer=None, **overrides):
    """Train with ``LayerLRTrainer`` (or a subclass given as ``trainer``); returns the Model."""
    model = Model("det-n.yaml")
    defaults = {"data": "shapes8.yaml", "epochs": 5, "lr0": 0.002}
    model.train(trainer=trainer or LayerLRTrainer, **{**defaults, **overrides})
    return model


if __name__ == "__main__":
    main()

"""The picklable trainer factory: class + config + callbacks, built inside each worker."""
from __future__ import annotations

from dataclasses import dataclass, field

from trainers.registry import copy_registry, new_registry


@dataclass
class TrainerFactory:
    """Ray pickles this (cloudpickle), so classes and callbacks from ``__main__`` travel too."""

    trainer_cls: type
    overrides: dict
    callbacks: dict = field(default_factory=new_registry)

    def __call__(self, **extra):
        return self.trainer_cls(overrides={**self.overrides, **extra}, _callbacks=copy_registry(self.callbacks))

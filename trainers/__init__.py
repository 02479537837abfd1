"""Trainers: the engine (trainer, validator, predictor, exporter), tasks, models, losses, metrics, data."""

__all__ = ["BaseTrainer"]


def __getattr__(name):
    # Lazy, so that light modules (trainers.utils) import without pulling in the engine.
    if name == "BaseTrainer":
        from trainers.engine.trainer import BaseTrainer

        return BaseTrainer
    raise AttributeError(name)

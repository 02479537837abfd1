"""Distributed experiment orchestrator: Ultralytics-style trainers on Ray, runs in MLflow."""

__all__ = ["Model"]


def __getattr__(name: str):
    """``Model`` on first use: a process that unpickles a driver callback of ``orchestrator``
    (the callback actor) would otherwise import torch for nothing."""
    if name == "Model":
        from orchestrator.model import Model

        return Model
    raise AttributeError(f"module 'orchestrator' has no attribute {name!r}")

"""Distributed experiment orchestrator: Ultralytics-style trainers on Ray, runs in MLflow."""

__all__ = ["Model"]


def __getattr__(name):
    # Lazy, so that `trainers` can import `orchestrator.config` without an import cycle.
    if name == "Model":
        from orchestrator.model import Model

        return Model
    raise AttributeError(name)

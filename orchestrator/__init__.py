"""Distributed experiment orchestrator: Ultralytics-style trainers on Ray, runs in MLflow."""
from orchestrator.model import Model

__all__ = ["Model"]

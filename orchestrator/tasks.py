"""Which trainer, validator, predictor and model class serve each task."""
from __future__ import annotations

import importlib

TASKS = {
    "classify": ("trainers.classify", "ClassificationTrainer", "ClassificationValidator", "ClassificationPredictor"),
    "detect": ("trainers.detect", "DetectionTrainer", "DetectionValidator", "DetectionPredictor"),
}


def task_class(task: str, role: str):
    """``role`` is trainer, validator or predictor."""
    module, *names = TASKS[task]
    index = {"trainer": 0, "validator": 1, "predictor": 2}[role]
    return getattr(importlib.import_module(module), names[index])

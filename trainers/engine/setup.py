"""Start-of-fit helpers that need plain values, not the trainer: seeding and the ``fraction`` subset.

They sit apart from ``trainer.py`` so the loop module holds the loop; ``BaseTrainer._setup_train``
calls them once per fit, before data and model exist.
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch


def init_seeds(seed: int, deterministic: bool, device: torch.device) -> None:
    """Seed every RNG; on CUDA also force deterministic kernels (CPU kernels already are, and
    ``use_deterministic_algorithms`` costs seconds of imports at start-up)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    if deterministic and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def take_fraction(dataset, fraction: float):
    """The first ``fraction`` of a dataset (at least one item), for quick runs."""
    n = max(int(len(dataset) * fraction), 1)
    return torch.utils.data.Subset(dataset, range(n))

"""Start-of-fit helpers that need plain values, not the trainer: seeding, the ``fraction`` subset and
the values of keys that ``default.yaml`` leaves to the data (``null``).

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


def split_batch(batch: int, nbs: int, world_size: int) -> tuple[int, int]:
    """``(per-worker batch, accumulate)``: the global ``batch`` split across the workers, gradients
    accumulated up to the nominal batch ``nbs``. Both follow the world size, so an elastic run that
    Ray resized keeps the global batch and the optimizer step it was configured with."""
    per_worker = max(batch // world_size, 1)
    return per_worker, max(round(nbs / (per_worker * world_size)), 1)


MIN_STEPS = 30  # optimizer steps an epoch at least, when nbs is left to the data
MAX_NBS = 64  # the nominal batch of large data sets (Ultralytics' nbs)
WARMUP_SHARE = 0.05  # of the run's optimizer steps, at most, when warmup_epochs is left to the data
# Augmentation strengths (detect) when left null: these nominal values scaled by epochs / AUG_EPOCHS
# (at most 1). Augmentation is a regularizer against overfitting over many passes; a short run underfits,
# and colour jitter on a small data set then costs more than it gives (shapes8, det-n, 25 epochs: 0.71
# mAP50 at full strength, 0.90 at a quarter). AUG_EPOCHS is Ultralytics' default run length.
AUG_EPOCHS = 100
NOMINAL_AUG = {"hsv_h": 0.015, "hsv_s": 0.5, "hsv_v": 0.3, "scale": 0.3}


def scaled_to_data(args, n_train: int) -> dict:
    """Values for the keys left ``null`` (a user's value always wins): ``nbs`` as large as the data
    allows for ``MIN_STEPS`` optimizer steps an epoch (between ``batch`` and ``MAX_NBS``), warmup
    up to 3 epochs but at most ``WARMUP_SHARE`` of the run, and the augmentation strengths
    ``NOMINAL_AUG`` scaled to the run's length (full from ``AUG_EPOCHS`` epochs). A small data set
    with the nominal batch of a large one gets a handful of steps an epoch and hardly learns in a
    short run; full augmentation in a short run slows learning more than it prevents overfitting."""
    chosen = {}
    if args.nbs is None:
        chosen["nbs"] = int(min(MAX_NBS, max(args.batch, n_train // MIN_STEPS)))
    if args.warmup_epochs is None:
        chosen["warmup_epochs"] = round(min(3.0, WARMUP_SHARE * args.epochs), 3)
    share = min(1.0, args.epochs / AUG_EPOCHS)
    for key, nominal in NOMINAL_AUG.items():
        if getattr(args, key, None) is None:
            chosen[key] = round(nominal * share, 6)
    return chosen

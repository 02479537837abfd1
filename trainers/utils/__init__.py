"""Small shared helpers: logger, this process's rank, unwrapping DDP, the user-error type."""
from __future__ import annotations

import logging
import os

LOGGER = logging.getLogger("orchestrator")
if not LOGGER.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(message)s"))
    LOGGER.addHandler(_handler)
    LOGGER.setLevel(logging.INFO)
    LOGGER.propagate = False


def _env_rank() -> int:
    """Global rank from the environment torch.distributed / Ray Train set; -1 when alone."""
    for key in ("RANK", "WORLD_RANK"):
        if key in os.environ:
            return int(os.environ[key])
    return -1


RANK = _env_rank()


class UserError(Exception):
    """Bad input from the user: the CLI prints the message alone and exits 2."""


def unwrap_model(model):
    """The plain module behind DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and not hasattr(model, "yaml"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model

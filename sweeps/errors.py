"""A failed trial's error in one line, and whether every trial would repeat it."""
from __future__ import annotations

from pathlib import Path

import ray.cloudpickle as cloudpickle

from sweeps.space import ObjectiveKeyError
from trainers.utils import UserError


def pickled_error(trial):
    """The trial's exception: its local error file (written before ``on_trial_error`` runs; the
    copy in storage, which ``get_pickled_error`` reads, is synced later)."""
    local = getattr(trial, "pickled_error_file", None)
    if local and Path(local).is_file():
        with open(local, "rb") as f:
            return cloudpickle.load(f)
    return trial.get_pickled_error()


def root_error(trial):
    err = pickled_error(trial)
    seen = 0
    while err is not None and seen < 10:
        cause = getattr(err, "cause", None) or err.__cause__
        if cause is None:
            return err
        err, seen = cause, seen + 1
    return err


def is_objective_error(trial) -> bool:
    try:
        return isinstance(root_error(trial), ObjectiveKeyError)
    except Exception:
        return False


def error_line(trial) -> str:
    """The trial's error in one line (the user's message when it is a ``UserError``)."""
    try:
        err = root_error(trial)
    except Exception:
        err = None
    if isinstance(err, UserError):
        return str(err).splitlines()[0]
    if err is not None:
        text = str(err).strip().splitlines()
        return f"{type(err).__name__}: {text[-1] if text else ''}"
    text = (trial.get_error() or "").strip().splitlines()
    return text[-1] if text else "unknown error"

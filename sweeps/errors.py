"""A failed trial's error in one line, and whether every trial would repeat it."""
from __future__ import annotations

from pathlib import Path

import ray.cloudpickle as cloudpickle

from sweeps.space import ObjectiveKeyError
from trainers.utils import user_error_in


def pickled_error(trial):
    """The trial's exception: its local error file (written before ``on_trial_error`` runs; the
    copy in storage, which ``get_pickled_error`` reads, is synced later)."""
    local = getattr(trial, "pickled_error_file", None)
    if local and Path(local).is_file():
        with open(local, "rb") as f:
            return cloudpickle.load(f)
    return trial.get_pickled_error()


def trial_exception(trial):
    """The trial's exception, or None when it cannot be read back."""
    try:
        return pickled_error(trial)
    except Exception:
        return None


def root_error(err):
    """The innermost cause Ray's wrappers carry (for errors that are not the user's)."""
    seen = 0
    while err is not None and seen < 10:
        cause = getattr(err, "cause", None) or err.__cause__
        if cause is None:
            return err
        err, seen = cause, seen + 1
    return err


def is_objective_error(trial) -> bool:
    return isinstance(user_error_in(trial_exception(trial)), ObjectiveKeyError)


def error_line(trial) -> str:
    """The trial's error in one line (the user's message when it is a ``UserError``)."""
    err = trial_exception(trial)
    user = user_error_in(err)
    if user is not None:
        return str(user).splitlines()[0]
    if err is not None:
        root = root_error(err)
        text = str(root).strip().splitlines()
        return f"{type(root).__name__}: {text[-1] if text else ''}"
    text = (trial.get_error() or "").strip().splitlines()
    return text[-1] if text else "unknown error"

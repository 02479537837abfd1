"""What a run gives back to ``Model.train``: final metrics and best.pt's path (a driver callback),
and the final state of the user's driver callbacks."""
from __future__ import annotations

import types

from trainers.metrics.base import split_per_class
from trainers.utils import LOGGER


class ResultSink:
    """Rank 0's latest epoch metrics and the best checkpoint; ``close`` puts both in the report.
    The final evaluation's per-class values (``trainers.metrics.base``) are kept apart: ``metrics``
    tag the registered model, and ``Model.train`` rebuilds its metrics object from both."""

    events = frozenset({"on_fit_epoch_end", "on_train_end"})  # what workers must forward for it

    def __init__(self):
        self.metrics: dict = {}
        self.per_class: dict = {}
        self.best: str | None = None

    def on_fit_epoch_end(self, record: dict) -> None:
        if record["rank"] <= 0:
            self.metrics, self.per_class = split_per_class(record["metrics"])

    def on_train_end(self, record: dict) -> None:
        self.best = record["artifacts"].get("best") or self.best

    def close(self, status: str) -> dict:
        return {"metrics": self.metrics, "per_class": self.per_class, "best": self.best, "status": status}


def take_back(originals: list, copies: list) -> None:
    """Under Ray, driver callbacks ran on copies in the callback actor's process; give the user's own
    objects (a sink object, or the object a bound method belongs to, e.g. ``seen.append``'s list)
    those copies' final state, so a notebook finds what they gathered (SPEC §8). A plain function's
    closure is not taken back: its state stays with the actor."""
    for original, copy in zip(originals, copies):
        target = original[1] if isinstance(original, tuple) else original
        adopt(getattr(target, "__self__", target), getattr(copy, "__self__", copy))


def adopt(target, state) -> None:
    if isinstance(target, (list, dict, set)):
        target.clear()
        (target.extend if isinstance(target, list) else target.update)(state)
    elif isinstance(target, (types.FunctionType, types.BuiltinFunctionType, types.ModuleType, type)):
        return
    elif hasattr(target, "__dict__") and hasattr(state, "__dict__"):
        target.__dict__.update(vars(state))
    else:
        LOGGER.warning(f"driver callback {type(target).__name__}: its final state cannot be taken back "
                       f"from the callback actor (no __dict__)")

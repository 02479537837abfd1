"""What every task's metrics object shares (SPEC §6): it reads as the flat results dict, and its
per-class values can travel in a record.

``model.val()`` and ``model.train()`` return the task's metrics object (``DetMetrics``,
``ClassifyMetrics``), as Ultralytics does. Code written for the flat dict they used to return
(``metrics["metrics/mAP50(B)"]``, ``.get``, ``in``, ``.items()``) reads the object unchanged: it
is a read-only ``Mapping`` over its ``results_dict``.

``model.train()`` may have trained on Ray workers; what reaches the driver is the final
evaluation's record, whose ``metrics`` are floats only. So a metrics object flattens its per-class
values into floats under ``PER_CLASS`` keys (``per_class_results``) and is rebuilt from such a
dict (``restore``). MLflow and the model registry keep the means only (``is_per_class``); the event
log keeps everything. This module imports nothing heavy: the callback actor reads it.
"""
from __future__ import annotations

from collections.abc import Mapping

PER_CLASS = "per_class/"  # e.g. per_class/box/3/ap50: class 3's AP at IoU 0.50


def is_per_class(key: str) -> bool:
    """Whether a record's metric is one class's value rather than a result of the whole split."""
    return key.startswith(PER_CLASS)


def split_per_class(metrics: dict) -> tuple[dict, dict]:
    """``(whole-split values, per-class values)`` of a record's metrics."""
    per_class = {k: v for k, v in metrics.items() if is_per_class(k)}
    return {k: v for k, v in metrics.items() if k not in per_class}, per_class


class TaskMetrics(Mapping):
    """A task's metrics. Subclasses give ``own_results`` (their values and ``fitness``) and
    ``_restore``; with per-class values also ``per_class_results``. ``extra`` holds what a
    validation adds to the task's own values: ``val/`` losses, values logged with ``validator.log``."""

    def __init__(self):
        self.extra: dict[str, float] = {}

    def own_results(self) -> dict[str, float]:
        raise NotImplementedError

    @property
    def results_dict(self) -> dict[str, float]:
        """The flat dict: the task's values, ``fitness``, then ``extra``."""
        return {**self.own_results(), **self.extra}

    def keep_extra(self, results: dict) -> None:
        """Keep what the validation's flat ``results`` hold beyond the task's own values."""
        own = self.own_results()
        self.extra = {k: v for k, v in results.items() if k not in own and not is_per_class(k)}

    def per_class_results(self) -> dict[str, float]:
        """Per-class values as ``PER_CLASS`` keys (a task without any has none)."""
        return {}

    def restore(self, results: dict) -> None:
        """Take a flat dict as a record carries it (per-class keys included): the object a
        validation made on a worker, rebuilt on the driver."""
        self._restore(results)
        self.keep_extra(results)

    def _restore(self, results: dict) -> None:
        raise NotImplementedError

    # ---- read-only Mapping over results_dict
    def __getitem__(self, key: str) -> float:
        return self.results_dict[key]

    def __iter__(self):
        return iter(self.results_dict)

    def __len__(self) -> int:
        return len(self.results_dict)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.results_dict!r})"

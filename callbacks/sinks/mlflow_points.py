"""Which rank-0 records become MLflow metric points, and the points themselves.

Metric steps: ``on_train_batch_end`` values go under ``step_prefix`` (default ``step/``) at the
optimizer step, ``on_fit_epoch_end`` values under their own names at the epoch, and the final
evaluation's under ``final/``, so no key mixes two x axes and no step is logged twice. An
``on_resize`` record (the run continues at another world size) gives ``world_size`` and
``world_size_before`` at the first epoch of the new size; an ``on_hparams`` record (a sweep's
driver: PBT changed the trial's numeric hyperparameters) gives ``hparam/<key>`` at the first epoch
trained with the new values, and each such point sets the tag ``hparam.<key>`` when it is
delivered (``hparam_tags``): MLflow params are write-once. An ``on_clone`` record (a sweep trial
starts from another trial's checkpoint) makes one marker, ``[CLONED, 0.0, timestamp, epoch]``, in
line with the points: the run writer takes the steps after it as a new lineage. The final
evaluation's per-class values (``trainers.metrics.base``) make no points: they are for the metrics
object ``Model.train`` returns, and stay in the event log.
Per-step points go at every ``every``-th optimizer step (``log_every_n_steps``; the first batch
that reaches it, when several batches share a step): MLflow's SQL store spends ~100 us of CPU
per point, which at hundreds of steps/s would take a core from training. The event log keeps
every step.
"""
from __future__ import annotations

import time

from callbacks.sinks.mlflow_runs import MAX_KEY, metric_key
from trainers.metrics.base import is_per_class

BATCH_END, EPOCH_END, RESIZE, HPARAMS = "on_train_batch_end", "on_fit_epoch_end", "on_resize", "on_hparams"
CLONE = "on_clone"
FINAL = "final/"  # the final evaluation's keys
HPARAM = "hparam/"  # the keys of hyperparameters PBT changed
CLONED = "<cloned>"  # the key of ``on_clone``'s marker: no metric's (``metric_key`` turns "<" and ">" into "_")


class MetricPoints:
    """Turns records into points ``[key, value, timestamp ms, step]``, remembering the last step
    logged; keys are made MLflow-safe once per name."""

    def __init__(self, step_prefix: str = "step/", every: int = 1):
        self.step_prefix, self.every = step_prefix, every
        self._keys: dict[str, str] = {}
        self._last_step = None  # optimizer step of the last per-step point

    def makes_points(self, event: str, step: int) -> bool:
        """Whether a record of ``event`` at ``step`` may make points (a cheap test on the row)."""
        return event in (EPOCH_END, RESIZE, HPARAMS, CLONE) or (event == BATCH_END and step % self.every == 0)

    def of(self, event: str, record: dict) -> list[list]:
        if event == CLONE:
            return [[CLONED, 0.0, time_ms(record), int(record.get("epoch", 0))]]
        metrics = record.get("metrics")
        if not metrics:
            return []
        if event == BATCH_END:
            prefix, step = self.step_prefix, int(record.get("step", 0))
            if step % self.every or step == self._last_step:
                return []
            self._last_step = step
        elif event == EPOCH_END:
            prefix, step = (FINAL if record.get("final_eval") else ""), int(record.get("epoch", 0))
            metrics = {k: v for k, v in metrics.items() if not is_per_class(k)}
        elif event in (RESIZE, HPARAMS):
            prefix, step = (HPARAM if event == HPARAMS else ""), int(record.get("epoch", 0))
        else:
            return []
        ts = time_ms(record)
        return [[self._key(prefix, k), float(v), ts, step] for k, v in metrics.items()]

    def _key(self, prefix: str, name: str) -> str:
        full = prefix + name
        key = self._keys.get(full)
        if key is None:
            key = self._keys[full] = metric_key(full)[:MAX_KEY]
        return key


def time_ms(record: dict) -> int:
    """A point's timestamp: when its record's event fired, in ms."""
    return int(float(record.get("time", time.time())) * 1000)


def hparam_tags(points: list[list]) -> dict[str, str]:
    """The tags ``hparam.<key>`` that points of changed hyperparameters set, the latest value
    winning (a tag holds one value; the metric keeps the history)."""
    return {f"hparam.{key[len(HPARAM):]}": number_text(value) for key, value, _, _ in points
            if key.startswith(HPARAM)}


def number_text(value: float) -> str:
    """``16`` for a whole number (a point's value is a float; the config had an int), else repr."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))

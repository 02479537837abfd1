"""The MLflow sink's delivery side: the only code that waits on the tracking server.

It runs on the sink's courier thread. Attaching finds the run by its ``orchestrator.run_id``
tag (so the sink of a restarted actor reuses the run) or creates it, then logs params (once)
and tags. A sweep trial's run names its parent by the parent's orchestrator run id
(``PARENT_TAG``): attaching waits, retried like an outage, until the parent's own sink has made
that run. Metrics go with ``log_batch``; a batch MLflow rejects as invalid is split until the bad
point is found and dropped (counted), so one bad value never blocks the rest of the run. A point
of a hyperparameter PBT changed (``hparam/<key>``) also sets its tag (``hparam_tags``).
Re-sending a point after an uncertain failure is harmless: the SQL store ignores an exact
duplicate (same key, value, step, timestamp). No point goes at a step its key already has in the
run (``last_steps`` when a restarted actor or a resumed run attaches, ``send_points`` as points go,
a batch's own repeats included): what a restart repeated is not logged twice. A sweep trial that
PBT started from another trial's checkpoint logs its epochs from there again: the ``CLONED``
marker among the points (``mlflow_points.py``) lowers every floor, and its time goes to the run's
tag ``CLONED_TAG``, from which ``last_steps`` counts. Any other failure propagates
to the courier, which keeps the data queued and retries.
"""
from __future__ import annotations

import posixpath
from pathlib import Path

from callbacks.sinks.mlflow_runs import (CLONED_TAG, PARENT_TAG, RUN_ID_TAG, announce_run, find_run, first_line,
                                         is_invalid, last_steps, log_dataset, log_params_tags, mlflow_client,
                                         new_run, reopen_run)
from callbacks.sinks.mlflow_points import CLONED, HPARAM, hparam_tags
from trainers.utils import LOGGER


class ParentNotYet(RuntimeError):
    """The parent run a child names by ``PARENT_TAG`` is not in MLflow yet: its own sink is still
    waiting to create it. The courier retries, as for a server that is down."""


class RunWriter:
    """Writes to one MLflow run: ``attach`` first, then points, files and finally the status."""

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, params: dict[str, str],
                 tags: dict[str, str], *, run_id: str | None = None, parent_run_id: str | None = None,
                 orch_run_id: str | None = None, find_existing: bool = True, dataset: dict | None = None):
        self.tracking_uri, self.experiment, self.run_name = tracking_uri, experiment, run_name
        self.params, self.tags, self.parent_run_id, self.dataset = params, tags, parent_run_id, dataset
        self.run_id, self.orch_run_id, self.find_existing = run_id, orch_run_id, find_existing
        self.ready = self.terminated = False
        self.delivered = self.rejected = 0
        self.floors: dict[str, int] = {}  # a continued run's last step per key (``last_steps``)
        self._client = None

    def client(self):
        if self._client is None:
            self._client = mlflow_client(self.tracking_uri)
        return self._client

    def attach(self) -> None:
        """Find or create the run, then log params (once) and tags."""
        if self.ready:
            return
        if self.parent_run_id is None and PARENT_TAG in self.tags:
            self.parent_run_id = self._parent()
        tags = dict(self.tags)
        if self.orch_run_id:
            tags.setdefault(RUN_ID_TAG, self.orch_run_id)
        if self.run_id is None:
            self.run_id = self._existing_run() or self._new_run(tags)
        else:  # made (or continued) by the driver
            self.floors = last_steps(self.client(), self.client().get_run(self.run_id))
        try:
            log_params_tags(self.client(), self.run_id, self.params, tags)
            log_dataset(self.client(), self.run_id, self.dataset)
        except Exception as exc:
            if not is_invalid(exc):
                raise
            LOGGER.warning(f"mlflow: params/tags/dataset of run {self.run_id} rejected ({first_line(exc)}); "
                           f"logging metrics without them")
        self.ready = True

    def _existing_run(self) -> str | None:
        """A run already made for these records (before an actor restart, or a resumed run's),
        running again; points at steps it holds are not sent again."""
        if not (self.find_existing and self.orch_run_id):
            return None
        run = find_run(self.client(), self.experiment, self.orch_run_id)
        if run is None:
            return None
        if run.info.status != "RUNNING":
            reopen_run(self.client(), run.info.run_id)
        self.floors = last_steps(self.client(), run)
        return run.info.run_id

    def _parent(self) -> str:
        """The MLflow id of the run tagged with the parent's orchestrator run id."""
        run = find_run(self.client(), self.experiment, self.tags[PARENT_TAG])
        if run is None:
            raise ParentNotYet(f"parent run {self.tags[PARENT_TAG]} is not in MLflow yet")
        return run.info.run_id

    def _new_run(self, tags: dict) -> str:
        run_id = new_run(self.client(), self.experiment, self.run_name, tags, self.parent_run_id)
        announce_run(run_id, self.experiment, self.tracking_uri)
        return run_id

    def send_points(self, points: list[list]) -> None:
        """Points ``[key, value, timestamp ms, step]``, at most 1000 (MLflow's limit per request),
        without repeats (``is_repeat``); at a ``CLONED`` marker a new lineage begins. The floors
        move only once the batch is in: a failed batch is sent again as it was."""
        from mlflow.entities import Metric
        floors, metrics, cloned = dict(self.floors), [], {}
        for key, value, ts, step in points:
            if key == CLONED:
                floors.clear()
                cloned = {CLONED_TAG: str(ts)}  # before the points: a writer attaching later finds both
            elif not is_repeat(floors, key, step):
                metrics.append(Metric(key, value, ts, step))
                floors[key] = max(step, floors.get(key, -1))
        self._set_tags(cloned)
        if metrics:
            self._send(metrics)
        self._set_tags(hparam_tags(points))
        self.floors = floors
        self.delivered += sum(point[0] != CLONED for point in points)

    def _set_tags(self, tags: dict[str, str]) -> None:
        """Tags that go with points (``hparam_tags`` after them, ``CLONED_TAG`` before): a failure
        keeps both queued, and sending them again is harmless (points a floor holds back still set
        theirs)."""
        if not tags:
            return
        from mlflow.entities import RunTag
        try:
            self.client().log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()], synchronous=True)
        except Exception as exc:
            if not is_invalid(exc):
                raise
            LOGGER.warning(f"mlflow: tags {', '.join(tags)} of run {self.run_id} rejected ({first_line(exc)}); dropped")

    def _send(self, metrics: list) -> None:
        try:
            self.client().log_batch(self.run_id, metrics=metrics, synchronous=True)
        except Exception as exc:
            if not is_invalid(exc):
                raise
            if len(metrics) == 1:
                self._reject(metrics[0], exc)
                return
            half = len(metrics) // 2
            self._send(metrics[:half])
            self._send(metrics[half:])

    def _reject(self, metric, exc: Exception) -> None:
        self.rejected += 1
        if self.rejected == 1:
            LOGGER.warning(f"mlflow: point {metric.key}@{metric.step} rejected "
                           f"({first_line(exc)}); dropped (further ones are counted)")

    def send_file(self, target: str, path: Path) -> None:
        """A staged snapshot as the artifact ``target`` (its folder part is the artifact path)."""
        self.client().log_artifact(self.run_id, str(path), posixpath.dirname(target) or None)

    def terminate(self, status: str, tags: dict[str, str] | None = None) -> None:
        if not self.terminated:
            for key, value in (tags or {}).items():
                self.client().set_tag(self.run_id, key, value)
            self.client().set_terminated(self.run_id, status)
            self.terminated = True


def is_repeat(floors: dict[str, int], key: str, step: int) -> bool:
    """A run logs each (key, step) once per lineage: a worker group that Ray Train restarted between
    an epoch's end and that epoch's checkpoint trains the epoch again, and the first values stay.
    A PBT note (``hparam/<key>``) never repeats: the sweep's driver sends it, journaled once by its
    sequence number, at the trial's epoch count, which need not follow the clone's epochs."""
    return step <= floors.get(key, -1) and not key.startswith(HPARAM)

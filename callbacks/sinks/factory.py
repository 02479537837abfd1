"""A run's sinks, built in one place for ``orchestrator train`` and for every sweep trial.

Which events the workers must forward follows from the sink classes (``Sink.events``) and the
user's driver callbacks, so it is known before any sink exists: a sweep fixes it for all its
trials before the first trial has a run.
"""
from __future__ import annotations

from typing import Iterable

from callbacks.dispatcher import listened_events
from callbacks.sinks.checkpoints import CheckpointSink
from callbacks.sinks.event_log import EventLogSink
from callbacks.sinks.mlflow_sink import MLflowSink
from callbacks.sinks.redact import flatten
from callbacks.sinks.s3 import S3Setup
from trainers.data.lineage import describe_dataset
from trainers.events import EVENTS
from trainers.utils import UserError

SINK_CLASSES = (MLflowSink, EventLogSink, CheckpointSink)


def run_sinks(args, run_id: str, *, experiment: str, tags: dict, mlflow_run: str | None = None,
              parent_run_id: str | None = None) -> list:
    """The MLflow, event-log and checkpoint sinks of run ``run_id``. Without ``mlflow_run`` the
    MLflow sink finds or creates the run itself when it starts (in the callback actor)."""
    s3 = S3Setup.of(args)
    return [mlflow_sink(args, experiment, tags, mlflow_run, parent_run_id),
            EventLogSink(args.storage, run_id, s3=s3),
            CheckpointSink(args.storage, run_id, s3=s3)]


def mlflow_sink(args, experiment: str, tags: dict, mlflow_run: str | None, parent_run_id: str | None) -> MLflowSink:
    """The run's params are its whole config, flattened (``MLflowSink`` redacts secrets)."""
    return MLflowSink(args.tracking_uri, experiment, args.name, params=flatten(args.to_dict()), tags=tags,
                      run_id=mlflow_run, parent_run_id=parent_run_id,
                      ckpt_upload_interval=args.ckpt_upload_interval, log_every_n_steps=args.log_every_n_steps,
                      s3=S3Setup.of(args), dataset=dataset_of(args))


def dataset_of(args) -> dict | None:
    """The run's data set for MLflow's lineage; None when it cannot be described here (lineage never
    stops a run: training reports a missing data set in its own words)."""
    try:
        return describe_dataset(args.data, args.task)
    except (UserError, OSError):
        return None


def class_events(cls) -> frozenset[str]:
    """The events instances of ``cls`` act on, as the callback actor dispatches them: those it
    declares in ``events`` (every event when None) that it has a method for."""
    declared = getattr(cls, "events", None) or EVENTS
    return frozenset(event for event in declared if callable(getattr(cls, event, None)))


def forwarded_events(driver_callbacks: Iterable = (), sink_classes: Iterable = SINK_CLASSES) -> list[str]:
    """What workers forward: every event some sink class or driver callback acts on."""
    wanted = set(listened_events(driver_callbacks))
    for cls in sink_classes:
        wanted |= class_events(cls)
    return sorted(wanted)

"""Driver-side sinks: MLflow, the Parquet event log and checkpoints in object storage.

Each sink has methods named after events taking one record, plus ``flush()`` and
``close(status)``; none blocks on the network, all survive outages of their endpoint.
"""
from callbacks.sinks.checkpoints import CheckpointSink, checkpoint_key
from callbacks.sinks.event_log import EventLogSink, read_event_log
from callbacks.sinks.event_parts import SCHEMA as EVENT_SCHEMA
from callbacks.sinks.mlflow_runs import create_run
from callbacks.sinks.mlflow_sink import MLflowSink
from callbacks.sinks.redact import SecretFilter, flatten, install_log_filter, redact_params
from callbacks.sinks.replay import replay_run
from callbacks.sinks.storage import LocalStore, ObjectStore, S3Store

__all__ = ["MLflowSink", "create_run", "EventLogSink", "read_event_log", "EVENT_SCHEMA",
           "CheckpointSink", "checkpoint_key", "ObjectStore", "LocalStore", "S3Store", "replay_run",
           "redact_params", "flatten", "SecretFilter", "install_log_filter"]

"""Rebuild a run in another MLflow from its Parquet event log (same keys, steps, timestamps).

The event log is the durable record; MLflow is a view of it. Replaying feeds the logged
records, in their original order, through an ``MLflowSink`` that logs metrics only (local
artifact paths in old records may no longer exist), so keys and steps follow the same rules
as live logging.
"""
from __future__ import annotations

from callbacks.sinks.event_log import read_event_log
from callbacks.sinks.mlflow_sink import MLflowSink
from trainers.utils import LOGGER, UserError


def table_records(table) -> list[dict]:
    """Event-log rows back to records (maps become dicts), ordered by time, rank, seq."""
    rows = table.to_pylist()
    for row in rows:
        row["metrics"] = dict(row["metrics"] or ())
        row["artifacts"] = dict(row["artifacts"] or ())
    rows.sort(key=lambda r: (r["time"], r["rank"], r["attempt"], r["seq"]))
    return rows


def replay_run(store_uri: str, run_id: str, tracking_uri: str, experiment: str = "replay",
               run_name: str | None = None, close_timeout: float = 120.0, log_every_n_steps: int = 1) -> str:
    """Re-log run ``run_id`` from the event log in ``store_uri`` into ``tracking_uri``; new run id."""
    table = read_event_log(store_uri, run_id)
    if table.num_rows == 0:
        raise UserError(f"replay: no event log for run={run_id} in {store_uri}")
    sink = MLflowSink(tracking_uri, experiment, run_name or f"replay-{run_id}", params={},
                      tags={"orchestrator.replay_of": run_id}, upload_artifacts=False,
                      event_log=False, find_existing=False, close_timeout=close_timeout,
                      log_every_n_steps=log_every_n_steps)
    for record in table_records(table):
        sink.handle(record["event"], record)
    report = sink.close("FINISHED")
    if report["pending_points"] or report["status"] is None:
        raise UserError(f"replay: run={run_id} not fully replayed to {report.get('tracking_uri')}: "
                        f"{report['pending_points']} points pending (last error: {report['last_error']})")
    LOGGER.info(f"replay: run {run_id} -> MLflow run {report['run_id']} "
                f"({report['delivered_points']} metric points)")
    return report["run_id"]

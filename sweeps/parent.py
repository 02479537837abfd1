"""The sweep's parent run in MLflow and its state file in the sweep folder (for resuming)."""
from __future__ import annotations

import json
from pathlib import Path

from callbacks.journal import Journal
from callbacks.sinks import MLflowSink
from callbacks.sinks.mlflow_runs import RUN_ID_TAG, create_run, mlflow_client, reopen_run
from orchestrator.run_setup import run_description
from sweeps.space import Objective
from trainers.utils import UserError

STATE_FILE = "sweep_state.json"


def sweep_description(sweep, base_args) -> str:
    """The parent run's description in the MLflow UI (``mlflow.note.content``), in markdown."""
    space = ", ".join(f"`{key}` {kind} {values}" for key, (kind, values) in sweep.space.items())
    return "\n".join([
        f"**sweep** of `{base_args.model}` on `{base_args.data}`", "",
        f"- {sweep.num_samples} sample(s), scheduler {sweep.scheduler}, search {sweep.search}, "
        f"objective {Objective(sweep.objective).describe()} ({sweep.mode})",
        f"- space: {space}", "", "Each trial:", "", run_description(base_args)])


def open_parent(tracking_uri: str, experiment: str, name: str, sweep_id: str, params: dict,
                sweep_file: Path, description: str = "") -> str:
    """The sweep's parent run, with the sweep as written as an artifact."""
    tags = {"sweep.id": sweep_id, "sweep.role": "parent", RUN_ID_TAG: f"sweep-{sweep_id}"}
    if description:
        tags["mlflow.note.content"] = description
    run_id = create_run(tracking_uri, experiment, name, params=params, tags=tags)
    mlflow_client(tracking_uri).log_artifact(run_id, str(sweep_file))
    return run_id


def reopen_parent(tracking_uri: str, run_id: str) -> None:
    reopen_run(mlflow_client(tracking_uri), run_id)


def parent_journal(journal_root: str, sweep_id: str, tracking_uri: str, experiment: str, run_id: str) -> Journal:
    """A journal with no records for the parent run: if the sweep driver dies, ``orchestrator
    recover`` finds it unfinished and ends the parent run KILLED, as it ends the trials' runs."""
    name = f"sweep-{sweep_id}"
    journal = Journal(Path(journal_root).expanduser().resolve() / name, name)
    journal.save_sinks([MLflowSink(tracking_uri, experiment, name, run_id=run_id, event_log=False,
                                   upload_artifacts=False)])
    return journal


def close_parent(tracking_uri: str, run_id: str, status: str, files=(), metrics=None, tags=None,
                 journal: Journal | None = None) -> None:
    """Final metrics, tags and files, then the status; the parent's journal says it ended."""
    client = mlflow_client(tracking_uri)
    for key, value in (metrics or {}).items():
        client.log_metric(run_id, key, float(value))
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, str(value))
    for path in files:
        if Path(path).is_file():
            client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, status)
    if journal is not None:
        journal.finish(status, delivered=True)


def save_state(folder: Path, state: dict) -> None:
    (folder / STATE_FILE).write_text(json.dumps(state, indent=2))


def load_state(folder: Path) -> dict:
    path = folder / STATE_FILE
    if not path.is_file():
        raise UserError(f"resume: {folder} holds no sweep ({STATE_FILE} missing)")
    return json.loads(path.read_text())

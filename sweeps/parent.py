"""The sweep's parent run in MLflow and its state file in the sweep folder (for resuming)."""
from __future__ import annotations

import json
from pathlib import Path

from callbacks.dispatcher import Dispatcher
from callbacks.journal import Journal
from callbacks.records import make_record
from callbacks.sinks import MLflowSink
from callbacks.sinks.mlflow_runs import RUN_ID_TAG
from orchestrator.run_setup import mlflow_run_of, run_description, source_tags
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


def parent_orch_id(sweep_id: str) -> str:
    """The parent run's orchestrator run id: its MLflow tag, its journal's name, and how each
    child run names its parent (``PARENT_TAG``)."""
    return f"sweep-{sweep_id}"


class ParentRun:
    """The sweep's parent run, made and fed like a trial's run: an MLflow sink creates it when the
    server answers (on resume finds it again by its ``orchestrator.run_id`` tag and runs it again),
    and its records (the sweep file at the start; the sweep's files and ``best_objective`` at the
    end) go through a dispatcher and journal in this process. So an MLflow outage only delays
    them, and a driver killed outright leaves a journal that ``orchestrator recover`` delivers
    and ends KILLED. ``run_id`` is the MLflow id once the sink knew it, after ``close``."""

    def __init__(self, tracking_uri: str, experiment: str, name: str, sweep_id: str, journal_root: str,
                 params: dict | None = None, description: str = ""):
        self.sweep_id, self.orch_id = sweep_id, parent_orch_id(sweep_id)
        tags = {**source_tags(), "sweep.id": sweep_id, "sweep.role": "parent", RUN_ID_TAG: self.orch_id}
        if description:
            tags["mlflow.note.content"] = description
        self._args = dict(tracking_uri=tracking_uri, experiment=experiment, run_name=name, params=params,
                          tags=tags, event_log=False)
        self.sink = self._sink()
        self.journal = Journal.for_session(journal_root, self.orch_id, [self.sink])
        self.dispatcher = Dispatcher([self.sink], journal=self.journal)
        self.dispatcher.start()
        self.run_id: str | None = None
        self._seq = 0

    def _sink(self, tags: dict | None = None) -> MLflowSink:
        """The parent's sink; with ``tags``, one that also sets them (what recovery rebuilds at the end)."""
        args = dict(self._args)
        if tags:
            args["tags"] = {**args["tags"], **{k: str(v) for k, v in tags.items()}}
        return MLflowSink(**args)

    def send(self, event: str, files=(), metrics: dict | None = None) -> None:
        """One record of the parent (rank 0, files by their names): journaled, then queued by the sink."""
        artifacts = {Path(path).name: str(path) for path in files if Path(path).is_file()}
        record = make_record(run_id=self.orch_id, event=event, rank=0, attempt=0, seq=self._seq, epoch=0,
                             step=0, metrics=metrics, artifacts=artifacts)
        self._seq += 1
        self.dispatcher.ingest([record])

    def close(self, status: str, files=(), metrics=None, tags=None, reason: str | None = None) -> str | None:
        """Final files, metrics (at step 0) and tags, then the status and why (the sink's bounded
        final attempt; what it cannot deliver stays in the journal for ``orchestrator recover``)."""
        if files or metrics:
            self.send("on_fit_epoch_end", files, metrics)
        if tags:
            self.journal.save_sinks([self._sink(tags)])
            self.sink.note_tags(tags)
        self.run_id = mlflow_run_of(self.dispatcher.finish(status, reason))
        return self.run_id


def save_state(folder: Path, state: dict) -> None:
    (folder / STATE_FILE).write_text(json.dumps(state, indent=2))


def load_state(folder: Path) -> dict:
    path = folder / STATE_FILE
    if not path.is_file():
        raise UserError(f"resume: {folder} holds no sweep ({STATE_FILE} missing)")
    return json.loads(path.read_text())

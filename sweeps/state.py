"""Driver-side state of a sweep: one callback actor and one MLflow child run per trial.

The sweep driver starts a trial's callback actor when Tune starts the trial: it holds the
trial's MLflow, event-log and checkpoint sinks, exactly as for ``orchestrator train``, and the
trial's workers forward their records to it. As for a plain Ray run, the actor's MLflow sink
creates the child run (or finds it again by its ``orchestrator.run_id`` tag on a resumed sweep),
under the parent it names by the parent's orchestrator run id, and logs the trial's ``objective``
with its epoch metrics, and the new values of hyperparameters PBT changed (the driver sends them as
a record of its own): all of it waits out an MLflow outage in the sink's queue and the journal,
and the driver makes no MLflow call while trials run. It learns each child's MLflow id from the
actor's final report (or by tag at the end).

Because the driver owns the actor, it outlives the trial: when Tune stops a trial early (ASHA),
kills it or the trial fails, the driver still closes the child run with KILLED or FAILED. A PBT
restart or a retry of the same trial reuses the actor and the child run.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

import ray
import yaml

from callbacks.actor import send_record, start_callback_actor
from callbacks.journal import Journal
from callbacks.records import driver_record
from callbacks.sinks.factory import run_sinks
from callbacks.sinks.mlflow_runs import PARENT_TAG, RUN_ID_TAG, find_run, mlflow_client, scoped_short_retries
from orchestrator.run_setup import mlflow_run_of, run_tags
from orchestrator.session import run_callbacks
from trainers.config import get_cfg
from trainers.utils import LOGGER, UserError

EARLY_STOP = "stopped early by the sweep (its scheduler, time budget or a stopper)"

_SWEEPS: dict[str, "SweepState"] = {}  # sweep id -> live state of this driver process


class SweepState:
    """Driver-side bookkeeping of one sweep: trial actors, child runs, final statuses."""

    def __init__(self, sweep_id: str, parent_orch_id: str, tracking_uri: str, experiment: str,
                 setup, base_args, driver_callbacks=()):
        self.sweep_id, self.parent_orch_id = sweep_id, parent_orch_id  # the parent's orchestrator.run_id
        self.tracking_uri, self.experiment = tracking_uri, experiment
        self.setup, self.base_args, self.driver_callbacks = setup, base_args, list(driver_callbacks)
        self.actors: dict[str, object] = {}
        self.mlflow_runs: dict[str, str] = {}  # trial id -> child run id, from the actor's final report
        self.configs: dict[str, dict] = {}
        self.notes: dict[str, int] = {}  # trial id -> seq of the last record the driver sent its actor
        self.status: dict[str, str] = {}
        self.pending: dict[str, object] = {}  # trial id -> ObjectRef of actor.finish(status)
        self.fatal: str | None = None
        self.interrupted: str | None = None  # why (Ctrl+C, SIGTERM, SIGUSR1): Tune saved the experiment and stopped
        self.errors: dict[str, str] = {}
        self.stopped: set[str] = set()  # trials Tune stopped (scheduler, stopper), not ended by themselves
        self._lock = threading.Lock()

    # -------------------------------------------------------------------- trials
    def trial_args(self, trial_id: str, config: dict):
        return get_cfg(None, self.setup.overrides(trial_id, config))

    def open_trial(self, trial) -> None:
        trial_id, config = trial.trial_id, dict(trial.config)
        if trial_id in self.actors:
            self._log_new_config(trial, config)
            return
        args = self.trial_args(trial_id, config)
        run_id = self.setup.run_id(trial_id)
        sinks = run_sinks(args, run_id, experiment=self.experiment, tags=self.child_tags(args, trial_id))
        callbacks = run_callbacks(args, run_id, sinks, self.driver_callbacks)
        name = self.setup.actor_name(trial_id)
        release_name(name)
        journal = Journal.for_session(args.journal, run_id, sinks)
        self.actors[trial_id] = start_callback_actor(callbacks, name=name, journal=journal)
        self.configs[trial_id] = config
        self.status.pop(trial_id, None)

    def child_tags(self, args, trial_id: str) -> dict:
        """The child run's tags: a plain run's, its own run id (found again on resume), the sweep's,
        and its parent's orchestrator run id (the sink resolves it to the parent's MLflow run)."""
        return {**run_tags(args), RUN_ID_TAG: self.setup.run_id(trial_id), "sweep.id": self.sweep_id,
                "sweep.trial_id": trial_id, PARENT_TAG: self.parent_orch_id}

    def _log_new_config(self, trial, config: dict) -> None:
        """PBT changed the trial's hyperparameters: the trial goes on with them (logged here) from
        a cloned checkpoint, and its child run gets them through the trial's actor (``_note_hparams``)."""
        old = self.configs.get(trial.trial_id, {})
        changed = {k: v for k, v in config.items() if old.get(k) != v}
        self.configs[trial.trial_id] = config
        if not changed:
            return
        LOGGER.info(f"trial {trial.trial_id}: continues with {changed} from a cloned checkpoint")
        self._note_hparams(trial, changed)

    def _note_hparams(self, trial, changed: dict) -> None:
        """The new values as an ``on_hparams`` record of the driver to the trial's actor, at the
        epoch the trial continues from: journaled and delivered by its sinks like the trial's other
        records, so an MLflow outage only delays them. Numbers are its metrics (MLflow:
        ``hparam/<key>``; params are write-once); every value, strings and booleans too, is in the
        file it names (``hparams_file``: the child run's artifact ``hparams-epoch-<n>.yaml``)."""
        trial_id = trial.trial_id
        epoch = int((trial.last_result or {}).get("training_iteration", 0))  # epochs done = the next one
        seq = self.notes[trial_id] = self.notes.get(trial_id, -1) + 1
        try:
            record = hparams_record(self.setup.run_id(trial_id), seq, epoch, changed,
                                    Path(self.setup.trials_dir) / trial_id)
            send_record(self.actors[trial_id], record)
        except Exception as exc:  # the trial goes on; only this note is lost
            LOGGER.warning(f"trial {trial_id}: its callback actor did not take its new hyperparameters: {exc}")

    def objective_history(self, run_id: str) -> list[float]:
        """A trial's reported objectives in order, from its child run (exact re-sends once)."""
        try:
            with scoped_short_retries():
                points = mlflow_client(self.tracking_uri).get_metric_history(run_id, "objective")
        except Exception as exc:
            LOGGER.warning(f"run {run_id}: reading its objective history from MLflow failed: {exc}")
            return []
        return [value for _, _, value in sorted({(m.timestamp, m.step, m.value) for m in points})]

    def recorded(self, trial_id: str) -> tuple[str, str] | None:
        """(child run id, status) of a trial whose actor gave no run id (a resumed sweep's earlier
        trials, a child never created while MLflow was down), from MLflow; None when unknown."""
        try:
            with scoped_short_retries():
                run = find_run(mlflow_client(self.tracking_uri), self.experiment, self.setup.run_id(trial_id))
        except Exception as exc:
            LOGGER.warning(f"trial {trial_id}: looking up its MLflow run failed: {exc}")
            return None
        return (run.info.run_id, run.info.status) if run is not None else None

    def close_trial(self, trial_id: str, status: str) -> None:
        """Ask the trial's actor to close its sinks with ``status`` (does not wait)."""
        with self._lock:
            actor = self.actors.get(trial_id)
            if actor is None or trial_id in self.pending:
                return
            LOGGER.debug(f"trial {trial_id}: closing its runs ({status} unless it finished by itself)")
            self.status[trial_id] = status
            self.pending[trial_id] = actor.finish.remote(status, self._why(trial_id) if status == "KILLED" else None)

    def _why(self, trial_id: str) -> str | None:
        """A KILLED child run's ``orchestrator.end_reason`` (a run that ended by itself keeps its FINISHED)."""
        if self.interrupted:
            return f"sweep {self.interrupted}"
        return EARLY_STOP if trial_id in self.stopped else None

    def finish_all(self, status: str = "KILLED", timeout: float = 300.0) -> dict:
        """Close what is still open with ``status``; wait for every close; stop the actors."""
        for trial_id in list(self.actors):
            self.close_trial(trial_id, status)
        reports = {}
        for trial_id, ref in list(self.pending.items()):
            try:
                reports[trial_id] = ray.get(ref, timeout=timeout)
                self.status[trial_id] = reports[trial_id].get("status") or self.status[trial_id]
                self._note_child_run(trial_id, reports[trial_id])
            except Exception as exc:  # a close that failed must not hide the sweep's result
                LOGGER.warning(f"trial {trial_id}: closing its sinks failed: {exc}")
            ray.kill(self.actors.pop(trial_id))
            self.pending.pop(trial_id)
        for trial_id, report in reports.items():
            for failure in report.get("failures", []):
                LOGGER.warning(f"trial {trial_id}: driver callback {failure['callback']} failed "
                               f"{failure['count']} times in {failure['event']}: {failure['first_error']}")
        return reports

    def _note_child_run(self, trial_id: str, report: dict) -> None:
        """The child's MLflow id, as the actor's MLflow sink made or found it (None if it never could)."""
        run = mlflow_run_of(report)
        if run:
            self.mlflow_runs[trial_id] = run


def hparams_record(run_id: str, seq: int, epoch: int, changed: dict, folder: Path) -> dict:
    """The driver's ``on_hparams`` record of ``changed``: its numbers as metrics, all of it in a
    file in ``folder``."""
    numbers = {k: v for k, v in changed.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return driver_record(run_id, "on_hparams", seq, epoch, numbers,
                         artifacts={"hparams": hparams_file(folder, epoch, changed)})


def hparams_file(folder: Path, epoch: int, changed: dict) -> Path:
    """``changed`` as YAML in the trial's folder, named after the epoch it trains first with them
    (kept there: a recovered journal's record names it)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"hparams-epoch-{epoch}.yaml"
    plain = {key: value.item() if hasattr(value, "item") else value for key, value in changed.items()}
    path.write_text(yaml.safe_dump(plain, sort_keys=True))
    return path


def register(state: SweepState) -> None:
    _SWEEPS[state.sweep_id] = state


def unregister(sweep_id: str) -> None:
    _SWEEPS.pop(sweep_id, None)


def live_state(sweep_id: str) -> "SweepState | None":
    """The state of a sweep this process runs (Tune callbacks are pickled; they keep only the id)."""
    return _SWEEPS.get(sweep_id)


def release_name(name: str, timeout: float = 30.0) -> None:
    """Kill an actor still alive under ``name`` from an earlier incarnation of the trial (a
    sweep resumed in the same Ray session) and wait until the name is free: ``ray.kill`` is
    asynchronous, and a new actor under a taken name fails to start."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            actor = ray.get_actor(name)
        except ValueError:
            return
        if time.monotonic() > deadline:
            raise UserError(f"sweep: the callback actor {name} of an earlier run of this trial did not exit")
        ray.kill(actor)
        time.sleep(0.1)

"""MLflow for a sweep: one parent run, one child run per trial, each trial's sinks on the driver.

One callback actor per trial, started by the sweep driver (a Tune callback, in the driver
process) when Tune starts the trial: it holds the trial's MLflow, event-log and checkpoint
sinks, exactly as for ``orchestrator train``, and the trial's workers forward their records to
it. Because the driver owns it, it outlives the trial: when Tune stops a trial early (ASHA),
kills it or the trial fails, the driver still closes the child run with KILLED or FAILED.
A PBT restart or a retry of the same trial reuses the actor and the child run.
"""
from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import ray
from ray import tune

from callbacks.actor import listened_events, start_callback_actor
from callbacks.sinks import CheckpointSink, EventLogSink, MLflowSink, create_run, flatten
from callbacks.sinks.mlflow_sink import RUN_ID_TAG
from orchestrator.results import ResultSink
from orchestrator.run_setup import run_description, run_tags
from sweeps.space import Objective
from trainers.utils import LOGGER, UserError

STATE_FILE = "sweep_state.json"
_SWEEPS: dict[str, "SweepState"] = {}  # sweep id -> live state of this driver process


def trial_sinks(args, run_id: str, mlflow_run: str, experiment: str, parent_run_id: str) -> list:
    """The same sinks as a plain training run, bound to the trial's child run."""
    return [
        MLflowSink(args.tracking_uri, experiment, args.name, params=flatten(args.to_dict()),
                   tags=run_tags(args), run_id=mlflow_run, parent_run_id=parent_run_id,
                   ckpt_upload_interval=args.ckpt_upload_interval, log_every_n_steps=args.log_every_n_steps),
        EventLogSink(args.storage, run_id),
        CheckpointSink(args.storage, run_id),
    ]


def listened(driver_callbacks) -> list[str]:
    """Events the trial actors' callbacks handle (the forwarders send only those); the sinks
    are lazy, so building them here touches nothing."""
    probe = [MLflowSink("sqlite:///unused.db", "x", "x"), EventLogSink("unused", "x"),
             CheckpointSink("unused", "x"), ResultSink(), *driver_callbacks]
    return sorted(listened_events(probe))


class SweepState:
    """Driver-side bookkeeping of one sweep: trial actors, child runs, final statuses."""

    def __init__(self, sweep_id: str, parent_run_id: str, tracking_uri: str, experiment: str,
                 setup, base_args, driver_callbacks=()):
        self.sweep_id, self.parent_run_id = sweep_id, parent_run_id
        self.tracking_uri, self.experiment = tracking_uri, experiment
        self.setup, self.base_args, self.driver_callbacks = setup, base_args, list(driver_callbacks)
        self.actors: dict[str, object] = {}
        self.mlflow_runs: dict[str, str] = {}
        self.configs: dict[str, dict] = {}
        self.status: dict[str, str] = {}
        self.pending: dict[str, object] = {}  # trial id -> ObjectRef of actor.finish(status)
        self.fatal: str | None = None
        self.interrupted = False  # Ctrl+C / SIGUSR1: Tune saved the experiment and stopped
        self.errors: dict[str, str] = {}
        self._lock = threading.Lock()

    # -------------------------------------------------------------------- trials
    def trial_args(self, trial_id: str, config: dict):
        from trainers.config import get_cfg

        return get_cfg(None, self.setup.overrides(trial_id, config))

    def open_trial(self, trial) -> None:
        trial_id, config = trial.trial_id, dict(trial.config)
        if trial_id in self.actors:
            self._log_new_config(trial, config)
            return
        args = self.trial_args(trial_id, config)
        run_id = self.setup.run_id(trial_id)
        mlflow_run = self._child_run(args, run_id, trial_id)
        callbacks = [*trial_sinks(args, run_id, mlflow_run, self.experiment, self.parent_run_id),
                     ResultSink(), *self.driver_callbacks]
        name = self.setup.actor_name(trial_id)
        release_name(name)
        self.actors[trial_id] = start_callback_actor(callbacks, name=name)
        self.mlflow_runs[trial_id] = mlflow_run
        self.configs[trial_id] = config
        self.status.pop(trial_id, None)

    def _child_run(self, args, run_id: str, trial_id: str) -> str:
        """The trial's child run: found again after a sweep resume, else created now."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.tracking_uri)
        exp = client.get_experiment_by_name(self.experiment)
        if exp is not None:
            found = client.search_runs([exp.experiment_id], max_results=1,
                                       filter_string=f"tags.`{RUN_ID_TAG}` = '{run_id}'")
            if found:
                client.update_run(found[0].info.run_id, status="RUNNING")
                return found[0].info.run_id
        tags = {**run_tags(args), RUN_ID_TAG: run_id, "sweep.id": self.sweep_id, "sweep.trial_id": trial_id}
        return create_run(self.tracking_uri, self.experiment, trial_id, params=flatten(args.to_dict()),
                          tags=tags, parent_run_id=self.parent_run_id)

    def _log_new_config(self, trial, config: dict) -> None:
        """PBT changed the trial's hyperparameters: params are write-once in MLflow, so the new
        values go in as metrics ``hparam/<key>`` at the trial's current epoch (and as tags)."""
        old = self.configs.get(trial.trial_id, {})
        changed = {k: v for k, v in config.items() if old.get(k) != v}
        self.configs[trial.trial_id] = config
        if not changed:
            return
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.tracking_uri)
        run = self.mlflow_runs[trial.trial_id]
        step = int((trial.last_result or {}).get("training_iteration", 0))
        for key, value in changed.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                client.log_metric(run, f"hparam/{key}", float(value), step=step)
            client.set_tag(run, f"hparam.{key}", str(value))
        LOGGER.info(f"trial {trial.trial_id}: continues with {changed} from a cloned checkpoint")

    def log_objective(self, trial_id: str, result: dict) -> None:
        """Each report's objective on the trial's child run, at its epoch: the sweep's durable
        record of it. Tune's own ``result.json`` of a trial restarted from a checkpoint (a retry,
        a resumed sweep) is restored from a copy in storage that can lag the last reports."""
        run, value = self.mlflow_runs.get(trial_id), result.get("objective")
        if run is None or not isinstance(value, (int, float)) or isinstance(value, bool):
            return
        from mlflow.tracking import MlflowClient

        timestamp = int(float(result.get("timestamp") or time.time()) * 1000)  # a re-send is an exact duplicate
        try:
            MlflowClient(self.tracking_uri).log_metric(run, "objective", float(value), timestamp=timestamp,
                                                       step=int(result.get("epoch", 0)))
        except Exception as exc:  # the table falls back to Tune's results
            LOGGER.warning(f"trial {trial_id}: logging its objective to MLflow failed: {exc}")

    def objective_history(self, run_id: str) -> list[float]:
        """A trial's reported objectives in order, from its child run (exact re-sends once)."""
        from mlflow.tracking import MlflowClient

        try:
            points = MlflowClient(self.tracking_uri).get_metric_history(run_id, "objective")
        except Exception as exc:
            LOGGER.warning(f"run {run_id}: reading its objective history from MLflow failed: {exc}")
            return []
        return [value for _, _, value in sorted({(m.timestamp, m.step, m.value) for m in points})]

    def recorded(self, trial_id: str) -> tuple[str, str] | None:
        """(child run id, status) of a trial this process did not run (a resumed sweep's
        earlier trials), from MLflow."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.tracking_uri)
        exp = client.get_experiment_by_name(self.experiment)
        if exp is None:
            return None
        runs = client.search_runs([exp.experiment_id], max_results=1,
                                  filter_string=f"tags.`{RUN_ID_TAG}` = '{self.setup.run_id(trial_id)}'")
        return (runs[0].info.run_id, runs[0].info.status) if runs else None

    def close_trial(self, trial_id: str, status: str) -> None:
        """Ask the trial's actor to close its sinks with ``status`` (does not wait)."""
        with self._lock:
            actor = self.actors.get(trial_id)
            if actor is None or trial_id in self.pending:
                return
            LOGGER.info(f"trial {trial_id}: closing its runs ({status} unless it finished by itself)")
            self.status[trial_id] = status
            self.pending[trial_id] = actor.finish.remote(status)

    def finish_all(self, status: str = "KILLED", timeout: float = 300.0) -> dict:
        """Close what is still open with ``status``; wait for every close; stop the actors."""
        for trial_id in list(self.actors):
            self.close_trial(trial_id, status)
        reports = {}
        for trial_id, ref in list(self.pending.items()):
            try:
                reports[trial_id] = ray.get(ref, timeout=timeout)
                self.status[trial_id] = reports[trial_id].get("status") or self.status[trial_id]
            except Exception as exc:  # a close that failed must not hide the sweep's result
                LOGGER.warning(f"trial {trial_id}: closing its sinks failed: {exc}")
            ray.kill(self.actors.pop(trial_id))
            self.pending.pop(trial_id)
        for trial_id, report in reports.items():
            for failure in report.get("failures", []):
                LOGGER.warning(f"trial {trial_id}: driver callback {failure['callback']} failed "
                               f"{failure['count']} times in {failure['event']}: {failure['first_error']}")
        return reports


class SweepTracker(tune.Callback):
    """Tune callback (driver process). Pickled by Tune with the experiment; it keeps only the
    sweep id and finds the live ``SweepState`` of this process, so a restored sweep uses the
    state of the process that restores it."""

    def __init__(self, sweep_id: str):
        self.sweep_id = sweep_id

    @property
    def state(self) -> SweepState:
        return _SWEEPS[self.sweep_id]

    def on_trial_start(self, iteration, trials, trial, **info):
        self.state.open_trial(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.state.log_objective(trial.trial_id, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        # A trial that finished by itself closed its actor FINISHED already; this KILLED only
        # applies to a trial Tune stopped (scheduler, time budget, stopper).
        self.state.close_trial(trial.trial_id, "KILLED")

    def on_trial_error(self, iteration, trials, trial, **info):
        message = error_line(trial)
        self.state.errors[trial.trial_id] = message
        if is_objective_error(trial):
            self.state.fatal = self.state.fatal or message
        self.state.close_trial(trial.trial_id, "FAILED")


    def setup(self, **info):
        """Note an interruption: Tune's own handlers (installed just before) stop the run and
        keep its state; chained here so the sweep knows it ended unfinished."""
        self._chained = {}
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, getattr(signal, "SIGUSR1", None)):
            previous = signal.getsignal(sig) if sig is not None else None
            if callable(previous):
                self._chained[sig] = previous
                signal.signal(sig, self._noting(previous))

    def _noting(self, previous):
        def handler(signum, frame):
            state = _SWEEPS.get(self.sweep_id)
            if state is not None:
                state.interrupted = True
            previous(signum, frame)
        return handler

    def on_experiment_end(self, trials, **info):
        if threading.current_thread() is threading.main_thread():
            for sig, previous in getattr(self, "_chained", {}).items():
                if getattr(signal.getsignal(sig), "__qualname__", "").startswith("SweepTracker._noting"):
                    signal.signal(sig, previous)


class FatalStopper(tune.Stopper):
    """Ends the whole sweep when a trial shows a mistake every trial would repeat."""

    def __init__(self, sweep_id: str):
        self.sweep_id = sweep_id

    def __call__(self, trial_id, result):
        return False

    def stop_all(self):
        state = _SWEEPS.get(self.sweep_id)
        return bool(state and state.fatal)


def register(state: SweepState) -> None:
    _SWEEPS[state.sweep_id] = state


def unregister(sweep_id: str) -> None:
    _SWEEPS.pop(sweep_id, None)


def _pickled_error(trial):
    """The trial's exception: its local error file (written before ``on_trial_error`` runs; the
    copy in storage, which ``get_pickled_error`` reads, is synced later)."""
    import ray.cloudpickle as cloudpickle

    local = getattr(trial, "pickled_error_file", None)
    if local and Path(local).is_file():
        with open(local, "rb") as f:
            return cloudpickle.load(f)
    return trial.get_pickled_error()


def _root_error(trial):
    err = _pickled_error(trial)
    seen = 0
    while err is not None and seen < 10:
        cause = getattr(err, "cause", None) or err.__cause__
        if cause is None:
            return err
        err, seen = cause, seen + 1
    return err


def is_objective_error(trial) -> bool:
    from sweeps.space import ObjectiveKeyError

    try:
        return isinstance(_root_error(trial), ObjectiveKeyError)
    except Exception:
        return False


def error_line(trial) -> str:
    """The trial's error in one line (the user's message when it is a ``UserError``)."""
    try:
        err = _root_error(trial)
    except Exception:
        err = None
    if isinstance(err, UserError):
        return str(err).splitlines()[0]
    if err is not None:
        text = str(err).strip().splitlines()
        return f"{type(err).__name__}: {text[-1] if text else ''}"
    text = (trial.get_error() or "").strip().splitlines()
    return text[-1] if text else "unknown error"


# ------------------------------------------------------------------------ parent run and state
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
    from mlflow.tracking import MlflowClient

    tags = {"sweep.id": sweep_id, "sweep.role": "parent", RUN_ID_TAG: f"sweep-{sweep_id}"}
    if description:
        tags["mlflow.note.content"] = description
    run_id = create_run(tracking_uri, experiment, name, params=params, tags=tags)
    MlflowClient(tracking_uri).log_artifact(run_id, str(sweep_file))
    return run_id


def reopen_parent(tracking_uri: str, run_id: str) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri).update_run(run_id, status="RUNNING")


def close_parent(tracking_uri: str, run_id: str, status: str, files=(), metrics=None, tags=None) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    for key, value in (metrics or {}).items():
        client.log_metric(run_id, key, float(value))
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, str(value))
    for path in files:
        if Path(path).is_file():
            client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, status)


def save_state(folder: Path, state: dict) -> None:
    (folder / STATE_FILE).write_text(json.dumps(state, indent=2))


def load_state(folder: Path) -> dict:
    path = folder / STATE_FILE
    if not path.is_file():
        raise UserError(f"resume: {folder} holds no sweep ({STATE_FILE} missing)")
    return json.loads(path.read_text())


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

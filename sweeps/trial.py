"""One sweep trial: a Tune function trainable that drives a Ray Train ``TorchTrainer``.

The trial runs no training itself. It builds the Train run (same workers, forwarder and
callback actor as ``orchestrator train``), names it after the trial id and its config, so a
retried trial resumes the Train run from storage, and relays each epoch's report to Tune:
metrics plus the objective, and the checkpoint. Ray's ``TuneReportCallback`` relays metrics
only; here the checkpoint goes to Tune too, which PBT (exploit) and ``Tuner.restore`` need.
"""
from __future__ import annotations

import hashlib
import json
import threading
import time

import ray
from ray import tune
from ray.exceptions import RayActorError
from ray.train import UserCallback
from ray.util.queue import Empty, Queue

from callbacks.actor import send_record
from callbacks.records import driver_record
from trainers.registry import copy_registry
from trainers.config import get_cfg
from orchestrator.ray_launch import epoch_report_metrics, is_epoch_report, make_torch_trainer, nothing_left
from orchestrator.ray_quiet import quiet_console
from sweeps.exploit import ExploitedCheckpoint
from sweeps.space import Objective, ObjectiveKeyError
from trainers.engine.factory import TrainerFactory
from trainers.utils import LOGGER, UserError, user_error_in

_DONE = "__trial_done__"
ACTOR_WAIT_S = 60.0


class TrialSetup:
    """What every trial needs from the sweep driver (pickled once into the trainable)."""

    def __init__(self, sweep_id: str, trainer_cls, callbacks: dict, base: dict, trials_dir: str,
                 workers: int, objective: dict, events: list[str], keep_checkpoints: int = 2):
        self.sweep_id, self.trainer_cls, self.callbacks = sweep_id, trainer_cls, callbacks
        self.base, self.trials_dir, self.workers = dict(base), trials_dir, workers
        self.objective, self.events, self.keep_checkpoints = Objective(objective), list(events), keep_checkpoints
        self.driver_node = ray.get_runtime_context().get_node_id()  # where the callback actors run

    def run_id(self, trial_id: str) -> str:
        return f"{self.sweep_id}-{trial_id}"

    def actor_name(self, trial_id: str) -> str:
        return f"callbacks-{self.run_id(trial_id)}"

    def overrides(self, trial_id: str, config: dict) -> dict:
        """Base config, the trial's sampled values, then the trial's own run folder."""
        return {**self.base, **config, "mode": "train", "project": self.trials_dir, "name": trial_id,
                "exist_ok": True, "resume": False, "num_workers": self.workers}

    def train_run_name(self, trial_id: str, config: dict, start=None) -> str:
        """The Train run of this trial, config and starting checkpoint. Relaunched the same way
        (a retry before any report reached Tune) it resumes that Train run from storage. A
        trial that starts from a Tune checkpoint (a PBT exploit, or a retry or sweep resume
        from its own last report) gets a new Train run that begins at that checkpoint: an
        exploit may even come back to a config this trial had before, with other weights."""
        key = json.dumps([config, getattr(start, "path", None)], sort_keys=True, default=str)
        return f"{self.run_id(trial_id)}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


class TrialReporter(UserCallback):
    """Runs in the Train controller: hands rank 0's epoch metrics and the checkpoint to the trial.

    The queue holds one item, so the Train run waits for Tune to take each epoch, as with
    ``ray.tune.integration.ray_train.TuneReportCallback``.
    """

    def __init__(self, queue: Queue):
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint):
        if is_epoch_report(metrics[0]):  # a preemption's mid-epoch report is no result for Tune
            self.queue.put((dict(metrics[0]), checkpoint))


class ObjectiveLogger:
    """A worker callback (``on_fit_epoch_end``, after the user's, before the event forwarder's):
    the sweep's objective joins the epoch's metrics (``trainer.log``), so rank 0's record carries it
    and the trial's MLflow sink logs ``objective`` at the epoch like any epoch metric, buffered and
    journaled with the rest. Computed from the metrics the epoch's report hands Tune, so it is the
    value Tune ranks. A key the trainer does not report is left to ``_relay``, which stops the
    sweep with its message."""

    def __init__(self, objective: Objective):
        self.objective = objective

    def __call__(self, trainer) -> None:
        if trainer.final_eval:
            return
        try:
            trainer.log({"objective": self.objective(epoch_report_metrics(trainer))})
        except ObjectiveKeyError:
            pass


def trial_callbacks(setup: TrialSetup) -> dict:
    """The user's worker callbacks, then the objective's."""
    registry = copy_registry(setup.callbacks)
    registry.setdefault("on_fit_epoch_end", []).append(ObjectiveLogger(setup.objective))
    return registry


def find_actor(name: str, timeout: float = ACTOR_WAIT_S):
    """The trial's callback actor, started by the sweep driver when Tune started the trial."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return ray.get_actor(name)
        except ValueError:
            if time.monotonic() > deadline:
                raise UserError(f"sweep: the trial's callback actor {name} was not started by the driver") from None
            time.sleep(0.2)


def run_trial(config: dict, setup: TrialSetup) -> None:
    """The Tune trainable: one Train run, its epoch reports relayed to Tune."""
    quiet_console()
    trial_id = tune.get_context().get_trial_id()
    overrides = setup.overrides(trial_id, config)
    args = get_cfg(None, overrides)
    actor = find_actor(setup.actor_name(trial_id))
    factory = TrainerFactory(setup.trainer_cls, overrides, trial_callbacks(setup))
    start = tune.get_checkpoint()
    if start is not None and nothing_left(start, args.epochs):
        LOGGER.info(f"trial {trial_id}: its checkpoint {start.path} ends the training; nothing left to run")
        ray.get(actor.finish.remote("FINISHED"))
        return
    if start is not None:
        note_clone(actor, setup.run_id(trial_id), start)
    queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
    trainer = make_torch_trainer(
        factory, args, actor, setup.run_id(trial_id), setup.events,
        name=setup.train_run_name(trial_id, config, start), callbacks=[TrialReporter(queue)],
        start_from=ExploitedCheckpoint(start, args.to_dict()) if start is not None else None,
        keep_checkpoints=setup.keep_checkpoints, driver_node=setup.driver_node)
    outcome: dict = {}
    thread = threading.Thread(target=_fit, args=(trainer, queue, outcome), daemon=True, name="train-fit")
    thread.start()
    _relay(queue, setup.objective, thread)
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    # Finished by itself: close the child run FINISHED now. A trial Tune stops early never gets
    # here; the driver then closes it KILLED (the first status an actor gets is the one kept).
    ray.get(actor.finish.remote("FINISHED"))


def note_clone(actor, run_id: str, start) -> None:
    """A start from another trial's checkpoint (a PBT exploit) begins a new lineage of the child
    run's points: its epochs from there are logged again, where a restart's repeats are dropped
    (``callbacks/sinks/mlflow_writer.py``). The ``on_clone`` record that says so, at the first
    epoch trained from it, is journaled before the Train run starts, so it precedes all its records.
    A start from the trial's own checkpoint (a retry, a resumed sweep) sends none."""
    meta = start.get_metadata()
    if meta.get("run_id") in (None, run_id):
        return
    attempt = time.time_ns() // 1_000_000  # this start's own stream
    send_record(actor, driver_record(run_id, "on_clone", 0, int(meta["epoch"]) + 1, {}, attempt=attempt))


def _fit(trainer, queue: Queue, outcome: dict) -> None:
    try:
        trainer.fit()
    except BaseException as exc:  # handed to the trial's thread, which raises it
        outcome["error"] = user_error_in(exc) or exc  # a user error inside the Train run, as raised
    finally:
        try:
            queue.put((_DONE, None))
        except RayActorError:  # the trial is being torn down (Tune removed its placement group): nobody waits
            pass


def _relay(queue: Queue, objective: Objective, thread: threading.Thread) -> None:
    """Each epoch: the objective added, metrics and checkpoint reported to Tune (blocks until
    Tune took it; Tune may stop the trial here)."""
    while True:
        try:
            metrics, checkpoint = queue.get(timeout=1.0)
        except Empty:
            if not thread.is_alive():
                return
            continue
        if metrics == _DONE:
            return
        metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        metrics["objective"] = objective(metrics)
        tune_ckpt = tune.Checkpoint(checkpoint.path, checkpoint.filesystem) if checkpoint else None
        tune.report(metrics, checkpoint=tune_ckpt)

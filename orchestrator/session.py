"""One training run on the driver, whichever backend trains it.

Every run goes through the same steps: a run id, the run folder fixed before any worker starts,
the MLflow run and the sinks, the driver callbacks started, training, the sinks closed with the
run's status, best.pt registered. A backend only says where the callbacks run and where training
runs: this process (``local_run.LocalBackend``) or Ray Train workers (``ray_launch.RayBackend``).

A backend has ``defer_run`` (whether the callback actor, not the driver, creates the MLflow run),
``connect(args)``, ``start(session)``, ``train(session)`` (it stops at a step boundary once
``session.stops`` has a signal, ``orchestrator/stops.py``), ``finish(session, status, reason) ->
report`` and ``outcome() -> dict`` (what it adds to the result).
"""
from __future__ import annotations

from callbacks.journal import Journal
from callbacks.sinks.factory import SINK_CLASSES, forwarded_events
from callbacks.system_metrics import node_sampler
from trainers.config import worker_counts
from trainers.utils import LOGGER, user_error_in
from orchestrator.recovery import recover
from orchestrator.console import EpochConsole
from orchestrator.results import ResultSink
from orchestrator.stops import RunStopped, StopSignals
from orchestrator.publishing import publish_run
from orchestrator.run_setup import (continued_run_id, mlflow_run_of, new_run_id, remember_run_id, resolve_run,
                                    start_tracking)


def run_events(driver_callbacks) -> list[str]:
    """What a run's workers forward: the events of its sinks, its ResultSink, its console and the
    user's callbacks."""
    return forwarded_events(driver_callbacks, (*SINK_CLASSES, ResultSink, EpochConsole))


def run_callbacks(args, run_id: str, sinks: list, driver_callbacks, console: EpochConsole | None = None) -> list:
    """A run's driver callbacks in dispatch order: its node's sampler (``node_sampler``), its sinks,
    a ResultSink, its console, the user's."""
    return [*node_sampler(args, run_id), *sinks, ResultSink(), *([console] if console else []), *driver_callbacks]


def train_run(factory, args, driver_callbacks) -> dict:
    """Train on Ray Train workers (``num_workers > 0``) or in this process; see ``RunSession.run``."""
    return RunSession(factory, args, driver_callbacks).run()


def backend_for(args):
    """Ray's training modules are imported only for a Ray run (seconds of start-up otherwise)."""
    if worker_counts(args.num_workers)[1] > 0:
        from orchestrator.ray_launch import RayBackend

        return RayBackend()
    from orchestrator.local_run import LocalBackend

    return LocalBackend()


def recover_before_resume(journal_root: str) -> None:
    for line in recover(journal_root):
        LOGGER.info(f"recover: {line}")


def end_reason(exc: BaseException) -> str:
    """The one line a failed run keeps as its reason."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


class RunSession:
    """A run's set-up (run id, args with the fixed run folder, sinks, callbacks) and its one
    way from start to result."""

    def __init__(self, factory, args, driver_callbacks):
        factory.overrides.update(resolve_run(args, given=set(factory.overrides)))
        self.factory = factory
        self.args = type(args)(**{**args.to_dict(), **factory.overrides})
        self.backend = backend_for(self.args)  # a resumed run's workers are its checkpoint's
        self.backend.connect(self.args)  # an unreachable cluster fails before a run is created
        if self.args.resume:  # the run resumed may have died with its driver: end it first
            recover_before_resume(self.args.journal)
        self.run_id = continued_run_id(self.args) or new_run_id()  # resume=: the same run, continued
        self.sinks = start_tracking(self.args, self.run_id, defer_run=self.backend.defer_run)
        remember_run_id(self.args, self.run_id)  # once the endpoints answered: a bad one leaves no folder
        self.journal = Journal.for_session(self.args.journal, self.run_id, self.sinks)
        self.driver_callbacks = list(driver_callbacks)
        self.console = EpochConsole(self.args.epochs) if self.args.verbose else None
        self.callbacks = run_callbacks(self.args, self.run_id, self.sinks, self.driver_callbacks, self.console)
        self.events = run_events(driver_callbacks)
        self.report: dict = {}
        self.logged_model: str | None = None  # the MLflow logged model of best.pt, once finished
        self.stops: StopSignals | None = None  # while training: what the backend's trainer watches

    def run(self) -> dict:
        """Train; close the sinks with FINISHED, FAILED or KILLED (Ctrl+C); log (and register) best.pt.
        Returns metrics, per_class (the final evaluation's, ``trainers.metrics.base``), best (best.pt's
        path), run_id, mlflow_run (its MLflow run id), logged_model (best.pt's MLflow model id), report
        and what the backend adds."""
        self.report = self._train()
        self.logged_model = publish_run(self.args, self.run_id, mlflow_run_of(self.report), self.results.get("best"),
                                        self.results.get("metrics", {}), self.journal.dir)
        return self.outcome()

    def _train(self) -> dict:
        status, reason = "FAILED", None
        try:
            with StopSignals() as self.stops:
                self.backend.start(self)  # in here: a trainer that fails to build ends the run FAILED
                self.backend.train(self)
            status = "FINISHED"
        except KeyboardInterrupt as exc:  # Ray's waits turn our RunStopped into a bare KeyboardInterrupt
            status, reason = "KILLED", (self.stops and self.stops.reason) or str(exc) or "interrupted (Ctrl+C)"
            raise RunStopped(reason) from None
        except BaseException as exc:  # a UserError wrapped by Ray (a worker's, the actor's) as raised
            error = user_error_in(exc) or exc
            reason = end_reason(error)
            if error is exc:
                raise
            raise error from None
        finally:
            report = self.backend.finish(self, status, reason)
        return report

    @property
    def results(self) -> dict:
        """What the run's ResultSink reported when it closed."""
        return self.report.get("sinks", {}).get(ResultSink.__name__, {})

    def outcome(self) -> dict:
        results = self.results
        return {"metrics": results.get("metrics", {}), "per_class": results.get("per_class", {}),
                "best": results.get("best"), "run_id": self.run_id, "mlflow_run": mlflow_run_of(self.report),
                "logged_model": self.logged_model, "report": self.report, **self.backend.outcome()}

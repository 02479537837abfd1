"""Tune's hooks into a sweep: trial start/end/error and an interruption go to the
sweep's live state; a mistake every trial would repeat stops the whole sweep."""
from __future__ import annotations

import signal
import threading

from ray import tune

from orchestrator.stops import SIGNALS
from sweeps.errors import error_line, is_objective_error
from sweeps.report import trial_line
from sweeps.state import SweepState, live_state


class SweepTracker(tune.Callback):
    """Tune callback (driver process). Pickled by Tune with the experiment; it keeps only the
    sweep id and finds the live ``SweepState`` of this process, so a restored sweep uses the
    state of the process that restores it."""

    def __init__(self, sweep_id: str):
        self.sweep_id = sweep_id

    @property
    def state(self) -> SweepState:
        return live_state(self.sweep_id)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.state.open_trial(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        """A result marked done is one at which Tune stopped the trial (its scheduler, a stopper):
        a trial that ends by itself reports no such result (Tune marks its end after the last)."""
        if result.get("done"):
            self.state.stopped.add(trial.trial_id)

    def on_trial_complete(self, iteration, trials, trial, **info):
        # A trial that finished by itself closed its actor FINISHED already; this KILLED only
        # applies to a trial Tune stopped (scheduler, time budget, stopper).
        self.state.close_trial(trial.trial_id, "KILLED")
        print(trial_line(trial, stopped=trial.trial_id in self.state.stopped), flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        message = error_line(trial)
        print(trial_line(trial, message), flush=True)
        self.state.errors[trial.trial_id] = message
        if is_objective_error(trial):
            self.state.fatal = self.state.fatal or message
        self.state.close_trial(trial.trial_id, "FAILED")

    def setup(self, **info):
        """Note an interruption: Tune's own handlers (installed just before) stop the run and
        keep its state; chained here so the sweep knows it ended unfinished. SIGTERM (``ray job
        stop``, a scheduler's kill) stops it as Ctrl+C does: Tune takes only SIGINT and SIGUSR1,
        and Ray's own SIGTERM handler ended the driver at once, its runs left to the orphan rules."""
        self._chained = {}
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, getattr(signal, "SIGUSR1", None)):
            previous = signal.getsignal(sig) if sig is not None else None
            if callable(previous):
                self._chained[sig] = previous
                signal.signal(sig, self._noting(previous))
        if signal.SIGINT in self._chained:
            self._chained[signal.SIGTERM] = signal.getsignal(signal.SIGTERM) or signal.SIG_DFL  # None: set in C
            signal.signal(signal.SIGTERM, self._noting(self._chained[signal.SIGINT]))

    def _noting(self, previous):
        def handler(signum, frame):
            state = live_state(self.sweep_id)
            if state is not None:
                state.interrupted = f"stopped by {SIGNALS.get(signum, signal.Signals(signum).name)}"
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
        state = live_state(self.sweep_id)
        return bool(state and state.fatal)

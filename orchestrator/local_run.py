"""Run a trainer in this process (``num_workers=0``): same records and sinks, no Ray."""
from __future__ import annotations

from callbacks.actor import Dispatcher, listened_events
from orchestrator.results import ResultSink
from orchestrator.run_setup import mlflow_run_of, new_run_id, register_best, resolve_run, start_tracking


class LocalForwarder:
    """The in-process twin of the worker forwarder: records go straight to a Dispatcher."""

    def __init__(self, dispatcher: Dispatcher, run_id: str, events):
        self.dispatcher, self.run_id, self.events = dispatcher, run_id, set(events)
        self.seq = 0

    def attach(self, registry: dict) -> None:
        for event in self.events:
            registry[event].append(self._sender(event))

    def _sender(self, event: str):
        def forward(owner):
            row = owner.record_row(event)  # built as on a Ray worker
            self.dispatcher.ingest_rows((self.run_id, -1, 0), self.seq, [row])
            self.seq += 1
        forward.__qualname__ = f"forward_{event}"
        return forward


def run_in_process(factory, args, driver_callbacks):
    """Train here; driver callbacks and sinks see the same records as on Ray. Returns (trainer, metrics)."""
    run_id = new_run_id()
    factory.overrides.update(resolve_run(args))
    args = type(args)(**{**args.to_dict(), **factory.overrides})
    result = ResultSink()
    sinks = start_tracking(args, run_id)
    callbacks = [*sinks, result, *driver_callbacks]
    dispatcher = Dispatcher(callbacks)
    dispatcher.start()  # sinks connect in their own threads while the trainer sets up
    trainer = factory()
    LocalForwarder(dispatcher, run_id, listened_events(callbacks)).attach(trainer.callbacks)
    status = "FAILED"
    try:
        trainer.train()
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        report = dispatcher.finish(status)
    register_best(args, mlflow_run_of(report), result.metrics)
    return trainer, result.metrics

"""Train in this process (``num_workers=0``): same records and sinks as on Ray, no Ray."""
from __future__ import annotations

from callbacks.dispatcher import Dispatcher


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


class LocalBackend:
    """A ``RunSession`` backend: the driver callbacks in a Dispatcher, the trainer here.

    The driver creates the MLflow run itself (``defer_run`` False): there is no actor whose
    start-up could hide that cost, and the run should exist even if the trainer's set-up fails.
    """

    defer_run = False

    def __init__(self):
        self.dispatcher = self.trainer = None

    def connect(self) -> None:
        """Nothing to reach: training runs in this process."""

    def start(self, session) -> None:
        self.dispatcher = Dispatcher(session.callbacks)
        self.dispatcher.start()  # sinks connect in their own threads while the trainer sets up
        self.trainer = session.factory()
        LocalForwarder(self.dispatcher, session.run_id, session.events).attach(self.trainer.callbacks)

    def train(self, session) -> None:
        self.trainer.train()

    def finish(self, session, status: str) -> dict:
        return self.dispatcher.finish(status)

    def outcome(self) -> dict:
        """The trainer itself (``Model.trainer``), and its best.pt (last.pt when none was saved)."""
        best = self.trainer.best if self.trainer.best.is_file() else self.trainer.last
        return {"trainer": self.trainer, "best": best}

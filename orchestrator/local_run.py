"""Train in this process (``num_workers=0``): same records and sinks as on Ray, no Ray."""
from __future__ import annotations

import time

import torch

from callbacks.dispatcher import Dispatcher
from callbacks.records import CLOSE_EVENT, FLUSH_EVENTS
from orchestrator.console import print_lines
from orchestrator.stops import RunStopped
from trainers.engine.distributed import select_device
from trainers.engine.preemption import Preempted
from trainers.utils import UserError


class LocalForwarder:
    """The in-process twin of the worker forwarder: rows built as on a Ray worker, handed to a
    Dispatcher in batches (each batch is one journal entry and one fsync), at the same flush
    points as on Ray: a full batch, a second's age (half a second on Ray: many ranks), the end of an
    epoch, of a fit, teardown."""

    def __init__(self, dispatcher: Dispatcher, run_id: str, events, max_batch: int = 1000,
                 flush_interval: float = 1.0):
        self.dispatcher, self.run_id, self.events = dispatcher, run_id, set(events)
        self.max_batch, self.flush_interval = max_batch, flush_interval
        self.stream = (run_id, -1, time.time_ns() // 1_000_000)  # a resumed run's session: a new stream
        self.seq = 0
        self._rows: list = []
        self._due = time.monotonic() + flush_interval

    def attach(self, registry: dict) -> None:
        for event in set(self.events) | FLUSH_EVENTS | {CLOSE_EVENT}:
            registry[event].append(self._sender(event))

    def _sender(self, event: str):
        forwarded, flushes = event in self.events, event in FLUSH_EVENTS or event == CLOSE_EVENT

        def forward(owner):
            if forwarded:
                self._rows.append(owner.record_row(event))  # built as on a Ray worker
            if flushes or len(self._rows) >= self.max_batch or time.monotonic() >= self._due:
                self.flush()
        forward.__qualname__ = f"forward_{event}"
        return forward

    def flush(self) -> None:
        if self._rows:
            rows, self._rows = self._rows, []
            self.dispatcher.ingest_rows(self.stream, self.seq, rows)
            self.seq += len(rows)
        self._due = time.monotonic() + self.flush_interval


class LocalBackend:
    """A ``RunSession`` backend: the driver callbacks in a Dispatcher, the trainer here.

    The driver creates the MLflow run itself (``defer_run`` False): there is no actor whose
    start-up could hide that cost, and the run should exist even if the trainer's set-up fails.
    """

    defer_run = False

    def __init__(self):
        self.dispatcher = self.trainer = self.forwarder = None

    def connect(self, args) -> None:
        """Nothing to reach: training runs in this process, whose devices are known now, before a
        run is made."""
        if args.use_gpu and not args.device and not torch.cuda.is_available():
            raise UserError(f"config key 'use_gpu': this run trains in this process (num_workers=0), where "
                            f"torch {torch.__version__} finds no cuda device; use_gpu=false trains on its CPU")
        select_device(args.device)

    def start(self, session) -> None:
        self.dispatcher = Dispatcher(session.callbacks, journal=session.journal)
        self.dispatcher.start()  # sinks connect in their own threads while the trainer sets up
        self.trainer = session.factory()
        self.forwarder = LocalForwarder(self.dispatcher, session.run_id, session.events)
        self.forwarder.attach(self.trainer.callbacks)
        if session.console is not None:  # after the forwarder's flush: the epoch's line is made
            self.trainer.add_callback("on_fit_epoch_end", lambda trainer: print_lines(session.console.take_lines()))

    def train(self, session) -> None:
        """A stop signal ends training at the next optimizer step with a mid-epoch last.pt, as a
        preemption does, so ``resume=`` loses no batch; evaluation stops at its next batch."""
        session.stops.watch(self.trainer.callbacks, ("on_val_batch_end", "on_predict_batch_end"))
        self.trainer.preemption_notice = session.stops.notice
        try:
            self.trainer.train()
        except Preempted:
            raise RunStopped(session.stops.reason) from None

    def finish(self, session, status: str, reason: str | None = None) -> dict:
        if self.dispatcher is None:  # start failed before the sinks were up: nothing to close
            return {}
        if self.forwarder is not None:
            self.forwarder.flush()
        return self.dispatcher.finish(status, reason)

    def outcome(self) -> dict:
        """The trainer itself (``Model.trainer``), and its best.pt (last.pt when none was saved)."""
        best = self.trainer.best if self.trainer.best.is_file() else self.trainer.last
        return {"trainer": self.trainer, "best": best}

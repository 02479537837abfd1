"""Run a trainer in this process (``num_workers=0``), with driver callbacks fed directly."""
from __future__ import annotations

import uuid

from callbacks.events import EVENTS
from callbacks.records import make_record


class LocalDispatch:
    """In-process stand-in for the worker->actor path: same records, delivered synchronously."""

    def __init__(self, driver_callbacks, run_id: str):
        self.driver_callbacks = list(driver_callbacks)
        self.run_id = run_id
        self.seq = 0

    def attach(self, registry: dict) -> None:
        events = {event for event, _ in self.driver_callbacks}
        for event in EVENTS:
            if event in events:
                registry[event].append(self._sender(event))

    def _sender(self, event: str):
        def send(owner):
            fields = owner.record_fields(event) if hasattr(owner, "record_fields") else {}
            record = make_record(run_id=self.run_id, event=event, rank=-1, attempt=0, seq=self.seq,
                                 epoch=fields.get("epoch", 0), step=fields.get("step", 0),
                                 metrics=fields.get("metrics"), artifacts=fields.get("artifacts"),
                                 final_eval=fields.get("final_eval", False))
            self.seq += 1
            for name, fn in self.driver_callbacks:
                if name == event:
                    fn(record)
        send.__qualname__ = f"driver dispatch of {event}"
        return send


def run_in_process(factory, args, driver_callbacks):
    trainer = factory()
    if driver_callbacks:
        LocalDispatch(driver_callbacks, run_id=uuid.uuid4().hex).attach(trainer.callbacks)
    metrics = trainer.train()
    return trainer, metrics

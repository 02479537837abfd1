"""Shared test helpers: small fits that record every event."""
from callbacks.events import EVENTS

QUICK = dict(data="digits", imgsz=16, batch=16, nbs=32, fraction=0.05, epochs=2, verbose=False,
             plots=False, workers=0, seed=0)


class EventRecorder:
    """Registers for every event; remembers (event, epoch, final_eval)."""

    def __init__(self):
        self.events = []

    def register(self, target):
        for event in EVENTS:
            target.add_callback(event, self._make(event))
        return self

    def _make(self, event):
        def record(owner):
            trainer = getattr(owner, "parent", None) or owner
            self.events.append((event, getattr(trainer, "epoch", None), getattr(trainer, "final_eval", False)))
        record.__name__ = f"record_{event}"
        return record

    @property
    def names(self):
        return [e for e, _, _ in self.events]

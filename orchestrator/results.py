"""A driver callback that keeps what ``Model.train`` returns: final metrics and best.pt's path."""
from __future__ import annotations


class ResultSink:
    """Rank 0's latest epoch metrics and the best checkpoint; ``close`` puts both in the report."""

    events = frozenset({"on_fit_epoch_end", "on_train_end"})  # what workers must forward for it

    def __init__(self):
        self.metrics: dict = {}
        self.best: str | None = None

    def on_fit_epoch_end(self, record: dict) -> None:
        if record["rank"] <= 0:
            self.metrics = dict(record["metrics"])

    def on_train_end(self, record: dict) -> None:
        self.best = record["artifacts"].get("best") or self.best

    def close(self, status: str) -> dict:
        return {"metrics": self.metrics, "best": self.best, "status": status}

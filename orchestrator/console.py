"""The run's console on the driver: a header, then one line per epoch (losses, the task's main
metrics, the epoch's time, ETA), built from rank 0's forwarded records.

Workers print no progress of their own to the user (Ray would forward every line of every rank):
the same records that feed MLflow feed this. Under Ray the console runs in the callback actor and
the driver prints what it took (``take_lines``); in process the backend prints after each epoch.
"""
from __future__ import annotations

# Column names a person reads, for the record's metric keys.
SHORT = {"metrics/precision(B)": "P", "metrics/recall(B)": "R", "metrics/mAP50(B)": "mAP50",
         "metrics/mAP50-95(B)": "mAP50-95", "metrics/accuracy_top1": "top1", "metrics/accuracy_top5": "top5"}
WIDTH = 10


def columns_of(metrics: dict) -> list[str]:
    """The training losses, then the task's main metrics, in the record's order."""
    losses = [k for k in metrics if k.startswith("train/")]
    return losses + [k for k in SHORT if k in metrics]


def title(key: str) -> str:
    return SHORT.get(key) or key.split("/", 1)[-1]


def duration(seconds: float) -> str:
    if seconds < 9.95:
        return f"{max(0.0, seconds):.1f}s"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes}m{seconds:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def cell(value) -> str:
    return f"{value:>{WIDTH}.4g}" if isinstance(value, (int, float)) else f"{'-':>{WIDTH}}"


class EpochConsole:
    """A driver callback: rank 0's ``on_fit_epoch_end`` records as lines of one table."""

    events = frozenset({"on_train_start", "on_resize", "on_fit_epoch_end"})  # what workers must forward for it

    def __init__(self, epochs: int):
        self.epochs = epochs
        self.lines: list[str] = []
        self.columns: list[str] | None = None
        self._taken = 0
        self._since: float | None = None  # the time of the last epoch's end (or of the start)
        self._durations: list[float] = []

    def on_train_start(self, record: dict) -> None:
        if record["rank"] <= 0:
            self._since = record["time"]

    def on_resize(self, record: dict) -> None:
        """A line between the epochs where Ray resized an elastic run: the rows after it are epochs
        at the new size (the first one again, when the resize interrupted it)."""
        if record["rank"] <= 0:
            sizes = record["metrics"]
            self.lines.append(f"world size {sizes['world_size_before']:.0f} -> {sizes['world_size']:.0f} "
                              f"from epoch {record['epoch'] + 1}")

    def on_fit_epoch_end(self, record: dict) -> None:
        if record["rank"] > 0:
            return
        if self.columns is None:
            self.columns = columns_of(record["metrics"])
            self.lines.append(self._header())
        self.lines.append(self._final(record) if record["final_eval"] else self._row(record))

    def _header(self) -> str:
        names = ["epoch", *map(title, self.columns), "time", "ETA"]
        return "".join(f"{name:>{WIDTH}}" for name in names)

    def _row(self, record: dict) -> str:
        took = record["time"] - self._since if self._since is not None else 0.0
        self._since = record["time"]
        self._durations.append(took)
        left = (self.epochs - record["epoch"] - 1) * sum(self._durations) / len(self._durations)
        return (f"{record['epoch'] + 1:>{WIDTH - 4}}/{self.epochs:<3}" + self._cells(record)
                + f"{duration(took):>{WIDTH}}{duration(left):>{WIDTH}}")

    def _final(self, record: dict) -> str:
        return f"{'best.pt':>{WIDTH}}" + self._cells(record)

    def _cells(self, record: dict) -> str:
        return "".join(cell(record["metrics"].get(key)) for key in self.columns)

    def take_lines(self) -> list[str]:
        """The lines not taken yet (the driver prints them)."""
        new, self._taken = self.lines[self._taken:], len(self.lines)
        return new


def print_lines(lines: list[str]) -> None:
    for line in lines:
        print(line, flush=True)

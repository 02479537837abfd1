"""Per-epoch history: ``results.csv`` (one row per epoch) and its ``results.png`` plot."""
from __future__ import annotations

import csv
from pathlib import Path


class History:
    """Keeps the rows in memory and rewrites the CSV, so columns added later (custom metrics) fit."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.rows: list[dict] = []
        if self.path.is_file():  # resume: continue the same file
            with self.path.open() as f:
                self.rows = [{k: _num(v) for k, v in row.items()} for row in csv.DictReader(f)]

    def add(self, row: dict) -> None:
        self.rows = [r for r in self.rows if r.get("epoch") != row["epoch"]] + [row]
        columns = list(dict.fromkeys(k for r in self.rows for k in r))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)

    def column(self, key: str) -> list:
        return [r.get(key) for r in self.rows]

    def plot(self) -> Path | None:
        """Draw every column against epoch, also one the first rows lack (val=False validates only
        the last epoch); returns the PNG path."""
        if not self.rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keys = [k for k in dict.fromkeys(k for r in self.rows for k in r) if k not in {"epoch", "time"}]
        if not keys:
            return None
        cols = min(5, len(keys))
        rows = (len(keys) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
        epochs = [r["epoch"] for r in self.rows]
        for ax, key in zip(axes.flat, keys):
            ax.plot(epochs, [r.get(key, float("nan")) for r in self.rows], marker=".")
            ax.set_title(key, fontsize=8)
        for ax in list(axes.flat)[len(keys):]:
            ax.axis("off")
        fig.tight_layout()
        out = self.path.with_name("results.png")
        fig.savefig(out, dpi=120)
        plt.close(fig)
        return out


def _num(value: str):
    try:
        f = float(value)
        return int(f) if f.is_integer() and "." not in value else f
    except (TypeError, ValueError):
        return value

"""Where a run's files go. One rule, because three places need it: the trainer writes there, the
driver fixes the folder before the workers start (so every rank and every restart share it), and
a sweep numbers its own folder the same way."""
from __future__ import annotations

from pathlib import Path

from trainers.utils import UserError


def project_dir(args) -> Path:
    """``project``, else ``runs/<task>`` (``runs/train`` without a task)."""
    return Path(args.project or Path("runs") / (args.task or "train"))


def run_dir(args, default: str = "train") -> Path:
    """``<project>/<name>`` (``name`` else ``default``: a standalone val's ``val``, a prediction's
    ``predict``), numbered (``train2``, ``train3``, ...) unless ``exist_ok``."""
    return increment_path(project_dir(args) / (args.name or default), args.exist_ok)


def increment_path(path: Path, exist_ok: bool = False) -> Path:
    """``runs/x/train`` -> ``train2``, ``train3``, ... unless ``exist_ok``."""
    if exist_ok or not path.exists():
        return path
    n = 2
    while path.with_name(f"{path.name}{n}").exists():
        n += 1
    return path.with_name(f"{path.name}{n}")


def latest_checkpoint(args) -> Path:
    """The newest ``last.pt`` under ``project`` (under all of ``runs`` without one: ``resume=True``
    should find the last run whatever its task)."""
    root = Path(args.project or "runs")
    store = Path(str(args.storage)).resolve() if not str(args.storage).startswith("s3://") else None
    found = sorted((p for p in root.rglob("last.pt") if store is None or store not in p.resolve().parents),
                   key=lambda p: p.stat().st_mtime)  # not the object store's copies (runs/store/...)
    if not found:
        raise UserError(f"resume=True but no last.pt was found under {root}; pass resume=<path to last.pt>")
    return found[-1]

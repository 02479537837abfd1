"""Runs whose driver died: deliver what their journals hold and mark them ended.

A run's journal (``callbacks/journal.py``) holds every record its workers had acknowledged and
the sinks that deliver them. A run whose journal has no end (the driver, the actor and the local
Ray died with it), or whose sinks had not delivered everything when it ended (an outage that
outlasted the run), is taken over here: its sinks are rebuilt, handed the entries after their
watermarks, and closed with the run's status (KILLED when it never ended). Before that, what is
left of a killed driver's own local Ray is stopped (``orchestrator/embedded_ray.py``).
"""
from __future__ import annotations

from pathlib import Path

from callbacks.dispatcher import Dispatcher
from callbacks.journal import FINISHED, SINKS, Journal
from callbacks.sinks.base import Sink
from orchestrator.embedded_ray import stop_dead_sessions
from trainers.utils import LOGGER

LOST = "the driver died before the run ended (recovered from its journal)"


def pending_journals(root: str | Path) -> list[Path]:
    """Journal folders under ``root`` whose run has not ended or not been delivered in full."""
    root = Path(root)
    if not root.is_dir():
        return []
    return [folder for folder in sorted(root.iterdir(), key=parents_first)
            if (folder / SINKS).is_file() and not _done(folder)]


def parents_first(folder: Path) -> tuple:
    """A sweep's parent journal (``sweep-<id>``, ``sweeps/parent.py``) before its trials': a child
    run still to be made names its parent, which must exist in MLflow first (``RunWriter``)."""
    return not folder.name.startswith("sweep-"), folder.name


def _done(folder: Path) -> bool:
    ended = Journal.read_finished(folder / FINISHED)
    return bool(ended and ended.get("delivered"))


def recover_run(folder: Path) -> str:
    """Deliver one run's journal and end it; the line that says what happened."""
    journal = Journal(folder, Journal.run_id_in(folder))
    if not journal.claim():
        return f"{folder.name}: still running (its journal is held by a live process); left alone"
    ended = journal.finished()
    status, reason = (ended["status"], ended.get("reason")) if ended else ("KILLED", LOST)
    sinks = [sink for sink in journal.load_sinks() if isinstance(sink, Sink)]
    dispatcher = Dispatcher(sinks, journal=journal)
    dispatcher.start()
    report = dispatcher.finish(status, reason)
    return _line(folder.name, journal.next_entry, status, dispatcher.delivered(), report)


def _line(run_id: str, entries: int, status: str, delivered: bool, report: dict) -> str:
    mlflow = next((r for r in report.get("sinks", {}).values() if isinstance(r, dict) and r.get("sink") == "mlflow"), {})
    where = f"MLflow run {mlflow['run_id']}" if mlflow.get("run_id") else "no MLflow run"
    if delivered:
        return f"{run_id}: {entries} journal entries delivered, {where} ended {status}"
    return (f"{run_id}: not fully delivered yet ({where}); the rest stays in its journal, "
            f"run `orchestrator recover` again once the endpoints answer")


def recover(root: str | Path) -> list[str]:
    """Stop what is left of the local Rays of dead drivers recorded under ``root`` (first: a
    leftover may still hold a run's journal), then recover every pending run; one line per
    session stopped and per run (none when all ended)."""
    lines = stop_dead_sessions(root)
    for folder in pending_journals(root):
        try:
            lines.append(recover_run(folder))
        except Exception as exc:  # one broken journal does not stop the others
            LOGGER.warning(f"recover {folder}: {type(exc).__name__}: {exc}")
            lines.append(f"{folder.name}: could not be recovered ({type(exc).__name__}: {exc})")
    return lines

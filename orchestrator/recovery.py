"""Runs whose driver died: deliver what their journals hold and mark them ended.

A run's journal (``callbacks/journal.py``) holds every record its workers had acknowledged and
the sinks that deliver them. A run whose journal has no end (the driver, the actor and the local
Ray died with it), or whose sinks had not delivered everything when it ended (an outage that
outlasted the run), is taken over here: its sinks are rebuilt, handed the entries after their
watermarks, and closed with the run's status (KILLED when it never ended). Then the models an
outage kept from MLflow at a run's end are published (``orchestrator/publishing.py``): after every
journal, as a sweep's champion names trial runs delivered after its parent's. Before all that, what
is left of a killed driver's own local Ray is stopped (``orchestrator/embedded_ray.py``).
"""
from __future__ import annotations

from pathlib import Path

from callbacks.dispatcher import Dispatcher
from callbacks.journal import FINISHED, SINKS, Journal
from callbacks.sinks.base import Sink
from orchestrator.embedded_ray import stop_dead_sessions
from orchestrator.publishing import pending, publish_pending
from trainers.utils import LOGGER

LOST = "the driver died before the run ended (recovered from its journal)"


def pending_journals(root: str | Path) -> list[Path]:
    """Journal folders under ``root`` whose run has not ended or not been delivered in full, or
    whose models are still to publish."""
    root = Path(root)
    if not root.is_dir():
        return []
    return [folder for folder in sorted(root.iterdir(), key=parents_first)
            if (folder / SINKS).is_file() and not _done(folder) or pending(folder)]


def parents_first(folder: Path) -> tuple:
    """A sweep's parent journal (``sweep-<id>``, ``sweeps/parent.py``) before its trials': a child
    run still to be made names its parent, which must exist in MLflow first (``RunWriter``)."""
    return not folder.name.startswith("sweep-"), folder.name


def _done(folder: Path) -> bool:
    ended = Journal.read_finished(folder / FINISHED)
    return bool(ended and ended.get("delivered"))


def recover_run(folder: Path, claimed: list | None = None) -> str | None:
    """Deliver one run's journal and end it; the line that says what happened (None when it was
    delivered already). ``claimed`` gains the journal, held for this process."""
    journal = Journal(folder, Journal.run_id_in(folder))
    if not journal.claim():
        return f"{folder.name}: still running (its journal is held by a live process); left alone"
    if claimed is not None:
        claimed.append(journal)
    if _done(folder):
        return None
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
    lines, claimed = stop_dead_sessions(root), []
    for folder in pending_journals(root):
        lines.append(_guarded(folder, recover_run, claimed))
    for journal in claimed:
        if pending(journal.dir) and journal.claim():  # held again: ending the run let it go
            lines.append(_guarded(journal.dir, publish_pending))
    return [line for line in lines if line]


def _guarded(folder: Path, step, *args) -> str | None:
    """``step(folder, *args)``'s line; one broken journal does not stop the others."""
    try:
        return step(folder, *args)
    except Exception as exc:
        LOGGER.warning(f"recover {folder}: {type(exc).__name__}: {exc}")
        return f"{folder.name}: could not be recovered ({type(exc).__name__}: {exc})"

"""Sealed journal segments copied to the object store beside the event log, counted in delivery."""
import time
from pathlib import Path

import pytest

from callbacks.dispatcher import Dispatcher
from callbacks.journal import ENTRY, Journal, read_segment
from callbacks.sinks import EventLogSink, LocalStore, ObjectStore, read_event_log
from callbacks.sinks.event_log import run_prefix
from orchestrator.recovery import recover_run
from tests.servers import MotoServer
from tests.test_journal import orchestrator, rows, train_command

BUCKET = "journal-copies"
KEY = ("rank", "attempt", "seq", ENTRY)


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    with MotoServer(tmp_path_factory.mktemp("moto")) as server:
        server.create_bucket(BUCKET)
        yield server


@pytest.fixture(params=["local", "s3"])
def store_uri(request, tmp_path, monkeypatch):
    if request.param == "local":
        return str(tmp_path / "store")
    for key, value in request.getfixturevalue("moto").client_env().items():
        monkeypatch.setenv(key, value)
    return f"s3://{BUCKET}/{tmp_path.name}"


def ingest(dispatcher: Dispatcher, ranks: int, batches: int, size: int, epoch_every: int = 10) -> None:
    """``batches`` batches of ``size`` rows per rank, the ranks taking turns; one journal entry each."""
    for start in range(0, batches * size, size):
        for rank in range(ranks):
            dispatcher.ingest_rows(("r", rank, 7), start, rows(start, size, epoch_every))


def journaled(journal: Journal) -> list[tuple]:
    """(rank, attempt, seq, entry) of every row the journal holds, sorted."""
    return sorted((stream[1], stream[2], first + i, entry)
                  for entry, stream, first, batch in journal.entries() for i in range(len(batch)))


def copies(store_uri: str, run_id: str, into: Path) -> dict[str, list[tuple]]:
    """The journal copies in the store, ``<journal folder>/<segment>`` -> their rows as
    ``read_segment`` reads them back: (rank, attempt, seq, entry)."""
    store, prefix = ObjectStore.from_uri(store_uri), f"{run_prefix(run_id)}_journal/"
    out = {}
    for key in store.list(prefix):
        local = into / key
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(store.get_bytes(key))
        batches = list(read_segment(local))
        out[key[len(prefix):]] = [row for b in batches for row in zip(*(b.column(c).to_pylist() for c in KEY))]
    return out


def wait_for(check, seconds: float = 60.0):
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_sealed_segments_are_copied_beside_the_event_log(store_uri, tmp_path):
    """A run that rolls its journal five times: each sealed segment reaches the store while the run
    goes on, the last one at the end; together the copies hold every journaled row once, each in
    the segment named after its first entry. Once delivered the local segments go, the copies stay,
    and Parquet readers of the event log do not see them."""
    journal = Journal(tmp_path / "journal" / "r", "r", segment_rows=20)
    dispatcher = Dispatcher([EventLogSink(store_uri, "r", max_rows=25)], journal=journal)
    dispatcher.start()
    ingest(dispatcher, ranks=2, batches=11, size=6)  # 22 entries of 6 rows: a roll every 4 entries
    names = [path.name for path in journal.segments()]
    assert len(names) == 6  # five sealed, one open
    wait_for(lambda: len(copies(store_uri, "r", tmp_path / "mid")) == 5)  # uploaded during the run
    assert f"r/{names[-1]}" not in copies(store_uri, "r", tmp_path / "mid")
    rows_journaled = journaled(journal)
    assert len(rows_journaled) == 132

    dispatcher.finish("FINISHED")
    assert dispatcher.delivered() and journal.segments() == [] and journal.finished()["delivered"]
    stored = copies(store_uri, "r", tmp_path / "end")
    assert sorted(stored) == [f"r/{name}" for name in names]
    assert sorted(row for segment in stored.values() for row in segment) == rows_journaled  # raw: once each
    assert sorted((rank, seq) for rank, _, seq, _ in rows_journaled) == [(r, s) for r in (0, 1) for s in range(66)]
    for name, segment in stored.items():
        assert int(name.split("seg-")[1].split(".")[0]) == min(entry for *_, entry in segment)
    assert read_event_log(store_uri, "r", dedup_rows=False).num_rows == 132


def test_a_copy_not_uploaded_keeps_the_run_undelivered(tmp_path, monkeypatch):
    """Every event-log part is in the store, but the copy of the segment sealed at the end is
    refused: the run is not delivered, its journal keeps the segments, and ``recover`` (the store
    back) uploads the copies and only then lets the segments go."""
    refused = "/_journal/r/seg-0000000006.arrow"
    put_file = LocalStore.put_file

    def refuse(self, key, path):
        if key.endswith(refused):
            raise OSError("the store refuses it")
        return put_file(self, key, path)

    monkeypatch.setattr(LocalStore, "put_file", refuse)
    folder, store = tmp_path / "journal" / "r", str(tmp_path / "store")
    journal = Journal(folder, "r", segment_rows=30)
    sink = EventLogSink(store, "r", close_timeout=1.0)
    journal.save_sinks([sink])
    dispatcher = Dispatcher([sink], journal=journal)
    dispatcher.start()
    ingest(dispatcher, ranks=2, batches=4, size=11, epoch_every=11)  # every batch ends an epoch: parts go
    report = dispatcher.finish("FINISHED")["sinks"]["EventLogSink"]
    assert report["pending_parts"] == [f"{run_prefix('r')}{refused[1:]}"]
    assert read_event_log(store, "r", dedup_rows=False).num_rows == 88  # every part is there
    assert not dispatcher.delivered() and not journal.finished()["delivered"]
    assert [p.name for p in journal.segments()] == [f"seg-000000000{n}.arrow" for n in (0, 3, 6)]
    rows_journaled = journaled(journal)

    monkeypatch.undo()
    del dispatcher, journal  # frees the journal's lock
    assert recover_run(folder) == "r: 8 journal entries delivered, no MLflow run ended FINISHED"
    assert list(folder.glob("seg-*")) == [] and Journal.read_finished(folder / "finished.json")["delivered"]
    stored = copies(store, "r", tmp_path / "copies")
    assert sorted(stored) == [f"r/seg-000000000{n}.arrow" for n in (0, 3, 6)]
    assert sorted(row for segment in stored.values() for row in segment) == rows_journaled


def test_recover_copies_the_segment_a_killed_run_left_open(tmp_path):
    """A dispatcher dropped without ``finish`` (its process killed) never sealed its last segment;
    ``recover`` seals it, and every segment's copy reaches the store."""
    folder, store = tmp_path / "journal" / "r", str(tmp_path / "store")
    journal = Journal(folder, "r", segment_rows=20)
    sink = EventLogSink(store, "r")
    journal.save_sinks([sink])
    dispatcher = Dispatcher([sink], journal=journal)
    dispatcher.start()
    ingest(dispatcher, ranks=1, batches=6, size=6)  # a roll after 4 entries; the second segment open
    rows_journaled = journaled(journal)
    del dispatcher, journal, sink  # killed
    assert recover_run(folder).startswith("r: 6 journal entries delivered")
    stored = copies(store, "r", tmp_path / "copies")
    assert sorted(stored) == ["r/seg-0000000000.arrow", "r/seg-0000000004.arrow"]
    assert sorted(row for segment in stored.values() for row in segment) == rows_journaled
    assert list(folder.glob("seg-*")) == []


def test_a_training_run_leaves_its_journal_in_the_store(tmp_path):
    """``orchestrator train`` in process: the run's journal segment ends up in ``runs/store``, whole,
    and the journal folder keeps none."""
    out = orchestrator(train_command(epochs=1, fraction=0.1)[3:], tmp_path)  # after python -m orchestrator
    assert out.returncode == 0, out.stderr[-2000:]
    folder = next((tmp_path / "runs" / "journal").iterdir())
    assert list(folder.glob("seg-*")) == []
    store = str(tmp_path / "runs" / "store")
    stored = copies(store, folder.name, tmp_path / "copies")
    assert list(stored) == [f"{folder.name}/seg-0000000000.arrow"]
    event_log = read_event_log(store, folder.name, dedup_rows=False)
    assert len(stored[f"{folder.name}/seg-0000000000.arrow"]) == event_log.num_rows > 0
    assert sorted(row[:3] for row in stored[f"{folder.name}/seg-0000000000.arrow"]) == sorted(
        zip(*(event_log.column(c).to_pylist() for c in KEY[:3])))

"""Worker-side EventForwarder and driver-side CallbackActor, on a real local Ray."""
from __future__ import annotations

import json
import os
import signal
import sys
import time

import pytest
import ray
from ray import cloudpickle

from callbacks.actor import start_callback_actor
from callbacks.dispatcher import Dispatcher, listened_events
from callbacks.forwarder import EventForwarder
from callbacks.journal import Journal
from callbacks.records import make_record, record_key
from callbacks.sinks.base import Sink
from trainers.registry import CallbackMixin, new_registry, run_callbacks
from trainers.utils import UserError, user_error_in

# The actor process cannot import this test module by name: ship its classes by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def ray_env():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    if started:
        ray.shutdown()


# ---------------------------------------------------------------- sinks and simulated ranks
class FileSink:
    """Appends one JSON line per record (line-buffered: survives a killed actor process)."""

    def __init__(self, path, delay: float = 0.0):
        self.path, self.delay = str(path), delay
        self._file = None

    def __getstate__(self):
        return {"path": self.path, "delay": self.delay}

    def __setstate__(self, state):
        self.__init__(**state)
        self._write({"init": os.getpid()})

    def _write(self, obj):
        if self._file is None:
            self._file = open(self.path, "a", buffering=1)
        self._file.write(json.dumps(obj) + "\n")

    def _record(self, record):
        if self.delay:
            time.sleep(self.delay)
        self._write(record)

    on_train_batch_end = on_train_epoch_end = on_fit_epoch_end = teardown = _record

    def close(self, status):
        self._write({"closed": status})
        return {"path": self.path}


def read_lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def records_of(path):
    return [line for line in read_lines(path) if "seq" in line]


class StepSource(CallbackMixin):
    """A stand-in owner: what the engine's trainer exposes to the forwarder."""

    def __init__(self):
        self.epoch, self.step = 0, 0

    def record_fields(self, event):
        return {"epoch": self.epoch, "step": self.step, "metrics": {"loss": 1.0 / (self.step + 1)},
                "artifacts": {}, "final_eval": False}


def fire_run(registry, epochs=2, batches=30, on_event=None):
    """Fire a training-like sequence through a real registry; return the event names fired."""
    owner, fired = StepSource(), []

    def fire(event):
        run_callbacks(registry, event, owner)
        fired.append(event)
        if on_event is not None:
            on_event(len(fired))

    for owner.epoch in range(epochs):
        for _ in range(batches):
            owner.step += 1
            fire("on_train_batch_end")
        fire("on_train_epoch_end")
        fire("on_fit_epoch_end")
    fire("teardown")
    return fired


@ray.remote(num_cpus=0)
def run_rank(actor, run_id, rank, **kwargs):
    registry = new_registry()
    forwarder = EventForwarder(actor, run_id, rank, max_batch=16, flush_interval=0.05).attach(registry)
    return fire_run(registry, **kwargs), forwarder.stats()


def stream_records(lines, rank):
    return [r for r in lines if r["rank"] == rank]


# ---------------------------------------------------------------- tests
def test_two_ranks_complete_ordered_and_duplicates_dropped(ray_env, tmp_path):
    sink_path = tmp_path / "sink.jsonl"
    seen_epochs = tmp_path / "epochs.jsonl"

    def epoch_fn(record):  # a plain driver function for one event, after the sink
        with open(seen_epochs, "a") as f:
            f.write(json.dumps([record["rank"], record["seq"]]) + "\n")

    actor = start_callback_actor([FileSink(sink_path), ("on_fit_epoch_end", epoch_fn)])
    remote = run_rank.remote(actor, "run-a", 1, epochs=3, batches=25)  # rank 1: a Ray task
    registry = new_registry()
    forwarder = EventForwarder(actor, "run-a", 0, max_batch=16, flush_interval=0.05).attach(registry)
    fired0 = fire_run(registry, epochs=3, batches=25)
    fired1, stats1 = ray.get(remote)

    stats0 = forwarder.stats()
    for stats, fired in ((stats0, fired0), (stats1, fired1)):
        assert stats["acked"] == stats["records"] == len(fired)
        assert stats["buffered"] == 0 and stats["lost"] == 0

    lines = records_of(sink_path)
    for rank, fired in ((0, fired0), (1, fired1)):
        mine = stream_records(lines, rank)
        assert [r["seq"] for r in mine] == list(range(len(fired)))
        assert [r["event"] for r in mine] == fired
        assert [r["step"] for r in mine if r["event"] == "on_train_batch_end"] == list(range(1, 76))
    assert len(read_lines(seen_epochs)) == 6

    # Resend the same batch twice: nothing reaches the sink again.
    again = stream_records(lines, 0)[10:40]
    for _ in range(2):
        ack = ray.get(actor.ingest.remote(again))
        assert ack["duplicates"] == len(again)
        assert ack["next_seq"][("run-a", 0, 0)] == len(fired0)
    report = ray.get(actor.finish.remote("FINISHED"))
    assert report["dispatched"] == len(fired0) + len(fired1)
    assert report["duplicates"] >= 2 * len(again)
    assert report["failures"] == [] and report["gaps"] == 0
    assert report["frozen_objects"] > 10_000  # start-up objects left out of garbage collections
    assert report["sinks"] == {"FileSink": {"path": str(sink_path)}}
    assert records_of(sink_path) == lines
    assert read_lines(sink_path)[-1] == {"closed": "FINISHED"}
    ray.kill(actor)


def test_out_of_order_batches_dispatch_in_order(ray_env, tmp_path):
    sink_path = tmp_path / "sink.jsonl"
    actor = start_callback_actor([FileSink(sink_path)])
    records = [make_record(run_id="r", event="on_train_batch_end", rank=3, attempt=1, seq=s,
                           epoch=0, step=s) for s in range(30)]
    acks = [ray.get(actor.ingest.remote(records[a:b])) for a, b in ((20, 30), (10, 20), (0, 10))]
    assert [ack["next_seq"][("r", 3, 1)] for ack in acks] == [0, 0, 30]
    assert [r["seq"] for r in records_of(sink_path)] == list(range(30))
    # A floor tells a fresh actor where a stream resumes (what a forwarder sends after a restart).
    late = [make_record(run_id="r", event="on_train_batch_end", rank=4, attempt=0, seq=s,
                        epoch=0, step=s) for s in range(50, 55)]
    ack = ray.get(actor.ingest.remote(late, {("r", 4, 0): 50}))
    assert ack["next_seq"][("r", 4, 0)] == 55
    assert ray.get(actor.finish.remote())["gaps"] == 0
    ray.kill(actor)


def test_failing_driver_callback_is_isolated_and_reported(ray_env, tmp_path):
    sink_path = tmp_path / "sink.jsonl"

    def broken(record):
        raise RuntimeError(f"boom at seq {record['seq']}")

    class BrokenClose(FileSink):
        def close(self, status):
            raise OSError("disk gone")

    actor = start_callback_actor([("on_train_batch_end", broken), BrokenClose(sink_path)])
    registry = new_registry()
    forwarder = EventForwarder(actor, "run-b", 0, max_batch=8).attach(registry)
    fired = fire_run(registry, epochs=2, batches=10)
    assert forwarder.stats()["acked"] == len(fired)
    assert [r["event"] for r in records_of(sink_path)] == fired

    report = ray.get(actor.finish.remote("FAILED"))
    failures = {(f["callback"].rsplit(".", 1)[-1], f["event"]): f for f in report["failures"]}
    batch_fail = failures[("broken", "on_train_batch_end")]
    assert batch_fail["count"] == 20 and batch_fail["first_error"] == "RuntimeError: boom at seq 0"
    assert failures[("BrokenClose", "close")]["first_error"] == "OSError: disk gone"
    assert report["dispatched"] == len(fired)
    ray.kill(actor)


def test_backpressure_slow_sink_loses_nothing(ray_env, tmp_path, warnings_seen):
    sink_path = tmp_path / "sink.jsonl"
    actor = start_callback_actor([FileSink(sink_path, delay=0.01)])
    registry = new_registry()
    forwarder = EventForwarder(actor, "run-c", 0, max_batch=5, max_inflight=1,
                               max_buffer=12, flush_interval=10.0).attach(registry)
    fired = fire_run(registry, epochs=2, batches=40)
    stats = forwarder.stats()
    assert stats["backpressure_waits"] > 0 and stats["backpressure_seconds"] > 0
    assert stats["acked"] == len(fired) and stats["lost"] == 0
    assert [r["seq"] for r in records_of(sink_path)] == list(range(len(fired)))
    said = [r.getMessage() for r in warnings_seen if "training waited" in r.getMessage()]
    assert said == [f"event forwarder rank 0: training waited {stats['backpressure_waits']} times "
                    f"({stats['backpressure_seconds']:.1f} s) for the callback actor to catch up; "
                    f"0 event records lost"]
    ray.kill(actor)


def test_actor_killed_mid_stream_every_record_arrives(ray_env, tmp_path):
    """The actor dies mid-stream and Ray restarts it: the driver callback sees every record, and
    the event log (fed from the run's journal after the restart) holds each exactly once."""
    from callbacks.sinks import EventLogSink, read_event_log

    sink_path, store = tmp_path / "sink.jsonl", str(tmp_path / "store")
    # A slow sink keeps calls in flight, so the kill interrupts some of them.
    actor = start_callback_actor([FileSink(sink_path, delay=0.003), EventLogSink(store, "run-d", max_rows=50)],
                                 journal=Journal(tmp_path / "journal" / "run-d", "run-d"))
    ray.get(actor.ping.remote())  # killed while still starting, it would fail no call
    registry = new_registry()
    forwarder = EventForwarder(actor, "run-d", 2, attempt=1, max_batch=10, max_inflight=2,
                               flush_interval=0.02).attach(registry)

    def chaos(n):
        if n == 100:
            ray.kill(actor, no_restart=False)
        if 100 < n <= 400:
            time.sleep(0.01)  # keep training (about 3 s) while the actor restarts

    fired = fire_run(registry, epochs=4, batches=100, on_event=chaos)  # teardown waits for acks
    stats = forwarder.stats()
    assert stats["failed_calls"] > 0 and stats["resends"] > 0
    assert stats["acked"] == len(fired) and stats["buffered"] == 0

    lines = read_lines(sink_path)
    assert sum("init" in line for line in lines) == 2  # the sink was rebuilt once by Ray
    by_key = {record_key(r): r for r in lines if "seq" in r}
    assert sorted(k[3] for k in by_key) == list(range(len(fired)))
    assert [by_key[("run-d", 2, 1, s)]["event"] for s in range(len(fired))] == fired
    incarnations = []
    for line in lines:
        if "init" in line:
            incarnations.append([])
        elif "seq" in line:
            incarnations[-1].append(line["seq"])
    assert all(seqs == sorted(seqs) for seqs in incarnations)  # each dispatched in seq order
    assert ray.get(actor.stats.remote())["restarted"] is True
    ray.get(actor.finish.remote("FINISHED"))
    ray.kill(actor)
    raw = read_event_log(store, "run-d", dedup_rows=False)  # every stored row, duplicates included
    assert sorted(zip(raw.column("seq").to_pylist(), raw.column("event").to_pylist())) == list(enumerate(fired))


def wait_restarted(actor, timeout: float = 60.0) -> None:
    """Until Ray has rebuilt a killed actor (calls meanwhile may reach the dead one and fail)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if ray.get(actor.stats.remote(), timeout=timeout)["restarted"]:
                return
        except ray.exceptions.RayActorError:
            pass
        assert time.monotonic() < deadline, "the actor was not restarted"
        time.sleep(0.1)


def test_restarted_actor_hands_its_sinks_what_the_dead_one_acknowledged(ray_env, tmp_path):
    """The actor acknowledges a batch (so it is journaled) and dies before its event log cut a
    part of it: the worker will not send those rows again, only the journal has them. Ray rebuilds
    the actor by its constructor alone; the new one must hand the sink the journal's entries after
    its watermark before it takes the next batch, or the first batch never reaches the event log
    (and the sink's watermark counts the wrong entries, so the run is never delivered)."""
    from callbacks.sinks import EventLogSink, read_event_log
    from trainers.events import make_row

    def rows(first, n):
        return [make_row("on_train_batch_end", {"step": first + i}, now=1e9 + first + i) for i in range(n)]

    store, stream, journal = str(tmp_path / "store"), ("run-k", 0, 1), tmp_path / "journal" / "run-k"
    sink = EventLogSink(store, "run-k", max_age=3600)  # no part before close: 20 rows, not 20,000
    actor = start_callback_actor([sink], journal=Journal(journal, "run-k"))
    assert ray.get(actor.ingest_rows.remote(stream, 0, rows(0, 10)))["next_seq"] == {stream: 10}
    ray.kill(actor, no_restart=False)
    wait_restarted(actor)
    assert ray.get(actor.ingest_rows.remote(stream, 10, rows(10, 10)))["next_seq"] == {stream: 20}
    ray.get(actor.finish.remote("FINISHED"))
    ray.kill(actor)
    raw = read_event_log(store, "run-k", dedup_rows=False)  # every stored row, duplicates included
    assert sorted(raw.column("seq").to_pylist()) == list(range(20))
    assert Journal(journal, "run-k").finished()["delivered"] is True


class HeldJournal(Journal):
    """Its entries stay in the process's buffer, not handed to the OS (``stage`` waits), while
    the file ``hold`` exists: a process killed meanwhile takes them with it."""

    def __init__(self, directory, run_id, hold):
        super().__init__(directory, run_id)
        self.hold = str(hold)

    def __reduce__(self):
        return HeldJournal, (str(self.dir), self.run_id, self.hold)

    def stage(self) -> tuple:
        while os.path.exists(self.hold):
            time.sleep(0.01)
        return super().stage()


def test_rows_taken_but_not_durable_are_sent_again_to_a_restarted_actor(ray_env, tmp_path):
    """A full batch does not wait for the fsync: its answer says the actor took the rows, and
    acknowledges none. The actor dies before they reach the disk, between calls (no call fails),
    and Ray restarts it without them: the forwarder learns so from the new actor's answer and
    sends them again; the event log holds each once."""
    from callbacks.sinks import EventLogSink, read_event_log

    store, hold = str(tmp_path / "store"), tmp_path / "hold"
    hold.touch()
    actor = start_callback_actor([EventLogSink(store, "run-h", max_age=3600)],
                                 journal=HeldJournal(tmp_path / "journal", "run-h", hold))
    pid = ray.get(actor.__ray_call__.remote(lambda actor: os.getpid()))
    registry, owner = new_registry(), StepSource()
    forwarder = EventForwarder(actor, "run-h", 0, max_batch=10, flush_interval=60).attach(registry)
    for owner.step in range(10):
        run_callbacks(registry, "on_train_batch_end", owner)  # the tenth sends the full batch
    time.sleep(1.0)  # answered: taken, not acknowledged; nothing asks again (the next flush is 60 s away)
    os.kill(pid, signal.SIGKILL)  # ray.kill lets the process flush Arrow's buffer: not a crash
    hold.unlink()
    wait_restarted(actor)
    assert forwarder.close(timeout=30) is True
    stats = forwarder.stats()
    assert stats["acked"] == 10 and stats["resends"] == 10 and stats["failed_calls"] == 0
    ray.get(actor.finish.remote("FINISHED"))
    ray.kill(actor)
    raw = read_event_log(store, "run-h", dedup_rows=False)  # every stored row, duplicates included
    assert sorted(raw.column("seq").to_pylist()) == list(range(10))


def test_a_driver_record_is_journaled_once_through_an_actor_restart(ray_env, tmp_path):
    """``send_record``: a record the driver makes itself (``driver_record``) returns once journaled;
    the next one goes through the actor's restart, and one sent again to the new actor is dropped by seq."""
    from callbacks.actor import send_record
    from callbacks.records import driver_record
    from callbacks.sinks import EventLogSink, read_event_log

    store = str(tmp_path / "store")
    actor = start_callback_actor([EventLogSink(store, "run-h", max_age=3600)],
                                 journal=Journal(tmp_path / "journal" / "run-h", "run-h"))
    notes = [driver_record("run-h", "on_hparams", seq, 2, {"lr0": lr}) for seq, lr in enumerate((0.05, 0.04))]
    send_record(actor, notes[0])
    ray.kill(actor, no_restart=False)
    send_record(actor, notes[1])
    wait_restarted(actor)
    send_record(actor, notes[0])  # as after an uncertain failure
    report = ray.get(actor.finish.remote("FINISHED"))
    ray.kill(actor)
    # The deliberate resend is dropped; so is the second record's own resend when the kill landed
    # after the old actor journaled it but before its reply (send_record cannot tell the two apart).
    assert report["restarted"] is True and report["duplicates"] in (1, 2)
    raw = read_event_log(store, "run-h", dedup_rows=False).to_pylist()  # every stored row
    assert sorted((r["rank"], r["seq"], r["epoch"], dict(r["metrics"])["lr0"]) for r in raw) == [
        (-1, 0, 2, 0.05), (-1, 1, 2, 0.04)]


def test_forwarder_narrowed_to_listened_events(ray_env, tmp_path):
    sink_path = tmp_path / "sink.jsonl"
    callbacks = [("on_fit_epoch_end", lambda record: None), FileSink(sink_path)]
    events = listened_events([("on_fit_epoch_end", print)])
    assert events == {"on_fit_epoch_end"}
    actor = start_callback_actor(callbacks)
    registry = new_registry()
    forwarder = EventForwarder(actor, "run-e", 0, events=events).attach(registry)
    fired = fire_run(registry, epochs=3, batches=5)
    assert forwarder.stats()["acked"] == fired.count("on_fit_epoch_end") == 3
    assert [r["event"] for r in records_of(sink_path)] == ["on_fit_epoch_end"] * 3
    ray.kill(actor)


def test_a_sink_that_names_no_events_is_handed_none():
    class Quiet(Sink):  # acts on start and close alone (like the node sampler)
        events = frozenset()

        def close(self, status="FINISHED"):
            return {}

    assert listened_events([Quiet()]) == set()
    assert {"on_fit_epoch_end", "on_train_batch_end"} <= listened_events([Sink()])  # no events named: all


def test_bad_driver_callbacks_and_arguments_are_named():
    with pytest.raises(ValueError, match="on_epoch_end"):
        Dispatcher([("on_epoch_end", print)])
    with pytest.raises(UserError, match="not callable"):
        Dispatcher([("on_fit_epoch_end", 3)])
    with pytest.raises(UserError, match="#1 \\(object\\)"):
        Dispatcher([("on_fit_epoch_end", print), object()])
    with pytest.raises(ValueError, match="max_batch=0"):
        EventForwarder(None, "r", 0, max_batch=0)
    with pytest.raises(ValueError, match="on_trian_end"):
        EventForwarder(None, "r", 0, events=["on_trian_end"])
    with pytest.raises(ValueError, match="status='DONE'"):
        Dispatcher([]).finish("DONE")


# ---------------------------------------------------------------- the in-order batch path
class RowsSink(Sink):
    """Keeps what reaches it, and by which path: whole batches or single records."""

    def __init__(self, fail_at: int | None = None):
        super().__init__(fail_at=fail_at)
        self.got = []  # (path, stream, seq)
        self.calls = []  # (first seq, rows) per handle_rows

    def handle_rows(self, stream, first_seq, rows):
        if self.fail_at is not None and first_seq <= self.fail_at < first_seq + len(rows):
            raise RuntimeError(f"rows sink broke at {first_seq}")
        self.got += [("rows", stream, first_seq + i) for i in range(len(rows))]
        self.calls.append((first_seq, len(rows)))

    def handle(self, event, record):
        self.got.append(("record", (record["run_id"], record["rank"], record["attempt"]), record["seq"]))

    def close(self, status="FINISHED"):
        return {}


class EpochOnly(Sink):
    """A sink that overrides one event method and names it in ``events`` (no handle_rows)."""

    events = frozenset({"on_fit_epoch_end"})

    def __init__(self):
        super().__init__()
        self.seqs = []

    def on_fit_epoch_end(self, record):
        self.seqs.append((record["rank"], record["seq"], record["metrics"]["fitness"]))

    def close(self, status="FINISHED"):
        return {}


def test_in_order_rows_go_whole_to_sinks_and_as_records_to_callbacks():
    """An in-order batch reaches sinks whole, function callbacks as records of their event only;
    a batch after a gap waits whole and goes whole once the gap fills (the actor's threads may
    start a stream's calls out of order); the new part of a resend that overlaps goes record by
    record (one-row batches: one journal entry each); all in order."""
    from trainers.events import make_row

    def rows(first, n):
        return [make_row("on_fit_epoch_end" if (first + i) % 10 == 9 else "on_train_batch_end",
                         {"epoch": (first + i) // 10, "step": first + i, "metrics": {"fitness": first + i}})
                for i in range(n)]

    bulk, broken, epochs, seen = RowsSink(), RowsSink(fail_at=37), EpochOnly(), []
    dispatcher = Dispatcher([bulk, ("on_fit_epoch_end", seen.append), broken, epochs])
    stream = ("r", 1, 7)
    ack = dispatcher.ingest_rows(stream, 0, rows(0, 10))
    assert ack.pop("incarnation") > 0
    assert ack == {"received": 10, "duplicates": 0, "next_seq": {stream: 10}, "taken": {stream: 10}}
    assert dispatcher.ingest_rows(stream, 20, rows(20, 10))["next_seq"] == {stream: 10}  # a gap: waits
    assert dispatcher.ingest_rows(stream, 10, rows(10, 10))["next_seq"] == {stream: 30}
    assert dispatcher.ingest_rows(stream, 25, rows(25, 10))["duplicates"] == 5  # a resend overlapping
    assert dispatcher.ingest_rows(stream, 35, rows(35, 5))["next_seq"] == {stream: 40}

    paths = [(path, seq) for path, key, seq in bulk.got]
    assert [seq for _, seq in paths] == list(range(40)) and {key for _, key, _ in bulk.got} == {stream}
    assert {path for path, seq in paths} == {"rows"}
    assert bulk.calls == [(0, 10), (10, 10), (20, 10), *((seq, 1) for seq in range(30, 35)), (35, 5)]  # the overlap
    assert [(r["seq"], r["rank"], r["attempt"], r["step"]) for r in seen] == [(s, 1, 7, s) for s in (9, 19, 29, 39)]
    assert epochs.seqs == [(1, s, float(s)) for s in (9, 19, 29, 39)]
    assert [seq for _, _, seq in broken.got] == list(range(35))  # its failing batch did not stop others
    report = dispatcher.finish("FINISHED")
    assert report["dispatched"] == 40 and report["received"] == 45 and report["duplicates"] == 5
    assert [(f["callback"], f["event"], f["count"]) for f in report["failures"]] == [("RowsSink", "handle_rows", 1)]
    assert report["failures"][0]["first_error"] == "RuntimeError: rows sink broke at 35"


class DataProblem(UserError):
    """A UserError subclass of the user's own (module level: it pickles by reference)."""


def test_a_user_error_raised_in_an_actor_comes_back_as_raised(ray_env):
    """What the run session does with any Ray failure of a run (``user_error_in``): the actor's own
    exception, its type and one line, not Ray's wrapper whose text carries the remote traceback."""
    @ray.remote(num_cpus=0)
    class Raises:
        def go(self):
            raise DataProblem("config key 'x': bad value")

    with pytest.raises(UserError) as info:
        ray.get(Raises.remote().go.remote())
    assert str(info.value) != "config key 'x': bad value"  # Ray's wrapper: the traceback in its text
    found = user_error_in(info.value)
    assert type(found) is DataProblem and str(found) == "config key 'x': bad value"
    assert user_error_in(RuntimeError("not a user error")) is None


class ShippingSource(StepSource):
    """An owner whose epoch-end records name a file that it rewrites right after the event."""

    def __init__(self, folder):
        super().__init__()
        self.folder = folder

    def record_fields(self, event):
        fields = super().record_fields(event)
        if event == "on_fit_epoch_end":
            fields["artifacts"] = {"table": str(self.folder / f"epoch{self.epoch}.csv")}
        return fields


def test_remote_rank_files_ship_off_the_training_thread_through_an_s3_outage(ray_env, tmp_path):
    """A rank on another node ships its files to S3 while S3 is down: every event fires at once
    (no upload on the training thread), the records that name files wait on the worker, and once S3
    is back every record reaches the driver once, in order, its file's content as it was at the event."""
    from callbacks.artifacts import ArtifactShipper
    from callbacks.sinks.s3 import S3Setup
    from callbacks.sinks.storage import local_file
    from tests.servers import MotoServer, TcpProxy

    with MotoServer(tmp_path / "moto") as moto:
        moto.create_bucket("ship")
        proxy = TcpProxy(moto.port).start()
        s3 = S3Setup(endpoint=proxy.url, region="us-east-1")
        env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            sink_path = tmp_path / "sink.jsonl"
            actor = start_callback_actor([FileSink(sink_path)])
            registry = new_registry()
            shipper = ArtifactShipper("s3://ship/store", "run-s", 0, s3)
            forwarder = EventForwarder(actor, "run-s", 0, max_batch=8, flush_interval=0.02,
                                       publish=shipper).attach(registry)
            owner, fired = ShippingSource(tmp_path), []
            proxy.cut()
            for owner.epoch in range(3):
                for _ in range(10):
                    owner.step += 1
                    run_callbacks(registry, "on_train_batch_end", owner)
                    fired.append("on_train_batch_end")
                table = tmp_path / f"epoch{owner.epoch}.csv"
                table.write_text(f"epoch {owner.epoch}\n")
                run_callbacks(registry, "on_fit_epoch_end", owner)
                fired.append("on_fit_epoch_end")
                table.write_text("rewritten by the next epoch\n")
            forwarder.flush()
            time.sleep(1.0)
            held = forwarder.stats()
            assert held["shipping"] == 3 and held["records"] == len(fired)  # S3 is down: all fired
            assert held["acked"] <= 10  # nothing past the first record that names a file
            proxy.restore()
            run_callbacks(registry, "teardown", owner)  # closes the forwarder: waits for the shipments
            fired.append("teardown")
            assert forwarder.stats()["acked"] == len(fired)
            records = records_of(sink_path)
            assert [r["seq"] for r in records] == list(range(len(fired)))
            assert [r["event"] for r in records] == fired
            tables = [r["artifacts"]["table"] for r in records if r["event"] == "on_fit_epoch_end"]
            assert all(t.startswith("s3://ship/store/runs/run-s/files/rank0/") for t in tables), tables
            assert [local_file(t, s3).read_text() for t in tables] == [f"epoch {e}\n" for e in range(3)]
            ray.kill(actor)
        finally:
            proxy.cut()
            for key, value in saved.items():
                os.environ.pop(key) if value is None else os.environ.update({key: value})


def test_what_a_stalled_rank_emitted_reaches_the_driver_without_another_event(ray_env, tmp_path):
    """A training thread that stops firing (a long step, a collective waiting on a dead peer): the
    rows it emitted go out within a flush interval or so, and the rows behind a file that finishes
    shipping during the stall go out once it has, with no further event, flush or teardown."""
    from concurrent.futures import Future

    sink_path = tmp_path / "sink.jsonl"
    actor = start_callback_actor([FileSink(sink_path)])
    shipped: Future = Future()
    registry = new_registry()
    EventForwarder(actor, "run-t", 0, max_batch=1000, flush_interval=0.3,
                   publish=lambda artifacts: shipped).attach(registry)
    owner = ShippingSource(tmp_path)
    for _ in range(5):
        owner.step += 1
        run_callbacks(registry, "on_train_batch_end", owner)
    assert wait_for_records(sink_path, 5) == list(range(5))  # the stall began right after the 5th

    run_callbacks(registry, "on_fit_epoch_end", owner)  # names a file: held until shipped
    owner.step += 1
    run_callbacks(registry, "on_train_batch_end", owner)
    time.sleep(1.0)
    assert [r["seq"] for r in records_of(sink_path)] == list(range(5))
    shipped.set_result({"table": "s3://bucket/table.csv"})
    assert wait_for_records(sink_path, 7) == list(range(7))
    assert records_of(sink_path)[5]["artifacts"] == {"table": "s3://bucket/table.csv"}
    ray.kill(actor)


def wait_for_records(path, n: int, timeout: float = 10.0) -> list[int]:
    """The seqs in ``path`` once it holds ``n`` records (or what it holds at the timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seqs = [r["seq"] for r in records_of(path)] if path.exists() else []
        if len(seqs) >= n:
            return seqs
        time.sleep(0.1)
    return seqs


def test_deliver_waits_for_the_acknowledgements_but_not_for_a_file_still_shipping(ray_env, tmp_path):
    """What a rank does before each report to Ray Train: every record is journaled by the actor
    when ``deliver`` returns (a long flush interval: nothing would have gone by itself); a record
    naming a file that does not ship (the store is down) and those behind it are waited for only
    ``shipping`` seconds, then stay queued until the file has shipped."""
    from concurrent.futures import Future

    sink_path = tmp_path / "sink.jsonl"
    actor = start_callback_actor([FileSink(sink_path)])
    shipped: Future = Future()
    registry = new_registry()
    forwarder = EventForwarder(actor, "run-d", 0, max_batch=1000, flush_interval=600,
                               publish=lambda artifacts: shipped).attach(registry)
    owner = ShippingSource(tmp_path)
    for _ in range(5):
        owner.step += 1
        run_callbacks(registry, "on_train_batch_end", owner)
    assert forwarder.deliver(timeout=30) is True
    assert forwarder.stats()["acked"] == 5 and len(records_of(sink_path)) == 5  # journaled and dispatched

    run_callbacks(registry, "on_fit_epoch_end", owner)  # names a file: held until shipped
    owner.step += 1
    run_callbacks(registry, "on_train_batch_end", owner)
    started = time.monotonic()
    assert forwarder.deliver(timeout=30, shipping=1.0) is True  # what may go is acknowledged
    assert 1.0 <= time.monotonic() - started < 10  # waited for the file its 1 s, not the timeout
    assert forwarder.stats()["acked"] == 5 and forwarder.stats()["buffered"] == 2
    shipped.set_result({"table": "s3://bucket/table.csv"})
    assert forwarder.deliver(timeout=30) is True and forwarder.stats()["acked"] == 7
    assert [r["seq"] for r in records_of(sink_path)] == list(range(7))
    ray.kill(actor)


def test_an_orphaned_actor_ends_its_run_with_the_drivers_stop_reason_and_leaves(ray_env, tmp_path):
    """A driver that asked its workers to stop and then died before closing the run (``ray job
    stop``'s SIGKILL after its grace): the detached actor, hearing nothing for ``orphan_after``,
    delivers the journal, ends the run KILLED with the stop's reason (not "the driver was lost")
    and leaves."""
    from callbacks.sinks import EventLogSink, read_event_log
    from trainers.events import make_row

    store, stream, folder = str(tmp_path / "store"), ("run-o", 0, 1), tmp_path / "journal" / "run-o"
    actor = start_callback_actor([EventLogSink(store, "run-o", max_age=3600)], name="orphan-o",
                                 namespace="tests", journal=Journal(folder, "run-o"), orphan_after=2.0)
    rows = [make_row("on_train_batch_end", {"step": i}, now=1e9 + i) for i in range(5)]
    assert ray.get(actor.ingest_rows.remote(stream, 0, rows))["next_seq"] == {stream: 5}
    assert ray.get(actor.stop_requested.remote()) is None
    ray.get(actor.request_stop.remote("stopped by SIGTERM"))
    assert ray.get(actor.stop_requested.remote()) == "stopped by SIGTERM"  # what the workers poll
    deadline = time.monotonic() + 60
    while Journal.read_finished(folder / "finished.json") is None:
        assert time.monotonic() < deadline, "the orphaned actor did not end the run"
        time.sleep(0.2)
    assert Journal.read_finished(folder / "finished.json") == {
        "status": "KILLED", "delivered": True, "reason": "stopped by SIGTERM"}
    assert sorted(read_event_log(store, "run-o", dedup_rows=False).column("seq").to_pylist()) == list(range(5))
    while True:  # gone by itself (detached: nothing else would end it)
        try:
            ray.get(actor.ping.remote(), timeout=10)
        except ray.exceptions.RayActorError:
            break
        assert time.monotonic() < deadline, "the orphaned actor stayed"
        time.sleep(0.2)

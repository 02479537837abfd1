"""Many ranks into one callback actor: N simulated ranks of a detection run, at a fixed rate each.

Issue 18: does ONE driver-side callback actor hold a large world size? Each simulated rank is a
real ``EventForwarder`` (its own rank, stream and sequence numbers) attached to a callback
registry, fired in the order a detection fit fires its events (``rank_script``: five events per
optimizer step, validation batches, epoch ends, the final evaluation; rank 0's files) with the
fields ``BaseTrainer.record_row``/``record_fields`` give them (``SimRank``). Ray worker processes
cost ~100-200 MB each, so ``--senders`` Ray actors host the ranks, several each. All forward to the
real ``CallbackActor`` with a durable journal and a run's driver callbacks: the MLflow sink
(embedded: a SQLite store, as ``runs/`` has by default), the event log and checkpoints (a local
object store), the result sink and the console.

For each N it prints: records/s delivered (dispatched and durable, over the time from the first
emit to the last acknowledgement), the time from each record's emit to the fsync that makes it
durable (the calls it covers acknowledge right after; measured in the actor's journal), the
ingest calls and the fsyncs that made them durable (group commit: one fsync for the calls waiting
together), the actor's CPU (share of one core, all its threads) and RSS, MLflow metric points/s,
and records lost or stored twice, counted on the raw event-log rows per (rank, seq), never after
de-duplication.
Goal: N=256 at 20 events/s per rank with p99 <= 1 s and nothing lost.

    OMP_NUM_THREADS=1 python benchmarks/scale.py [--ranks 8,64,256] [--rate 20] [--epochs 5]
        [--flush-interval S] [--no-fsync (diagnosis: what one fsync per call costs)]

``--tiny`` runs the same code path with 2 and 4 ranks, one short epoch (seconds, for the tests):
its figures are not measurements.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import ray

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import tiny  # noqa: E402
from benchmarks.cluster import start_ray  # noqa: E402
from callbacks.actor import start_callback_actor  # noqa: E402
from callbacks.forwarder import EventForwarder  # noqa: E402
from callbacks.journal import Journal  # noqa: E402
from callbacks.sinks import CheckpointSink, EventLogSink, MLflowSink, read_event_log  # noqa: E402
from callbacks.sinks.mlflow_runs import metric_key  # noqa: E402
from orchestrator.console import EpochConsole  # noqa: E402
from orchestrator.results import ResultSink  # noqa: E402
from trainers.config import DEFAULTS  # noqa: E402
from trainers.events import STEP_EVENTS, TIME, make_row, wire_row  # noqa: E402
from trainers.metrics.base import is_per_class  # noqa: E402
from trainers.metrics.detection import BOX_PREFIX, CLASS_FIELDS, METRIC_KEYS  # noqa: E402
from trainers.registry import CallbackMixin, new_registry, run_callbacks  # noqa: E402

LOSS_NAMES = ("box_loss", "cls_loss", "dfl_loss")  # trainers.models.tasks.DetectionModel.loss_names
PARAM_GROUPS = 3  # lr/pg0..2: the detection trainer's optimizer groups (weights, BN, biases)
CLASSES = 8  # shapes8: the per-class values of rank 0's final record
P99_GOAL, GOAL_RANKS = 1.0, 256
FLUSH_INTERVAL = inspect.signature(EventForwarder).parameters["flush_interval"].default
CHECKPOINT_BYTES = 1 << 20  # rank 0's last.pt, rewritten every epoch (a det-n checkpoint is ~6 MB)


# ----------------------------------------------------------------------------- one rank
def rank_script(rank: int, epochs: int, steps: int, val_batches: int) -> list[tuple]:
    """``(event, epoch, step, final_eval)`` in the order a detection fit fires them on ``rank``
    (trainers/engine/trainer.py ``train``): rank 0 alone saves and ends the run."""
    out = [(e, 0, 0, False) for e in ("on_pretrain_routine_start", "on_pretrain_routine_end", "on_train_start")]
    for epoch in range(epochs):
        out += _epoch(rank, epoch, epoch * steps, steps, val_batches)
    final = (epochs, epochs * steps, True)
    out += _validation(*final, val_batches) + [("on_fit_epoch_end", *final)]
    return out + ([("on_train_end", *final)] if rank == 0 else []) + [("teardown", *final)]


def _epoch(rank: int, epoch: int, step: int, steps: int, val_batches: int) -> list[tuple]:
    out = [("on_train_epoch_start", epoch, step, False)]
    for s in range(step, step + steps):  # the step count grows after on_params_update
        out += [(e, epoch, s, False) for e in ("on_train_batch_start", "optimizer_step",
                                                "on_before_zero_grad", "on_params_update")]
        out.append(("on_train_batch_end", epoch, s + 1, False))
    out += [("on_train_epoch_end", epoch, step + steps, False)] + _validation(epoch, step + steps, False, val_batches)
    saves = [("on_model_save", epoch, step + steps, False)] if rank == 0 else []
    return out + saves + [("on_fit_epoch_end", epoch, step + steps, False)]


def _validation(epoch: int, step: int, final: bool, batches: int) -> list[tuple]:
    middle = [(e, epoch, step, final) for _ in range(batches) for e in ("on_val_batch_start", "on_val_batch_end")]
    return [("on_val_start", epoch, step, final), *middle, ("on_val_end", epoch, step, final)]


class SimRank(CallbackMixin):
    """What a detection trainer (and its validator) exposes at each event, without a model: the
    per-step rows built directly (``BaseTrainer.record_row``), the others checked (``make_row``).
    Values depend on the rank, so a test can tell rank 0's series from the others'."""

    def __init__(self, rank: int, files: Path | None):
        self.rank, self.files = rank, files
        self.epoch = self.step = 0
        self.final_eval = False

    def at(self, epoch: int, step: int, final_eval: bool) -> "SimRank":
        self.epoch, self.step, self.final_eval = epoch, step, final_eval
        return self

    def record_row(self, event: str) -> list:
        if event in STEP_EVENTS:
            metrics = step_metrics(self.rank, self.step) if event == "on_train_batch_end" else {}
            return wire_row(event, self.epoch, self.step, time.time(), metrics, {}, self.final_eval)
        return make_row(event, self.record_fields(event))

    def record_fields(self, event: str) -> dict:
        metrics = epoch_metrics(self.rank, self.epoch, self.final_eval) if event == "on_fit_epoch_end" else \
            val_metrics(self.rank, self.epoch) if event == "on_val_end" else {}
        return {"epoch": self.epoch, "step": self.step, "metrics": metrics,
                "artifacts": self._files(event) if self.rank == 0 and self.files else {}, "final_eval": self.final_eval}

    def _files(self, event: str) -> dict:
        """Rank 0's files, as the trainer names them (real files: the sinks upload them)."""
        if event == "on_model_save":
            (self.files / "last.pt").write_bytes(os.urandom(CHECKPOINT_BYTES))
            return {"last": str(self.files / "last.pt"), "best": str(self.files / "last.pt")}
        if event == "on_pretrain_routine_end":
            return {"args.yaml": str(self.files / "args.yaml")}
        if event == "on_train_end":
            return {"best": str(self.files / "last.pt"),
                    **{name: str(self.files / name) for name in ("results.csv", "args.yaml")}}
        return {}


def step_metrics(rank: int, step: int) -> dict:
    """``on_train_batch_end``: the losses (``train/<loss name>``) and the learning rates."""
    losses = {f"train/{name}": rank + i + 1 / (step + 1) for i, name in enumerate(LOSS_NAMES)}
    return {**losses, **{f"lr/pg{j}": 0.01 / (step + 1) for j in range(PARAM_GROUPS)}}


def epoch_metrics(rank: int, epoch: int, final: bool) -> dict:
    """``on_fit_epoch_end``: train and val losses, val metrics, lr, fitness; in the final
    evaluation the val metrics and fitness, with per-class values on rank 0."""
    if final:
        per_class = {f"{BOX_PREFIX}{c}/{f}": 0.5 for c in range(CLASSES) for f in CLASS_FIELDS} if rank == 0 else {}
        return {**val_metrics(rank, epoch, splits=()), **per_class}
    return {**val_metrics(rank, epoch, splits=("train", "val")), **{f"lr/pg{j}": 0.01 for j in range(PARAM_GROUPS)}}


def rank0_series(plan: dict, every: int) -> dict[str, list[tuple[int, float]]]:
    """What MLflow should hold of a simulated run of ``plan``: rank 0's per-step values every
    ``every`` optimizer steps, its epoch values at each epoch, the final evaluation's under
    ``final/`` (per-class values stay in the event log)."""
    series: dict[str, list] = {}
    for step in range(every, plan["epochs"] * plan["steps"] + 1, every):
        for key, value in step_metrics(0, step).items():
            series.setdefault(metric_key(f"step/{key}"), []).append((step, value))
    for epoch in range(plan["epochs"] + 1):
        final = epoch == plan["epochs"]
        for key, value in epoch_metrics(0, epoch, final).items():
            if not is_per_class(key):
                series.setdefault(metric_key(f"{'final/' if final else ''}{key}"), []).append((epoch, value))
    return series


def val_metrics(rank: int, epoch: int, splits=("val",)) -> dict:
    """``on_val_end`` (the validator's ``metrics_dict``): val metrics, fitness and the losses of ``splits``."""
    values = {key: rank + (epoch + 1) / 100 for key in METRIC_KEYS}
    values.update({f"{split}/{name}": rank + 1 / (epoch + 1) for split in splits for name in LOSS_NAMES})
    return {**values, "fitness": rank + (epoch + 1) / 100}


def write_rank0_files(folder: Path) -> Path:
    """The files rank 0's records name: the sinks open and upload them, as in a run."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "args.yaml").write_text("task: detect\nmodel: det-n.yaml\n")
    (folder / "results.csv").write_text("epoch,metrics/mAP50(B)\n1,0.5\n")
    return folder


# ----------------------------------------------------------------------------- ranks of one process
def run_ranks(actor, run_id: str, ranks: list[int], plan: dict, rate: float | None,
              files: Path | None = None, start_at: float | None = None, flush_interval: float = FLUSH_INTERVAL) -> dict:
    """Fire the scripts of ``ranks`` through their own forwarders, each at ``rate`` events/s (as
    fast as possible with None), tick by tick from ``start_at``; teardown closes each forwarder
    (waits for its acknowledgements). Returns the forwarders' summed counts and the lag behind
    the schedule. ``flush_interval``: the forwarders' (``EventForwarder``'s default in runs)."""
    hosts = [_rank_host(actor, run_id, rank, files, flush_interval) for rank in ranks]
    scripts = [rank_script(rank, **plan) for rank in ranks]
    start = start_at or time.time()
    lag = 0.0
    for tick in range(max(map(len, scripts))):
        lag = max(lag, _pace(start, tick, rate))
        for (registry, owner, _), script in zip(hosts, scripts):
            if tick < len(script):
                event, *fields = script[tick]
                run_callbacks(registry, event, owner.at(*fields))
    return _summed([forwarder.stats() for _, _, forwarder in hosts], lag=lag, ended=time.time())


def _rank_host(actor, run_id: str, rank: int, files: Path | None, flush_interval: float) -> tuple:
    registry = new_registry()
    forwarder = EventForwarder(actor, run_id, rank, flush_interval=flush_interval).attach(registry)
    return registry, SimRank(rank, files if rank == 0 else None), forwarder


def _pace(start: float, tick: int, rate: float | None) -> float:
    """Sleep until ``tick`` is due; how late it is (s)."""
    if not rate:
        return 0.0
    wait = start + tick / rate - time.time()
    if wait > 0:
        time.sleep(wait)
    return max(0.0, -wait)


def _summed(stats: list[dict], **extra) -> dict:
    keys = ("records", "acked", "lost", "backpressure_waits", "backpressure_seconds", "resends", "buffered")
    return {**{key: sum(s[key] for s in stats) for key in keys}, **extra}


@ray.remote(num_cpus=0)
class Sender:
    """One process hosting several simulated ranks (a Ray worker process each would not fit)."""

    def ready(self) -> bool:
        return True

    def run(self, *args) -> dict:
        return run_ranks(*args)


# ----------------------------------------------------------------------------- the driver side
class TimedJournal(Journal):
    """The run's journal, timing each row from its emit to the fsync that makes it durable (the
    actor acknowledges right after), and from its batch's last emit (the send: the forwarder
    sends as that row is added) to that fsync. Writes the percentiles to ``report`` on close."""

    def __init__(self, directory, run_id: str, report: str, durable: bool = True):
        super().__init__(directory, run_id, durable=durable)
        self.report = report
        self._waiting: tuple[list, list] = ([], [])  # appended: rows' emit times, batches' send times
        self._staged: tuple[list, list] = ([], [])  # handed to the OS, in the fsync under way
        self._durable: list[float] = []
        self._transit: list[float] = []

    def __reduce__(self):
        return TimedJournal, (str(self.dir), self.run_id, self.report, self.durable)

    def append(self, stream: tuple, first_seq: int, rows: list) -> int:
        times = [row[TIME] for row in rows]
        self._waiting[0].extend(times)
        self._waiting[1].append(max(times, default=time.time()))
        return super().append(stream, first_seq, rows)

    def stage(self) -> tuple:
        """Under the dispatcher's lock; the fsync (``sync``) runs outside it, while others append."""
        self._staged = tuple(staged + waiting for staged, waiting in zip(self._staged, self._waiting))
        self._waiting = ([], [])
        return super().stage()

    def sync(self, staged: tuple) -> None:
        super().sync(staged)
        now, (emits, sends), self._staged = time.time(), self._staged, ([], [])
        self._durable += [now - t for t in emits]
        self._transit += [now - t for t in sends]

    def close(self) -> None:
        super().close()
        Path(self.report).write_text(json.dumps({"durable": percentiles(self._durable),
                                                 "transit": percentiles(self._transit)}))


def percentiles(values: list[float]) -> dict:
    """p50, p99 and max, computed in the actor: ~300,000 delays at N=256 stay out of the report."""
    ordered = sorted(values) or [float("nan")]
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"count": len(values), "p50": pick(0.5), "p99": pick(0.99), "max": ordered[-1]}


def run_sinks(folder: Path, run_id: str, epochs: int, log_every_n_steps: int) -> list:
    """A run's driver callbacks (orchestrator/session.run_callbacks) with the built-in sinks of
    callbacks/sinks/factory.run_sinks: MLflow on SQLite, event log and checkpoints in a local store."""
    mlflow = MLflowSink(f"sqlite:///{folder / 'mlflow.db'}", "scale", run_id, params={"run": run_id},
                        tags={"orchestrator.run_id": run_id}, log_every_n_steps=log_every_n_steps,
                        ckpt_upload_interval=DEFAULTS["ckpt_upload_interval"])
    store = str(folder / "store")
    return [mlflow, EventLogSink(store, run_id), CheckpointSink(store, run_id), ResultSink(), EpochConsole(epochs)]


def actor_usage(pid: int) -> dict:
    """CPU seconds (all threads) and RSS of a process on this node, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    mb = lambda key: int(status[key].split()[0]) / 1024  # noqa: E731
    return {"cpu": (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), "rss": mb("VmRSS"),
            "peak": mb("VmHWM")}


def raw_counts(store: str, run_id: str, expected: dict[int, int]) -> dict:
    """Lost and twice-stored records from the raw event-log rows (no de-duplication);
    ``expected``: rank -> records it emitted."""
    table = read_event_log(store, run_id, dedup_rows=False)
    seen: dict[int, list[int]] = {}
    for rank, seq in zip(table.column("rank").to_pylist(), table.column("seq").to_pylist()):
        seen.setdefault(rank, []).append(seq)
    lost = sum(len(set(range(n)) - set(seen.get(rank, ()))) for rank, n in expected.items())
    twice = sum(len(seqs) - len(set(seqs)) for seqs in seen.values())
    return {"rows": table.num_rows, "lost": lost, "twice": twice}


def mlflow_points(folder: Path, run_id: str) -> int:
    """Metric points the MLflow run holds (every key's full history)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("scale").experiment_id],
                             f"tags.`orchestrator.run_id` = '{run_id}'")[0]
    return sum(len(client.get_metric_history(run.info.run_id, key)) for key in run.data.metrics)


# ----------------------------------------------------------------------------- one measurement
def measure(n: int, senders: list, args, root: Path) -> dict:
    """One run of ``n`` ranks spread over ``senders``: start the actor, fire, finish, count."""
    run_id, folder = f"scale-{n}", root / f"n{n}"
    folder.mkdir(parents=True)
    plan = dict(epochs=args.epochs, steps=args.steps, val_batches=args.val_batches)
    journal = TimedJournal(folder / "journal", run_id, str(folder / "latency.json"), durable=not args.no_fsync)
    actor = start_callback_actor(run_sinks(folder, run_id, args.epochs, args.log_every_n_steps), journal=journal)
    pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))
    time.sleep(args.settle)  # the MLflow sink attaches to its run (the workers' start-up in a run)
    before, start = actor_usage(pid), time.time() + 0.5
    files = write_rank0_files(folder / "rank0")
    calls = [sender.run.remote(actor, run_id, list(range(i, n, len(senders))), plan, args.rate, files, start,
                               args.flush_interval)
             for i, sender in enumerate(senders[:n])]
    done = ray.get(calls)
    after = actor_usage(pid)  # to the last acknowledgement: finish() then delivers what sinks queue
    report = ray.get(actor.finish.remote("FINISHED"))
    ray.kill(actor)
    expected = {rank: len(rank_script(rank, **plan)) for rank in range(n)}
    seconds = max(r["ended"] for r in done) - start
    return {"n": n, "counts": _summed(done), "lag": max(r["lag"] for r in done), "seconds": seconds,
            "report": report, "cpu": after["cpu"] - before["cpu"], "rss": after["rss"], "peak": after["peak"],
            "latency": json.loads((folder / "latency.json").read_text()),
            "rows": raw_counts(str(folder / "store"), run_id, expected), "expected": sum(expected.values()),
            "points": mlflow_points(folder, run_id),
            "parts": len(list((folder / "store").glob(f"events/run_id={run_id}/*.parquet"))),
            "synced": not args.no_fsync}


def show(m: dict, rate: float, flush_interval: float) -> str:
    """The result lines of one N."""
    d, t, secs = m["latency"]["durable"], m["latency"]["transit"], m["seconds"]
    mlflow = m["report"]["sinks"]["MLflowSink"]
    return "\n".join([
        f"N={m['n']} ranks at {rate:g} events/s each (forwarders flush every {flush_interval:g} s): "
        f"{m['n'] * rate:,.0f} records/s offered, "
        f"{m['report']['dispatched'] / secs:,.0f} records/s delivered ({m['report']['dispatched']:,} records "
        f"in {secs:.1f} s; senders at most {m['lag'] * 1000:.0f} ms behind schedule)",
        f"  emit to {'durable' if m['synced'] else 'journal (NOT synced: --no-fsync)'}: "
        f"p50 {d['p50'] * 1000:.0f} ms, p99 {d['p99'] * 1000:.0f} ms, max {d['max'] * 1000:.0f} ms"
        f" (from the batch's send: p50 {t['p50'] * 1000:.0f} ms, p99 {t['p99'] * 1000:.0f} ms)",
        f"  actor CPU {m['cpu'] / secs:.3f} of a core ({m['cpu']:.1f} s), RSS {m['rss']:.0f} MB "
        f"(peak {m['peak']:.0f} MB); {m['report']['batches']:,} ingest calls, "
        f"{m['report']['journal_syncs']:,} fsyncs ({m['report']['sync_seconds']:.1f} s)",
        f"  MLflow {mlflow['delivered_points'] / secs:.1f} points/s ({m['points']} points in the run, rank 0's; "
        f"{m['parts']} event-log parts, each also an MLflow artifact under events/)",
        f"  raw event-log rows {m['rows']['rows']:,} of {m['expected']:,} emitted: lost {m['rows']['lost']}, "
        f"stored twice {m['rows']['twice']}; forwarders: "
        f"lost {m['counts']['lost']}, backpressure waits {m['counts']['backpressure_waits']}, "
        f"resends {m['counts']['resends']}"])


def verdict(results: list[dict]) -> str:
    """Whether the largest N met the goal (p99 <= 1 s, nothing lost or stored twice)."""
    last = results[-1]
    p99, rows = last["latency"]["durable"]["p99"], last["rows"]
    held = p99 <= P99_GOAL and rows["lost"] == 0 and rows["twice"] == 0
    return (f"goal at N={last['n']} (target N={GOAL_RANKS}): p99 {p99 * 1000:.0f} ms (<= {P99_GOAL * 1000:.0f}), "
            f"lost {rows['lost']}, stored twice {rows['twice']}: {'met' if held else 'MISSED'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="8,64,256", help="comma-separated world sizes, one run each")
    parser.add_argument("--rate", type=float, default=20.0, help="events/s per rank")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per epoch")
    parser.add_argument("--val-batches", type=int, default=4)
    parser.add_argument("--senders", type=int, default=16, help="processes hosting the ranks")
    parser.add_argument("--log-every-n-steps", type=int, default=DEFAULTS["log_every_n_steps"])
    parser.add_argument("--flush-interval", type=float, default=FLUSH_INTERVAL,
                        help="seconds a forwarder holds rows at most (its default in runs)")
    parser.add_argument("--no-fsync", action="store_true",
                        help="diagnosis only: a journal that is not synced (what one fsync per call costs)")
    parser.set_defaults(settle=3.0)
    args = tiny.parse(parser, "2 and 4 ranks, 1 epoch of 4 steps, seconds", ranks="2,4", epochs=1, steps=4,
                      val_batches=1, senders=2, rate=100.0, log_every_n_steps=2, settle=0.5)
    start_ray(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
              runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}})
    senders = [Sender.remote() for _ in range(args.senders)]
    ray.get([s.ready.remote() for s in senders])
    results = []
    with tempfile.TemporaryDirectory(prefix="scale-bench-") as root:
        for n in map(int, args.ranks.split(",")):
            results.append(measure(n, senders, args, Path(root)))
            print(show(results[-1], args.rate, args.flush_interval), flush=True)
    ray.shutdown()
    print(verdict(results))
    tiny.end(args)


if __name__ == "__main__":
    main()

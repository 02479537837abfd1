"""Driver CPU per record of the callback actor's dispatch with the built-in sinks, in this process.

Where the driver side of forwarding spends its time (issue 4 (a)): a plain ``Dispatcher`` gets
the rows a worker sends (five step events per optimizer step, an epoch end every 1,000 steps, in
batches of 1,000) through ``ingest_rows``, as the callback actor does, with: no sink, the event
log only, MLflow only (SQLite store, its own event-log copy), all three built-in sinks. CPU time
counts every thread of this process (the sinks' delivery threads too); the first epoch is a
warm-up. Prints microseconds per record and, for all sinks, the share of one core the driver spends at
800 steps/s of one worker (the rate of the tiny model in ``ray_overhead.py``).

    OMP_NUM_THREADS=1 python benchmarks/actor_sink_cost.py [--epochs 20]

``--tiny`` runs the same code path end to end with 2 epochs (the warm-up and one counted) and a
shorter wait for the sinks' start-up (seconds, for the tests): its figures are not measurements.
"""
from __future__ import annotations

import argparse
import gc
import tempfile
import time

import tiny
from callbacks.dispatcher import Dispatcher
from trainers.events import make_row
from callbacks.sinks import CheckpointSink, EventLogSink, MLflowSink

STEP_EVENTS = ("on_train_batch_start", "optimizer_step", "on_before_zero_grad", "on_params_update",
               "on_train_batch_end")
STEPS_PER_EPOCH, BATCH = 1000, 1000
STEPS_PER_SECOND = 800
STREAM = ("bench", 0, 0)
TINY_EPOCHS = 2  # the warm-up epoch and one counted
TINY_SETTLE = 0.2  # seconds left to the sinks' start-up before the rows (2 s otherwise)


def worker_rows(epochs: int) -> list[list]:
    """The rows one worker sends for ``epochs`` epochs of a classification-like run."""
    rows, step = [], 0
    for epoch in range(epochs):
        for _ in range(STEPS_PER_EPOCH):
            step += 1
            for event in STEP_EVENTS:
                metrics = {"train/loss": 0.5, "lr/pg0": 0.01, "lr/pg1": 0.01} if event == "on_train_batch_end" else {}
                rows.append(make_row(event, {"epoch": epoch, "step": step, "metrics": metrics}))
        rows.append(make_row("on_fit_epoch_end", {"epoch": epoch, "step": step, "metrics": {
            "metrics/accuracy_top1": 0.9, "val/loss": 0.3, "fitness": 0.9}}))
    return rows


def sinks_of(kind: str, folder: str) -> list:
    mlflow = MLflowSink(f"sqlite:///{folder}/mlflow.db", "bench", "bench", params={"epochs": 1},
                        tags={"orchestrator.run_id": "bench"}, log_every_n_steps=50)
    return {"none": [], "eventlog": [EventLogSink(f"{folder}/store", "bench")], "mlflow": [mlflow],
            "all": [mlflow, EventLogSink(f"{folder}/store", "bench"), CheckpointSink(f"{folder}/store", "bench")]}[kind]


def cost(kind: str, rows: list[list], settle: float) -> float:
    """CPU microseconds per record after the first epoch (sinks started, start-up frozen)."""
    with tempfile.TemporaryDirectory() as folder:
        dispatcher = Dispatcher(sinks_of(kind, folder))
        dispatcher.start()
        dispatcher.flush()
        time.sleep(settle)  # the MLflow sink attaches to its run in the background
        gc.freeze()  # as the callback actor does at its first batch
        batches = [rows[i:i + BATCH] for i in range(0, len(rows), BATCH)]
        warm = STEPS_PER_EPOCH * len(STEP_EVENTS) // BATCH + 1
        for i, batch in enumerate(batches[:warm]):
            dispatcher.ingest_rows(STREAM, i * BATCH, batch)
        counted = len(rows) - warm * BATCH
        started = time.process_time()
        for i, batch in enumerate(batches[warm:], warm):
            dispatcher.ingest_rows(STREAM, i * BATCH, batch)
        dispatcher.finish("FINISHED")
        spent = time.process_time() - started
        gc.unfreeze()
    return 1e6 * spent / counted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.set_defaults(settle=2.0)
    args = tiny.parse(parser, f"{TINY_EPOCHS} epochs, seconds", epochs=TINY_EPOCHS, settle=TINY_SETTLE)
    rows = worker_rows(args.epochs)
    costs = {kind: cost(kind, rows, args.settle) for kind in ("none", "eventlog", "mlflow", "all")}
    for kind, us in costs.items():
        print(f"{kind:>8}: {us:5.2f} us of driver CPU per record")
    rate = STEPS_PER_SECOND * len(STEP_EVENTS)
    print(f"driver CPU / wall time with all sinks at {STEPS_PER_SECOND} steps/s ({rate:,} records/s): "
          f"{costs['all'] * rate / 1e6:.3f}")
    tiny.end(args)

if __name__ == "__main__":
    main()

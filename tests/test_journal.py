"""The run journal: durable entries, exactly-once redelivery after a restart, ``orchestrator recover``."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as ds

from callbacks.dispatcher import Dispatcher
from callbacks.journal import Journal
from callbacks.sinks import EventLogSink, MLflowSink
from trainers.events import make_row
from tests.servers import mlflow_store

ROOT = Path(__file__).resolve().parents[1]


def rows(first: int, n: int, epoch_every: int = 10) -> list:
    """Rank rows: a step per row, an epoch end every ``epoch_every`` rows."""
    return [make_row("on_fit_epoch_end" if (first + i) % epoch_every == epoch_every - 1 else "on_train_batch_end",
                     {"epoch": (first + i) // epoch_every, "step": first + i,
                      "metrics": {"loss": float(first + i), "fitness": float(first + i)}}, now=1e9 + first + i)
            for i in range(n)]


def raw_event_rows(store: Path, run_id: str):
    """Every row of every part, duplicates included (no de-duplication)."""
    return ds.dataset(str(store / "events" / f"run_id={run_id}"), format="parquet").to_table()


def test_entries_survive_reopen_and_a_torn_tail(tmp_path):
    journal = Journal(tmp_path / "j", "run")
    assert journal.append(("run", 0, 5), 0, rows(0, 3)) == 0
    assert journal.append(("run", 1, 5), 0, rows(0, 2)) == 1
    journal.commit()
    segment = journal.segments()[0]
    whole = segment.stat().st_size
    journal.append(("run", 0, 5), 3, rows(3, 4))
    journal.commit()
    with open(segment, "r+b") as fh:  # a crash in the middle of writing the third entry
        fh.truncate(whole + (segment.stat().st_size - whole) // 2)
    again = Journal(tmp_path / "j", "run")
    assert again.next_entry == 2 and again.positions == {("run", 0, 5): 3, ("run", 1, 5): 2}
    entries = list(again.entries())
    assert [(n, stream, first, len(r)) for n, stream, first, r in entries] == [
        (0, ("run", 0, 5), 0, 3), (1, ("run", 1, 5), 0, 2)]
    assert entries[0][3] == rows(0, 3)  # the rows come back as they went in
    again.append(("run", 0, 5), 3, rows(3, 4))  # a new segment after the torn one
    again.commit()
    assert [n for n, *_ in Journal(tmp_path / "j", "run").entries(1)] == [1, 2]


def test_restarted_dispatcher_redelivers_exactly_once(tmp_path):
    """A dispatcher (the callback actor) dies after acknowledging entries its sinks had not
    delivered; the next one, on the same journal, drops the workers' resends and hands the sinks
    the journal's entries after their watermarks: every row in the event log once, every epoch
    point in MLflow once."""
    store, uri = tmp_path / "store", mlflow_store(tmp_path / "mlflow.db")

    def sinks():
        return [MLflowSink(uri, "journal", "run", params={}, tags={"orchestrator.run_id": "r"}),
                EventLogSink(str(store), "r", max_rows=25)]

    first = Dispatcher(sinks(), journal=Journal(tmp_path / "j", "r"))
    first.start()
    stream = ("r", 0, 7)
    for start in range(0, 60, 6):
        assert first.ingest_rows(stream, start, rows(start, 6))["next_seq"] == {stream: start + 6}
    del first  # killed: no finish, whatever its sinks held in memory is gone
    second = Dispatcher(sinks(), journal=Journal(tmp_path / "j", "r"))
    second.start()
    resent = second.ingest_rows(stream, 54, rows(54, 6))  # a worker resending its last batch
    assert resent["duplicates"] == 6 and resent["next_seq"] == {stream: 60}
    second.ingest_rows(stream, 60, rows(60, 20))
    report = second.finish("FINISHED")
    assert second.delivered() and report["sinks"]["MLflowSink"]["status"] == "FINISHED"
    table = raw_event_rows(store, "r")
    assert table.num_rows == 80 and sorted(table.column("seq").to_pylist()) == list(range(80))
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    history = client.get_metric_history(report["sinks"]["MLflowSink"]["run_id"], "fitness")
    assert sorted(point.step for point in history) == list(range(8))  # epochs 0-7, each once


def train_command(epochs: int, fraction: float) -> list[str]:
    return [sys.executable, "-m", "orchestrator", "train", "model=cls-n.yaml", "data=digits", "imgsz=16",
            f"epochs={epochs}", f"fraction={fraction}", "verbose=False", "plots=False", "log_every_n_steps=5"]


def kill_after_epochs(cwd: Path, command: list[str], epochs: int, env: dict | None = None) -> None:
    """Start a training run (``env`` added to the environment) and SIGKILL its driver once
    ``epochs`` epochs are in results.csv."""
    proc = subprocess.Popen(command, cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    results = cwd / "runs" / "classify" / "train" / "results.csv"
    deadline = time.monotonic() + 240
    while not (results.is_file() and len(results.read_text().splitlines()) > epochs):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "slow"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def orchestrator(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})


def recover_publishes(folder: Path, cwd: Path) -> str:
    """``orchestrator recover`` on ``folder``'s journal root, whose one line says the models held
    back in ``folder`` are published; the model id it names."""
    out = orchestrator(["recover", f"journal={folder.parent}"], cwd)
    assert out.returncode == 0, out.stderr
    (line,) = out.stdout.splitlines()
    model_id = line.rsplit(" ", 1)[-1]
    assert line == f"{folder.name}: best checkpoint published as MLflow model {model_id}"
    return model_id


def _mlflow_run(tmp_path: Path):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/runs/mlflow.db")
    return client.search_runs([client.get_experiment_by_name("classify").experiment_id])[0]


def test_recover_on_a_clean_project_says_so(tmp_path):
    out = orchestrator(["recover"], tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "nothing to recover: every run under runs/journal ended and was delivered"
    bad = orchestrator(["recover", "jornal=x"], tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: recover: unknown option 'jornal'")


def test_a_live_run_is_left_alone(tmp_path):
    """``recover`` while another process holds a journal says so and does not touch it."""
    journal = Journal(tmp_path / "runs" / "journal" / "abc", "abc")
    journal.save_sinks([])
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from callbacks.journal import Journal; "
                               f"j = Journal({str(journal.dir)!r}, 'abc'); assert j.claim(); print('held', flush=True); time.sleep(60)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        out = orchestrator(["recover"], tmp_path)
        assert out.stdout.strip() == "abc: still running (its journal is held by a live process); left alone"
        assert not (journal.dir / "finished.json").exists()
    finally:
        holder.kill()


def test_resume_recovers_the_killed_run_first(tmp_path):
    """``resume=True`` after a SIGKILL ends the killed run (KILLED, delivered) before training on, into
    the same MLflow run: every epoch's point once, whatever the killed session logged past its
    last checkpoint."""
    kill_after_epochs(tmp_path, train_command(5, 0.3), epochs=2)
    killed = _mlflow_run(tmp_path).info.run_id
    out = orchestrator(["train", "resume=True"], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "recover: " in out.stderr and f"MLflow run {killed} ended KILLED" in out.stderr
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/runs/mlflow.db")
    run = client.get_run(killed)  # ended KILLED by the recovery, then continued by the resume
    assert run.info.status == "FINISHED" and "orchestrator.end_reason" not in run.data.tags
    fitness = [m.step for m in client.get_metric_history(killed, "fitness")]  # raw: each epoch once
    assert sorted(fitness) == list(range(5))
    steps = [m.step for m in client.get_metric_history(killed, "step/train/loss")]
    assert len(steps) == len(set(steps)) > 0  # steps the killed session logged past last.pt: not again
    assert orchestrator(["recover"], tmp_path).stdout.startswith("nothing to recover")


def test_recover_ends_a_killed_sweeps_runs(tmp_path):
    """A sweep driver and its embedded Ray killed outright mid-trial: ``orchestrator recover``
    ends the parent run and every child run, and none is left RUNNING."""
    proc, _, client = sweep_until_a_trial_logged_an_epoch(tmp_path)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
    proc.wait()
    experiment = client.get_experiment_by_name("killed-sweep").experiment_id
    assert {r.info.status for r in client.search_runs([experiment])} == {"RUNNING"}
    (record,) = (tmp_path / "runs" / "journal").glob("ray-*.json")  # the sweep driver's own Ray

    # Trial actors of the dead Ray may outlive the kill by seconds, still holding their journals:
    # recover stops what is left of that Ray first (a line of its own when something was), and
    # leaves a journal still held alone (its line says so) until its holder is gone.
    said, deadline = {}, time.monotonic() + 90
    while not said or any("still running" in line for line in said.values()):
        assert time.monotonic() < deadline, said
        out = orchestrator(["recover"], tmp_path)
        assert out.returncode == 0, out.stderr
        said.update((line.split(":")[0], line) for line in out.stdout.splitlines()
                    if not line.startswith("Ray session_"))
        time.sleep(1)
    assert not record.exists()
    runs = client.search_runs([experiment])
    assert len(said) == len(runs) >= 2  # the parent and the trials that started
    assert {r.info.status for r in runs} == {"KILLED"}
    parent = next(r for r in runs if r.data.tags.get("sweep.role") == "parent")
    assert "driver died" in parent.data.tags["orchestrator.end_reason"]


def test_sigterm_to_a_sweep_driver_stops_it_as_ctrl_c_does(tmp_path):
    """SIGTERM to a sweep's driver alone (``ray job stop``, a scheduler): Tune saves the sweep and
    stops its trials, the driver prints how to resume and exits 130, and every run ends KILLED
    (Ray's own SIGTERM handler ended the driver at once, with a C++ stack on the console)."""
    proc, sweep, client = sweep_until_a_trial_logged_an_epoch(tmp_path)
    try:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-2000:]
    assert f"resume the rest with `orchestrator sweep {sweep} resume={tmp_path / 'killed-sweep' / 'tiny'}`" \
        in err and "SIGTERM received" not in err, err[-2000:]
    runs = client.search_runs([client.get_experiment_by_name("killed-sweep").experiment_id])
    assert len(runs) >= 2 and {r.info.status for r in runs} == {"KILLED"}  # the parent and the trial that started
    assert sorted(r.data.tags.get("orchestrator.end_reason") for r in runs) == \
        ["stopped by SIGTERM"] + ["sweep stopped by SIGTERM"] * (len(runs) - 1)  # the parent's, the trials'


def sweep_until_a_trial_logged_an_epoch(tmp_path):
    """A sweep's driver (the CLI, its own local Ray) with a trial far from done: (process, sweep
    file, MLflow client) once the first trial logged an epoch."""
    import json

    from mlflow import MlflowClient

    sweep = tmp_path / "tiny.yaml"
    sweep.write_text(json.dumps({  # JSON is YAML
        "base": {"model": "cls-n.yaml", "data": "digits", "epochs": 30, "imgsz": 16, "fraction": 0.3,
                 "verbose": False, "plots": False, "project": "killed-sweep", "optimizer": "SGD"},
        "space": {"lr0": {"grid": [0.01, 0.02]}}, "name": "tiny", "search": "grid", "num_samples": 1,
        "max_concurrent": 1, "scheduler": "fifo"}))
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "sweep", str(sweep)], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": "local"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    client = MlflowClient(f"sqlite:///{tmp_path}/runs/mlflow.db")
    deadline = time.monotonic() + 300
    while not _a_child_logged_an_epoch(client):
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(proc.stderr.read()[-2000:] if proc.poll() is not None else "no epoch in 300 s")
        time.sleep(1)
    return proc, sweep, client


def _a_child_logged_an_epoch(client) -> bool:
    experiment = client.get_experiment_by_name("killed-sweep") if (Path(client.tracking_uri[10:])).is_file() else None
    if experiment is None:
        return False
    return any("fitness" in r.data.metrics for r in client.search_runs([experiment.experiment_id])
               if r.data.tags.get("mlflow.parentRunId"))

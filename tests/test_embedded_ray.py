"""A driver's own local Ray: what a SIGKILL of the driver leaves of it, ``orchestrator recover``
stopping that, and a normal exit leaving nothing."""
import json
import os
import re
from collections import Counter, defaultdict
import subprocess
import sys
import time
from pathlib import Path

import psutil

from mlflow import MlflowClient

from callbacks.journal import read_segment
from orchestrator.embedded_ray import running, stop_dead_sessions
from tests.test_journal import ROOT, _mlflow_run, kill_after_epochs, orchestrator, raw_event_rows, train_command

RAY_RUN = "num_workers=1"  # one Ray Train worker: a Ray run
# a local Ray of the driver's own, even with another local cluster up (``ray.init()`` would join it)
OWN_RAY = {"RAY_ADDRESS": "local"}


def in_folder(cwd: Path) -> list[psutil.Process]:
    """The processes working in ``cwd`` (this test's own folder): the driver's Ray's, whatever their
    command lines say (independent of how ``recover`` recognises them)."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.cwd() == str(cwd) and running(process):
                found.append(process)
        except psutil.Error:
            continue
    return found


def settled(cwd: Path, quiet: float = 3.0, timeout: float = 30.0) -> list[psutil.Process]:
    """The processes in ``cwd`` once that set stopped changing for ``quiet`` s (those that end with
    the driver take a moment)."""
    deadline, last, since = time.monotonic() + timeout, None, time.monotonic()
    while time.monotonic() < deadline:
        pids = {p.pid for p in in_folder(cwd)}
        if pids != last:
            last, since = pids, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
        time.sleep(0.5)
    return in_folder(cwd)


def test_recover_stops_what_a_killed_driver_left_of_its_ray(tmp_path):
    """SIGKILL to a driver mid-training: processes of its Ray outlive it (Ray's dashboard and
    runtime-env agents, which ignore SIGTERM). ``orchestrator recover`` stops every one of them,
    says so in a line of its own, removes the session's record, and ends the run KILLED, delivered:
    each journaled epoch once in MLflow, each journaled record once in the event log; a second
    ``recover`` has nothing left to do."""
    kill_after_epochs(tmp_path, [*train_command(40, 0.5), RAY_RUN], epochs=2, env=OWN_RAY)
    try:
        journals = tmp_path / "runs" / "journal"
        (record,) = journals.glob("ray-*.json")
        session = json.loads(record.read_text())["session_dir"]
        folder = next(f for f in journals.iterdir() if f.is_dir())
        assert not (folder / "finished.json").exists()
        left = settled(tmp_path)
        assert left, "nothing of the killed driver's Ray outlived it"

        out = orchestrator(["recover"], tmp_path)
        assert out.returncode == 0, out.stderr[-2000:]
        said, run_line = out.stdout.splitlines()
        assert said.startswith(f"Ray {Path(session).name} (its driver, pid ")
        named = {int(pid) for pid in re.findall(r" (\d+)(?:,|$)", said.split("stopped what was left: ")[1])}
        assert all(p.pid in named or not running(p) for p in left) and named <= {p.pid for p in left}
        assert not in_folder(tmp_path) and not record.exists()

        store = tmp_path / "runs" / "store"
        copied = journal_copy(store, folder.name)  # delivered, the journal left its folder for the store
        assert copied, "the journal was not copied beside the event log"
        journaled = Counter((row["rank"], row["attempt"]) for row in copied)
        epochs = sorted(row["epoch"] for row in copied if row["event"] == "on_fit_epoch_end" and row["rank"] == 0)
        assert len(epochs) >= 2
        run = _mlflow_run(tmp_path)
        assert run_line == f"{folder.name}: {max(row['entry'] for row in copied) + 1} journal entries delivered, " \
                           f"MLflow run {run.info.run_id} ended KILLED"
        assert run.info.status == "KILLED" and "driver died" in run.data.tags["orchestrator.end_reason"]
        assert json.loads((folder / "finished.json").read_text())["delivered"] is True
        history = MlflowClient(f"sqlite:///{tmp_path}/runs/mlflow.db").get_metric_history(run.info.run_id, "fitness")
        assert sorted(point.step for point in history) == epochs == list(range(len(epochs)))
        table = raw_event_rows(store, folder.name)  # every part's rows, duplicates too
        stored = defaultdict(list)
        for rank, attempt, seq in zip(*(table.column(c).to_pylist() for c in ("rank", "attempt", "seq"))):
            stored[(rank, attempt)].append(seq)
        assert {stream: sorted(seqs) for stream, seqs in stored.items()} == \
            {stream: list(range(count)) for stream, count in journaled.items()}  # each journaled row once
        assert orchestrator(["recover"], tmp_path).stdout.startswith("nothing to recover")
    finally:
        for process in in_folder(tmp_path):  # only this test's: they work in its folder
            process.kill()


def journal_copy(store: Path, run_id: str) -> list[dict]:
    """The rows of a run's journal as copied beside its event log, each as often as it is there."""
    return [row for path in sorted((store / "events" / f"run_id={run_id}" / "_journal").glob("*/seg-*.arrow"))
            for batch in read_segment(path) for row in batch.to_pylist()]


DRIVER = """import json, sys, ray
from orchestrator.ray_launch import connect_ray
connect_ray("journal")
print(ray.get_runtime_context().gcs_address, flush=True)
print(json.dumps(ray.get_runtime_context().runtime_env.get("env_vars")), flush=True)
sys.stdin.readline()  # until the test lets it end normally
"""


def driver(cwd: Path, env: dict) -> subprocess.Popen:
    """A driver that connects to Ray as a run does, with its journal in ``cwd``; it prints Ray's
    address and its job's environment variables, and exits normally on a line of input."""
    cwd.mkdir()
    return subprocess.Popen([sys.executable, "-c", DRIVER], cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT), **env})


def test_only_a_ray_of_its_own_is_recorded_and_a_normal_exit_leaves_nothing(tmp_path):
    """A driver that starts its own Ray records it; one that joins that Ray (a cluster, to it)
    records nothing and leaves it running when it exits; recovery leaves a live driver's Ray alone;
    the owner's normal exit shuts its Ray down: no process left, no record left. Its own Ray has
    Ray's default token auth, set explicitly: no banner about it on the user's console."""
    owner = driver(tmp_path / "owner", OWN_RAY)
    try:
        address = owner.stdout.readline().strip()
        # its own Ray (``local`` too) is one node nothing preempts: no preemption watcher per run
        assert json.loads(owner.stdout.readline()) == {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
        (record,) = (tmp_path / "owner" / "journal").glob("ray-*.json")
        joiner = driver(tmp_path / "joiner", {"RAY_ADDRESS": address, "RAY_AUTH_MODE": "token"})
        joined, err = joiner.communicate("\n", timeout=120)
        assert joiner.returncode == 0 and joined.split() == [address, "null"], err[-2000:]  # a cluster's: watched
        assert not (tmp_path / "joiner" / "journal").exists()
        ray_processes = in_folder(tmp_path / "owner")
        assert len(ray_processes) > 3 and all(running(p) for p in ray_processes)  # the joiner's exit stopped none
        assert stop_dead_sessions(tmp_path / "owner" / "journal") == [] and record.exists()  # a live driver's
        _, said = owner.communicate("\n", timeout=60)
        assert owner.returncode == 0 and not record.exists()
        assert "Token authentication" not in said  # Ray's banner about its default: not the user's business
        assert not settled(tmp_path / "owner", quiet=1.0)
    finally:
        for process in in_folder(tmp_path / "owner"):
            process.kill()


def test_rays_own_lines_that_say_nothing_to_the_user_stay_off_the_drivers_console():
    """Through Ray's own filter of forwarded lines and its logger: the cleaner's lines of a Train
    run that ended without its controller (each trial a scheduler stops) and the note that a local
    Ray has token auth are dropped; anything else, and Ray's warning that auth is off, are kept."""
    import logging

    from ray._private import ray_logging

    from orchestrator.ray_quiet import RAY_AUTH_LOGGER, quiet_driver

    quiet_driver()
    quiet_driver()  # once per run in a process that runs many: the rule is not stacked
    noise = ("Detected that the Ray Train controller actor (0dfc090d088bbab549e04b7b01000000) is dead. Cleaning up "
             "placement group = [PlacementGroupID(c29bc8073bf8b7640e2f6ad763fe01000000)] created by this run.")
    batch = {"ip": "10.0.0.1", "pid": 4242, "task_name": "PlacementGroupCleaner", "is_err": True,
             "lines": [noise, "trial 1: a line of the user's", "Failed to query Ray Train Controller actor state. "
                       "State API may be temporarily unavailable. Continuing to monitor.",
                       "Restored on 192.0.2.2 from checkpoint: Checkpoint(filesystem=local, path=/x/checkpoint_000000)"]}
    printed = [line for out in ray_logging.stderr_deduplicator.deduplicate(batch) for line in out["lines"]]
    assert printed == ["trial 1: a line of the user's"]
    assert ray_logging.stderr_deduplicator.skip_re.pattern.count("Train controller actor") == 1

    def shown(message: str) -> bool:
        return bool(logging.getLogger(RAY_AUTH_LOGGER).filter(logging.LogRecord(
            RAY_AUTH_LOGGER, logging.WARNING, __file__, 1, message, None, None)))
    assert not shown("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.")
    assert shown("Token authentication is disabled for this Ray cluster. Anyone with network access ...")

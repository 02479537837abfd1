"""The local Ray a driver starts itself, and what is left of it when that driver is killed.

A driver that starts its own Ray (``ray.init()`` without RAY_ADDRESS, or RAY_ADDRESS=local) owns
it: Ray's processes end with the driver, except the two agents the raylet starts
(``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``), which outlive a SIGKILLed driver and ignore
SIGTERM. So the driver writes a record of its session, ``<journal>/ray-<session name>.json``, once
Ray is up, and removes it after shutting Ray down at a normal exit; ``orchestrator recover`` (and
the recovery each ``resume`` runs first) stops what is left of a recorded session whose driver is
gone. A driver that joins a cluster (RAY_ADDRESS, ``ray job submit``) records nothing: that Ray is
not its to stop.

A process belongs to a session when its command line or one of its open files names the
session's folder: Ray retitles its agents and workers (``ray::...``), whose command lines then
name nothing, but they keep their log files in that folder open.
"""
from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import time
from pathlib import Path

import psutil

RECORD = "ray-{}.json"  # in the journal root: where `orchestrator recover` looks
GRACE = 3.0  # seconds a leftover process gets to end after SIGTERM, then after SIGKILL


def record_session(journal_root: str | Path) -> Path | None:
    """Record the local Ray this process started (none when it joined a running one); the record
    goes at a normal exit, after Ray's shutdown ended every process of the session."""
    import ray

    node = ray._private.worker._global_node
    if node is None or not node.all_processes:  # connected only: the processes are someone else's
        return None
    session = node.get_session_dir_path()
    path = Path(journal_root).expanduser().resolve() / RECORD.format(Path(session).name)
    driver = psutil.Process()
    write_record(path, {"session_dir": session, "driver_pid": driver.pid,
                        "driver_started": driver.create_time(), "host": socket.gethostname()})
    atexit.register(shut_down, path)
    return path


def write_record(path: Path, record: dict) -> None:
    """Whole or not at all (written aside, then renamed): a kill mid-write leaves no torn record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(json.dumps(record))
    partial.replace(path)


def shut_down(path: Path) -> None:
    """At exit: Ray's own shutdown (it is idempotent), then nothing of the session is left to stop."""
    import ray

    ray.shutdown()
    path.unlink(missing_ok=True)


def stop_dead_sessions(journal_root: str | Path) -> list[str]:
    """Stop what is left of each recorded session whose driver is gone; one line per session
    that had something left. A live driver's session is never touched."""
    lines = []
    for path in sorted(Path(journal_root).expanduser().glob(RECORD.format("*"))):
        record = read_record(path)
        if record is not None and not driver_may_live(record):
            lines += stop_session(path, record)
    return lines


def read_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # removed meanwhile by its driver or another recover
        return None


def driver_may_live(record: dict) -> bool:
    """Whether the recorded driver may still run: it does, or it is on another host (its pid means
    nothing here). A pid taken since by another process (a later start time) is no driver."""
    if record.get("host") != socket.gethostname():
        return True
    try:
        driver = psutil.Process(record["driver_pid"])
        return abs(driver.create_time() - record["driver_started"]) < 1.0 and driver.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # ZombieProcess included
        return False
    except psutil.AccessDenied:
        return True


def stop_session(path: Path, record: dict) -> list[str]:
    """Stop the session's processes; the record goes once none is left (else the next recover
    tries again)."""
    leftovers = session_processes(record["session_dir"])
    names = [describe(p) for p in leftovers]
    remaining = stop(leftovers)
    if not remaining:
        path.unlink(missing_ok=True)
    return [session_line(record, names, remaining)] if names else []


def session_line(record: dict, names: list[str], remaining: list) -> str:
    session = Path(record["session_dir"]).name
    line = f"Ray {session} (its driver, pid {record['driver_pid']}, is gone): stopped what was left: {', '.join(names)}"
    if remaining:
        line += f"; still running: {', '.join(map(describe, remaining))}, run `orchestrator recover` again"
    return line


def describe(process: psutil.Process) -> str:
    try:
        return f"{process.name()} {process.pid}"
    except psutil.Error:
        return str(process.pid)


def session_processes(session_dir: str) -> list[psutil.Process]:
    """Every other process whose command line or open files name ``session_dir``."""
    return [p for p in psutil.process_iter() if p.pid != os.getpid() and names_folder(p, session_dir)]


def names_folder(process: psutil.Process, folder: str) -> bool:
    try:
        texts = [*process.cmdline(), *(f.path for f in process.open_files())]
    except psutil.Error:  # gone, a zombie, or another user's
        return False
    return any(text.endswith(folder) or folder + os.sep in text for text in texts)


def stop(processes: list[psutil.Process], grace: float = GRACE) -> list[psutil.Process]:
    """SIGTERM (a clean end for those that honour it), then SIGKILL for those still there after
    ``grace`` (the agents ignore SIGTERM); returns those that still run."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for process in processes:
            send(process, sig)
        processes = still_running(processes, grace)
    return processes


def send(process: psutil.Process, sig: int) -> None:
    try:
        process.send_signal(sig)  # psutil checks the pid still is this process
    except psutil.NoSuchProcess:
        pass


def still_running(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Those of ``processes`` still running after up to ``timeout`` s; a zombie (ended, waiting
    for its new parent to reap it) counts as ended."""
    deadline = time.monotonic() + timeout
    while (processes := [p for p in processes if running(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return processes


def running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False

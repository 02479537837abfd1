"""Detached server processes: start them in their own session, recognise them later, stop them.

A process is identified by its pid *and* its start time (``/proc/<pid>/stat``), so a recycled
pid is never mistaken for one of ours and never signalled. Zombies count as gone.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

HOST = "127.0.0.1"


def port_open(port: int, host: str = HOST, timeout: float = 0.5) -> bool:
    """Something accepts TCP connections on ``host:port``."""
    with socket.socket() as sock:
        sock.settimeout(timeout)
        return sock.connect_ex((host, int(port))) == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """``url`` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status == 200
    except OSError:
        return False


def _stat(pid: int) -> list[str] | None:
    """Fields of ``/proc/<pid>/stat`` after the command name, or None without /proc or process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), None where /proc is missing."""
    fields = _stat(pid)
    return fields[19] if fields else None


def alive(pid: int | None, started: str | None = None) -> bool:
    """``pid`` runs (not a zombie) and, when ``started`` is known, is the process we started."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # someone else's process reusing the pid
    fields = _stat(pid)
    if fields is None:
        return not Path("/proc").is_dir()  # no /proc (macOS): trust the signal probe
    if fields[0] in ("Z", "X"):
        return False
    return started is None or fields[19] == started


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``."""
    if not Path("/proc").is_dir():
        try:
            os.killpg(pgid, 0)
            return [pgid]
        except OSError:
            return []
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
                members.append(int(entry.name))
    return members


def spawn(cmd: list[str], log: Path, env: dict, cwd: Path) -> tuple[int, str | None]:
    """Start ``cmd`` detached (new session, output appended to ``log``); returns (pid, start time)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out, open(os.devnull, "rb") as devnull:
        proc = subprocess.Popen(cmd, stdin=devnull, stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=str(cwd), start_new_session=True, close_fds=True)
    return proc.pid, start_time(proc.pid)


def _wait(check, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.2)
    return check()


def stop(pid: int, started: str | None, leader_only: bool = False, timeout: float = 30.0) -> bool:
    """SIGTERM our process (its whole group unless ``leader_only``, for a leader that stops its
    own children), wait, then SIGKILL whatever is left of the group. True when all are gone."""
    ours = alive(pid, started)
    if ours:
        try:
            if leader_only:
                os.kill(pid, signal.SIGTERM)
            else:
                os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        _wait(lambda: not alive(pid, started), timeout)
    elif alive(pid):
        return False  # the pid now belongs to another process: its group is not ours
    # Leftovers of our group (the group id is the leader's pid, not reusable while they live).
    if not _wait(lambda: not group_members(pid), 5.0 if leader_only else 1.0):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return _wait(lambda: not group_members(pid), 10.0)


def wait_port_closed(port: int, timeout: float = 20.0) -> bool:
    return _wait(lambda: not port_open(port), timeout)

"""Local holding of what a sink has not delivered yet: bounded in memory, spilled to disk.

``Spool`` is a FIFO of small JSON items (metric points): up to ``max_memory`` items live in
memory, the rest go to JSON-lines chunk files so an outage of any length costs disk, not RAM.
Under a journal the MLflow sink stops taking entries at that bound (``Sink.full``), so its spool
spills only the points of the entry that crosses the bound and what is handed over at the end;
a sink used without a journal spills whatever goes past it.
``FileStage`` holds file snapshots waiting for upload, one per target name (latest wins), so a
file the trainer rewrites later is uploaded as it was when its record arrived; ``FileStage.send``
is the one upload loop of every sink that stages files.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from collections import deque
from pathlib import Path
from typing import Callable


class Spool:
    """FIFO of JSON-able items with a memory bound; ``peek``/``drop`` so failed sends stay queued."""

    def __init__(self, directory: str | os.PathLike, max_memory: int = 100_000, chunk: int = 10_000):
        self.dir = Path(directory)
        self.max_memory = max(1, int(max_memory))
        self.chunk = max(1, min(int(chunk), self.max_memory))
        self._mem: deque = deque()
        self._files: deque[list] = deque()   # [path, count] oldest first
        self._tail = None                    # open handle of the newest chunk file
        self._counter = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._mem) + sum(count for _, count in self._files)

    @property
    def on_disk(self) -> int:
        with self._lock:
            return sum(count for _, count in self._files)

    def put_many(self, items: list) -> None:
        with self._lock:
            for item in items:
                if not self._files and len(self._mem) < self.max_memory:
                    self._mem.append(item)
                else:
                    self._spill(item)

    def put(self, item) -> None:
        self.put_many([item])

    def peek(self, n: int) -> list:
        """The first ``n`` items (fewer if fewer are queued), left in place."""
        with self._lock:
            if not self._mem and self._files:
                self._load_oldest()
            return [self._mem[i] for i in range(min(n, len(self._mem)))]

    def drop(self, n: int) -> None:
        """Forget the first ``n`` items: they were delivered."""
        with self._lock:
            for _ in range(min(n, len(self._mem))):
                self._mem.popleft()

    def dump(self) -> Path | None:
        """Write every in-memory item to disk (kept in order): called when giving up at close."""
        with self._lock:
            if not self._mem:
                self._close_tail()
                return self.dir if self._files else None
            self.dir.mkdir(parents=True, exist_ok=True)
            head = self._new_path()
            with open(head, "w") as fh:
                for item in self._mem:
                    fh.write(json.dumps(item) + "\n")
            self._files.appendleft([head, len(self._mem)])
            self._mem.clear()
            self._close_tail()
            return self.dir

    def _new_path(self) -> Path:
        self._counter += 1
        return self.dir / f"spool-{os.getpid()}-{id(self):x}-{self._counter:06d}.jsonl"

    def _spill(self, item) -> None:
        if self._tail is None or self._files[-1][1] >= self.chunk:
            self._close_tail()
            self.dir.mkdir(parents=True, exist_ok=True)
            path = self._new_path()
            self._tail = open(path, "w")
            self._files.append([path, 0])
        self._tail.write(json.dumps(item) + "\n")
        self._files[-1][1] += 1

    def _close_tail(self) -> None:
        if self._tail is not None:
            self._tail.close()
            self._tail = None

    def _load_oldest(self) -> None:
        path, _ = self._files[0]
        if len(self._files) == 1:
            self._close_tail()
        with open(path) as fh:
            self._mem.extend(json.loads(line) for line in fh if line.strip())
        self._files.popleft()
        path.unlink(missing_ok=True)


def file_digest(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class FileStage:
    """Snapshots waiting for upload, keyed by target name; the newest snapshot of a target wins.

    ``stage`` copies (or transforms) the source right away; unchanged content (same digest as
    the last delivered or pending snapshot of that target) is dropped, so re-saves cost nothing.
    """

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self._pending: dict[str, tuple[Path, str]] = {}
        self._delivered: dict[str, str] = {}
        self._inflight: set[Path] = set()
        self._counter = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)

    def stage(self, target: str, source: str | os.PathLike,
              transform: Callable[[Path, Path], None] | None = None) -> bool:
        """Snapshot ``source`` for ``target``; False when its content was already staged or sent."""
        snap = self._snapshot_path(target)
        snap.parent.mkdir(parents=True, exist_ok=True)
        (transform or _copy)(Path(source), snap)
        return self._add(target, snap)

    def stage_bytes(self, target: str, data: bytes) -> bool:
        snap = self._snapshot_path(target)
        snap.parent.mkdir(parents=True, exist_ok=True)
        snap.write_bytes(data)
        return self._add(target, snap)

    def pending(self) -> list[tuple[str, Path]]:
        """Targets to upload now; each snapshot stays valid until ``done`` is called for it."""
        with self._lock:
            items = [(t, p) for t, (p, _) in self._pending.items()]
            self._inflight.update(p for _, p in items)
            return items

    def send(self, upload: Callable[[str, Path], None],
             sent_one: Callable[[str], None] | None = None) -> list[str]:
        """Deliver every pending snapshot with ``upload(target, path)`` (then ``sent_one(target)``),
        in staging order; the targets sent. The first failure leaves it and the rest pending, to be
        tried again, and is raised."""
        items, sent = self.pending(), []
        for i, (target, snap) in enumerate(items):
            try:
                upload(target, snap)
            except Exception:
                for later_target, later_snap in items[i:]:
                    self.done(later_target, later_snap, delivered=False)
                raise
            self.done(target, snap)
            sent.append(target)
            if sent_one is not None:
                sent_one(target)
        return sent

    def done(self, target: str, snap: Path, delivered: bool = True) -> None:
        with self._lock:
            self._inflight.discard(snap)
            entry = self._pending.get(target)
            if entry and entry[0] == snap and delivered:
                self._delivered[target] = entry[1]
                del self._pending[target]
            if not entry or entry[0] != snap or delivered:
                snap.unlink(missing_ok=True)
                _rmdir(snap.parent)

    def targets(self) -> list[str]:
        with self._lock:
            return sorted(self._pending)

    def _snapshot_path(self, target: str) -> Path:
        with self._lock:
            self._counter += 1
            n = self._counter
        return self.dir / f"{n:06d}" / Path(target).name

    def _add(self, target: str, snap: Path) -> bool:
        digest = file_digest(snap)
        with self._lock:
            old = self._pending.get(target)
            same = old[1] if old else self._delivered.get(target)
            if same == digest:
                snap.unlink(missing_ok=True)
                _rmdir(snap.parent)
                return False
            self._pending[target] = (snap, digest)
            if old and old[0] not in self._inflight:
                old[0].unlink(missing_ok=True)
                _rmdir(old[0].parent)
            return True


def _copy(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)


def _rmdir(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass

"""Small shared helpers: logger, this process's rank, unwrapping DDP, the user-error type, atomic
file writes."""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

LOGGER = logging.getLogger("orchestrator")
if not LOGGER.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(message)s"))
    LOGGER.addHandler(_handler)
    LOGGER.setLevel(logging.INFO)
    LOGGER.propagate = False
MLFLOW_LEVEL = "MLFLOW_LOGGING_LEVEL"


def mlflow_level() -> str:
    """The level of MLflow's own lines (its INFO notes are noise on a user's console): the user's
    ``MLFLOW_LOGGING_LEVEL`` when set, else warnings only."""
    return os.environ.get(MLFLOW_LEVEL, "WARNING")


def log_details_to(path) -> None:
    """In a Ray process (a worker, the callback actor) every console line reaches the user's
    console, prefixed, from every process: keep the details (INFO) in the file ``path`` and only
    warnings and errors on this process's console."""
    for handler in LOGGER.handlers:
        if type(handler) is logging.StreamHandler:
            handler.setLevel(logging.WARNING)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    file = logging.FileHandler(path)
    file.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    LOGGER.addHandler(file)


def try_lock(path):
    """The open file ``path``, locked for this process (an advisory ``flock`` the OS drops when the
    process dies), or None while a live process holds it."""
    import fcntl

    handle = open(path, "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    return handle


def _env_rank() -> int:
    """Global rank from the environment torch.distributed / Ray Train set; -1 when alone."""
    for key in ("RANK", "WORLD_RANK"):
        if key in os.environ:
            return int(os.environ[key])
    return -1


RANK = _env_rank()


class UserError(Exception):
    """Bad input from the user: the CLI prints the message alone and exits 2."""


def yaml_problem(exc: Exception) -> str:
    """Where a YAML file is malformed and how, in one line: ``line 3, column 7: <problem>``."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem


def user_error_in(exc: BaseException | None) -> UserError | None:
    """The ``UserError`` a failure carries, as it was raised: Ray wraps a worker's, an actor's or a
    trial's error (with the remote traceback in its text), yet the user should meet the same type
    and one-line message as in process. None when the failure is not a user error."""
    seen, stack = set(), [exc]
    while stack:
        err = stack.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        inner = _wrapped(err)
        if isinstance(err, UserError) and not any(isinstance(e, UserError) for e in inner):
            return err
        stack.extend(inner)
    return None


def _wrapped(err: BaseException) -> list:
    """What a (Ray) exception wraps: a task's cause, Ray Train's worker failures, chained errors."""
    failures = getattr(err, "worker_failures", None)
    return [getattr(err, "cause", None), getattr(err, "_base_exc", None), err.__cause__, err.__context__,
            *(failures.values() if isinstance(failures, dict) else ())]


def unwrap_model(model):
    """The plain module behind DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and not hasattr(model, "yaml"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new content (a file
    beside it, synced, renamed over it): a journal's files, a checkpoint a process killed while
    saving must not leave truncated."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)

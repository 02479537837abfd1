"""What of Ray's own output stays off the user's console (it stays in Ray's log files): the user's
console has the run's own lines. Each rule here is one kind of Ray line that says nothing the user
can act on."""
from __future__ import annotations

import builtins
import logging
import re
import sys

from ray._private.log import PlainRayHandler
from ray.train.v2._internal.logging import patch_print
from ray.train.v2._internal.execution import context as train_context

from trainers.utils import UserError

REPORT_LOGGER = train_context.__file__  # Ray Train names the logger of its per-report line by file path
QUIET_LOGGERS = (REPORT_LOGGER,  # each report's metric dump
                 "ray.train.v2._internal.execution.storage",  # "Checkpoint successfully created at", each epoch
                 "ray.train._internal.storage",  # the same, for a sweep trial's report to Tune
                 "matplotlib")  # its font cache, built on a fresh machine's first plot
RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
# Lines of Ray's own processes that Ray forwards to the driver. Ray Train's placement-group cleaner
# says so each time a Tune trial's Train run ends without its controller (a scheduler stopped the
# trial, a sweep was interrupted), and each time Ray's state API was slow to tell it about the
# controller (a busy head): what it cleans up and asks about is Ray's; the trial's line says how it ended.
# Tune notes each trial it restores from a checkpoint, before the trial's code runs (a resumed sweep,
# a retried trial): the Train run's own line says where it restarts from.
FORWARDED_NOISE = (r"Detected that the Ray Train controller actor \(\w+\) is dead"
                   r"|Failed to query Ray Train Controller actor state\. State API may be temporarily unavailable"
                   r"|Restored on \S+ from checkpoint: Checkpoint\(")


def quiet_driver() -> None:
    """On the driver, before it starts or joins Ray: Ray's note that a new local Ray has its
    default, token auth (its warning that auth is off stays), and ``FORWARDED_NOISE``."""
    logging.getLogger(RAY_AUTH_LOGGER).addFilter(no_default_auth_banner)
    from ray._private import ray_logging  # Ray reads RAY_DEDUP_LOGS_SKIP_REGEX once, at import

    for lines in (ray_logging.stdout_deduplicator, ray_logging.stderr_deduplicator):
        theirs = lines.skip_re.pattern if lines.skip_re is not None else None
        if theirs is None or FORWARDED_NOISE not in theirs:
            lines.skip_re = re.compile(f"(?:{theirs})|(?:{FORWARDED_NOISE})" if theirs else FORWARDED_NOISE)


def no_default_auth_banner(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Token authentication is enabled")


def quiet_console() -> None:
    """Keep these lines off a Ray process's console (Ray forwards it to the user's): a
    ``UserError``'s traceback (the driver prints its one line), and the notes (below WARNING) of
    ``QUIET_LOGGERS``; and a ``print`` is printed once. Called in each Ray Train worker and each
    sweep trial's process."""
    for logger in (logging.getLogger("ray"), logging.getLogger("ray.train"), logging.getLogger()):
        for handler in logger.handlers:
            if isinstance(handler, PlainRayHandler):
                handler.addFilter(for_the_console)
    # Ray Train points a worker's ``print`` at its logger, which prints it a second time whenever
    # the process's stdout is wrapped, as Ray wraps every worker's: each line a user's callback
    # printed reached the console twice. Restored, a print goes to stdout (forwarded by Ray) once.
    builtins.print = patch_print._original_print


def for_the_console(record: logging.LogRecord) -> bool:
    """Ray logs a failure inside its ``except`` block: the exception being handled is the user's."""
    if isinstance(sys.exc_info()[1], UserError):
        return False
    return record.levelno >= logging.WARNING or not record.name.startswith(QUIET_LOGGERS)

"""Preemption and stops at step boundaries: the ranks' vote on a launcher's notice, and the exception
that ends this process's part of a run once its mid-epoch checkpoint is saved.

A launcher that hears of preemptions or of a stop request (Ray Train: ``orchestrator/ray_launch.py``)
gives the trainer ``preemption_notice()``, which returns what it heard: nothing (0 or False),
``PREEMPTED`` (or True) or ``STOPPED``. The ranks agree on the highest: a stop ends the run, and a
rank that heard only of the preemption must not wait for a restart that will not come.
Ranks hear of it at different moments, yet must save at the same
optimizer step: the checkpoint gathers every rank's RNG state, and the launcher's report is a
barrier. So they vote, at the same steps on every rank, with one all_reduce of two numbers about
once per ``VOTE_PERIOD`` seconds: a collective at every step would cost a fast step (a few ms)
a tenth of its time, and a notice comes tens of seconds before its node goes.
"""
from __future__ import annotations

import time

from trainers.engine.distributed import max_over_ranks

VOTE_PERIOD = 1.0  # seconds between votes, about
MAX_INTERVAL = 1000  # optimizer steps between votes, at most
PREEMPTED, STOPPED = 1, 2  # what a notice says; ranks agree on the highest


class Preempted(Exception):
    """Raised on every rank after the mid-epoch checkpoint of a notice: this process's part of the
    run is over (``teardown`` still fires). After a stop request (the trainer's ``stopping``) the
    run ends; else the launcher restarts the run from that checkpoint."""


class StepVote:
    """Asked at every optimizer step on every rank: the highest notice any rank has (0: none). Alone, every
    call asks it (a cheap read); with several ranks only every ``interval``-th call votes and the
    others answer False. Each vote also fixes the next interval, the largest of the ranks'
    proposals, so every rank votes again at the same step."""

    def __init__(self, notice, device, world_size: int):
        self.notice, self.device, self.world_size = notice, device, world_size
        self.interval = self.countdown = 1
        self.since = time.monotonic()

    def __call__(self) -> int:
        if self.notice is None:
            return 0
        if self.world_size == 1:
            return level(self.notice())
        self.countdown -= 1
        if self.countdown > 0:
            return 0
        heard, interval = max_over_ranks([float(level(self.notice())), self._proposal()], self.device)
        self.interval = self.countdown = int(interval)
        self.since = time.monotonic()
        return int(heard)

    def _proposal(self) -> int:
        """Steps until the next vote: about ``VOTE_PERIOD`` seconds at this rank's recent step time."""
        step_time = max((time.monotonic() - self.since) / self.interval, 1e-6)
        return min(MAX_INTERVAL, max(1, int(VOTE_PERIOD / step_time)))


def level(said) -> int:
    """A notice's answer as a number: False/None 0, True ``PREEMPTED``, else its own value."""
    return int(said) if said else 0

"""Preemption at step boundaries: the ranks' vote on a launcher's notice, and the exception that ends
this process's part of a run once its mid-epoch checkpoint is saved.

A launcher that hears of preemptions (Ray Train: ``orchestrator/ray_launch.py``) gives the trainer
``preemption_notice() -> bool``. Ranks hear of it at different moments, yet must save at the same
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


class Preempted(Exception):
    """Raised on every rank after the mid-epoch checkpoint of a preemption: this process's part of the
    run is over (``teardown`` still fires); the launcher restarts the run from that checkpoint."""


class StepVote:
    """Asked at every optimizer step on every rank: whether any rank has the notice. Alone, every
    call asks it (a cheap read); with several ranks only every ``interval``-th call votes and the
    others answer False. Each vote also fixes the next interval, the largest of the ranks'
    proposals, so every rank votes again at the same step."""

    def __init__(self, notice, device, world_size: int):
        self.notice, self.device, self.world_size = notice, device, world_size
        self.interval = self.countdown = 1
        self.since = time.monotonic()

    def __call__(self) -> bool:
        if self.notice is None or self.world_size == 1:
            return self.notice is not None and bool(self.notice())
        self.countdown -= 1
        if self.countdown > 0:
            return False
        heard, interval = max_over_ranks([1.0 if self.notice() else 0.0, self._proposal()], self.device)
        self.interval = self.countdown = int(interval)
        self.since = time.monotonic()
        return bool(heard)

    def _proposal(self) -> int:
        """Steps until the next vote: about ``VOTE_PERIOD`` seconds at this rank's recent step time."""
        step_time = max((time.monotonic() - self.since) / self.interval, 1e-6)
        return min(MAX_INTERVAL, max(1, int(VOTE_PERIOD / step_time)))

"""Whether a run's Ray Train workers can ever be placed on the Ray it joined.

Ray Train waits for room without a word: a worker group that does not fit waits 60 s, then the
controller logs a traceback and waits again, for good on a Ray that cannot grow. So a run (and a
sweep, for one trial) looks before it starts: on a Ray of fixed size (the local one, started here or
by the user's own ``ray.init()``) a group that cannot fit is one line naming the numbers; on a
cluster (``RAY_ADDRESS``) an autoscaler may add nodes, so it is a warning and the run waits.
"""
from __future__ import annotations

import os

import ray

from trainers.utils import LOGGER, UserError


def per_worker(use_gpu: bool, resources: dict | None) -> dict[str, float]:
    """What Ray Train reserves for each worker, as its ``ScalingConfig`` reads ``use_gpu`` and
    ``resources_per_worker``: the latter's non-zero entries (and one GPU if it names none and
    ``use_gpu``), else one GPU (``use_gpu``) or one CPU."""
    if resources is None:
        return {"GPU": 1.0} if use_gpu else {"CPU": 1.0}
    need = {key: float(value) for key, value in resources.items() if value}
    if use_gpu:
        need.setdefault("GPU", 1.0)
    return need


def room(need: dict[str, float], nodes: list[dict]) -> int:
    """How many workers of ``need`` the ``nodes`` (their resources) hold at once: a worker takes
    all of its resources on one node."""
    return sum(min(int(node.get(key, 0) // amount) for key, amount in need.items()) for node in nodes)


def alive_nodes() -> list[dict]:
    return [node["Resources"] for node in ray.nodes() if node.get("Alive")]


def check_room(workers: int, need: dict[str, float], what: str) -> None:
    """``workers`` of ``need`` each must fit the Ray joined; ``what`` names the setting asking for them."""
    nodes = alive_nodes()
    fits = room(need, nodes) if need else workers
    if fits >= workers:
        return
    have = {key: sum(node.get(key, 0) for node in nodes) for key in need}
    cluster = joined_a_cluster()
    line = (f"{what} needs {workers} Ray Train worker(s) of {describe(need)} each, but the "
            f"{'Ray cluster' if cluster else 'local Ray'} ({len(nodes)} node(s), {describe(have)} in all) "
            f"has room for {fits}")
    if cluster:
        LOGGER.warning(f"{line}: Ray Train waits until nodes join (an autoscaler's)")
        return
    raise UserError(f"{line}: {advice(need, have)}")


def advice(need: dict[str, float], have: dict[str, float]) -> str:
    if need.get("GPU") and not have.get("GPU"):
        return "it has no GPU (use_gpu=false trains on CPUs)"
    return "use fewer workers, or smaller resources_per_worker"


def joined_a_cluster() -> bool:
    """A cluster named by ``RAY_ADDRESS`` may grow; the local Ray cannot."""
    return os.environ.get("RAY_ADDRESS", "") not in ("", "local")


def describe(resources: dict[str, float]) -> str:
    return ", ".join(f"{amount:g} {key}" for key, amount in resources.items())

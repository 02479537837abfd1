"""torch.distributed helpers that also work in a single process (no process group)."""
from __future__ import annotations

import os
import platform

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from trainers.utils import UserError


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """(rank, world_size); rank is -1 when running alone, as in SPEC §2."""
    if is_dist():
        return dist.get_rank(), dist.get_world_size()
    return -1, 1


def select_device(device: str | None) -> torch.device:
    """``device`` (its form checked by ``trainers.config``), once this machine is known to have it."""
    if device:
        chosen = torch.device(device)
        backend = getattr(torch, chosen.type, None) if chosen.type != "cpu" else None
        if backend is not None and not backend.is_available():
            raise UserError(f"config key 'device': {device} is not available on {platform.node()} "
                            f"(torch {torch.__version__} finds no {chosen.type} device; device=cpu trains without one)")
        return chosen
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is True on any rank: no rank can stop (or hang) alone."""
    return bool(max_over_ranks([1.0 if flag else 0.0], device)[0])


def max_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Each value's largest over the ranks (the values themselves when alone): one all_reduce,
    so the ranks agree on several numbers for the price of one."""
    if not is_dist():
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def gather_objects(obj) -> list:
    """Every rank's ``obj`` in rank order (a one-element list when alone)."""
    if not is_dist():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class ShardSampler(Sampler):
    """Contiguous-free, padding-free shard ``rank::world`` so gathered metrics equal one process's."""

    def __init__(self, dataset, rank: int, world_size: int):
        self.indices = list(range(len(dataset)))[max(rank, 0)::world_size]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)

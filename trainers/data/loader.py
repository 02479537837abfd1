"""DataLoaders for every task: a seeded shuffling sampler for training, shards for validation."""
from __future__ import annotations

import itertools

import torch
from torch.utils.data import DataLoader, DistributedSampler

from trainers.engine.distributed import ShardSampler


def build_dataloader(dataset, batch: int, workers: int, mode: str, rank: int, world_size: int,
                     seed: int = 0, collate_fn=None) -> DataLoader:
    """Training shuffles per epoch (``sampler.set_epoch``), identically with or without DDP. A
    training epoch whose last batch would hold one image ends before it (another image each epoch,
    as the shuffle changes): BatchNorm cannot train on one value per channel."""
    if mode == "train":
        sampler = EpochSampler(dataset, num_replicas=world_size, rank=max(rank, 0),
                               shuffle=True, seed=seed, drop_last=False)
    else:
        sampler = ShardSampler(dataset, rank, world_size)
    return DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers,
                      collate_fn=collate_fn, pin_memory=torch.cuda.is_available(),
                      persistent_workers=workers > 0, drop_last=mode == "train" and ends_in_one(len(sampler), batch))


def ends_in_one(images: int, batch: int) -> bool:
    """Whether an epoch of ``images`` would end in a batch of one image after at least one full
    batch: dropping it then leaves an epoch; a share of one image stays (and says why it fails)."""
    return images > batch > 1 and images % batch == 1


class EpochSampler(DistributedSampler):
    """The training sampler: DistributedSampler's shuffle (seed + epoch), which can start an epoch
    part-way, after ``start`` indices, for a run resumed mid-epoch (a preemption's checkpoint). The
    skipped indices are never loaded. ``len()`` stays the whole epoch's: the loop's schedule
    (warmup, the epoch's last step) counts on it. ``start`` holds for one pass."""

    start = 0

    def __iter__(self):
        start, self.start = self.start, 0
        return itertools.islice(super().__iter__(), start, None)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch}

    def load_state_dict(self, state: dict, start: int = 0) -> None:
        self.seed, self.epoch, self.start = int(state["seed"]), int(state["epoch"]), int(start)


def sampler_state(loader) -> dict | None:
    """The shuffle a training loader is at (seed, epoch); None for a sampler of another kind."""
    sampler = getattr(loader, "sampler", None)
    return sampler.state_dict() if isinstance(sampler, EpochSampler) else None


def batches_from(loader, first: int, state: dict | None):
    """An iterator over the loader's batches from batch ``first`` on. An ``EpochSampler`` takes back
    its ``state`` and starts after the indices of the earlier batches, unread; any other loader reads
    those batches and drops them."""
    if isinstance(loader.sampler, EpochSampler) and state is not None:
        loader.sampler.load_state_dict(state, start=first * loader.batch_size)
        return iter(loader)
    batches = iter(loader)
    for _ in range(first):
        next(batches)
    return batches

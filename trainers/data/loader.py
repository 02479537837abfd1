"""DataLoaders for every task: a seeded shuffling sampler for training, shards for validation."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, DistributedSampler

from trainers.engine.distributed import ShardSampler


def build_dataloader(dataset, batch: int, workers: int, mode: str, rank: int, world_size: int,
                     seed: int = 0, collate_fn=None) -> DataLoader:
    """Training shuffles per epoch (``sampler.set_epoch``), identically with or without DDP."""
    if mode == "train":
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=max(rank, 0),
                                     shuffle=True, seed=seed, drop_last=False)
    else:
        sampler = ShardSampler(dataset, rank, world_size)
    return DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers,
                      collate_fn=collate_fn, pin_memory=torch.cuda.is_available(),
                      persistent_workers=workers > 0, drop_last=False)

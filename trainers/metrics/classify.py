"""Classification metrics: top-1 / top-5 accuracy; fitness is their mean (SPEC §6)."""
from __future__ import annotations

import torch

from trainers.metrics.base import TaskMetrics


class ClassifyMetrics(TaskMetrics):
    """Top-1 and top-5 accuracy of one validation; reads as its flat dict (``trainers.metrics.base``)."""

    metric_keys = ("metrics/accuracy_top1", "metrics/accuracy_top5")  # keys() is the dict's

    def __init__(self):
        super().__init__()
        self.top1 = self.top5 = 0.0

    def process(self, correct_top1: int, correct_top5: int, n: int) -> None:
        self.top1 = correct_top1 / max(n, 1)
        self.top5 = correct_top5 / max(n, 1)

    @property
    def fitness(self) -> float:
        return (self.top1 + self.top5) / 2

    def own_results(self) -> dict:
        return {self.metric_keys[0]: self.top1, self.metric_keys[1]: self.top5, "fitness": self.fitness}

    def _restore(self, results: dict) -> None:
        self.top1, self.top5 = (float(results.get(key, 0.0)) for key in self.metric_keys)


def topk_correct(logits: torch.Tensor, target: torch.Tensor, k: int = 5) -> tuple[int, int]:
    """(number right in top-1, number right in top-k) for one batch."""
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    hits = top == target[:, None]
    return int(hits[:, 0].sum()), int(hits.any(1).sum())

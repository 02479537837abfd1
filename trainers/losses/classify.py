"""Classification loss: mean cross entropy over the batch."""
from __future__ import annotations

import torch.nn.functional as F


class ClassificationLoss:
    """``criterion(preds, batch) -> (loss, loss_items)`` with ``loss_items`` of shape (1,)."""

    def __call__(self, preds, batch: dict):
        logits = preds[1] if isinstance(preds, tuple) else preds
        target = batch["cls"].to(logits.device).view(-1).long()
        loss = F.cross_entropy(logits.float(), target)
        return loss, loss.detach().view(1)

"""Early stopping on fitness (``patience`` epochs without improvement)."""
from __future__ import annotations

from trainers.utils import LOGGER


class EarlyStopping:
    def __init__(self, patience: int = 100):
        self.best_fitness = None
        self.best_epoch = 0
        self.patience = patience if patience > 0 else float("inf")

    def __call__(self, epoch: int, fitness) -> bool:
        """Record this epoch's fitness; True when training should stop."""
        if fitness is None:
            return False
        if self.best_fitness is None or fitness > self.best_fitness:
            self.best_fitness, self.best_epoch = fitness, epoch
        stop = epoch - self.best_epoch >= self.patience
        if stop:
            LOGGER.info(f"early stopping: no improvement in {self.patience} epochs; "
                        f"best epoch {self.best_epoch + 1}")
        return stop

    def state_dict(self) -> dict:
        return {"best_fitness": self.best_fitness, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.best_fitness, self.best_epoch = state["best_fitness"], state["best_epoch"]

"""The validated search space as Ray Tune domains, and the objective computed from metrics."""
from __future__ import annotations

from ray import tune

from trainers.utils import UserError


class ObjectiveKeyError(UserError):
    """The objective names a metric the trainer does not report: every trial would fail alike."""


def tune_domain(kind: str, values, search: str):
    """One space entry as a Tune domain; under ``search: grid`` a choice is enumerated too."""
    if kind == "grid" or (kind == "choice" and search == "grid"):
        return tune.grid_search(list(values))
    if kind == "choice":
        return tune.choice(list(values))
    low, high = values
    if kind == "uniform":
        return tune.uniform(low, high)
    if kind == "loguniform":
        return tune.loguniform(low, high)
    return tune.randint(low, high)  # high excluded


def param_space(space: dict, search: str) -> dict:
    return {key: tune_domain(kind, values, search) for key, (kind, values) in space.items()}


def pbt_mutations(space: dict, keys: list[str] | None) -> dict:
    """What PBT may resample when it explores: the space's domains (a grid becomes a choice)."""
    chosen = keys or list(space)
    for key in chosen:
        if key not in space:
            raise UserError(f"scheduler pbt: mutate key '{key}' is not in the space ({', '.join(space)})")
    out = {}
    for key in chosen:
        kind, values = space[key]
        out[key] = list(values) if kind in ("grid", "choice") else tune_domain(kind, values, "random")
    return out


class Objective:
    """``sum(weight * metrics[key])``: fitness, one metric, or a weighted sum of metrics."""

    def __init__(self, weights: dict[str, float]):
        self.weights = dict(weights)

    def __call__(self, metrics: dict) -> float:
        missing = [k for k in self.weights if k not in metrics]
        if missing:
            available = ", ".join(sorted(k for k, v in metrics.items() if isinstance(v, (int, float))))
            raise ObjectiveKeyError(f"objective key '{missing[0]}' is not among the reported metrics: {available}")
        return float(sum(w * float(metrics[k]) for k, w in self.weights.items()))

    def describe(self) -> str:
        if len(self.weights) == 1 and next(iter(self.weights.values())) == 1.0:
            return next(iter(self.weights))
        return " + ".join(f"{w:g}*{k}" for k, w in self.weights.items())

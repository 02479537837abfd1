"""Hyperparameter sweeps on Ray Tune; each trial is a Ray Train run, objective = the trainer's fitness."""
from sweeps.config import SweepConfig, build_sweep, load_sweep
from sweeps.tune import SweepResult, run_sweep

__all__ = ["SweepConfig", "SweepResult", "build_sweep", "load_sweep", "run_sweep"]

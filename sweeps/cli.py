"""``orchestrator sweep sweep.yaml [key=value ...]``: validate, run (or resume), print the summary."""
from __future__ import annotations

from sweeps.config import load_sweep, parse_cli


def run_sweep_cli(argv: list[str]) -> int:
    """Exit code 0 when the sweep finished, 130 when it was interrupted (resume it later)."""
    path, overrides = parse_cli(argv)
    sweep = load_sweep(path, overrides)
    from sweeps.api import trainer_for

    trainer_cls, task = trainer_for(sweep.base_args())
    from sweeps.tune import run_sweep

    result = run_sweep(sweep, trainer_cls, task=task)
    return 130 if result.status == "KILLED" else 0

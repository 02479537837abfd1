"""Command line: ``orchestrator MODE [cfg=exp.yaml] key=value ...``.

User errors print one line and exit 2; there is no traceback for them.
"""
from __future__ import annotations

import logging
import os
import sys

from trainers.config import DEFAULT_CFG_PATH, get_cfg, load_yaml, parse_overrides
from trainers.utils import LOGGER, MLFLOW_LEVEL, UserError, mlflow_level

MODES = {
    "train": "train a model: orchestrator train model=det-n.yaml data=shapes8.yaml epochs=5",
    "val": "validate a checkpoint: orchestrator val model=runs/detect/train/weights/best.pt",
    "predict": "predict: orchestrator predict model=best.pt source=images/",
    "export": "export: orchestrator export model=best.pt format=torchscript",
    "data": "make a dataset: orchestrator data shapes out=datasets/shapes8 seed=0",
    "sweep": "hyperparameter sweep on Ray Tune: orchestrator sweep sweep.yaml",
    "ui": "open the MLflow UI on the embedded store: orchestrator ui [port=5000]",
    "stack": "local stack (MLflow server, S3, Ray head): orchestrator stack up|down|status",
    "events": "event log tools: orchestrator events replay run=<id> tracking_uri=<uri>",
    "recover": "deliver runs whose driver died and end them KILLED, stop what is left of the local Ray it started, "
               "publish the models an MLflow outage held back: orchestrator recover [journal=runs/journal]",
}


def usage() -> str:
    lines = ["usage: orchestrator MODE [cfg=exp.yaml] [key=value ...]", "", "modes:"]
    lines += [f"  {m:<8} {text}" for m, text in MODES.items()]
    lines += ["", "config keys (defaults):"]
    for line in DEFAULT_CFG_PATH.read_text().splitlines():
        if line and not line.startswith("#"):
            lines.append("  " + line)
    return "\n".join(lines)


def split_args(argv: list[str]) -> tuple[dict | None, dict]:
    overrides = parse_overrides(argv)
    cfg_file = overrides.pop("cfg", None)
    return (load_yaml(cfg_file) if cfg_file else None), overrides


def run_mode(mode: str, argv: list[str]) -> int:
    if mode in {"train", "val", "predict", "export"}:
        from orchestrator.commands import details_shown, run_task_mode

        cfg, overrides = split_args(argv)
        args = get_cfg(cfg, overrides)
        with details_shown(args.verbose):
            return run_task_mode(mode, args, {**(cfg or {}), **overrides})
    if mode == "data":
        from orchestrator.commands import run_data

        return run_data(argv)
    if mode == "sweep":
        from sweeps.cli import run_sweep_cli

        return run_sweep_cli(argv)
    if mode == "ui":
        from orchestrator.commands import run_ui

        return run_ui(parse_overrides(argv))
    if mode == "stack":
        from infra.local.stack import run_stack_cli

        return run_stack_cli(argv)
    if mode == "events":
        from orchestrator.commands import run_events

        return run_events(argv)
    if mode == "recover":
        from orchestrator.commands import run_recover

        return run_recover(parse_overrides(argv))
    raise UserError(f"unknown mode {mode!r}; valid modes: {', '.join(MODES)}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ[MLFLOW_LEVEL] = mlflow_level()  # for this process and those it starts
    logging.getLogger("mlflow").setLevel(os.environ[MLFLOW_LEVEL])  # (when already imported)
    if not argv or argv[0] in {"-h", "--help", "help"} or any(a in {"-h", "--help"} for a in argv[1:2]):
        print(usage())
        return 0
    try:
        return run_mode(argv[0], argv[1:]) or 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # e.g. unknown event names from user callbacks
        if "valid events" in str(exc):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt as exc:
        print(f"{exc}: the run ended KILLED; resume=True continues from its last checkpoint" if str(exc)
              else "interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

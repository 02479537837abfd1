"""Entry points shared by the CLI and ``Model.tune``."""
from __future__ import annotations

from orchestrator.tasks import task_class
from trainers.models.build import load_spec, spec_task
from trainers.utils import UserError


def trainer_for(args, trainer_cls=None) -> tuple[type, str]:
    """The trainer class and task of a base config (task from the config or the model spec)."""
    task = args.task
    if task is None:
        if not args.model:
            raise UserError("sweep base config: set 'model' (e.g. cls-n.yaml) or 'task'")
        if str(args.model).endswith(".pt"):
            from trainers.engine.checkpoint import load_checkpoint

            task = load_checkpoint(args.model).get("train_args", {}).get("task")
        else:
            task = spec_task(load_spec(args.model))
    return (trainer_cls or task_class(task, "trainer")), task


def tune_model(model, space: dict | None = None, *, sweep=None, trainer=None, **kwargs):
    """``Model.tune``: a sweep file (``sweep=``) or keyword settings; config keys go to the base."""
    from sweeps.config import build_sweep, load_sweep
    from sweeps.tune import run_sweep

    overrides = dict(kwargs)  # sweep settings by name; every other key goes to the base config
    if sweep is not None:
        cfg = build_sweep(sweep, overrides, extra_base=model.overrides) if isinstance(sweep, dict) else \
            load_sweep(sweep, overrides, extra_base=model.overrides)
    else:
        cfg = build_sweep({"space": space}, overrides, origin="Model.tune", extra_base=model.overrides)
    trainer_cls, task = trainer_for(cfg.base_args(), model._trainer_class(trainer) if trainer else None)
    return run_sweep(cfg, trainer_cls, callbacks=model.callbacks, driver_callbacks=model.driver_callbacks,
                     task=task)

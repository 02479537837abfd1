"""A sweep's models: each trial's best checkpoint becomes an MLflow logged model on the trial's child
run, carrying its epoch's metrics, ``objective`` (the value the sweep's fitness hook ranked it by)
among them; the best
trial's model is registered with the alias ``champion``, under ``register=``'s name or the
experiment's. ``mlflow.search_logged_models(order_by=[{"field_name": "metrics.objective", ...}])``
then lists the sweep's models best first. Everything is saved already: failures here are warnings.
"""
from __future__ import annotations

import math

from orchestrator.logged_model import log_best_model, register_model
from orchestrator.run_setup import experiment_name
from trainers.config import get_cfg
from trainers.utils import LOGGER

ALIAS = "champion"


def publish_models(table, configs: dict, base_args, description: str) -> str | None:
    """Log every trial with a checkpoint and an objective (``table`` is ranked best first); register
    the first. ``configs`` maps trial ids to their sampled values. Returns the champion's model id."""
    models = [_log_trial(row, configs.get(row["trial_id"], {}), base_args) for _, row in table.iterrows()
              if row["checkpoint"] and row["mlflow_run_id"] and math.isfinite(row["objective"])]
    models = [m for m in models if m]
    if not models:
        return None
    row, model_id = models[0]
    try:
        register_model(base_args, row["mlflow_run_id"], model_id, {"objective": row["objective"]}, description,
                       name=registered_name(base_args), alias=ALIAS)
    except Exception as exc:  # noqa: BLE001 - the sweep's results stand; say what failed
        LOGGER.warning(f"sweep: the champion was not registered: {type(exc).__name__}: {exc}")
    return model_id


def registered_name(base_args) -> str:
    return experiment_name(base_args) if base_args.register in (None, False, True) else str(base_args.register)


def _log_trial(row, config: dict, base_args):
    args = get_cfg(None, {**base_args.to_dict(), **config, "register": None})
    try:
        model_id = log_best_model(args, row["mlflow_run_id"], row["checkpoint"], name=f"trial-{row['trial_id']}",
                                  evaluated="epoch")
    except Exception as exc:  # noqa: BLE001
        LOGGER.warning(f"sweep: trial {row['trial_id']}'s model was not logged: {type(exc).__name__}: {exc}")
        return None
    return (row, model_id) if model_id else None

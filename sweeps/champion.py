"""A sweep's models: each trial's best checkpoint becomes an MLflow logged model on the trial's child
run, carrying its epoch's metrics, ``objective`` (the value the sweep's fitness hook ranked it by)
among them; the best trial's model is registered with the alias ``champion``, under ``register=``'s
name or the experiment's. ``mlflow.search_logged_models(order_by=[{"field_name": "metrics.objective",
...}])`` then lists the sweep's models best first. Everything is saved already: what MLflow does not
take at the sweep's end waits in the parent's journal for ``orchestrator recover``
(``orchestrator/publishing.py``).
"""
from __future__ import annotations

import math

from orchestrator.publishing import Publication, model_entry, registered_name
from orchestrator.run_setup import experiment_name
from trainers.config import get_cfg

ALIAS = "champion"
TAG = "champion_model_id"  # on the parent run


def publish_models(table, configs: dict, base_args, description: str, setup, parent_run) -> str | None:
    """Log every trial with a checkpoint and an objective (``table`` is ranked best first); register
    the first as ``@champion`` and name it in the parent run's tag. ``configs`` maps trial ids to
    their sampled values; ``setup`` names the trials' runs. What MLflow does not take now is kept in
    the parent's journal for ``orchestrator recover``. Returns the champion's model id."""
    entries = [_entry(row, configs.get(row["trial_id"], {}), base_args, setup) for _, row in table.iterrows()
               if row["checkpoint"] and math.isfinite(row["objective"])]
    if not entries:
        return None
    register = {"name": registered_name(base_args), "alias": ALIAS, "description": description}
    publication = Publication(base_args.tracking_uri, experiment_name(base_args), entries, register,
                              tag={"run": parent_run.orch_id, "key": TAG})
    return publication.publish(parent_run.journal.dir)


def _entry(row, config: dict, base_args, setup) -> dict:
    args = get_cfg(None, {**base_args.to_dict(), **config, "register": None}).to_dict()
    return model_entry(args, setup.run_id(row["trial_id"]), row["mlflow_run_id"] or None, row["checkpoint"],
                       name=f"trial-{row['trial_id']}", evaluated="epoch", metrics={"objective": float(row["objective"])})

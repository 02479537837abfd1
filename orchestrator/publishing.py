"""The models a finished run or sweep gives MLflow, kept on disk until MLflow has taken them.

A run's best.pt becomes a logged model (``orchestrator.logged_model``), registered when
``register=`` asks; a sweep's trials' best checkpoints become logged models and the best is
registered as ``@champion``, its id a tag of the parent run. These are MLflow calls made after the
run's records went through the journal, so an MLflow outage at that moment would lose them. A
``Publication`` is therefore written first to ``publish.json`` in the run's journal folder; each
step is marked there as MLflow takes it and the file goes when every step is done. What an outage
left is published by ``orchestrator recover`` (and before a ``resume``): ``pending`` finds it,
and a step already taken is not taken again.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from trainers.utils import write_atomic
from callbacks.sinks.mlflow_runs import find_run, mlflow_client, scoped_short_retries
from orchestrator.logged_model import log_best_model, register_model
from orchestrator.run_setup import experiment_name, run_description
from trainers.config import get_cfg
from trainers.utils import LOGGER

PUBLISH = "publish.json"


def publish_run(args, run_id: str, mlflow_run: str | None, best: str | None, metrics: dict,
                folder: Path) -> str | None:
    """A finished run's best.pt as a logged model, registered when ``register=`` asks; its id once
    MLflow took it (else the rest is kept in ``folder``, the run's journal)."""
    if not best:
        return None
    register = {"name": registered_name(args), "alias": None, "description": run_description(args)} \
        if args.register else None
    entry = model_entry(args.to_dict(), run_id, mlflow_run, best, metrics=metrics)
    return Publication(args.tracking_uri, experiment_name(args), [entry], register).publish(folder)


def registered_name(args) -> str:
    """``register=``'s name; ``true`` (and, for a sweep's champion, unset) means the experiment's."""
    return experiment_name(args) if args.register in (None, False, True) else str(args.register)


def model_entry(args: dict, run: str, mlflow_run: str | None, best: str | None, name: str = "best",
                evaluated: str = "final", metrics: dict | None = None) -> dict:
    """One checkpoint to log: the args of the run that made it (a dict), the orchestrator run id
    (its MLflow run is looked up when ``mlflow_run`` is not known yet), the registered version's
    metrics. ``model_id`` is set once MLflow took it."""
    return {"args": args, "run": run, "mlflow_run": mlflow_run, "best": best, "name": name,
            "evaluated": evaluated, "metrics": dict(metrics or {}), "model_id": None}


@dataclass
class Publication:
    """Checkpoints to log, in order; ``register`` ({name, alias, description}) registers the first
    one logged; ``tag`` ({run, key}) sets its model id as a tag of another run (a sweep's parent)."""

    tracking_uri: str
    experiment: str
    models: list[dict]
    register: dict | None = None
    tag: dict | None = None
    done: list[str] = field(default_factory=list)  # the steps taken: "register", "tag"

    @classmethod
    def load(cls, folder: Path) -> "Publication":
        return cls(**json.loads((Path(folder) / PUBLISH).read_text()))

    def save(self, folder: Path) -> None:
        write_atomic(Path(folder) / PUBLISH, json.dumps(asdict(self), default=_plain).encode())

    @property
    def model_id(self) -> str | None:
        """The first checkpoint's model (the one registered), once logged."""
        return next((m["model_id"] for m in self.models if m["model_id"]), None)

    def publish(self, folder: Path) -> str | None:
        """Take every step not taken yet, marking each in ``folder``; the file goes once all are.
        A failure stops here with a warning: the rest waits for ``orchestrator recover``."""
        folder = Path(folder)
        self.save(folder)
        try:
            with scoped_short_retries():  # a down MLflow fails in seconds, not minutes
                self._steps(folder)
        except Exception as exc:  # noqa: BLE001 - the run is saved and ended; the rest is kept
            LOGGER.warning(f"mlflow: models not published yet ({type(exc).__name__}: {exc}); "
                           f"`orchestrator recover` publishes them once MLflow answers")
            return self.model_id
        (folder / PUBLISH).unlink(missing_ok=True)
        return self.model_id

    def _steps(self, folder: Path) -> None:
        for entry in self.models:
            if entry["model_id"] is None:
                entry["model_id"] = self._log(entry) or ""  # "": nothing to log (no checkpoint)
                self.save(folder)
        if self.register and self.model_id and "register" not in self.done:
            self._register()
            self._mark(folder, "register")
        if self.tag and "tag" not in self.done:
            self._set_tag()
            self._mark(folder, "tag")

    def _mark(self, folder: Path, step: str) -> None:
        self.done.append(step)
        self.save(folder)

    def _log(self, entry: dict) -> str | None:
        if not entry["best"]:
            return None
        entry["mlflow_run"] = entry["mlflow_run"] or self._mlflow_run(entry["run"])
        if not entry["mlflow_run"]:
            raise LookupError(f"run {entry['run']} has no MLflow run yet")
        return log_best_model(get_cfg(None, entry["args"]), entry["mlflow_run"], entry["best"],
                              name=entry["name"], evaluated=entry["evaluated"])

    def _mlflow_run(self, run: str) -> str | None:
        found = find_run(mlflow_client(self.tracking_uri), self.experiment, run)
        return found.info.run_id if found is not None else None

    def _register(self) -> None:
        entry = next(m for m in self.models if m["model_id"])
        register_model(get_cfg(None, entry["args"]), entry["mlflow_run"], entry["model_id"], entry["metrics"],
                       self.register["description"], name=self.register["name"], alias=self.register.get("alias"))

    def _set_tag(self) -> None:
        run = self._mlflow_run(self.tag["run"])
        if run is None:
            raise LookupError(f"run {self.tag['run']} has no MLflow run yet")
        mlflow_client(self.tracking_uri).set_tag(run, self.tag["key"], self.model_id or "")


def _plain(value):
    """A numpy scalar as its Python value, anything else (a path) as text."""
    return value.item() if hasattr(value, "item") else str(value)


def pending(folder: Path) -> bool:
    return (Path(folder) / PUBLISH).is_file()


def publish_pending(folder: Path) -> str:
    """Publish what an earlier attempt left in ``folder``; the line that says how it went."""
    publication = Publication.load(folder)
    publication.publish(folder)
    if pending(folder):
        return f"{folder.name}: models not published yet (MLflow did not take them); kept for the next recover"
    return f"{folder.name}: best checkpoint published as MLflow model {publication.model_id or '(none)'}"

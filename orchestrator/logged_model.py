"""A finished run's best checkpoint as an MLflow 3 LoggedModel, and ``register=`` registering it.

The model is created with the run as its source and logged in ``orchestrator.serving``'s flavor
(``mlflow.pytorch.load_model`` gives the module, ``mlflow.pyfunc`` predicts boxes or scores). The
run's points that evaluated the checkpoint (``final/...``: best.pt evaluated once more) are linked
to the model and to the run's data set, so the model page shows what it scored on which data and
``mlflow.search_logged_models`` can order models by those metrics. The points are re-sent as they
are: MLflow's store keeps one copy of an exact re-send, so the run's own series gain nothing.
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from callbacks.sinks.mlflow_points import FINAL
from callbacks.sinks.mlflow_runs import metric_key, mlflow_client
from callbacks.sinks.storage import local_file
from callbacks.sinks.s3 import S3Setup
from trainers.engine.checkpoint import build_model, load_checkpoint
from trainers.utils import LOGGER

NOT_EPOCH = (FINAL, "step/", "system/")  # keys whose step is not an epoch
PROGRESS_BAR, TRACKING_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "MLFLOW_TRACKING_URI"


def log_best_model(args, mlflow_run: str | None, best: str | None, name: str = "best",
                   evaluated: str = "final") -> str | None:
    """Log ``best`` (a path or ``s3://`` URI) on ``mlflow_run``; returns the model id, or None when
    the run has no MLflow run or no best checkpoint. ``evaluated`` says which of the run's points
    describe this checkpoint: ``final`` (best.pt's final evaluation) or ``epoch`` (the validation of
    the checkpoint's own epoch: a sweep trial's best-objective checkpoint)."""
    path = local_file(best, S3Setup.of(args)) if best else None
    if mlflow_run is None or path is None:
        return None
    client = mlflow_client(args.tracking_uri)
    ckpt = load_checkpoint(path)
    run = client.get_run(mlflow_run)
    model_id = _unfinished(client, run, name) or _create(client, run, name, args.task, ckpt)
    try:
        _save(args, model_id, build_model(ckpt).eval(), Path(path))
    except BaseException:
        client.finalize_logged_model(model_id, _status("FAILED"))
        raise
    client.finalize_logged_model(model_id, _status("READY"))
    _link_metrics(client, run, model_id, _points(client, run, evaluated, int(ckpt.get("epoch", 0))))
    what = Path(path).name if name == "best" else f"{name}'s checkpoint"
    LOGGER.info(f"logged {what} as MLflow model {model_id} (run {mlflow_run})")
    return model_id


def _unfinished(client, run, name: str) -> str | None:
    """The model of this name an earlier attempt made for the run but never completed (MLflow
    refused its files, or the answer was lost): a retry completes it rather than leave it beside
    a new one. A run has one model per name (its best.pt, or a trial's checkpoint)."""
    query = f"source_run_id = '{run.info.run_id}' AND name = '{name}' AND status != 'READY'"
    found = client.search_logged_models([run.info.experiment_id], filter_string=query, max_results=1)
    return found[0].model_id if found else None


def _create(client, run, name: str, task: str, ckpt: dict) -> str:
    model = client.create_logged_model(run.info.experiment_id, name=name, source_run_id=run.info.run_id,
                                       model_type=task, params=dict(run.data.params),
                                       tags={"best_epoch": str(ckpt.get("epoch", ""))})
    return model.model_id


def _status(name: str):
    from mlflow.entities import LoggedModelStatus

    return getattr(LoggedModelStatus, name)


def _save(args, model_id: str, module, path: Path) -> None:
    from mlflow.models import Model

    from orchestrator import serving

    with _fluent(args.tracking_uri):
        Model.log(None, flavor=serving, model_id=model_id, pytorch_model=module,
                  model_config=serving.model_config(args), extra_files=[str(path)],
                  pip_requirements=serving_requirements(), serialization_format="pickle", await_registration_for=0)


def _points(client, run, evaluated: str, epoch: int) -> list:
    """The run's points of this checkpoint: the ``final/`` ones, or every epoch key's at ``epoch``."""
    run_id, keys = run.info.run_id, list(run.data.metrics)
    if evaluated == "final":
        return [client.get_metric_history(run_id, k)[-1] for k in keys if k.startswith(FINAL)]
    keys = [k for k in keys if not k.startswith(NOT_EPOCH)]
    return [p for k in keys for p in client.get_metric_history(run_id, k) if p.step == epoch]


def _link_metrics(client, run, model_id: str, points: list) -> None:
    """``points`` re-sent as they are with the model's id and the run's data set (its MLflow input),
    so the model page lists them; the model is the run's output at their step."""
    from mlflow.entities import Metric

    named = _dataset_of(run)
    metrics = [Metric(p.key, p.value, p.timestamp, p.step, model_id=model_id, **named) for p in points]
    if metrics:
        client.log_batch(run.info.run_id, metrics=metrics, synchronous=True)
    if metrics and model_id not in _outputs_of(run):  # a retry's run may list the model already
        client.log_outputs(run.info.run_id, [_output(model_id, points[0].step)])


def _outputs_of(run) -> set[str]:
    return {o.model_id for o in run.outputs.model_outputs} if run.outputs else set()


def _dataset_of(run) -> dict:
    inputs = run.inputs.dataset_inputs if run.inputs else []
    return {"dataset_name": inputs[0].dataset.name, "dataset_digest": inputs[0].dataset.digest} if inputs else {}


def _output(model_id: str, step: int):
    from mlflow.entities import LoggedModelOutput

    return LoggedModelOutput(model_id, step)


def serving_requirements() -> list[str]:
    """Pinned to what trained the model; listed, not inferred (MLflow would load it in a subprocess)."""
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg).split('+')[0]}" for pkg in ("torch", "mlflow", "ray-orchestrator")]


@contextlib.contextmanager
def _fluent(uri: str):
    """``Model.log`` and ``models:/`` sources go through MLflow's fluent tracking URI: the run's, for
    the call. ``set_tracking_uri`` also sets ``$MLFLOW_TRACKING_URI``, which later runs in this
    process would take as their default store: both are put back as they were. The pickle format's
    caution (checkpoints are pickles too) and the copy's progress bar stay off the training console."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    pytorch_log = logging.getLogger("mlflow.pytorch")
    before, level = getattr(utils, "_tracking_uri", None), pytorch_log.level
    saved = {name: os.environ.get(name) for name in (TRACKING_ENV, PROGRESS_BAR)}
    mlflow.set_tracking_uri(uri)
    os.environ[PROGRESS_BAR] = "false"
    pytorch_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)
        pytorch_log.setLevel(level)
        for name, value in saved.items():
            os.environ.pop(name, None) if value is None else os.environ.update({name: value})


def register_model(args, mlflow_run: str, model_id: str, metrics: dict, description: str,
                   name: str | None = None, alias: str | None = None) -> str:
    """A version of the registered model ``name`` (``register=``'s value, or the experiment's name)
    whose source is the logged model, tagged with its final metrics."""
    client = mlflow_client(args.tracking_uri)
    name = name or str(args.register)
    _ensure_registered(client, name, description)
    tags = {metric_key(k): f"{v:.6g}" for k, v in metrics.items() if isinstance(v, (int, float))}
    with _fluent(args.tracking_uri):  # MLflow resolves the ``models:/`` source with the fluent URI
        version = client.create_model_version(name, f"models:/{model_id}", run_id=mlflow_run, tags=tags,
                                              description=description, model_id=model_id)
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    LOGGER.info(f"registered model '{name}' version {version.version}{f' as @{alias}' if alias else ''}")
    return version.version


def _ensure_registered(client, name: str, description: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:  # not there yet
        client.create_registered_model(name, description=description)

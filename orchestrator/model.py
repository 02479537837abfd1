"""The ``Model`` facade (SPEC §2): train, val, predict, export, callbacks."""
from __future__ import annotations

from pathlib import Path

from callbacks.dispatcher import driver_entries
from trainers.events import check_event
from trainers.registry import add_callback, copy_registry, new_registry
from callbacks.sinks.s3 import S3Setup
from callbacks.sinks.storage import local_file
from trainers.config import get_cfg
from trainers.data.sources import check_source
from orchestrator.tasks import task_class
from trainers.engine import checkpoint as ckpt_io
from trainers.engine.exporter import Exporter
from trainers.engine.factory import TrainerFactory
from trainers.models.build import load_spec, spec_classes, spec_task
from trainers.utils import LOGGER, UserError

# Config keys a checkpoint passes on to val/predict/export of the same model.
_INHERITED = ("task", "data", "imgsz", "single_cls")


class Model:
    """A model spec (``det-n.yaml``) or a checkpoint (``best.pt``) with Ultralytics' verbs."""

    def __init__(self, model: str | Path = "det-n.yaml", task: str | None = None):
        self.callbacks = new_registry()
        self.driver_callbacks: list[tuple[str, object]] = []
        self.ckpt_path: Path | None = None
        self.model = None
        self.metrics = None
        self.trainer = None
        self.validator = None  # the last val()'s (its save_dir: where its plots went)
        self.predictor = None  # the last predict()'s (its save_dir: where save=True put the images)
        self.mlflow_run_id: str | None = None  # the MLflow run of the last train()
        self.mlflow_model_id: str | None = None  # its best.pt as an MLflow logged model
        if str(model).endswith(".pt"):
            self._load(model)
        else:
            self.spec = str(model)
            self.task = task or spec_task(load_spec(model))
            self.overrides = {"model": self.spec, "task": self.task}

    def _load(self, path) -> None:
        ckpt = ckpt_io.load_checkpoint(path)
        self.model = ckpt_io.build_model(ckpt, path=path)
        self.ckpt_path = Path(path)
        self.spec = ckpt["model_yaml"]
        args = ckpt_io.saved_args(ckpt, path)
        self.task = args.get("task") or spec_task(self.model.yaml)  # a file's args may lack it
        self.overrides = {k: args[k] for k in _INHERITED if args.get(k) is not None}
        self.overrides["model"] = str(path)

    # ------------------------------------------------------------------ callbacks
    def add_callback(self, event, fn=None, where: str = "worker") -> None:
        """``where="worker"``: fn(trainer) in every worker; ``"driver"``: fn(record) on the driver.

        Given one object instead of (event, fn), each of its methods named after an event is
        registered; on the driver such an object is a sink (optional ``start``, ``flush``,
        ``close(status)``; see docs/driver-callbacks.md).
        """
        if where == "driver" and fn is None and not isinstance(event, str):
            driver_entries([event])  # no event-named method: say so now, not at train()
            self.driver_callbacks.append(event)
        elif where == "driver":
            self.driver_callbacks.append((check_event(event), fn))
        elif where == "worker":
            add_callback(self.callbacks, event, fn)
        else:
            raise ValueError(f"where must be 'worker' or 'driver', got {where!r}")

    def clear_callback(self, event: str) -> None:
        self.callbacks[check_event(event)] = []

    # ------------------------------------------------------------------ verbs
    def train(self, trainer=None, **kwargs):
        """Train with ``trainer`` (a class) in this process or on Ray Train workers. Returns the task's
        metrics object of the final evaluation of best.pt (``DetMetrics``, ``ClassifyMetrics``; it
        reads as the flat results dict too), the same whichever backend trained: rebuilt from the
        evaluation's record, so ``box`` has no ``image_metrics`` or curves (the plots hold those)."""
        trainer_cls = self._trainer_class(trainer)
        overrides = {**self.overrides, **kwargs, "mode": "train"}
        args = get_cfg(None, overrides)  # fail fast on bad keys, before any worker starts
        trainer_cls.preflight(args)  # and on missing data, before any run is created
        factory = TrainerFactory(trainer_cls, overrides, copy_registry(self.callbacks))
        from orchestrator.session import train_run

        result = train_run(factory, args, self.driver_callbacks)
        self.trainer = result.get("trainer", self.trainer)  # in process only: Ray's trainers lived in workers
        self.mlflow_run_id, self.mlflow_model_id = result["mlflow_run"], result.get("logged_model")
        best = local_file(result["best"], S3Setup.of(args)) if result["best"] else None  # s3:// if rank 0 ran elsewhere
        if best is not None:
            self._load(best)
        self.metrics = self._final_metrics(args, result)
        return self.metrics

    def tune(self, space: dict | None = None, *, sweep=None, trainer=None, **kwargs):
        """Hyperparameter sweep on Ray Tune (see ``sweeps``): ``space`` or a sweep file/dict;
        sweep settings (objective, scheduler, num_samples, ...) and config keys as keywords."""
        from sweeps.api import tune_model

        return tune_model(self, space, sweep=sweep, trainer=trainer, **kwargs)

    def val(self, **kwargs):
        """Validate on ``args.split``; returns the validator's metrics object (SPEC §6), which reads
        as the flat results dict too."""
        args = self._args("val", kwargs)
        self.validator = task_class(self.task, "validator")(args=args, _callbacks=copy_registry(self.callbacks))
        self.validator(model=self._model_for(args))
        self.metrics = self.validator.metrics
        return self.metrics

    def predict(self, source=None, stream: bool = False, **kwargs):
        args = self._args("predict", {"save": False, **kwargs})
        source = source if source is not None else args.source
        check_source(source)
        self.predictor = task_class(self.task, "predictor")(args=args, _callbacks=copy_registry(self.callbacks))
        return self.predictor(source=source, model=self._model_for(args), stream=stream)

    __call__ = predict

    def export(self, **kwargs) -> str:
        args = self._args("export", kwargs)
        exporter = Exporter(args=args, _callbacks=copy_registry(self.callbacks))
        stem = self.ckpt_path.with_suffix("") if self.ckpt_path else None
        return exporter(self._model_for(args), stem=stem)

    # ------------------------------------------------------------------ helpers
    def _final_metrics(self, args, result: dict):
        """The final evaluation ran in the trainer (maybe on a Ray worker); its record's metrics and
        per-class values rebuild the task's metrics object here."""
        validator = task_class(self.task, "validator")(args=args)
        return validator.results_object({**result["metrics"], **result["per_class"]}, self.model)

    def _args(self, mode: str, kwargs: dict):
        args = get_cfg(None, {**self.overrides, **kwargs, "mode": mode})
        args.imgsz = task_class(self.task, "trainer").input_size(args.imgsz)
        return args

    def _model_for(self, args):
        if self.model is None:
            LOGGER.warning(f"{self.spec} has no trained weights: using a freshly initialised model")
            self.model = self._fresh_model(args.data)
        return self.model.to(args.device or "cpu")

    def _fresh_model(self, data):
        """The spec's model as the task's trainer builds it; its classes come from ``data`` when
        given, else from the spec (``Model("det-n.yaml")(images)`` needs no data set)."""
        trainer = task_class(self.task, "trainer")(overrides={**self.overrides, "data": data})
        trainer.data = trainer.get_dataset() if data else spec_classes(load_spec(self.spec))
        return trainer.get_model(cfg=self.spec, verbose=False)

    def _trainer_class(self, trainer):
        if trainer is None:
            return task_class(self.task, "trainer")
        if not isinstance(trainer, type):
            raise UserError(f"trainer= takes a class, not an instance of {type(trainer).__name__}")
        from trainers.engine.trainer import BaseTrainer

        if not issubclass(trainer, BaseTrainer):
            raise UserError(f"trainer= must be a subclass of BaseTrainer, got {trainer.__name__}")
        return trainer

"""BaseValidator: one pass over a split, firing the validator events; metrics gathered over ranks."""
from __future__ import annotations

from pathlib import Path

import torch

from trainers.registry import CallbackMixin, new_registry
from trainers.config import get_cfg
from trainers.engine.distributed import gather_objects, rank_and_world, select_device
from trainers.engine.paths import run_dir
from trainers.metrics.base import TaskMetrics
from trainers.utils import unwrap_model


class BaseValidator(CallbackMixin):
    """Subclasses implement init_metrics / update_metrics / get_stats (and postprocess)."""

    metric_keys: tuple = ()  # the task's metric names (Ultralytics' ``metrics.keys``), before any validation

    def __init__(self, dataloader=None, save_dir=None, args=None, _callbacks=None):
        self.args = args if args is not None else get_cfg(None, {"mode": "val"})
        self.dataloader = dataloader
        # a trainer's validator writes in its run folder; a standalone one (model.val()) in
        # project/name, numbered as runs are: runs/detect/val, val2, ...
        self.save_dir = Path(save_dir) if save_dir else run_dir(self.args, "val")
        self.callbacks = _callbacks if _callbacks is not None else new_registry()
        self.trainer = None  # set while validating during training
        self.parent = None  # the trainer that owns this validator (also during final evaluation)
        self.training = False
        self.model = None
        self.device = None
        # The task's metrics object, made by init_metrics; after a validation it holds that
        # validation's results (SPEC §6) and reads as the returned dict (trainers/metrics/base.py).
        # A task without one gets the flat results dict.
        self.metrics = None
        self.metrics_dict: dict = {}
        self.loss = None
        self.batch_i = 0
        self.batch = None
        self.seen = 0
        self._logged: dict[str, float] = {}
        self.plots: dict[str, str] = {}

    @torch.no_grad()
    def __call__(self, trainer=None, model=None) -> dict:
        """Validate the trainer's EMA model (during training) or ``model``; return metrics."""
        self.trainer, self.training = trainer, trainer is not None
        if trainer is not None:
            model, self.device = trainer.ema.ema, trainer.device
            self.dataloader = self.dataloader or trainer.test_loader
        else:
            self.device = next(model.parameters()).device if model is not None else select_device(self.args.device)
        self.model = unwrap_model(model).eval()
        if self.dataloader is None:
            self.dataloader = self.build_dataloader()
        self.loss, self.seen, self._logged = None, 0, {}
        self.run_callbacks("on_val_start")
        self.init_metrics(self.model)
        for self.batch_i, batch in enumerate(self.dataloader):
            self.batch = batch
            self.run_callbacks("on_val_batch_start")
            batch = self.preprocess(batch)
            preds = self.model(batch["img"])
            if self.training:
                items = self.model.loss(batch, preds)[1].detach()
                self.loss = items if self.loss is None else self.loss + items
            self.seen += len(batch["img"])
            self.update_metrics(self.postprocess(preds), batch)
            self.run_callbacks("on_val_batch_end")
        stats = self.get_stats()
        stats.update(self._val_losses())
        self._keep_results(stats)
        self.run_callbacks("on_val_end")
        return self._returned(stats)

    def _keep_results(self, stats: dict) -> None:
        """``metrics_dict`` is the flat dict of the task's values and losses (the ``on_val_end``
        record); ``metrics`` stays the task's object, or is that dict when the task keeps none."""
        if self.metrics is None or isinstance(self.metrics, dict):
            self.metrics = stats
        self.metrics_dict = stats

    def _returned(self, stats: dict) -> dict:
        """The flat dict returned: ``stats`` and what callbacks logged (``on_val_end`` included). The
        metrics object keeps the values beyond its own, so it reads as this dict (``model.val()``)."""
        results = {**stats, **self._logged}
        if isinstance(self.metrics, TaskMetrics):
            self.metrics.keep_extra(results)
        elif isinstance(self.metrics, dict):
            self.metrics = results
        return results

    def per_class_results(self) -> dict:
        """The last validation's per-class values as flat floats, for the final evaluation's record:
        ``model.train()`` rebuilds its metrics object from that record (``results_object``)."""
        return self.metrics.per_class_results() if isinstance(self.metrics, TaskMetrics) else {}

    def results_object(self, results: dict, model) -> TaskMetrics | dict:
        """The task's metrics object holding ``results`` (a validation's flat dict as a record carries
        it): what ``model.train()`` returns on the driver, whichever backend trained. A task without
        a metrics object gets the dict."""
        self.init_metrics(model)
        if not isinstance(self.metrics, TaskMetrics):
            return dict(results)
        self.metrics.restore(results)
        return self.metrics

    def _val_losses(self) -> dict:
        if not self.training or self.trainer is None:
            return {}
        n = len(self.dataloader)
        totals = gather_objects(((self.loss.cpu() if self.loss is not None else None), n))
        loss = sum(t for t, _ in totals if t is not None)
        count = sum(c for _, c in totals) or 1
        return self.trainer.label_loss_items(loss / count, prefix="val") if torch.is_tensor(loss) else {}

    # -- task hooks --------------------------------------------------------
    def build_dataloader(self):
        """The ``args.split`` loader of ``args.data``, for validation outside training."""
        raise NotImplementedError

    def preprocess(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def postprocess(self, preds):
        return preds

    def init_metrics(self, model) -> None:
        raise NotImplementedError

    def update_metrics(self, preds, batch) -> None:
        raise NotImplementedError

    def get_stats(self) -> dict:
        """Metrics over all ranks (gather here), including ``fitness``."""
        raise NotImplementedError

    # -- helpers -----------------------------------------------------------
    def log(self, metrics: dict) -> None:
        """Custom metrics: into the trainer's epoch record when training, else into the result."""
        if self.trainer is not None:
            self.trainer.log(metrics)
        else:
            self._logged.update({str(k): float(v) for k, v in metrics.items()})

    def record_fields(self, event: str) -> dict:
        trainer = self.trainer or self.parent
        metrics = dict(self.metrics_dict) if event == "on_val_end" else {}
        return {"epoch": trainer.epoch if trainer else 0, "step": trainer.step if trainer else self.batch_i,
                "metrics": metrics, "artifacts": dict(self.plots) if event == "on_val_end" else {},
                "final_eval": bool(trainer and trainer.final_eval)}

    @property
    def rank_world(self):
        return rank_and_world()

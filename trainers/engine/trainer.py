"""BaseTrainer: the training loop, its lifecycle events (SPEC §3) and overridable methods (SPEC §4).

Read ``train()`` top to bottom: each overridable method is called from one clear place, and each
event fires from one place, except ``on_fit_epoch_end``, which fires at the end of every epoch and
once more in the final evaluation of best.pt (with ``final_eval`` True).
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from trainers.events import STEP_EVENTS, wire_row
from trainers.registry import CallbackMixin, new_registry
from trainers.config import Args, get_cfg, given_values
from trainers.engine import checkpoint as ckpt_io
from trainers.engine import resume
from trainers.engine.distributed import (any_rank, broadcast_object, gather_objects, is_dist,
                                         rank_and_world, select_device)
from trainers.engine.ema import ModelEMA
from trainers.engine.history import History
from trainers.engine.optim import lr_lambda, make_optimizer, warmup
from trainers.engine.paths import run_dir
from trainers.engine.preemption import STOPPED, Preempted, StepVote
from trainers.engine.setup import init_seeds, scaled_to_data, split_batch, take_fraction
from trainers.engine.stopper import EarlyStopping
from trainers.utils import LOGGER, UserError, unwrap_model, write_atomic

# Records that carry run files early (rank 0), so a run that fails later has them in MLflow.
EARLY_FILES = ("on_pretrain_routine_end", "on_train_epoch_start")


class BaseTrainer(CallbackMixin):
    """Task-independent training loop; tasks override the data/model/validator methods."""

    task: str | None = None
    default_imgsz = 32
    imgsz_multiple = 1  # the model takes only multiples of this (a detector: its largest stride)
    _step_keys: list[str] = []
    _step_keys_of = None  # the loss_names that _step_keys were made from

    def __init__(self, cfg=None, overrides: dict | None = None, _callbacks: dict | None = None):
        given = {**given_values(cfg), **(overrides or {})}  # what a resume may take over its checkpoint's
        self.args: Args = get_cfg(given)
        self.callbacks = _callbacks if _callbacks is not None else new_registry()
        self.resume_ckpt = self.check_resume(given)
        # The stop vote recorded with the resumed checkpoint, known when a launcher restarts the run
        # after a fault (Ray Train keeps it in the checkpoint's metadata). A restart continues as the
        # run would have: a checkpoint that ended the training leaves only the final evaluation.
        # None, a user's resume: it trains on after the checkpoint, and a finished run is an error.
        self.resume_stop: bool | None = None
        # Launcher functions ``fn(trainer)`` run on every rank at each epoch's end, after the stop
        # vote, so what they record (Ray Train's report) holds the stop every rank acts on.
        self.epoch_reporters: list = []
        # A launcher that hears of preemptions or of stop requests sets ``preemption_notice()``
        # (``trainers/engine/preemption.py``). When the ranks agree on one at an optimizer step
        # (``preemption.StepVote``), rank 0 writes a mid-epoch last.pt with ``data_position``, every
        # rank runs ``preemption_reporters`` (``stopping`` says whether it was a stop) and raises
        # ``Preempted``; the restart (or a ``resume=``) continues the epoch at ``resume_position``.
        self.preemption_notice = None
        self.preemption_reporters: list = []
        self.stopping = False
        self.data_position: dict | None = None
        self.resume_position: dict | None = None
        self.rank, self.world_size = rank_and_world()
        self.device = select_device(self.args.device)
        self.args.imgsz = self.input_size(self.args.imgsz)
        self.args.task = self.args.task or self.task
        self.save_dir = self.get_save_dir()
        self.wdir = self.save_dir / "weights"
        self.last, self.best = self.wdir / "last.pt", self.wdir / "best.pt"
        self.csv, self.save_period = self.save_dir / "results.csv", self.args.save_period
        self.train_time_start = self.epoch_time_start = self.epoch_time = None  # seconds, as Ultralytics'
        self.epochs, self.start_epoch, self.epoch = self.args.epochs, 0, 0
        self.step = 0  # optimizer steps taken, across epochs and resumes
        self.model = self.ema = self.optimizer = self.scheduler = self.scaler = None
        self.validator = self.data = self.train_loader = self.test_loader = None
        self.loss = self.loss_items = self.tloss = None
        self.loss_names: tuple[str, ...] = ("loss",)
        self.metrics: dict = {}  # the last validation's (zeros before the first), as Ultralytics keeps them
        self.validated: dict = {}  # this epoch's validation's; {} on an epoch that did not validate
        self.fitness = self.best_fitness = None
        self.freeze_layer_names: list[str] = []
        self.stop = False
        self.final_eval = False
        self.lr: dict[str, float] = {}
        self.plots: dict[str, str] = {}
        self._logged: dict[str, float] = {}
        self._saved_best = False
        self.history = None
        # The world size of the checkpoint this run continues from, when it differs from this one
        # (``on_resize``: Ray resized an elastic run, or a resume changed num_workers); else None.
        self.resized_from: int | None = None

    # ------------------------------------------------------------------ the loop
    def train(self):
        """Run the whole fit; ``teardown`` fires last, also after an exception."""
        try:
            self._setup_train()
            self._announce_resize()
            self.run_callbacks("on_train_start")
            for epoch in range(self.start_epoch, self.epochs):
                self.epoch = epoch
                self._train_one_epoch()
                self.run_callbacks("on_train_epoch_end")
                self.validated, self.fitness = self._validate_when_due()
                self.metrics = {**self.metrics, **self.validated}
                self._update_best_fitness()
                self._apply_early_stopping()
                self._gather_rng_states()
                self._save_checkpoints()
                self.epoch_time = time.time() - self.epoch_time_start
                self.run_callbacks("on_fit_epoch_end")
                self._add_results_row()
                self._vote_stop()
                self._report_epoch()
                if self.stop:
                    break
            self._final_evaluation()
            if self.is_main:
                self.plot_metrics()
                self.run_callbacks("on_train_end")
            return self.metrics
        except RuntimeError as exc:  # torch.OutOfMemoryError (CUDA) is one too
            if not any(words in str(exc) for words in ("out of memory", "can't allocate memory")):
                raise
            raise UserError(f"config keys 'batch', 'imgsz': batch={self.args.batch} at imgsz={self.args.imgsz} "
                            f"does not fit in the memory of {self.device}: lower them") from None
        finally:
            self.run_callbacks("teardown")

    def _setup_train(self) -> None:
        """Seeds, data, model, optimizer, validator; fires the two pretrain-routine events."""
        self.run_callbacks("on_pretrain_routine_start")
        self.train_time_start = time.time()
        init_seeds(self.args.seed + 1 + max(self.rank, 0), self.args.deterministic, self.device)
        if self.is_main:
            self.save_dir.mkdir(parents=True, exist_ok=True)
        self.history = History(self.csv)
        self.data = self.get_dataset()
        if self.args.fraction < 1.0:
            self.data["train"] = take_fraction(self.data["train"], self.args.fraction)
        self._choose_for_data(len(self.data["train"]))
        self._setup_model()
        self.batch_size, self.accumulate = split_batch(self.args.batch, self.args.nbs, self.world_size)
        self.train_loader = self.get_dataloader(self.data["train"], self.batch_size, self.rank, "train")
        self.test_loader = self.get_dataloader(self.data["val"], self.batch_size * 2, self.rank, "val")
        decay = self.args.weight_decay * self.args.batch * self.accumulate / self.args.nbs
        iterations = math.ceil(len(self.train_loader.dataset) / max(self.args.batch, self.args.nbs)) * self.epochs
        self.optimizer = self.build_optimizer(self.model, self.args.optimizer, self.args.lr0,
                                              self.args.momentum, decay, iterations)
        self.lf = lr_lambda(self.epochs, self.args.lrf, self.args.cos_lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda=self.lf)
        self.validator = self.get_validator()
        self.validator.parent = self
        self.metrics = dict.fromkeys([*self.validator.metric_keys, *self.label_loss_items(prefix="val")], 0.0)
        self.ema = ModelEMA(self.model)
        self.stopper = EarlyStopping(self.args.patience)
        self.preemption_vote = StepVote(self.preemption_notice, self.device, self.world_size)
        if self.resume_ckpt is not None:
            self.resume_training(self.resume_ckpt)
        self.run_callbacks("on_pretrain_routine_end")

    def _announce_resize(self) -> None:
        """``on_resize`` on every rank when the checkpoint this run continues from was written at
        another world size; set-up already split the batch for this one (``setup.split_batch``)."""
        before = resume.world_size_of(self.resume_ckpt) if self.resume_ckpt is not None else self.world_size
        if before == self.world_size:
            return
        self.resized_from = before
        if self.is_main:
            LOGGER.info(f"world size {before} -> {self.world_size} from epoch {self.start_epoch + 1}: "
                        f"{self.batch_size} images per worker, gradients accumulated over {self.accumulate} batches")
        self.run_callbacks("on_resize")

    def _choose_for_data(self, n_train: int) -> None:
        """Fill the keys left to the data (``setup.scaled_to_data``); args.yaml shows the values used."""
        chosen = scaled_to_data(self.args, n_train)
        vars(self.args).update(chosen)
        if not self.is_main:
            return
        if chosen:
            LOGGER.info(f"chosen for {n_train} training images: " + ", ".join(f"{k}={v}" for k, v in chosen.items()))
        (self.save_dir / "args.yaml").write_text(yaml.safe_dump(self.args.to_dict(), sort_keys=False))

    def _setup_model(self) -> None:
        """get_model -> device -> set_model_attributes -> freeze -> AMP -> DDP (SPEC §4 order)."""
        cfg, weights = self.model_source()
        self.model = self.get_model(cfg=cfg, weights=weights, verbose=self.args.verbose and self.is_main)
        self.model.to(self.device)
        self.set_model_attributes()
        self.freeze_layer_names = self.freeze_layers()
        self.amp = bool(self.args.amp) and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp)
        if is_dist() and self.world_size > 1:  # one worker: DDP would only add per-step hooks
            self.model = self._wrap_ddp(self.model)

    def _wrap_ddp(self, model: nn.Module) -> DDP:
        ids = [self.device.index] if self.device.type == "cuda" else None
        self._ddp_trainable = [p.requires_grad for p in model.parameters()]
        return DDP(model, device_ids=ids, find_unused_parameters=False)

    def _sync_trainable(self) -> None:
        """Re-wrap DDP when a callback (un)froze layers: DDP syncs only the parameters that trained
        when it was built, so an unfrozen layer would otherwise drift apart on each rank."""
        if isinstance(self.model, DDP) and [p.requires_grad for p in self.model.module.parameters()] \
                != self._ddp_trainable:
            self.model = self._wrap_ddp(self.model.module)

    def _train_one_epoch(self) -> None:
        """One pass over the training data; the optimizer steps every ``accumulate`` batches. On a
        preemption notice it saves a mid-epoch checkpoint and raises ``Preempted``; the run resumed
        from one continues the epoch where it stopped (``_epoch_batches``)."""
        self._logged = {}
        self.epoch_time_start = time.time()
        self.run_callbacks("on_train_epoch_start")
        self._sync_trainable()
        self._set_train_mode()
        sampler = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        nb = len(self.train_loader)
        nw = round(min(self.args.warmup_epochs, self.epochs - 1) * nb) if self.args.warmup_epochs > 0 else -1
        self.tloss = None
        self.optimizer.zero_grad()
        batches, first = self._epoch_batches()
        for i, batch in self._progress(batches, nb, first):
            ni = i + nb * self.epoch  # batches seen since the start of training
            self.run_callbacks("on_train_batch_start")
            if ni <= nw:
                warmup(self.optimizer, ni, nw, self.lf(self.epoch), self.args)
            batch = self.preprocess_batch(batch)
            self.loss, self.loss_items = self._forward(batch)
            self._check_loss(i)
            self.tloss = self.loss_items if self.tloss is None else (self.tloss * i + self.loss_items) / (i + 1)
            self.scaler.scale(self.loss / self.accumulate).backward()
            stepped = (i + 1) % self.accumulate == 0 or i == nb - 1
            if stepped:
                self._take_step()
            self.lr = {f"lr/pg{j}": float(g["lr"]) for j, g in enumerate(self.optimizer.param_groups)}
            self.run_callbacks("on_train_batch_end")
            if stepped and (notice := self.preemption_vote()):
                self.stopping = notice == STOPPED
                self._save_mid_epoch(i + 1, nb)
                raise Preempted(f"{'stopped' if self.stopping else 'preempted'} at epoch {self.epoch + 1}, batch "
                                f"{i + 1} of {nb}: the run continues from {self.last}")
            if self.stop and self.world_size == 1:
                break
        self.scheduler.step()
        self._warn_if_ema_still()

    def _warn_if_ema_still(self) -> None:
        """Validation and the checkpoints use the EMA: an ``optimizer_step()`` override that never
        updates it would have them measure the initial weights, silently. Said once, after the
        first epoch this process trains."""
        if self.epoch == self.start_epoch and self.step and self.ema.updates == 0:
            LOGGER.warning("optimizer_step() stepped but never called self.ema.update(self.model): validation, "
                           "best.pt and last.pt use the EMA, which still holds the initial weights")

    def _epoch_batches(self):
        """``(batches, index of the first)``: the whole epoch, or the rest of the one a preemption cut
        (``resume.continue_epoch``) on the first epoch after its mid-epoch checkpoint."""
        position, self.resume_position = self.resume_position, None
        if position is None:
            return iter(self.train_loader), 0
        return resume.continue_epoch(self, position)

    def _save_mid_epoch(self, done: int, nb: int) -> None:
        """A node of the run is about to go: rank 0 writes last.pt with this epoch's position (every
        rank's RNG state gathered at this same step), then every rank runs the launcher's reporters.
        best.pt, ``on_model_save`` and the epoch's records wait for the epoch's real end."""
        self.data_position = resume.mid_epoch_position(self, done, nb)
        self._gather_rng_states()
        if self.is_main:
            write_atomic(self.last, ckpt_io.to_bytes(self.checkpoint()))
        for report in self.preemption_reporters:
            report(self)
        self.data_position = None  # a later checkpoint of this trainer is an epoch's own

    def _forward(self, batch: dict):
        """The batch's loss and loss items. A batch BatchNorm cannot train on (one image with 1x1
        feature maps) is the config's doing: said in its key, not in torch's words."""
        try:
            with torch.autocast(self.device.type, enabled=self.amp):
                return unwrap_model(self.model).loss(batch, self.model(batch["img"]))
        except ValueError as exc:
            if "more than 1 value per channel" not in str(exc):
                raise
            raise UserError(f"config key 'batch': {self.args.batch} over {self.world_size} worker(s) is one image "
                            f"a batch, too few for the model's BatchNorm at imgsz={self.args.imgsz}: use batch >= "
                            f"{2 * self.world_size}") from None

    def _take_step(self) -> None:
        self.optimizer_step()
        self.step += 1

    def optimizer_step(self) -> None:
        """The whole optimizer step and its three events (SPEC §3, §4): unscale, clip, step, update
        the scaler, zero the gradients, update the EMA. An override without ``super()`` owns all of
        it, events included; to change only the clipping, override ``clip_gradients()``."""
        self.scaler.unscale_(self.optimizer)
        self.clip_gradients()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.run_callbacks("optimizer_step")
        self.run_callbacks("on_before_zero_grad")
        self.optimizer.zero_grad()
        self.ema.update(self.model)
        self.run_callbacks("on_params_update")

    def clip_gradients(self):
        """Clip the (already unscaled) gradient norm to ``args.clip_grad``; return the norm before."""
        return nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=self.args.clip_grad)

    def _validate_when_due(self):
        """``validate()`` when ``val`` is on and always on the last epoch; ``({}, None)`` otherwise.
        A NaN fitness counts as 0, so it can neither win best.pt nor hide an improvement."""
        if not (self.args.val or self.epoch + 1 >= self.epochs):
            return {}, None
        metrics, fitness = self.validate()
        return dict(metrics), None if fitness is None else float(np.nan_to_num(float(fitness)))

    def _update_best_fitness(self) -> None:
        if self.fitness is not None and (self.best_fitness is None or self.fitness > self.best_fitness):
            self.best_fitness = self.fitness

    def _apply_early_stopping(self) -> None:
        """``patience`` epochs without a better fitness set ``stop`` (voted on at the epoch's end)."""
        self.stop |= self.stopper(self.epoch, self.fitness)

    def _gather_rng_states(self) -> None:
        """Every rank's RNG state for the checkpoint, so each rank resumes its own streams."""
        self._rng_states = gather_objects(ckpt_io.rng_state())

    def _save_checkpoints(self) -> None:
        """Rank 0 writes last.pt (and best.pt), then fires ``on_model_save``."""
        self._saved_best = False
        if self.is_main and (self.args.save or self.epoch + 1 >= self.epochs):
            if self.save_model() is not False:
                self.run_callbacks("on_model_save")

    def _add_results_row(self) -> None:
        if self.is_main:
            self.history.add(self.epoch_row())

    def _vote_stop(self) -> None:
        """The epoch's one stop vote: every rank stops if any rank set ``stop``, early stopping or
        a callback (``on_fit_epoch_end`` included), so no rank stops, or waits, alone."""
        self.stop = any_rank(self.stop, self.device)

    def _report_epoch(self) -> None:
        """The launcher's reporters, after the vote: what they record holds the stop all ranks act on."""
        for report in self.epoch_reporters:
            report(self)

    def _final_evaluation(self) -> None:
        """Validate best.pt once more; ``on_fit_epoch_end`` fires with ``final_eval`` True and
        ``epoch`` one past the last (its record's step); ``on_train_end`` sees the last epoch again."""
        state = broadcast_object(self._best_weights() if self.is_main else None)
        if state is None:
            return
        model = unwrap_model(self.model)
        model.load_state_dict(state)
        self.epoch, self.final_eval = self.epoch + 1, True
        self._logged = {}
        metrics = self.validator(model=model)
        self.metrics = {k: v for k, v in metrics.items() if k != "fitness" and not k.startswith("val/")}
        self.fitness = metrics.get("fitness", self.fitness)
        self.run_callbacks("on_fit_epoch_end")
        self.epoch, self.final_eval = self.epoch - 1, False

    def _best_weights(self):
        path = self.best if self.best.is_file() else self.last
        if not path.is_file():
            return None
        ckpt = ckpt_io.load_checkpoint(path)
        return ckpt.get("ema") or ckpt["model"]

    # ------------------------------------------------------------------ overridable methods
    @classmethod
    def input_size(cls, imgsz: int | None) -> int:
        """``imgsz`` (the task's default when null) rounded up to ``imgsz_multiple``, with a warning,
        as Ultralytics does: a detector's feature maps only line up at multiples of its largest stride."""
        size = cls.default_imgsz if imgsz is None else int(imgsz)
        rounded = -(-size // cls.imgsz_multiple) * cls.imgsz_multiple
        if rounded != size:
            LOGGER.warning(f"imgsz={size} is not a multiple of the model's largest stride {cls.imgsz_multiple}: "
                           f"using imgsz={rounded}")
        return rounded

    @classmethod
    def preflight(cls, args) -> None:
        """Cheap checks of ``args`` on the driver (e.g. the dataset exists) before anything starts."""

    def get_dataset(self) -> dict:
        """Return ``{"train": ..., "val": ..., "nc": int, "names": {i: name}}``."""
        raise NotImplementedError

    def get_model(self, cfg=None, weights=None, verbose=True):
        raise NotImplementedError

    def get_validator(self):
        raise NotImplementedError

    def get_dataloader(self, dataset_path, batch_size=16, rank=0, mode="train"):
        raise NotImplementedError

    def preprocess_batch(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def set_model_attributes(self) -> None:
        """Called with the model on its device and before DDP wraps it (the SyncBatchNorm hook)."""
        model = self.model
        model.nc, model.names, model.args = self.data["nc"], self.data["names"], self.args

    def build_optimizer(self, model, name="auto", lr=0.001, momentum=0.9, decay=1e-5, iterations=1e5):
        return make_optimizer(model, name, lr, momentum, decay, iterations, nc=self.data["nc"])

    def validate(self):
        """Run the validator; return ``(metrics, fitness)``. Fitness decides best.pt and stopping."""
        metrics = dict(self.validator(trainer=self))
        fitness = metrics.pop("fitness", None)
        if fitness is None and self.loss_items is not None:
            fitness = -float(sum(v for k, v in metrics.items() if k.startswith("val/")))
        return metrics, fitness

    def save_model(self):
        """Write last.pt every epoch and best.pt on the best fitness (plain data only)."""
        data = ckpt_io.to_bytes(self.checkpoint())
        write_atomic(self.last, data)
        if self.fitness is not None and self.fitness == self.best_fitness or not self.best.is_file():
            write_atomic(self.best, data)
            self._saved_best = True
        if self.save_period > 0 and (self.epoch + 1) % self.save_period == 0:
            write_atomic(self.wdir / f"epoch{self.epoch + 1}.pt", data)
        return True

    def label_loss_items(self, loss_items=None, prefix="train"):
        """Loss names with a prefix; with values, a ``{prefix/name: float}`` dict."""
        keys = [f"{prefix}/{name}" for name in self.loss_names]
        if loss_items is None:
            return keys
        # one copy to Python floats, not a 0-d tensor per item
        values = loss_items.reshape(-1).tolist() if torch.is_tensor(loss_items) else loss_items
        return {k: round(float(v), 5) for k, v in zip(keys, values)}

    def plot_metrics(self) -> None:
        if self.args.plots and self.history is not None:
            path = self.history.plot()
            if path:
                self.plots["results.png"] = str(path)

    # ------------------------------------------------------------------ helpers
    def log(self, metrics: dict) -> None:
        """Add custom metrics to the current epoch's record (results.csv, MLflow)."""
        self._logged.update({str(k): float(v) for k, v in metrics.items()})

    @property
    def is_main(self) -> bool:
        return self.rank in (-1, 0)

    def record_fields(self, event: str) -> dict:
        """What the event forwarder sends to the driver for ``event``."""
        metrics, artifacts = {}, {}
        if event == "on_train_batch_end" and self.loss_items is not None:
            metrics = self.step_metrics()
        elif event == "on_fit_epoch_end":
            metrics = self.final_record_metrics() if self.final_eval else self.epoch_metrics()
            if self.fitness is not None:
                metrics["fitness"] = self.fitness
        elif event == "on_resize":  # at the first epoch trained at the new size
            return {"epoch": self.start_epoch, "step": self.step, "final_eval": False, "artifacts": {},
                    "metrics": {"world_size": self.world_size, "world_size_before": self.resized_from}}
        elif event == "on_model_save":
            artifacts = {"last": str(self.last)}
            if self._saved_best:
                artifacts["best"] = str(self.best)
        elif event == "on_train_end":
            artifacts = {"results.csv": str(self.history.path), "args.yaml": str(self.save_dir / "args.yaml"),
                         "best": str(self.best), **self.plots}
        elif self.is_main and event in EARLY_FILES:  # a run that fails later still has them in MLflow
            artifacts = self._early_files(event)
        return {"epoch": self.epoch, "step": self.step, "metrics": metrics, "artifacts": artifacts,
                "final_eval": self.final_eval}

    def _early_files(self, event: str) -> dict:
        """args.yaml once set-up wrote it; results.csv as the last epoch left it, when the next starts."""
        if event == "on_pretrain_routine_end":
            return {"args.yaml": str(self.save_dir / "args.yaml")}
        path = getattr(self.history, "path", None)
        return {"results.csv": str(path)} if path is not None and path.is_file() else {}

    def record_row(self, event: str) -> list:
        """The forwarded row (``trainers.events.ROW_FIELDS``) of ``event``. Five events fire per
        optimizer step, so their rows go to ``wire_row`` unchecked (the metrics are floats already);
        the others go through ``record_fields`` and ``make_row``, which check every field. A subclass
        that adds fields to per-step records overrides this method, not only ``record_fields``."""
        if event in STEP_EVENTS:
            metrics = self.step_metrics() if event == "on_train_batch_end" and self.loss_items is not None else {}
            return wire_row(event, self.epoch, self.step, time.time(), metrics, {}, self.final_eval)
        return super().record_row(event)

    def step_metrics(self) -> dict:
        """The last batch's losses and the learning rates, for its ``on_train_batch_end`` record.
        This runs at every step, so it is lean: keys made once, one ``tolist()``, no rounding."""
        if self._step_keys_of is not self.loss_names:
            self._step_keys = [f"train/{name}" for name in self.loss_names]
            self._step_keys_of = self.loss_names
        values = self.loss_items.tolist()
        metrics = dict(zip(self._step_keys, values if isinstance(values, list) else [values]))
        metrics.update(self.lr)
        return metrics

    def final_record_metrics(self) -> dict:
        """The best model's metrics; rank 0 adds the per-class values ``model.train()`` rebuilds its
        metrics object from (``validator.per_class_results``), so the other ranks' records stay small.
        What callbacks ``log()`` in the final evaluation is in it too, as in an epoch's record."""
        return {**self.metrics, **self._logged, **(self.validator.per_class_results() if self.is_main else {})}

    def epoch_metrics(self) -> dict:
        """The epoch's own values: its validation's only if it validated (``trainer.metrics`` keeps
        the last validation's, as Ultralytics' does, for callbacks; records and results.csv do not)."""
        train = self.label_loss_items(self.tloss) if self.tloss is not None else {}
        return {**train, **self.validated, **self._logged, **self.lr}

    def epoch_row(self) -> dict:
        return {"epoch": self.epoch + 1, "time": round(time.time() - self.train_time_start, 2),
                **self.epoch_metrics(), **({"fitness": self.fitness} if self.fitness is not None else {})}

    def model_source(self):
        """(spec, weights) from ``args.model``: a spec YAML, or a checkpoint to fine-tune from."""
        source = self.args.model or f"{'det' if self.task == 'detect' else 'cls'}-n.yaml"
        if str(source).endswith(".pt"):
            ckpt = ckpt_io.load_checkpoint(source)
            return ckpt["model_yaml"], ckpt_io.build_model(ckpt)
        return source, None

    def freeze_layers(self) -> list[str]:
        """Freeze ``model.<i>.`` prefixes from ``args.freeze`` (int N -> first N, list -> those)."""
        freeze = self.args.freeze
        indices = range(freeze) if isinstance(freeze, int) else (freeze or [])
        check_freeze(freeze, indices, len(unwrap_model(self.model).model))
        names = [f"model.{i}." for i in indices]
        for name, p in self.model.named_parameters():
            if any(name.startswith(prefix) for prefix in names):
                p.requires_grad_(False)
        if names:
            LOGGER.info(f"freezing {len(names)} layers: {', '.join(n.rstrip('.') for n in names)}")
        return names

    def _set_train_mode(self) -> None:
        """Train mode, except BatchNorm of frozen layers, which keeps its running statistics."""
        self.model.train()
        if not self.freeze_layer_names:
            return
        for name, module in unwrap_model(self.model).named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and any(
                    (name + ".").startswith(prefix) for prefix in self.freeze_layer_names):
                module.eval()

    def _progress(self, loader, total: int, first: int = 0):
        """A progress bar on rank 0 when it draws on a terminal; elsewhere (a Ray worker, a log file)
        each refresh would be a line of its own, and the driver's console has a line per epoch."""
        show = self.args.verbose and self.is_main and sys.stderr.isatty()
        desc = f"epoch {self.epoch + 1}/{self.epochs}"
        return enumerate(tqdm(loader, total=total, initial=first, desc=desc, disable=not show, leave=False), first)

    def _check_loss(self, batch_i: int) -> None:
        loss = self.loss.detach()  # float() of a tensor that requires grad makes torch warn
        if not torch.isfinite(loss):
            where = f"{self.last} (epoch {self.epoch})" if self.last.is_file() else "no checkpoint yet"
            raise UserError(f"loss is {float(loss)} at epoch {self.epoch + 1}, batch {batch_i}: "
                            f"training stopped; last saved weights: {where}; try a lower lr0")

    # ------------------------------------------------------------------ checkpoint and resume
    # Overridable here (SPEC §4); the work is in ``resume.py``, which calls back into these methods.
    def checkpoint(self) -> dict:
        """Plain-data checkpoint: weights, optimizer, scaler, scheduler, RNG and callback state."""
        return resume.checkpoint_contents(self)

    def args_without_credentials(self) -> dict:
        """Config for checkpoints: a ``user:password@`` in a URI never lands in a file."""
        return resume.args_without_credentials(self.args)

    def check_resume(self, overrides: dict):
        """Resolve ``resume`` to a checkpoint; adopt its args (a few keys may be overridden: those
        in ``overrides``, what the trainer was given)."""
        self.args, ckpt = resume.resolve_resume(self.args, overrides)
        return ckpt

    def resume_training(self, ckpt: dict) -> None:
        """Restore everything the checkpoint holds and continue after its epoch."""
        resume.restore_trainer(self, ckpt)

    def _resume_start(self, ckpt: dict) -> int:
        """The first epoch left to train (``epochs`` when a restart's checkpoint ended the training)."""
        return resume.first_epoch_left(ckpt, self.epochs, self.resume_stop, self.save_dir)

    def get_save_dir(self) -> Path:
        """``project/name`` (numbered unless exist_ok); a resumed run keeps its checkpoint's folder."""
        return run_dir(self.args)


def check_freeze(freeze, indices, n_layers: int) -> None:
    """A layer the model lacks would be frozen in name only, and freezing them all trains nothing
    (torch's "does not require grad", deep in backward): both are said before the first step."""
    missing = [i for i in indices if not 0 <= i < n_layers]
    if missing or len(set(indices)) >= n_layers:
        problem = f"layer {missing[0]} does not exist" if missing else "every layer would be frozen, nothing trained"
        raise UserError(f"config key 'freeze': value {freeze!r} is not valid: {problem} (the model has "
                        f"{n_layers} layers, 0-{n_layers - 1})")


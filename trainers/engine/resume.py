"""Checkpoint contents <-> trainer state: what a run's checkpoint holds, and how a run resumes from it.

``checkpoint.py`` reads and writes the files (plain data, model rebuild); this module decides what
of a trainer goes into one and puts it back. ``BaseTrainer`` keeps ``checkpoint``,
``check_resume``, ``resume_training`` and ``args_without_credentials`` as thin methods that call
these functions, so a subclass still overrides them there (SPEC §4). The functions call the
trainer's methods, not each other, where a subclass may have overridden one.
"""
from __future__ import annotations

from pathlib import Path

import torch

from trainers.config import Args, get_cfg
from trainers.data.loader import batches_from, sampler_state
from trainers.engine import checkpoint as ckpt_io
from trainers.engine.paths import latest_checkpoint, run_dir
from trainers.registry import stateful_callbacks
from trainers.utils import LOGGER, UserError, unwrap_model
from trainers.utils.urls import mask_url_userinfo

# Keys a resumed run may change; everything else comes from the checkpoint's args.
RESUME_OVERRIDES = {"epochs", "device", "workers", "patience", "save_period", "val", "plots",
                    "verbose", "num_workers", "use_gpu", "resources_per_worker", "max_failures", "max_preemptions",
                    "resize_interval", "tracking_uri", "storage", "ckpt_upload_interval", "batch", "register",
                    "experiment", "s3_endpoint", "s3_region", "s3_profile"}


def training_finished(epoch: int, stop: bool, epochs: int) -> bool:
    """Whether a checkpoint of ``epoch`` (0-based) ended a run of ``epochs``: its last epoch, or
    every rank voted to stop after it. One rule for the trainer's restart and the launcher's retry."""
    return bool(stop) or epoch + 1 >= epochs


def world_size_of(ckpt: dict) -> int:
    """The world size a checkpoint was written at: it holds one RNG state per rank."""
    return len(ckpt.get("rng") or [None])


def args_without_credentials(args: Args) -> dict:
    """Config for checkpoints: a URI's user info never lands in a file. It is dropped, not masked,
    so a resumed run still reaches the host with credentials given another way (env vars)."""
    return {k: mask_url_userinfo(v, mask="") if isinstance(v, str) else v for k, v in args.to_dict().items()}


def checkpoint_contents(trainer) -> dict:
    """Plain-data checkpoint: weights, optimizer, scaler, scheduler, RNG and callback state."""
    return {
        **ckpt_io.model_entry(trainer.model), **ckpt_io.stamp(),
        "ema": ckpt_io.float_state(trainer.ema.ema), "updates": trainer.ema.updates,
        "optimizer": trainer.optimizer.state_dict(), "scaler": trainer.scaler.state_dict(),
        "scheduler": trainer.scheduler.state_dict(), "epoch": trainer.epoch, "step": trainer.step,
        "best_fitness": trainer.best_fitness, "fitness": trainer.fitness,
        "train_args": trainer.args_without_credentials(), "train_metrics": dict(trainer.metrics),
        "stopper": trainer.stopper.state_dict(), "rng": trainer._rng_states,
        "callbacks": {k: cb.state_dict() for k, cb in stateful_callbacks(trainer.callbacks).items()},
        "position": trainer.data_position,
    }


def mid_epoch_position(trainer, done: int, nb: int) -> dict:
    """Where an epoch stopped for a preemption, saved with its checkpoint (``position``; None in an
    epoch's own): ``done`` of ``nb`` batches trained at this world size, the shuffle (the sampler's
    seed and epoch) and what the epoch gathered so far: the running loss, the learning rates, the
    ``trainer.log`` metrics. The RNG streams are the checkpoint's ``rng``, taken at the same step."""
    return {"batch": done, "batches": nb, "world_size": trainer.world_size,
            "sampler": sampler_state(trainer.train_loader), "tloss": trainer.tloss,
            "lr": dict(trainer.lr), "logged": dict(trainer._logged)}


def continue_epoch(trainer, position: dict):
    """``(batches, index of the first)``: the rest of an epoch a preemption cut, as a run without it
    would have seen it. The trained batches are skipped unread (``data.loader.batches_from``); the
    RNG streams go back to that step once the iterator exists, since making one draws from torch's
    RNG as at the epoch's start. At another world size (an elastic run) the same share is skipped."""
    nb = len(trainer.train_loader)
    same = position["world_size"] == trainer.world_size
    first = position["batch"] if same else round(position["batch"] * nb / position["batches"])
    batches = batches_from(trainer.train_loader, first, position["sampler"])
    trainer.tloss, trainer.lr, trainer._logged = position["tloss"], dict(position["lr"]), dict(position["logged"])
    ckpt_io.set_rng_state(position["rng"])
    return batches, first


def resolve_resume(args: Args, given=()) -> tuple[Args, dict | None]:
    """``(args, checkpoint)`` for ``args.resume``: the checkpoint's args with the few keys a resume
    may change (``RESUME_OVERRIDES``) taken from ``args`` where the user ``given`` them (a value
    equal to the default counts too: ``epochs=100`` continues a 50-epoch run to 100);
    ``(args, None)`` without resume."""
    resume = args.resume
    if not resume:
        return args, None
    path = latest_checkpoint(args) if resume is True else Path(resume)
    ckpt = ckpt_io.load_checkpoint(path, resume=True)
    overrides = {k: getattr(args, k) for k in given if k in RESUME_OVERRIDES}
    return get_cfg(ckpt_io.saved_args(ckpt, path), {**overrides, "resume": str(path), "exist_ok": True}), ckpt


def check_resumable(args: Args, given=()) -> Args:
    """The args of the resumed run (``resolve_resume``), after checking there is something left to
    train: a resume of a finished run fails on the driver, before any worker starts or its MLflow run
    is touched. (Its trainer checks again: a script may build a trainer without a driver.)"""
    resolved, ckpt = resolve_resume(args, given)
    folder = run_dir(resolved)
    start = first_epoch_left(ckpt, resolved.epochs, None, folder)
    LOGGER.info(resume_note(folder, start, resolved.epochs, ckpt.get("position")))
    return resolved


def first_epoch_left(ckpt: dict, epochs: int, resume_stop: bool | None, save_dir) -> int:
    """The first epoch left to train: the one after the checkpoint's, or for a mid-epoch checkpoint
    (a preemption's, with a data position) its own. A restart whose checkpoint ended the training
    (``resume_stop`` known) has none left: ``epochs``, the final evaluation only. A user's resume
    (``resume_stop`` None) of a finished run is an error, so it is never a no-op."""
    if resume_stop is not None and training_finished(ckpt["epoch"], resume_stop, epochs):
        return epochs
    start = ckpt["epoch"] + (0 if ckpt.get("position") else 1)
    if start >= epochs:
        raise UserError(f"run in {save_dir} already trained {start} epochs (epochs={epochs}); "
                        f"pass a larger epochs= to continue, or model=<best.pt> to fine-tune")
    return start


def restore_trainer(trainer, ckpt: dict) -> None:
    """Restore everything the checkpoint holds and continue after its epoch."""
    start = trainer._resume_start(ckpt)
    _restore_training_state(trainer, ckpt, start)
    trainer.best_fitness, trainer.step, trainer.start_epoch = ckpt["best_fitness"], ckpt["step"], start
    trainer.epoch = ckpt["epoch"]  # the last one trained (the loop moves on from it)
    _restore_callbacks(trainer.callbacks, ckpt)
    _restore_rng_and_position(trainer, ckpt)
    if trainer.resume_stop is not None:  # a restart; the driver said a user's resume (check_resumable)
        LOGGER.info(resume_note(trainer.save_dir, start, trainer.epochs, trainer.resume_position))


def resume_note(save_dir, start: int, epochs: int, position: dict | None) -> str:
    """The line that says where a run continues: ``start`` the first epoch left (``epochs``: only
    the final evaluation), ``position`` a mid-epoch checkpoint's."""
    if start >= epochs:
        return f"restarting {save_dir} after its last trained epoch: only the final evaluation is left"
    where = f", batch {position['batch'] + 1} of {position['batches']}" if position else ""
    return f"resuming {save_dir} from epoch {start + 1} of {epochs}{where}"


def _restore_rng_and_position(trainer, ckpt: dict) -> None:
    """This rank's RNG streams (one per rank; at another world size rank 0's) and, from a mid-epoch
    checkpoint, where its epoch continues: ``continue_epoch`` sets the streams again there."""
    states = ckpt["rng"]
    rng = states[trainer.rank] if len(states) == trainer.world_size else states[0]
    ckpt_io.set_rng_state(rng)
    position = ckpt.get("position")
    trainer.resume_position = {**position, "rng": rng} if position else None


def _restore_training_state(trainer, ckpt: dict, start: int) -> None:
    """Model, EMA, optimizer, scaler, scheduler and early stopping, as the checkpoint left them."""
    unwrap_model(trainer.model).load_state_dict(ckpt["model"])
    trainer.ema.ema.load_state_dict(ckpt["ema"])
    trainer.ema.updates = ckpt["updates"]
    trainer.optimizer.load_state_dict(ckpt["optimizer"])
    trainer.scaler.load_state_dict(ckpt["scaler"])
    trainer.scheduler.load_state_dict(ckpt["scheduler"])
    if trainer.scheduler.last_epoch != start:  # epochs changed: rebuild the schedule
        trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, trainer.lf, last_epoch=start - 1)
    trainer.stopper.load_state_dict(ckpt["stopper"])
    trainer.metrics.update(ckpt.get("train_metrics") or {})


def _restore_callbacks(callbacks: dict, ckpt: dict) -> None:
    """Hand each stateful callback (SPEC §2) its saved state; one added since the save starts fresh."""
    saved = ckpt.get("callbacks", {})
    for key, cb in stateful_callbacks(callbacks).items():
        if key in saved and hasattr(cb, "load_state_dict"):
            cb.load_state_dict(saved[key])

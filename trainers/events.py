"""The event vocabulary (SPEC §3), declared once.

Each event is tagged with the object that owns it, i.e. the object a callback receives.
The order of this table is the firing order within one fit (validator events fire inside the
trainer's epoch, between ``on_train_epoch_end`` and ``on_model_save``). ``DRIVER`` events fire in
no worker: the driver itself sends their records to the run's callback actor, for driver callbacks.
"""
from __future__ import annotations

import math
import time

TRAINER, VALIDATOR, PREDICTOR, EXPORTER, DRIVER = "trainer", "validator", "predictor", "exporter", "driver"

EVENTS: dict[str, str] = {
    "on_pretrain_routine_start": TRAINER,
    "on_pretrain_routine_end": TRAINER,
    "on_resize": TRAINER,  # this project's own: the run continues at another world size
    "on_train_start": TRAINER,
    "on_train_epoch_start": TRAINER,
    "on_train_batch_start": TRAINER,
    "optimizer_step": TRAINER,
    "on_before_zero_grad": TRAINER,
    "on_params_update": TRAINER,
    "on_train_batch_end": TRAINER,
    "on_train_epoch_end": TRAINER,
    "on_model_save": TRAINER,
    "on_fit_epoch_end": TRAINER,
    "on_train_end": TRAINER,
    "teardown": TRAINER,
    "on_val_start": VALIDATOR,
    "on_val_batch_start": VALIDATOR,
    "on_val_batch_end": VALIDATOR,
    "on_val_end": VALIDATOR,
    "on_predict_start": PREDICTOR,
    "on_predict_batch_start": PREDICTOR,
    "on_predict_postprocess_end": PREDICTOR,
    "on_predict_batch_end": PREDICTOR,
    "on_predict_end": PREDICTOR,
    "on_export_start": EXPORTER,
    "on_export_end": EXPORTER,
    "on_hparams": DRIVER,  # this project's own: a sweep's PBT changed the trial's hyperparameters
    "on_clone": DRIVER,  # this project's own: a sweep trial starts from another trial's checkpoint
}

# Events fired once per optimizer step or batch: the hot path, batched by the forwarder.
STEP_EVENTS = frozenset({
    "on_train_batch_start", "optimizer_step", "on_before_zero_grad", "on_params_update",
    "on_train_batch_end", "on_val_batch_start", "on_val_batch_end",
    "on_predict_batch_start", "on_predict_postprocess_end", "on_predict_batch_end",
})


def check_event(event: str) -> str:
    """Return ``event`` if it is known, else raise ValueError listing the valid names."""
    if event not in EVENTS:
        raise ValueError(f"unknown event {event!r}; valid events: {', '.join(EVENTS)}")
    return event


# On the wire a record travels as a row: the fields below, in this order. A batch names its
# stream (run_id, rank, attempt) and first seq once, so rows carry neither; the actor rebuilds
# the records. Building a list costs a worker a fraction of building the dict (five events
# fire per optimizer step). Code reads a row's slots by the names below, never by number.
ROW_FIELDS = ("event", "epoch", "step", "time", "metrics", "artifacts", "final_eval")
EVENT, EPOCH, STEP, TIME, METRICS, ARTIFACTS, FINAL_EVAL = range(len(ROW_FIELDS))


def wire_row(event: str, epoch: int, step: int, now: float, metrics: dict, artifacts: dict,
             final_eval: bool) -> list:
    """The one place a row is laid out; it checks nothing, so the trainer's per-step path can
    call it with fields it knows are clean. A list, not a tuple: Ray's msgpack serializer
    pickles each tuple separately."""
    return [event, epoch, step, now, metrics, artifacts, final_eval]


def make_row(event: str, fields: dict, now: float | None = None) -> list:
    """The row of ``event`` from ``owner.record_fields(event)``-style ``fields`` (or a record),
    each field coerced to its type; ``now`` defaults to the current time."""
    metrics, artifacts = fields.get("metrics"), fields.get("artifacts")
    return wire_row(event, int(fields.get("epoch") or 0), int(fields.get("step") or 0),
                    time.time() if now is None else float(now),
                    clean_metrics(metrics) if metrics else {},
                    {str(k): str(v) for k, v in artifacts.items()} if artifacts else {},
                    bool(fields.get("final_eval", False)))


def clean_metrics(metrics: dict) -> dict[str, float]:
    """Floats only: tensors and numpy scalars become floats; non-numeric values are dropped."""
    out = {}
    for key, value in metrics.items():
        try:
            value = float(value.item() if hasattr(value, "item") else value)
        except (TypeError, ValueError):
            continue
        out[str(key)] = value if math.isfinite(value) else float("nan")
    return out

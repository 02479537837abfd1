"""The training loop: exact event order, overridable methods, checkpoints, resume, export."""
import pytest
import torch

from orchestrator import Model
from tests.helpers import QUICK, STEP, EventRecorder, expected_events
from trainers.classify import ClassificationTrainer
from trainers.utils import UserError



def test_exact_event_sequence_of_two_epoch_fit(tmp_path):
    model = Model("cls-n.yaml")
    rec = EventRecorder().register(model)
    model.train(**QUICK, project=str(tmp_path), name="events")
    trainer = model.trainer
    n_batches, n_val = len(trainer.train_loader), len(trainer.test_loader)
    assert (n_batches, trainer.accumulate, n_val) == (5, 2, 12)
    assert rec.names == expected_events(2, n_batches, trainer.accumulate, n_val)
    fit_ends = [(epoch, final) for e, epoch, final in rec.events if e == "on_fit_epoch_end"]
    assert fit_ends == [(0, False), (1, False), (2, True)]


def test_step_records_carry_the_batch_losses_and_learning_rates(tmp_path):
    """Each on_train_batch_end record has the batch's loss items under train/<name> and every
    param group's lr, as floats (what the event log and MLflow's step/ metrics get)."""
    model, seen = Model("cls-n.yaml"), []

    def capture(trainer):
        seen.append((trainer.record_fields("on_train_batch_end")["metrics"], trainer.loss_items.tolist(),
                     [g["lr"] for g in trainer.optimizer.param_groups]))

    model.add_callback("on_train_batch_end", capture)
    model.train(**{**QUICK, "epochs": 1}, project=str(tmp_path), name="steps")
    assert len(seen) == len(model.trainer.train_loader)
    for metrics, losses, lrs in seen:
        expected = {**{f"train/{n}": v for n, v in zip(model.trainer.loss_names, losses)},
                    **{f"lr/pg{j}": lr for j, lr in enumerate(lrs)}}
        assert metrics == expected and all(type(v) is float for v in metrics.values())


def test_trainer_rows_equal_the_checked_rows_of_its_fields(tmp_path):
    """The trainer builds the rows of its per-step events directly (BaseTrainer.record_row):
    at every trainer event of a real fit they equal make_row of record_fields, field types included."""
    from trainers.events import EVENTS, TRAINER
    from trainers.events import make_row

    model, pairs = Model("cls-n.yaml"), []

    def compare(event):
        def check(trainer):
            pairs.append((event, trainer.record_row(event), make_row(event, trainer.record_fields(event))))
        return check

    for event, owner in EVENTS.items():
        if owner == TRAINER:
            model.add_callback(event, compare(event))
    model.train(**{**QUICK, "epochs": 1}, project=str(tmp_path), name="rows")
    # every trainer event but on_resize, which fires only after a resize (tests/test_elastic.py)
    assert {event for event, _, _ in pairs} == {e for e, o in EVENTS.items() if o == TRAINER} - {"on_resize"}
    for event, direct, checked in pairs:
        assert abs(direct[3] - checked[3]) < 1.0, event  # time stamps, taken microseconds apart
        direct[3] = checked[3]
        assert direct == checked, event
        assert [type(v) for v in direct] == [type(v) for v in checked], event
        assert all(type(v) is float for v in direct[4].values()), event


class EveryHookTrainer(ClassificationTrainer):
    """Overrides every method of SPEC §4 and notes each call."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.calls = []

    def _note(self, name):
        self.calls.append(name)

    def get_model(self, cfg=None, weights=None, verbose=True):
        self._note("get_model")
        return super().get_model(cfg, weights, verbose)

    def get_validator(self):
        self._note("get_validator")
        return super().get_validator()

    def get_dataloader(self, dataset_path, batch_size=16, rank=0, mode="train"):
        self._note(f"get_dataloader:{mode}")
        return super().get_dataloader(dataset_path, batch_size, rank, mode)

    def preprocess_batch(self, batch):
        self._note("preprocess_batch")
        return super().preprocess_batch(batch)

    def set_model_attributes(self):
        self._note("set_model_attributes")
        assert not isinstance(self.model, torch.nn.parallel.DistributedDataParallel)
        super().set_model_attributes()

    def build_optimizer(self, model, name="auto", lr=0.001, momentum=0.9, decay=1e-5, iterations=1e5):
        self._note("build_optimizer")
        return super().build_optimizer(model, name, lr, momentum, decay, iterations)

    def optimizer_step(self):
        self._note("optimizer_step")
        super().optimizer_step()

    def validate(self):
        self._note("validate")
        return super().validate()

    def save_model(self):
        self._note("save_model")
        return super().save_model()

    def label_loss_items(self, loss_items=None, prefix="train"):
        self._note("label_loss_items")
        return super().label_loss_items(loss_items, prefix)


def test_subclass_sees_every_overridable_method_called(tmp_path):
    model = Model("cls-n.yaml")
    model.train(**{**QUICK, "epochs": 1}, trainer=EveryHookTrainer, project=str(tmp_path), name="hooks")
    calls = model.trainer.calls
    for name in ["get_model", "get_validator", "get_dataloader:train", "get_dataloader:val", "preprocess_batch",
                 "set_model_attributes", "build_optimizer", "optimizer_step", "validate", "save_model",
                 "label_loss_items"]:
        assert name in calls, name
    assert calls.index("get_model") < calls.index("set_model_attributes") < calls.index("build_optimizer")


def test_checkpoints_are_plain_data_and_finished_run_fine_tunes(tmp_path):
    model = Model("cls-n.yaml")
    model.train(**{**QUICK, "epochs": 1}, project=str(tmp_path), name="ckpt")
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(tmp_path / "ckpt" / "weights" / name, weights_only=True)
        assert ckpt["model_class"] == "trainers.models.tasks.ClassificationModel"
        assert {"ema", "optimizer", "scaler", "scheduler", "rng", "epoch", "best_fitness", "train_args"} <= set(ckpt)
    tuned = Model(str(tmp_path / "ckpt" / "weights" / "best.pt"))
    metrics = tuned.train(**{**QUICK, "epochs": 1}, project=str(tmp_path), name="tuned")
    assert "metrics/accuracy_top1" in metrics


def test_resume_equals_uninterrupted_run(tmp_path):
    cfg = {**QUICK, "epochs": 4, "project": str(tmp_path)}
    Model("cls-n.yaml").train(**cfg, name="full")

    def crash_at_epoch_2(trainer):
        if trainer.epoch == 2:
            raise RuntimeError("simulated crash")

    crashing = Model("cls-n.yaml")
    crashing.add_callback("on_train_epoch_start", crash_at_epoch_2)
    try:
        crashing.train(**cfg, name="part")
        raise AssertionError("the crash callback did not fire")
    except RuntimeError as exc:
        assert "simulated crash" in str(exc)
    last = tmp_path / "part" / "weights" / "last.pt"
    assert torch.load(last, weights_only=True)["epoch"] == 1
    Model("cls-n.yaml").train(resume=str(last))
    full = torch.load(tmp_path / "full" / "weights" / "last.pt", weights_only=True)
    resumed = torch.load(last, weights_only=True)
    assert resumed["epoch"] == full["epoch"] == 3
    for key in ("model", "ema"):
        for name, value in full[key].items():
            assert torch.equal(value, resumed[key][name]), f"{key}.{name} differs"
    with pytest.raises(UserError, match=r"already trained 4 epochs \(epochs=4\); pass a larger epochs="):
        Model("cls-n.yaml").train(resume=str(last))  # a user's resume of a finished run says so
    assert torch.load(last, weights_only=True)["epoch"] == 3  # and leaves it as it was


def test_torchscript_export_matches_eager(tmp_path):
    model = Model("cls-n.yaml")
    model.train(**{**QUICK, "epochs": 1}, project=str(tmp_path), name="export")
    path = model.export(format="torchscript", imgsz=16)
    scripted = torch.jit.load(path)
    x = torch.rand(3, 1, 16, 16)
    eager = model.model.eval()
    with torch.no_grad():
        assert torch.allclose(scripted(x), eager(x), atol=1e-5)


def test_digits_learns(tmp_path):
    model = Model("cls-n.yaml")
    metrics = model.train(data="digits", epochs=3, batch=32, nbs=32, imgsz=16, verbose=False, plots=False,
                          optimizer="AdamW", lr0=0.003, warmup_epochs=0.5, project=str(tmp_path), name="learn")
    assert metrics["metrics/accuracy_top1"] >= 0.8, metrics
    pred = model.predict(torch.rand(2, 1, 16, 16), imgsz=16)
    assert len(pred) == 2 and pred[0].probs is not None


def step_events_of(recorder) -> list[str]:
    from tests.helpers import STEP
    return [e for e in recorder.names if e in STEP]


def grad_norm(model) -> float:
    grads = [p.grad for p in model.parameters() if p.grad is not None]  # zero_grad sets them to None
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else 0.0


class TinyClipTrainer(ClassificationTrainer):
    """Overrides only clip_gradients: its own max norm, the norm before clipping noted."""
    max_norm = 1e-3

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.norms_before, self.norms_after = [], []
        self.add_callback("optimizer_step", lambda t: t.norms_after.append(grad_norm(t.model)))
        self.add_callback("on_before_zero_grad", lambda t: t.seen.append(grad_norm(t.model) > 0))
        self.add_callback("on_params_update", lambda t: t.seen.append(grad_norm(t.model) == 0))
        self.seen = []

    def clip_gradients(self):
        self.norms_before.append(float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_norm)))


def train_with_all_events(tmp_path, trainer_cls):
    """Train ``trainer_cls`` quickly; assert every event fired in the expected order and count."""
    model = Model("cls-n.yaml")
    rec = EventRecorder().register(model)
    model.train(**QUICK, trainer=trainer_cls, project=str(tmp_path), name=trainer_cls.__name__)
    trainer = model.trainer
    n_batches, n_val = len(trainer.train_loader), len(trainer.test_loader)
    assert rec.names == expected_events(2, n_batches, trainer.accumulate, n_val)
    return trainer, rec


def test_clip_gradients_override_changes_clipping_and_keeps_the_default_step(tmp_path):
    trainer, _ = train_with_all_events(tmp_path, TinyClipTrainer)
    assert len(trainer.norms_before) == len(trainer.norms_after) == trainer.step == 6
    assert all(after <= TinyClipTrainer.max_norm * (1 + 1e-5) for after in trainer.norms_after)
    assert all(before > TinyClipTrainer.max_norm for before in trainer.norms_before)  # the clip acted
    assert trainer.seen == [True, True] * 6  # the default step: gradients there before zeroing, zero after
    assert trainer.ema.updates == 6


class OwnStepTrainer(ClassificationTrainer):
    """Overrides optimizer_step() without super() and does only a plain step: it owns the step
    and its events (SPEC §3), so nothing fires, zeroes or moves the EMA but what it does."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.grads = []  # the gradient norm each batch starts with
        self.add_callback("on_train_batch_start", lambda t: t.grads.append(grad_norm(t.model)))
        self.steps = 0

    def optimizer_step(self):
        self.steps += 1
        self.scaler.step(self.optimizer)
        self.scaler.update()


def test_an_override_without_super_owns_the_step_events_zeroing_and_ema(tmp_path, warnings_seen):
    model = Model("cls-n.yaml")
    rec = EventRecorder().register(model)
    model.train(**QUICK, trainer=OwnStepTrainer, project=str(tmp_path), name="own")
    trainer = model.trainer
    n_batches, n_val = len(trainer.train_loader), len(trainer.test_loader)
    assert rec.names == [e for e in expected_events(2, n_batches, trainer.accumulate, n_val) if e not in STEP]
    assert trainer.step == trainer.steps == 6 and trainer.ema.updates == 0
    nb = len(trainer.train_loader)  # zeroed only where each epoch starts: the loop's, not the step's
    assert [i for i, g in enumerate(trainer.grads) if g == 0] == [0, nb] and len(trainer.grads) == 2 * nb
    stale = [r.getMessage() for r in warnings_seen if "self.ema.update" in r.getMessage()]
    assert stale == ["optimizer_step() stepped but never called self.ema.update(self.model): validation, "
                     "best.pt and last.pt use the EMA, which still holds the initial weights"]  # once, not per epoch


class WholeStepTrainer(ClassificationTrainer):
    """Owns the whole step as SPEC §4 lets it, the default's work and events in its own hands."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.add_callback("on_before_zero_grad", lambda t: t.seen.append(grad_norm(t.model) > 0))
        self.add_callback("on_params_update", lambda t: t.seen.append(grad_norm(t.model) == 0))
        self.seen = []

    def optimizer_step(self):
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=1.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.run_callbacks("optimizer_step")
        self.run_callbacks("on_before_zero_grad")
        self.optimizer.zero_grad()
        self.ema.update(self.model)
        self.run_callbacks("on_params_update")


def test_an_override_that_owns_the_whole_step_fires_each_event_once(tmp_path, warnings_seen):
    trainer, rec = train_with_all_events(tmp_path, WholeStepTrainer)
    assert not [r for r in warnings_seen if "self.ema.update" in r.getMessage()]
    assert step_events_of(rec) == STEP * 6
    assert trainer.step == trainer.ema.updates == 6
    assert trainer.seen == [True, True] * 6  # gradients there before zeroing, zero after


def test_one_stop_vote_after_on_fit_epoch_end_reaches_the_epoch_reporters(tmp_path):
    """A callback that sets stop in on_fit_epoch_end ends the run after that epoch; the launcher's
    epoch reporters (Ray Train's report) run after the vote and see it."""
    reported = []

    class Reporting(ClassificationTrainer):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.epoch_reporters.append(lambda t: reported.append((t.epoch, t.stop)))

    model = Model("cls-n.yaml")
    model.add_callback("on_fit_epoch_end", lambda t: setattr(t, "stop", not t.final_eval and t.epoch == 0))
    rec = EventRecorder().register(model)
    model.train(**{**QUICK, "epochs": 3}, trainer=Reporting, project=str(tmp_path), name="vote")
    assert reported == [(0, True)]
    assert [(e, final) for name, e, final in rec.events if name == "on_fit_epoch_end"] == [(0, False), (1, True)]
    assert torch.load(model.trainer.last, weights_only=True)["epoch"] == 0


@pytest.mark.parametrize("stop, epochs", [(False, 2), (True, 4)])
def test_restart_of_a_finished_training_runs_only_the_final_evaluation(tmp_path, stop, epochs):
    """A launcher's restart (resume_stop known) from a checkpoint that ended the training, by its last
    epoch or by a stop vote, trains no epoch; a user's resume of it would be an error."""
    first = Model("cls-n.yaml")
    first.train(**{**QUICK, "epochs": 2}, project=str(tmp_path), name="done")
    last = str(first.trainer.last)
    restarted = ClassificationTrainer(overrides={"resume": last, "epochs": epochs})
    restarted.resume_stop = stop
    rec = EventRecorder().register(restarted)
    metrics = restarted.train()
    assert "on_train_epoch_start" not in rec.names and "metrics/accuracy_top1" in metrics
    assert [(e, final) for name, e, final in rec.events if name == "on_fit_epoch_end"] == [(2, True)]
    if epochs > 2:  # not finished by its epochs: a user's resume trains on
        resumed = ClassificationTrainer(overrides={"resume": last, "epochs": epochs})
        assert resumed._resume_start(torch.load(last, weights_only=True)) == 2


def test_trainer_log_reaches_every_epochs_record_and_the_final_evaluations(tmp_path):
    """SPEC §2: ``trainer.log()`` from any callback; in the final evaluation too (its ``final/`` keys)."""
    seen = []
    model = Model("cls-n.yaml")
    model.add_callback("on_fit_epoch_end", lambda t: t.log({"custom/final": float(t.final_eval)}))
    model.add_callback("on_fit_epoch_end", seen.append, where="driver")
    model.train(**QUICK, project=str(tmp_path), name="logged")
    assert [(r["epoch"], r["final_eval"], r["metrics"]["custom/final"]) for r in seen] == [
        (0, False, 0.0), (1, False, 0.0), (2, True, 1.0)]


def test_metrics_keep_the_last_validation_where_an_epoch_does_not_validate(tmp_path):
    """As Ultralytics: ``trainer.metrics`` holds zeros before the first validation and the last
    validation's values after; ``fitness`` is None there; records and results.csv only carry an
    epoch's own validation; ``on_train_end`` sees the last trained epoch."""
    trainer = ClassificationTrainer(overrides={**QUICK, "epochs": 3, "val": False, "project": str(tmp_path),
                                               "name": "noval"})
    seen = []
    trainer.add_callback("on_fit_epoch_end", lambda t: seen.append((t.epoch, dict(t.metrics), t.fitness,
                                                                     dict(t.epoch_metrics()))))
    trainer.add_callback("on_train_end", lambda t: seen.append(t.epoch))
    trainer.add_callback("on_train_end", lambda t: seen.append((t.csv.is_file(), t.epoch_time > 0,
                                                                t.train_time_start < t.epoch_time_start)))
    trainer.train()
    zeros = {"metrics/accuracy_top1": 0.0, "metrics/accuracy_top5": 0.0, "val/loss": 0.0}
    assert [(e, m, f) for e, m, f, _ in seen[:2]] == [(0, zeros, None), (1, zeros, None)]
    assert not any(k in seen[0][3] for k in zeros)  # the record carries no stale values
    epoch, metrics, fitness, record = seen[2]
    assert epoch == 2 and metrics["metrics/accuracy_top5"] > 0 and fitness is not None and "val/loss" in record
    assert seen[3][0] == 3 and seen[4] == 2  # the final evaluation at epochs, then the last epoch again
    assert seen[5] == (True, True, True)  # Ultralytics' csv, epoch_time, train_time_start
    rows = (trainer.save_dir / "results.csv").read_text().splitlines()
    assert rows[1].endswith(",,,,") and not rows[3].endswith(",")

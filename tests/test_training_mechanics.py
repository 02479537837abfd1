"""Training mechanics, each by its observable effect with real values: the cosine LR schedule,
momentum and LR warmup, ``freeze`` as a list, early stopping (``patience``), ``resume=True`` with a
stateful callback object, ``teardown`` after an exception, a NaN loss, and torch's limits on the
optimizer's arguments said in config keys. All in process (num_workers=0), on tiny digits fits."""
import math
import os
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from orchestrator import Model
from orchestrator.cli import main as cli_main
from tests.helpers import QUICK, EventRecorder, own_lines
from tests.servers import mlflow_store
from trainers.classify import ClassificationTrainer
from trainers.registry import CallbackError
from trainers.utils import UserError, unwrap_model

FROZEN = [1, 3]  # not a prefix of the layers: an int would freeze 0, 1, 2


def load(path) -> dict:
    return torch.load(path, weights_only=True)


def state_of(trainer) -> dict:
    return {k: v.detach().clone() for k, v in unwrap_model(trainer.model).state_dict().items()}


def in_layers(name: str, layers) -> bool:
    return any(name.startswith(f"model.{i}.") for i in layers)


# ---------------------------------------------------------------- one fit: schedule, warmup, freeze
SCHEDULE = dict(optimizer="SGD", lr0=0.02, lrf=0.05, momentum=0.9, warmup_momentum=0.5,
                warmup_bias_lr=0.1, warmup_epochs=1.0, cos_lr=True, epochs=3, freeze=FROZEN)


@pytest.fixture(scope="module")
def fit(tmp_path_factory):
    """A 3-epoch SGD fit (5 batches an epoch, 1 warmup epoch, cosine LR, layers 1 and 3 frozen),
    with what each mechanism left: lrs at each epoch's start, (lr, momentum) of each group after
    each batch's warmup, BN modes while training, and the model's state before and after."""
    seen = SimpleNamespace(epoch_lrs=[], batches=[], bn_training={}, before=None, after=None)
    trainer = ClassificationTrainer(overrides={**QUICK, **SCHEDULE, "project": str(tmp_path_factory.mktemp("fit")),
                                               "name": "mechanics"})

    def bn_modes(t):
        seen.bn_training = {n: m.training for n, m in unwrap_model(t.model).named_modules()
                            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}

    trainer.add_callback("on_train_start", lambda t: setattr(seen, "before", state_of(t)))
    trainer.add_callback("on_train_epoch_start", lambda t: seen.epoch_lrs.append(
        [g["lr"] for g in t.optimizer.param_groups]))
    trainer.add_callback("on_train_batch_start", bn_modes)
    trainer.add_callback("on_train_batch_end", lambda t: seen.batches.append(
        [(g["lr"], g["momentum"]) for g in t.optimizer.param_groups]))
    trainer.add_callback("on_train_epoch_end", lambda t: setattr(seen, "after", state_of(t)))
    trainer.train()
    seen.trainer, seen.nb = trainer, len(trainer.train_loader)
    return seen


def scheduled_lr(epoch: int, cos: bool) -> float:
    """lr0 at epoch 0 down to lr0 * lrf at the last: a half cosine, or a straight line."""
    lr0, lrf, epochs = SCHEDULE["lr0"], SCHEDULE["lrf"], SCHEDULE["epochs"]
    share = (1 + math.cos(math.pi * epoch / epochs)) / 2 if cos else 1 - epoch / epochs
    return lr0 * lrf + (lr0 - lr0 * lrf) * share


def test_cos_lr_follows_the_half_cosine_not_the_line(fit):
    assert len(fit.epoch_lrs) == SCHEDULE["epochs"]
    for epoch, lrs in enumerate(fit.epoch_lrs):
        assert lrs == pytest.approx([scheduled_lr(epoch, cos=True)] * 3, rel=1e-9), epoch
    for epoch in (1, 2):  # the two schedules differ here by more than 10%
        assert abs(fit.epoch_lrs[epoch][0] - scheduled_lr(epoch, cos=False)) > 0.1 * scheduled_lr(epoch, cos=False)


def test_warmup_ramps_momentum_and_lr_then_hands_over_to_the_schedule(fit):
    """Over the first nb batches (warmup_epochs=1): momentum rises warmup_momentum -> momentum,
    weight lrs rise 0 -> the scheduled lr, bias lrs fall warmup_bias_lr -> it; then they stay."""
    nw = fit.nb  # round(warmup_epochs * batches an epoch)
    assert fit.nb == 5 and len(fit.batches) == SCHEDULE["epochs"] * fit.nb
    for ni, groups in enumerate(fit.batches):
        epoch, share = ni // fit.nb, min(ni / nw, 1.0)
        target = scheduled_lr(epoch, cos=True)
        momentum = SCHEDULE["warmup_momentum"] + share * (SCHEDULE["momentum"] - SCHEDULE["warmup_momentum"])
        (bias_lr, bias_m), *others = groups
        assert bias_m == pytest.approx(momentum) and all(m == pytest.approx(momentum) for _, m in others), ni
        if ni <= nw:
            assert bias_lr == pytest.approx(SCHEDULE["warmup_bias_lr"] + share * (target - SCHEDULE["warmup_bias_lr"]))
            assert all(lr == pytest.approx(share * target) for lr, _ in others), ni
        else:
            assert [lr for lr, _ in groups] == pytest.approx([target] * 3), ni
    assert [m for _, m in fit.batches[0]] == pytest.approx([0.5] * 3)  # warmup_momentum, not momentum


def test_freeze_list_freezes_exactly_those_layers(fit):
    model = unwrap_model(fit.trainer.model)
    assert fit.trainer.freeze_layer_names == ["model.1.", "model.3."]
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters() if in_layers(n, FROZEN)} and frozen
    for name, training in fit.bn_training.items():  # frozen BN keeps its running statistics
        assert training == (not in_layers(name + ".", FROZEN)), name
    for name, before in fit.before.items():
        if in_layers(name, FROZEN):  # weights and BN buffers alike
            assert torch.equal(before, fit.after[name]), name
    trained = [n for n, p in model.named_parameters() if not in_layers(n, FROZEN)]
    assert all(not torch.equal(fit.before[n], fit.after[n]) for n in trained)
    moved_bn = [n for n in fit.before if n.endswith("running_mean") and not torch.equal(fit.before[n], fit.after[n])]
    assert moved_bn and not any(in_layers(n, FROZEN) for n in moved_bn)


# ---------------------------------------------------------------- early stopping
class ScriptedFitness(ClassificationTrainer):
    """Fitness from a script (SPEC §6: what validate() returns decides best.pt and stopping):
    best at epoch 1, then two worse epochs, then a better one that a patience of 2 never reaches."""
    script = [0.5, 0.9, 0.8, 0.85, 0.7, 0.95, 0.99, 0.99]

    def validate(self):
        metrics, _ = super().validate()
        return metrics, self.script[self.epoch]


def test_patience_stops_at_best_plus_patience_and_last_pt_says_so(tmp_path):
    trainer = ScriptedFitness(overrides={**QUICK, "epochs": 8, "patience": 2, "val": True,
                                         "project": str(tmp_path), "name": "patience"})
    rec = EventRecorder().register(trainer)
    trainer.train()
    best_epoch, patience = 1, 2
    last, best = load(trainer.last), load(trainer.best)
    assert last["epoch"] == best_epoch + patience and last["best_fitness"] == 0.9
    assert best["epoch"] == best_epoch and trainer.stop
    assert [e for name, e, final in rec.events if name == "on_fit_epoch_end" and not final] == [0, 1, 2, 3]
    assert len((trainer.save_dir / "results.csv").read_text().splitlines()) == 1 + best_epoch + patience + 1


# ---------------------------------------------------------------- resume=True and callback state
class EpochCounter:
    """A stateful callback object (SPEC §2): the epochs it saw, kept across resumes."""

    def __init__(self):
        self.seen, self.loaded = [], None

    def on_train_epoch_end(self, trainer):
        self.seen.append(trainer.epoch)

    def state_dict(self) -> dict:
        return {"seen": list(self.seen)}

    def load_state_dict(self, state: dict) -> None:
        self.seen, self.loaded = list(state["seen"]), state


def test_resume_true_takes_the_latest_run_not_the_store_copies_and_restores_callback_state(tmp_path):
    runs = tmp_path / "runs"
    where = dict(project=str(runs), storage=str(runs / "store"), journal=str(tmp_path / "journal"))
    Model("cls-n.yaml").train(**{**QUICK, "epochs": 1}, **where, name="old")
    first = Model("cls-n.yaml")
    first.add_callback(EpochCounter())
    first.train(**QUICK, **where, name="new")
    copies = sorted((runs / "store").rglob("last.pt"))
    assert len(copies) == 2  # the checkpoint sink's copies of both runs
    later = time.time() + 60
    for copy in copies:  # the store's copies are the newest last.pt files under runs/
        os.utime(copy, (later, later))

    counter = EpochCounter()
    resumed = Model("cls-n.yaml")
    resumed.add_callback(counter)
    resumed.train(resume=True, epochs=3, verbose=False, plots=False, **where)
    latest = runs / "new" / "weights" / "last.pt"
    assert Path(resumed.trainer.args.resume).resolve() == latest.resolve()
    assert counter.loaded == {"seen": [0, 1]} and counter.seen == [0, 1, 2]
    assert load(latest)["epoch"] == 2 and load(latest)["callbacks"] == {"EpochCounter": {"seen": [0, 1, 2]}}
    assert load(runs / "old" / "weights" / "last.pt")["epoch"] == 0
    assert sorted(p.name for p in runs.iterdir() if p.name != "store") == ["new", "old"]


def test_a_resume_takes_what_the_user_gave_even_a_default_and_the_checkpoint_s_the_rest(tmp_path):
    from orchestrator.run_setup import resolve_run
    from trainers.config import get_cfg

    trainer = ClassificationTrainer(overrides={**QUICK, "val": False, "project": str(tmp_path), "name": "r"})
    trainer.train()
    ckpt = load(trainer.last)
    ckpt["train_args"]["num_workers"] = 2  # as a Ray run's checkpoint
    saved = tmp_path / "ray-run.pt"
    torch.save(ckpt, saved)
    given = {"resume": str(saved), "epochs": 10, "val": True}  # epochs and val as their defaults
    assert (ClassificationTrainer(overrides=given).args.epochs, ClassificationTrainer(overrides=given).args.val) \
        == (10, True)
    kept = ClassificationTrainer(overrides={"resume": str(saved), "epochs": 3}).args
    assert (kept.epochs, kept.val, kept.num_workers) == (3, False, 2)
    on_driver = resolve_run(get_cfg(None, {"resume": str(saved), "epochs": 10}), given={"resume", "epochs"})
    assert (on_driver["epochs"], on_driver["num_workers"]) == (10, 2)  # trained on Ray Train workers again
    on_driver = resolve_run(get_cfg(None, {"resume": str(saved), "epochs": 10, "num_workers": 0}),
                            given={"resume", "epochs", "num_workers"})
    assert on_driver["num_workers"] == 0


# ---------------------------------------------------------------- failures
def raise_at_epoch_1(trainer):
    if trainer.epoch == 1:
        raise RuntimeError("callback failed")


def test_teardown_fires_last_after_an_exception_in_a_callback(tmp_path):
    trainer = ClassificationTrainer(overrides={**QUICK, "project": str(tmp_path), "name": "boom"})
    rec = EventRecorder().register(trainer)
    trainer.add_callback("on_train_epoch_start", raise_at_epoch_1)
    with pytest.raises(CallbackError, match="^callback raise_at_epoch_1 failed in on_train_epoch_start: "
                                            "RuntimeError: callback failed$") as err:
        trainer.train()
    assert str(err.value.__cause__) == "callback failed"
    assert rec.events[-2:] == [("on_train_epoch_start", 1, False), ("teardown", 1, False)]
    assert rec.names.count("teardown") == 1 and "on_train_end" not in rec.names


def huge_lr_at_epoch_1(trainer):
    if trainer.epoch == 1:
        for group in trainer.optimizer.param_groups:
            group["lr"] = 1e30


def test_nan_loss_stops_with_one_line_keeps_last_pt_and_no_torch_warning(tmp_path):
    trainer = ClassificationTrainer(overrides={**QUICK, "epochs": 3, "optimizer": "SGD", "warmup_epochs": 0,
                                               "project": str(tmp_path), "name": "nan"})
    rec = EventRecorder().register(trainer)
    trainer.add_callback("on_train_epoch_start", huge_lr_at_epoch_1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(UserError) as err:
            trainer.train()
    assert [str(w.message) for w in caught if issubclass(w.category, UserWarning)] == []
    assert err.match(rf"^loss is (nan|inf) at epoch 2, batch \d: training stopped; last saved weights: "
                     rf"{trainer.last} \(epoch 1\); try a lower lr0$")
    assert load(trainer.last)["epoch"] == 0  # the epoch before is kept as it was saved
    assert "on_train_end" not in rec.names and rec.names[-1] == "teardown"
    assert [e for name, e, _ in rec.events if name == "on_train_epoch_start"] == [0, 1]


# ---------------------------------------------------------------- optimizer arguments
@pytest.mark.parametrize("args, message", [
    (["optimizer=SGD", "momentum=0"], "config keys 'optimizer', 'momentum': SGD uses Nesterov momentum, "
                                      "which needs momentum > 0 (got momentum=0.0)"),
    (["optimizer=AdamW", "momentum=1"], "config keys 'optimizer', 'momentum': momentum is AdamW's beta1, "
                                        "which must be < 1 (got momentum=1.0)"),
    (["lr0=-0.01"], "config key 'lr0': value -0.01 is not valid (expected a number >= 0)"),
    (["optimizer=RMSProp", "momentum=-0.5"], "config key 'momentum': value -0.5 is not valid (expected a number >= 0)"),
    (["weight_decay=-1e-4"], "config key 'weight_decay': value -0.0001 is not valid (expected a number >= 0)"),
])
def test_optimizer_arguments_torch_rejects_get_one_line_naming_the_keys(tmp_path, capsys, args, message):
    # were the check gone, this would be a tiny run that stays in tmp_path
    tiny = ["model=cls-n.yaml", "data=digits", "epochs=1", "fraction=0.05", "imgsz=16", "verbose=False",
            f"project={tmp_path}", f"tracking_uri={mlflow_store(tmp_path / 'mlflow.db')}", f"storage={tmp_path}/store",
            f"journal={tmp_path}/journal"]
    assert cli_main(["train", *tiny, *args]) == 2
    assert own_lines(capsys.readouterr().err) == [f"error: {message}"]


@pytest.mark.parametrize("args, message", [
    (["epochs=0"], "config key 'epochs': value 0 is not valid (expected an int >= 1)"),
    (["batch=-1"], "config key 'batch': value -1 is not valid (expected an int >= 1, the global batch; "
                   "AutoBatch, batch=-1, is not supported)"),
    (["imgsz=0"], "config key 'imgsz': value 0 is not valid (expected an int >= 1)"),
    (["batch=3", "num_workers=2-4"], "config keys 'batch', 'num_workers': a global batch of 3 over up to 4 workers "
                                     "leaves a worker less than one image a step (use batch >= 4)"),
    (["fraction=2"], "config key 'fraction': value 2.0 is not valid (expected a number in (0, 1])"),
    (["fitness_weights=[1,2]"], "config key 'fitness_weights': value [1.0, 2.0] is not valid "
                                "(expected 4 weights over [P, R, mAP50, mAP50-95])"),
    (["freeze=abc"], "config key 'freeze': value 'abc' is not valid (expected int or a list of int or null)"),
    (["freeze=-1"], "config key 'freeze': value -1 is not valid (expected layer indices >= 0)"),
    (["clip_grad=-1"], "config key 'clip_grad': value -1.0 is not valid (expected a number > 0: the largest "
                       "gradient norm a step takes)"),  # a negative bound turns every gradient around
    (["lr0=nan"], "config key 'lr0': value nan is not valid (expected a number >= 0)"),
    (["fliplr=7"], "config key 'fliplr': value 7.0 is not valid (expected a probability in [0, 1])"),
    (["register=team/detector:v1"], "config key 'register': value 'team/detector:v1' is not valid (expected true "
                                    "or a model name without '/' or ':')"),  # MLflow's registry refuses it
    (["device=tpu"], "config key 'device': value 'tpu' is not valid (expected cpu, cuda, cuda:<index>, <index>, "
                     "mps or xpu; null picks cuda when there is one)"),
])
def test_values_out_of_range_fail_in_one_line_before_anything_is_made(tmp_path, capsys, args, message):
    work = tmp_path / "work"
    tiny = ["model=cls-n.yaml", "data=digits", "epochs=1", "fraction=0.05", "imgsz=16", "verbose=False",
            f"project={work}", f"tracking_uri=sqlite:///{work}/mlflow.db", f"storage={work}/store",
            f"journal={work}/journal"]
    assert cli_main(["train", *tiny, *args]) == 2
    assert own_lines(capsys.readouterr().err) == [f"error: {message}"]
    assert not work.exists()  # no run folder, MLflow store, object store or journal


@pytest.mark.parametrize("key", ["journal", "project"])
def test_a_folder_the_driver_cannot_write_fails_in_one_line_before_a_run_exists(tmp_path, capsys, key):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    tiny = ["model=cls-n.yaml", "data=digits", "epochs=1", "fraction=0.05", "imgsz=16", "verbose=False",
            f"project={tmp_path}/work", f"tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"storage={tmp_path}/store",
            f"journal={tmp_path}/journal"]
    assert cli_main(["train", *tiny, f"{key}={blocker}/x"]) == 2
    assert own_lines(capsys.readouterr().err) == [f"error: config key '{key}': cannot create or write the folder "
                                                  f"{blocker}/x (Not a directory in {blocker})"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # no MLflow run (left RUNNING before)


def test_a_device_is_written_as_ultralytics_writes_it():
    from trainers.config import get_cfg

    for given, kept in ((None, None), ("", None), (0, "cuda:0"), ("1", "cuda:1"), ("cpu", "cpu"), ("cuda:1", "cuda:1")):
        assert get_cfg(overrides={"device": given}).device == kept, given


def missing_device() -> str:
    return next(d for d in ("cuda", "xpu", "mps") if not getattr(torch, d).is_available())


@pytest.mark.parametrize("args, message", [
    ([f"device={missing_device()}"], f"config key 'device': {missing_device()} is not available on"),
    (["use_gpu=true"], "config key 'use_gpu': this run trains in this process (num_workers=0), where torch"),
])
def test_a_device_this_process_lacks_is_refused_before_a_run_is_made(tmp_path, capsys, monkeypatch, args, message):
    """A run in this process knows its devices before it starts: no MLflow run is made for one that
    cannot train (on Ray, a worker's node is known only once the worker runs)."""
    from mlflow import MlflowClient

    tiny = ["model=cls-n.yaml", "data=digits", "epochs=1", "fraction=0.05", "imgsz=16", "verbose=False",
            f"project={tmp_path}", f"tracking_uri={mlflow_store(tmp_path / 'mlflow.db')}", f"storage={tmp_path}/store",
            f"journal={tmp_path}/journal"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on this CPU machine, on any machine
    assert cli_main(["train", *tiny, *args]) == 2
    (err,) = own_lines(capsys.readouterr().err)
    assert err.startswith(f"error: {message}"), err
    client = MlflowClient(mlflow_store(tmp_path / "mlflow.db"))
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


@pytest.mark.parametrize("args, message", [
    (["batch=1"], "config key 'batch': 1 over 1 worker(s) is one image a batch, too few for the model's "
                  "BatchNorm at imgsz=16: use batch >= 2"),
    (["imgsz=100000"], "config keys 'batch', 'imgsz': batch=16 at imgsz=100000 does not fit in the memory of cpu: "
                       "lower them"),  # digits are resized up front: 57 TB
    (["freeze=10"], "config key 'freeze': value 10 is not valid: every layer would be frozen, nothing trained "
                    "(the model has 10 layers, 0-9)"),
    (["freeze=[50]"], "config key 'freeze': value [50] is not valid: layer 50 does not exist (the model has 10 "
                      "layers, 0-9)"),
])
def test_errors_the_run_meets_end_it_failed_in_one_line(tmp_path, capsys, args, message):
    """Found by the trainer (a batch BatchNorm cannot train on at its first step, a model or batch
    that does not fit): one line, and the MLflow run ends FAILED with it, not RUNNING."""
    from mlflow import MlflowClient

    tiny = ["model=cls-n.yaml", "data=digits", "epochs=1", "fraction=0.05", "imgsz=16", "verbose=False",
            f"project={tmp_path}", f"tracking_uri={mlflow_store(tmp_path / 'mlflow.db')}", f"storage={tmp_path}/store",
            f"journal={tmp_path}/journal"]
    assert cli_main(["train", *tiny, *args]) == 2
    (err,) = own_lines(capsys.readouterr().err)  # Ray's forwarded lines (an earlier test's) left out
    assert err.startswith(f"error: {message}"), err
    client = MlflowClient(mlflow_store(tmp_path / "mlflow.db"))
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FAILED" and run.data.tags["orchestrator.end_reason"] == f"UserError: {err[7:]}"


def test_an_epoch_never_ends_in_a_batch_of_one_image(tmp_path):
    """BatchNorm cannot train on one image with 1x1 feature maps (cls-n at a small imgsz): a training
    epoch whose last batch would hold one ends before it, unless that image is the replica's whole
    share (an epoch of no batch would train nothing, silently); evaluation keeps every image."""
    from trainers.data.loader import build_dataloader

    for n, batch, world, sizes in ((9, 2, 1, [2] * 4), (10, 3, 1, [3] * 3), (8, 3, 1, [3, 3, 2]), (11, 2, 2, [2] * 3),
                                     (13, 2, 2, [2] * 3), (1, 2, 1, [1]), (2, 4, 2, [1])):
        loader = build_dataloader(list(range(n)), batch, 0, "train", 0, world)
        assert [len(b) for b in loader] == sizes and len(loader) == len(sizes), (n, batch, world)
    assert [len(b) for b in build_dataloader(list(range(9)), 2, 0, "val", 0, 1)] == [2, 2, 2, 2, 1]
    trainer = ClassificationTrainer(overrides={**QUICK, "batch": 10, "nbs": 10, "epochs": 1,
                                               "project": str(tmp_path), "name": "odd"})
    trainer.train()  # 71 training images: 7 batches of 10 and one image left out
    assert len(trainer.data["train"]) == 71 and trainer.step == 7


def test_the_optimizer_auto_chose_is_checked_too(tmp_path):
    """auto picks SGD for long runs (> 10,000 iterations): momentum=0 fails before training."""
    trainer = ClassificationTrainer(overrides={**QUICK, "epochs": 5000, "momentum": 0.0,
                                               "project": str(tmp_path), "name": "auto"})
    rec = EventRecorder().register(trainer)
    with pytest.raises(UserError, match=r"^config keys 'optimizer', 'momentum': SGD uses Nesterov momentum"):
        trainer.train()
    assert "on_train_start" not in rec.names and rec.names[-1] == "teardown"


# ---------------------------------------------------------------- defaults scaled to the data
def test_nbs_warmup_and_augmentation_left_to_the_data_follow_its_size_and_the_run():
    from trainers.config import get_cfg
    from trainers.engine.setup import scaled_to_data

    half = {"hsv_h": 0.0075, "hsv_s": 0.25, "hsv_v": 0.15, "scale": 0.15}  # 50 epochs: half of the nominal
    args = get_cfg(None, {"batch": 16, "epochs": 50})
    assert (args.nbs, args.warmup_epochs) == (None, None)  # default.yaml leaves both to the data
    assert scaled_to_data(args, 480) == {"nbs": 16, "warmup_epochs": 2.5, **half}  # shapes8: 30 steps an epoch
    assert scaled_to_data(args, 1438) == {"nbs": 47, "warmup_epochs": 2.5, **half}  # digits
    full = {"hsv_h": 0.015, "hsv_s": 0.5, "hsv_v": 0.3, "scale": 0.3}  # from 100 epochs
    assert scaled_to_data(get_cfg(None, {"batch": 16, "epochs": 300}), 100_000) == {"nbs": 64, "warmup_epochs": 3.0,
                                                                                    **full}
    user = {"nbs": 64, "warmup_epochs": 1.0, "hsv_h": 0.0, "hsv_s": 0.7, "hsv_v": 0.4, "scale": 0.5}
    assert scaled_to_data(get_cfg(None, user), 480) == {}  # a user's value wins


def test_values_chosen_for_the_data_are_used_and_written_to_args_yaml(tmp_path):
    import yaml

    trainer = ClassificationTrainer(overrides={**QUICK, "nbs": None, "epochs": 2, "project": str(tmp_path),
                                               "name": "scaled"})
    trainer.train()
    n_train = len(trainer.data["train"])
    assert n_train < 30 * 16 and trainer.accumulate == 1  # nbs = batch: one step per batch
    written = yaml.safe_load((trainer.save_dir / "args.yaml").read_text())
    assert (written["nbs"], written["warmup_epochs"]) == (16, 0.1) == (trainer.args.nbs, trainer.args.warmup_epochs)

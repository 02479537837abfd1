"""Sweeps on Ray Tune: validation, ASHA/PBT on real Train runs, MLflow parent/child runs, resume."""
import getpass
import json
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from callbacks.sinks import read_event_log
from orchestrator import Model
from orchestrator.cli import main
from sweeps.config import build_sweep, load_sweep
from sweeps.exploit import adopt_hyperparameters
from sweeps.report import parallel_coordinates, summary
from sweeps.space import Objective, ObjectiveKeyError
from trainers.classify import ClassificationTrainer
from trainers.utils import UserError
from tests.helpers import own_lines
from tests.servers import mlflow_store

QUICK = dict(data="digits", imgsz=16, batch=16, nbs=16, fraction=0.1, verbose=False, plots=False, workers=0,
             seed=0, optimizer="SGD")


def where(tmp_path) -> dict:
    return {"project": str(tmp_path / "runs"), "tracking_uri": mlflow_store(tmp_path / "mlflow.db"),
            "storage": str(tmp_path / "store")}


class LrFitness(ClassificationTrainer):
    """Fitness from the trainer's own validate(): lr0 x epochs, so the ranking of trials is known."""

    def validate(self):
        metrics, _ = super().validate()
        return metrics, self.args.lr0 * (self.epoch + 1)


def epoch_logger(path: Path):
    def log(trainer):
        with open(path, "a") as f:
            f.write(json.dumps({"trial": trainer.args.name, "event": "epoch", "epoch": trainer.epoch,
                                "lr0": trainer.args.lr0, "rank": trainer.rank}) + "\n")
    return log


def start_logger(path: Path):
    def log(trainer):
        with open(path, "a") as f:
            f.write(json.dumps({"trial": trainer.args.name, "event": "start", "start_epoch": trainer.start_epoch,
                                "lr0": trainer.args.lr0, "momentum": trainer.args.momentum,
                                "resume": str(trainer.args.resume),
                                "save_dir": str(trainer.save_dir)}) + "\n")
    return log


def fail_once(marker: Path, tracking_uri: str, last_epoch: int):
    """on_train_end raises the first time, once Tune has taken the last epoch's report.

    It waits for the sweep's driver to log that epoch's objective to the child run (Tune's
    ``on_trial_result``; the checkpoint is registered before the trial's next step can fail).
    Raising at once would race the Train controller's next poll: the report, still uploading
    its checkpoint, may not have reached Tune yet, and the retry would then train that epoch again.
    """
    def fail(trainer):
        if marker.exists():
            return
        marker.touch()
        deadline = time.monotonic() + 120
        while not objective_logged(tracking_uri, last_epoch) and time.monotonic() < deadline:
            time.sleep(0.5)
        raise RuntimeError("injected failure after the last epoch")
    return fail


def objective_logged(tracking_uri: str, epoch: int) -> bool:
    """Some run in the store has an ``objective`` point at step ``epoch``."""
    client = MlflowClient(tracking_uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exps, filter_string="metrics.objective > -1e30") if exps else []
    return any(m.step == epoch for r in runs for m in client.get_metric_history(r.info.run_id, "objective"))


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def child_runs(tracking_uri: str, parent: str) -> list:
    client = MlflowClient(tracking_uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(exps, filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")


# ----------------------------------------------------------------------------- bad input
BAD = [
    ({"space": {"lr_0": {"uniform": [0.001, 0.1]}}}, "space key 'lr_0' is not a config key; did you mean 'lr0'?"),
    ({"space": {}}, "sweep key 'space' is empty"),
    ({}, "sweep key 'space' is empty"),
    ({"space": {"lr0": {"gaussian": [0.0, 1.0]}}}, "unknown distribution 'gaussian'"),
    ({"space": {"lr0": {"loguniform": [0.0, 0.1]}}}, "low must be > 0"),
    ({"space": {"lr0": {"uniform": [0.1, 0.01]}}}, "low 0.1 must be below high 0.01"),
    ({"space": {"lr0": {"uniform": 0.1}}}, "give [low, high] as two numbers"),
    ({"space": {"lr0": {"choice": []}}}, "give a non-empty list"),
    ({"space": {"batch": {"choice": [16, "big"]}}}, "config key 'batch': value 'big' is not valid"),
    ({"space": {"epochs": {"uniform": [1, 4]}}}, "config key 'epochs'"),
    ({"space": {"epochs": {"randint": [1.5, 4]}}}, "low and high must be integers"),
    ({"space": {"storage": {"choice": ["a", "b"]}}}, "space key 'storage' is set once per sweep"),
    ({"space": {"lr0": {"uniform": [0.01, 0.1], "x": 1}}}, "give one distribution"),
    ({"space": {"momentum": {"uniform": [0.8, 0.9]}}, "base": {"optimizer": "auto"}}, "optimizer: auto"),
    ({"space": {"lr0": {"grid": [0.01]}}, "num_sample": 2}, "unknown sweep key 'num_sample'; did you mean 'num_samples'?"),
    ({"space": {"lr0": {"grid": [0.01]}}, "scheduler": "ashaa"}, "did you mean 'asha'?"),
    ({"space": {"lr0": {"grid": [0.01]}}, "scheduler": {"name": "asha", "grace": 1}},
     "unknown key 'grace'; did you mean 'grace_period'?"),
    ({"space": {"lr0": {"grid": [0.01]}}, "scheduler": {"name": "pbt", "mutate": ["momentum"]}},
     "mutate key 'momentum' is not in the space"),
    ({"space": {"lr0": {"grid": [0.01]}}, "mode": "maximize"}, "sweep <dict>: key 'mode'"),
    ({"space": {"lr0": {"grid": [0.01]}}, "num_samples": 0}, "key 'num_samples'"),
    ({"space": {"lr0": {"grid": [0.01]}}, "objective": {"fitness": "high"}}, "weight of 'fitness' must be a finite number"),
    ({"space": {"lr0": {"uniform": [0.01, 0.1]}}, "search": "grid"}, "search: grid needs grid or choice values"),
    ({"space": {"lr0": {"grid": [0.01]}}, "search": "bayes"}, "sweep key 'search'"),
    ({"space": {"lr0": {"grid": [0.01]}}, "base": {"epoch": 3}}, "unknown config key 'epoch'; did you mean 'epochs'?"),
]


@pytest.mark.parametrize("data,message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_sweep_input_is_one_clear_line(data, message):
    data = {**data, "base": {"model": "cls-n.yaml", "optimizer": "SGD", **data.get("base", {})}}
    with pytest.raises(UserError) as info:
        build_sweep(data)
    text = str(info.value)
    assert message in text, text
    assert "\n" not in text


def test_optuna_search_needs_optuna_or_rejects_grid():
    try:
        import optuna  # noqa: F401
        expected = "space key 'lr0' is grid (use choice)"
    except ImportError:
        expected = "optuna needs the optuna package"
    space = {"lr0": {"grid": [0.01, 0.02]}} if "grid" in expected else {"lr0": {"uniform": [0.01, 0.1]}}
    with pytest.raises(UserError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        build_sweep({"space": space, "search": "optuna", "base": {"optimizer": "SGD"}})


def test_cli_rejects_bad_sweep_before_any_trial(tmp_path, capsys):
    sweep = tmp_path / "sweep.yaml"
    store = {"project": str(tmp_path / "runs"), "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
             "storage": str(tmp_path / "store")}  # where()'s, the store not made: it must stay so
    sweep.write_text(yaml.safe_dump({"base": {"model": "cls-n.yaml", "optimizer": "SGD", **store},
                                     "space": {"lr0": {"uniform": [0.01, 0.1]}, "momentun": {"choice": [0.9]}}}))
    assert main(["sweep", str(sweep)]) == 2
    err = own_lines(capsys.readouterr().err)  # Ray's forwarded lines (an earlier test's) left out
    assert err == ["error: space key 'momentun' is not a config key; did you mean 'momentum'?"]
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()
    assert main(["sweep", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    sweep.write_text(yaml.safe_dump({"base": {"model": "cls-n.yaml", "optimizer": "SGD", **store},
                                     "space": {"lr0": {"uniform": [0.01, 0.1]}}}))
    assert main(["sweep", str(sweep), "num_sample=3"]) == 2  # on the command line: a setting or a config key
    assert own_lines(capsys.readouterr().err) == [
        "error: unknown key 'num_sample': neither a sweep setting nor a config key; did you mean 'num_samples'?"]
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()


def test_sweep_file_layers_cfg_base_and_cli_overrides(tmp_path):
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump({"model": "cls-n.yaml", "epochs": 7, "batch": 8,
                                                       "optimizer": "SGD"}))
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({
        "cfg": "exp.yaml", "base": {"batch": 32}, "space": {"lr0": {"loguniform": [1e-4, 1e-1]}},
        "scheduler": {"name": "asha", "grace_period": 2}, "objective": {"metrics/accuracy_top1": 2, "fitness": 1}}))
    sweep = load_sweep(tmp_path / "sweep.yaml", {"epochs": 3, "num_samples": 4, "base.seed": 5, "name": "s1"})
    args = sweep.base_args()
    assert (args.epochs, args.batch, args.seed, args.model) == (3, 32, 5, "cls-n.yaml")
    assert (sweep.num_samples, sweep.name, sweep.scheduler) == (4, "s1", "asha")
    assert sweep.scheduler_options["grace_period"] == 2 and sweep.scheduler_options["reduction_factor"] == 2.0
    assert sweep.objective == {"metrics/accuracy_top1": 2.0, "fitness": 1.0}


def test_example_sweep_file_is_valid():
    example = Path(__file__).resolve().parents[1] / "examples" / "sweep.yaml"
    sweep = load_sweep(example)
    assert sweep.space and sweep.base_args().model


def test_objective_is_fitness_a_metric_or_a_weighted_sum():
    metrics = {"fitness": 0.5, "metrics/accuracy_top1": 0.8, "val/loss": 2.0}
    assert Objective({"fitness": 1.0})(metrics) == 0.5
    assert Objective({"metrics/accuracy_top1": 1.0, "val/loss": -0.1})(metrics) == pytest.approx(0.6)
    with pytest.raises(ObjectiveKeyError) as info:
        Objective({"metrics/mAP50(B)": 1.0})(metrics)
    assert str(info.value) == ("objective key 'metrics/mAP50(B)' is not among the reported metrics: "
                               "fitness, metrics/accuracy_top1, val/loss")


def test_exploited_checkpoint_takes_the_new_hyperparameters():
    model = torch.nn.Linear(3, 2)
    for name in ("SGD", "Adam"):
        opt = (torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4) if name == "SGD"
               else torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.9, 0.999), weight_decay=1e-4))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0 - 0.1 * e)
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
        sched.step()
        ckpt = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "epoch": 1,
                "train_args": {"lr0": 0.01, "momentum": 0.9, "weight_decay": 1e-4, "name": "other"}}
        new_args = {"lr0": 0.03, "momentum": 0.8, "weight_decay": 2e-4, "name": "mine"}
        out = adopt_hyperparameters(ckpt, new_args)
        assert out["train_args"] == new_args
        opt.load_state_dict(out["optimizer"])
        sched.load_state_dict(out["scheduler"])
        group = opt.param_groups[0]
        assert group["initial_lr"] == pytest.approx(0.03) and group["lr"] == pytest.approx(0.03 * 0.9)
        assert sched.base_lrs == pytest.approx([0.03])
        assert (group["momentum"] if name == "SGD" else group["betas"][0]) == 0.8
        assert group["weight_decay"] == pytest.approx(2e-4)
        assert opt.state[next(iter(model.parameters()))]  # moments kept


def test_nothing_left_after_the_last_epoch_or_an_early_stop(tmp_path):
    from ray.train import Checkpoint
    from orchestrator.ray_launch import nothing_left

    def checkpoint(name, meta):
        (tmp_path / name).mkdir()
        ckpt = Checkpoint.from_directory(str(tmp_path / name))
        if meta:
            ckpt.set_metadata(meta)
        return ckpt

    assert nothing_left(checkpoint("last", {"epoch": 1, "epochs": 2, "stop": False}), 2)
    assert not nothing_left(checkpoint("first", {"epoch": 0, "epochs": 2, "stop": False}), 2)
    assert nothing_left(checkpoint("stopped", {"epoch": 0, "epochs": 2, "stop": True}), 2)
    assert not nothing_left(checkpoint("more", {"epoch": 1, "epochs": 2, "stop": False}), 5)  # this trial runs 5
    assert not nothing_left(checkpoint("older", None), 2)  # no metadata: train on


def test_trials_plot_and_summary(tmp_path):
    table = pd.DataFrame({"trial_id": ["a", "b", "c"], "lr0": [0.001, 0.01, 0.1], "optimizer": ["SGD", "Adam", "SGD"],
                          "objective": [0.2, 0.9, float("nan")], "epochs": [2, 2, 0],
                          "status": ["KILLED", "FINISHED", "FAILED"]})
    space = {"lr0": ("loguniform", [1e-3, 1e-1]), "optimizer": ("choice", ["SGD", "Adam"])}
    png = parallel_coordinates(table, space, tmp_path / "pc.png")
    assert png.stat().st_size > 5000 and png.read_bytes()[:4] == b"\x89PNG"
    text = summary(table, space, "/x/last.pt", "fitness").splitlines()
    assert text[0].split() == ["trial_id", "lr0", "optimizer", "objective", "(fitness)", "epochs", "status"]
    assert text[2].split()[:2] == ["a", "0.001"] and text[-1] == "best: trial a objective 0.2  checkpoint /x/last.pt"


# ----------------------------------------------------------------------------- real sweeps
@pytest.fixture
def sweep_ray(ray_session):
    """The session's Ray, with placement groups of Train runs whose trial Tune stopped removed
    after each test: Ray Train's PlacementGroupCleaner finds dead controllers through the state
    API, which a Ray without dashboard (the test session's) does not serve."""
    yield ray_session
    from ray.util.placement_group import PlacementGroup, placement_group_table
    from ray._raylet import PlacementGroupID

    for pg_id, info in placement_group_table().items():
        if info.get("state") == "CREATED":
            ray_session.util.remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id))))


def test_custom_fitness_drives_asha_and_every_trial_is_tracked(sweep_ray, tmp_path, capsys, info_seen):
    """Trials in order lr0 = 0.03, 0.02: the trainer's own fitness ranks them, so ASHA (grace 1,
    reduction 2, one trial at a time) stops the second after its first epoch."""
    log = tmp_path / "epochs.jsonl"
    driver_log = tmp_path / "driver.jsonl"

    def on_driver(record):  # runs in the trial's callback actor on the driver node
        with open(driver_log, "a") as f:
            f.write(json.dumps({"run_id": record["run_id"], "epoch": record["epoch"]}) + "\n")

    model = Model("cls-n.yaml")
    model.add_callback("on_train_epoch_end", epoch_logger(log))
    model.add_callback("on_fit_epoch_end", on_driver, where="driver")
    result = model.tune({"lr0": {"grid": [0.03, 0.02]}}, trainer=LrFitness, scheduler="asha",
                        max_concurrent=1, name="asha", epochs=3, **QUICK, **where(tmp_path))
    uri = where(tmp_path)["tracking_uri"]
    # the objective is the custom fitness; ASHA stopped the weaker trial early
    table = result.trials.set_index("lr0")
    assert result.best_config["lr0"] == 0.03 and result.best_objective == pytest.approx(0.09)
    assert table.loc[0.03, "epochs"] == 3 and table.loc[0.02, "epochs"] == 1
    assert list(table["status"].loc[[0.03, 0.02]]) == ["FINISHED", "KILLED"]
    trained = rows(log)
    assert sorted((r["lr0"], r["epoch"]) for r in trained if r["lr0"] == 0.03) == [(0.03, 0), (0.03, 1), (0.03, 2)]
    assert {r["trial"] for r in trained} == set(result.trials["trial_id"])  # each trial in its own folder
    # outputs
    folder = result.path
    assert yaml.safe_load((folder / "best.yaml").read_text())["lr0"] == 0.03
    assert "project" not in yaml.safe_load((folder / "best.yaml").read_text())
    assert len(pd.read_parquet(folder / "trials.parquet")) == 2 and len(pd.read_csv(folder / "trials.csv")) == 2
    best = torch.load(result.best_checkpoint, weights_only=True)
    assert best["train_args"]["lr0"] == 0.03 and best["epoch"] == 2
    captured = capsys.readouterr()
    out = captured.out
    assert "objective (fitness)" in out and f"best: trial {result.best_trial} objective 0.09" in out
    ended = sorted([*line.split("  ")[1:], line.split()[2]] for line in out.splitlines() if line.startswith("trial "))
    assert ended == [["lr0=0.02", "objective 0.02 after 1 epoch(s)", "stopped"],  # by ASHA
                     ["lr0=0.03", "objective 0.09 after 3 epoch(s)", "ended"]], out  # one line per trial
    assert "Trial status" not in out  # Tune's own periodic tables stay off
    assert "Configuration for experiment" not in out and "View detailed results" not in out  # and its banner
    assert "Checkpoint successfully created" not in captured.err  # a trial's per-epoch note
    # MLflow: parent with the sweep's files, one child per trial, none left RUNNING
    client = MlflowClient(uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["best_trial"] == result.best_trial
    assert parent.data.metrics["best_objective"] == pytest.approx(0.09)
    note = parent.data.tags["mlflow.note.content"]
    assert "**sweep**" in note and "scheduler asha" in note and "`lr0` grid" in note and "epochs: 3" in note
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {
        "sweep.yaml", "best.yaml", "trials.csv", "trials.parquet", "parallel_coordinates.png"}
    children = {r.data.params["lr0"]: r for r in child_runs(uri, parent.info.run_id)}
    assert set(children) == {"0.03", "0.02"}
    assert {r.data.tags["mlflow.user"] for r in [parent, *children.values()]} == {getpass.getuser()}
    assert {k: r.info.status for k, r in children.items()} == {"0.03": "FINISHED", "0.02": "KILLED"}
    assert {k: r.data.tags.get("orchestrator.end_reason") for k, r in children.items()} == {
        "0.03": None, "0.02": "stopped early by the sweep (its scheduler, time budget or a stopper)"}
    history = client.get_metric_history(children["0.03"].info.run_id, "fitness")
    assert [(m.step, round(m.value, 6)) for m in history] == [(0, 0.03), (1, 0.06), (2, 0.09)]
    assert children["0.03"].data.params["epochs"] == "3" and children["0.03"].data.params["optimizer"] == "SGD"
    for child in children.values():  # lineage: each trial's run names its data set once
        assert [i.dataset.name for i in client.get_run(child.info.run_id).inputs.dataset_inputs] == ["digits"]
    driver = rows(driver_log)
    assert len({r["run_id"] for r in driver}) == 2 and [r["epoch"] for r in driver].count(0) == 2
    # each trial's best checkpoint is a logged model carrying its objective; the best is the champion
    models = client.search_logged_models([parent.info.experiment_id],
                                         order_by=[{"field_name": "metrics.objective", "ascending": False}])
    assert [m.source_run_id for m in models] == [children[lr].info.run_id for lr in ("0.03", "0.02")]
    assert [[(m.key, round(m.value, 6)) for m in x.metrics if m.key == "objective"] for x in models] == [
        [("objective", 0.09)], [("objective", 0.02)]]
    champion = client.get_model_version_by_alias("runs", "champion")  # register= unset: the experiment's name
    assert champion.source == f"models:/{models[0].model_id}" and models[0].model_id == result.champion_model_id
    assert parent.data.tags["champion_model_id"] == result.champion_model_id
    logged = [r.getMessage() for r in info_seen if "as MLflow model" in r.getMessage()]
    assert logged == [f"logged {m.name}'s checkpoint as MLflow model {m.model_id} "
                      f"(run {m.source_run_id})" for m in models], logged  # which trial's, best first
    objective = client.get_metric_history(children["0.03"].info.run_id, "objective")
    assert [m.step for m in objective] == [0, 1, 2]  # linking re-sent the epoch's points: none added


def test_pbt_restarts_the_weak_trial_from_the_strong_trials_checkpoint(sweep_ray, tmp_path):
    """The weak trial (lr0 0.01) takes the strong one's config (lr0 0.05: it is not mutated) with
    momentum perturbed (x0.8 or x1.2), so both change, and its child run notes them once."""
    log = tmp_path / "starts.jsonl"
    model = Model("cls-n.yaml")
    model.add_callback("on_train_start", start_logger(log))
    pbt = {"name": "pbt", "perturbation_interval": 2, "synch": True, "quantile_fraction": 0.5,
           "resample_probability": 0.0, "mutate": ["momentum"]}
    space = {"lr0": {"grid": [0.01, 0.05]}, "momentum": {"uniform": [0.5, 0.7]}}
    result = model.tune(space, trainer=LrFitness, scheduler=pbt, max_concurrent=2,
                        name="pbt", epochs=3, **QUICK, **where(tmp_path))
    starts = rows(log)
    weak = [r for r in starts if r["start_epoch"] > 0]
    assert weak, starts
    first_weak = weak[0]
    assert first_weak["start_epoch"] == 2 and "exploit-" in first_weak["resume"]
    assert not Path(first_weak["resume"]).parent.exists()  # the local copy went when the trial ended
    assert Path(first_weak["save_dir"]).name == first_weak["trial"]  # its own folder, not the clone's
    clone = [r for r in starts if r["start_epoch"] == 0 and r["trial"] == first_weak["trial"]]
    assert clone and clone[0]["lr0"] == 0.01  # it began as the weak trial
    ckpt = torch.load(Path(first_weak["save_dir"]) / "weights" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["train_args"]["name"] == first_weak["trial"]
    assert ckpt["train_args"]["lr0"] == first_weak["lr0"]
    uri = where(tmp_path)["tracking_uri"]
    children = child_runs(uri, result.parent_run_id)
    assert len(children) == 2 and {r.info.status for r in children} == {"FINISHED"}
    (child,) = [r for r in children if r.data.tags["sweep.trial_id"] == first_weak["trial"]]
    assert_hparams_noted(uri, child, first_weak, where(tmp_path)["storage"])
    (strong,) = [r for r in children if r is not child]
    assert not any(key.startswith("hparam") for key in {**strong.data.metrics, **strong.data.tags})
    assert_clone_noted(uri, child, strong, first_weak, where(tmp_path)["storage"])


def assert_clone_noted(uri: str, child, strong, start: dict, storage: str) -> None:
    """The restarted trial's start from the strong trial's checkpoint is one ``on_clone`` record, at
    the first epoch it trained from it, before the Train run's (its time a tag of the child run);
    its child run has its own epochs once each, then the clone's epoch (lr0 0.05 x 3); the strong
    trial started from nothing."""
    from callbacks.sinks import read_event_log

    def clones(run):
        rows = read_event_log(storage, run.data.tags["orchestrator.run_id"], dedup_rows=False).to_pylist()
        return [(r["rank"], r["seq"], r["epoch"]) for r in rows if r["event"] == "on_clone"]

    assert clones(child) == [(-1, 0, start["start_epoch"])] and clones(strong) == []
    assert "orchestrator.cloned_at" in child.data.tags and "orchestrator.cloned_at" not in strong.data.tags
    history = sorted(MlflowClient(uri).get_metric_history(child.info.run_id, "objective"), key=lambda m: m.timestamp)
    points = [(m.step, m.value) for m in history]
    assert points[:2] == [(0, pytest.approx(0.01)), (1, pytest.approx(0.02))], points
    assert points[-1] == (2, pytest.approx(0.15)) and len(points) <= 4, points  # the first lineage may reach epoch 2


def assert_hparams_noted(uri: str, child, start: dict, storage: str) -> None:
    """The new lr0 and momentum of the trial PBT restarted, each once (raw history) at the epoch
    it continued from, with their tags; sent by the driver through the trial's callback actor, so
    they are in its event log too (the driver's own stream, rank -1)."""
    from callbacks.sinks import read_event_log

    client, run_id = MlflowClient(uri), child.info.run_id
    for key in ("lr0", "momentum"):
        points = [(m.step, m.value) for m in client.get_metric_history(run_id, f"hparam/{key}")]
        assert points == [(start["start_epoch"], pytest.approx(start[key]))], (key, points)
        assert float(child.data.tags[f"hparam.{key}"]) == pytest.approx(start[key])
    assert start["lr0"] == 0.05 and child.data.params["lr0"] == "0.01"  # params stay the first values
    notes = [r for r in read_event_log(storage, child.data.tags["orchestrator.run_id"], dedup_rows=False).to_pylist()
             if r["event"] == "on_hparams"]
    assert [(r["rank"], r["seq"], r["epoch"], sorted(dict(r["metrics"])), list(dict(r["artifacts"]))) for r in notes] \
        == [(-1, 0, start["start_epoch"], ["lr0", "momentum"], ["hparams"])]
    noted = client.download_artifacts(run_id, f"hparams-epoch-{start['start_epoch']}.yaml", tempfile.mkdtemp())
    values = yaml.safe_load(Path(noted).read_text())  # every changed value, as the trial continued with it
    assert sorted(values) == ["lr0", "momentum"] and values == pytest.approx({k: start[k] for k in values})


def test_objective_missing_fails_the_sweep_on_first_report(sweep_ray, tmp_path, capsys):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({
        "base": {"model": "cls-n.yaml", "epochs": 2, **QUICK, **where(tmp_path)},
        "space": {"lr0": {"grid": [0.01, 0.02]}}, "objective": "metrics/mAP50(B)", "max_concurrent": 1}))
    assert main(["sweep", str(sweep), "workers_per_trial=7"]) == 2  # a trial the session's Ray cannot hold
    assert own_lines(capsys.readouterr().err) == [
        "error: workers_per_trial=7 needs 7 Ray Train worker(s) of 1 CPU each, but the local Ray (1 node(s), "
        "6 CPU in all) has room for 6: use fewer workers, or smaller resources_per_worker"]
    assert main(["sweep", str(sweep)]) == 2  # the one parent found below is this call's: the first made none
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and err[0].startswith("error: objective key 'metrics/mAP50(B)' is not among the reported")
    assert "metrics/accuracy_top1" in err[0] and "fitness" in err[0]
    uri = where(tmp_path)["tracking_uri"]
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parent = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parent) == 1 and parent[0].info.status == "FAILED"
    assert len(children) == 1 and children[0].info.status == "FAILED"  # the second trial never started


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(sweep_ray, tmp_path, capsys, warnings_seen):
    log = tmp_path / "epochs.jsonl"
    uri = where(tmp_path)["tracking_uri"]
    settings = dict(trainer=LrFitness, max_concurrent=1, name="resumable", epochs=2, **QUICK, **where(tmp_path))
    space = {"lr0": {"grid": [0.01, 0.02]}}
    stop = threading.Event()

    def interrupt_after_first_trial():
        client = None
        while not stop.is_set():
            time.sleep(1.0)
            try:
                client = client or MlflowClient(uri)
                runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                          filter_string="attributes.status = 'FINISHED'")
            except Exception:
                runs = []
            if any(r.data.tags.get("mlflow.parentRunId") for r in runs):
                os.kill(os.getpid(), signal.SIGUSR1)  # what Ctrl+C does to a Tune run: stop, keep state
                return

    model = Model("cls-n.yaml")
    model.add_callback("on_train_epoch_end", epoch_logger(log))
    watcher = threading.Thread(target=interrupt_after_first_trial, daemon=True)
    watcher.start()
    try:
        first = model.tune(space, **settings)
    finally:
        stop.set()
    assert first.status == "KILLED"
    said = capsys.readouterr().err  # Ray's and MLflow's notes from the trials' processes stay in their logs
    assert "PlacementGroupCleaner" not in said and "INFO mlflow" not in said and "Traceback" not in said, said[-3000:]
    statuses = {r.data.params["lr0"]: r.info.status for r in child_runs(uri, first.parent_run_id)}
    assert "RUNNING" not in statuses.values() and list(statuses.values()).count("FINISHED") == 1
    done_lr = next(k for k, v in statuses.items() if v == "FINISHED")
    before = [r for r in rows(log) if str(r["lr0"]) == done_lr]
    assert len(before) == 2

    warnings_seen.clear()  # the resume asks for 3 epochs: the sweep goes on as it was started, with 2
    again = model.tune(space, resume=True, **{**settings, "epochs": 3})
    assert [r.getMessage() for r in warnings_seen if r.getMessage().startswith("resume")] == [
        f"resume: sweep {first.path.name} goes on as it was started; not applied: epochs=3 (started with 2)"]
    assert list(again.trials["epochs"]) == [2, 2]
    assert again.status == "FINISHED" and again.path == first.path and again.parent_run_id == first.parent_run_id
    after = rows(log)
    assert [r for r in after if str(r["lr0"]) == done_lr] == before  # the finished trial did not run again
    assert sorted(again.trials["lr0"]) == [0.01, 0.02] and set(again.trials["status"]) == {"FINISHED"}
    children = child_runs(uri, first.parent_run_id)
    assert len(children) == 2 and {r.info.status for r in children} == {"FINISHED"}
    assert MlflowClient(uri).get_run(first.parent_run_id).info.status == "FINISHED"
    assert again.best_config["lr0"] == 0.02


def test_trial_retried_after_its_last_report_finishes_without_training_again(sweep_ray, tmp_path):
    """Tune retries a failed trial from its latest checkpoint; when that is the last epoch the
    retry has nothing to train (the same holds for a sweep resumed just as a trial ended)."""
    log = tmp_path / "epochs.jsonl"
    uri = where(tmp_path)["tracking_uri"]
    model = Model("cls-n.yaml")
    model.add_callback("on_train_epoch_end", epoch_logger(log))
    model.add_callback("on_train_end", fail_once(tmp_path / "failed-once", uri, last_epoch=1))
    result = model.tune({"lr0": {"grid": [0.02]}}, trainer=LrFitness, max_failures=1, name="retried", epochs=2,
                        **QUICK, **where(tmp_path))
    assert (tmp_path / "failed-once").exists()  # the first attempt did fail
    assert result.status == "FINISHED" and list(result.trials["status"]) == ["FINISHED"]
    assert [r["epoch"] for r in rows(log)] == [0, 1]  # the retry trained no epoch again
    assert result.trials["objective"].tolist() == pytest.approx([0.04]) and list(result.trials["epochs"]) == [2]
    children = child_runs(uri, result.parent_run_id)
    assert [r.info.status for r in children] == ["FINISHED"]
    history = MlflowClient(uri).get_metric_history(children[0].info.run_id, "objective")
    points = sorted((m.step, m.value) for m in history)
    assert [step for step, _ in points] == [0, 1] and [v for _, v in points] == pytest.approx([0.02, 0.04])


def test_a_user_error_raised_in_the_trials_is_one_line_from_the_cli(sweep_ray, tmp_path, capsys):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({
        "base": {"model": "cls-n.yaml", "epochs": 1, "warmup_epochs": 0, **QUICK, **where(tmp_path)},
        "space": {"lr0": {"grid": [1e30]}}}))
    assert main(["sweep", str(sweep)]) == 2
    captured = capsys.readouterr()
    err = own_lines(captured.err)
    assert [line for line in err if line.startswith("error:")] == [err[-1]]
    assert err[-1].startswith("error: every trial failed; first error: loss is nan at epoch 1, batch 1: ")
    (failed,) = [line for line in captured.out.splitlines() if line.startswith("trial ")]
    assert failed.split("  ")[1:3] == ["lr0=1e+30", err[-1][len("error: every trial failed; first "):]]
    assert not any("Traceback" in line for line in err), err


def restore_when_training(proxy, log: Path, started: float, least_s: float = 15.0, most_s: float = 60.0) -> float:
    """Restore ``proxy`` once ``least_s`` s have passed and a trial has ended an epoch, 2 s after
    that epoch's end (its record is stamped by then; at ``most_s`` s whatever happened); the time it
    was restored."""
    while time.monotonic() - started < most_s and (time.monotonic() - started < least_s or not rows(log)):
        time.sleep(0.2)
    if rows(log):
        time.sleep(2.0)
    proxy.restore()
    return time.time()


def test_a_sweep_rides_out_an_mlflow_outage_from_its_start(sweep_ray, tmp_path):
    """MLflow unreachable from before the sweep starts until its trials have trained: the parent
    and child runs are made once it answers, with every point of the outage, once each. Its
    artifact store then refuses the trials' models (a file stands where the experiment's models'
    folder goes): ``orchestrator recover`` logs them and registers the champion once it takes them."""
    from tests.servers import MlflowServer, TcpProxy
    from tests.test_journal import recover_publishes

    log = tmp_path / "epochs.jsonl"
    model = Model("cls-n.yaml")
    model.add_callback("on_fit_epoch_end", epoch_logger(log))
    with MlflowServer(tmp_path / "mlflow") as server, TcpProxy(server.port) as proxy:
        blocker = tmp_path / "mlflow" / "artifacts" / "1" / "models"  # "runs", the server's first experiment
        blocker.parent.mkdir(parents=True)
        blocker.write_text("not a folder")
        proxy.cut()
        restored: list[float] = []
        watcher = threading.Thread(target=lambda: restored.append(restore_when_training(proxy, log, time.monotonic())))
        watcher.start()
        try:
            result = model.tune({"lr0": {"grid": [0.01, 0.02]}}, trainer=LrFitness, max_concurrent=2, name="outage",
                                epochs=2, **QUICK, **{**where(tmp_path), "tracking_uri": proxy.url},
                                journal=str(tmp_path / "journal"))
        finally:
            watcher.join()
        client = MlflowClient(server.url)
        assert result.status == "FINISHED" and restored
        restored_ms = restored[0] * 1000
        parent = client.get_run(result.parent_run_id)
        assert parent.info.status == "FINISHED" and parent.info.start_time >= restored_ms  # made after the outage
        assert parent.data.metrics["best_objective"] == pytest.approx(0.04)
        assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"sweep.yaml", "trials.csv", "best.yaml"}
        children = {r.data.params["lr0"]: r for r in child_runs(server.url, parent.info.run_id)}
        assert sorted(children) == ["0.01", "0.02"]
        assert parent.data.tags["best_mlflow_run_id"] == children["0.02"].info.run_id
        outage_points = 0
        for lr, child in children.items():
            run_id = child.info.run_id
            assert child.info.status == "FINISHED" and child.info.start_time >= restored_ms
            assert child.data.tags["sweep.trial_id"] == child.info.run_name
            fitness = client.get_metric_history(run_id, "fitness")
            objective = client.get_metric_history(run_id, "objective")
            assert sorted(m.step for m in fitness) == [0, 1]  # raw: once per epoch
            assert sorted((m.step, round(m.value, 6)) for m in objective) == [(0, float(lr)), (1, 2 * float(lr))]
            outage_points += sum(m.timestamp < restored_ms for m in objective)
        assert outage_points >= 1  # at least one epoch ended while MLflow was unreachable
        table = dict(zip(result.trials["lr0"].astype(str), result.trials["mlflow_run_id"]))
        assert table == {lr: child.info.run_id for lr, child in children.items()}

        assert parent.info.experiment_id == "1" and result.champion_model_id is None
        assert "champion_model_id" not in parent.data.tags
        (folder,) = (tmp_path / "journal").glob("sweep-*")
        assert (folder / "publish.json").is_file()
        blocker.unlink()
        model_id = recover_publishes(folder, tmp_path)
        assert client.get_model_version_by_alias("runs", "champion").source == f"models:/{model_id}"
        models = client.search_logged_models(["1"], order_by=[{"field_name": "metrics.objective", "ascending": False}])
        assert [str(m.status) for m in models] == ["READY", "READY"]  # the refused one completed, not made again
        assert [m.source_run_id for m in models] == [children[lr].info.run_id for lr in ("0.02", "0.01")]
        assert models[0].model_id == model_id
        assert client.get_run(parent.info.run_id).data.tags["champion_model_id"] == model_id
        assert not (folder / "publish.json").exists()


def test_a_trials_fit_thread_ends_quietly_when_its_queue_went_with_the_trial():
    """A trial Tune stops has its placement group removed, the relay queue's actor with it; the
    fit thread's last word to the relay then has nobody to reach (it printed a traceback)."""
    from ray.exceptions import RayActorError

    from sweeps.trial import _fit

    class GoneQueue:
        def put(self, item):
            raise RayActorError()

    class Fits:
        def fit(self):
            return None

    outcome = {}
    _fit(Fits(), GoneQueue(), outcome)
    assert outcome == {}

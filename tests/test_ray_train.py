"""Training on Ray Train workers: custom code on every rank, DDP metrics, failures, the actor."""
import gc
import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from callbacks.sinks import read_event_log
from callbacks.sinks.event_log import epoch_events
from orchestrator import Model
from orchestrator.capacity import check_room, per_worker, room
from orchestrator.cli import main
from trainers.data.shapes import generate_shapes
from trainers.classify import ClassificationTrainer
from trainers.utils import UserError

from tests.helpers import own_lines, system_series, wait_for_mlflow_run, wait_for_registered_checkpoint
from tests.servers import mlflow_store

RAY_QUICK = dict(data="digits", imgsz=16, batch=16, nbs=16, fraction=0.1, epochs=2, verbose=False, plots=False,
                 workers=0, seed=0)


def run_cfg(tmp_path, name, **kw):
    store = tmp_path / "store"
    return {**RAY_QUICK, "project": str(tmp_path / "runs"), "name": name, "storage": str(store),
            "tracking_uri": mlflow_store(tmp_path / "mlflow.db"), **kw}


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize("num_workers", [2])  # one worker on Ray: the sweep and job tests
def test_custom_trainer_and_callbacks_run_on_every_rank(ray_session, tmp_path, num_workers, capsys, warnings_seen):
    log = tmp_path / "events.jsonl"

    class MarkedTrainer(ClassificationTrainer):  # defined here: travels by value, like __main__ code
        def validate(self):
            metrics, fitness = super().validate()
            self.log({"custom/marker": 7.0})
            return metrics, fitness

    def record(trainer):
        print(f"rank {['zero', 'one'][trainer.rank]} ends its {['first', 'second'][trainer.epoch]} epoch")
        with open(log, "a") as f:
            f.write(json.dumps({"rank": trainer.rank, "world": trainer.world_size, "epoch": trainer.epoch,
                                "cls": type(trainer).__name__, "frozen": gc.get_freeze_count(),
                                "mlflow": "mlflow" in sys.modules}) + "\n")

    class DriverSink:  # a sink object on the driver: start, an event method, close(status)
        def __init__(self, path):
            self.path, self.started, self.epochs, self.per_rank = str(path), False, [], {}

        def start(self):
            self.started = True

        def on_fit_epoch_end(self, record):
            self.epochs.append((record["rank"], record["epoch"], record["final_eval"]))
            self.per_rank[record["rank"]] = self.per_rank.get(record["rank"], 0) + 1

        def close(self, status):
            with open(self.path, "w") as f:
                json.dump({"started": self.started, "epochs": self.epochs, "status": status}, f)
            return {"epochs": len(self.epochs)}

    driver_seen = []
    model = Model("cls-n.yaml")
    model.add_callback("on_train_epoch_end", record)
    model.add_callback("on_fit_epoch_end", driver_seen.append, where="driver")
    counter = DriverSink(tmp_path / "sink.json")
    model.add_callback(counter, where="driver")
    with pytest.raises(UserError, match="neither an"):
        model.add_callback(object(), where="driver")
    cfg = run_cfg(tmp_path, f"ranks{num_workers}", num_workers=num_workers, register=f"ranks{num_workers}",
                  verbose=True, system_metrics=0.3)
    metrics = model.train(**cfg, trainer=MarkedTrainer)
    # the driver's console: rank 0's records as a header and a line per epoch; no Ray report dumps
    captured = capsys.readouterr()
    table = [line.split()[0] for line in captured.out.splitlines() if line.split()[:1] in (["epoch"], ["1/2"],
                                                                                          ["2/2"], ["best.pt"])]
    assert table == ["epoch", "1/2", "2/2", "best.pt"], captured.out
    assert "Reporting training result" not in captured.out + captured.err
    printed = [line[line.index("rank "):] for line in (captured.out + captured.err).splitlines() if " ends its " in line]
    assert sorted(printed) == sorted(f"rank {r} ends its {e} epoch" for r in ("zero", "one")[:num_workers]
                                     for e in ("first", "second")), printed  # a worker's print() once
    assert not [w.getMessage() for w in warnings_seen if "driver callback" in w.getMessage()]  # none failed
    sink = json.loads((tmp_path / "sink.json").read_text())
    assert sink["started"] and sink["status"] == "FINISHED"
    assert sorted({(r, e) for r, e, final in sink["epochs"] if not final}) == \
        sorted((r, e) for e in range(2) for r in range(num_workers))
    # the user's own objects hold what the actor's copies gathered (SPEC §8)
    assert counter.started and [list(e) for e in counter.epochs] == sink["epochs"]
    assert counter.per_rank == {r: 3 for r in range(num_workers)}  # two epochs and the final evaluation
    assert sorted((r["rank"], r["epoch"]) for r in driver_seen if not r["final_eval"]) == \
        sorted((r, e) for e in range(2) for r in range(num_workers))
    rows = lines(log)
    assert {(r["rank"], r["epoch"]) for r in rows} == {(r, e) for r in range(num_workers) for e in range(2)}
    assert all(r["world"] == num_workers and r["cls"] == "MarkedTrainer" for r in rows)
    assert all(r["frozen"] > 10_000 for r in rows)  # set-up's objects left out of garbage collections
    assert not any(r["mlflow"] for r in rows)  # the actor samples the node: no worker loads MLflow for it
    assert "metrics/accuracy_top1" in metrics
    assert ray_session.is_initialized()  # a Ray the caller started is never shut down
    assert model.ckpt_path is not None and model.ckpt_path.name == "best.pt"
    # the callback actor created the MLflow run (while the workers started): best.pt logged as a model
    # of that run on the driver, and registered
    client = MlflowClient(cfg["tracking_uri"])
    (version,) = client.search_model_versions(f"name='ranks{num_workers}'")
    run = client.get_run(version.run_id)
    assert version.source == f"models:/{model.mlflow_model_id}"
    assert client.get_logged_model(model.mlflow_model_id).source_run_id == run.info.run_id == model.mlflow_run_id
    assert run.info.run_name == f"ranks{num_workers}" and run.info.status == "FINISHED"
    assert run.data.params["num_workers"] == str(num_workers) and "orchestrator.run_id" in run.data.tags
    assert [i.dataset.name for i in run.inputs.dataset_inputs] == ["digits"]  # logged by the actor's sink
    marker = client.get_metric_history(run.info.run_id, "custom/marker")  # trainer.log() on every epoch
    assert [(m.step, m.value) for m in marker] == [(0, 7.0), (1, 7.0)]
    series = system_series(client, run.info.run_id)  # one monitor per node (the actor's), each step once
    assert len({k.split("/")[1] for k in series}) == 1
    assert all(steps == list(range(len(steps))) for steps in series.values())


def bad_data(tmp_path) -> tuple[Path, Path]:
    """A tiny detection set whose first training image is corrupt and whose second image's label has
    a class out of range; returns the data YAML and the corrupt image."""
    data = generate_shapes(tmp_path / "bad", n_train=8, n_val=4, imgsz=32)
    first, second = sorted((data.parent / "images" / "train").iterdir())[:2]
    first.write_bytes(b"not an image")
    label = data.parent / "labels" / "train" / f"{second.stem}.txt"
    label.write_text("7 0.5 0.5 0.2 0.2\n" + label.read_text())
    return data, first


def test_user_errors_on_workers_reach_the_cli_and_the_caller_as_raised(ray_session, tmp_path, capsys):
    """A NaN loss and strict data errors, each raised inside 2 Ray workers, and a resume of a
    finished run, refused on the driver before any worker starts (its MLflow run stays FINISHED):
    one ``error:`` line and exit 2 from the CLI, the same exception type and line from Model.train."""
    done = Model("cls-n.yaml")
    done.train(**run_cfg(tmp_path, "done", epochs=1))  # in process: a finished run to resume
    results = (done.trainer.save_dir / "results.csv").read_text()
    data, corrupt = bad_data(tmp_path)
    cases = [(["model=det-n.yaml", f"data={data}", "imgsz=32"],  # strict by default
              [f"{corrupt}: unreadable image", "(and 1 more problem(s))"]),  # the other: the bad label
             ([f"resume={done.trainer.last}", "epochs=1"], ["already trained 1 epochs"])]
    common = [f"{k}={v}" for k, v in run_cfg(tmp_path, "bad", num_workers=2).items() if k not in ("data", "imgsz")]
    for argv, fragments in cases:
        assert main(["train", *common, *argv]) == 2
        err = own_lines(capsys.readouterr().err)
        assert err[-1].startswith("error: ") and all(f in err[-1] for f in fragments), err[-5:]
        assert not any("Traceback" in line for line in err), err
    assert main(["train", *common, "model=cls-n.yaml", "data=digits", "num_workers=7", "name=room"]) == 2  # > the Ray
    assert own_lines(capsys.readouterr().err) == [
        "error: num_workers=7 needs 7 Ray Train worker(s) of 1 CPU each, but the local Ray (1 node(s), 6 CPU in all) "
        "has room for 6: use fewer workers, or smaller resources_per_worker"]
    client = MlflowClient(run_cfg(tmp_path, "done")["tracking_uri"])
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  filter_string="attributes.run_name = 'room'")  # refused before a run is made
    (finished,) = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
                   if r.info.run_name == "done"]
    assert finished.info.status == "FINISHED" and "orchestrator.end_reason" not in finished.data.tags
    assert (done.trainer.save_dir / "results.csv").read_text() == results
    with pytest.raises(UserError) as info:
        Model("cls-n.yaml").train(**run_cfg(tmp_path, "nan", num_workers=2, optimizer="SGD", lr0=1e30, warmup_epochs=0))
    assert type(info.value) is UserError and str(info.value).startswith("loss is nan at epoch 1, batch 1")
    (run,) = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
              if r.info.run_name == "nan"]
    assert run.info.status == "FAILED"
    assert run.data.tags["orchestrator.end_reason"] == f"UserError: {info.value}"
    assert "\n" not in str(info.value)


def test_a_worker_group_the_ray_cannot_hold_is_refused_locally_and_awaited_on_a_cluster(ray_session, monkeypatch,
                                                                                       warnings_seen):
    assert room({"CPU": 2.0}, [{"CPU": 3.0}, {"CPU": 2.0, "GPU": 1.0}]) == 2  # each worker on one node
    assert room({"CPU": 1.0, "GPU": 1.0}, [{"CPU": 3.0}, {"CPU": 2.0, "GPU": 1.0}]) == 1
    assert per_worker(False, None) == {"CPU": 1.0} and per_worker(True, None) == {"GPU": 1.0}
    assert per_worker(True, {"CPU": 2, "memory": 0}) == {"CPU": 2.0, "GPU": 1.0}  # as Ray Train's ScalingConfig
    check_room(6, {"CPU": 1.0}, "num_workers=6")  # the session's Ray holds 6
    with pytest.raises(UserError, match=r"^num_workers=7 needs 7 .* has room for 6: use fewer workers"):
        check_room(7, {"CPU": 1.0}, "num_workers=7")
    with pytest.raises(UserError, match=r"^num_workers=1 needs 1 Ray Train worker\(s\) of 1 GPU each, but the local "
                                        r"Ray \(1 node\(s\), 0 GPU in all\) has room for 0: it has no GPU \(use_gpu=false"):
        check_room(1, per_worker(True, None), "num_workers=1")
    assert warnings_seen == []
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")  # a cluster: an autoscaler may add nodes
    check_room(1, {"CPU": 8.0}, "num_workers=1")
    assert [r.getMessage() for r in warnings_seen] == [
        "num_workers=1 needs 1 Ray Train worker(s) of 8 CPU each, but the Ray cluster (1 node(s), 6 CPU in all) "
        "has room for 0: Ray Train waits until nodes join (an autoscaler's)"]


def test_worker_sigkill_restarts_from_checkpoint_without_duplicates_and_patience_stops_every_rank(ray_session, tmp_path):
    """Two runs of 2 workers whose fitness is best at epoch 1, with patience 1: both ranks stop
    after epoch 2. One run is undisturbed; in the other, rank 1 is SIGKILLed at the start of epoch
    1: the restarted group resumes after epoch 0, keeps the patience count, and ends with the
    undisturbed run's weights, each record and epoch metric once."""
    from tests.test_training_mechanics import ScriptedFitness  # best fitness at epoch 1

    marker = tmp_path / "killed"

    def kill_once(trainer):
        if trainer.epoch == 1 and trainer.rank == 1 and not marker.exists():
            marker.write_text("x")
            wait_for_registered_checkpoint(cfg["storage"], trainer.args.name, epoch=0)
            os.kill(os.getpid(), signal.SIGKILL)

    cfg = run_cfg(tmp_path, "clean", num_workers=2, epochs=8, patience=1, max_failures=2)
    clean = Model("cls-n.yaml")
    clean.train(**cfg, trainer=ScriptedFitness)
    last = torch.load(Path(cfg["project"]) / "clean" / "weights" / "last.pt", weights_only=True)
    assert last["epoch"] == 2 and last["best_fitness"] == 0.9  # epoch 2 was worse: patience 1 ends it
    assert torch.load(clean.ckpt_path, weights_only=True)["epoch"] == 1
    table = read_event_log(cfg["storage"], read_run_id(cfg, "clean")).to_pylist()
    trained = sorted((r["rank"], r["epoch"]) for r in table if r["event"] == "on_train_epoch_end")
    assert trained == [(rank, epoch) for rank in (0, 1) for epoch in range(3)]

    crashing = Model("cls-n.yaml")
    crashing.add_callback("on_train_batch_start", kill_once)
    crashing.train(**{**cfg, "name": "crash"}, trainer=ScriptedFitness)
    assert marker.exists()

    a = torch.load(Path(cfg["project"]) / "clean" / "weights" / "last.pt", weights_only=True)
    b = torch.load(Path(cfg["project"]) / "crash" / "weights" / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2 and b["best_fitness"] == 0.9  # the restart kept the patience count
    for name, value in a["ema"].items():
        assert torch.allclose(value, b["ema"][name], atol=1e-6), name
    resumed = Path(b["train_args"]["resume"])  # the restarted workers' local copy of the checkpoint
    assert resumed.name == "last.pt" and resumed.parent.name.startswith("resume-")
    assert not resumed.parent.exists()  # removed once the run ended on the worker

    run_id = read_run_id(cfg, "crash")
    table = read_event_log(cfg["storage"], run_id).to_pylist()
    assert read_event_log(cfg["storage"], run_id, dedup_rows=False).num_rows == len(table)  # none stored twice
    streams = {(r["rank"], r["attempt"]) for r in table}  # an attempt is a start time: ranks may share one
    assert len(streams) >= 4  # 2 ranks x (first attempt + restarted group)
    restarted = [r for r in table if r["event"] == "on_train_start"][-1]["attempt"]
    first_epoch = [r["epoch"] for r in table if r["event"] == "on_train_epoch_start" and r["attempt"] == restarted]
    assert first_epoch[0] == 1  # the restarted group resumed after epoch 0's checkpoint
    every = [(r["event"], r["rank"], r["epoch"]) for r in epoch_events(read_event_log(cfg["storage"], run_id))
             if not r["final_eval"]]
    expected = [(e, rank, epoch) for e in ("on_train_epoch_start", "on_train_epoch_end", "on_fit_epoch_end")
                for rank in (0, 1) for epoch in range(3)] + [("on_model_save", 0, epoch) for epoch in range(3)]
    assert sorted(every) == sorted(expected)

    client = MlflowClient(cfg["tracking_uri"])
    run = client.search_runs([client.get_experiment_by_name("runs").experiment_id],
                             f"tags.`orchestrator.run_id` = '{run_id}'")[0]
    history = client.get_metric_history(run.info.run_id, "metrics/accuracy_top1")
    assert sorted(p.step for p in history) == [0, 1, 2]
    assert run.info.status == "FINISHED"


def test_worker_killed_after_the_last_epoch_restarts_into_the_final_evaluation(ray_session, tmp_path):
    """Ray Train restarts from the last epoch's checkpoint: no epoch trains again, the final
    evaluation of best.pt runs and the run completes (not "already trained")."""
    marker = tmp_path / "killed"

    def kill_in_final_eval(trainer):
        if trainer.final_eval and not marker.exists():
            marker.write_text("x")
            wait_for_registered_checkpoint(cfg["storage"], trainer.args.name, epoch=trainer.epoch - 1)  # the last epoch's
            os.kill(os.getpid(), signal.SIGKILL)

    cfg = run_cfg(tmp_path, "lastkill", num_workers=1, max_failures=1)
    model = Model("cls-n.yaml")
    model.add_callback("on_fit_epoch_end", kill_in_final_eval)
    metrics = model.train(**cfg)
    assert marker.exists() and metrics["metrics/accuracy_top1"] >= 0.0

    run_id = read_run_id(cfg, "lastkill")
    table = read_event_log(cfg["storage"], run_id).to_pylist()
    starts = [r["attempt"] for r in table if r["event"] == "on_train_start"]
    assert len(starts) == 2  # the first attempt and the restarted one
    trained = sorted(r["epoch"] for r in table if r["event"] == "on_train_epoch_end")
    assert trained == [0, 1]  # no epoch trained again
    final = [r for r in table if r["event"] == "on_fit_epoch_end" and r["final_eval"] and r["attempt"] == starts[1]]
    assert [r["epoch"] for r in final] == [2] and [r["attempt"] for r in table if r["event"] == "on_train_end"] == \
        [starts[1]]

    client = MlflowClient(cfg["tracking_uri"])
    run = client.search_runs([client.get_experiment_by_name("runs").experiment_id],
                             f"tags.`orchestrator.run_id` = '{run_id}'")[0]
    assert run.info.status == "FINISHED" and "final/metrics/accuracy_top1" in run.data.metrics


def test_a_stop_on_one_rank_stops_all_and_a_kill_in_the_final_evaluation_restarts_into_it(ray_session, tmp_path):
    """Rank 1 alone stops the run after epoch 0 (of 5): both ranks leave; rank 0 is killed in the
    final evaluation. The checkpoint records the collective stop, so the restart trains no further
    epoch; its final evaluation on the two ranks equals one process's validation of best.pt."""
    marker = tmp_path / "killed"

    def stop_on_rank_1(trainer):
        if trainer.rank == 1 and not trainer.final_eval:
            trainer.stop = True

    def kill_in_final_eval(trainer):
        if trainer.final_eval and trainer.rank == 0 and not marker.exists():
            marker.write_text("x")
            wait_for_registered_checkpoint(cfg["storage"], trainer.args.name, epoch=0)
            os.kill(os.getpid(), signal.SIGKILL)

    cfg = run_cfg(tmp_path, "stopkill", num_workers=2, max_failures=1, epochs=5)
    model = Model("cls-n.yaml")
    model.add_callback("on_fit_epoch_end", stop_on_rank_1)
    model.add_callback("on_fit_epoch_end", kill_in_final_eval)
    ray_metrics = model.train(**cfg)
    assert marker.exists()

    table = read_event_log(cfg["storage"], read_run_id(cfg, "stopkill")).to_pylist()
    restarted = {}  # rank -> attempt of its restarted worker (attempts are per worker, growing)
    for r in table:
        if r["event"] == "on_train_start":
            restarted.setdefault(r["rank"], []).append(r["attempt"])
    assert {rank: len(a) for rank, a in restarted.items()} == {0: 2, 1: 2}
    trained = sorted((r["rank"], r["epoch"]) for r in table if r["event"] == "on_train_epoch_end")
    assert trained == [(0, 0), (1, 0)]  # no epoch after the stop
    final = [(r["rank"], r["epoch"]) for r in table if r["event"] == "on_fit_epoch_end" and r["final_eval"]
             and r["attempt"] == max(restarted[r["rank"]])]
    assert sorted(final) == [(0, 1), (1, 1)]
    assert torch.load(model.ckpt_path, weights_only=True)["epoch"] == 0

    local = Model(str(model.ckpt_path)).val(data="digits", imgsz=16, batch=32)
    for key in ("metrics/accuracy_top1", "metrics/accuracy_top5"):
        assert abs(ray_metrics[key] - local[key]) < 1e-6, (key, ray_metrics[key], local[key])
    # train() on Ray returns the metrics object of the final evaluation, rebuilt from its record (SPEC §6)
    assert type(ray_metrics) is type(local) and ray_metrics.top1 == ray_metrics["metrics/accuracy_top1"]
    assert ray_metrics.top5 == pytest.approx(local.top5, abs=1e-6) and ray_metrics.fitness == ray_metrics["fitness"]


def test_callback_actor_killed_mid_run_loses_nothing(ray_session, tmp_path):
    import ray

    sink_file, killed = tmp_path / "driver.jsonl", tmp_path / "killed"
    # earlier runs' actors may still be listed while they exit: only this run's is killed
    earlier = {entry["name"] for entry in ray.util.list_named_actors(all_namespaces=True)}

    def kill_actor(trainer):
        import ray

        if trainer.epoch == 0 and trainer.rank == 0:
            wait_for_mlflow_run(trainer.args.tracking_uri, "actorkill")
            for entry in ray.util.list_named_actors(all_namespaces=True):
                if entry["name"].startswith("callbacks-") and entry["name"] not in earlier:
                    ray.kill(ray.get_actor(entry["name"], namespace=entry["namespace"]), no_restart=False)
                    killed.write_text(entry["name"])

    def append(record):
        with open(sink_file, "a") as f:
            f.write(json.dumps({k: record[k] for k in ("rank", "attempt", "seq", "event", "epoch")}) + "\n")

    model = Model("cls-n.yaml")
    model.add_callback("on_train_epoch_end", kill_actor)
    for event in ("on_train_batch_end", "on_fit_epoch_end", "teardown"):
        model.add_callback(event, append, where="driver")
    model.train(**run_cfg(tmp_path, "actorkill", num_workers=2))
    assert killed.exists()
    rows = lines(sink_file)
    assert len({(r["rank"], r["attempt"]) for r in rows}) == 2  # one worker group: one attempt per rank
    batches = {}
    for r in rows:
        if r["event"] == "on_train_batch_end":
            batches.setdefault(r["rank"], set()).add(r["seq"])
    per_rank_batches = 2 * -(-72 // 8)  # 2 epochs x ceil(143 images / 2 ranks / batch 8)
    assert {rank: len(seqs) for rank, seqs in batches.items()} == {0: per_rank_batches, 1: per_rank_batches}
    ends = {(r["rank"], r["epoch"]) for r in rows if r["event"] == "on_fit_epoch_end"}
    assert {(rank, e) for rank in (0, 1) for e in range(2)} <= ends
    assert {r["rank"] for r in rows if r["event"] == "teardown"} == {0, 1}
    # the restarted actor's MLflow sink found the run its first life created: one run, finished
    client = MlflowClient(run_cfg(tmp_path, "actorkill")["tracking_uri"])
    runs = client.search_runs([client.get_experiment_by_name("runs").experiment_id], "attributes.run_name = 'actorkill'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"


def read_run_id(cfg, name) -> str:
    client = MlflowClient(cfg["tracking_uri"])
    exp = client.get_experiment_by_name("runs")
    run = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == name][0]
    return run.data.tags["orchestrator.run_id"]

"""Run a sweep on Ray Tune: build the Tuner (or restore it), run it, write the results."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from ray import tune

from trainers.registry import new_registry
from orchestrator.capacity import alive_nodes, check_room, per_worker, room
from orchestrator.ray_launch import connect_ray, storage_for
from orchestrator.run_setup import experiment_name, new_run_id, pinned_endpoints
from orchestrator.session import run_events
from sweeps import champion, parent, report
from sweeps.state import SweepState, register, unregister
from sweeps.tune_callbacks import FatalStopper, SweepTracker
from sweeps.config import SweepConfig, build_sweep
from sweeps.space import param_space, pbt_mutations
from sweeps.trial import TrialSetup, run_trial
from trainers.engine.paths import increment_path, project_dir
from trainers.utils import LOGGER, UserError

METRIC = "objective"
TRIAL_DRIVER_CPU = 0.01  # a trial only drives its Train run; its workers hold the real CPUs


@dataclass
class SweepResult:
    """What ``model.tune`` returns (the same files are in ``path``)."""

    path: Path
    status: str
    best_trial: str | None
    best_objective: float | None
    best_config: dict = field(default_factory=dict)
    best_checkpoint: str | None = None
    trials: Any = None  # pandas DataFrame, one row per trial
    parent_run_id: str | None = None
    champion_model_id: str | None = None  # the best trial's MLflow logged model, registered @champion
    summary: str = ""


# ------------------------------------------------------------------------------- setup
def sweep_folder(sweep: SweepConfig, base_args) -> Path:
    """``<project>/<sweep name>`` (numbered like runs); on resume the existing one."""
    project = project_dir(base_args).resolve()
    resume = sweep.settings.resume
    if resume is True:
        candidates = sorted((p for p in project.glob(f"{sweep.name}*") if (p / parent.STATE_FILE).is_file()),
                            key=lambda p: (p / parent.STATE_FILE).stat().st_mtime)
        if not candidates:
            raise UserError(f"resume: no sweep named '{sweep.name}' to resume in {project}")
        return candidates[-1]
    if resume:
        folder = Path(str(resume)).resolve()
        parent.load_state(folder)
        return folder
    return increment_path(project / sweep.name, exist_ok=False)


def as_started(folder: Path, sweep: SweepConfig, base: dict) -> tuple[SweepConfig, dict]:
    """A resumed sweep goes on as it was started, as Tune restores its trials, search and
    scheduler: its settings, space and base come from the sweep's state. What the call gives
    differently is not applied, and one warning says which (trials trained on with other epochs
    than their scheduler's were stopped, and their child runs ended KILLED)."""
    started = parent.load_state(folder).get("started")
    if started is None:  # a sweep started before its state kept this: the call's, as given
        return sweep, base
    now = sweep.described(base)
    changed = [f"{key}={now[part].get(key)!r} (started with {started[part].get(key)!r})"
               for part in ("sweep", "space", "base") for key in sorted({*now[part], *started[part]})
               if now[part].get(key) != started[part].get(key)]
    if changed:
        LOGGER.warning(f"resume: sweep {folder.name} goes on as it was started; not applied: {', '.join(changed)}")
    again = build_sweep({**started["sweep"], "base": started["base"], "space": started["space"]},
                        {"resume": sweep.settings.resume}, origin=sweep.origin)
    return again, started["base"]


def resolved_base(sweep: SweepConfig, task: str | None) -> dict:
    """Base overrides with absolute URIs/paths: trials run in other processes and folders."""
    from trainers.config import get_cfg

    base = dict(sweep.base)
    if task and not base.get("task"):
        base["task"] = task
    args = get_cfg(None, base)
    base.update(pinned_endpoints(args))
    if args.data and Path(str(args.data)).exists():
        base["data"] = str(Path(str(args.data)).resolve())
    if args.model and Path(str(args.model)).exists():
        base["model"] = str(Path(str(args.model)).resolve())
    return base


def scheduler(sweep: SweepConfig, epochs: int):
    options = dict(sweep.scheduler_options)
    if sweep.scheduler == "asha":
        # max_t past the last epoch: a trial that got that far ends by itself (final evaluation,
        # best.pt upload) instead of being stopped at its last report.
        return tune.schedulers.ASHAScheduler(time_attr="training_iteration", max_t=options["max_t"] or epochs + 1,
                                             grace_period=options["grace_period"],
                                             reduction_factor=options["reduction_factor"],
                                             brackets=options["brackets"])
    if sweep.scheduler == "pbt":
        return tune.schedulers.PopulationBasedTraining(
            time_attr="training_iteration", perturbation_interval=options["perturbation_interval"],
            burn_in_period=options["burn_in_period"], quantile_fraction=options["quantile_fraction"],
            resample_probability=options["resample_probability"], synch=options["synch"],
            hyperparam_mutations=pbt_mutations(sweep.space, options["mutate"]))
    return None


def search_alg(sweep: SweepConfig, concurrency: int):
    if sweep.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=sweep.seed)  # Tune limits its concurrency (max_concurrent_trials)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=sweep.seed, max_concurrent=concurrency)


def default_concurrency(workers: int, use_gpu: bool, resources: dict | None) -> int:
    """How many trials' Train workers fit in the cluster at once."""
    return max(1, room(per_worker(use_gpu, resources), alive_nodes()) // workers)


# ------------------------------------------------------------------------------- run
def run_sweep(sweep: SweepConfig, trainer_cls, callbacks: dict | None = None, driver_callbacks=(),
              task: str | None = None, echo=print) -> SweepResult:
    """Run (or resume) a validated sweep; writes best.yaml, trials.csv/.parquet, the plot."""
    base = resolved_base(sweep, task)
    from trainers.config import get_cfg

    base_args = get_cfg(None, base)
    connect_ray(base_args.journal)
    check_room(sweep.workers_per_trial, per_worker(base_args.use_gpu, base_args.resources_per_worker),
               f"workers_per_trial={sweep.workers_per_trial}")
    from callbacks.sinks import ObjectStore
    from callbacks.sinks.s3 import S3Setup

    ObjectStore.from_uri(base_args.storage, S3Setup.of(base_args)).check()  # unreachable: fails here, in one line
    folder = sweep_folder(sweep, base_args)
    folder.mkdir(parents=True, exist_ok=True)
    resuming = bool(sweep.settings.resume)
    if resuming:
        sweep, base = as_started(folder, sweep, base)
        base_args = get_cfg(None, base)
    experiment = experiment_name(base_args)
    storage_path, filesystem = storage_for(base_args.storage, S3Setup.of(base_args))
    parent_run = open_parent(sweep, base, base_args, folder, experiment, resuming)
    sweep_id = parent_run.sweep_id
    tune_name = f"sweep-{sweep_id}"
    setup = TrialSetup(sweep_id, trainer_cls, callbacks or new_registry(), base, str(folder / "trials"),
                       sweep.workers_per_trial, sweep.objective, run_events(driver_callbacks))
    state = SweepState(sweep_id, parent_run.orch_id, base_args.tracking_uri, experiment, setup,
                       base_args, driver_callbacks)
    register(state)
    echo(f"sweep {folder.name}: {sweep.num_samples} sample(s), scheduler {sweep.scheduler}, "
         f"search {sweep.search}, objective {setup.objective.describe()} ({sweep.mode}); "
         f"MLflow parent run tagged orchestrator.run_id={parent_run.orch_id}")
    status = "FAILED"
    try:
        tuner = make_tuner(sweep, setup, base_args, storage_path, filesystem, tune_name, resuming)
        grid = tuner.fit()
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        interrupted = status == "FINISHED" and state.interrupted is not None
        state.finish_all("KILLED")
        unregister(sweep_id)
        if status != "FINISHED":
            parent_run.close(status)
    return finish(sweep, state, grid, folder, base_args, parent_run, interrupted, echo)


def open_parent(sweep: SweepConfig, base: dict, base_args, folder: Path, experiment: str,
                resuming: bool) -> parent.ParentRun:
    """The sweep's parent run: a new sweep's (its sweep id in the sweep folder's state, its params
    and the sweep file), or the one a resumed sweep continues."""
    if resuming:
        sweep_id = parent.load_state(folder)["sweep_id"]
        return parent.ParentRun(base_args.tracking_uri, experiment, folder.name, sweep_id, base_args.journal)
    sweep_id = new_run_id()[:10]
    sweep_file = folder / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump(sweep.source, sort_keys=False))
    params = sweep.described(base)
    parent.save_state(folder, {"sweep_id": sweep_id, "tune_name": f"sweep-{sweep_id}", "experiment": experiment,
                               "started": params})
    parent_run = parent.ParentRun(base_args.tracking_uri, experiment, folder.name, sweep_id, base_args.journal,
                                  params, parent.sweep_description(sweep, base_args))
    parent_run.send("on_train_start", [sweep_file])
    return parent_run


def make_tuner(sweep: SweepConfig, setup: TrialSetup, base_args, storage_path: str, filesystem,
               tune_name: str, resuming: bool) -> tune.Tuner:
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), {"CPU": TRIAL_DRIVER_CPU})
    experiment_path = f"{storage_path}/{tune_name}"
    # A failed trial gets one line from SweepTracker (its traceback stays in the trial's error file);
    # TUNE_PRINT_ALL_TRIAL_ERRORS=1 brings Tune's traceback back.
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
    quiet_tune()
    if resuming:
        if not tune.Tuner.can_restore(experiment_path, storage_filesystem=filesystem):
            raise UserError(f"resume: no Tune experiment at {experiment_path}")
        return tune.Tuner.restore(experiment_path, trainable, resume_unfinished=True, resume_errored=True,
                                  storage_filesystem=filesystem)
    concurrency = sweep.max_concurrent or default_concurrency(
        sweep.workers_per_trial, base_args.use_gpu, base_args.resources_per_worker)
    tune_config = tune.TuneConfig(
        metric=METRIC, mode=sweep.mode, search_alg=search_alg(sweep, concurrency), scheduler=scheduler(sweep, base_args.epochs),
        num_samples=sweep.num_samples, time_budget_s=sweep.time_budget_s,
        max_concurrent_trials=concurrency if sweep.search == "optuna" else None,  # else in the generator
        trial_dirname_creator=lambda trial: trial.trial_id)
    run_config = tune.RunConfig(
        name=tune_name, storage_path=storage_path, storage_filesystem=filesystem,
        callbacks=[SweepTracker(setup.sweep_id)], stop=FatalStopper(setup.sweep_id),
        verbose=0,  # Tune's periodic status tables: the console has a line per ended trial (SweepTracker)
        failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=sweep.keep_checkpoints,
                                                checkpoint_score_attribute=METRIC,
                                                checkpoint_score_order=sweep.mode))
    return tune.Tuner(trainable, param_space=param_space(sweep.space, sweep.search),
                      tune_config=tune_config, run_config=run_config)


def quiet_tune() -> None:
    """The console of a sweep is its own (a line per ended trial, the table, how to resume): Tune's
    banner, its warning about frequent state snapshots (``keep_checkpoints`` makes one per epoch
    report) and its advice to resume with ``Tuner.restore`` stay off it. Tune's old output engine is
    the one ``verbose=0`` silences; environment variables set before win."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    tune_logger = logging.getLogger("ray.tune.tune")
    if not any(isinstance(f, NoRestoreAdvice) for f in tune_logger.filters):
        tune_logger.addFilter(NoRestoreAdvice())


class NoRestoreAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Tuner.restore(" not in record.getMessage()


def checkpoint_uri(mode: str):
    def uri(result) -> str | None:
        try:
            best = result.get_best_checkpoint(METRIC, mode)
        except Exception:
            best = None
        best = best or result.checkpoint
        if best is None:
            return None
        path = f"{best.path}/last.pt"
        name = type(best.filesystem).__name__ if best.filesystem is not None else ""
        return f"s3://{path}" if name == "S3FileSystem" else path
    return uri


def finish(sweep: SweepConfig, state, grid, folder: Path, base_args, parent_run: parent.ParentRun,
           interrupted: bool, echo) -> SweepResult:
    """Outputs and the parent run's final state; raises for a sweep-wide mistake."""
    table = report.trial_rows(list(grid), state, sweep.space, sweep.mode, checkpoint_uri(sweep.mode))
    files = report.write_tables(table, folder)
    plot = report.parallel_coordinates(table, sweep.space, folder / "parallel_coordinates.png",
                                       state.setup.objective.describe())
    best = report.best_row(table)
    result = SweepResult(path=folder, status="FINISHED", best_trial=None, best_objective=None,
                         trials=table)
    tags, metrics = {}, {}
    if best is not None:
        result.best_trial, result.best_objective = str(best["trial_id"]), float(best["objective"])
        result.best_checkpoint = best["checkpoint"] or None
        configs = {(r.metrics or {}).get("trial_id"): r.config or {} for r in grid}  # by trial id
        result.best_config = report.best_config(base_args, configs.get(best["trial_id"], {}))
        files.append(report.write_best(result.best_config, folder))
        tags = {"best_trial": result.best_trial, "best_checkpoint": result.best_checkpoint or "",
                "best_mlflow_run_id": best["mlflow_run_id"]}
        metrics = {"best_objective": result.best_objective}
        if not (interrupted or state.fatal):
            result.champion_model_id = champion.publish_models(
                table, configs, base_args, parent.sweep_description(sweep, base_args), state.setup, parent_run)
            if result.champion_model_id:  # else recover sets it, once MLflow took the models
                tags[champion.TAG] = result.champion_model_id
    if plot:
        files.append(plot)
    result.summary = report.summary(table, sweep.space, result.best_checkpoint, state.setup.objective.describe())
    echo(result.summary)
    echo(f"results in {folder}")
    if state.fatal:
        result.status = "FAILED"
    elif interrupted:
        result.status = "KILLED"
    elif best is None and len(table):
        result.status = "FAILED"
    result.parent_run_id = parent_run.close(result.status, files=files, metrics=metrics, tags=tags,
                                            reason=state.interrupted if interrupted else None)
    if state.fatal:
        raise UserError(state.fatal)
    if interrupted:
        how = (f"orchestrator sweep {sweep.origin} resume={folder}" if str(sweep.origin).endswith((".yaml", ".yml"))
               else f"tune(..., resume='{folder}')")
        LOGGER.warning(f"sweep interrupted: finished trials are kept; resume the rest with `{how}`")
    elif result.status == "FAILED":
        raise UserError(f"every trial failed; first error: {next(iter(state.errors.values()), 'unknown')}")
    return result

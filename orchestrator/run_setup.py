"""What every training run gets on the driver: an id, a run folder, an MLflow run and its sinks."""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
import uuid
from pathlib import Path

from callbacks.sinks import ObjectStore, create_run, flatten
from callbacks.sinks.factory import run_sinks
from callbacks.sinks.mlflow_runs import RUN_ID_TAG, announce_run, continue_run, probe_tracking_uri
from callbacks.sinks.s3 import S3Setup
from trainers.config import describe_workers, worker_counts
from trainers.engine.paths import project_dir, run_dir
from trainers.utils import LOGGER, UserError


def absolute_uri(uri: str) -> str:
    """Relative SQLite and local store paths made absolute: Ray processes have other cwds."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    if "://" not in uri:
        return str(Path(uri).resolve())
    return uri


def pinned_endpoints(args) -> dict:
    """Where a run's records and files go, as the driver resolved them (absolute paths, the
    environment's values): Ray processes have other working directories and environments."""
    return {"tracking_uri": absolute_uri(args.tracking_uri), "storage": absolute_uri(args.storage),
            "experiment": experiment_name(args), **S3Setup.of(args).as_config()}


# What a resumed run takes from its checkpoint on the driver too, unless given: its folder, its
# length (the console's) and its workers (which backend trains it).
RESUMED_ON_DRIVER = ("project", "name", "epochs", "num_workers", "use_gpu", "resources_per_worker")


def resolve_run(args, given=()) -> dict:
    """Fix the run folder on the driver so every worker (and every restart) writes to the same one.
    ``given``: the keys the user set (a resume keeps the checkpoint's value of the others)."""
    fixed = {"journal": str(check_writable("journal", Path(args.journal).expanduser().resolve()))}
    if args.resume:
        from trainers.engine.resume import check_resumable

        resumed = check_resumable(args, given)
        moved = {k: resumed.get(k) for k in RESUMED_ON_DRIVER}
        at = {**args.to_dict(), **moved, "experiment": args.experiment or resumed.experiment}
        return {**fixed, **pinned_endpoints(type(args)(**at)), **moved}
    fixed.update(pinned_endpoints(args))
    fixed.update(project=str(check_writable("project", project_dir(args).resolve())), name=run_dir(args).name,
                 exist_ok=True)
    if args.data and Path(str(args.data)).exists():
        fixed["data"] = str(Path(str(args.data)).resolve())
    return fixed


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_tags(args) -> dict:
    source = source_tags()
    tags = {"task": args.task, "model": args.model, "world_size": describe_workers(args.num_workers),
            "git_commit": source.get("mlflow.source.git.commit"), "ray_job_id": job_submission_id(),
            "mlflow.note.content": run_description(args)}
    return {**source, **{k: str(v) for k, v in tags.items() if v is not None}}


def source_tags() -> dict:
    """MLflow's own tags for who ran what (the runs table's User and Source columns, the run page's
    git commit), which ``mlflow.start_run`` sets and the client that makes our runs does not. The
    commit is the working directory's, as ``git_commit``: MLflow's git tags describe the repository of
    the program run, here the installed ``orchestrator`` command's, so they are left out."""
    from mlflow.tracking.context.registry import resolve_tags

    tags = {key: value for key, value in resolve_tags().items() if not key.startswith("mlflow.source.git.")}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def job_submission_id() -> str | None:
    """The id ``ray job submit`` printed (``ray job logs <id>``), when this driver runs as a Ray job.

    Ray passes it to the job's driver inside its job config, not as ``RAY_JOB_ID`` (an internal
    flag that Ray strips from a job's environment).
    """
    try:
        config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    except ValueError:
        return None
    return (config.get("metadata") or {}).get("job_submission_id")


def run_description(args) -> str:
    """A few lines of markdown: the run's description in the MLflow UI (``mlflow.note.content``)."""
    if worker_counts(args.num_workers)[1] > 0:
        where = f"{args.num_workers} Ray Train worker(s) on {'GPU' if args.use_gpu else 'CPU'}"
    else:
        where = f"one process (device: {args.device or 'auto'})"
    lines = [f"**{args.task or 'train'}** `{args.model}` on `{args.data}`", "",
             f"- epochs: {args.epochs}, batch: {args.batch} (total), imgsz: {args.imgsz or 'task default'}"
             + (f", fraction: {args.fraction}" if args.fraction < 1 else ""),
             f"- world size: {describe_workers(args.num_workers)} ({where})",
             f"- optimizer: {args.optimizer}, lr0: {args.lr0}"]
    if args.resume:
        lines.append(f"- resumed from `{args.resume}`")
    return "\n".join(lines)


def experiment_name(args) -> str:
    """``experiment`` (given, or $MLFLOW_EXPERIMENT_NAME), else the project folder's name, else the task."""
    if args.experiment:
        return str(args.experiment)
    return Path(args.project).name if args.project else str(args.task or "train")


def start_tracking(args, run_id: str, parent_run_id: str | None = None, defer_run: bool = False) -> list:
    """The run's sinks, its MLflow run created here (so it exists even if training dies).

    With ``defer_run`` (Ray runs) a tracking URI that can be checked without MLflow is only
    checked, and the callback actor's MLflow sink creates the run when the actor starts, while
    the workers start: importing MLflow and setting up its database take seconds of the driver.
    """
    ObjectStore.from_uri(args.storage, S3Setup.of(args)).check()  # an unreachable store fails here, in one line
    tags = {**run_tags(args), RUN_ID_TAG: run_id}
    mlflow_run = None
    if not (defer_run and probe_tracking_uri(args.tracking_uri)):  # unreachable: fails here, in one line
        mlflow_run = open_mlflow_run(args, tags, parent_run_id)
    return run_sinks(args, run_id, experiment=experiment_name(args), tags=tags, mlflow_run=mlflow_run,
                     parent_run_id=parent_run_id)


def open_mlflow_run(args, tags: dict, parent_run_id: str | None) -> str:
    """Create the run now and say where it is; a resumed run continues its MLflow run."""
    if args.resume and (run := continue_run(args.tracking_uri, experiment_name(args), tags[RUN_ID_TAG])):
        return run
    run = create_run(args.tracking_uri, experiment_name(args), args.name, params=flatten(args.to_dict()),
                     tags=tags, parent_run_id=parent_run_id)
    announce_run(run, experiment_name(args), args.tracking_uri)
    return run


def mlflow_run_of(report: dict) -> str | None:
    """The MLflow run id in a dispatcher's final report (the MLflow sink may have created the run)."""
    return next((r.get("run_id") for r in report.get("sinks", {}).values()
                 if isinstance(r, dict) and r.get("sink") == "mlflow"), None)


RUN_ID_FILE = "run_id.txt"  # in the run folder: the run a resume continues


def check_writable(key: str, folder: Path) -> Path:
    """A folder the driver writes (the journal, the run folder), tried before the MLflow run is made:
    found unwritable later, it would fail the run with a traceback and leave that run RUNNING.
    The try leaves nothing behind."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    try:
        tempfile.TemporaryDirectory(dir=existing).cleanup()
    except OSError as exc:
        raise UserError(f"config key '{key}': cannot create or write the folder {folder} "
                        f"({exc.strerror or exc} in {existing})") from None
    return folder


def continued_run_id(args) -> str | None:
    """With ``resume=``, the run id of the run folder being continued (None for a folder written
    before runs kept it): the same MLflow run, event-log partition and run id go on."""
    path = Path(args.project) / args.name / RUN_ID_FILE
    return path.read_text().strip() if args.resume and path.is_file() else None


def remember_run_id(args, run_id: str) -> None:
    folder = Path(args.project) / args.name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RUN_ID_FILE).write_text(run_id + "\n")


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]

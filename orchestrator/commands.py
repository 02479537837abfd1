"""What each CLI mode does, given validated arguments."""
from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

from trainers.utils import LOGGER, UserError


def summary_table(metrics: dict) -> str:
    if not metrics:
        return "(no metrics)"
    width = max(len(k) for k in metrics)
    rows = [f"  {k:<{width}}  {v:.4f}" if isinstance(v, float) else f"  {k:<{width}}  {v}"
            for k, v in metrics.items()]
    return "\n".join(["results:", *rows])


def model_spec(mode: str, args) -> str:
    """The model to build: the given one; when resuming without one, the checkpoint (its task and
    data come with it); else the task's small default."""
    if args.model:
        return args.model
    if mode == "train" and args.resume:
        from trainers.engine.paths import latest_checkpoint

        return str(latest_checkpoint(args) if args.resume is True else args.resume)
    return "cls-n.yaml" if args.task == "classify" else "det-n.yaml"


def where_the_run_is(args, model) -> list[str]:
    """Where to look after a run: its MLflow page when a server tracks it (else the store and how to
    open a UI on it), the object store, and the run folder only where it outlives the job (under
    ``ray job submit`` the working dir is Ray's temporary copy, gone with the job)."""
    from callbacks.sinks.mlflow_runs import run_url
    from callbacks.sinks.redact import redact_text

    lines = []
    folder = model.ckpt_path.parent.parent if model.ckpt_path else None
    if folder is not None and "runtime_resources" not in folder.resolve().parts:
        lines += [f"run folder: {folder}  (results.csv, results.png, args.yaml)",
                  f"checkpoints: {folder / 'weights'}  (best.pt, last.pt)"]
    url = run_url(args.tracking_uri, model.mlflow_run_id) if model.mlflow_run_id else None
    lines.append(f"MLflow run: {url}" if url else
                 f"MLflow store: {redact_text(str(args.tracking_uri))}   (open the UI: orchestrator ui)")
    return lines + [f"object store: {args.storage}  (event log, checkpoints)"]


@contextmanager
def details_shown(verbose: bool):
    """``verbose=False``: the run's INFO lines stay off the console (warnings and the result remain)."""
    level = LOGGER.level
    LOGGER.setLevel(logging.INFO if verbose else logging.WARNING)
    try:
        yield
    finally:
        LOGGER.setLevel(level)


def run_task_mode(mode: str, args, given: dict) -> int:
    from orchestrator.model import Model

    model = Model(model_spec(mode, args), task=args.task)
    kwargs = {k: v for k, v in given.items() if k not in {"model", "mode"}}
    if mode == "train":
        metrics = model.train(**kwargs)
        print("\n".join([summary_table(metrics), *where_the_run_is(args, model)]))
    elif mode == "val":
        print(summary_table({k: v for k, v in model.val(**kwargs).items()}))
        if model.validator.save_dir.is_dir():
            print(f"plots in {model.validator.save_dir}")
    elif mode == "predict":
        kwargs.setdefault("save", True)
        n = 0
        for result in model.predict(stream=True, **kwargs):
            n += 1
            LOGGER.info(f"{result.path}: {result.verbose()}")
        folder = model.predictor.save_dir
        print(f"{n} image(s) predicted" + (f"; annotated images in {folder}" if folder.is_dir() else ""))
    elif mode == "export":
        with details_shown(False):  # the exporter's own line would name the file the result names
            path = model.export(**kwargs)
        print(f"exported: {path}")
    return 0


def run_data(argv: list[str]) -> int:
    from trainers.config import parse_overrides

    if not argv or argv[0] != "shapes":
        raise UserError("usage: orchestrator data shapes out=datasets/shapes8 [seed=0 n_train=480 n_val=120 imgsz=96]")
    from trainers.data.shapes import generate_shapes

    opts = parse_overrides(argv[1:])
    allowed = {"out", "seed", "n_train", "n_val", "imgsz", "overwrite"}
    for key in opts:
        if key not in allowed:
            raise UserError(f"unknown option '{key}' for data shapes; valid: {', '.join(sorted(allowed))}")
    out = opts.pop("out", "datasets/shapes8")
    print(f"dataset written: {generate_shapes(out, **opts)}")
    return 0


def ui_store_problem(uri: str) -> str | None:
    """Why ``mlflow ui`` cannot open the store ``uri``, or None (also when unsure): it would die with
    a long traceback instead, for a scheme it has no store for or a database driver not installed."""
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else "file"
    if scheme == "file":
        return None
    if scheme.split("+", 1)[0] not in ("sqlite", "postgresql", "mysql", "mssql"):
        return f"ui: '{scheme}://' is not a store mlflow ui can open (sqlite, postgresql, mysql, mssql or a folder)"
    try:
        from sqlalchemy.engine import make_url

        make_url(uri).get_dialect().import_dbapi()
    except ImportError as exc:
        return f"ui: the database driver for '{scheme}://' is not installed ({exc.name or exc})"
    except Exception:
        return None  # let mlflow itself judge the URI
    return None


def run_ui(opts: dict) -> int:
    """``mlflow ui`` on the embedded store (127.0.0.1), from this environment's mlflow."""
    import os
    import shutil
    import socket
    import subprocess
    import sys

    from callbacks.sinks.redact import redact_text
    from trainers.config import defaults

    for key in opts:
        if key not in ("port", "tracking_uri"):
            raise UserError(f"unknown option '{key}' for ui; valid: port, tracking_uri")
    uri = str(opts.get("tracking_uri", defaults()["tracking_uri"]))  # else $MLFLOW_TRACKING_URI, as for a run
    port = opts.get("port", 5000)
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise UserError(f"ui: port={port!r} is not a port number (1-65535)")
    shown = redact_text(uri)  # the URI may carry a password (user info)
    if uri.startswith(("http://", "https://")):
        print(f"{shown} is an MLflow server: it serves the UI itself, open {shown}")
        return 0
    problem = ui_store_problem(uri)
    if problem:
        raise UserError(problem)
    with socket.socket() as sock:
        if sock.connect_ex(("127.0.0.1", port)) == 0:
            raise UserError(f"ui: port {port} on 127.0.0.1 is in use; choose another with port=...")
    local = Path(sys.executable).parent / "mlflow"
    mlflow = str(local) if local.is_file() else shutil.which("mlflow")
    if not mlflow:
        raise UserError("ui: the 'mlflow' command is not installed in this environment")
    # no job-runner processes; no line per request the UI makes, nor its libraries' deprecation notes
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore:starlette.middleware.wsgi is deprecated"}
    print(f"MLflow UI for {shown} at http://127.0.0.1:{port}  (Ctrl-C to stop)", flush=True)
    return subprocess.call([mlflow, "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
                            "--port", str(port), "--workers", "1", "--uvicorn-opts", "--log-level warning"], env=env)


def run_events(argv: list[str]) -> int:
    from trainers.config import DEFAULTS, parse_overrides

    if not argv or argv[0] != "replay":
        raise UserError("usage: orchestrator events replay run=<run id> tracking_uri=<uri> [storage=<uri>] "
                        "[log_every_n_steps=<n>]")
    opts = parse_overrides(argv[1:])
    if "run" not in opts or "tracking_uri" not in opts:
        raise UserError("events replay needs run=<run id> and tracking_uri=<uri>")
    every = opts.get("log_every_n_steps", DEFAULTS["log_every_n_steps"])  # as the original run logged
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise UserError(f"events replay: log_every_n_steps={every!r} must be an int >= 1")
    from callbacks.sinks.replay import replay_run

    new_id = replay_run(opts.get("storage", DEFAULTS["storage"]), str(opts["run"]), opts["tracking_uri"],
                        experiment=opts.get("experiment", "replay"), log_every_n_steps=every)
    print(f"replayed run {opts['run']} into {opts['tracking_uri']} as run {new_id}")
    return 0


def run_recover(options: dict) -> int:
    """``orchestrator recover [journal=<folder>]``: one line per run taken over."""
    from trainers.config import DEFAULTS
    from orchestrator.recovery import recover

    unknown = set(options) - {"journal"}
    if unknown:
        raise UserError(f"recover: unknown option {sorted(unknown)[0]!r}; usage: orchestrator recover [journal=runs/journal]")
    root = options.get("journal") or DEFAULTS["journal"]
    if options.get("journal") and not Path(root).expanduser().is_dir():  # the default may not exist yet
        what = "is not a folder" if Path(root).expanduser().exists() else "does not exist"
        raise UserError(f"recover: journal folder {root} {what}")
    print("\n".join(recover(root)) or f"nothing to recover: every run under {root} ended and was delivered")
    return 0

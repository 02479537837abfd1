"""``orchestrator stack up|down|status|env [key=value ...]``: a local cluster-like stack.

Three servers on 127.0.0.1, started detached so they outlive the command:
- ``s3``: moto's S3 server, with a bucket for checkpoints and the event log (``storage``). moto
  keeps objects in memory only: the bucket is empty again after ``down``/``up``;
- ``mlflow``: ``mlflow server`` (SQLite store under ``runs/stack/``) serving the runs' artifacts
  from ``runs/stack/mlartifacts/``: on disk, so runs and their artifacts (metrics, plots,
  ``best.pt``, the event log's copy) survive ``down``/``up`` and a crash of any server;
- ``ray``: a Ray head with token auth (token file under ``runs/stack/``) and the dashboard /
  job API, started with the S3 settings and ``MLFLOW_TRACKING_URI`` so jobs (``ray job submit``)
  and actors reach the bucket and the MLflow server without passing them.
Logs, pid files, ``stack.json`` (ports, pids), ``env.sh`` and ``stack.yaml`` live in
``runs/stack/``. ``up`` leaves healthy servers alone; ``down`` stops what ``up`` started.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

from infra.local import procs
from trainers.utils import UserError

USAGE = "usage: orchestrator stack up|down|status|env [key=value ...]   (up options: {})"
DEFAULTS = {
    "mlflow_port": 5000,     # MLflow tracking server + UI
    "s3_port": 9000,         # moto S3 endpoint
    "ray_port": 6379,        # Ray GCS (RAY_ADDRESS)
    "dashboard_port": 8265,  # Ray dashboard and job API (ray job submit)
    "bucket": "orchestrator",
    "mlflow_workers": 2,     # uvicorn worker processes of the MLflow server
    "num_cpus": 0,           # CPUs the Ray head offers; 0 = all
    "timeout": 120,          # seconds to wait for each server to become healthy
}
PORT_KEYS = ("mlflow_port", "s3_port", "ray_port", "dashboard_port")
# moto accepts any credentials; these are the conventional placeholders, not secrets.
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                  "AWS_DEFAULT_REGION": "us-east-1"}
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


def executable(name: str, package: str) -> str:
    """A console script of this environment (next to the interpreter), else from PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file():
        return str(local)
    found = shutil.which(name)
    if found:
        return found
    raise UserError(f"stack: '{name}' not found next to {sys.executable} or on PATH; install {package}")


# ---------------------------------------------------------------------------------- config
def check_config(cfg: dict) -> dict:
    """Types and ranges of the ``up`` options; returns the config with ints where expected."""
    for key in PORT_KEYS + ("mlflow_workers", "num_cpus", "timeout"):
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"stack: {key} must be an integer, got {value!r}")
    for key in PORT_KEYS:
        if not 1 <= cfg[key] <= 65535:
            raise UserError(f"stack: {key}={cfg[key]} is not a port number (1-65535)")
    ports = [cfg[k] for k in PORT_KEYS]
    for key in PORT_KEYS:
        if ports.count(cfg[key]) > 1:
            raise UserError(f"stack: {key}={cfg[key]} is used twice; each server needs its own port")
    for key, low in (("mlflow_workers", 1), ("num_cpus", 0), ("timeout", 1)):
        if cfg[key] < low:
            raise UserError(f"stack: {key}={cfg[key]} must be at least {low}")
    if not isinstance(cfg["bucket"], str) or not _BUCKET.match(cfg["bucket"]):
        raise UserError(f"stack: bucket={cfg['bucket']!r} is not a valid S3 bucket name "
                        f"(3-63 characters: a-z, 0-9, '.', '-')")
    return cfg


def check_keys(opts: dict, allowed) -> None:
    for key in opts:
        if key not in allowed:
            close = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid: {', '.join(allowed) or 'none'}"
            raise UserError(f"stack: unknown option '{key}'{hint}")


# ---------------------------------------------------------------------------------- stack state
class Stack:
    """The stack folder (``runs/stack`` under the working directory) and what ``stack.json`` says."""

    def __init__(self, root: Path | None = None):
        self.root = (root or Path.cwd() / "runs" / "stack").resolve()
        self.state_file = self.root / "stack.json"
        state = json.loads(self.state_file.read_text()) if self.state_file.is_file() else {}
        self.cfg = {**DEFAULTS, **state.get("config", {})}
        self.pids: dict[str, dict] = state.get("pids", {})
        self.ray: dict = state.get("ray", {})

    def save(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        data = {"config": self.cfg, "pids": self.pids, "ray": self.ray}
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(self.state_file)

    # urls and paths
    def url(self, key: str) -> str:
        return f"http://{procs.HOST}:{self.cfg[key]}"

    @property
    def storage(self) -> str:
        return f"s3://{self.cfg['bucket']}/runs"

    @property
    def token_path(self) -> Path:
        return self.root / "ray_auth_token"

    def log(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def s3_client_env(self) -> dict:
        return {"AWS_ENDPOINT_URL": self.url("s3_port"), **S3_CREDENTIALS}

    def exports(self) -> dict:
        """What a shell needs to use the stack (no secret values: the Ray token stays in its file)."""
        return {"MLFLOW_TRACKING_URI": self.url("mlflow_port"), **self.s3_client_env(),
                "RAY_ADDRESS": f"{procs.HOST}:{self.cfg['ray_port']}",
                "RAY_API_SERVER_ADDRESS": self.url("dashboard_port"),
                "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path)}

    # processes
    def running(self, name: str) -> bool:
        entry = self.pids.get(name)
        return bool(entry) and procs.alive(entry["pid"], entry.get("started"))

    def record(self, name: str, pid: int, started: str | None) -> None:
        self.pids[name] = {"pid": pid, "started": started, "config": {k: self.cfg[k] for k in SERVICES[name].keys}}
        (self.root / f"{name}.pid").write_text(f"{pid}\n")
        self.save()

    def forget(self, name: str) -> None:
        self.pids.pop(name, None)
        (self.root / f"{name}.pid").unlink(missing_ok=True)
        self.save()


def base_env() -> dict:
    """This environment without settings that would point our servers elsewhere."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    for key in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_API_SERVER_ADDRESS"):
        env.pop(key, None)
    return env


# ---------------------------------------------------------------------------------- services
class Service:
    """One server of the stack: how to start it, what it listens on, how to tell it is healthy."""

    name = ""
    keys: tuple[str, ...] = ()     # config keys the running server depends on
    listens: tuple[str, ...] = ()  # config keys of the ports it binds
    leader_only = False          # stop by signalling the leader only (it stops its children)
    stopped_note = ""            # what `down` adds to the server's line

    def __init__(self, stack: Stack):
        self.stack, self.cfg = stack, stack.cfg

    def ports(self) -> dict[str, int]:
        return {k: self.cfg[k] for k in self.listens}

    def prepare(self) -> None:
        """Work done before the process starts (files, database)."""

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict:
        return base_env()

    def healthy(self) -> bool:
        raise NotImplementedError

    def where(self) -> str:
        raise NotImplementedError


class S3Service(Service):
    name, keys, listens = "s3", ("s3_port",), ("s3_port",)
    stopped_note = "; its bucket was in memory (MLflow's runs and artifacts stay on disk)"

    def command(self):
        return [executable("moto_server", "moto[server]"), "-H", procs.HOST, "-p", str(self.cfg["s3_port"])]

    def env(self):
        return {**base_env(), "S3_IGNORE_SUBDOMAIN_BUCKETNAME": "true"}

    def healthy(self):
        return procs.http_ok(self.stack.url("s3_port") + "/moto-api/")

    def where(self):
        return f"{self.stack.url('s3_port')}  bucket s3://{self.cfg['bucket']}"


class MlflowService(Service):
    name, keys, listens = "mlflow", ("mlflow_port", "mlflow_workers"), ("mlflow_port",)

    @property
    def backend_uri(self) -> str:
        return f"sqlite:///{self.stack.root / 'mlflow.db'}"

    @property
    def artifacts(self) -> Path:
        """The artifact root: a folder beside the database, so both outlive the servers (moto's
        S3 keeps nothing across a restart). Clients never see it: the server proxies artifacts."""
        return self.stack.root / "mlartifacts"

    def prepare(self):
        """Create the database schema once, so the server's workers never race its migrations."""
        if (self.stack.root / "mlflow.db").exists():
            return
        import logging

        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        quiet = [logging.getLogger(name) for name in ("mlflow", "alembic")]
        levels = [logger.level for logger in quiet]
        for logger in quiet:
            logger.setLevel(logging.WARNING)  # migration chatter is not for the terminal
        try:
            SqlAlchemyStore(self.backend_uri, "mlflow-artifacts:/").engine.dispose()
        finally:
            for logger, level in zip(quiet, levels):
                logger.setLevel(level)

    def command(self):
        return [executable("mlflow", "mlflow"), "server", "--host", procs.HOST,
                "--port", str(self.cfg["mlflow_port"]), "--workers", str(self.cfg["mlflow_workers"]),
                "--backend-store-uri", self.backend_uri,
                "--artifacts-destination", str(self.artifacts), "--serve-artifacts"]

    def env(self):
        return {**base_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}

    def healthy(self):
        return procs.http_ok(self.stack.url("mlflow_port") + "/health")

    def where(self):
        return f"{self.stack.url('mlflow_port')}  artifacts {self.artifacts}"


class RayService(Service):
    name, keys = "ray", ("ray_port", "dashboard_port", "num_cpus", "s3_port", "mlflow_port")
    listens = ("ray_port", "dashboard_port")
    leader_only = True  # `ray start --block` shuts its node down on SIGTERM

    def prepare(self):
        """Token file (once), fresh ports for the node's fixed-default listeners, a short temp dir.

        The temp dir is ours (not /tmp/ray), so a plain ``ray.init()`` elsewhere on this machine
        never attaches to the stack, and Ray's socket paths stay short.
        """
        if not self.stack.token_path.is_file():
            fd = os.open(self.stack.token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32))
        digest = hashlib.sha1(str(self.stack.root).encode()).hexdigest()[:10]
        self.stack.ray = {"temp_dir": str(Path(tempfile.gettempdir()) / f"ray-stack-{digest}"),
                          "agent_port": procs.free_port(), "client_port": procs.free_port()}
        self.stack.save()

    def command(self):
        ray = self.stack.ray
        cmd = [executable("ray", "ray[default]"), "start", "--head", "--block",
               "--node-ip-address", procs.HOST, "--port", str(self.cfg["ray_port"]),
               "--dashboard-host", procs.HOST, "--dashboard-port", str(self.cfg["dashboard_port"]),
               "--include-dashboard", "true", "--dashboard-agent-listen-port", str(ray["agent_port"]),
               "--ray-client-server-port", str(ray["client_port"]), "--temp-dir", ray["temp_dir"],
               "--disable-usage-stats"]
        if self.cfg["num_cpus"]:
            cmd += ["--num-cpus", str(self.cfg["num_cpus"])]
        return cmd

    def env(self):
        return {**base_env(), **self.stack.s3_client_env(), "MLFLOW_TRACKING_URI": self.stack.url("mlflow_port"),
                "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN_PATH": str(self.stack.token_path),
                "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "5"}  # `down` need not wait for a long drain

    def healthy(self):
        ray = self.stack.ray
        return (procs.port_open(self.cfg["ray_port"]) and bool(ray.get("agent_port"))
                and procs.port_open(ray["agent_port"])
                and procs.http_ok(self.stack.url("dashboard_port") + "/api/gcs_healthz"))

    def where(self):
        return f"{procs.HOST}:{self.cfg['ray_port']}  dashboard {self.stack.url('dashboard_port')}"


SERVICES = {cls.name: cls for cls in (S3Service, MlflowService, RayService)}


# ---------------------------------------------------------------------------------- bucket
def s3_client(stack: Stack):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=stack.url("s3_port"), region_name=S3_CREDENTIALS["AWS_DEFAULT_REGION"],
                        aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                        config=Config(retries={"mode": "standard", "max_attempts": 3}, connect_timeout=3,
                                      read_timeout=10))


def bucket_exists(stack: Stack) -> bool:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        s3_client(stack).head_bucket(Bucket=stack.cfg["bucket"])
        return True
    except (ClientError, BotoCoreError):
        return False


def ensure_bucket(stack: Stack) -> None:
    """moto keeps buckets in memory: (re)create ours whenever ``up`` runs (empty after a restart)."""
    if not bucket_exists(stack):
        s3_client(stack).create_bucket(Bucket=stack.cfg["bucket"])


# ---------------------------------------------------------------------------------- up / down / status
def _last_line(log: Path) -> str:
    try:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1].strip()[:200] if lines else ""


def wait_healthy(stack: Stack, service: Service, timeout: float) -> None:
    entry = stack.pids[service.name]
    end = time.monotonic() + timeout
    while not service.healthy():
        if not procs.alive(entry["pid"], entry.get("started")):
            raise UserError(f"stack: {service.name} exited during start-up ({_last_line(stack.log(service.name))}); "
                            f"see {stack.log(service.name)}")
        if time.monotonic() > end:
            raise UserError(f"stack: {service.name} not healthy after {timeout:.0f}s; see {stack.log(service.name)}")
        time.sleep(0.25)


def check_running_config(stack: Stack, name: str, cfg: dict) -> None:
    old = stack.pids[name].get("config", {})
    for key in SERVICES[name].keys:
        if key in old and old[key] != cfg[key]:
            raise UserError(f"stack: {name} is running with {key}={old[key]}; run 'orchestrator stack down' "
                            f"before changing it to {cfg[key]}")


def check_ports_free(service: Service) -> None:
    for key, port in service.ports().items():
        if procs.port_open(port):
            raise UserError(f"stack: {key}={port}: {procs.HOST}:{port} is already in use by another process; "
                            f"choose another ({key}=...)")


def up(opts: dict) -> int:
    check_keys(opts, DEFAULTS)
    stack = Stack()
    cfg = check_config({**stack.cfg, **opts})
    running = {name for name in SERVICES if stack.running(name)}
    for name in running:
        check_running_config(stack, name, cfg)
    stack.cfg.update(cfg)
    services = [SERVICES[name](stack) for name in SERVICES if name not in running]
    for service in services:
        check_ports_free(service)
    stack.save()
    started: list[Service] = []
    try:
        for service in sorted(services, key=lambda s: s.name != "ray"):  # the slowest first
            service.prepare()
            pid, start = procs.spawn(service.command(), stack.log(service.name), service.env(), stack.root)
            stack.record(service.name, pid, start)
            started.append(service)
        for service in services:
            wait_healthy(stack, service, cfg["timeout"])
        ensure_bucket(stack)
    except BaseException:
        for service in reversed(started):
            stop_service(stack, service.name)
        raise
    write_env_files(stack)
    for name in SERVICES:
        print(f"{name}: {'already running' if name in running else 'started'}")
    print_status(stack)
    print()
    print(env_text(stack))
    return 0


def stop_service(stack: Stack, name: str) -> bool:
    entry = stack.pids.get(name)
    if not entry:
        return True
    service = SERVICES[name](stack)
    gone = procs.stop(entry["pid"], entry.get("started"), leader_only=service.leader_only)
    if gone:
        stack.forget(name)
        if name == "ray" and stack.ray.get("temp_dir"):
            shutil.rmtree(stack.ray["temp_dir"], ignore_errors=True)
    return gone


def down(opts: dict) -> int:
    check_keys(opts, {})
    stack = Stack()
    failed = []
    for name in reversed(list(SERVICES)):
        entry = stack.pids.get(name)
        if not entry:
            print(f"{name}: not running")
            continue
        if stop_service(stack, name):
            print(f"{name}: stopped (pid {entry['pid']}){SERVICES[name].stopped_note}")
        else:
            failed.append(name)
            print(f"{name}: could not be stopped (pid {entry['pid']})", file=sys.stderr)
    return 1 if failed else 0


def service_state(stack: Stack, service: Service) -> str:
    if stack.running(service.name):
        return "up" if service.healthy() else "unhealthy"
    busy = [f"{k}={p}" for k, p in service.ports().items() if procs.port_open(p)]
    return f"down (port {', '.join(busy)} used by another process)" if busy else "down"


def print_status(stack: Stack) -> bool:
    """One line per server; True when all are up."""
    all_up = True
    print(f"stack in {stack.root}:")
    for name, cls in SERVICES.items():
        service = cls(stack)
        state = service_state(stack, service)
        if state == "up" and name == "s3" and not bucket_exists(stack):
            state = "up (bucket missing: run 'orchestrator stack up')"
        all_up &= state == "up"
        pid = stack.pids.get(name, {}).get("pid")
        print(f"  {name:<7}{state:<11}{service.where()}" + (f"  pid {pid}" if pid and state != "down" else "")
              + f"  log {stack.log(name)}")
    return all_up


def status(opts: dict) -> int:
    check_keys(opts, {})
    return 0 if print_status(Stack()) else 1


def env_text(stack: Stack) -> str:
    lines = [f"# local stack in {stack.root}: source this, then train against it (MLflow and S3 come",
             "# from these variables), e.g.",
             f"#   orchestrator train model=cls-n.yaml data=digits num_workers=2 storage={stack.storage}",
             f"#   (or cfg={stack.root / 'stack.yaml'});  ray job submit --working-dir . -- python -m orchestrator ..."]
    lines += [f"export {key}={value}" for key, value in stack.exports().items()]
    return "\n".join(lines)


def write_env_files(stack: Stack) -> None:
    (stack.root / "env.sh").write_text(env_text(stack) + "\n")
    (stack.root / "stack.yaml").write_text(f"tracking_uri: {stack.url('mlflow_port')}\nstorage: {stack.storage}\n"
                                           f"s3_endpoint: {stack.url('s3_port')}\n")


def env(opts: dict) -> int:
    check_keys(opts, {})
    stack = Stack()
    if not all(stack.running(name) for name in SERVICES):
        print("# warning: the stack is not (fully) running; start it with: orchestrator stack up", file=sys.stderr)
    print(env_text(stack))
    return 0


COMMANDS = {"up": up, "down": down, "status": status, "env": env}


def run_stack_cli(argv: list[str]) -> int:
    """Entry point of ``orchestrator stack ...``; returns the exit code."""
    from trainers.config import parse_overrides

    if not argv or argv[0] not in COMMANDS:
        given = f" (got {argv[0]!r})" if argv else ""
        raise UserError(USAGE.format(", ".join(DEFAULTS)) + given)
    return COMMANDS[argv[0]](parse_overrides(argv[1:]))

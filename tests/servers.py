"""Real servers for tests: an ``mlflow server`` subprocess, a moto S3 server, a cuttable TCP proxy.

All bind 127.0.0.1 on free ports, wait for a health check before returning, and shut down
their whole process group. ``stop()``/``start()`` keep the port and the on-disk store, so a test
can take a server away and bring it back. Import with ``from tests.servers import ...``.
"""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from importlib.metadata import version
from pathlib import Path

BIN = Path(sys.executable).parent


def mlflow_store(path: str | Path) -> str:
    """The URI of a new MLflow SQLite store at ``path``, copied from an empty store built once per
    MLflow version: building one runs MLflow's schema migrations, ~2 s of CPU, in each test's run."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(empty_store(), path)
    return f"sqlite:///{path}"


def empty_store() -> Path:
    template = Path(tempfile.gettempdir()) / f"orchestrator-tests-mlflow-{version('mlflow')}.db"
    if not template.exists():
        building = template.with_name(f"{template.name}.{os.getpid()}")
        code = ("import sys; from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore; "
                "SqlAlchemyStore(sys.argv[1], sys.argv[2]).engine.dispose()")
        subprocess.run([sys.executable, "-c", code, f"sqlite:///{building}", str(template.parent / "artifacts")],
                       check=True, capture_output=True)
        os.replace(building, template)  # whole, whoever built it
    return template


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    """Poll ``url`` until it answers 200; fail early if ``proc`` died."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")


def wait_port_free(port: int, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"port {port} still in use after {timeout:.0f}s")


class _Process:
    """A server subprocess in its own process group, logging to a file."""

    health_path = "/"

    def __init__(self, log: Path, port: int | None = None):
        self.port = port or free_port()
        self.log = Path(log)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict:
        return dict(os.environ)

    def start(self, timeout: float = 90.0):
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT,
                                         env=self.env(), start_new_session=True)
        try:
            wait_http(self.url + self.health_path, timeout, self.proc)
        except Exception:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None
        wait_port_free(self.port)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class MlflowServer(_Process):
    """``mlflow server`` with a SQLite store and proxied artifacts, both under ``root``."""

    health_path = "/health"

    def __init__(self, root: str | Path, port: int | None = None, workers: int = 1):
        self.root = Path(root)
        self.workers = workers
        super().__init__(self.root / "server.log", port)

    @property
    def backend_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    def start(self, timeout: float = 90.0):
        mlflow_store(self.root / "mlflow.db")  # the schema exists before the server: its workers never race migrations
        return super().start(timeout)

    def command(self) -> list[str]:
        return [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
                "--workers", str(self.workers), "--backend-store-uri", self.backend_uri,
                "--artifacts-destination", str(self.root / "artifacts"), "--serve-artifacts"]

    def env(self) -> dict:
        env = dict(os.environ)
        env.pop("MLFLOW_TRACKING_URI", None)
        # The GenAI job runner (a dozen worker processes) is not needed for tracking.
        env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        return env


class MotoServer(_Process):
    """moto's S3 server over HTTP (state lives in memory: a restart loses every bucket)."""

    health_path = "/moto-api/"

    def __init__(self, root: str | Path, port: int | None = None):
        super().__init__(Path(root) / "moto.log", port)

    def command(self) -> list[str]:
        return [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)]

    def env(self) -> dict:
        env = dict(os.environ)
        env.setdefault("S3_UPLOAD_PART_MIN_SIZE", "256")
        env.setdefault("S3_IGNORE_SUBDOMAIN_BUCKETNAME", "true")
        return env

    def client_env(self) -> dict:
        """AWS settings for clients of this endpoint (fake credentials; moto does not check them)."""
        return {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_SESSION_TOKEN": "testing"}

    def create_bucket(self, name: str, endpoint: str | None = None) -> None:
        import boto3
        env = self.client_env()
        s3 = boto3.client("s3", endpoint_url=endpoint or self.url, region_name=env["AWS_DEFAULT_REGION"],
                          aws_access_key_id="testing", aws_secret_access_key="testing")
        s3.create_bucket(Bucket=name)


class TcpProxy:
    """A 127.0.0.1 TCP forwarder that can be cut (connections dropped, port refused) and restored.

    Used to make an endpoint unreachable without losing the server's state.
    """

    def __init__(self, target_port: int, port: int | None = None):
        self.target_port = target_port
        self.port = port or free_port()
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "TcpProxy":
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(64)
        self._listener = sock
        self._thread = threading.Thread(target=self._accept, args=(sock,), daemon=True)
        self._thread.start()
        return self

    def cut(self) -> None:
        """Refuse new connections and reset open ones."""
        sock, self._listener = self._listener, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        if self._thread is not None:
            self._thread.join(5)
        with self._lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            _close(conn)

    def restore(self) -> None:
        self.start()

    stop = cut

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._conns.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                _close(s)
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.cut()


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


# --------------------------------------------------------------------------------------------
# A realistic record stream (what the callback forwarder sends), with real files on disk.

def record_stream(save_dir: str | Path, run_id: str = "run-1", epochs: int = 2, steps: int = 6,
                  ranks: tuple = (0, 1), attempt: int = 0, config: dict | None = None):
    """Yield the records of one fit, as workers send them; artifact files are written just
    before the record naming them, so each record sees the file as it was then."""
    import json

    import torch
    from PIL import Image

    from callbacks.records import make_record

    save = Path(save_dir)
    (save / "weights").mkdir(parents=True, exist_ok=True)
    seq = {r: 0 for r in ranks}
    clock = [1_700_000_000.0]

    def rec(rank, event, epoch, step, **kw):
        clock[0] += 0.25
        r = make_record(run_id=run_id, event=event, rank=rank, attempt=attempt, seq=seq[rank],
                        epoch=epoch, step=step, now=clock[0], **kw)
        seq[rank] += 1
        return r

    def write_png(path: Path, shade: int):
        Image.new("RGB", (8, 8), (shade % 256, 80, 160)).save(path)

    (save / "args.yaml").write_text(
        "".join(f"{k}: {json.dumps(v)}\n" for k, v in (config or {"epochs": epochs}).items()))
    step = 0
    for r in ranks:
        yield rec(r, "on_pretrain_routine_start", 0, 0)
        yield rec(r, "on_train_start", 0, 0)
    for epoch in range(epochs):
        for r in ranks:
            yield rec(r, "on_train_epoch_start", epoch, step)
        for b in range(steps):
            step += 1
            for r in ranks:
                loss = 1.0 / step + 0.01 * r
                yield rec(r, "on_train_batch_end", epoch, step,
                          metrics={"train/box_loss": loss, "train/cls_loss": 2 * loss, "lr/pg0": 0.01 / step})
        for r in ranks:
            yield rec(r, "on_train_epoch_end", epoch, step, metrics={"train/box_loss": 0.5 / (epoch + 1)})
        r0 = ranks[0]
        yield rec(r0, "on_val_start", epoch, step)
        yield rec(r0, "on_val_end", epoch, step, metrics={"metrics/mAP50(B)": 0.3 + 0.1 * epoch})
        ckpt = {"epoch": epoch, "model": {"w": torch.full((4,), float(epoch))}, "args": dict(config or {})}
        torch.save(ckpt, save / "weights" / "last.pt")
        torch.save(ckpt, save / "weights" / "best.pt")
        yield rec(r0, "on_model_save", epoch, step, artifacts={
            "last": str(save / "weights" / "last.pt"), "best": str(save / "weights" / "best.pt")})
        with open(save / "results.csv", "a") as fh:
            fh.write(f"{epoch},{0.3 + 0.1 * epoch}\n")
        write_png(save / "results.png", epoch * 40)
        for r in ranks:
            metrics = {"metrics/mAP50(B)": 0.3 + 0.1 * epoch, "val/box_loss": 0.9 - 0.1 * epoch,
                       "fitness": 0.2 + 0.1 * epoch} if r == r0 else {}
            artifacts = {"results.csv": str(save / "results.csv"), "results.png": str(save / "results.png")}
            yield rec(r, "on_fit_epoch_end", epoch, step, metrics=metrics,
                      artifacts=artifacts if r == r0 else None)
    r0 = ranks[0]
    write_png(save / "confusion_matrix.png", 7)
    yield rec(r0, "on_fit_epoch_end", epochs, step, final_eval=True,
              metrics={"metrics/mAP50(B)": 0.42, "fitness": 0.33},
              artifacts={"confusion_matrix.png": str(save / "confusion_matrix.png")})
    yield rec(r0, "on_train_end", epochs, step, artifacts={"args.yaml": str(save / "args.yaml"),
                                                           "results.png": str(save / "results.png")})
    for r in ranks:
        yield rec(r, "teardown", epochs, step)


def expected_metrics(records, step_prefix: str = "step/") -> dict[str, list[tuple[int, float, int]]]:
    """What MLflowSink must log for ``records``: key -> sorted (step, value, timestamp_ms)."""
    from callbacks.sinks.mlflow_runs import metric_key
    out: dict[str, list] = {}
    for r in records:
        if r["rank"] > 0 or not r["metrics"]:
            continue
        if r["event"] == "on_train_batch_end":
            prefix, step = step_prefix, r["step"]
        elif r["event"] == "on_fit_epoch_end":
            prefix, step = ("final/" if r["final_eval"] else ""), r["epoch"]
        else:
            continue
        for k, v in r["metrics"].items():
            out.setdefault(metric_key(prefix + k), []).append((step, v, int(r["time"] * 1000)))
    return {k: sorted(v) for k, v in out.items()}


def metric_histories(client, run_id: str, keys) -> dict[str, list[tuple[int, float, int]]]:
    return {k: sorted((m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, k))
            for k in keys}


@contextmanager
def running(servers: list):
    """Start ``servers`` in parallel (each start waits for health); stop them all afterwards."""
    errors = []

    def start(srv):
        try:
            srv.start()
        except Exception as exc:  # re-raised below, in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(s,)) for s in servers]
    [t.start() for t in threads]
    [t.join() for t in threads]
    try:
        if errors:
            raise errors[0]
        yield servers
    finally:
        for srv in servers:
            srv.stop()

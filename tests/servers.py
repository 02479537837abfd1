"""Real servers for tests: an ``mlflow server`` subprocess, a moto S3 server, a cuttable TCP proxy.

All bind 127.0.0.1 on free ports, wait for a health check before returning, and shut down
their whole process group. ``stop()``/``start()`` keep the port and the on-disk store, so a test
can take a server away and bring it back. Import with ``from servers import ...`` from tests.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent


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
        self.root.mkdir(parents=True, exist_ok=True)
        self._init_schema()
        return super().start(timeout)

    def _init_schema(self) -> None:
        """Create the DB schema once before the server, so its workers never race migrations."""
        if (self.root / "mlflow.db").exists():
            return
        code = ("import sys; from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore; "
                "SqlAlchemyStore(sys.argv[1], sys.argv[2]).engine.dispose()")
        subprocess.run([sys.executable, "-c", code, self.backend_uri, str(self.root / "artifacts")],
                       check=True, capture_output=True)

    def command(self) -> list[str]:
        return [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
                "--workers", str(self.workers), "--backend-store-uri", self.backend_uri,
                "--artifacts-destination", str(self.root / "artifacts"), "--serve-artifacts"]

    def env(self) -> dict:
        env = dict(os.environ)
        env.pop("MLFLOW_TRACKING_URI", None)
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

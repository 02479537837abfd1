"""Unreachable endpoints are reported in one line, with the address tried, before training starts."""
import os
import socket
import subprocess
import sys
import time


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(args, env_extra=None, cwd=None):
    env = {**os.environ, **(env_extra or {})}
    start = time.time()
    out = subprocess.run([sys.executable, "-m", "orchestrator", "train", "model=cls-n.yaml", "data=digits",
                          "epochs=1", "imgsz=16", *args], capture_output=True, text=True, env=env, cwd=cwd,
                         timeout=300)
    return out, time.time() - start


def assert_one_line(out, *needles):
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_unreachable_mlflow(tmp_path):
    port = closed_port()
    out, _ = run_cli([f"tracking_uri=http://127.0.0.1:{port}"], cwd=tmp_path)
    assert_one_line(out, "MLflow", f"127.0.0.1:{port}", "Connection refused")
    assert len(out.stderr) < 200, out.stderr  # the OS's words, not urllib3's wrapping
    assert not (tmp_path / "runs" / "classify").exists()  # nothing started


def test_only_a_connection_error_is_cut_to_the_os_words():
    from callbacks.sinks.mlflow_runs import first_line

    assert first_line(PermissionError(13, "Permission denied", "/srv/mlruns")) == \
        "PermissionError: [Errno 13] Permission denied: '/srv/mlruns'"


def test_unreachable_s3(tmp_path):
    port = closed_port()
    out, _ = run_cli(["storage=s3://bucket/prefix"], cwd=tmp_path,
                     env_extra={"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "x",
                                "AWS_SECRET_ACCESS_KEY": "y", "AWS_DEFAULT_REGION": "us-east-1"})
    assert_one_line(out, "s3://bucket", f"127.0.0.1:{port}")


def test_unreachable_ray(tmp_path):
    port = closed_port()
    out, _ = run_cli(["num_workers=1"], cwd=tmp_path, env_extra={"RAY_ADDRESS": f"127.0.0.1:{port}"})
    assert_one_line(out, "Ray", f"127.0.0.1:{port}")

"""Peer comparison on shapes8: our det-n and Ultralytics 8.4's YOLOv8n (from ``yolov8n.yaml``), both
with their own defaults, the same epochs, image size and batch, trained side by side (one thread
each, at the same time) on the same files.

Goals (issue 16): ours beats Ultralytics' defaults on final mAP50 in less time; one of our models
(``--model det-s.yaml``, or det-n) reaches Ultralytics' final mAP50 in less wall time.
Prints both final mAP50, each side's time to reach mAP50 0.8 (from its results.csv) and the ratios.

Ultralytics is never imported by the project: it lives in its own venv (``--venv``, default
``~/.cache/orchestrator-bench/ultralytics-venv``), installed on first use with
``pip install torch==2.14.1 torchvision==0.29.1 ultralytics==8.4.190``; where that cannot be done,
the peer side is skipped with a line that says why. It runs with ``YOLO_OFFLINE=1``, ``plots=False``.

Usage: OMP_NUM_THREADS=1 python benchmarks/peer_ultralytics.py [--epochs 25] [--model det-n.yaml]

``--tiny``: one epoch on a tenth of the training set, and the peer only if its venv already exists
(never installed): the same code path for the tests, its figures are not measurements.
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tiny
from trainers.data.shapes import ensure_shapes8

ROOT = Path(__file__).resolve().parents[1]
VENV = Path.home() / ".cache" / "orchestrator-bench" / "ultralytics-venv"
PEER = ("torch==2.14.1", "torchvision==0.29.1", "ultralytics==8.4.190")
TARGET = 0.8
SHARED = dict(imgsz=96, batch=16)
PEER_TRAIN = """
import sys
from ultralytics import YOLO
YOLO("yolov8n.yaml").train(data=sys.argv[1], epochs=int(sys.argv[2]), imgsz={imgsz}, batch={batch},
                           fraction=float(sys.argv[3]), project=sys.argv[4], name="peer", plots=False,
                           workers=0, device="cpu", seed=0, verbose=False)
"""


def peer_python(venv: Path, install: bool) -> tuple[Path | None, str]:
    """The peer venv's python (installed first when allowed), or None and why not."""
    python = venv / "bin" / "python"
    if python.is_file() and subprocess.call([python, "-c", "import ultralytics"], stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL) == 0:
        return python, ""
    if not install:
        return None, f"no Ultralytics venv at {venv} (--tiny never installs one)"
    print(f"installing {' '.join(PEER)} into {venv} ...", flush=True)
    made = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True)
    pip = made.returncode == 0 and subprocess.run([python, "-m", "pip", "install", "-q", *PEER],
                                                  capture_output=True, text=True)
    if not pip or pip.returncode != 0:
        text = (pip.stderr if pip else made.stderr).strip().splitlines()
        return None, f"cannot install Ultralytics into {venv}: {text[-1] if text else 'venv failed'}"
    return python, ""


def absolute_data_yaml(data: Path, folder: Path) -> Path:
    """shapes8's data YAML with an absolute ``path``: Ultralytics resolves a relative one elsewhere."""
    text = data.read_text().replace("path: .", f"path: {data.parent.resolve()}", 1)
    out = folder / "shapes8-abs.yaml"
    out.write_text(text)
    return out


def start_ours(model: str, data: Path, epochs: int, fraction: float, folder: Path) -> subprocess.Popen:
    args = [f"model={model}", f"data={data}", f"epochs={epochs}", f"fraction={fraction}", "plots=False",
            "verbose=False", f"project={folder}", "name=ours", f"tracking_uri=sqlite:///{folder}/mlflow.db",
            f"storage={folder}/store", f"journal={folder}/journal",
            *(f"{k}={v}" for k, v in SHARED.items())]
    return subprocess.Popen([sys.executable, "-m", "orchestrator", "train", *args], cwd=folder,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def start_peer(python: Path, data: Path, epochs: int, fraction: float, folder: Path) -> subprocess.Popen:
    env = {**os.environ, "YOLO_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    return subprocess.Popen([python, "-c", PEER_TRAIN.format(**SHARED), str(data), str(epochs), str(fraction),
                             str(folder)], cwd=folder, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def wait_all(procs: dict, start: float) -> dict:
    """Each process's wall time from ``start`` to its own end (they run at the same time)."""
    walls: dict = {}
    while len(walls) < len(procs):
        for name, proc in procs.items():
            if name not in walls and proc.poll() is not None:
                walls[name] = time.time() - start
                if proc.returncode != 0:
                    raise SystemExit(f"{name} failed (exit {proc.returncode}): {proc.stderr.read().strip()[-1500:]}")
        time.sleep(0.2)
    return walls


def curve(results_csv: Path) -> list[tuple[float, float]]:
    """(seconds since the start of training, mAP50) per epoch, from a results.csv."""
    with open(results_csv) as f:
        rows = [{k.strip(): v for k, v in row.items()} for row in csv.DictReader(f)]
    return [(float(r["time"]), float(r["metrics/mAP50(B)"])) for r in rows]


def reached(points: list[tuple[float, float]], level: float) -> float | None:
    return next((t for t, m in points if m >= level), None)


def describe(name: str, points: list, wall: float) -> str:
    at = reached(points, TARGET)
    when = f"reached {TARGET} at {at:.0f} s" if at is not None else f"never reached {TARGET}"
    return f"{name}: final mAP50 {points[-1][1]:.4f} after {len(points)} epochs, wall {wall:.0f} s, {when}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--model", default="det-n.yaml", help="our built-in model (det-n.yaml, det-s.yaml)")
    parser.add_argument("--venv", type=Path, default=VENV)
    opts = tiny.parse(parser, "one epoch on a tenth of the data; the peer only if its venv exists", epochs=1)
    fraction = 0.1 if opts.tiny else 1.0
    folder = Path(tempfile.mkdtemp(prefix="peer-"))
    data = absolute_data_yaml(ensure_shapes8(), folder)  # under datasets/ in the working directory
    python, why = peer_python(opts.venv, install=not opts.tiny)
    start = time.time()
    procs = {"ours": start_ours(opts.model, data, opts.epochs, fraction, folder)}
    if python:
        procs["ultralytics"] = start_peer(python, data, opts.epochs, fraction, folder)
    walls = wait_all(procs, start)
    ours_wall, mine = walls["ours"], curve(folder / "ours" / "results.csv")
    print(describe(f"ours ({opts.model}, defaults)", mine, ours_wall))
    if not python:
        print(f"ultralytics: skipped: {why}")
        tiny.end(opts)
        return
    peer_wall, theirs = walls["ultralytics"], curve(folder / "peer" / "results.csv")
    print(describe("ultralytics 8.4.190 (yolov8n.yaml, defaults)", theirs, peer_wall))
    to_theirs = reached(mine, theirs[-1][1])
    print(f"ratios ours/ultralytics: final mAP50 {mine[-1][1] / max(theirs[-1][1], 1e-9):.3f}, "
          f"wall time {ours_wall / peer_wall:.3f}; ours reached ultralytics' final mAP50 "
          + (f"at {to_theirs:.0f} s (ratio to its wall time {to_theirs / peer_wall:.3f})" if to_theirs is not None
             else "never"))
    tiny.end(opts)


if __name__ == "__main__":
    main()

"""Cost of running on Ray and of forwarding every event, measured in one run.

Prints three ratios (issue targets in brackets):
  (a) steady-state steps/s with every event forwarded to the driver actor / forwarding off  [>= 0.97]
  (c) steps/s of a 1-worker Ray-hosted trainer / the same trainer in this process           [>= 0.95]
  (d) seconds from train() to the first step / a minimal TorchTrainer fit's first step      [<= 1.2]

Usage: OMP_NUM_THREADS=1 python benchmarks/ray_overhead.py [--epochs 3]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import ray

from orchestrator import Model
from trainers.classify import ClassificationTrainer
from trainers.models.tasks import ClassificationModel

TINY = {"nc": 10, "backbone": [[-1, 1, "Conv", [8, 3, 2]]], "head": [[-1, 1, "Classify", [10]]]}


class TinyTrainer(ClassificationTrainer):
    """A model small enough that per-step overhead, not compute, sets the pace."""

    def get_model(self, cfg=None, weights=None, verbose=True):
        return ClassificationModel(TINY, ch=self.data["ch"], nc=self.data["nc"], verbose=False)


def step_times(log: Path) -> list[float]:
    return [json.loads(line)["t"] for line in log.read_text().splitlines()]


def timing_callbacks(log: Path):
    def on_batch_end(trainer):
        if trainer.rank <= 0:
            with open(log, "a") as f:
                f.write(json.dumps({"t": time.perf_counter_ns() / 1e9, "wall": time.time()}) + "\n")
    return on_batch_end


def steady_rate(log: Path, skip_fraction: float = 0.3) -> float:
    times = step_times(log)
    times = times[int(len(times) * skip_fraction):]
    return (len(times) - 1) / (times[-1] - times[0])


def first_step_wall(log: Path) -> float:
    return json.loads(log.read_text().splitlines()[0])["wall"]


def run(tmp: Path, name: str, forward: bool, **kw) -> tuple[float, float]:
    """(steady steps/s, seconds from train() to the first step)."""
    log = tmp / f"{name}.jsonl"
    model = Model("cls-n.yaml")
    model.add_callback("on_train_batch_end", timing_callbacks(log))
    cfg = dict(data="digits", imgsz=8, batch=8, nbs=8, epochs=kw.pop("epochs", 3), verbose=False, plots=False,
               val=False, save=False, warmup_epochs=0, project=str(tmp / "runs"), name=name,
               tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}", storage=str(tmp / "store"), **kw)
    if not forward:
        os.environ["ORCHESTRATOR_FORWARD_EVENTS"] = "0"
    start = time.time()
    try:
        model.train(trainer=TinyTrainer, **cfg)
    finally:
        os.environ.pop("ORCHESTRATOR_FORWARD_EVENTS", None)
    return steady_rate(log), first_step_wall(log) - start


def minimal_torchtrainer_first_step(tmp: Path) -> float:
    """A bare TorchTrainer whose loop only reports that it started: Ray's own start-up cost."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    marker = tmp / "bare.txt"

    def loop(config):
        Path(config["marker"]).write_text(str(time.time()))

    start = time.time()
    TorchTrainer(loop, train_loop_config={"marker": str(marker)}, scaling_config=ScalingConfig(num_workers=1),
                 run_config=RunConfig(name="bare", storage_path=str(tmp / "bare"))).fit()
    return float(marker.read_text()) - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    epochs = parser.parse_args().epochs
    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    tmp = Path(tempfile.mkdtemp(prefix="ray-overhead-"))
    bare = minimal_torchtrainer_first_step(tmp)
    on_rate, on_first = run(tmp, "forward_on", True, num_workers=1, epochs=epochs)
    off_rate, _ = run(tmp, "forward_off", False, num_workers=1, epochs=epochs)
    local_rate, _ = run(tmp, "in_process", True, num_workers=0, epochs=epochs)
    print(f"steps/s: forwarded {on_rate:.0f}, not forwarded {off_rate:.0f}, in-process {local_rate:.0f}")
    print(f"(a) forwarding on / off: {on_rate / off_rate:.3f}  (target >= 0.97)")
    print(f"(c) Ray 1 worker / in-process (both forwarding): {on_rate / local_rate:.3f}  (target >= 0.95)")
    print(f"(d) train() to first step {on_first:.1f} s / bare TorchTrainer {bare:.1f} s = {on_first / bare:.2f}"
          f"  (target <= 1.2)")


if __name__ == "__main__":
    main()

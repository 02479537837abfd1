"""Cost of running on Ray and of forwarding every event, measured in one run.

Prints three ratios (issue targets in brackets):
  (a) steady-state steps/s with every event forwarded to the driver actor / forwarding off  [>= 0.97]
  (c) steps/s of a 1-worker Ray-hosted trainer / the same trainer in this process           [>= 0.95]
  (d) seconds from train() to the first step / a minimal TorchTrainer fit's first step      [<= 1.2]
      (the minimal fit: a hand-written Ray Train loop building a tiny model and an SGD optimizer
      and taking one step on one batch; a loop that does nothing is printed for reference)

On a shared machine a run's speed drifts by 10-30% between runs, more than the effect measured.
So (a) is measured inside ONE Ray run: the per-step events are forwarded in even epochs and not
forwarded in odd ones (the forwarder's per-step hooks are taken out of the worker's registry at
the epoch start), and each epoch's steps/s is taken after its first fifth of steps, so the
actor's end-of-epoch work (event-log part, MLflow batch) does not count for the next epoch.
The ratio is median(forwarded epochs) / median(not forwarded epochs), epochs 0-1 excluded.
(d) alternates runs of each kind (--pairs of them) and compares medians, twice: each run in a new
Python process joining the same Ray (as a CLI call: its first imports of Ray Train and MLflow),
and runs in this process after earlier ones. Start-up times here swing by a second or more.
Step times are kept in the worker's memory and written once at the end.

Usage: OMP_NUM_THREADS=1 python benchmarks/ray_overhead.py [--epochs 24] [--pairs 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
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


STEP_EVENTS = ("on_train_batch_start", "optimizer_step", "on_before_zero_grad", "on_params_update",
               "on_train_batch_end")


class StepClock:
    """Worker callbacks: the time of every step end by epoch, written to ``log`` when training ends.
    With ``alternate``, per-step events are forwarded in even epochs only."""

    def __init__(self, log: Path, alternate: bool = False):
        self.log, self.alternate, self.perf, self.first_wall, self.hooks = str(log), alternate, {}, None, None

    def on_train_epoch_start(self, trainer):
        if not self.alternate:
            return
        if self.hooks is None:  # the forwarder's own hooks (callbacks/forwarder.py names them)
            self.hooks = {e: [f for f in trainer.callbacks[e] if f.__qualname__.startswith("EventForwarder.")]
                          for e in STEP_EVENTS}
        for event, hooks in self.hooks.items():
            rest = [f for f in trainer.callbacks[event] if f not in hooks]
            trainer.callbacks[event][:] = rest + (hooks if trainer.epoch % 2 == 0 else [])

    def on_train_batch_end(self, trainer):
        if trainer.rank <= 0:
            self.perf.setdefault(trainer.epoch, []).append(time.perf_counter())
            if self.first_wall is None:
                self.first_wall = time.time()

    def on_train_end(self, trainer):
        if trainer.rank <= 0:
            Path(self.log).write_text(json.dumps({"perf": self.perf, "first_wall": self.first_wall}))


def steady_rate(times: list[float], skip_fraction: float = 0.2) -> float:
    times = times[int(len(times) * skip_fraction):]
    return (len(times) - 1) / (times[-1] - times[0])


def run(tmp: Path, name: str, forward: bool, alternate: bool = False, **kw) -> tuple[dict, float]:
    """({epoch: steady steps/s}, seconds from train() to the first step)."""
    log = tmp / f"{name}.json"
    model = Model("cls-n.yaml")
    model.add_callback(StepClock(log, alternate))
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
    steps = json.loads(log.read_text())
    return {int(e): steady_rate(t) for e, t in steps["perf"].items()}, steps["first_wall"] - start


def minimal_fit_loop(config):
    """What a user writes by hand for Ray Train: a tiny model, an optimizer, one step on one batch."""
    import torch
    from ray.train.torch import prepare_model
    from torch import nn

    model = prepare_model(nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1), nn.ReLU(), nn.Flatten(),
                                                         nn.Linear(8 * 4 * 4, 10)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    images, labels = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    nn.functional.cross_entropy(model(images), labels).backward()
    optimizer.step()
    Path(config["marker"]).write_text(str(time.time()))


def empty_loop(config):
    """Ray's floor: a loop that only says it started."""
    Path(config["marker"]).write_text(str(time.time()))


def bare_first_step(tmp: Path, loop) -> float:
    """Seconds from fit() to ``loop``'s marker in a bare TorchTrainer: Ray's own start-up cost."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    marker = tmp / "bare.txt"
    start = time.time()
    TorchTrainer(loop, train_loop_config={"marker": str(marker)}, scaling_config=ScalingConfig(num_workers=1),
                 run_config=RunConfig(name="bare", storage_path=str(tmp / "bare"))).fit()
    return float(marker.read_text()) - start


def first_step_in_new_process(tmp: Path, kind: str, address: str) -> float:
    """(d) as a CLI call: a fresh Python process joins this Ray and runs ``kind`` once."""
    out = subprocess.run([sys.executable, __file__, "--child", kind, "--address", address, "--tmp", str(tmp)],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, check=True)
    return float(out.stdout.split("FIRST_STEP ")[-1].split()[0])


def child(opts) -> None:
    ray.init(address=opts.address, configure_logging=False, log_to_driver=False)
    tmp = Path(opts.tmp)
    if opts.child == "ours":
        seconds = run(tmp, f"cold-{os.getpid()}", True, num_workers=1, epochs=1)[1]
    else:
        seconds = bare_first_step(tmp, minimal_fit_loop)
    print(f"FIRST_STEP {seconds}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--pairs", type=int, default=3, help="(d): runs of each kind, alternating")
    parser.add_argument("--child", choices=("ours", "fit"), help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.child:
        return child(opts)
    info = ray.init(num_cpus=4, include_dashboard=False, configure_logging=False,
                    runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    tmp = Path(tempfile.mkdtemp(prefix="ray-overhead-"))
    rates, _ = run(tmp, "alternating", True, alternate=True, num_workers=1, epochs=opts.epochs)
    local, _ = run(tmp, "in_process", True, num_workers=0, epochs=opts.epochs)
    cold, warm = {"ours": [], "fit": []}, {"ours": [], "fit": []}
    for _ in range(opts.pairs):
        warm["ours"].append(run(tmp, "warm", True, num_workers=1, epochs=1)[1])
        warm["fit"].append(bare_first_step(tmp, minimal_fit_loop))
        for kind in ("ours", "fit"):
            cold[kind].append(first_step_in_new_process(tmp, kind, info.address_info["address"]))
    floor = bare_first_step(tmp, empty_loop)
    on = [r for e, r in rates.items() if e >= 2 and e % 2 == 0]
    off = [r for e, r in rates.items() if e >= 2 and e % 2 == 1]
    print("steps/s per epoch, forwarded | not forwarded: "
          + ", ".join(f"{a:.0f}|{b:.0f}" for a, b in zip(on, off)))
    on_rate, off_rate = statistics.median(on), statistics.median(off)
    local_rate = statistics.median(r for e, r in local.items() if e >= 2)
    print(f"steps/s (medians): forwarded {on_rate:.0f}, not forwarded {off_rate:.0f}, in-process {local_rate:.0f}")
    print(f"(a) forwarding on / off: {on_rate / off_rate:.3f}  (target >= 0.97)")
    print(f"(c) Ray 1 worker / in-process (both forwarding): {on_rate / local_rate:.3f}  (target >= 0.95)")
    for name, runs in (("new process each (as a CLI call)", cold), ("in a process that ran before", warm)):
        ours, fit = statistics.median(runs["ours"]), statistics.median(runs["fit"])
        print(f"(d) train() to first step / minimal TorchTrainer fit to its first step, {name}: medians "
              f"{ours:.1f} s / {fit:.1f} s = {ours / fit:.2f}  (target <= 1.2)  [runs: "
              + ", ".join(f"{a:.1f}|{b:.1f}" for a, b in zip(runs["ours"], runs["fit"])) + "]")
    print(f"    for reference, a TorchTrainer whose loop does nothing: {floor:.1f} s to its start")


if __name__ == "__main__":
    main()

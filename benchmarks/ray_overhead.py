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
The ratio is median(forwarded epochs) / median(not forwarded epochs), epochs 0-1 excluded; also
printed: the median of each forwarded epoch's rate over the mean of its two neighbours' (paired),
and, as a cross-check that time spent waiting for a core does not touch, the training thread's CPU
time per step (``time.thread_time``) forwarded minus not forwarded, as a share of a step (other
tenants still move it: they slow the caches and the clock).
(a) and (c) train on 8,000 random 8x8 images (~1,000 steps an epoch), not digits (180 steps):
a window of a fifth of a second is at the mercy of any scheduler hiccup.
(d) alternates runs of each kind (--pairs of them) and compares medians: runs in this process
after earlier ones, and runs each in a new Python process joining the same Ray (as a CLI call),
timed from train()/fit() (train() imports Ray Train inside; the script imported it before fit())
and from the process start (both import what they use). Start-ups here swing by a second or more.
Step times are kept in the worker's memory and written once at the end.

Usage: OMP_NUM_THREADS=1 python benchmarks/ray_overhead.py [--epochs 24] [--pairs 3]   (--epochs 40: more pairs for (a))

``--tiny`` runs the same code path end to end (6 epochs of ~20 steps on 160 random images, one pair
for (d), a 1-worker Ray run and the in-process run as in the full mode; for the tests): its figures
are not measurements. Ray Train's start-ups set its time, so it starts Ray Train four times, two at
a time: the runs "in a process that ran before" take figures it has anyway (the first Ray run's,
the new process's fit); the new process of the fit runs beside the first Ray run, ours beside the
floor.
"""
from __future__ import annotations

import time

PROCESS_START = time.time()  # before the imports: (d) for a new process counts them

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import ray

import tiny
from cluster import start_ray
from orchestrator import Model
from trainers.classify import ClassificationTrainer
from trainers.models.tasks import ClassificationModel

TINY_MODEL = {"nc": 10, "backbone": [[-1, 1, "Conv", [8, 3, 2]]], "head": [[-1, 1, "Classify", [10]]]}
TINY_EPOCHS, TINY_PER_CLASS = 6, 16  # --tiny: the fewest epochs every printed ratio needs (paired: epoch 4 and 5)


class TinyTrainer(ClassificationTrainer):
    """A model small enough that per-step overhead, not compute, sets the pace."""

    def get_model(self, cfg=None, weights=None, verbose=True):
        return ClassificationModel(TINY_MODEL, ch=self.data["ch"], nc=self.data["nc"], verbose=False)


STEP_EVENTS = ("on_train_batch_start", "optimizer_step", "on_before_zero_grad", "on_params_update",
               "on_train_batch_end")


class StepClock:
    """Worker callbacks: the time of every step end by epoch, written to ``log`` when training ends.
    With ``alternate``, per-step events are forwarded in even epochs only."""

    def __init__(self, log: Path, alternate: bool = False):
        self.log, self.alternate, self.first_wall, self.hooks = str(log), alternate, None, None
        self.perf, self.cpu = {}, {}  # by epoch: wall clock and the training thread's CPU clock at each step end

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
            self.cpu.setdefault(trainer.epoch, []).append(time.thread_time())
            if self.first_wall is None:
                self.first_wall = time.time()

    def on_train_end(self, trainer):
        if trainer.rank <= 0:
            Path(self.log).write_text(json.dumps({"perf": self.perf, "cpu": self.cpu, "first_wall": self.first_wall}))


def steady_rate(times: list[float], skip_fraction: float = 0.2) -> float:
    times = times[int(len(times) * skip_fraction):]
    return (len(times) - 1) / (times[-1] - times[0])


def steady_cpu(clock: list[float], skip_fraction: float = 0.2) -> float:
    """The training thread's CPU seconds per step over the window ``steady_rate`` uses."""
    return 1.0 / steady_rate(clock, skip_fraction)


def run(tmp: Path, name: str, alternate: bool = False, data: str = "digits", **kw) -> tuple[dict, float, dict]:
    """({epoch: steady steps/s}, seconds from train() to the first step, {epoch: CPU s per step})."""
    log = tmp / f"{name}.json"
    model = Model("cls-n.yaml")
    model.add_callback(StepClock(log, alternate))
    cfg = dict(data=data, imgsz=8, batch=8, nbs=8, epochs=kw.pop("epochs", 1), verbose=False, plots=False,
               val=False, save=False, warmup_epochs=0, project=str(tmp / "runs"), name=name,
               tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}", storage=str(tmp / "store"), **kw)
    start = time.time()
    model.train(trainer=TinyTrainer, **cfg)
    steps = json.loads(log.read_text())
    return ({int(e): steady_rate(t) for e, t in steps["perf"].items()}, steps["first_wall"] - start,
            {int(e): steady_cpu(t) for e, t in steps["cpu"].items()})


def folder_data(root: Path, per_class: int = 800, classes: int = 10) -> str:
    """Random 8x8 images in class folders: ~1,000 steps per epoch at batch 8, so each epoch's
    steady window lasts about a second (digits gives 180 steps, a fifth of a second)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", 2)):
        for c in range(classes):
            folder = root / split / str(c)
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return str(root)


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


def paired_ratio(rates: dict) -> float:
    """Median over forwarded epochs of rate / mean rate of the two non-forwarded epochs around it:
    neighbours share the machine's state of the moment, so slow drift cancels."""
    ratios = [rates[e] / ((rates[e - 1] + rates[e + 1]) / 2)
              for e in rates if e >= 4 and e % 2 == 0 and e + 1 in rates]  # epochs 0-1 warm up
    return statistics.median(ratios)


def first_step_in_new_process(tmp: Path, kind: str, address: str) -> tuple[float, float]:
    """(d) as a CLI call: a fresh Python process joins this Ray and runs ``kind`` once.
    Returns (seconds from train()/fit() to the first step, seconds from the process start)."""
    return first_step_of(start_new_process(tmp, kind, address), tmp, kind)


def start_new_process(tmp: Path, kind: str, address: str, folder: Path | None = None) -> subprocess.Popen:
    """Start (d)'s fresh Python process for ``kind``, its files in ``folder`` (default ``tmp``).
    Its output goes to files in ``tmp``, not to pipes: under --tiny nobody reads a pipe while this
    process runs its own runs."""
    with open(tmp / f"child-{kind}.out", "w") as out, open(tmp / f"child-{kind}.err", "w") as err:
        return subprocess.Popen([sys.executable, __file__, "--child", kind, "--address", address,
                                 "--tmp", str(folder or tmp)],
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=out, stderr=err)


def first_step_of(process: subprocess.Popen, tmp: Path, kind: str) -> tuple[float, float]:
    """The figures of a process ``start_new_process`` started, once it ends (fails with its
    output's tail if it failed)."""
    code = process.wait()
    out = (tmp / f"child-{kind}.out").read_text()
    if code != 0:
        err = (tmp / f"child-{kind}.err").read_text().splitlines()
        raise RuntimeError(f"(d) '{kind}' in a new process exited {code}:\n" + "\n".join(err[-30:]))
    call, start = out.split("FIRST_STEP ")[-1].split()[:2]
    return float(call), float(start)


def first_steps(tmp: Path, address: str, pairs: int) -> tuple[dict, dict, dict, float]:
    """(d): ``pairs`` alternating runs of each kind in this process and in new ones, then the
    floor. Returns seconds to the first step ({kind: [per run]}) in a process that ran before, from
    train()/fit() in a new process, from that process's start; and the floor's."""
    warm, cold, launch = ({"ours": [], "fit": []} for _ in range(3))
    for _ in range(pairs):
        warm["ours"].append(run(tmp, "warm", num_workers=1)[1])
        warm["fit"].append(bare_first_step(tmp, minimal_fit_loop))
        for kind in ("ours", "fit"):
            from_call, from_start = first_step_in_new_process(tmp, kind, address)
            cold[kind].append(from_call)
            launch[kind].append(from_start)
    return warm, cold, launch, bare_first_step(tmp, empty_loop)


def tiny_new_process(tmp: Path, kind: str, address: str) -> subprocess.Popen:
    """--tiny: (d)'s new process for ``kind``, started to run beside a Ray Train start-up of this
    process (those start-ups set tiny mode's time), its files in a folder apart from this process's."""
    folder = tmp / "new-processes"
    folder.mkdir(exist_ok=True)
    return start_new_process(tmp, kind, address, folder)


def tiny_first_steps(tmp: Path, address: str, first_step: float,
                     fit: subprocess.Popen) -> tuple[dict, dict, dict, float]:
    """``first_steps`` for --tiny: every code path, two Ray Train start-ups fewer and the rest two
    at a time (three at once slow each other down on 2 cores). ``fit``'s new process started with
    this process's Ray run; ours starts now, beside the floor. "In a process that ran before" takes
    figures at hand: the first Ray run's and the new process's fit (not warm; tiny figures are no
    measurement)."""
    processes = {"ours": tiny_new_process(tmp, "ours", address), "fit": fit}
    try:
        floor = bare_first_step(tmp, empty_loop)
        figures = {kind: first_step_of(process, tmp, kind) for kind, process in processes.items()}
    finally:
        for process in processes.values():
            process.kill()  # no-op once it ended; else it would outlive a failed run
    cold = {kind: [from_call] for kind, (from_call, _) in figures.items()}
    launch = {kind: [from_start] for kind, (_, from_start) in figures.items()}
    return {"ours": [first_step], "fit": cold["fit"]}, cold, launch, floor


def child(opts) -> None:
    ray.init(address=opts.address, configure_logging=False, log_to_driver=False)
    tmp = Path(opts.tmp)
    if opts.child == "ours":
        name = f"cold-{os.getpid()}"
        seconds = run(tmp, name, num_workers=1)[1]
        first_wall = json.loads((tmp / f"{name}.json").read_text())["first_wall"]
    else:
        seconds = bare_first_step(tmp, minimal_fit_loop)
        first_wall = float((tmp / "bare.txt").read_text())
    print(f"FIRST_STEP {seconds} {first_wall - PROCESS_START}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--pairs", type=int, default=3, help="(d): runs of each kind, alternating")
    parser.add_argument("--child", choices=("ours", "fit"), help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    parser.set_defaults(per_class=800)
    opts = tiny.parse(parser, f"{TINY_EPOCHS} short epochs, one pair", epochs=TINY_EPOCHS, pairs=1,
                      per_class=TINY_PER_CLASS)
    if opts.child:
        return child(opts)
    info = start_ray(num_cpus=4, include_dashboard=False, configure_logging=False,
                     runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    tmp = Path(tempfile.mkdtemp(prefix="ray-overhead-"))
    data = folder_data(tmp / "data", per_class=opts.per_class)
    address = info.address_info["address"]
    fit = tiny_new_process(tmp, "fit", address) if opts.tiny else None  # beside the Ray run below
    rates, first_step, cpu = run(tmp, "alternating", alternate=True, data=data, num_workers=1, epochs=opts.epochs)
    local = run(tmp, "in_process", data=data, num_workers=0, epochs=opts.epochs)[0]
    warm, cold, launch, floor = (tiny_first_steps(tmp, address, first_step, fit) if opts.tiny
                                 else first_steps(tmp, address, opts.pairs))
    on = [r for e, r in rates.items() if e >= 2 and e % 2 == 0]
    off = [r for e, r in rates.items() if e >= 2 and e % 2 == 1]
    print("steps/s per epoch, forwarded | not forwarded: "
          + ", ".join(f"{a:.0f}|{b:.0f}" for a, b in zip(on, off)))
    on_rate, off_rate = statistics.median(on), statistics.median(off)
    local_rate = statistics.median(r for e, r in local.items() if e >= 2)
    print(f"steps/s (medians): forwarded {on_rate:.0f}, not forwarded {off_rate:.0f}, in-process {local_rate:.0f}")
    print(f"(a) forwarding on / off: {on_rate / off_rate:.3f}  (target >= 0.97); paired with the epochs either "
          f"side: {paired_ratio(rates):.3f}")
    cpu_on = statistics.median(c for e, c in cpu.items() if e >= 2 and e % 2 == 0)
    cpu_off = statistics.median(c for e, c in cpu.items() if e >= 2 and e % 2 == 1)
    share = (cpu_on - cpu_off) * off_rate  # of a non-forwarded step's wall time
    print(f"    cross-check (CPU time, not counting waits for a core): the training thread's CPU per step is {cpu_on * 1e6:.0f} us "
          f"forwarded, {cpu_off * 1e6:.0f} us not: forwarding takes {share:.1%} of a step, ratio "
          f"{1 / (1 + share):.3f}")
    print(f"(c) Ray 1 worker / in-process (both forwarding): {on_rate / local_rate:.3f}  (target >= 0.95)")
    for name, runs in (("train() / fit() to the first step, in a process that ran before", warm),
                       ("train() / fit() to the first step, each in a new process", cold),
                       ("process start to the first step (a CLI call vs a script)", launch)):
        ours, fit = statistics.median(runs["ours"]), statistics.median(runs["fit"])
        print(f"(d) ours / minimal TorchTrainer fit, {name}: medians {ours:.1f} s / {fit:.1f} s = "
              f"{ours / fit:.2f}  (target <= 1.2)  [runs: "
              + ", ".join(f"{a:.1f}|{b:.1f}" for a, b in zip(runs["ours"], runs["fit"])) + "]")
    print(f"    for reference, a TorchTrainer whose loop does nothing: {floor:.1f} s to its start")
    tiny.end(opts)


if __name__ == "__main__":
    main()

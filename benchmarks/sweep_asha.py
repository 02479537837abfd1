"""ASHA against FIFO on the same space and seed: objective reached, epochs spent, trials per minute.

    python benchmarks/sweep_asha.py [--samples 12] [--epochs 6] [--concurrent 2]

Both sweeps train the same random configurations (same search seed) of the digits classifier.
Target: ASHA's best objective >= 0.98 x FIFO's, using <= 0.5 x FIFO's epochs. Exits 1 when
a target is missed. Figures depend on the machine; they are printed, not asserted in tests.

``--tiny`` runs the same code path end to end (both sweeps, one trial of one epoch each; for the
tests; sizes given on the command line win): its figures are not measurements, and it exits 0
whatever they are.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

import tiny  # noqa: E402  (this folder: the script's own)
from cluster import start_ray  # noqa: E402

SPACE = {"lr0": {"loguniform": [0.0005, 0.3]}, "momentum": {"uniform": [0.6, 0.98]}}
BASE = dict(data="digits", imgsz=16, batch=32, nbs=32, fraction=0.5, verbose=False, plots=False, workers=0,
            optimizer="SGD", warmup_epochs=0.0)  # the search seed is the sweep setting `seed`
TINY = dict(samples=1, epochs=1, concurrent=1)


def run(scheduler, args, folder: Path):
    from orchestrator import Model

    started = time.perf_counter()
    result = Model("cls-n.yaml").tune(
        SPACE, scheduler=scheduler, num_samples=args.samples, max_concurrent=args.concurrent, seed=args.seed,
        name=scheduler if isinstance(scheduler, str) else scheduler["name"], epochs=args.epochs,
        project=str(folder / "runs"), tracking_uri=f"sqlite:///{folder / 'mlflow.db'}",
        storage=str(folder / "store"), **BASE)
    minutes = (time.perf_counter() - started) / 60
    return result, minutes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--concurrent", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = tiny.parse(parser, "1 trial x 1 epoch per sweep", **TINY)
    import ray

    root = str(Path(__file__).resolve().parents[1])
    # The dashboard stays on: Ray Train frees the placement groups of trials Tune stops through the
    # state API it serves; without it those CPUs stay reserved and later trials wait forever. (Tiny
    # mode stops no trial: the test suite's Ray, which has no dashboard, does for it.)
    start_ray(configure_logging=False, log_to_driver=False,
              runtime_env={"env_vars": {"PYTHONPATH": root, "OMP_NUM_THREADS": "1",
                                        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}})
    asha = {"name": "asha", "grace_period": 1, "reduction_factor": 3}
    with tempfile.TemporaryDirectory(prefix="sweep-bench-") as tmp:
        fifo, fifo_min = run("fifo", args, Path(tmp))
        early, asha_min = run(asha, args, Path(tmp))
    fifo_epochs, asha_epochs = int(fifo.trials["epochs"].sum()), int(early.trials["epochs"].sum())
    quality = early.best_objective / fifo.best_objective
    cost = asha_epochs / fifo_epochs
    print(f"\n{args.samples} trials x {args.epochs} epochs, {args.concurrent} at a time, search seed {args.seed}")
    print(f"FIFO: best objective {fifo.best_objective:.4f}, {fifo_epochs} epochs, {fifo_min:.2f} min, "
          f"{args.samples / fifo_min:.2f} trials/min")
    print(f"ASHA: best objective {early.best_objective:.4f}, {asha_epochs} epochs, {asha_min:.2f} min, "
          f"{args.samples / asha_min:.2f} trials/min")
    print(f"ASHA/FIFO objective ratio {quality:.4f} (target >= 0.98)")
    print(f"ASHA/FIFO epochs ratio    {cost:.4f} (target <= 0.5)")
    print(f"ASHA/FIFO time ratio      {asha_min / fifo_min:.4f}")
    ok = quality >= 0.98 and cost <= 0.5
    print("targets met" if ok else "TARGETS MISSED")
    ray.shutdown()
    tiny.end(args)
    return 0 if ok or args.tiny else 1


if __name__ == "__main__":
    sys.exit(main())

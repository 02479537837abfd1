"""Detection quality: mAP50 on shapes8's val split after a CPU run of det-n.yaml with only
``epochs=`` set: everything else is the defaults (``nbs`` and warmup scaled to the data set, the
augmentation strengths to the run's length: ``trainers/engine/setup.scaled_to_data``).

Targets (issue 16): mAP50 >= 0.8 in at most 10 minutes on this machine, in this process (as
``orchestrator train model=det-n.yaml data=shapes8.yaml epochs=50`` runs). ``--recipe`` trains with
the README main job's short-run recipe (``examples/det-shapes8.yaml``) instead, for comparison.

Usage: OMP_NUM_THREADS=1 python benchmarks/detect_quality.py [--epochs 50] [--recipe]

``--tiny`` runs the same code path end to end (one epoch on a tenth of the training set, in this
process as always; seconds, for the tests): its figures are not measurements. shapes8 is
generated under ``datasets/`` in the working directory on first use.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import tiny
from orchestrator import Model

TARGET, BUDGET = 0.8, 600.0  # mAP50, seconds
RECIPE = dict(batch=16, nbs=16, optimizer="AdamW", lr0=0.003, warmup_epochs=0.5, lrf=0.1,
              scale=0.0, hsv_h=0.0, hsv_s=0.0, hsv_v=0.0, fliplr=0.0)
TINY = dict(fraction=0.1)  # with one epoch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--recipe", action="store_true", help="the main job's recipe instead of the defaults")
    opts = tiny.parse(parser, "one epoch on a tenth of the data", epochs=1)
    settings = {**(RECIPE if opts.recipe else {}), **(TINY if opts.tiny else {})}
    tmp = tempfile.mkdtemp(prefix="detect-quality-")
    start = time.time()
    metrics = Model("det-n.yaml").train(data="shapes8.yaml", epochs=opts.epochs, verbose=False, plots=False,
                                        project=tmp, tracking_uri=f"sqlite:///{tmp}/mlflow.db",
                                        storage=f"{tmp}/store", journal=f"{tmp}/journal", **settings)
    took = time.time() - start
    what = f"recipe {RECIPE}" if opts.recipe else "the defaults"
    print(f"shapes8 val mAP50 {metrics.box.map50:.4f} (mAP50-95 {metrics.box.map:.4f}) after {opts.epochs} "
          f"epochs with {what} in {took:.0f} s (target {TARGET}: ratio {metrics.box.map50 / TARGET:.3f}; "
          f"time budget {BUDGET:.0f} s: ratio {took / BUDGET:.3f})")
    tiny.end(opts)


if __name__ == "__main__":
    main()

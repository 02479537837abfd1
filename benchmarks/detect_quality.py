"""Detection quality: mAP50 on shapes8's val split after a CPU run of det-n.yaml.

Target (issue): mAP50 >= 0.8, trained on a 2-core CPU in at most 10 minutes.

The recipe suits a 480-image training set and a short run: one optimizer step per batch of 16
(``nbs=16``; the global ``nbs=64`` accumulates 4 batches, leaving 7 steps an epoch), AdamW at
0.003 with a short warmup, decaying to a tenth, and no scale, colour or flip augmentation (each
of them cost 0.2-0.35 mAP50 after 10 epochs here; only the loader's built-in small translation
remains). ``--defaults`` trains with the global defaults instead, for comparison.

Usage: OMP_NUM_THREADS=1 python benchmarks/detect_quality.py [--epochs 25] [--defaults]

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

TARGET = 0.8
RECIPE = dict(batch=16, nbs=16, optimizer="AdamW", lr0=0.003, warmup_epochs=0.5, lrf=0.1,
              scale=0.0, hsv_h=0.0, hsv_s=0.0, hsv_v=0.0, fliplr=0.0)
TINY = dict(fraction=0.1)  # with one epoch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--defaults", action="store_true", help="global defaults instead of the recipe")
    opts = tiny.parse(parser, "one epoch on a tenth of the data", epochs=1)
    recipe = {**({} if opts.defaults else RECIPE), **(TINY if opts.tiny else {})}
    tmp = tempfile.mkdtemp(prefix="detect-quality-")
    start = time.time()
    metrics = Model("det-n.yaml").train(data="shapes8.yaml", epochs=opts.epochs, verbose=False, plots=False,
                                        project=tmp, tracking_uri=f"sqlite:///{tmp}/mlflow.db",
                                        storage=f"{tmp}/store", **recipe)
    map50, map5095 = metrics["metrics/mAP50(B)"], metrics["metrics/mAP50-95(B)"]
    what = "global defaults" if opts.defaults else f"recipe {RECIPE}"
    print(f"shapes8 val mAP50 {map50:.4f} (mAP50-95 {map5095:.4f}) after {opts.epochs} epochs with {what} "
          f"in {time.time() - start:.0f} s (target {TARGET}: ratio {map50 / TARGET:.3f})")
    tiny.end(opts)


if __name__ == "__main__":
    main()

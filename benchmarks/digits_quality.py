"""Classification quality: held-out top-1 on scikit-learn's digits after a short CPU run.

Target (issue 2): top-1 >= 0.95 in <= 10 epochs on a 2-core CPU.
Usage: OMP_NUM_THREADS=1 python benchmarks/digits_quality.py [--epochs 10]
"""
from __future__ import annotations

import argparse
import tempfile
import time

from orchestrator import Model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=10)
    epochs = parser.parse_args().epochs
    tmp = tempfile.mkdtemp(prefix="digits-")
    start = time.time()
    metrics = Model("cls-n.yaml").train(data="digits", epochs=epochs, verbose=False, project=tmp,
                                        tracking_uri=f"sqlite:///{tmp}/mlflow.db", storage=f"{tmp}/store")
    top1 = metrics["metrics/accuracy_top1"]
    print(f"digits held-out top-1 after {epochs} epochs: {top1:.4f} in {time.time() - start:.0f} s "
          f"(target 0.95: ratio {top1 / 0.95:.3f})")


if __name__ == "__main__":
    main()

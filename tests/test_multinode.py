"""Rank 0 on another node than the driver: the files its records name still reach the sinks.

tests/multinode_run.py runs one training on a two-node Ray cluster (two raylets on this machine,
the worker pinned to the second) with S3 storage (moto over HTTP) and MLflow on SQLite.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from tests.helpers import artifact_paths

ROOT = Path(__file__).resolve().parents[1]


def test_artifacts_of_a_remote_rank0_reach_mlflow_and_storage(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "multinode_run.py"), str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["driver_node"] != result["worker_node"]
    assert "not found on the driver" not in out.stdout + out.stderr

    # Records name rank 0's files by their URI in the shared store, not by a worker-local path.
    files = f"s3://multinode/store/runs/{result['run_id']}/files/rank0/"
    end = next(r for r in result["records"] if r["event"] == "on_train_end")
    assert {"results.csv", "args.yaml", "best", "results.png"} <= set(end["artifacts"])
    assert all(uri.startswith(files) for uri in end["artifacts"].values()), end["artifacts"]
    keys = set(result["keys"])
    assert {f"runs/{result['run_id']}/weights/best.pt", f"runs/{result['run_id']}/weights/last.pt"} <= keys

    # The driver-side MLflow sink fetched them.
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("runs").experiment_id])[0]
    assert run.info.status == "FINISHED"
    paths = set(artifact_paths(client, run.info.run_id))
    assert {"results.csv", "args.yaml", "results.png", "weights/best.pt"} <= paths, paths
    assert Path(result["loaded"]).name == "best.pt"  # Model.train loaded best.pt through the store

"""The Ray a benchmark script runs on: the cluster ``RAY_ADDRESS`` names (the test suite hands its
session's to the scripts' tiny runs, which then skip a Ray start and stop of their own), else a
local Ray of the script's own, started with the script's settings (what a measurement wants: no
other work on its cores)."""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JOIN_KEYS = ("configure_logging", "log_to_driver", "logging_level")  # what ray.init takes when joining


def start_ray(**own):
    """``ray.init`` joining the cluster in ``RAY_ADDRESS``, or starting one with ``own``. A joined
    cluster's workers get this checkout on their path and one intra-op thread, as the scripts' own
    Rays give theirs (through the environment they inherit)."""
    import ray

    address = os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        env = {**own.get("runtime_env", {}).get("env_vars", {}), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        return ray.init(address=address, runtime_env={"env_vars": env},
                        **{k: v for k, v in own.items() if k in JOIN_KEYS})
    return ray.init(address="local", **own)

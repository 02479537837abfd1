"""Session fixtures: one Ray session for every test that needs Ray (start-up costs seconds)."""
import logging
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Small models on a few cores: one intra-op thread per process is several times faster than
# oversubscribed threads (subprocesses and Ray workers inherit this).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Runs honour these when tracking_uri/experiment are not given (trainers/config.py ENV_VARS): a
# developer's shell must not send the suite's runs to their MLflow server. Tests set them with
# monkeypatch where they test them.
for _name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
    os.environ.pop(_name, None)


def pytest_collection_modifyitems(items):
    """The benchmarks' smoke runs go last (a stable sort keeps the rest in order). They join the
    session's Ray, which tests/test_e2e_tracking.py must start: Ray's workers inherit the S3
    settings it puts in the environment first."""
    items.sort(key=lambda item: item.path.name == "test_benchmarks.py")


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny tensors: one intra-op thread is faster than two, and steadier on a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray with room for 2 training workers plus their controller and actors, and for the
    placement groups (1 CPU each) of sweep trials Tune paused or stopped: Ray Train's cleaner frees
    them through the state API, which this Ray (no dashboard) does not serve, so a PBT sweep's
    resumed trial could otherwise wait for a CPU forever (``tests/test_sweeps.py``, ``sweep_ray``)."""
    import ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    started = not ray.is_initialized()
    if started:
        from orchestrator.ray_launch import LOCAL_RAY_ENV  # one local node, as the embedded Ray

        ray.init(num_cpus=6, include_dashboard=False, configure_logging=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
                                           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", **LOCAL_RAY_ENV}})
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Two MLflow servers for a module, started in parallel: the main one and a replay target."""
    from tests.servers import MlflowServer, running

    root = tmp_path_factory.mktemp("mlflow")
    with running([MlflowServer(root / "main"), MlflowServer(root / "replay")]) as pair:
        yield pair


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def _logged(level: int):
    """The orchestrator logger's records of ``level`` and up (it does not propagate to pytest's caplog)."""
    from trainers.utils import LOGGER

    handler = _Records()
    handler.setLevel(level)
    LOGGER.addHandler(handler)
    yield handler.records
    LOGGER.removeHandler(handler)


@pytest.fixture
def warnings_seen():
    yield from _logged(logging.WARNING)


@pytest.fixture
def info_seen():
    yield from _logged(logging.INFO)

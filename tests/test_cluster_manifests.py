"""The cluster manifests (infra/cluster) and the image recipe (infra/docker) say what the code needs.

Nothing here reaches a cloud: the `ray up` file goes through Ray's own config preparation and
schema check, the RayJob entrypoint goes through the two shells it meets on Kubernetes, and the
experiment config inside the manifest goes through the orchestrator's config validation.
"""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from callbacks.sinks.redact import key_looks_secret
from trainers.config import get_cfg, parse_overrides

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "infra" / "cluster"
DOCKER = ROOT / "infra" / "docker"
AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")


def no_inline_secrets(text: str) -> None:
    assert not AWS_KEY_ID.search(text), "an AWS access key id is written in the manifest"
    for line in text.splitlines():
        code = line.split("#", 1)[0]
        assert not re.search(r"(?i)(secret_access_key|password|auth_token)\s*[=:]\s*[^\s{}]+\S*\s*$", code) \
            or "secretKeyRef" in code or "~/.ray/auth_token" in code, f"inline secret value: {line.strip()}"


# ---------------------------------------------------------------------------------------- ray up (AWS)
@pytest.fixture(scope="module")
def aws():
    return yaml.safe_load((CLUSTER / "aws.yaml").read_text())


def test_aws_config_passes_rays_own_preparation_and_schema(aws):
    import copy

    from ray.autoscaler._private.util import prepare_config, validate_config

    full = prepare_config(copy.deepcopy(aws))
    validate_config(full)
    assert full["provider"]["type"] == "aws"
    assert full["head_node_type"] in full["available_node_types"]


def test_aws_nodes_resources_and_images(aws):
    types = aws["available_node_types"]
    head = types[aws["head_node_type"]]
    assert head["resources"]["CPU"] == 0, "training workers and trials must not land on the head"
    workers = {name: t for name, t in types.items() if name != aws["head_node_type"]}
    gpu = [t for t in workers.values() if t["resources"].get("GPU", 0) >= 1]
    cpu = [t for t in workers.values() if not t["resources"].get("GPU")]
    assert gpu and cpu, "a GPU and a CPU worker type"
    for node in workers.values():
        assert node["resources"]["CPU"] >= 1 and node["max_workers"] >= 1
        # S3 access by instance role: workers upload checkpoints themselves
        assert node["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")
    image = aws["docker"]["image"]
    assert image.endswith("-cpu") and "ray-orchestrator" in image
    for node in gpu:
        assert node["docker"]["worker_image"] == image[: -len("cpu")] + "gpu"


def test_aws_token_auth_everywhere(aws):
    assert "--env=RAY_AUTH_MODE=token" in aws["docker"]["run_options"]
    assert aws["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    head = " ".join(aws["head_start_ray_commands"])
    assert "ray start --head" in head and "--dashboard-host=0.0.0.0" in head
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c for c in aws["worker_start_ray_commands"])
    assert aws["setup_commands"] == [], "nodes run the image as built: nothing installed at start"
    no_inline_secrets((CLUSTER / "aws.yaml").read_text())


# ---------------------------------------------------------------------------------------- KubeRay RayJob
@pytest.fixture(scope="module")
def rayjob():
    docs = list(yaml.safe_load_all((CLUSTER / "rayjob.yaml").read_text()))
    by_kind = {d["kind"]: d for d in docs}
    assert set(by_kind) == {"ConfigMap", "RayJob"}, "no Secret (with values) in the manifest"
    return by_kind


def head_container(job):
    return job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def worker_groups(job):
    return job["spec"]["rayClusterSpec"]["workerGroupSpecs"]


def exp_config(rayjob):
    cm = rayjob["ConfigMap"]
    (name, text), = cm["data"].items()
    return name, yaml.safe_load(text)


def through_shells(entrypoint: str, env: dict, program: str) -> list[str]:
    """argv the program gets after KubeRay's submitter shell (K8sJobMode) and Ray's driver shell.

    ``program`` replaces ``python -m orchestrator train`` so the arguments are printed, not run.
    """
    entry = entrypoint.replace("python -m orchestrator train", program)
    printer = f"{shlex.quote(sys.executable)} -c 'import json,sys; print(json.dumps(sys.argv[1:]))'"
    # 1. the submitter pod: `ray job submit ... -- <entrypoint>` is one shell line; the head's
    #    variables are not defined there
    submitted = json.loads(subprocess.run(["/bin/sh", "-c", f"{printer} {entry}"], env={"PATH": "/usr/bin:/bin"},
                                          capture_output=True, text=True, check=True).stdout)
    # 2. `ray job submit` re-quotes its arguments (shlex.join); the job driver runs it with a shell
    #    in the head pod's environment
    out = subprocess.run(["/bin/sh", "-c", shlex.join(submitted)], env={"PATH": "/usr/bin:/bin", **env},
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def test_rayjob_experiment_config_is_valid_and_mounted(rayjob):
    name, cfg = exp_config(rayjob)
    args = get_cfg(cfg)  # unknown keys or bad values raise UserError
    assert args.num_workers >= 1
    head = head_container(rayjob["RayJob"])
    entry = rayjob["RayJob"]["spec"]["entrypoint"]
    cfg_path = re.search(r"cfg=(\S+)", entry).group(1)
    mount = next(m for m in head["volumeMounts"] if cfg_path.startswith(m["mountPath"] + "/"))
    assert cfg_path == f"{mount['mountPath']}/{name}"
    volumes = rayjob["RayJob"]["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["volumes"]
    volume = next(v for v in volumes if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == rayjob["ConfigMap"]["metadata"]["name"]


@pytest.mark.parametrize("mode", ["K8sJobMode", "HTTPMode"])
def test_rayjob_entrypoint_reaches_the_driver_with_the_head_environment(rayjob, mode, monkeypatch):
    job = rayjob["RayJob"]
    entry = job["spec"]["entrypoint"]
    assert job["spec"]["submissionMode"] == "K8sJobMode"
    env = {e["name"]: e["value"] for e in head_container(job)["env"] if "value" in e}
    printer = f'{sys.executable} -c "import json,sys; print(json.dumps(sys.argv[1:]))"'
    if mode == "K8sJobMode":
        argv = through_shells(entry, env, printer)
    else:  # HTTPMode: the entrypoint string goes to Ray as is
        script = entry.replace("python -m orchestrator train", printer)
        argv = json.loads(subprocess.run(["/bin/sh", "-c", script], env={"PATH": "/usr/bin:/bin", **env},
                                         capture_output=True, text=True, check=True).stdout)
    overrides = parse_overrides(argv)
    assert overrides["storage"] == env["ORCHESTRATOR_STORAGE"] and str(overrides["storage"]).startswith("s3://")
    assert overrides["cfg"].startswith("/")
    for name, value in env.items():  # the driver's environment: MLflow's and AWS's own variables
        monkeypatch.setenv(name, value)
    args = get_cfg(None, {k: v for k, v in overrides.items() if k != "cfg"})  # every key is a config key
    assert args.tracking_uri == env["MLFLOW_TRACKING_URI"] and args.s3_region == env["AWS_DEFAULT_REGION"]


def test_rayjob_cluster_auth_version_and_images(rayjob):
    import ray

    spec = rayjob["RayJob"]["spec"]["rayClusterSpec"]
    assert spec["authOptions"]["mode"] == "token"
    assert spec["rayVersion"].split(".")[:2] == ray.__version__.split(".")[:2]
    pin = re.search(r'"ray\[[^\]]*\]==([\d.]+)', (ROOT / "pyproject.toml").read_text()).group(1)
    assert spec["rayVersion"].startswith(pin.rstrip(".*"))
    head_image = head_container(rayjob["RayJob"])["image"]
    assert head_image.rsplit(":", 1)[0].endswith("/ray-orchestrator")
    for group in worker_groups(rayjob["RayJob"]):
        image = group["template"]["spec"]["containers"][0]["image"]
        assert image.rsplit(":", 1)[0] == head_image.rsplit(":", 1)[0]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_rayjob_worker_resources_fit_the_run(rayjob):
    _, cfg = exp_config(rayjob)
    args = get_cfg(cfg)
    per_worker_cpu = (args.resources_per_worker or {}).get("CPU", 1)
    slots = 0
    for group in worker_groups(rayjob["RayJob"]):
        container = group["template"]["spec"]["containers"][0]
        limits = container["resources"]["limits"]
        assert container["resources"]["requests"] == limits, "guaranteed pods: what Ray sees is what it gets"
        cpus, gpus = float(limits["cpu"]), int(limits.get("nvidia.com/gpu", 0))
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        per_pod = gpus if args.use_gpu else int(cpus // per_worker_cpu)
        assert cpus >= per_worker_cpu * max(per_pod, 1)
        slots += group["replicas"] * per_pod
    assert slots >= args.num_workers, f"{args.num_workers} Ray Train workers need {args.num_workers} slots"


def test_rayjob_credentials_come_from_secrets(rayjob):
    job = rayjob["RayJob"]
    containers = [head_container(job)] + [g["template"]["spec"]["containers"][0] for g in worker_groups(job)]
    for container in containers:
        env = {e["name"]: e for e in container["env"]}
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert "value" not in env[name] and env[name]["valueFrom"]["secretKeyRef"]["key"] == name
        for name, entry in env.items():
            if key_looks_secret(name) or name.endswith(("_PASSWORD", "_KEY_ID")):
                assert "value" not in entry and "secretKeyRef" in entry["valueFrom"], name
    no_inline_secrets((CLUSTER / "rayjob.yaml").read_text())


# ---------------------------------------------------------------------------------------- Dockerfile
def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile instruction, continuation lines joined."""
    out, current = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        current += " " + stripped.rstrip("\\").strip() if current else stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            word, _, rest = current.partition(" ")
            out.append((word.upper(), rest.strip()))
            current = ""
    return out


def test_dockerfile_installs_pinned_torch_then_the_package():
    steps = instructions(DOCKER / "Dockerfile")
    assert steps[0] == ("FROM", "python:3.11-slim")
    args = dict(a.split("=", 1) for i, a in steps if i == "ARG")
    readme_pin = re.search(r"torch==([\d.]+)", (ROOT / "README.md").read_text()).group(1)
    assert args["TORCH_VERSION"] == readme_pin
    runs = [(n, a) for n, (i, a) in enumerate(steps) if i == "RUN"]
    torch_at = next(n for n, a in runs if 'pip install "torch==${TORCH_VERSION}"' in a)
    package_at = next(n for n, a in runs if re.search(r"pip install \.(\s|$)", a))
    copies = {n: a.split()[0] for n, (i, a) in enumerate(steps) if i == "COPY"}
    include = re.search(r"include = \[([^\]]*)\]", (ROOT / "pyproject.toml").read_text()).group(1)
    packages = {p.strip().strip('"').rstrip("*") for p in include.split(",")}
    assert packages | {"pyproject.toml"} <= set(copies.values())
    assert all((ROOT / src).exists() for src in copies.values())
    assert torch_at < min(copies) and max(copies) < package_at
    assert steps[-1][0] == "WORKDIR" and any(i == "USER" and a != "root" for i, a in steps)


def test_dockerignore_keeps_local_state_out():
    ignored = {line.strip() for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".venv", "runs", "datasets", "mlruns", ".git"} <= ignored

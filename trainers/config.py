"""Configuration: defaults YAML + user YAML + key=value overrides, validated with pydantic.

`default.yaml` is the single list of keys and defaults; the schema below only adds a type where
the default value does not tell it (null defaults, unions).
"""
from __future__ import annotations

import difflib
import math
import os
import re
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Optional, Union, get_args, get_origin

import yaml
from pydantic import ConfigDict, ValidationError, create_model

from trainers.utils import UserError, yaml_problem

DEFAULT_CFG_PATH = Path(__file__).with_name("default.yaml")
DEFAULTS: dict[str, Any] = yaml.safe_load(DEFAULT_CFG_PATH.read_text())

# Config keys that the ecosystem's standard environment variables set when the key is not given:
# a cfg file, key=value or a keyword always wins, the environment wins over default.yaml. The first
# variable set wins (boto3's order). MLflow users expect MLFLOW_TRACKING_URI and MLFLOW_EXPERIMENT_NAME;
# AWS users their endpoint, region and profile. The run's args (args.yaml, MLflow params) show the value used.
ENV_VARS: dict[str, tuple[str, ...]] = {
    "tracking_uri": ("MLFLOW_TRACKING_URI",),
    "experiment": ("MLFLOW_EXPERIMENT_NAME",),
    "s3_endpoint": ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
    "s3_region": ("AWS_DEFAULT_REGION", "AWS_REGION"),
    "s3_profile": ("AWS_DEFAULT_PROFILE", "AWS_PROFILE"),
}

# Keys whose type is not the type of their default.
_TYPES: dict[str, Any] = {
    "task": Optional[str], "model": Optional[str], "data": Optional[str],
    "imgsz": Optional[int], "device": Optional[Union[int, str]], "project": Optional[str],
    "name": Optional[str], "resume": Union[bool, str], "freeze": Optional[Union[int, list[int]]],
    "conf": Optional[float], "source": Optional[Any], "fitness_weights": Optional[list[float]],
    "resources_per_worker": Optional[dict[str, float]], "warmup_epochs": Optional[float],
    "nbs": Optional[int], "hsv_h": Optional[float], "hsv_s": Optional[float], "hsv_v": Optional[float],
    "scale": Optional[float],
    "fraction": float, "lr0": float, "lrf": float, "momentum": float, "weight_decay": float,
    "clip_grad": float, "ckpt_upload_interval": float, "system_metrics": float,
    "register": Optional[Union[bool, str]],
    "experiment": Optional[str], "s3_endpoint": Optional[str], "s3_region": Optional[str],
    "s3_profile": Optional[str], "num_workers": Any,
}
_CHOICES = {
    "task": {None, "classify", "detect"}, "mode": {"train", "val", "predict", "export"},
    "optimizer": {"auto", "SGD", "Adam", "AdamW", "RMSProp"}, "format": {"torchscript", "onnx"},
}

with warnings.catch_warnings():  # the key `register` shadows a deprecated BaseModel classmethod
    warnings.filterwarnings("ignore", message='Field name "register"')
    Schema = create_model(
        "Config",
        __config__=ConfigDict(extra="forbid", strict=False),
        **{k: (_TYPES.get(k, type(v) if v is not None else Optional[Any]), v) for k, v in DEFAULTS.items()},
    )


class Args(SimpleNamespace):
    """Config values with attribute access (``trainer.args.epochs``) that also iterate as a dict."""

    def __iter__(self):
        return iter(vars(self).items())

    def get(self, key, default=None):
        return getattr(self, key, default)

    def to_dict(self) -> dict:
        return dict(vars(self))


def env_value(*names: str) -> str | None:
    """The first of the variables ``names`` that is set and not empty."""
    return next((os.environ[name] for name in names if os.environ.get(name)), None)


def defaults() -> dict:
    """default.yaml's values, with those the environment sets in this process (``ENV_VARS``)."""
    found = {key: env_value(*names) for key, names in ENV_VARS.items()}
    return {**DEFAULTS, **{key: value for key, value in found.items() if value is not None}}


def closest_key(key: str) -> str:
    match = difflib.get_close_matches(key, DEFAULTS, n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else ""


def parse_value(text: str):
    """A CLI value: YAML scalars/lists (``5``, ``true``, ``[1, 2]``, ``null``), else the string."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"argument {pair!r} is not key=value; valid keys are listed by --help")
        out[key.strip()] = parse_value(value.strip())
    return out


def load_yaml(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"config file {path} is not valid YAML ({yaml_problem(exc)})") from None
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not valid YAML (not UTF-8 text)") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of key: value")
    return data


def validate(values: dict) -> Args:
    """Check keys and types of a full or partial config; return the full config."""
    for key in values:
        if key not in DEFAULTS:
            raise UserError(f"unknown config key '{key}'{closest_key(key)}")
    try:
        cfg = Schema(**{**defaults(), **values}).model_dump()
    except ValidationError as exc:
        err = exc.errors()[0]
        key = err["loc"][0]
        want = type_words(_TYPES.get(key, type(DEFAULTS[key])))
        raise UserError(f"config key '{key}': value {values.get(key)!r} is not valid "
                        f"(expected {want})") from None
    for key, allowed in _CHOICES.items():
        if cfg[key] not in allowed:
            options = ", ".join(sorted(str(a) for a in allowed if a is not None))
            raise UserError(f"config key '{key}': value {cfg[key]!r} is not one of {options}")
    cfg["num_workers"] = check_num_workers(cfg["num_workers"])
    check_ranges(cfg)
    check_batch_split(cfg["batch"], cfg["num_workers"])
    check_register(cfg["register"])
    cfg["device"] = check_device(cfg["device"])
    check_optimizer_values(cfg["optimizer"], cfg["lr0"], cfg["momentum"], cfg["weight_decay"])
    return Args(**cfg)


# The values each numeric key takes (a null default stays allowed): a value outside fails here,
# naming its key, instead of deep in torch after the run started.
_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "epochs": (lambda v: v >= 1, "an int >= 1"),
    "batch": (lambda v: v >= 1, "an int >= 1, the global batch; AutoBatch, batch=-1, is not supported"),
    "imgsz": (lambda v: v >= 1, "an int >= 1"),
    "nbs": (lambda v: v >= 1, "an int >= 1"),
    "workers": (lambda v: v >= 0, "an int >= 0"),
    "fraction": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "warmup_epochs": (lambda v: v >= 0, "a number >= 0"),
    "iou": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "conf": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "max_det": (lambda v: v >= 1, "an int >= 1"),
    "fitness_weights": (lambda v: len(v) == 4, "4 weights over [P, R, mAP50, mAP50-95]"),
    "max_preemptions": (lambda v: v >= -1, "an int >= 0, or -1 for no limit"),
    "log_every_n_steps": (lambda v: v >= 1, "an int >= 1"),
    "lr0": (lambda v: 0 <= v < math.inf, "a number >= 0"),
    "lrf": (lambda v: 0 <= v < math.inf, "a number >= 0"),
    "clip_grad": (lambda v: 0 < v < math.inf, "a number > 0: the largest gradient norm a step takes"),
    "fliplr": (lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
    "hsv_h": (lambda v: 0 <= v <= 1, "a fraction in [0, 1]"),
    "hsv_s": (lambda v: 0 <= v <= 1, "a fraction in [0, 1]"),
    "hsv_v": (lambda v: 0 <= v <= 1, "a fraction in [0, 1]"),
    "scale": (lambda v: 0 <= v < 1, "a gain in [0, 1)"),
    "freeze": (lambda v: min(v if isinstance(v, list) else [v], default=0) >= 0, "layer indices >= 0"),
    "system_metrics": (lambda v: v >= 0, "seconds >= 0, 0 = off"),
    "ckpt_upload_interval": (lambda v: v >= 0, "seconds >= 0"),
}
DEVICE = re.compile(r"cpu|mps|(cuda|xpu)(:\d+)?|\d+")  # a bare index is a CUDA device's


def type_words(kind) -> str:
    """A key's type as its error says it: ``int or a list of int or null``, not typing's repr."""
    args = [a for a in get_args(kind)]
    if get_origin(kind) is Union:
        return " or ".join(type_words(a) for a in args)
    if get_origin(kind) is list:
        return f"a list of {type_words(args[0])}"
    if get_origin(kind) is dict:
        return f"a mapping of {type_words(args[0])} to {type_words(args[1])}"
    return {type(None): "null", Any: "any value"}.get(kind, getattr(kind, "__name__", str(kind)))


def check_ranges(cfg: dict) -> None:
    for key, (ok, expected) in _RANGES.items():
        if cfg[key] is not None and not ok(cfg[key]):
            raise UserError(f"config key '{key}': value {cfg[key]!r} is not valid (expected {expected})")


def check_batch_split(batch: int, num_workers) -> None:
    """The global batch is split over the workers (``trainers.engine.setup.split_batch``): fewer
    images than workers would make each worker train on one, a larger batch than asked, silently.
    An elastic run is checked at its largest size."""
    most = worker_counts(num_workers)[1]
    if batch < most:
        raise UserError(f"config keys 'batch', 'num_workers': a global batch of {batch} over up to {most} "
                        f"workers leaves a worker less than one image a step (use batch >= {most})")


def check_register(name) -> None:
    """A name MLflow's registry refuses would be found only after training, and stay unpublished."""
    if isinstance(name, str) and (not name.strip() or any(c in name for c in "/:")):
        raise UserError(f"config key 'register': value {name!r} is not valid (expected true or a model name "
                        f"without '/' or ':')")


def check_device(device: int | str | None) -> str | None:
    """The device's form only (``0`` is ``cuda:0``): whether it is there is for the machine that
    trains to say (``trainers.engine.distributed.select_device``). An empty one is Ultralytics'
    "pick for me", as null is."""
    if device is None or device == "":
        return None
    if isinstance(device, bool) or not DEVICE.fullmatch(str(device)):
        raise UserError(f"config key 'device': value {device!r} is not valid (expected cpu, cuda, cuda:<index>, "
                        f"<index>, mps or xpu; null picks cuda when there is one)")
    return f"cuda:{device}" if str(device).isdigit() else device


WORKER_RANGE = re.compile(r"(\d+)(?:\s*-\s*(\d+))?")  # "2-4" (or a count as text, "2")


def check_num_workers(value) -> int | str:
    """A count (``0`` = in this process) or, for an elastic run, a range ``"min-max"``: written
    ``2-4`` (the CLI's form) or ``[2, 4]`` (YAML, Python), kept as ``"2-4"`` so that args.yaml,
    MLflow's params and a checkpoint's args show it as the user wrote it. A range of one size is
    that count."""
    counts = worker_counts(value)
    if counts is None or not (counts[0] == counts[1] >= 0 or 1 <= counts[0] <= counts[1]):
        raise UserError(f"config key 'num_workers': value {value!r} is not valid (expected a count >= 0, "
                        f"or a range min-max with 1 <= min <= max, e.g. 2-4 or [2, 4])")
    return counts[0] if counts[0] == counts[1] else f"{counts[0]}-{counts[1]}"


def worker_counts(num_workers) -> tuple[int, int] | None:
    """``(min, max)`` Ray Train workers of ``num_workers`` (a count is both ends); None when it is
    neither a count nor a range. Everything that sizes a run reads ``num_workers`` through this."""
    if isinstance(num_workers, int) and not isinstance(num_workers, bool):
        return num_workers, num_workers
    if isinstance(num_workers, (list, tuple)) and len(num_workers) == 2:
        num_workers = "-".join(str(n) for n in num_workers)
    match = WORKER_RANGE.fullmatch(num_workers.strip()) if isinstance(num_workers, str) else None
    return (int(match[1]), int(match[2] or match[1])) if match else None


def describe_workers(num_workers) -> str:
    """The world size as a run's tags and description show it: ``2``, or ``2-4`` for an elastic run
    (``1`` for a run in this process)."""
    low, high = worker_counts(num_workers)
    return str(max(high, 1)) if low == high else f"{low}-{high}"


def check_optimizer_values(optimizer: str, lr0: float, momentum: float, weight_decay: float) -> None:
    """torch's limits on the optimizer's arguments, said in config keys (torch's own errors name none).
    ``validate`` checks the configured optimizer; ``make_optimizer`` checks the one ``auto`` chose."""
    for key, value in (("lr0", lr0), ("momentum", momentum), ("weight_decay", weight_decay)):
        if value < 0:
            raise UserError(f"config key '{key}': value {value!r} is not valid (expected a number >= 0)")
    if optimizer == "SGD" and momentum == 0:
        raise UserError(f"config keys 'optimizer', 'momentum': SGD uses Nesterov momentum, which needs "
                        f"momentum > 0 (got momentum={momentum!r})")
    if optimizer in {"Adam", "AdamW"} and momentum >= 1:
        raise UserError(f"config keys 'optimizer', 'momentum': momentum is {optimizer}'s beta1, which must be "
                        f"< 1 (got momentum={momentum!r})")


def get_cfg(cfg: str | Path | dict | None = None, overrides: dict | None = None) -> Args:
    """Defaults, then the environment (``ENV_VARS``), then a YAML file or dict ``cfg``, then
    ``overrides``; validated."""
    return validate({**given_values(cfg), **(overrides or {})})


def given_values(cfg: str | Path | dict | None) -> dict:
    """What a YAML file or dict sets itself, defaults left out."""
    return dict(load_yaml(cfg) if isinstance(cfg, (str, Path)) else (cfg or {}))

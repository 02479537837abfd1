"""The sweep YAML: schema, loading and validation (before any trial starts).

A sweep file holds the base experiment config (``cfg:`` a config YAML, then ``base:`` keys
on top), a search ``space`` over config keys, and how to search it. Every mistake is a
one-line ``UserError`` naming the key; unknown keys get the closest valid name.
"""
from __future__ import annotations

import difflib
import json
import math
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from trainers.config import DEFAULTS, Args, get_cfg, load_yaml, parse_overrides, validate
from trainers.utils import UserError

DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice", "grid")
SCHEDULERS = ("fifo", "asha", "pbt")
SEARCHES = ("random", "grid", "optuna")
# Keys that name or place a run, or size it: set once per sweep, never sampled.
NOT_SEARCHABLE = {"mode", "resume", "register", "project", "name", "exist_ok", "tracking_uri", "storage",
                  "experiment", "s3_endpoint", "s3_region", "s3_profile",
                  "num_workers", "use_gpu", "resources_per_worker", "task"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AshaOptions(_Strict):
    grace_period: int = Field(1, ge=1)        # epochs every trial gets before it can be stopped
    reduction_factor: float = Field(2.0, gt=1)  # keep the top 1/reduction_factor at each rung
    max_t: Optional[int] = Field(None, ge=1)  # epochs of the longest trial; null = base epochs
    brackets: int = Field(1, ge=1)


class PbtOptions(_Strict):
    perturbation_interval: int = Field(1, ge=1)  # epochs between exploit/explore decisions
    burn_in_period: int = Field(0, ge=0)          # epochs before the first decision
    quantile_fraction: float = Field(0.25, ge=0, le=0.5)
    resample_probability: float = Field(0.25, ge=0, le=1)
    synch: bool = False                           # decide when all trials reached the interval
    mutate: Optional[list[str]] = None            # space keys PBT mutates; null = all of them


SCHEDULER_OPTIONS = {"fifo": _Strict, "asha": AshaOptions, "pbt": PbtOptions}


class SweepSettings(_Strict):
    """Everything in a sweep YAML except the base config and the space (checked separately)."""

    name: str = "sweep"
    objective: Any = "fitness"  # checked by objective_of
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(1, ge=1)
    max_concurrent: Optional[int] = Field(None, ge=1)
    scheduler: Union[str, dict[str, Any]] = "fifo"
    search: str = "random"
    seed: Optional[int] = 0                 # seed of the search (sampling), not of training
    workers_per_trial: int = Field(1, ge=1)  # Ray Train workers per trial
    time_budget_s: Optional[float] = Field(None, gt=0)
    max_failures: int = Field(0, ge=0)        # Tune retries of a failed trial (from its checkpoint)
    keep_checkpoints: int = Field(3, ge=1)    # per trial, the best ones by objective
    resume: Union[bool, str] = False          # true = the latest sweep of this name; or its folder


class SweepConfig:
    """A validated sweep: settings, scheduler options, base config and space."""

    def __init__(self, settings: SweepSettings, base: dict, space: dict, source: dict, origin: str):
        self.settings = settings
        self.base = base        # config overrides (validated), without the space keys
        self.space = space      # key -> (distribution, values)
        self.source = source    # the sweep as written (logged as the parent run's artifact)
        self.origin = origin
        self.scheduler, self.scheduler_options = scheduler_of(settings.scheduler)
        self.objective = objective_of(settings.objective)
        check_search(settings.search, space, self.scheduler)
        for key in self.scheduler_options.get("mutate") or []:
            if key not in space:
                raise UserError(f"scheduler pbt: mutate key '{key}' is not in the space ({', '.join(space)})")

    def __getattr__(self, key):
        return getattr(self.settings, key)

    def base_args(self) -> Args:
        return get_cfg(None, self.base)

    def described(self, base: dict) -> dict:
        """The sweep as it runs, with its resolved ``base``, as JSON values: the parent run's params
        (``sweep.*``, ``space.*``, ``base.*``), and what a resume goes on with (``sweeps/tune.as_started``)."""
        return json.loads(json.dumps({
            "sweep": self.settings.model_dump(exclude={"resume"}),
            "space": {key: {kind: values} for key, (kind, values) in self.space.items()},
            "base": base}, default=str))  # a Path given in Python as its text


def closest(key: str, valid) -> str:
    """``; did you mean 'x'?`` for a mistyped name (a name it begins is preferred), else empty."""
    prefixed = [v for v in valid if str(v).startswith(str(key))]
    match = prefixed[:1] or difflib.get_close_matches(str(key), list(valid), n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else ""


# ---------------------------------------------------------------------------- pieces
def scheduler_of(value) -> tuple[str, dict]:
    """``asha`` or ``{name: asha, grace_period: 1, ...}`` -> (name, validated options)."""
    options = dict(value) if isinstance(value, dict) else {}
    name = options.pop("name", None) if isinstance(value, dict) else value
    if name not in SCHEDULERS:
        raise UserError(f"sweep key 'scheduler': {name!r} is not one of {', '.join(SCHEDULERS)}"
                        f"{closest(name, SCHEDULERS) if isinstance(name, str) else ''}")
    try:
        return name, SCHEDULER_OPTIONS[name](**options).model_dump()
    except ValidationError as exc:
        raise UserError(f"sweep key 'scheduler' ({name}): {_first_error(exc, SCHEDULER_OPTIONS[name])}") from None


def objective_of(value) -> dict[str, float]:
    """``fitness``, a metric key, or ``{key: weight}`` -> weights by metric key."""
    weights = {value: 1.0} if isinstance(value, str) else dict(value)
    if not weights or not all(isinstance(k, str) and k for k in weights):
        raise UserError("sweep key 'objective': give a metric key or a mapping {metric key: weight}")
    for key, weight in weights.items():
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight):
            raise UserError(f"sweep key 'objective': weight of {key!r} must be a finite number, got {weight!r}")
    return {k: float(w) for k, w in weights.items()}


def check_search(search: str, space: dict, scheduler: str) -> None:
    if search not in SEARCHES:
        raise UserError(f"sweep key 'search': {search!r} is not one of {', '.join(SEARCHES)}{closest(search, SEARCHES)}")
    kinds = {key: kind for key, (kind, _) in space.items()}
    if search == "grid":
        continuous = [k for k, kind in kinds.items() if kind not in ("grid", "choice")]
        if continuous:
            raise UserError(f"search: grid needs grid or choice values; space key '{continuous[0]}' "
                            f"is {kinds[continuous[0]]}")
    if search == "optuna":
        grids = [k for k, kind in kinds.items() if kind == "grid"]
        if grids:
            raise UserError(f"search: optuna samples, it does not enumerate; space key '{grids[0]}' "
                            f"is grid (use choice)")
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise UserError("search: optuna needs the optuna package (pip install optuna)") from None
    if scheduler == "pbt" and search == "optuna":
        raise UserError("scheduler: pbt chooses the hyperparameters itself; use search: random")


def check_space(space) -> dict:
    """``{key: {distribution: values}}`` -> ``{key: (distribution, values)}``, every value checked."""
    if not isinstance(space, dict) or not space:
        raise UserError("sweep key 'space' is empty: give at least one config key and its distribution, "
                        "e.g. space: {lr0: {loguniform: [0.0001, 0.1]}}")
    out = {}
    for key, spec in space.items():
        if key not in DEFAULTS:
            raise UserError(f"space key '{key}' is not a config key{closest(key, DEFAULTS)}")
        if key in NOT_SEARCHABLE:
            raise UserError(f"space key '{key}' is set once per sweep and cannot be searched")
        if not isinstance(spec, dict) or len(spec) != 1:
            raise UserError(f"space key '{key}': give one distribution as {{name: values}} with name one of "
                            f"{', '.join(DISTRIBUTIONS)}; got {spec!r}")
        (kind, values), = spec.items()
        if kind not in DISTRIBUTIONS:
            raise UserError(f"space key '{key}': unknown distribution {kind!r}{closest(kind, DISTRIBUTIONS)}")
        out[key] = (kind, _check_values(key, kind, values))
    return out


def check_optimizer(space: dict, args) -> None:
    """``optimizer: auto`` picks its own learning rate and momentum: searching them would be void."""
    if args.optimizer == "auto" and "optimizer" not in space:
        for key in ("lr0", "momentum"):
            if key in space:
                raise UserError(f"space key '{key}' has no effect with optimizer: auto (it picks its own); "
                                f"set optimizer (SGD, Adam, AdamW or RMSProp) in base")


def _check_values(key: str, kind: str, values):
    where = f"space key '{key}' ({kind})"
    if kind in ("choice", "grid"):
        if not isinstance(values, list) or not values:
            raise UserError(f"{where}: give a non-empty list of values, got {values!r}")
        for value in values:
            _check_config_value(key, value, where)
        return list(values)
    if not (isinstance(values, list) and len(values) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
        raise UserError(f"{where}: give [low, high] as two numbers, got {values!r}")
    low, high = values
    if not low < high:
        raise UserError(f"{where}: low {low} must be below high {high}")
    if kind == "loguniform" and low <= 0:
        raise UserError(f"{where}: low must be > 0 for a log scale, got {low}")
    if kind == "randint":
        if not all(isinstance(v, int) for v in values):
            raise UserError(f"{where}: low and high must be integers, got {values!r}")
        _check_config_value(key, low, where)
    else:
        _check_config_value(key, (low + high) / 2 if kind == "uniform" else math.sqrt(low * high), where)
    return [low, high]


def _check_config_value(key: str, value, where: str) -> None:
    try:
        validate({key: value})
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None


def _first_error(exc: ValidationError, model) -> str:
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or "?"
    if err["type"] == "extra_forbidden":
        return f"unknown key '{key}'{closest(key, model.model_fields)}"
    return f"key '{key}': {err['msg']} (got {err.get('input')!r})"


# ---------------------------------------------------------------------------- loading
SWEEP_KEYS = set(SweepSettings.model_fields) | {"cfg", "base", "space"}


def split_overrides(overrides: dict) -> tuple[dict, dict]:
    """CLI ``key=value``: sweep settings by name (they win over config keys of the same name),
    ``base.key=value`` or any other config key -> the base config."""
    sweep, base = {}, {}
    for key, value in overrides.items():
        if key.startswith("base."):
            base[key[len("base."):]] = value
        elif key in SweepSettings.model_fields:
            sweep[key] = value
        elif key in DEFAULTS:
            base[key] = value
        else:  # either kind may have been meant: the closest name of both
            raise UserError(f"unknown key '{key}': neither a sweep setting nor a config key"
                            f"{closest(key, [*SweepSettings.model_fields, *DEFAULTS])}")
    return sweep, base


def build_sweep(data: dict, overrides: dict | None = None, origin: str = "<dict>",
                folder: Path | None = None, extra_base: dict | None = None) -> SweepConfig:
    """Validate a sweep mapping (+ CLI overrides); nothing runs before this passes."""
    if not isinstance(data, dict):
        raise UserError(f"sweep file {origin} must hold a mapping")
    for key in data:
        if key not in SWEEP_KEYS:
            raise UserError(f"unknown sweep key '{key}'{closest(key, SWEEP_KEYS)} (in {origin})")
    sweep_over, base_over = split_overrides(overrides or {})
    settings_in = {k: v for k, v in data.items() if k in SweepSettings.model_fields}
    try:
        settings = SweepSettings(**{**settings_in, **sweep_over})
    except ValidationError as exc:
        raise UserError(f"sweep {origin}: {_first_error(exc, SweepSettings)}") from None
    base = {}
    if data.get("cfg"):
        cfg_path = Path(data["cfg"])
        if not cfg_path.is_absolute() and folder is not None:
            cfg_path = folder / cfg_path
        base.update(load_yaml(cfg_path))
    if data.get("base") is not None and not isinstance(data["base"], dict):
        raise UserError(f"sweep key 'base' must be a mapping of config keys (in {origin})")
    base.update(extra_base or {})
    base.update(data.get("base") or {})
    base.update(base_over)
    space = check_space(data.get("space"))
    base = {k: v for k, v in base.items() if k != "mode"}
    args = get_cfg(None, base)  # unknown/ill-typed base keys fail here, naming the key
    check_optimizer(space, args)
    source = {**data, **({"overrides": overrides} if overrides else {})}
    return SweepConfig(settings, base, space, source, origin)


def load_sweep(path, overrides: dict | None = None, extra_base: dict | None = None) -> SweepConfig:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"sweep file {path} does not exist")
    return build_sweep(load_yaml(path), overrides, origin=str(path), folder=path.parent, extra_base=extra_base)


def parse_cli(argv: list[str]) -> tuple[str, dict]:
    """``sweep.yaml key=value ...`` -> (path, overrides)."""
    files = [a for a in argv if "=" not in a]
    if len(files) != 1:
        raise UserError("usage: orchestrator sweep sweep.yaml [key=value ...] (one sweep file)")
    return files[0], parse_overrides([a for a in argv if "=" in a])

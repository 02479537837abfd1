"""Model specs: find them, read them, and build the indexed layer list they describe.

A spec has ``backbone:`` and ``head:`` lists of rows ``[from, repeats, module, args]``
(``from`` = -1 for the previous layer, an index, or a list of indices) and ``scales:``
``{name: [depth, width, max_channels]}``. ``det-n.yaml`` means ``det.yaml`` at scale ``n``.
"""
from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from trainers.utils import LOGGER, UserError, yaml_problem

from . import modules as M

SPECS_DIR = Path(__file__).parent / "specs"

# Blocks a spec may name. Values: (class, kind) where kind says how args are wired.
#   "conv": args start with c2, input channels are prepended, width scaling applies
#   "repeat": like conv, and the row's repeat count is passed in as the block's `n`
#   "concat": output channels = sum of inputs; "same": output channels = input channels
#   "head": receives the list of input channels; "classify": c2 = nc
MODULES: dict[str, tuple[type[nn.Module], str]] = {
    "Conv": (M.Conv, "conv"),
    "Bottleneck": (M.Bottleneck, "conv"),
    "SPPF": (M.SPPF, "conv"),
    "CSP": (M.CSP, "repeat"),
    "Concat": (M.Concat, "concat"),
    "Upsample": (nn.Upsample, "same"),
    "nn.Upsample": (nn.Upsample, "same"),
    "MaxPool": (nn.MaxPool2d, "same"),
    "nn.MaxPool2d": (nn.MaxPool2d, "same"),
    "Detect": (M.Detect, "head"),
    "Classify": (M.Classify, "classify"),
}


def builtin_specs() -> list[str]:
    """Names a user can pass without a path, e.g. ``det-n.yaml``."""
    names = []
    for path in sorted(SPECS_DIR.glob("*.yaml")):
        scales = (_read_yaml(path).get("scales") or {})
        names += [f"{path.stem}-{s}.yaml" for s in scales] or [path.name]
    return names


def _split_scale(path: Path) -> tuple[Path, str | None]:
    """``det-n.yaml`` -> (``det.yaml``, ``"n"``); unchanged when no such base file exists."""
    m = re.fullmatch(r"(.+)-([a-z]+)", path.stem)
    if m:
        base = path.with_name(m.group(1) + path.suffix)
        if base.is_file():
            return base, m.group(2)
    return path, None


def _locate(name_or_path: str | Path) -> tuple[Path, str | None]:
    """The spec file and the scale its name asks for."""
    p = Path(name_or_path).expanduser()
    for candidate in (p, SPECS_DIR / p.name):
        if candidate.is_file():
            return candidate, None
        base, scale = _split_scale(candidate)
        if scale is not None:
            return base, scale
    raise UserError(f"model spec '{name_or_path}' not found; built-in specs: "
                    f"{', '.join(builtin_specs())}, or give a path to your own YAML")


def resolve_spec(name_or_path: str | Path) -> Path:
    """Path of the YAML file behind a built-in name (``det-n.yaml`` -> ``specs/det.yaml``)
    or a user's path. Raises ``UserError`` naming the spec when there is none."""
    return _locate(name_or_path)[0]


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"model spec {path}: malformed YAML ({yaml_problem(e)})") from None
    except OSError as e:
        raise UserError(f"model spec {path}: cannot read ({e.strerror})") from None
    if not isinstance(data, dict):
        raise UserError(f"model spec {path}: expected a mapping with backbone: and head:")
    return data


def load_spec(cfg: str | Path | dict) -> dict:
    """Parsed spec dict with ``scale`` and ``yaml_file`` filled in; dicts are copied."""
    if isinstance(cfg, dict):
        spec = copy.deepcopy(cfg)
    else:
        path, scale = _locate(cfg)
        spec = _read_yaml(path)
        spec["yaml_file"] = Path(cfg).name if scale else str(path)
        if scale:
            spec["scale"] = scale
    _validate(spec, spec.get("yaml_file", "<dict>"))
    return spec


def _validate(spec: dict, name: str) -> None:
    for key in ("backbone", "head"):
        rows = spec.get(key)
        if not isinstance(rows, list) or not rows:
            raise UserError(f"model spec {name}: '{key}:' must be a non-empty list of "
                            "[from, repeats, module, args] rows")
        for j, row in enumerate(rows):
            if not (isinstance(row, list) and len(row) in (3, 4)):
                raise UserError(f"model spec {name}: {key}[{j}] = {row!r} is not a "
                                "[from, repeats, module, args] row")
            if row[2] not in MODULES:
                raise UserError(f"model spec {name}: {key}[{j}]: unknown module '{row[2]}' "
                                f"(known: {', '.join(sorted(MODULES))})")


def spec_task(spec: dict) -> str:
    """``detect`` or ``classify``: the ``task:`` key, else the last layer's type."""
    if spec.get("task"):
        return str(spec["task"])
    return "detect" if spec["head"][-1][2] == "Detect" else "classify"


def spec_classes(spec: dict) -> dict:
    """A data set's ``nc``, ``ch`` and ``names`` as a spec alone gives them (a model with no data set)."""
    nc = int(spec["nc"])
    names = spec.get("names") or {i: str(i) for i in range(nc)}
    return {"nc": nc, "ch": int(spec.get("ch", 3)),
            "names": dict(enumerate(names)) if isinstance(names, list) else dict(names)}


def _multipliers(spec: dict, name: str) -> tuple[float, float, float]:
    """(depth, width, max_channels) from ``scales`` + ``scale`` or plain multiplier keys."""
    scales = spec.get("scales") or {}
    if scales:
        scale = spec.get("scale") or next(iter(scales))
        if scale not in scales:
            raise UserError(f"model spec {name}: scale '{scale}' not in scales "
                            f"({', '.join(scales)})")
        spec["scale"] = scale
        depth, width, max_ch = scales[scale]
        return float(depth), float(width), float(max_ch)
    return (float(spec.get("depth_multiple", 1.0)), float(spec.get("width_multiple", 1.0)),
            float("inf"))


def make_divisible(x: float, divisor: int = 8) -> int:
    return int(math.ceil(x / divisor) * divisor)


def _resolve_arg(a: Any, nc: int) -> Any:
    if a == "nc":
        return nc
    if a == "None":
        return None
    return a


def _layer_args(kind: str, args: list, n: int, c_in: list[int], f, mult) -> tuple[list, int | None]:
    """Constructor args and output channels for one row (``n`` already depth-scaled)."""
    _, width, max_ch = mult
    if kind in ("conv", "repeat"):
        c2 = make_divisible(min(args[0], max_ch) * width)
        args = [c_in[f], c2, *args[1:]]
        if kind == "repeat":
            args.insert(2, n)
        return args, c2
    if kind == "concat":
        return args, sum(c_in[i] for i in f)
    if kind == "head":  # Detect(nc, ch, *rest)
        if not isinstance(f, list):
            raise ValueError("Detect needs a list of input layers, e.g. [[15, 18, 21], 1, Detect, [nc]]")
        return [args[0], [c_in[i] for i in f], *args[1:]], None
    if kind == "classify":
        c1 = sum(c_in[i] for i in f) if isinstance(f, list) else c_in[f]
        return [c1, *args], args[0]
    return args, c_in[f]


def parse_model(spec: dict, ch: int, nc: int, verbose: bool = True) -> tuple[nn.ModuleList, list[int]]:
    """Build the layers of ``spec`` for ``ch`` input channels and ``nc`` classes.

    Returns the indexed ``nn.ModuleList`` (each layer carries ``i``, ``f``, ``type``, ``np``)
    and the sorted indices whose outputs later layers read.
    """
    name = spec.get("yaml_file", "<dict>")
    mult = _multipliers(spec, name)
    c_in, layers, save = [ch], [], set()
    rows = [("backbone", j, r) for j, r in enumerate(spec["backbone"])]
    rows += [("head", j, r) for j, r in enumerate(spec["head"])]
    if verbose:
        LOGGER.info(f"{'':>3}{'from':>18}{'n':>3}{'params':>10}  {'module':<12}{'arguments'}")
    for i, (part, j, row) in enumerate(rows):
        f, n, mod_name = row[0], row[1], row[2]
        args = [_resolve_arg(a, nc) for a in (row[3] if len(row) == 4 else [])]
        try:
            layer, c2 = _build_row(i, f, n, mod_name, args, c_in, mult)
        except (TypeError, ValueError, IndexError, KeyError) as e:
            raise UserError(f"model spec {name}: {part}[{j}] = {row!r}: {e}") from None
        save.update(x % i for x in ([f] if isinstance(f, int) else f) if x != -1)
        layers.append(layer)
        c_in = c_in + [c2] if i else [c2]
        if verbose:
            LOGGER.info(f"{i:>3}{str(f):>18}{n:>3}{layer.np:10.0f}  {mod_name:<12}{args}")
    return nn.ModuleList(layers), sorted(save)


def _build_row(i: int, f, n, mod_name: str, args: list, c_in: list[int], mult):
    """One layer: resolve ``from``, scale repeats/channels, construct and tag it."""
    cls, kind = MODULES[mod_name]
    if not (f == -1 or isinstance(f, int) or (isinstance(f, list) and all(isinstance(x, int) for x in f))):
        raise ValueError(f"'from' must be -1, an index or a list of indices, got {f!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"repeats must be a positive integer, got {n!r}")
    for x in [f] if isinstance(f, int) else f:
        if not -i <= x < i and not (i == 0 and x == -1):
            raise IndexError(f"'from' index {x} is not an earlier layer")
    depth = mult[0]
    n = max(round(n * depth), 1) if n > 1 else n
    # c_in[k] is the output channels of layer k; for layer 0, c_in[-1] is the input image
    args, c2 = _layer_args(kind, args, n, c_in, f, mult)
    if kind == "repeat" or n == 1:
        layer = cls(*args)
    elif kind == "conv":  # later copies take the first copy's output channels
        layer = nn.Sequential(cls(*args), *(cls(c2, *args[1:]) for _ in range(n - 1)))
    else:
        layer = nn.Sequential(*(cls(*args) for _ in range(n)))
    if kind == "head":
        c2 = 0
    layer.i, layer.f, layer.type = i, f, mod_name
    layer.np = sum(p.numel() for p in layer.parameters())
    return layer, c2

"""Checkpoint files: plain data only, so ``torch.load(weights_only=True)`` reads them.

A checkpoint names its model class by import path and holds the parsed model spec; loading
rebuilds the class and loads the state dict, so no pickled module is ever needed.
"""
from __future__ import annotations

import importlib
import sys
import inspect
import pickle
import io
import random
import re
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from trainers.config import DEFAULTS, get_cfg
from trainers.models.tasks import BaseModel
from trainers.utils import LOGGER, UserError, unwrap_model

FORMAT_VERSION = 1

# What every reader of a checkpoint needs, and its type (``model_entry`` and ``checkpoint_contents``
# write them); the optional entries may also be None.
ENTRIES = {"model_class": str, "model_yaml": dict, "nc": int, "model": dict, "train_args": dict}
OPTIONAL_ENTRIES = {"ema": dict, "names": dict, "ch": int}
# What a resume restores besides the model (``resume.restore_trainer``), and the args naming the run
# folder it continues.
TRAINING_STATE = ("ema", "updates", "optimizer", "scaler", "scheduler", "epoch", "step", "best_fitness",
                  "stopper", "rng")
RUN_FOLDER = ("project", "name")
CLASS_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")


def class_path(obj) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def import_class(path: str):
    """The class a checkpoint names. A class from ``__main__`` is found in this process's script:
    the script that trained a model can load its checkpoint; any other process needs a module."""
    module_name, _, qualname = path.rpartition(".")
    try:
        obj = sys.modules["__main__"] if module_name == "__main__" else importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        return obj
    except (ImportError, AttributeError):
        raise UserError(not_importable(module_name, qualname)) from None


def not_importable(module_name: str, qualname: str) -> str:
    if module_name == "__main__":
        return (f"checkpoint model class '{qualname}' was defined in __main__ (the script that trained it) "
                f"and this process has no such class; define it in a module and import that module "
                f"before loading")
    return f"checkpoint model class '{qualname}' not found: import module '{module_name}' (it must define " \
           f"{qualname}) before loading"


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "cached": float(np_state[4])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def model_entry(model) -> dict:
    """What is needed to rebuild a model: its class path, spec, constructor args and weights."""
    m = unwrap_model(model)
    return {"model_class": class_path(m), "model_yaml": m.yaml, "nc": m.nc,
            "ch": m.yaml.get("ch", 3), "names": dict(m.names), "model": float_state(m)}


def float_state(model) -> dict:
    return {k: v.detach().float().cpu() if v.dtype.is_floating_point else v.detach().cpu()
            for k, v in unwrap_model(model).state_dict().items()}


def to_bytes(ckpt: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    return buffer.getvalue()


def load_checkpoint(path, resume: bool = False) -> dict:
    """The checkpoint at ``path``, checked here where every reader gets it (``check_contents``), so
    a file this project did not write fails in one line naming it, not later as a KeyError deep in
    a verb. ``resume``: it must hold the training state too."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(unreadable(path, exc)) from None
    return check_contents(ckpt, path, resume)


def not_a_checkpoint(path, reason: str) -> str:
    """The one line for a file that is no checkpoint of this project, or not one this version can use."""
    return f"{path if path is not None else 'the file'} is not a checkpoint of this project ({reason})"


def unreadable(path: Path, exc: Exception) -> str:
    """Why torch could not read ``path``, said plainly: torch's own words name its internals (a miniz
    error, ``KeyError: 101``, ``OSError: [Errno 22]``, an empty message), not what is wrong with the file."""
    if isinstance(exc, PermissionError):
        return f"checkpoint {path} could not be read: permission denied"
    with open(path, "rb") as file:
        head = file.read(4)
    if not head:
        reason = "the file is empty"
    elif isinstance(exc, pickle.UnpicklingError):  # torch's text advises weights_only=False: wrong for either cause
        reason = "not a torch file, or one holding more than plain data (tensors, numbers, strings, lists, dicts)"
    elif head == b"PK\x03\x04":  # torch files are zip archives
        reason = "a truncated or damaged torch file"
    else:
        reason = "not a torch file"
    return not_a_checkpoint(path, reason)


def check_contents(ckpt, path: Path, resume: bool = False) -> dict:
    """``ckpt`` when it holds this project's entries (``ENTRIES``; for a ``resume`` its training state
    too), else one line saying what is wrong. The model class is checked when a model is built
    (``model_class``): a worker that only reads the weights may not have a script's class."""
    problem = contents_problem(ckpt, resume)
    if problem:
        raise UserError(not_a_checkpoint(path, problem))
    return ckpt


def contents_problem(ckpt, resume: bool = False) -> str | None:
    """What makes ``ckpt`` no checkpoint of this project, in a few words; None when nothing does."""
    if not isinstance(ckpt, dict):
        return f"it holds a {type(ckpt).__name__}, not a dict of entries"
    missing = [k for k in (*ENTRIES, *(TRAINING_STATE if resume else ())) if k not in ckpt]
    if missing:
        return f"no {', '.join(repr(k) for k in missing)} entr{'y' if len(missing) == 1 else 'ies'}"
    for key, kind in {**ENTRIES, **OPTIONAL_ENTRIES}.items():
        value = ckpt.get(key)
        if (key in ENTRIES or value is not None) and (not isinstance(value, kind) or isinstance(value, bool)):
            return f"its '{key}' is a {type(value).__name__}, not a {kind.__name__}"
    if not CLASS_PATH.fullmatch(ckpt["model_class"]):
        return f"its model_class {ckpt['model_class']!r} is not a class path"
    if resume and not all(ckpt["train_args"].get(k) for k in RUN_FOLDER):
        return f"its 'train_args' have no {' or '.join(RUN_FOLDER)}: no run folder to continue"
    weights = [k for k in ("model", "ema") if ckpt.get(k) is not None]
    bad = next((k for k in weights if not all(torch.is_tensor(v) for v in ckpt[k].values())), None)
    return f"its '{bad}' holds values that are not tensors" if bad else None


def model_class(name: str, path=None) -> type:
    """The model class a checkpoint names (``import_class``), only if it is one of this project's (a
    ``BaseModel``): a checkpoint is data and must not make this process call anything else."""
    cls = import_class(name)
    if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
        raise UserError(not_a_checkpoint(path, f"its model_class {name!r} is not a subclass of "
                                               f"{class_path(BaseModel)}"))
    return cls


def build_model(ckpt: dict, use_ema: bool = True, verbose: bool = False, path=None):
    """Rebuild the model a checkpoint (read by ``load_checkpoint``) describes (EMA weights when
    present). ``path`` names the file in errors: a spec or weights that do not build."""
    cls = model_class(ckpt["model_class"], path)
    kwargs = {"cfg": ckpt["model_yaml"], "nc": ckpt["nc"], "verbose": verbose}
    if "ch" in inspect.signature(cls).parameters:
        kwargs["ch"] = ckpt.get("ch", 3)
    try:
        model = cls(**kwargs)
    except UserError as exc:  # its text names the spec '<dict>': say which file holds it
        raise UserError(not_a_checkpoint(path, f"its model spec does not build: {exc}")) from None
    model.names = dict(ckpt.get("names") or {})
    state = ckpt.get("ema") if use_ema and ckpt.get("ema") is not None else ckpt["model"]
    misfit = weights_misfit(model, state)
    if misfit:
        raise UserError(not_a_checkpoint(path, f"its weights do not fit its model spec: {misfit}"))
    model.load_state_dict(state)
    return model


def weights_misfit(model, state: dict) -> str | None:
    """The first weight of ``state`` that does not fit ``model`` (a spec, ``nc`` or ``ch`` edited
    without the weights), in words; None when all fit. torch's own error is many lines."""
    own = model.state_dict()
    for key, value in own.items():
        if key not in state:
            return f"no weights for {key}"
        if tuple(state[key].shape) != tuple(value.shape):
            return f"{key} is {list(state[key].shape)}, the spec builds {list(value.shape)}"
    extra = next((k for k in state if k not in own), None)
    return f"{extra} is not in the model its spec builds" if extra else None


def saved_args(ckpt: dict, path) -> dict:
    """The config a checkpoint was trained with, as this version reads it, checked: an error names
    the file (the user never typed these values). Keys this version does not know (another version
    wrote the file) are left out with one warning, for ``val`` and a resume of the file alike."""
    args = ckpt["train_args"]
    unknown = tuple(sorted(str(k) for k in args if k not in DEFAULTS))
    if unknown:
        _warn_unknown_keys(str(path), unknown)
    known = {k: v for k, v in args.items() if k in DEFAULTS}
    try:
        get_cfg(known)
    except UserError as exc:
        raise UserError(f"checkpoint {path}: {exc}") from None
    return known


@lru_cache(maxsize=None)
def _warn_unknown_keys(path: str, keys: tuple) -> None:
    """Once per file and process: the driver, the trainer and ``Model`` all read a resumed checkpoint."""
    LOGGER.warning(f"checkpoint {path}: ignoring config keys this version does not know: "
                   f"{', '.join(repr(k) for k in keys)}")


def stamp() -> dict:
    return {"date": datetime.now(timezone.utc).isoformat(), "format_version": FORMAT_VERSION}

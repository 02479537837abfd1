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
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from trainers.utils import UserError, unwrap_model

FORMAT_VERSION = 1


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


def load_checkpoint(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's text advises weights_only=False: wrong for either cause
        raise UserError(f"checkpoint {path} is not one this project wrote: not a torch file, or one holding "
                        f"more than plain data (tensors, numbers, strings, lists, dicts)") from None
    except Exception as exc:
        raise UserError(f"checkpoint {path} could not be read: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0]}") from None


def build_model(ckpt: dict, use_ema: bool = True, verbose: bool = False):
    """Rebuild the model a checkpoint describes (EMA weights when present)."""
    cls = import_class(ckpt["model_class"])
    kwargs = {"cfg": ckpt["model_yaml"], "nc": ckpt["nc"], "verbose": verbose}
    if "ch" in inspect.signature(cls).parameters:
        kwargs["ch"] = ckpt.get("ch", 3)
    model = cls(**kwargs)
    model.names = dict(ckpt.get("names") or {})
    state = ckpt.get("ema") if use_ema and ckpt.get("ema") is not None else ckpt["model"]
    model.load_state_dict(state)
    return model


def stamp() -> dict:
    return {"date": datetime.now(timezone.utc).isoformat(), "format_version": FORMAT_VERSION}

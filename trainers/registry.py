"""Callback registry shared by trainer, validator, predictor and exporter.

A registry is a plain ``dict[event, list[callable]]`` (as in Ultralytics), so it pickles with
the trainer factory and can be shared between a trainer and its validator.
"""
from __future__ import annotations

from typing import Callable

from trainers.events import EVENTS, check_event, make_row


class CallbackError(RuntimeError):
    """A user callback raised; the message names the event and the callback."""


def new_registry() -> dict[str, list[Callable]]:
    return {event: [] for event in EVENTS}


def callback_name(fn: Callable) -> str:
    owner = getattr(fn, "__self__", None)
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
    if owner is not None and "." not in name:
        name = f"{type(owner).__name__}.{name}"
    return name


def event_methods(obj) -> dict[str, Callable]:
    """The bound methods of ``obj`` named after an event (``add_callback(obj)``)."""
    found = {e: getattr(obj, e) for e in EVENTS if callable(getattr(obj, e, None))}
    if not found:
        raise ValueError(
            f"{type(obj).__name__} has no method named after an event; valid events: {', '.join(EVENTS)}")
    return found


def add_callback(registry: dict, event, fn: Callable | None = None) -> None:
    """Register ``fn`` for ``event``; or, given one object, each of its event-named methods."""
    if fn is None and not isinstance(event, str):
        for name, method in event_methods(event).items():
            registry.setdefault(name, []).append(method)
        return
    check_event(event)
    if not callable(fn):
        raise TypeError(f"callback for {event!r} must be callable, got {fn!r}")
    registry.setdefault(event, []).append(fn)


def clear_callback(registry: dict, event: str) -> None:
    registry[check_event(event)] = []


def run_callbacks(registry: dict, event: str, owner) -> None:
    """Call each callback for ``event`` with ``owner``; re-raise failures naming both."""
    for fn in registry.get(event, ()):
        try:
            fn(owner)
        except CallbackError:
            raise
        except Exception as exc:
            raise CallbackError(f"callback {callback_name(fn)} failed in {event}: "
                                f"{type(exc).__name__}: {exc}") from exc


def stateful_callbacks(registry: dict) -> dict[str, object]:
    """Objects registered through bound methods that offer ``state_dict``, keyed by class."""
    found = {}
    for fns in registry.values():
        for fn in fns:
            owner = getattr(fn, "__self__", None)
            if owner is not None and callable(getattr(owner, "state_dict", None)):
                found[type(owner).__qualname__] = owner
    return found


def copy_registry(registry: dict) -> dict[str, list[Callable]]:
    return {event: list(fns) for event, fns in registry.items()}


class CallbackMixin:
    """Gives an owner (trainer, validator, ...) the registry methods of SPEC §2 and the record
    of each event it fires (what the event forwarder sends to the driver)."""

    callbacks: dict[str, list[Callable]]

    def add_callback(self, event, fn: Callable | None = None) -> None:
        add_callback(self.callbacks, event, fn)

    def clear_callback(self, event: str) -> None:
        clear_callback(self.callbacks, event)

    def run_callbacks(self, event: str) -> None:
        run_callbacks(self.callbacks, event, self)

    def record_fields(self, event: str) -> dict:
        """The event-dependent fields of the record of ``event``; owners override it."""
        return {"epoch": getattr(self, "epoch", 0) or 0, "step": getattr(self, "step", 0) or 0,
                "metrics": {}, "artifacts": {}, "final_eval": bool(getattr(self, "final_eval", False))}

    def record_row(self, event: str) -> list:
        """The wire row of the record of ``event`` (``trainers.events.ROW_FIELDS``), each field
        checked; the trainer builds the rows of its per-step events directly instead."""
        return make_row(event, self.record_fields(event))

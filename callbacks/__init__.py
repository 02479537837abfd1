"""Event vocabulary, callback registry, worker-side forwarder, driver-side actor and sinks."""
from callbacks.events import EVENTS, check_event
from callbacks.registry import CallbackError, add_callback, clear_callback, new_registry, run_callbacks

__all__ = ["EVENTS", "check_event", "CallbackError", "add_callback", "clear_callback",
           "new_registry", "run_callbacks"]

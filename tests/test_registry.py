"""The callback registry: event names, object registration, error reporting."""
import pytest

from trainers.events import EVENTS
from trainers.registry import CallbackError, add_callback, clear_callback, new_registry, run_callbacks
from orchestrator import Model


def test_unknown_event_lists_valid_names():
    with pytest.raises(ValueError) as err:
        add_callback(new_registry(), "on_epoch_end", print)
    assert "on_epoch_end" in str(err.value) and "on_train_epoch_end" in str(err.value)


def test_model_add_callback_rejects_unknown_event_immediately():
    with pytest.raises(ValueError, match="valid events"):
        Model("cls-n.yaml").add_callback("on_trian_start", print)


def test_object_registers_event_named_methods():
    class Recorder:
        def __init__(self):
            self.seen = []

        def on_train_start(self, owner):
            self.seen.append(("start", owner))

        def on_train_end(self, owner):
            self.seen.append(("end", owner))

        def helper(self):  # not an event: ignored
            raise AssertionError

    reg, rec = new_registry(), Recorder()
    add_callback(reg, rec)
    run_callbacks(reg, "on_train_start", "T")
    run_callbacks(reg, "on_train_end", "T")
    assert rec.seen == [("start", "T"), ("end", "T")]
    assert sum(len(v) for v in reg.values()) == 2


def test_failing_callback_names_event_and_callback():
    def exploding_hook(owner):
        raise KeyError("boom")

    reg = new_registry()
    add_callback(reg, "on_train_epoch_end", exploding_hook)
    with pytest.raises(CallbackError) as err:
        run_callbacks(reg, "on_train_epoch_end", object())
    assert "exploding_hook" in str(err.value) and "on_train_epoch_end" in str(err.value)
    assert isinstance(err.value.__cause__, KeyError)


def test_clear_callback():
    reg = new_registry()
    add_callback(reg, "teardown", print)
    clear_callback(reg, "teardown")
    assert reg["teardown"] == [] and set(reg) == set(EVENTS)

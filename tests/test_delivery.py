"""A sink's courier: failures back off (up to 30 s), but while a run closes it tries again every
few seconds, so the end of a run notices a store that came back at once, not a backoff later."""
import threading
import time

from callbacks.sinks.delivery import CLOSING_RETRY_S, Backoff, Courier


class Store:
    """A pump that fails while ``down``; counts its attempts."""

    def __init__(self):
        self.down, self.attempts = True, 0

    def pump(self) -> bool:
        self.attempts += 1
        if self.down:
            raise ConnectionError("store down")
        return True


def test_closing_retries_within_a_few_seconds_however_long_the_backoff_grew():
    store = Store()
    courier = Courier("store", store.pump, backoff=Backoff(initial=0.5, maximum=30.0))
    courier.backoff.failures = 8  # a long outage: the next delay would be 30 s
    result = {}
    closing = threading.Thread(target=lambda: result.update(ok=courier.close(timeout=20.0)))
    closing.start()
    time.sleep(1.0)
    store.down, back = False, time.monotonic()
    closing.join(25.0)
    took = time.monotonic() - back
    assert result == {"ok": True}
    assert took <= CLOSING_RETRY_S * 1.25 + 1.0, f"closed {took:.1f} s after the store came back"


def test_outside_closing_the_backoff_is_kept():
    store = Store()
    courier = Courier("store", store.pump, interval=0.05, backoff=Backoff(initial=3.0, maximum=30.0))
    courier.start()
    courier.kick()
    time.sleep(1.0)
    assert store.attempts == 1  # the next attempt waits 3 s (+-25%)
    store.down = False
    assert courier.flush(timeout=10.0)
    assert store.attempts == 2
    courier.close(timeout=1.0)

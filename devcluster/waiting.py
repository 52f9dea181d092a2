"""The one way tests, demos and benchmarks wait for something: a condition polled against a deadline.

Nothing here sleeps as synchronisation: ``wait_for`` returns as soon as the condition holds, and fails
with what it waited for (and the last value seen) once the deadline passes. The interval is a poll
interval, not a delay the caller relies on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(
    condition: Callable[[], T],
    timeout: float = 30.0,
    what: str = "condition",
    interval: float = 0.05,
    ignore: tuple[type[Exception], ...] = (),
) -> T:
    """Poll ``condition`` until it returns something truthy, and return that.

    Raises ``TimeoutError`` naming ``what`` (and the last value) after ``timeout`` seconds. Exceptions of
    the types in ``ignore`` count as "not yet" (a server that is still starting refuses connections).
    """
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        try:
            last = condition()
        except ignore as exc:
            last = None
            error: Exception | None = exc
        else:
            error = None
            if last:
                return last
        if time.monotonic() > deadline:
            seen = f"last error: {error!r}" if error is not None else f"last value: {last!r}"
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what} ({seen})")
        time.sleep(interval)  # poll

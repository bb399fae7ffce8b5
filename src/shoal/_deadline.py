"""A call whose answer is waited for only so long: torch's TCPStore client is not.

Its ``check``, ``add`` and ``compare_set`` wait for the server's answer for as long as the
kernel keeps the connection: a quarter of an hour once the server's link is down or its
machine gone, for ever while the server's process is frozen on a live kernel (the store's
own timeout bounds only ``get`` and ``wait``). A C++ read cannot be interrupted, so the call
runs on a thread of its own, and a caller that stops waiting leaves the thread to it (and
must not use that store client again: the stuck call holds it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

__all__ = ["answered_within"]

T = TypeVar("T")


def answered_within(seconds: float, operation: Callable[..., T], *args) -> T:
    """``operation(*args)``, or TimeoutError if it has not returned within ``seconds``."""
    outcome: list = []
    done = threading.Event()

    def call() -> None:
        try:
            outcome.append((True, operation(*args)))
        except BaseException as error:  # noqa: BLE001  (handed to the caller)
            outcome.append((False, error))
        done.set()

    threading.Thread(target=call, name="shoal-bounded-call", daemon=True).start()
    if not done.wait(seconds):
        raise TimeoutError(f"no answer within {seconds:g} s")
    answered, value = outcome[0]
    if not answered:
        raise value
    return value

"""Leave a worker process without the interpreter's teardown."""

from __future__ import annotations

import atexit
import gc
import io
import os
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn

__all__ = ["EXIT_EVICTED", "run_then_exit"]

EXIT_EVICTED = 3
"""A worker that left because the coordinator ended its membership (it was declared dead:
hung, or cut off) or the job ended elsewhere; also what a launcher counts for a worker it
killed after the coordinator declared it dead for silence (``launch.workers.fence_silenced``)."""


def run_then_exit(entry: Callable[[], int | None]) -> NoReturn:
    """Run ``entry``, then exit with its code (1 if it raised, after printing why): exit
    handlers run and output is flushed, but the interpreter's teardown is skipped. On torch
    2.13 gloo's teardown aborts a process now and then (SIGABRT, "terminate called without
    an active exception"), which would turn a finished worker into a failed one; a forked
    worker must not tear down the zygote's state either."""
    code = 1
    try:
        code = entry() or 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if not isinstance(stop.code, int | None):
            print(stop.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            atexit._run_exitfuncs()
            _flush_open_files()
        finally:
            os._exit(code)


def _flush_open_files() -> None:
    """What the teardown would do for files still open (standard streams included): flush."""
    for handle in [sys.stdout, sys.stderr, *gc.get_objects()]:
        # type(), not isinstance(): some objects warn when asked for their __class__
        if issubclass(type(handle), io.IOBase) and not handle.closed:
            try:
                handle.flush()
            except (OSError, ValueError):
                pass  # not writable, or its descriptor is gone: nothing of ours to lose

"""Saving in the background, so that training does not wait on the disk.

The training thread only copies the committed state (a memory copy of the tensors, so the
next steps cannot change what is being written); a thread of its own serialises, writes,
fsyncs and renames. One save is in flight at a time: asking for another while one is
still writing waits for it (the disk, not memory, sets the pace). A save that failed is
raised by the next call on the training thread: a checkpoint is never lost silently.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable

from shoal.checkpoint.store import Checkpoint, CheckpointStore

__all__ = ["AsyncSaver"]

log = logging.getLogger(__name__)


class AsyncSaver:
    def __init__(self, store: CheckpointStore, meta: dict, *, background: bool = True):
        self.store = store
        self.meta = meta
        self.background = background
        self.last_saved_step: int | None = None
        self.saved: list[dict] = []
        """Per save: step, bytes, seconds writing, seconds the training thread spent on it."""
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, step: int, state: dict) -> None:
        """Checkpoint ``state`` (the committed state at ``step``) without waiting for the disk."""
        def stage() -> Callable[[], int]:
            snapshot = copy.deepcopy(state)  # the live tensors keep training
            return lambda: _size(self.store.save(step, snapshot, self.meta))

        self.save_staged(step, stage)

    def save_staged(self, step: int, stage: Callable[[], Callable[[], int]], *,
                    log_failure: bool = True) -> None:
        """A save in two parts: ``stage()`` runs now, on the training thread, and copies what
        the next steps would change; it returns the writing, which runs in the background
        (or at once without ``background``) and returns the bytes it wrote. ``log_failure``:
        this process logs a failed write (one member of several that write together)."""
        started = time.perf_counter()
        self.wait()
        write = stage()
        blocked = time.perf_counter() - started
        if not self.background:
            self._write(step, write, blocked, log_failure)
            self._raise_failure()
            return
        self._thread = threading.Thread(target=self._write, args=(step, write, blocked, log_failure),
                                        name=f"shoal-checkpoint-{step}", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Block until the save in flight is durable; raise if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._raise_failure()

    def settle(self) -> None:
        """Wait for the save in flight and forget a failure (its generation broke, which is
        reported already; the checkpoint before it stands)."""
        try:
            self.wait()
        except Exception as error:  # noqa: BLE001 (logged where it happened)
            log.debug("dropped a failed checkpoint: %s", error)

    def _raise_failure(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _write(self, step: int, write: Callable[[], int], blocked: float,
               log_failure: bool = True) -> None:
        started = time.perf_counter()
        try:
            size = write()
        except BaseException as error:  # handed to the training thread by wait()
            if log_failure:
                log.error("checkpoint of step %d failed: %s", step, error)
            self._error = error
            return
        self.last_saved_step = step
        self.saved.append({"step": step, "bytes": size, "write_seconds": time.perf_counter() - started,
                           "blocked_seconds": blocked})


def _size(checkpoint: Checkpoint) -> int:
    return sum(f["bytes"] for f in checkpoint.meta["files"].values())

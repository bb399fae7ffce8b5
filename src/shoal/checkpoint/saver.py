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
        started = time.perf_counter()
        self.wait()
        snapshot = copy.deepcopy(state)  # the live tensors keep training
        blocked = time.perf_counter() - started
        if not self.background:
            self._write(step, snapshot, blocked)
            self._raise_failure()
            return
        self._thread = threading.Thread(target=self._write, args=(step, snapshot, blocked),
                                        name=f"shoal-checkpoint-{step}", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Block until the save in flight is durable; raise if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._raise_failure()

    def _raise_failure(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _write(self, step: int, snapshot: dict, blocked: float) -> None:
        started = time.perf_counter()
        try:
            checkpoint: Checkpoint = self.store.save(step, snapshot, self.meta)
        except BaseException as error:  # handed to the training thread by wait()
            log.error("checkpoint of step %d failed: %s", step, error)
            self._error = error
            return
        self.last_saved_step = step
        size = sum(f["bytes"] for f in checkpoint.meta["files"].values())
        self.saved.append({"step": step, "bytes": size, "write_seconds": time.perf_counter() - started,
                           "blocked_seconds": blocked})

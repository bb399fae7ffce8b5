"""``shoal coordinator --state FILE``: the job's record on disk, so that a restart loses nothing.

A restarted coordinator learns the running generation and the commits back from the
workers (their heartbeats carry them), but not what only it knew: that the job ended and
the leader's results, the membership changes, a dead member's share of each step's loss,
the faults that fired, the job's spec. Without this file a coordinator killed just after
the end leaves launchers with no record to write results.json from.

The file is an append-only log of JSON lines: a header with a hash of the job token (the
coordinator of another job must not take it over), then the membership's state
(``export_state``: small, without the commits) each time it changes in a way a request
could hear of, and every batch of commits as it arrives. The membership writes both under
its lock, so nothing is heard of before it is in the file. An append costs what it adds,
however long the job: rewriting the whole record once a second cost 66 ms at 10,000 steps of
8 workers, with the coordinator's lock held. A coordinator started on the file reads the
last state and replays every commit, then rewrites the file compacted (atomically) and
appends to that. A torn last line (the coordinator died mid-write) is ignored.

One coordinator at a time: each holds a lock on ``FILE.lock`` for its life (the kernel lets
go of it when the process dies, however it dies), so a second one started on the same file
by mistake stops at once instead of interleaving its appends with the first's.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import IO

from shoal._io import atomic_write
from shoal.config import ConfigError

__all__ = ["StateFile"]

_FORMAT = 2
_SYNC_SECONDS = 1.0
"""Commits reach the disk (fsync) at most this late: a restart needs only that they reached
the kernel, a machine's crash loses at most this much of them, and the workers resend those."""


class StateFile:
    def __init__(self, path: str, token: str):
        self.path = Path(path)
        self._token_hash = hashlib.sha256(token.encode()).hexdigest()
        self._handle: IO[str] | None = None
        self._synced_at = 0.0
        self._last_error: str | None = None
        self._lock: IO[bytes] | None = None

    def load(self) -> tuple[dict, list[tuple[int, list]]] | None:
        """(the last state, every batch of commits) a previous coordinator of this job kept;
        None if there is no file; ConfigError (naming the flag to change) if it is not this job's
        or another coordinator holds it. Holds the file's lock from here until :meth:`close`
        (let go of at once if it raises)."""
        self._claim()
        try:
            return self._read()
        except ConfigError:
            self.close()
            raise

    def _read(self) -> tuple[dict, list[tuple[int, list]]] | None:
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            raise ConfigError("--state", f"cannot read {self.path}: {error}") from None
        entries = []
        for number, line in enumerate(lines):
            try:
                entries.append(json.loads(line))
            except ValueError:
                if number == len(lines) - 1:
                    break  # torn by a kill mid-write
                raise ConfigError("--state", f"{self.path}: line {number + 1} is not JSON") from None
        header = entries[0] if entries else {}
        if not isinstance(header, dict) or header.get("format") != _FORMAT:
            raise ConfigError("--state", f"{self.path} is not a shoal coordinator's state (remove it, "
                              "or choose another file)")
        if header.get("token_sha256") != self._token_hash:
            raise ConfigError("--token", f"{self.path} holds the record of a job with another token: "
                              "pass that job's --token, or remove the file to start a new job")
        states = [entry["state"] for entry in entries if "state" in entry]
        commits = [tuple(entry["commits"]) for entry in entries if "commits" in entry]
        return (states[-1], commits) if states else None

    def _claim(self) -> None:
        """flock, not a library's lock: filelock would create a missing directory, and a typo
        in --state should fail, not make one."""
        name = f"{self.path}.lock"
        try:
            lock = open(name, "ab")  # noqa: SIM115  (held for the coordinator's life)
        except OSError as error:
            raise ConfigError("--state", f"cannot write {name}: {error.strerror or error}") from None
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            raise ConfigError("--state", f"{self.path} is in use by another coordinator (it holds "
                              f"{name}): stop that one first, or choose another file") from None
        self._lock = lock

    def start(self, state: dict, commits: list[tuple[int, list]]) -> None:
        """Write the file anew (atomically) from what the membership holds, and append from
        here on. OSError if it cannot be written: the coordinator should not start."""
        lines = [{"format": _FORMAT, "token_sha256": self._token_hash}, {"state": state},
                 *({"commits": [worker, batch]} for worker, batch in commits)]
        atomic_write(str(self.path), lambda handle: handle.write(
            "".join(json.dumps(line) + "\n" for line in lines).encode()))
        self._handle = open(self.path, "a")  # noqa: SIM115  (kept open for the job's life)
        self._synced_at = time.monotonic()

    def keep_state(self, state: dict) -> None:
        """A change someone may hear of next: on disk (fsync) before we return."""
        self._append({"state": state}, sync=True)

    def keep_commits(self, worker_id: int, commits: list) -> None:
        self._append({"commits": [worker_id, commits]},
                     sync=time.monotonic() - self._synced_at >= _SYNC_SECONDS)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self._lock is not None:
            self._lock.close()  # lets go of the lock
            self._lock = None

    def _append(self, entry: dict, *, sync: bool) -> None:
        """A failure is said once (per distinct error) and the job goes on: the coordinator
        still holds everything; only a restart would lose it."""
        if self._handle is None:
            return
        try:
            self._handle.write(json.dumps(entry) + "\n")
            self._handle.flush()
            if sync:
                os.fsync(self._handle.fileno())
                self._synced_at = time.monotonic()
        except OSError as error:
            if str(error) != self._last_error:
                self._last_error = str(error)
                print(f"shoal coordinator: warning: cannot keep the job's state in {self.path} "
                      f"({error}); a restart now would lose what the workers cannot resend",
                      file=sys.stderr, flush=True)
            return
        self._last_error = None

"""What a launcher that joins a standalone coordinator does, whatever its workers run
(``shoal train --coordinator``, ``shoal run --coordinator``): be admitted before any worker
starts, and read the job's outcome at the end, from the coordinator or, if it is gone, from
the local workers' exit codes."""

from __future__ import annotations

import os
import socket
import time
import uuid

import httpx

from shoal import _protocol
from shoal.coordinator.client import CoordinatorClient, CoordinatorUnreachable

__all__ = ["ADMISSION_RETRY_SECONDS", "admission_refusal", "final_status", "launcher_id"]

ADMISSION_RETRY_SECONDS = 10.0
"""A coordinator started at the same moment as its launchers gets this long to answer."""
_LOST_END_SECONDS = 5.0
"""How long a launcher whose workers all finished waits for a restarted coordinator to learn
the job's end from other hosts' workers, before it concludes from its own."""
_POLL_SECONDS = 0.5


def launcher_id() -> str:
    """This launcher's ``SHOAL_LAUNCHER_ID``: its workers name it when they join, and it
    names them by it and their pids when they exit. Unique: two containers of one machine
    may share its host name (host networking) and their processes' pids."""
    return f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"


def admission_refusal(url: str, token: str, address: str, spec: dict, launcher: str) -> str | None:
    """Ask the coordinator at ``address`` to admit this launcher (``launcher_id()``) before any worker starts:
    why not (one line naming the flag), or None. A wrong address or token, or a job started
    with another task, batch, strategy or script, would otherwise surface as worker
    tracebacks, a hang, or a running job broken by workers that load another model."""
    client = CoordinatorClient(url, token, retry_seconds=ADMISSION_RETRY_SECONDS)
    try:
        reply = client.post("/launcher", {"spec": spec, "launcher": launcher,
                                          "protocol": _protocol.PROTOCOL, "version": _protocol.VERSION})
    except CoordinatorUnreachable as error:
        return f"--coordinator: cannot reach {url} ({error.__cause__})"
    except PermissionError:
        return f"--token: the coordinator at {address} refused it"
    except httpx.HTTPStatusError as error:
        if error.response.status_code != 409:
            raise
        return error.response.json()["error"]
    finally:
        client.close()
    theirs = reply.get("protocol")
    if theirs != _protocol.PROTOCOL:  # an older coordinator admits anyone: we refuse it
        return (f"--coordinator: the coordinator at {address} runs {_protocol.describe(theirs, reply.get('version'))}, "
                f"this launcher {_protocol.describe()}: run one shoal version on every machine")
    return None


def final_status(url: str, token: str, codes: list[int | None]) -> dict:
    """The job's outcome (``GET /status``) once this launcher's workers exited with
    ``codes``; if the coordinator is gone or has lost it, from those codes.

    A worker exits 0 once it committed the last step and the coordinator said the job ended
    (or could not be reached for long). A coordinator that does not say so restarted since:
    it may still hear the end from other hosts' workers, which stay until it does.
    """
    client = CoordinatorClient(url, token, retry_seconds=5.0)
    deadline = time.monotonic() + _LOST_END_SECONDS
    try:
        while True:
            status = client.get("/status")
            if status["status"] in ("completed", "failed") or not codes or any(codes):
                return status
            if time.monotonic() > deadline:
                return {"status": "completed", "generation": "?", "step": "?",
                        "reason": "(every worker of this host finished; the coordinator restarted "
                                  "after the job ended and lost it)"}
            time.sleep(_POLL_SECONDS)
    except CoordinatorUnreachable:
        # A worker exits 0 only after it committed the last step: the training completed.
        return {"status": "completed" if 0 in codes else "unknown",
                "reason": "(the coordinator had already stopped)", "generation": "?", "step": "?"}
    finally:
        client.close()

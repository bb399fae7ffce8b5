"""The worker's side of the coordinator protocol (httpx: a synchronous client with pooling)."""

from __future__ import annotations

import time

import httpx

from shoal._json import finite_or_null

__all__ = ["RETRY_SECONDS", "UNANSWERED_TRY_SECONDS", "CoordinatorClient", "CoordinatorUnreachable"]

RETRY_SECONDS = 30.0
"""How long a request tries to reach a coordinator that may be restarting."""


class CoordinatorUnreachable(ConnectionError):
    """Not a RuntimeError: losing the coordinator is not a peer failure to retry."""


_RETRY_DELAY_MAX = 0.25
"""The longest pause between two tries while the coordinator is unreachable. It is back
within one pause of listening again; with pauses up to 1 s, the members of a job came back
to a restarted coordinator up to 1 s apart, half of a 2 s heartbeat timeout."""


_FAILOVER_CONNECT_SECONDS = 3.0
"""With a successor listed, how long a try waits to connect: a live coordinator's kernel
completes the handshake however busy the coordinator is; a host cut off never does."""
_FAILOVER_ANSWER_SECONDS = 10.0
"""... and for an answer, beyond the wait a long poll asks for (its ``timeout``): a
connection to a host that was cut off is never answered (and a try at the successor while
the first coordinator lives is refused at once)."""
UNANSWERED_TRY_SECONDS = _FAILOVER_CONNECT_SECONDS + _FAILOVER_ANSWER_SECONDS + 10.0
"""With a successor listed, the longest a try waits on a coordinator that does not answer (a
worker's long polls ask for up to 10 s): how late a worker may turn to the successor."""


_answering: dict[str, int] = {}
"""For each list of addresses, which one last answered in this process: every client tries
it next rather than wait again on a coordinator that is gone (a machine gone takes a
connect timeout)."""


_left_behind: dict[str, int] = {}
"""For each list of addresses, how many of its first coordinators this process has left for
good: once a later one answered (a successor answers only once it took the job over), an
earlier one is never asked again. Node 0 cut off and back would answer for a job it no longer
holds (evicted, or failed), and a worker of the job that went on would stop for it."""


class CoordinatorClient:
    """One per thread: the training loop and the heartbeat thread each hold their own.

    A request that cannot reach the coordinator is tried again for ``retry_seconds`` (it may
    be restarting); ``timeout`` bounds each try (default: 10 s to connect, 60 s for an
    answer, which a long poll takes). ``url`` may list several coordinators, comma-separated:
    the job's, then its successor (``shoal run --nnodes``: node 1 takes over if node 0 is
    lost). A try that fails (refused, or unanswered: the host may be cut off) goes to the
    next, and each try is bounded more tightly than with one; the one that answers is kept."""

    def __init__(self, url: str, token: str, *, retry_seconds: float = RETRY_SECONDS,
                 timeout: float | None = None):
        self._listed = url
        self._urls = url.split(",")
        self._at = _answering.get(url, 0)
        self.retry_seconds = retry_seconds
        """How long a request tries before it raises :class:`CoordinatorUnreachable`."""
        self._bounded = timeout is None and self.fails_over
        self._http = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(10.0, read=60.0) if timeout is None else httpx.Timeout(timeout),
        )

    @property
    def url(self) -> str:
        """The coordinator this client asks now."""
        return self._urls[self._at]

    @property
    def fails_over(self) -> bool:
        """A successor is listed: a coordinator lost may be taken over."""
        return len(self._urls) > 1

    @classmethod
    def for_heartbeats(cls, url: str, token: str, heartbeat_timeout: float) -> CoordinatorClient:
        """One try per beat, bounded by the heartbeat timeout: the beats themselves repeat,
        and a beat that retried would stand in for the ones behind it (it carried an old
        payload, and waited out a backoff while the coordinator was already back)."""
        return cls(url, token, retry_seconds=0.0, timeout=heartbeat_timeout)

    def close(self) -> None:
        self._http.close()

    def post(self, path: str, payload: dict) -> dict:
        return self._request("POST", path, json=finite_or_null(payload))

    def get(self, path: str, **params) -> dict:
        return self._request("GET", path, params=params)

    def _request(self, method: str, path: str, **kwargs) -> dict:
        # Connection errors are retried for a while: the coordinator may be restarting.
        deadline = time.monotonic() + self.retry_seconds
        delay = 0.05
        if self._bounded:
            poll = float(kwargs.get("params", {}).get("timeout", 0.0))
            kwargs["timeout"] = httpx.Timeout(_FAILOVER_CONNECT_SECONDS, read=poll + _FAILOVER_ANSWER_SECONDS)
        while True:
            self._ask(_answering.get(self._listed, self._at))  # another client may have found the live one
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as error:
                asked = self.url
                self._next()  # refused, or unanswered: the next, if any
                if time.monotonic() > deadline:
                    raise CoordinatorUnreachable(f"coordinator {asked} unreachable: {error}") from error
                time.sleep(delay)
                delay = min(delay * 2, _RETRY_DELAY_MAX)
                continue
            _answering[self._listed] = self._at
            _left_behind[self._listed] = max(self._at, _left_behind.get(self._listed, 0))
            if response.status_code == 401:
                raise PermissionError(f"coordinator {self.url} refused the job token")
            response.raise_for_status()
            return response.json()

    def _next(self) -> None:
        """This process asks the next coordinator of the list from now on (unless another
        client already moved on from the one that failed here)."""
        if _answering.get(self._listed, self._at) == self._at:
            following = self._at + 1
            _answering[self._listed] = following if following < len(self._urls) else _left_behind.get(self._listed, 0)
        self._ask(_answering[self._listed])

    def _ask(self, at: int) -> None:
        if at != self._at:
            self._at = at
            self._http.base_url = self.url

"""The worker's side of the coordinator protocol (httpx: a synchronous client with pooling)."""

from __future__ import annotations

import time

import httpx

from shoal._json import finite_or_null

__all__ = ["CoordinatorClient", "CoordinatorUnreachable"]


class CoordinatorUnreachable(ConnectionError):
    """Not a RuntimeError: losing the coordinator is not a peer failure to retry."""


class CoordinatorClient:
    """One per thread: the training loop and the heartbeat thread each hold their own."""

    def __init__(self, url: str, token: str, *, retry_seconds: float = 30.0):
        self.url = url
        self._retry_seconds = retry_seconds
        self._http = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(10.0, read=60.0),
        )

    def close(self) -> None:
        self._http.close()

    def post(self, path: str, payload: dict) -> dict:
        return self._request("POST", path, json=finite_or_null(payload))

    def get(self, path: str, **params) -> dict:
        return self._request("GET", path, params=params)

    def _request(self, method: str, path: str, **kwargs) -> dict:
        # Connection errors are retried for a while: the coordinator may be restarting.
        deadline = time.monotonic() + self._retry_seconds
        delay = 0.05
        while True:
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as error:
                if time.monotonic() > deadline:
                    raise CoordinatorUnreachable(f"coordinator {self.url} unreachable: {error}") from error
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            if response.status_code == 401:
                raise PermissionError(f"coordinator {self.url} refused the job token")
            response.raise_for_status()
            return response.json()

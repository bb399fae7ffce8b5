"""The coordinator's HTTP face (aiohttp) and the TCPStore that process groups rendezvous on.

aiohttp because the coordinator mostly *waits*: every worker holds a long-poll open on
``/generation`` while it trains, and an asyncio server holds hundreds of those without a
thread each. Every request must carry the job token (``Authorization: Bearer <token>``);
anything else gets 401 and changes nothing.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import socket
import threading
from datetime import timedelta

import torch.distributed as dist
from aiohttp import web

from shoal import _protocol
from shoal.coordinator.membership import Membership

__all__ = ["Coordinator"]

_TICK_SECONDS = 0.05
_LONG_POLL_SECONDS = 30.0


class Coordinator:
    """Membership + HTTP server + TCPStore, served from a background thread.

    ``start()`` returns once the server listens; ``url`` and ``token`` are what workers need.
    """

    def __init__(self, membership: Membership, *, host: str = "127.0.0.1", port: int = 0,
                 token: str | None = None, store_port: int = 0, bind_all: bool = False):
        self.membership = membership
        self.host = host
        """The address workers are told (in ``url``), and the one it listens on unless
        ``bind_all``: then every interface, as the store always does."""
        self._bind_all = bind_all
        self.port = port
        self.store_port = store_port
        """0: the OS chooses; ``shoal run --nnodes`` gives torchrun's --master-port."""
        self.token = token or secrets.token_hex(16)
        self.store: dist.TCPStore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._changed: asyncio.Event | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> Coordinator:
        # The store outlives any worker: rank 0 dying must not take the rendezvous with it.
        self.store = dist.TCPStore(self.host, self.store_port, is_master=True, wait_for_workers=False,
                                   timeout=timedelta(seconds=60))
        self._thread = threading.Thread(target=self._serve, name="shoal-coordinator", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():  # once
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.store = None

    # -- serving -------------------------------------------------------------------------------

    def _serve(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as error:  # surfaced to start(); a running job then fails loudly
            self._error = error
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._changed = asyncio.Event()
        self.membership.add_listener(lambda: self._loop.call_soon_threadsafe(self._notify))
        app = web.Application(middlewares=[self._authenticate])
        app.add_routes([
            web.post("/launcher", self._launcher),
            web.post("/join", self._join),
            web.post("/heartbeat", self._heartbeat),
            web.get("/generation", self._generation),
            web.post("/report", self._report),
            web.post("/finish", self._finish),
            web.get("/status", self._status),
            web.get("/record", self._record),
        ])
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, _any_address(self.host) if self._bind_all else self.host, self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        self._ready.set()
        ticker = asyncio.create_task(self._tick())
        await self._stop.wait()
        ticker.cancel()
        await runner.cleanup()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _tick(self) -> None:
        while True:
            self.membership.tick()
            await asyncio.sleep(_TICK_SECONDS)

    @web.middleware
    async def _authenticate(self, request: web.Request, handler):
        supplied = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if not hmac.compare_digest(supplied.encode(), self.token.encode()):
            return web.json_response({"error": "missing or wrong job token"}, status=401)
        try:
            return await handler(request)
        except ConnectionResetError:
            # The client hung up before its body arrived (a worker killed mid-report): the
            # request never took effect and no one is left to answer. aiohttp would log a
            # traceback into the launcher's output for it.
            return web.Response(status=400)

    # -- handlers ------------------------------------------------------------------------------

    async def _launcher(self, request: web.Request) -> web.Response:
        body = await request.json()
        try:
            self.membership.admit_launcher(body["spec"], str(body.get("launcher", "")),
                                           protocol=body.get("protocol"), version=body.get("version"))
        except ValueError as error:
            return web.json_response({"error": str(error)}, status=409)
        return web.json_response({"ok": True, "protocol": _protocol.PROTOCOL, "version": _protocol.VERSION})

    async def _join(self, request: web.Request) -> web.Response:
        body = await request.json()
        try:
            worker_id = self.membership.join(body.get("worker_id"), body.get("host", "?"),
                                             int(body.get("pid", 0)), str(body.get("launcher", "")))
        except ValueError as error:
            return web.json_response({"error": str(error)}, status=409)
        return web.json_response({
            "worker_id": worker_id,
            "store_host": self.host,
            "store_port": self.store.port,
            "heartbeat_timeout": self.membership.heartbeat_timeout,
            "incarnation": self.membership.incarnation,
            # a generation exists: this worker joins a running job (a restart, or more members)
            "running": self.membership.current_number > 0,
        })

    async def _heartbeat(self, request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response(self.membership.heartbeat(int(body["worker_id"]), body))

    async def _generation(self, request: web.Request) -> web.Response:
        """Long-poll: answers as soon as a generation newer than ``after`` exists, or the job
        ended. ``end_only``: only the end (a finished worker's wait, or that of ``worker`` if it
        finished its part); ``incarnation``: the
        coordinator the caller knows, answered at once if that is not us (we restarted)."""
        after = int(request.query.get("after", 0))
        asking = request.query.get("worker")  # a restart of a finished worker has only the end to wait for
        end_only = request.query.get("end_only") == "1" or (asking is not None and
                                                              self.membership.has_finished(int(asking)))
        known = request.query.get("incarnation")
        deadline = self._loop.time() + float(request.query.get("timeout", _LONG_POLL_SECONDS))
        incarnation = self.membership.incarnation
        while True:
            generation = None if end_only else self.membership.generation_after(after)
            status = self.membership.status
            if generation is not None or status in ("completed", "failed"):
                return web.json_response({
                    "status": status,
                    "reason": self.membership.reason,
                    "generation": generation.to_json() if generation else None,
                    "fired_faults": sorted(self.membership.fired_faults),
                    "store_host": self.host,
                    "store_port": self.store.port,
                    "incarnation": incarnation,
                })
            remaining = deadline - self._loop.time()
            if remaining <= 0 or (known is not None and known != incarnation):
                return web.json_response({"status": status, "reason": "", "generation": None,
                                          "incarnation": incarnation})
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=min(remaining, 1.0))
            except TimeoutError:
                pass

    async def _report(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("kind") == "exit" and "worker_id" in body:  # ids known to the launcher (shoal run)
            # --nnodes: a rank's exit, joined or not, and whether it is started again.
            # --coordinator: a restart that died before joining, with none left, of a worker
            # that had joined: no longer waited for.
            self.membership.report_exit_by_id(int(body["worker_id"]), str(body.get("detail", "exited")),
                                              restarting=bool(body.get("restarting")),
                                              joined=bool(body.get("joined")))
            return web.json_response({"ok": True})
        if body.get("kind") == "exit":
            worker_id = self.membership.report_exit_of_process(
                str(body["host"]), int(body["pid"]), str(body.get("detail", "exited")),
                restarting=bool(body.get("restarting")), launcher=str(body.get("launcher", "")))
            return web.json_response({"ok": True, "worker_id": worker_id})
        worker_id = int(body["worker_id"])
        if body.get("kind") == "kill":
            self.membership.report_kill(worker_id, str(body.get("detail", "")))
        elif body.get("kind") == "rejected":
            self.membership.reject(str(body.get("detail", "")))
        else:
            self.membership.report_failure(worker_id, int(body.get("generation", 0)),
                                           str(body.get("detail", "")), body.get("phase"))
        return web.json_response({"ok": True})

    async def _finish(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.membership.finish(int(body["worker_id"]), body)
        # Which coordinator heard it, and whether the job has ended: the worker stays until it has
        return web.json_response({"ok": True, "status": self.membership.status,
                                  "incarnation": self.membership.incarnation})

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(self.membership.snapshot())

    async def _record(self, request: web.Request) -> web.Response:
        return web.json_response(self.membership.record().to_json())


def _any_address(host: str) -> str:
    """Every interface of ``host``'s family: one socket, so one port (port 0 on both families
    would give each its own)."""
    family = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0][0]
    return "::" if family == socket.AF_INET6 else "0.0.0.0"

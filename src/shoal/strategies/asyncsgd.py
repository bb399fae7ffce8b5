"""``async``: a parameter server, and workers that never wait for one another.

Rank 0 of each generation runs the parameter server in a thread beside its own worker. A
worker asks the server for work and gets a *unit* (one share of a global batch: the batch
of step s split into ``shares`` parts, fixed for the job) with the current parameters and
their version. It pushes back the mean gradient over the unit, tagged with that version.
The server applies it with the learning rate divided by its staleness, the number of
updates applied since (Zhang et al., 2016, "Staleness-aware async-SGD"), or drops it when
it is more than ``--max-staleness`` versions old and hands the unit out again. A slow
worker slows only its own units, and a unit it pushed too stale goes to another worker first.

Commit point. Every ``SNAPSHOT_STEPS * shares`` applied updates the server takes a
snapshot (model, optimizer, which units are applied, the loss of every step they finished)
and attaches it to its next answer to a remote worker. That worker, the *holder*, adopts
the snapshot as its committed state and reports the finished steps to the coordinator, so
a step is reported only once its state lives on two members. Where the generation spans
several hosts (launchers, the nodes of a job), the holder is a worker off the server's
host, so that losing the server's machine (its launcher and every worker on it) loses no
reported step. (Any remote worker used to hold it: a node killed with the server and the
holder on it sent the survivors back to an older snapshot, to redo steps the coordinator
had recorded.) When a worker dies and the server lives, the server's own state goes on:
the heal spreads it, and only the units that were in flight are handed out again. When the
server dies the survivors return to the newest snapshot they hold, the heal spreads the
newest one (the holder's), and every unit applied after it is handed out again: each
sample still counts once, and no reported step is lost with the server.
"""

from __future__ import annotations

import copy
import heapq
import os
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.utils import parameters_to_vector

from shoal.strategies.api import Strategy, register

__all__ = ["DONE", "SERVER", "SNAPSHOT_STEPS", "WAIT", "Answer", "AsyncSGD", "ParameterServer", "ServerLink",
           "UnitBook", "may_hold_snapshots"]

DONE, WAIT = -1, -2
"""Answers instead of a unit: the run is over / nothing to hand out yet, ask again."""
SERVER = 0
"""The rank that serves: rank 0 of every generation."""
SNAPSHOT_STEPS = int(os.environ.get("SHOAL_ASYNC_SNAPSHOT_STEPS", "4"))
"""A snapshot every this many global batches' worth of updates: what the server's death
may cost again, against the time a snapshot takes (a serialised model and optimizer).
(The environment variable is for tests that need snapshots to be rare.)"""
_HEADER = struct.Struct("<qqqqdq")
"""unit, version, samples (to the server) or snapshot bytes (from it), whether the worker
may hold snapshots (to the server) or shares (from it), loss share, bytes that follow
(float32 gradient or parameters, then the snapshot)."""


class UnitBook:
    """Which units of the run are applied, and the loss of every step they finished."""

    def __init__(self) -> None:
        self.shares = 0
        """Units per step, fixed when the job starts (the first generation's size)."""
        self.prefix = 0
        """Every unit below this one is applied."""
        self.beyond: set[int] = set()
        """Applied units above ``prefix`` (asynchrony finishes them out of order)."""
        self.partial: dict[int, list] = {}
        """step -> [units applied, loss so far], for steps still missing units."""
        self.ledger: list[tuple[int, float, int, float]] = []
        """(step, loss, generation, unix time) of every finished step, in finishing order."""

    def is_applied(self, unit: int) -> bool:
        return unit < self.prefix or unit in self.beyond

    @property
    def whole_steps(self) -> int:
        """Steps from the first whose every unit is applied."""
        return self.prefix // self.shares

    def apply(self, unit: int, loss_part: float, generation: int) -> None:
        self.beyond.add(unit)
        while self.prefix in self.beyond:
            self.beyond.discard(self.prefix)
            self.prefix += 1
        step = unit // self.shares
        done, loss = self.partial.pop(step, (0, 0.0))
        if done + 1 < self.shares:
            self.partial[step] = [done + 1, loss + loss_part]
        else:
            self.ledger.append((step, loss + loss_part, generation, time.time()))

    def state_dict(self) -> dict:
        return {
            "shares": self.shares,
            "prefix": self.prefix,
            "beyond": torch.tensor(sorted(self.beyond), dtype=torch.int64),
            "partial": torch.tensor([[s, *p] for s, p in sorted(self.partial.items())],
                                    dtype=torch.float64).reshape(-1, 3),
            "ledger": torch.tensor(self.ledger, dtype=torch.float64).reshape(-1, 4),
        }

    def load_state_dict(self, state: dict) -> None:
        self.shares, self.prefix = int(state["shares"]), int(state["prefix"])
        self.beyond = set(state["beyond"].tolist())
        self.partial = {int(s): [int(n), loss] for s, n, loss in state["partial"].tolist()}
        self.ledger = [(int(s), loss, int(g), t) for s, loss, g, t in state["ledger"].tolist()]


def may_hold_snapshots(host_keys: list[str], rank: int) -> bool:
    """Whether ``rank`` may hold the server's snapshots, the members' hosts being
    ``host_keys``: if it runs on another host than the server, or no member does."""
    server = host_keys[SERVER]
    return host_keys[rank] != server or all(key == server for key in host_keys)


@register
class AsyncSGD(Strategy):
    name = "async"
    commits_every_step = False
    drives_steps = True

    def __init__(self, model, optimizer, options=None):
        super().__init__(model, optimizer, options)
        self.book = UnitBook()
        self.version = 0
        """Updates applied to the model this state belongs to."""
        self.server: ParameterServer | None = None
        self.link: ServerLink | None = None
        self.reported: set[tuple[int, int]] = set()
        """(step, generation) of the finished steps this process has reported."""
        self.committed_steps = 0
        """On the server: the whole steps its newest snapshot holds."""
        self.served_intact = False
        """This process served the generation that just ended, and its state is whole (no
        update was cut short): newer than any snapshot, it is what the next one starts from."""
        self.holds_snapshots = True
        """This worker may hold the server's snapshots: it runs on another host than the
        server, or no member of the generation does (``setup``)."""

    def state_dict(self):
        return {"version": self.version, "book": self.book.state_dict()}

    def load_state_dict(self, state):
        if state:
            self.version = int(state["version"])
            self.book.load_state_dict(state["book"])

    def setup(self, host_key):
        if self.book.shares == 0:  # the job's first generation fixes how a step is split
            self.book.shares = dist.get_world_size()
        keys = [None] * dist.get_world_size()
        dist.all_gather_object(keys, host_key)
        self.holds_snapshots = may_hold_snapshots(keys, dist.get_rank())
        return copy.deepcopy(self.model)  # the worker's replica; self.model is the server's

    def backward(self, loss):
        raise NotImplementedError("async drives its own steps (runtime.async_worker)")

    def step(self, step, last):
        raise NotImplementedError("async drives its own steps (runtime.async_worker)")

    def teardown(self):
        if self.server is not None:
            self.server.stop()
            self.served_intact = not self.server.applying
            self.server = None
        if self.link is not None:
            self.link.close()
            self.link = None


@dataclass(slots=True)
class Answer:
    """What the server hands a worker: a unit (or DONE/WAIT), the parameters, a snapshot."""

    unit: int
    version: int
    shares: int
    parameters: torch.Tensor | None = None
    snapshot: torch.Tensor | None = None


class ParameterServer:
    """Hands out units, applies pushed gradients, takes snapshots.

    Remote workers connect over TCP and are served by one thread with a selector; the worker
    in the server's own process calls :meth:`exchange` directly. (Not gloo point-to-point:
    a gloo receive can neither be polled nor time out without breaking the group, and a
    server must wait on many workers at once and notice when to stop.)
    """

    def __init__(self, strategy: AsyncSGD, total_units: int, generation: int,
                 snapshot: Callable[[], torch.Tensor], timeout: float):
        self.strategy, self.book = strategy, strategy.book
        self.total_units, self.generation = total_units, generation
        self.take_snapshot = snapshot
        """Makes the current state the server's committed one and returns it serialised."""
        self.timeout = timeout
        """The generation's collective timeout: a worker waits no longer for an answer, so a request
        with nothing to hand out is answered WAIT well before it (:attr:`wait_limit`)."""
        self._cursor = self.book.prefix
        self._again: list[int] = []
        """Dropped units, to be handed out again first (a heap)."""
        self._snapshot: torch.Tensor | None = None
        self.applying = False
        """An update is under way; still True after serving stopped: it was cut short by an
        error, and the model or optimizer may be half updated."""
        self.changed = threading.Condition()
        self.error: BaseException | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._listener: socket.socket | None = None
        self.connected = 0
        """Remote workers that connected so far."""

    @property
    def wait_limit(self) -> float:
        """How long a request with nothing to hand out waits before it is answered WAIT, and a
        unit its worker pushed too stale is left to the others."""
        return self.timeout / 4

    @property
    def finished(self) -> bool:
        return self.book.prefix >= self.total_units

    def exchange(self, unit: int, version: int, samples: int, loss_part: float,
                 gradient: torch.Tensor | None, *, holder: bool, may_defer: bool,
                 avoid: int = WAIT) -> Answer | None:
        """Apply a pushed gradient (``unit`` >= 0) and hand out the next unit. None: nothing
        to hand out yet and ``may_defer``: ask again when :attr:`changed` fires, with
        ``avoid`` the unit pushed.

        A unit dropped as too stale goes to another worker first: the one that pushed it is
        the slow one, and would likely push it too stale again while the run's tail waits.
        It takes its own unit back only when nobody else did before its wait ran out."""
        with self.changed:
            if self.error is not None:
                raise RuntimeError(f"the parameter server failed: {self.error}")
            if unit >= 0 and not self.book.is_applied(unit):
                self.applying = True
                self._apply(unit, version, samples, loss_part, gradient)
                self.applying = False
            return self._next(holder, may_defer, avoid=unit if unit >= 0 else avoid)

    def _apply(self, unit: int, version: int, samples: int, loss_part: float,
               gradient: torch.Tensor) -> None:
        strategy = self.strategy
        staleness = strategy.version - version
        if staleness > strategy.options.max_staleness:
            heapq.heappush(self._again, unit)
            self.changed.notify_all()  # a worker waiting for work may take it
            return
        if samples:  # an empty unit (the end of an epoch split too finely) changes nothing
            # The learning rate is the one for a whole global batch; a unit is 1/shares of
            # it, and a gradient staler than the shares in flight are counts for less still.
            # A unit's rate is its step's under the schedule, wherever and whenever it runs.
            strategy.schedule_lr(unit // self.book.shares)
            self._step(gradient, 1.0 / max(self.book.shares, staleness))
            strategy.version += 1
        self.book.apply(unit, loss_part, self.generation)
        if self.finished or (samples and strategy.version % (self.book.shares * SNAPSHOT_STEPS) == 0):
            self._snapshot = self.take_snapshot()
        self.changed.notify_all()

    def _step(self, gradient: torch.Tensor, scale: float) -> None:
        offset = 0
        for parameter in self.strategy.model.parameters():
            parameter.grad = gradient[offset:offset + parameter.numel()].view_as(parameter).clone()
            offset += parameter.numel()
        groups = self.strategy.optimizer.param_groups
        rates = [group["lr"] for group in groups]
        for group in groups:
            group["lr"] *= scale
        self.strategy.optimizer.step()
        for group, rate in zip(groups, rates):
            group["lr"] = rate

    def _next(self, holder: bool, may_defer: bool, avoid: int) -> Answer | None:
        unit = self._take_unit(avoid if may_defer else WAIT)
        if unit is None:
            unit = DONE if self.finished else WAIT
            # a holder waiting for work still takes a pending snapshot at once: it is what
            # reports the steps since the last one
            if unit == WAIT and may_defer and not (holder and self._snapshot is not None):
                return None
        snapshot = None
        if holder and unit != DONE:
            snapshot, self._snapshot = self._snapshot, None
        parameters = None
        if unit >= 0:
            parameters = parameters_to_vector(self.strategy.model.parameters()).detach().clone()
        return Answer(unit, self.strategy.version, self.book.shares, parameters, snapshot)

    def _take_unit(self, avoid: int) -> int | None:
        kept, unit = [], None
        while self._again and unit is None:
            candidate = heapq.heappop(self._again)
            if candidate == avoid:
                kept.append(candidate)
            elif not self.book.is_applied(candidate):
                unit = candidate
        for candidate in kept:
            heapq.heappush(self._again, candidate)
        if unit is not None:
            return unit
        while self._cursor < self.total_units and self.book.is_applied(self._cursor):
            self._cursor += 1
        if self._cursor >= self.total_units:
            return None
        self._cursor += 1
        return self._cursor - 1

    # -- serving remote workers ------------------------------------------------------------------

    def start(self, host: str, workers: int) -> str:
        """Listen on ``host`` for ``workers`` remote workers; return the address to publish."""
        self._listener = socket.create_server((host, 0))
        # Read before the thread starts: with no remote worker (a lone member) it finishes
        # at once and closes the listener.
        address = f"{host}:{self._listener.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, args=(workers,),
                                        name="shoal-parameter-server", daemon=True)
        self._thread.start()
        return address

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()

    def wait_finished(self) -> None:
        """Block until every remote worker was told the run is over; raise if serving failed."""
        if self._thread is not None:
            self._thread.join()
        if self.error is not None:
            raise RuntimeError(f"the parameter server failed: {self.error}")

    def _serve(self, workers: int) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._listener, selectors.EVENT_READ)
        connections: dict[socket.socket, bytearray] = {}
        waiting: dict[socket.socket, tuple[float, bool]] = {}
        """A request with nothing to hand out yet -> when to answer it WAIT at the latest, and
        whether its worker may hold snapshots."""
        pushed: dict[socket.socket, tuple[int, float]] = {}
        """The unit a worker pushed last, and until when it is left to others should it have
        been too stale: over its WAITs too (a holder is answered WAIT with a snapshot)."""

        def avoided(connection: socket.socket) -> int:
            unit, until = pushed.get(connection, (WAIT, 0.0))
            return unit if time.monotonic() < until else WAIT
        finished = 0

        def deliver(connection: socket.socket, answer: Answer) -> None:
            nonlocal finished
            self._send(connection, answer)
            if answer.unit == DONE:  # that worker is finished: its closing is no failure
                selector.unregister(connection)
                del connections[connection]
                connection.close()
                finished += 1

        try:
            while finished < workers and not self._stopping.is_set():
                for key, _ in selector.select(timeout=0.01):
                    if key.fileobj is self._listener:
                        connection, _ = self._listener.accept()
                        self.connected += 1
                        connection.settimeout(self.timeout)
                        connections[connection] = bytearray()
                        selector.register(connection, selectors.EVENT_READ)
                        continue
                    request = self._read(key.fileobj, connections[key.fileobj])
                    if request is None:
                        continue
                    *arguments, holds = request
                    if arguments[0] >= 0:
                        pushed[key.fileobj] = (arguments[0], time.monotonic() + self.wait_limit)
                    answer = self.exchange(*arguments, holder=holds, may_defer=True, avoid=avoided(key.fileobj))
                    if answer is None:
                        waiting[key.fileobj] = (time.monotonic() + self.wait_limit, holds)
                    else:
                        deliver(key.fileobj, answer)
                for connection, (deadline, holds) in list(waiting.items()):
                    answer = self.exchange(WAIT, 0, 0, 0.0, None, holder=holds,
                                           may_defer=time.monotonic() < deadline, avoid=avoided(connection))
                    if answer is not None:
                        del waiting[connection]
                        deliver(connection, answer)
        except BaseException as error:  # noqa: BLE001  (raised in the worker thread instead)
            with self.changed:
                self.error = error
                self.changed.notify_all()
        finally:
            selector.close()
            for connection in connections:
                connection.close()
            self._listener.close()

    def _read(self, connection: socket.socket, buffer: bytearray) -> tuple | None:
        """Take what arrived; a whole request once it is complete, else None: the arguments of
        :meth:`exchange`, and whether the worker may hold snapshots."""
        chunk = connection.recv(1 << 20)
        if not chunk:
            raise ConnectionError("a worker closed its connection to the parameter server")
        buffer += chunk
        if len(buffer) < _HEADER.size:
            return None
        unit, version, samples, holds, loss_part, size = _HEADER.unpack_from(buffer)
        if len(buffer) < _HEADER.size + size:
            return None
        gradient = None
        if size:
            gradient = torch.frombuffer(bytearray(buffer[_HEADER.size:_HEADER.size + size]),
                                       dtype=torch.float32)
        del buffer[:_HEADER.size + size]
        return unit, version, samples, loss_part, gradient, bool(holds)

    def _send(self, connection: socket.socket, answer: Answer) -> None:
        body = [t.numpy().tobytes() for t in (answer.parameters, answer.snapshot) if t is not None]
        snapshot_bytes = answer.snapshot.numel() if answer.snapshot is not None else 0
        header = _HEADER.pack(answer.unit, answer.version, snapshot_bytes, answer.shares, 0.0,
                              sum(len(b) for b in body))
        connection.sendall(header + b"".join(body))
        self.strategy.count_bytes(len(header) + sum(len(b) for b in body))


class ServerLink:
    """A remote worker's connection to the server: push (or just ask), then take the answer."""

    def __init__(self, strategy: AsyncSGD, address: str, timeout: float):
        self.strategy = strategy
        host, port = address.rsplit(":", 1)
        try:
            self._connection = socket.create_connection((host, int(port)), timeout=timeout)
        except OSError as error:
            raise RuntimeError(f"cannot reach the parameter server at {address}: {error}") from error
        self._size = sum(p.numel() for p in strategy.model.parameters())

    def exchange(self, unit: int, version: int, samples: int, loss_part: float,
                 gradient: torch.Tensor | None) -> Answer:
        payload = gradient.numpy().tobytes() if gradient is not None else b""
        message = _HEADER.pack(unit, version, samples, int(self.strategy.holds_snapshots), loss_part,
                               len(payload)) + payload
        try:
            self._connection.sendall(message)
            self.strategy.count_bytes(len(message))
            unit, version, snapshot_bytes, shares, _, size = _HEADER.unpack(self._receive(_HEADER.size))
            body = self._receive(size)
        except OSError as error:  # a timeout included: the group's recovery takes over
            raise RuntimeError(f"the parameter server did not answer: {error}") from error
        answer = Answer(unit, version, shares)
        if unit >= 0:
            answer.parameters = torch.frombuffer(body[:self._size * 4], dtype=torch.float32)
        if snapshot_bytes:
            answer.snapshot = torch.frombuffer(body[size - snapshot_bytes:], dtype=torch.uint8)
        return answer

    def _receive(self, size: int) -> bytearray:
        buffer = bytearray(size)
        view, received = memoryview(buffer), 0
        while received < size:
            count = self._connection.recv_into(view[received:])
            if not count:
                raise ConnectionError("the parameter server closed the connection")
            received += count
        return buffer

    def close(self) -> None:
        self._connection.close()

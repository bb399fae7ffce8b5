"""``shoal run --nnodes N``: how the launchers of several nodes find each other and end together.

torchrun's static and c10d rendezvous. Node 0's launcher hosts the job's coordinator, whose
TCPStore listens on ``--master-port`` at ``--master-addr``, the one address every node is
given; a plain script's ``init_process_group("env://")`` meets there, as under torchrun. The
other nodes' launchers connect to that store to learn what only node 0 knows: the
coordinator's URL and token (for scripts that use ``shoal.train``) and the run id. Each
checks that it belongs to node 0's job (the same number of nodes, of processes per node, the
same ``--rdzv-id``) and claims its node rank (its ``--node-rank``, or the next free one) so
that two launchers never run the same ranks. The store then carries what the nodes must
share:

- the first failure of a plain script: every node stops its workers, since a torchrun
  script cannot lose a rank (an elastic script's failures go to the coordinator instead);
- with ``--max-restarts N``, a worker's failure in attempt k < N instead asks every node to
  start its workers again, as torchrun does: each node stops its workers, and the next
  attempt starts once every node has (a barrier), so no worker of attempt k still runs
  (holding the script's checkpoint, its GPU) when attempt k + 1 starts. Likewise a node whose
  workers all succeeded waits for every other node's before it ends: a failure elsewhere
  still restarts its workers too;
- node 1's standby address (``launch/succession.py``): node 1 claims its rank with it, and
  node 0 publishes it as the job's successor before any worker starts;
- each node's end: node 0 keeps the store and the coordinator up until every other node
  has read the job's outcome, as torchrun's exit barrier does.

The store has no authentication (torch's TCPStore has none); whoever reaches
``--master-addr:--master-port`` could read the job token there, as they could disturb the
rendezvous itself. Keep that port inside the cluster's network.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import NoReturn

import torch.distributed as dist

from shoal import _protocol
from shoal._deadline import answered_within
from shoal.config import ConfigError
from shoal.launch.succession import Standby

__all__ = ["NodeGone", "NodeRendezvous", "first_line"]

_URL = "shoal/run/coordinator-url"
_TOKEN = "shoal/run/token"
_RUN_ID = "shoal/run/run-id"
_SHAPE = "shoal/run/shape"
"""Node 0's flags that every node must give alike (JSON: flag -> value)."""
_PROTOCOL, _VERSION = "shoal protocol", "shoal version"
"""Node 0's shoal (``shoal._protocol``), published in its shape."""
_NODE = "shoal/run/node/{}"
"""Claimed by the launcher that runs as that node: two may not. (``ID STANDBY-URL`` for node 1.)"""
_SUCCESSOR = "shoal/run/successor"
"""The coordinator that takes over if node 0 is lost: node 1's standby, as it was when the
workers started (they are told it then)."""
_FAILED = "shoal/run/failed"
"""The job failed: every node stops its workers for good."""
_FAILURE_IDS = "shoal/run/failure-ids/{}"
"""The ids of the failures that failed the job ("final"), or that restarted attempt k
(``TORCHELASTIC_RESTART_COUNT``), each followed by a space (appended once written)."""
_FAILURE = "shoal/run/failure/{}"
"""``UNIX_TIME TEXT`` of one failure."""
_RESTART = "shoal/run/restart/{}"
"""Attempt k failed, and restarts are left: every node starts its workers again."""
_STOPPED = "shoal/run/stopped/{}"
"""How many nodes stopped their workers of attempt k (the barrier before the next)."""
_SUCCEEDED = "shoal/run/succeeded/{}"
"""How many nodes' workers all succeeded in attempt k."""
_STORE_PORT = "shoal/run/store-port/{}"
"""Where attempt k > 0's scripts meet (``MASTER_PORT``): a store of its own on node 0. torch
2.13's ``env://`` no longer prefixes an attempt's keys (it expects "a new TCPStore for every
retry"): in the first attempt's store, the failed one's keys (each rank's gloo address) would
be read as this one's, and its ranks would wait on dead peers. (torchrun 2.13's standalone
restart does just that: a textbook script fails to reconnect, and uses up its restarts.)"""
_STARTED = "shoal/run/started"
"""Every node is in: workers may start."""
_REFUSED = "shoal/run/refused"
_NODE0_DONE = "shoal/run/node-0-done"
_FINISHED = "shoal/run/finished/{}"
_BEAT = "shoal/run/beat/{}"
"""A counter each node's launcher adds to while it lives (from a thread of its own): node 0
watches it move (one clock, node 0's, so no two machines' clocks are compared)."""
_POLL_SECONDS = 0.25
_STORE_TIMEOUT_SECONDS = 30.0
"""How long a store's ``get`` waits for its key (node 0's own, and its attempts' stores)."""


class NodeGone(RuntimeError):
    """Node 0's store stopped answering: its launcher, which hosts it, is gone (or cut off)."""


class NodeRendezvous:
    """This node's view of the others, through node 0's store."""

    def __init__(self, store: dist.TCPStore, node_rank: int, nnodes: int, *, url: str, token: str,
                 run_id: str, patience: float = _STORE_TIMEOUT_SECONDS):
        self._store = store
        self._patience = patience
        """How long node 0's store may take to answer one call before this node takes it for
        gone. Judged here, by this node's clock (``shoal._deadline``: torch's TCPStore client
        would wait a quarter of an hour once node 0's link is down, for ever while its
        launcher is frozen)."""
        self.store_port = store.port
        """Where scripts meet (``MASTER_PORT``): ``--master-port``, or the OS's choice on one node."""
        self.node_rank = node_rank
        self.nnodes = nnodes
        self.url = url
        self.token = token
        self.run_id = run_id
        self._gone: str | None = None
        self._unanswered = False
        self._hosting = False
        """Node 0: the store is ours, and anything wrong with it is a bug to see."""
        self._beats: dict[int, tuple[int, float]] = {}
        """Node 0: each node's beat counter, and when it last moved."""
        self._beating: threading.Event | None = None
        self._beater: threading.Thread | None = None
        self.attempt = 0
        """Which start of the workers this is (torchrun's ``TORCHELASTIC_RESTART_COUNT``)."""
        self.max_restarts = 0
        """``--max-restarts``: how many times a plain script's workers all start again."""
        self._attempt_store: dist.TCPStore | None = None
        """Node 0: the store the current attempt's scripts meet at, after a restart."""
        self.successor_url: str | None = None
        """Where node 1 takes over the job's coordinator if node 0 is lost (from the start)."""
        self.standby: Standby | None = None
        """Node 1, if it is the successor: the ports it would take over on."""

    @classmethod
    def host(cls, store: dist.TCPStore, nnodes: int, shape: dict, *, url: str, token: str,
             run_id: str) -> NodeRendezvous:
        """Node 0: publish what the other nodes need in the store it serves (nothing when it
        is the only node: the token stays out of the store)."""
        if nnodes > 1:
            for key, value in ((_URL, url), (_TOKEN, token), (_RUN_ID, run_id),
                               (_SHAPE, json.dumps(shape | {_PROTOCOL: _protocol.PROTOCOL, _VERSION: _protocol.VERSION})),
                               (_NODE.format(0), "node 0")):
                store.set(key, value)
        rendezvous = cls(store, 0, nnodes, url=url, token=token, run_id=run_id)
        rendezvous._hosting = True
        return rendezvous

    @classmethod
    def join(cls, master_addr: str, master_port: int, node_rank: int | None, nnodes: int,
             shape: dict, run_id: str | None, timeout: float,
             patience: float = _STORE_TIMEOUT_SECONDS) -> NodeRendezvous:
        """A node other than 0: wait up to ``timeout`` for node 0's store, check that this node
        belongs to node 0's job, and take ``node_rank`` (None: the next free one, torchrun's
        c10d way). Once in, node 0 is gone when its store leaves a call unanswered for
        ``patience`` seconds.

        Raises :class:`ConfigError` naming the flag: ``--master-addr`` if no node 0 answers
        (the nodes may start in any order, but a wrong address would otherwise hang with no
        word), or the flag in which this node disagrees with node 0's job."""
        try:
            socket.getaddrinfo(master_addr, master_port, type=socket.SOCK_STREAM)
        except OSError as error:  # not worth waiting for: it will not resolve later either
            raise ConfigError("--master-addr", f"cannot resolve {master_addr!r}: "
                              f"{error.strerror or error}") from None
        deadline = time.monotonic() + timeout
        try:
            _wait_until_listening(master_addr, master_port, deadline)
            store = dist.TCPStore(master_addr, master_port, is_master=False,
                                  timeout=timedelta(seconds=max(deadline - time.monotonic(), 10.0)))
            url, token, theirs, their_shape = (store.get(key).decode()
                                               for key in (_URL, _TOKEN, _RUN_ID, _SHAPE))
        except (OSError, RuntimeError) as error:  # torch's DistError and its kinds are RuntimeErrors
            raise ConfigError("--master-addr", f"no node 0 answered at {master_addr}:{master_port} "
                              f"within {timeout:g} s (start `shoal run --node-rank 0` there, or "
                              f"give a longer --join-timeout): {first_line(error)}") from None
        rendezvous = cls(store, 0, nnodes, url=url, token=token, run_id=theirs,
                         patience=max(deadline - time.monotonic(), patience))
        theirs_shape = json.loads(their_shape)
        protocol, version = theirs_shape.pop(_PROTOCOL, None), theirs_shape.pop(_VERSION, None)
        if protocol != _protocol.PROTOCOL:
            rendezvous._refuse(ConfigError("--master-addr", f"node 0 at {master_addr}:{master_port} runs "
                                           f"{_protocol.describe(protocol, version)}, this node "
                                           f"{_protocol.describe()}: run one shoal version on every node"))
        for flag, mine, node0 in [*((flag, value, theirs_shape.get(flag)) for flag, value in shape.items()),
                                  ("--rdzv-id", run_id or theirs, theirs)]:
            if mine != node0:
                rendezvous._refuse(ConfigError(flag, f"node 0's job has {node0!r}, this node "
                                               f"{mine!r}: give every node the same"))
        unable = None
        if node_rank in (1, None):  # it may be node 1, which stands by to take over node 0's coordinator
            try:
                rendezvous.standby = Standby.towards(master_addr, master_port)
            except OSError as error:
                unable = error
        rendezvous.node_rank = rendezvous._claim(node_rank, deadline)
        if rendezvous.node_rank != 1 and rendezvous.standby is not None:
            rendezvous.standby.close()
            rendezvous.standby = None
        if rendezvous.node_rank == 1 and unable is not None:
            print(f"shoal run: warning: node 1 cannot stand by to take over node 0's coordinator "
                  f"({unable}): the job will not outlive node 0", file=sys.stderr, flush=True)
        store.set_timeout(timedelta(seconds=_STORE_TIMEOUT_SECONDS))
        rendezvous._patience = patience
        try:
            rendezvous._start_beating(master_addr, master_port)
        except RuntimeError as error:  # torch's DistError: node 0 went as this node came
            raise ConfigError("--master-addr", f"node 0 at {master_addr}:{master_port} stopped "
                              f"answering as this node joined: {first_line(error)}") from None
        return rendezvous

    def _refuse(self, refusal: ConfigError) -> NoReturn:
        self.refuse(str(refusal))
        raise refusal

    def _claim(self, node_rank: int | None, deadline: float) -> int:
        """Take ``node_rank``, or the lowest free one. A rank is free again once node 0
        released it (its launcher went silent, and may come back), so a taken one is
        waited for until ``deadline``."""
        me = f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
        while True:
            for wanted in [node_rank] if node_rank is not None else range(1, self.nnodes):
                mine = f"{me} {self.standby.url}" if wanted == 1 and self.standby is not None else me
                if self._store.compare_set(_NODE.format(wanted), "", mine).decode() == mine:
                    return wanted
            if time.monotonic() > deadline:
                self._refuse(ConfigError("--node-rank", f"another launcher runs as node {node_rank}")
                             if node_rank is not None else
                             ConfigError("--nnodes", f"node 0's job has all of its {self.nnodes} nodes"))
            time.sleep(_POLL_SECONDS)

    def release(self, node: int) -> None:
        """Node 0: ``node``'s launcher is gone; another may run as it (the same command
        started again)."""
        for key in (_NODE.format(node), _FINISHED.format(node)):
            self._store.delete_key(key)
        self._beats.pop(node, None)

    def _start_beating(self, master_addr: str, master_port: int) -> None:
        """A node other than 0, once it holds its rank: say that its launcher lives, from a
        thread of its own on a connection of its own, until :meth:`finish`. Its main loop
        can wait seconds on an answer of the coordinator or on a worker's exit being handled,
        and a node that merely waited must not be taken for gone (node 0 would free its rank,
        or fail a plain job)."""
        store = dist.TCPStore(master_addr, master_port, is_master=False,
                              timeout=timedelta(seconds=_STORE_TIMEOUT_SECONDS))
        self._beating = threading.Event()
        self._beater = threading.Thread(target=self._beat, args=(store, self._beating),
                                        name="shoal-node-beat", daemon=True)
        self._beater.start()

    def _beat(self, store: dist.TCPStore, stop: threading.Event) -> None:
        key = _BEAT.format(self.node_rank)
        while not stop.wait(_POLL_SECONDS) and self._gone is None:
            try:
                store.add(key, 1)
            except RuntimeError:  # torch's DistError: node 0 is gone, as the main loop finds out
                return

    def _stop_beating(self) -> None:
        if self._beating is not None:
            self._beating.set()
            self._beater.join(timeout=4 * _POLL_SECONDS)  # not for a call stuck on a hung node 0

    def silent_nodes(self, timeout: float) -> list[int]:
        """Node 0: the nodes that took a rank and whose launcher has not beaten for
        ``timeout`` seconds (killed with its machine, or its launcher SIGKILLed)."""
        now, silent = time.monotonic(), []
        for node in range(1, self.nnodes):
            if not self._claimed(node) or self._store.check([_FINISHED.format(node)]):
                continue  # not in, or done and gone on purpose
            count = self._store.add(_BEAT.format(node), 0)
            if self._beats.get(node, (None, 0.0))[0] != count:
                self._beats[node] = (count, now)
            elif now - self._beats[node][1] > timeout:
                silent.append(node)
        return silent

    def report_failure(self, when: float, failure: str, *, restartable: bool = False) -> bool:
        """Tell every node that this attempt failed: ``failure`` (a worker's exit at unix time
        ``when``) is listed, and the flag every node polls goes up: a restart if
        ``restartable`` (a worker failed, not a node) and restarts are left (True), else the
        job's failure. The record is written before its id is listed: a reporter that dies in
        between leaves nothing half-told."""
        restart = restartable and self.attempt < self.max_restarts
        failure_id = uuid.uuid4().hex[:12]
        self._call(self._store.set, _FAILURE.format(failure_id), f"{when:.6f} {failure}")
        self._call(self._store.append, _FAILURE_IDS.format(self.attempt if restart else "final"), f"{failure_id} ")
        self._call(self._store.set, _RESTART.format(self.attempt) if restart else _FAILED, "1")
        return restart

    def failed(self) -> bool:
        """Has some node reported a failure of a plain script, with no restart to follow?"""
        return bool(self._call(self._store.check, [_FAILED]))

    def restart_requested(self) -> bool:
        """Must every node start its workers again (this attempt failed, restarts are left)?"""
        return bool(self._call(self._store.check, [_RESTART.format(self.attempt)]))

    def stopped_for_restart(self, waiting: Callable[[], bool]) -> bool:
        """This node's workers of this attempt are gone: count it, and wait for every node's
        (``waiting()`` runs at each poll: node 0 minds silent nodes there, and a False ends the
        wait). True once all are, the attempt number raised and ``store_port`` that attempt's;
        False if the job failed or ``waiting`` said stop."""
        port_key = _STORE_PORT.format(self.attempt + 1)
        previous = self._attempt_store
        if self._hosting:  # before this node counts: the others read the port once all have
            self._attempt_store = dist.TCPStore(self._store.host, 0, is_master=True, wait_for_workers=False,
                                                timeout=timedelta(seconds=_STORE_TIMEOUT_SECONDS))
            self._call(self._store.set, port_key, str(self._attempt_store.port))
        if not self._barrier(_STOPPED, waiting, leave_on_restart=False):
            return False
        del previous  # every node's scripts of the attempt that met there are gone: it stops serving
        self.attempt += 1
        self.store_port = int(self._call(self._store.get, port_key))
        return True

    def succeeded(self, waiting: Callable[[], bool]) -> bool:
        """This node's workers all succeeded in this attempt: count it, and wait for every
        node's. True once all did (the job is done); False if a restart was asked for
        meanwhile, the job failed, or ``waiting`` said stop."""
        return self._barrier(_SUCCEEDED, waiting, leave_on_restart=True)

    def _barrier(self, key: str, waiting: Callable[[], bool], *, leave_on_restart: bool) -> bool:
        if self.failed() or not waiting():  # a node told to stop must not let the others by
            return False
        counter = key.format(self.attempt)
        self._call(self._store.add, counter, 1)
        while self._call(self._store.add, counter, 0) < self.nnodes:
            if self.failed() or not waiting() or (leave_on_restart and self.restart_requested()):
                return False
            time.sleep(_POLL_SECONDS)
        return True

    def failures(self, attempt: int | None = None) -> list[str]:
        """Every failure that failed the job (or that restarted ``attempt``), the earliest exit
        first: the others are usually its knock-on effects (a peer's collective broke),
        whichever node reported first. (Exit times from several machines are as close as
        their clocks.)"""
        ids_key = _FAILURE_IDS.format("final" if attempt is None else attempt)
        if not self._call(self._store.check, [ids_key]):
            return []
        ids = self._call(self._store.get, ids_key).decode().split()
        records = self._call(self._store.multi_get, [_FAILURE.format(i) for i in ids])
        timed = [record.decode().split(" ", 1) for record in records]
        return [failure for _, failure in sorted(timed, key=lambda pair: float(pair[0]))]

    def refuse(self, reason: str) -> None:
        """A launcher that does not fit node 0's job says why, for node 0 to tell if the job
        never gets its nodes. (A running job is left alone: the launcher just leaves.)"""
        self._call(self._store.set, _REFUSED, reason)

    def wait_for_nodes(self, timeout: float, silence: float, stopping: Callable[[], bool]) -> str | None:
        """Node 0, before any worker starts: wait for every other node to claim its rank (a
        node that took one and went silent for ``silence`` seconds loses it), then let the
        workers of every node start. None once they may, else why the job cannot start."""
        deadline = time.monotonic() + timeout
        while missing := [node for node in range(1, self.nnodes) if not self._claimed(node)]:
            for node in self.silent_nodes(silence):
                self.release(node)
            if stopping():
                return None  # the caller says why
            if time.monotonic() > deadline:
                refused = self._store.get(_REFUSED).decode() if self._store.check([_REFUSED]) else None
                return (f"node(s) {', '.join(map(str, missing))} of {self.nnodes} did not join within "
                        f"{timeout:g} s (--join-timeout)" + (f"; a launcher was refused: {refused}"
                                                             if refused else ""))
            time.sleep(_POLL_SECONDS)
        self.successor_url = self._store.get(_NODE.format(1)).decode().partition(" ")[2] or None
        if self.successor_url is not None:
            self._store.set(_SUCCESSOR, self.successor_url)
        self._store.set(_STARTED, "1")
        return None

    def wait_started(self, stopping: Callable[[], bool]) -> bool:
        """A node other than 0: wait until node 0 lets every node's workers start
        (True), or the job failed before it could, or this node is told to stop (False)."""
        while not self._call(self._store.check, [_STARTED]):
            if self.failed() or stopping():
                return False
            time.sleep(_POLL_SECONDS)
        if self._call(self._store.check, [_SUCCESSOR]):
            self.successor_url = self._call(self._store.get, _SUCCESSOR).decode()
        if self.standby is not None and self.standby.url != self.successor_url:
            self.standby.close()  # this launcher took rank 1 after the workers started: not the successor
            self.standby = None
        return True

    @property
    def host_gone(self) -> bool:
        """Node 0's store stopped answering (and so did its coordinator)."""
        return self._gone is not None

    @property
    def host_unanswering(self) -> bool:
        """Node 0 went silent (cut off, or frozen), or the network has no route to it, rather
        than refusing: requests to it hang until they time out, a worker's too, and it may be
        alive on the other side of a partition."""
        return self._unanswered

    def announce_done(self) -> None:
        """Node 0's workers are done: a node whose workers are done too may finish, and one
        still at work must not take the store's closing, once the others finished or after
        a while, for a failure."""
        self._call(self._store.set, _NODE0_DONE, "1")

    def node0_done(self) -> bool:
        return bool(self._call(self._store.check, [_NODE0_DONE]))

    def finish(self) -> None:
        """This node has read the job's outcome: node 0 may stop the store."""
        self._stop_beating()
        self._call(self._store.set, _FINISHED.format(self.node_rank), "1")

    def unfinished(self) -> list[int]:
        """The other nodes that joined and have not said they finished (node 0 asks)."""
        return [node for node in range(1, self.nnodes)
                if self._claimed(node) and not self._store.check([_FINISHED.format(node)])]

    def _claimed(self, node: int) -> bool:
        return bool(self._store.check([_NODE.format(node)]))

    def _call(self, operation, *args):
        if self._gone is not None:  # once: every call to a dead store logs a C++ stack trace
            raise NodeGone(self._gone)
        if self._hosting:  # our own store: anything wrong with it is a bug to see
            return operation(*args)
        try:
            return answered_within(self._patience, operation, *args)
        except (RuntimeError, TimeoutError) as error:  # torch's DistError and its kinds are RuntimeErrors
            self._unanswered = not _refused(error)
            self._gone = (f"node 0 stopped answering at its store (its launcher hosts the job's "
                          f"store and coordinator): {first_line(error)}")
            raise NodeGone(self._gone) from None


_REFUSALS = ("Connection was likely closed", "Connection reset by peer", "Broken pipe",
             "Connection refused")
"""What torch's TCPStore client says when node 0's machine answered for a launcher that is no
more: its kernel closed the connection (``Failed to recv, got 0 bytes``), reset it, or
refuses a new one."""


def _refused(error: BaseException) -> bool:
    """Is node 0 gone for sure: its machine answered, and the launcher that hosted the store is
    dead? Not when a call went unanswered (node 0 cut off, or frozen), nor when the network said
    it has no route to it ("No route to host": node 0 may live behind it)."""
    return not isinstance(error, TimeoutError) and any(refusal in str(error) for refusal in _REFUSALS)


def _wait_until_listening(address: str, port: int, deadline: float) -> None:
    """Connect and hang up until something listens at ``address:port``: the nodes start in any
    order. (TCPStore's client would wait too, logging a C++ stack trace at every retry.)"""
    while True:
        try:
            with socket.create_connection((address, port), timeout=max(0.1, min(2.0, deadline - time.monotonic()))):
                return
        except OSError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(_POLL_SECONDS)


def first_line(error: BaseException) -> str:
    """What torch's C++ errors say, without the stack trace they carry after it."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]

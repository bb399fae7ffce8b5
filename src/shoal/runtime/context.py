"""A worker's view of the job: its identity, the current generation and its process group.

The context joins the coordinator, heartbeats from a thread of its own, waits for each new
generation and forms that generation's process group on a fresh ``PrefixStore`` of the
coordinator's TCPStore, so nothing of a broken generation can leak into the next.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from shoal._deadline import answered_within
from shoal.config import ENV_TOKEN, ENV_WORKER_PID, ConfigError
from shoal.coordinator.client import RETRY_SECONDS, CoordinatorClient, CoordinatorUnreachable

__all__ = ["Context", "JobStopped", "GenerationMoved"]

ENV_COORDINATOR = "SHOAL_COORDINATOR"
ENV_SUCCESSOR = "SHOAL_COORDINATOR_SUCCESSOR"
"""Where the job's coordinator goes on if its host is lost (``shoal run --nnodes``: node 1's
standby): the worker's requests go there when the first cannot be reached."""
SILENT_NODE_HEARTBEATS = 3
"""``shoal run --nnodes``: a node's launcher silent this many heartbeat timeouts is gone to
node 0, and node 0's store unanswered that long is gone to the others: node 1 then takes over
the job's coordinator (a worker's requests outlast that)."""
ENV_WORKER_ID = "SHOAL_WORKER_ID"
ENV_HEARTBEAT_INTERVAL = "SHOAL_HEARTBEAT_INTERVAL"
ENV_LAUNCHER_ID = "SHOAL_LAUNCHER_ID"
"""Set by launchers, unique to each: workers started by one launcher share a host
(hierarchical strategies), and a remote launcher names its workers to the coordinator by it
and their pids (two containers may share a host name and pids)."""


_ENDING_WAIT_SECONDS = 10.0
"""How long one long poll of a finished worker for the job's end waits (it is answered the
moment the job ends, or at once by a coordinator that restarted since the worker's finish)."""
_ENDING_RETRY_SECONDS = 0.05
"""The pause before asking again a coordinator that could not be reached (it may be
restarting: the end comes within moments, and each run's launcher waits for the last)."""


class JobStopped(RuntimeError):
    """The coordinator ended the job (it failed elsewhere, or this worker was evicted), or it
    completed without this worker (``completed``: one restarted as the members finished)."""

    def __init__(self, message: str, *, completed: bool = False):
        super().__init__(message)
        self.completed = completed


class GenerationMoved(RuntimeError):
    """The coordinator formed a newer generation: leave this one at the step boundary."""


@dataclass(slots=True)
class CommitRecord:
    step: int
    generation: int
    committed_at: float
    loss_part: float
    whole: bool = False
    """``loss_part`` is the step's whole loss (async: the server finished the step alone)."""

    def to_json(self) -> list:
        record = [self.step, self.generation, self.committed_at, self.loss_part]
        return record + [True] if self.whole else record


def default_backend() -> str:
    # gloo always serves CPU tensors (heal blobs, CPU models); NCCL serves CUDA ones.
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


class Context:
    """Membership of one worker. Without a coordinator it is a job of one (``local()``)."""

    def __init__(self, url: str | None, token: str | None, worker_id: int | None,
                 heartbeat_interval: float = 0.25):
        self.url, self.token = url, token
        self.worker_id = worker_id
        self.heartbeat_interval = heartbeat_interval
        self.launcher_id = os.environ.get(ENV_LAUNCHER_ID, "")
        """The launcher that started this worker, as it names itself to the coordinator."""
        self.heartbeat_timeout = 5.0
        self.collective_timeout = 5.0
        """How long a collective of this generation may take: the coordinator's choice (the
        heartbeat timeout, longer after collectives timed out among live members)."""
        self.step_timeout = 0.0
        """How long a step's own collectives may take (``use_timeout``), as the coordinator
        says now; 0: it says nothing (one from before step timeouts)."""
        self.times_steps = False
        """The trainer runs this worker's steps under the step timeout (not async's, whose
        requests to its server stay under the collective timeout): told to the coordinator,
        which otherwise neither shrinks nor names the step timeout."""
        self.generation = 0
        self.members: list[int] = []
        self.rank = 0
        self.world_size = 1
        self.latest_generation = 0
        self.evicted = False
        self.job_ended: str | None = None
        """``completed`` or ``failed`` once a heartbeat's reply says so. A worker that rejoined
        as the others finished waits for peers that will never come: this ends the wait."""
        self.failed_generation: int | None = None
        """The generation this worker saw fail and left, until it enters a newer one. Sent with
        every heartbeat: a failure report is one message, which a restarting coordinator can
        miss, and without it every member would wait for a generation nobody forms."""
        self.failure_detail = ""
        """What failed in ``failed_generation`` (the report's detail), sent with it."""
        self.failure_phase = ""
        """Where it failed: ``timeouts.STEP`` (a step's own work) or ``START`` (anything else)."""
        self.committed_step = -1
        self.bytes_sent = 0
        self.start_rounds = 0.0
        """How many times the bytes this worker sent in its last round a generation's start may
        make one member send (the trainer's estimate; 0: not measured): with the coordinator's
        time between rounds, what bounds the collective timeout (coordinator/timeouts.py)."""
        self.fired_faults: set[str] = set()
        self.joined_running_job = False
        """The job had formed a generation when this worker joined (a restart, a newcomer)."""
        self._commits: list[CommitRecord] = []
        self._history: list[CommitRecord] = []
        """Every commit of this worker: a restarted coordinator rebuilds its ledger from them."""
        self._generation_members: dict[int, list[int]] = {}
        self._incarnation: str | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._client: CoordinatorClient | None = None
        self._heartbeat_thread: threading.Thread | None = None
        self._store: dist.Store | None = None
        self._store_address: tuple[str, int] | None = None
        self.generation_store: dist.Store | None = None
        """This generation's own namespace of the coordinator's store."""

    @classmethod
    def from_env(cls) -> Context:
        """Join the coordinator named in the environment (set by ``shoal train``/``shoal run``)."""
        url = os.environ.get(ENV_COORDINATOR)
        if not url:
            return cls(None, None, 0)
        if successor := os.environ.get(ENV_SUCCESSOR):
            url = f"{url},{successor}"  # the client tries them in turn
        worker_id = os.environ.get(ENV_WORKER_ID)
        interval = float(os.environ.get(ENV_HEARTBEAT_INTERVAL, "0.25"))
        return cls(url, os.environ.get(ENV_TOKEN, ""), int(worker_id) if worker_id else None, interval)

    @property
    def distributed(self) -> bool:
        return self.url is not None

    # -- joining and heartbeats ---------------------------------------------------------------

    def join(self) -> None:
        if not self.distributed:
            self._store = dist.HashStore()
            return
        self._client = CoordinatorClient(self.url, self.token)
        reply = self._client.post("/join", {"worker_id": self.worker_id, "host": socket.gethostname(),
                                            "pid": _launched_pid(), "launcher": self.launcher_id})
        self.worker_id = reply["worker_id"]
        self._incarnation = reply.get("incarnation")
        self.joined_running_job = bool(reply.get("running"))
        self.heartbeat_timeout = float(reply["heartbeat_timeout"])
        self.collective_timeout = self.heartbeat_timeout
        if self._client.fails_over:  # wait for the successor to take over, if it must
            takeover = SILENT_NODE_HEARTBEATS * self.heartbeat_timeout
            # (its launcher may first wait out one unanswered status request of that length)
            self._client.retry_seconds = max(RETRY_SECONDS, 3 * takeover)
        self._connect_store(reply["store_host"], reply["store_port"])
        self._heartbeat_thread = threading.Thread(target=self._heartbeat_loop, name="shoal-heartbeat",
                                                  daemon=True)
        self._heartbeat_thread.start()

    def _connect_store(self, host: str, port: int) -> None:
        """(Re)connect to the coordinator's store: a restarted coordinator has a new one."""
        if self._store_address != (host, port):
            self._store = dist.TCPStore(host, port, is_master=False,
                                        timeout=timedelta(seconds=self.heartbeat_timeout * 4))
            self._store_address = (host, port)

    def _heartbeat_loop(self) -> None:
        client = CoordinatorClient.for_heartbeats(self.url, self.token, self.heartbeat_timeout)
        try:
            while not self._stopping.wait(self.heartbeat_interval):
                commits = self._drain_commits()
                try:
                    reply = client.post("/heartbeat", self._heartbeat_payload(commits))
                except Exception:
                    with self._lock:  # not delivered: send them with the next beat
                        self._commits[:0] = commits
                    continue
                with self._lock:  # (not a reply from before the generation entered meanwhile)
                    if reply.get("step_timeout") and reply["generation"] >= self.generation:
                        self.step_timeout = float(reply["step_timeout"])
                self.latest_generation = max(self.latest_generation, reply["generation"])
                self.evicted = self.evicted or reply["evicted"]
                if reply.get("status") in ("completed", "failed"):
                    self.job_ended = reply["status"]
                self._note_incarnation(reply.get("incarnation"))
        finally:
            client.close()

    def _note_incarnation(self, incarnation: str | None) -> None:
        """A new coordinator (it restarted) lost the ledger: send it our whole history."""
        if incarnation is None or incarnation == self._incarnation:
            return
        if self._incarnation is not None:
            with self._lock:
                self._commits = list(self._history)
        self._incarnation = incarnation

    def _heartbeat_payload(self, commits: list[CommitRecord]) -> dict:
        return {
            "worker_id": self.worker_id,
            "host": socket.gethostname(),
            "pid": _launched_pid(),
            "launcher": self.launcher_id,
            # what a restarted coordinator needs to adopt the running generation
            "generation": self.generation,
            "collective_timeout": self.collective_timeout,
            "step_timeout": self.step_timeout,
            "times_steps": self.times_steps,
            "failed_generation": self.failed_generation,
            "failure_detail": self.failure_detail if self.failed_generation is not None else "",
            "failure_phase": self.failure_phase if self.failed_generation is not None else "",
            "members": self.members,
            "committed_step": self.committed_step,
            "bytes_sent": self.bytes_sent,
            "start_rounds": self.start_rounds,
            "commits": [c.to_json() for c in commits],
            # the members of each generation named, in case the coordinator never formed it
            "generations": {str(g): self._generation_members[g] for g in {c.generation for c in commits}
                            if g in self._generation_members},
        }

    def _drain_commits(self) -> list[CommitRecord]:
        with self._lock:
            commits, self._commits = self._commits, []
        return commits

    # -- generations ----------------------------------------------------------------------------

    def enter_next_generation(self) -> None:
        """Block until the coordinator has a generation newer than ours, then form its group."""
        if not self.distributed:
            if self.generation == 0:
                self.generation, self.members = 1, [0]
                self._init_process_group()
            return
        while True:
            if self.evicted:
                raise JobStopped(f"worker {self.worker_id} was evicted by the coordinator")
            reply = self._client.get("/generation", after=self.generation, timeout=10, worker=self.worker_id)
            if reply["status"] in ("completed", "failed"):
                raise JobStopped(f"the job {reply['status']}: {reply['reason']}".rstrip(": "),
                                 completed=reply["status"] == "completed")
            generation = reply["generation"]
            if generation is None:
                continue
            if self.worker_id not in generation["members"]:
                raise JobStopped(f"worker {self.worker_id} is not a member of generation "
                                 f"{generation['number']}")
            self._connect_store(reply["store_host"], reply["store_port"])
            self.fired_faults.update(reply.get("fired_faults", ()))
            with self._lock:
                self.generation = generation["number"]
                self.step_timeout = generation.get("step_timeout") or 0.0
            self.failed_generation = None
            self.latest_generation = max(self.latest_generation, self.generation)
            self.members = generation["members"]
            self._generation_members[self.generation] = self.members
            self.rank = self.members.index(self.worker_id)
            self.world_size = len(self.members)
            self.collective_timeout = generation.get("collective_timeout") or self.heartbeat_timeout
            try:
                self._init_process_group()
            except GenerationMoved:
                continue  # a member never came before the next generation formed: take that
            return

    def _init_process_group(self) -> None:
        store = self.generation_store = dist.PrefixStore(f"generation/{self.generation}/", self._store)
        if self.distributed:
            # Connect only once every member is here. A member may skip this generation (it
            # asked after the next one formed) or still be leaving the old one; gloo would wait
            # for it until its timeout, this wait leaves as soon as the coordinator moves on.
            self.await_members("joined")
        # Connecting a full mesh gets longer than an operation: on a loaded machine the members
        # that passed the wait above can still reach the rendezvous seconds apart.
        timeout = timedelta(seconds=self.collective_timeout)
        try:
            dist.init_process_group(default_backend(), store=store, rank=self.rank,
                                    world_size=self.world_size, timeout=3 * timeout)
        except BaseException:
            _forget_failed_group()
            raise
        dist.distributed_c10d._set_pg_timeout(timeout)

    def reachable_host(self) -> str:
        """This machine's address on the route to the coordinator: where peers reach us."""
        if self._store_address is None:
            return "127.0.0.1"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((self._store_address[0], 9))  # UDP: picks the route, sends nothing
            return probe.getsockname()[0]

    def use_timeout(self, seconds: float, *, skip: tuple = ()) -> None:
        """From their next operation on, every gloo group of this generation but ``skip`` (its
        own, and the sub-groups a strategy made) times out after ``seconds``. (NCCL's are
        left alone: a timed-out NCCL collective ends the process, see docs/ARCHITECTURE.md.)"""
        timeout = timedelta(seconds=seconds)
        for group in list(dist.distributed_c10d._world.pg_map):
            if group in skip:
                continue
            try:
                backend = group._get_backend(torch.device("cpu"))
            except RuntimeError:  # a group without a CPU backend
                continue
            if isinstance(backend, dist.ProcessGroupGloo):
                backend._set_default_timeout(timeout)

    def leave_generation(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    def check_generation(self) -> None:
        """Raise :class:`GenerationMoved` when the coordinator has moved past our generation."""
        if self.evicted:
            raise JobStopped(f"worker {self.worker_id} was evicted by the coordinator")
        if self.job_ended is not None:
            raise JobStopped(f"the job {self.job_ended}", completed=self.job_ended == "completed")
        if self.latest_generation > self.generation:
            raise GenerationMoved(f"generation {self.latest_generation} formed")

    def await_members(self, tag: str, poll_seconds: float = 0.01) -> None:
        """Wait until every member has reached ``tag``, however long their work takes, but
        leave (``GenerationMoved``/``JobStopped``) as soon as the coordinator gives up on one.

        A collective that waits for a slow peer's long local work would hit its timeout (the
        generation's collective timeout) although the peer is alive; this wait is bounded by
        liveness instead.
        """
        store = self.generation_store
        store.set(f"shoal/ready/{tag}/{self.rank}", b"1")  # (a set gets no answer to wait for)
        keys = [f"shoal/ready/{tag}/{rank}" for rank in range(self.world_size)]
        while not self.ask_store(store.check, keys):
            self.check_generation()
            time.sleep(poll_seconds)

    def ask_store(self, operation, *args):
        """``operation(*args)`` on the coordinator's store, waited for as long as a launcher
        waits for node 0's (``SILENT_NODE_HEARTBEATS``). Its machine cut off or frozen answers
        nothing, and torch's client would wait as long as the connection lasts
        (``shoal._deadline``): the generation fails instead (a RuntimeError), and the next is
        asked for from the coordinator, or from its successor if it was lost."""
        try:
            return answered_within(SILENT_NODE_HEARTBEATS * self.heartbeat_timeout, operation, *args)
        except TimeoutError as error:
            self._store_address = None  # the client is stuck in that call: the next generation makes another
            raise RuntimeError(f"the coordinator's store did not answer: {error}") from None

    def report_failure(self, detail: str, phase: str) -> None:
        """This member left its generation on ``detail`` (an error), raised in ``phase``
        (``timeouts.STEP`` or ``START``: which timeout a collective that timed out was under)."""
        self.failure_detail, self.failure_phase = detail[:500], phase
        self.failed_generation = self.generation
        if self.distributed:
            self._client.post("/report", {"worker_id": self.worker_id, "generation": self.generation,
                                          "kind": "failure", "detail": self.failure_detail,
                                          "phase": phase})

    def reject(self, error: ConfigError) -> None:
        """Refuse the job's configuration: the coordinator fails the job, and the launcher
        prints ``error`` once (every worker would raise it) and exits 2."""
        if not self.distributed:
            return
        try:
            self._client.post("/report", {"worker_id": self.worker_id, "kind": "rejected",
                                          "detail": str(error)[:500]})
        except CoordinatorUnreachable:
            return  # not reported: the worker's own traceback is what says why
        error.reported = True

    def report_kill(self, spec: str) -> None:
        if self.distributed:
            self._client.post("/report", {"worker_id": self.worker_id, "kind": "kill", "detail": spec})

    # -- commits and the end --------------------------------------------------------------------

    def record_commit(self, step: int, loss_part: float, *, generation: int | None = None,
                      committed_at: float | None = None, whole: bool = False) -> None:
        """Report a committed step: this member's share of its loss (``whole``: all of it),
        by default committed now in the current generation."""
        self.committed_step = step
        record = CommitRecord(step, self.generation if generation is None else generation,
                              time.time() if committed_at is None else committed_at, loss_part, whole)
        with self._lock:
            self._commits.append(record)
            self._history.append(record)

    def finish(self, results: dict | None = None) -> None:
        """Report the last commits (and, from the leader, the results), then wait until the
        coordinator says the job ended."""
        self._stopping.set()
        if self._heartbeat_thread is not None:
            self._heartbeat_thread.join()
        if not self.distributed:
            self.leave_generation()
            return
        # The whole history: the coordinator may have restarted since our last heartbeat.
        self._drain_commits()
        payload = self._heartbeat_payload(list(self._history))
        payload["results"] = results
        reply = self._client.post("/finish", payload)
        self.leave_generation()
        self._stay_until_the_job_ends(payload, reply)
        self._client.close()

    def _stay_until_the_job_ends(self, payload: dict, reply: dict) -> None:
        """Stay until the coordinator says the job ended: one that restarts before then never
        heard our end, and gets it again. (A member that left at once was never heard from
        again: the new coordinator declared it dead and lost its share of every step's loss.)
        A long poll, answered when the job ends or at once by a coordinator of another
        incarnation than the one that heard our finish (it polled at 20 Hz before: each
        finished worker, while the leader evaluated). Gives up once the coordinator has been
        unreachable as long as a request waits for it."""
        told = reply.get("incarnation")
        waiting = CoordinatorClient(self.url, self.token, retry_seconds=0.0)
        unreachable_since = None
        try:
            while reply.get("status") not in ("completed", "failed"):
                try:
                    reply = waiting.get("/generation", end_only=1, incarnation=told or "",
                                        timeout=_ENDING_WAIT_SECONDS)
                except Exception:  # noqa: BLE001  (unreachable, or an error answer: our part is done)
                    unreachable_since = unreachable_since or time.monotonic()
                    if time.monotonic() - unreachable_since > self._client.retry_seconds:  # (a takeover's too)
                        return  # the launcher judges the outcome
                    reply = {}
                    time.sleep(_ENDING_RETRY_SECONDS)
                    continue
                unreachable_since = None
                told = told or reply.get("incarnation")  # (a coordinator that did not say)
                if reply.get("incarnation") != told:  # restarted since: it never heard our end
                    reply = self._client.post("/finish", payload)
                    told = reply.get("incarnation")
        finally:
            waiting.close()

    def close(self) -> None:
        """Stop heartbeating without reporting anything (the job is over or failed)."""
        self._stopping.set()
        if self._heartbeat_thread is not None:
            self._heartbeat_thread.join()
        if self._client is not None:
            self._client.close()
        self.leave_generation()


def _launched_pid() -> int:
    """The pid this worker's launcher started: ours, or a wrapper program's that ran us."""
    return int(os.environ.get(ENV_WORKER_PID) or os.getpid())


def _forget_failed_group() -> None:
    """A group's rendezvous keys carry a per-process count of the groups created since the
    last default group was destroyed (torch resets it then, so that processes recreating
    their groups after a failure agree). A default group whose creation failed is never
    destroyed, so its count would stay: the next generation's keys would then differ from a
    fresh member's and nobody would ever connect. Reset it as destroying would have."""
    if not dist.is_initialized():
        dist.distributed_c10d._world.group_count = 0

"""Membership as a plain state machine: workers, heartbeats, generations, commits.

The HTTP server (server.py) and the launcher drive it; it never touches tensors and never
blocks, so every rule here is testable without a network. All methods are thread-safe.

A *generation* is a fixed member list; a member's rank is its index in that list. A new
generation is formed when a member dies (its process exited, or it missed heartbeats for
``heartbeat_timeout``), when members report a failed collective and every member has since
proven it is alive, or when new workers wait to join. Survivors find out through the
long-poll on ``/generation`` or the reply to their next heartbeat.

Each generation carries its collective timeout, and the job a step timeout that the members
use for a step's own collectives (timeouts.py: when they grow, and when the step timeout
shrinks again).
"""

from __future__ import annotations

import copy
import math
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from shoal import _protocol
from shoal.coordinator.record import CommittedStep, JobRecord
from shoal.coordinator.timeouts import MAX_TIMEOUT_GROWTH, START, STEP, Timeouts

_SOURCE_LOCATION = re.compile(r"\[[^\]\s]*\.(?:cc|cpp|h):\d+\] ?")
"""Where in torch's or gloo's C++ an error was raised, as "[/__w/pytorch/.../unbound_buffer.cc:129] ":
long enough to push what the error says past the cause's length."""

__all__ = ["MAX_TIMEOUT_GROWTH", "Generation", "Membership", "describe_change", "describe_timeout_change",
           "for_slow_collective"]

_STALL_SECONDS = 0.5

_OURS = object()
"""``admit_launcher``'s default protocol: this process's (a caller in it, not a request)."""

_TIMED_OUT = re.compile(r"Timed out waiting \d+ms for (?:send|recv)|"
                        r"the parameter server did not answer: timed out")
"""A failure report that says an operation of the generation's group ran out of time (gloo's
words), or async's request to its server did, rather than that a peer's connection closed
or anything else timed out (the store, a checkpoint's writing): only those are what the
collective and step timeouts bound."""


@dataclass(slots=True)
class Generation:
    number: int
    members: list[int]
    formed_at: float
    collective_timeout: float = 0.0
    """Seconds a member's collective may take in this generation; 0: not known (a generation
    learned from a worker's history, or from an older state file)."""
    step_timeout: float = 0.0
    """Seconds a step's collectives could take when it formed (the job's step timeout, which
    may shrink meanwhile); 0: not known, or from before step timeouts."""

    def to_json(self) -> dict:
        return {"number": self.number, "members": self.members, "formed_at": self.formed_at,
                "collective_timeout": self.collective_timeout, "step_timeout": self.step_timeout}


@dataclass(slots=True)
class _Worker:
    worker_id: int
    host: str
    pid: int
    last_seen: float
    forgiven: float = 0.0
    """Seconds of silence that fell while the coordinator itself could not listen."""
    alive: bool = True
    finished: bool = False
    committed_step: int = -1
    bytes_sent: int = 0
    death_cause: str | None = None
    died_at: float | None = None
    declared_silent_at: float | None = None
    """When the coordinator declared it dead for silence (None for any other death)."""
    launcher: str = ""
    """The id of the launcher that started it (``SHOAL_LAUNCHER_ID``), if it said."""
    times_steps: bool = False
    """It runs its steps under the step timeout, as its heartbeats say (not async's workers,
    nor one from before step timeouts)."""
    start_rounds: float = 0.0
    """How many times the bytes of its last round a generation's start may make one member
    send, as its heartbeats say (0: it says nothing, having sent nothing yet)."""
    presumed: bool = False
    """A member of a generation taken over that has not spoken to this coordinator yet: only
    presumed alive (it may be on the other side of a partition)."""

    @property
    def silenced(self) -> bool:
        """Declared dead for silence: hung, or cut off (its launcher kills it if it still runs)."""
        return self.declared_silent_at is not None


_REJOIN_PATIENCE_SECONDS = 120.0
"""How long a job below ``--min-workers`` waits for a restarted worker to join: a script's
restart imports torch and its own modules first, on a machine that may be loaded."""

_KEPT_WORKER_FIELDS = ("worker_id", "host", "pid", "alive", "finished", "committed_step", "bytes_sent",
                       "death_cause", "died_at", "launcher")
"""What ``export_state`` keeps of a worker: not its last heartbeat (a restart hears anew),
and whether it was declared dead for silence (``silenced``) in place of when."""


def _restored_worker(kept: dict, now: float) -> _Worker:
    """A worker as ``export_state`` kept it. One declared dead for silence stays so (its
    launcher kills it if it still runs, ``fence_silenced``), as of now: the old clock's time
    means nothing here. (An older file says nothing of it.)"""
    kept = dict(kept)
    silenced = kept.pop("silenced", False)
    return _Worker(**kept, last_seen=now, declared_silent_at=now if silenced else None)


@dataclass(slots=True)
class _StepRecord:
    generation: int
    committed_at: float
    loss_parts: dict[int, float | None] = field(default_factory=dict)
    """Each member's share of the step's loss, by worker id (None: it was not finite)."""
    whole_loss: float | None = None
    """The step's whole loss, when one report carries it (async)."""

    def loss(self, generation: Generation) -> float | None:
        """The global-batch loss, once every member of ``generation`` reported its share."""
        if self.whole_loss is not None:
            return self.whole_loss
        if len(self.loss_parts) == len(generation.members):
            parts = self.loss_parts.values()
            return math.nan if None in parts else sum(parts)
        return None


_TIMEOUT_CHANGED = re.compile(r"; (?:the )?(?:collective|step) timeout (?:now|stays at its limit)")
"""In the cause of a re-form for a collective that outlasted its timeout with every member
alive: "...; step timeout now 10 s" (or "...; the collective timeout stays at its limit, ...")."""


def for_slow_collective(change: dict) -> bool:
    """A membership change that no fault made: a collective outlasted its timeout with every
    member alive (a slow link, a straggler), and the next generation waits longer."""
    return bool(_TIMEOUT_CHANGED.search(change["cause"]))


def _positive_number(value: object) -> float:
    """A worker's figure, 0.0 unless it is a positive finite number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    try:
        number = float(value)
    except OverflowError:  # an integer beyond floats
        return 0.0
    return number if math.isfinite(number) and number > 0 else 0.0


def describe_timeout_change(change: dict) -> str:
    """One line for a shrink of a timeout (``Membership.timeout_changes``)."""
    return f"at step {change['step']}: {change['cause']}"


def describe_change(change: dict) -> str:
    """One line for a membership change (``Membership.membership_changes``), as the launcher
    and the standalone coordinator print it."""
    return (f"generation {change['generation_before']} -> {change['generation_after']}: "
            f"{change['cause']}; members {change['members_before']} -> {change['members_after']}")


def _committer(record: _StepRecord, by_number: dict[int, Generation]) -> Generation:
    """The generation that committed a step. One this coordinator never heard of (it
    restarted, and an async holder reported a step an earlier server finished) has no
    known members."""
    return by_number.get(record.generation) or Generation(record.generation, [], 0.0)


class Membership:
    def __init__(
        self,
        *,
        expected_workers: int,
        min_workers: int,
        max_workers: int | None = None,
        heartbeat_timeout: float = 5.0,
        restarts: bool = False,
        quorum: Callable[[list[int]], str | None] | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.expected_workers = expected_workers
        self.min_workers = min_workers
        self.max_workers = max_workers
        self.heartbeat_timeout = heartbeat_timeout
        self.timeouts = Timeouts(heartbeat_timeout)
        self.restarts = restarts
        """The launcher restarts dead workers: below ``min_workers``, wait for it to say so."""
        self.quorum = quorum
        """Given the members a generation would have (those heard from: ``presumed`` ones do
        not count), why it may not form (``shoal run --nnodes``'s ``--quorum majority``: they
        are on too few nodes, and this side of a partition may be the one cut off); None: it
        may."""
        self.presumed_grace = 0.0
        """Seconds more than the heartbeat timeout that a ``presumed`` member has to speak
        before it is declared dead (node 1's takeover after a silent node 0: a worker's try
        at node 0 may take that long before it turns here, and it may never come: generations
        form without it meanwhile, rather than wait that long for it to connect)."""
        self._held: tuple[str, float] | None = None
        """Why the next generation is held for a quorum, and since when."""
        self._below_minimum_since: float | None = None
        self._clock = clock
        self._lock = threading.RLock()
        self._workers: dict[int, _Worker] = {}
        self._generations: list[Generation] = []
        self._past_generations: dict[int, Generation] = {}
        """Generations formed before a coordinator restart, learned from workers' histories."""
        self._takeover: dict | None = None
        """A restarted coordinator's adopted generation: its number, members and, for each
        member heard since, the seconds after the first one spoke (``snapshot``'s "takeover")."""
        self._takeover_at = 0.0
        self.incarnation = uuid.uuid4().hex
        """Tells workers that a restarted coordinator needs their whole commit history."""
        self._failure_reported_at: float | None = None
        self._failure_detail = ""
        self._timed_out_in: set[str] = set()
        """Where members of the current generation saw a collective run out of time
        (``timeouts.STEP``, ``START``)."""
        self._steps: dict[int, _StepRecord] = {}
        self._redone: set[int] = set()
        """Steps committed again by a later generation (zero goes back to its checkpoint)."""
        self._changes: list[dict] = []
        self._kill_causes: dict[int, str] = {}
        self.fired_faults: set[str] = set()
        self._rejoin_expected: dict[int, float] = {}
        """Workers a launcher is restarting, and since when (see ``_REJOIN_PATIENCE_SECONDS``)."""
        """Planned faults that went off: a restarted worker must not fire them again."""
        self._listeners: list[Callable[[], None]] = []
        self._keep_state: Callable[[dict], None] | None = None
        self._keep_commits: Callable[[int, list], None] | None = None
        self.status = "waiting"  # waiting -> running -> completed | failed
        self.reason = ""
        self.rejected = False
        """The job failed because a worker refused its configuration (``reason`` says why)."""
        self.results: dict | None = None
        self.job_spec: dict | None = None
        """The first launcher's ``TrainConfig.job_spec``: what later launchers must agree on."""
        self._admitted: set[str] = set()
        """Launcher ids admitted (``admit_launcher``): a process of another one that is not
        known here joined an earlier coordinator (this one restarted without a state file)."""
        self.started_at = clock()
        self._last_evaluated = clock()

    # -- events -------------------------------------------------------------------------------

    def add_listener(self, callback: Callable[[], None]) -> None:
        """``callback`` runs (under the lock, must not block) whenever the generation or status
        changes, or something else a restarted coordinator could not learn back from the
        workers: the job's spec, a fired fault, the leader's results, a worker's join."""
        self._listeners.append(callback)

    def has_finished(self, worker_id: int) -> bool:
        """Has this worker finished its part of the job (or joined again after it had)?"""
        with self._lock:
            worker = self._workers.get(worker_id)
            return worker is not None and worker.finished

    def expect_rejoin(self, worker_id: int) -> None:
        """The launcher is restarting this worker: count it toward ``min_workers`` meanwhile
        (not one that had finished its part: it holds nothing up)."""
        with self._lock:
            worker = self._workers.get(worker_id)
            if worker is None or not worker.finished:
                self._rejoin_expected[worker_id] = self._clock()
                self._keep()

    def join(self, worker_id: int | None, host: str, pid: int, launcher: str = "") -> int:
        with self._lock:
            self._rejoin_expected.pop(worker_id, None)
            if worker_id is None:
                worker_id = max(self._workers, default=-1) + 1
            existing = self._workers.get(worker_id)
            if existing is not None and existing.alive and not existing.presumed:
                if (existing.host, existing.pid, existing.launcher) == (host, pid, launcher):
                    return worker_id  # the same process again: our answer came too late for it
                raise ValueError(f"worker {worker_id} is already a live member")
            # A worker that finished its part and died after (its launcher restarted it):
            # nothing is left for it to do, and a generation with it would never meet (the
            # others have finished too), so it waits for the job's end as a finished member.
            done = existing is not None and existing.finished
            self._workers[worker_id] = _Worker(worker_id, host, pid, last_seen=self._clock(), launcher=launcher,
                                               finished=done)
            if done:  # what it did and how it died stay on record
                for kept in ("committed_step", "bytes_sent", "death_cause", "died_at"):
                    setattr(self._workers[worker_id], kept, getattr(existing, kept))
                self._announce()
                return worker_id
            self._announce()
            current = self.current
            if existing is not None and current is not None and worker_id in current.members \
                    and self.status == "running":
                # Back before a generation without it was formed (the job was paused for it):
                # its old process's place in the current group is gone, so re-form.
                self._form(cause=f"worker {worker_id}: {existing.death_cause or 'started again'}; rejoined",
                           failed_at=existing.died_at or self._clock())
            self._evaluate()
            return worker_id

    def heartbeat(self, worker_id: int, payload: dict) -> dict:
        with self._lock:
            if worker_id not in self._workers:
                self._adopt(worker_id, payload)
            worker = self._workers.get(worker_id)
            if worker is None or not worker.alive:
                # An evicted worker (it hung, or its link was cut) must not rejoin silently.
                return {"evicted": True, "generation": self.current_number, "status": self.status,
                        "incarnation": self.incarnation}
            worker.last_seen, worker.forgiven, worker.presumed = self._clock(), 0.0, False
            if worker.pid == 0:  # a placeholder of a generation taken over: now we know its process
                worker.host, worker.pid = str(payload.get("host", "?")), int(payload.get("pid", 0))
                worker.launcher = str(payload.get("launcher", ""))
            self._note_heard(worker_id)
            worker.times_steps = bool(payload.get("times_steps", worker.times_steps))
            worker.start_rounds = _positive_number(payload.get("start_rounds"))
            if not worker.finished:  # its figures are final (a finished worker's restart reports none)
                worker.committed_step = payload.get("committed_step", worker.committed_step)
                worker.bytes_sent = payload.get("bytes_sent", worker.bytes_sent)
            self._record_history(worker_id, payload)
            self._note_failure(worker, payload.get("failed_generation"),
                               str(payload.get("failure_detail") or ""), payload.get("failure_phase"))
            self._evaluate()
            return {"evicted": False, "generation": self.current_number, "status": self.status,
                    "incarnation": self.incarnation, "step_timeout": self.timeouts.step}

    def _adopt(self, worker_id: int, payload: dict) -> None:
        """A heartbeat from a worker we never saw: we are a restarted coordinator.

        The workers kept training in their generation while we were down; take that
        generation over from what they report (number and members) instead of evicting them.
        Members that never speak again are declared dead by the heartbeat timeout as usual.
        A worker that joined but has no generation yet joins here (none has formed here
        either): the first forms once the expected workers are in, as it would have there.
        """
        generation = int(payload.get("generation", 0))
        members = [int(m) for m in payload.get("members", [])]
        if self.status in ("completed", "failed"):
            return
        if generation < 1 and self.current is None:
            self._workers[worker_id] = _Worker(worker_id, str(payload.get("host", "?")), int(payload.get("pid", 0)),
                                               last_seen=self._clock(), launcher=str(payload.get("launcher", "")))
            self._announce()
            return
        if generation < 1 or worker_id not in members:
            return
        # The timeouts, as the members run them: we may have restarted without a state file,
        # knowing only the heartbeat timeout.
        self.timeouts.learn(float(payload.get("collective_timeout") or 0.0),
                            float(payload.get("step_timeout") or 0.0))
        if generation > self.current_number:
            now = self._clock()
            self._generations.append(Generation(generation, members, now, self.timeouts.collective,
                                                self.timeouts.step))
            for member in members:
                self._workers.setdefault(member, _Worker(member, "?", 0, last_seen=now, presumed=True))
            self._take_over(self.current, now)
            self._set_status("running", "")
        if worker_id in self.current.members:
            now = self._clock()
            self._workers[worker_id] = _Worker(worker_id, str(payload.get("host", "?")),
                                               int(payload.get("pid", 0)), last_seen=now,
                                               launcher=str(payload.get("launcher", "")))

    def _take_over(self, generation: Generation, now: float) -> None:
        """We run ``generation`` without having formed it (from the workers' heartbeats, or a
        state file): note from now when each of its members is first heard (``_note_heard``)."""
        self._takeover = {"generation": generation.number, "members": generation.members, "heard": {}}
        self._takeover_at = now

    def _note_heard(self, worker_id: int) -> None:
        """How long after the first member each member of a taken-over generation spoke: a
        member heard later than the heartbeat timeout is declared dead for it."""
        takeover = self._takeover
        if takeover is not None and worker_id in takeover["members"] and str(worker_id) not in takeover["heard"]:
            takeover["heard"][str(worker_id)] = round(self._clock() - self._takeover_at, 3)

    def report_failure(self, worker_id: int, generation: int, detail: str, phase: str | None = None) -> None:
        """A member saw a collective fail in ``generation`` (in a step, or elsewhere: ``phase``);
        the report also proves it is alive."""
        with self._lock:
            worker = self._workers.get(worker_id)
            if worker is None or not worker.alive:
                return
            worker.last_seen, worker.forgiven = self._clock(), 0.0
            self._note_failure(worker, generation, detail, phase)
            self._evaluate()

    def _note_failure(self, worker: _Worker, generation: int | None, detail: str = "",
                      phase: str | None = None) -> None:
        """A member left the current generation as failed (its report, or its heartbeats
        while it waits for the next one: a restarted coordinator never got the report)."""
        current = self.current
        if (generation is None or current is None or generation != current.number
                or worker.worker_id not in current.members or worker.finished):
            return
        if _TIMED_OUT.search(detail):
            self._timed_out_in.add(STEP if phase == STEP else START)
        if self._failure_reported_at is None:
            self._failure_reported_at = worker.last_seen
            # What the first reporter saw: with every member alive, the only clue to why
            # (a timeout of a peer that was slow, a refused connection, ...).
            lines = detail.strip().splitlines()
            first_line = _SOURCE_LOCATION.sub("", lines[0])[:200] if lines else ""
            self._failure_detail = f"; worker {worker.worker_id}: {first_line}" if first_line else ""

    def report_kill(self, worker_id: int, spec: str) -> None:
        """A worker is about to SIGKILL itself for ``--kill``: remember why it will die."""
        with self._lock:
            self._kill_causes[worker_id] = spec
            self.fired_faults.add(spec)
            self._announce()

    def report_exit(self, worker_id: int, cause: str, at: float | None = None, *, joined: bool = False) -> None:
        """The launcher saw the worker's process end (one it knows had ``joined`` the job)."""
        with self._lock:
            worker = self._workers.get(worker_id)
            if worker is None and self.current is None:
                if not joined:  # else: we restarted and have not heard the job yet; heartbeats will tell
                    self._lose_expected_worker(f"worker {worker_id} exited before joining: {cause}")
                return
            if worker is None or not worker.alive:
                return
            if worker.finished:
                worker.alive = False
                return
            self._mark_dead(worker, self._kill_causes.get(worker_id, cause), at or self._clock())
            self._evaluate()

    def _lose_expected_worker(self, cause: str) -> None:
        """A worker died before joining: stop waiting for it to form the first generation."""
        self.expected_workers -= 1
        if self.expected_workers < self.min_workers:
            self._set_status("failed", cause)
        self._evaluate()

    def report_exit_of_process(self, host: str, pid: int, cause: str, *, restarting: bool = False,
                               launcher: str = "") -> int | None:
        """A remote launcher saw one of its processes end; it knows the pid, not the id, and
        says which launcher it is (two containers may share a host name and pids).
        ``restarting``: it starts the process again, under the worker's id (see
        :meth:`expect_rejoin`). Returns the worker's id (a live one's, else the newest
        dead one's: pids are reused), None if the process never joined; such a process, gone
        before the first generation and not restarted, is no longer waited for."""
        with self._lock:
            matching = [w for w in self._workers.values() if w.pid == pid and (
                w.launcher == launcher if launcher and w.launcher else w.host == host)]
            alive = [w.worker_id for w in matching if w.alive]
            # pids are reused: a live match, else one that had not finished (a finished one is
            # not restarted, so its record stays), else any
            ids = alive or [w.worker_id for w in matching if not w.finished] or [w.worker_id for w in matching]
            if not ids:
                # Only a launcher admitted here: another's workers joined an earlier coordinator
                # (we restarted without a state file) and their heartbeats will tell us the job.
                ours = not launcher or launcher in self._admitted or "" in self._admitted  # "": gave no id
                if self.current is None and not restarting and self.status == "waiting" and ours:
                    self._lose_expected_worker(f"a worker on {host} (pid {pid}) exited before joining: {cause}")
                return None
            if restarting and not self._workers[max(ids)].finished:  # a finished one holds nothing up
                self._rejoin_expected[max(ids)] = self._clock()
            self.report_exit(max(ids), cause)  # one already declared dead is left as it is
            if restarting:
                self._keep()  # a job paused for the restart forms nothing: nothing else keeps it
            return max(ids)

    def report_exit_by_id(self, worker_id: int, cause: str, at: float | None = None, *,
                          restarting: bool = False, joined: bool = False) -> None:
        """A launcher that knows its workers' ids (``shoal run``) saw one end, and says whether
        it starts it again: then a job it leaves below ``min_workers`` waits for it, and one
        that had not joined yet is still expected (not counted out as lost); else a restart
        of it that died before rejoining, with none left, is no longer waited for."""
        if restarting:
            self.expect_rejoin(worker_id)
        else:
            self.withdraw_rejoin(worker_id)
        self.report_exit(worker_id, cause, at, joined=joined or restarting)

    def withdraw_rejoin(self, worker_id: int) -> None:
        """The launcher will not start this worker again after all (its restart died before
        joining, and none is left): a job paused for it goes on, or fails, without it."""
        with self._lock:
            if self._rejoin_expected.pop(worker_id, None) is not None:
                self._keep()
                self._evaluate()

    def finish(self, worker_id: int, payload: dict) -> None:
        """A worker completed the last step; the leader's ``results`` end the job."""
        with self._lock:
            if worker_id not in self._workers:
                self._adopt(worker_id, payload)  # it finished while we were restarting
            worker = self._workers.get(worker_id)
            if worker is None:
                return
            worker.finished = True
            self._note_heard(worker_id)
            worker.bytes_sent = payload.get("bytes_sent", worker.bytes_sent)
            self._record_history(worker_id, payload)
            if payload.get("results") is not None:
                self.results = payload["results"]
                self._announce()
            if self._every_member_done(self.current) or self._every_member_done(
                    self._generations_by_number().get(payload.get("generation"))):
                self._set_status("completed", "")

    def _every_member_done(self, generation: Generation | None) -> bool:
        """A member of ``generation`` finished and every other one finished or died since:
        a member finishes only after the generation's last collective, so its members
        committed the last step together, and one that died after has nothing left to do
        (nor has a later generation: a restarted worker that joined as they were finishing).
        A restarted coordinator takes this for members that finished with its predecessor
        and left: it never hears from them, and declares them dead."""
        if generation is None:
            return False
        members = [self._workers.get(m) for m in generation.members]
        return any(w is not None and w.finished for w in members) and all(
            w is None or w.finished or not w.alive for w in members)

    def admit_launcher(self, spec: dict, launcher: str = "", *, protocol: object = _OURS,
                       version: str | None = None) -> None:
        """A launcher (its id, if it gives one) about to start workers for this job. The first
        one's spec becomes the job's; one that differs is refused (ValueError naming the flag)
        before its workers start, so that it cannot disturb the running job. So is any
        launcher once the job ended (its workers would have nothing to do; a restored record's
        job may have long ended), and one of another shoal protocol than ours (by default
        ours; None: from before protocols were numbered)."""
        if protocol is not _OURS and (type(protocol) is not int or protocol != _protocol.PROTOCOL):
            raise ValueError(f"this launcher runs {_protocol.describe(protocol, version)}, the coordinator "
                             f"{_protocol.describe()}: run one shoal version on every machine")
        with self._lock:
            if self.status in ("completed", "failed"):
                raise ValueError(f"the job this coordinator runs has already {self.status}: a new job "
                                 "needs a new coordinator (and a new --state file, if it keeps one)")
            if self.job_spec is None:
                self.job_spec = dict(spec)
                self._admitted.add(launcher)
                self._announce()
                return
            for flag in [*self.job_spec, *(flag for flag in spec if flag not in self.job_spec)]:
                ours, theirs = self.job_spec.get(flag), spec.get(flag)
                if ours != theirs:
                    raise ValueError(f"{flag}: this job was started with {ours}, this launcher "
                                     f"gives {theirs}")
            if launcher not in self._admitted:
                self._admitted.add(launcher)
                self._keep()

    def reject(self, detail: str) -> None:
        """A worker refused the job's configuration: something only the model or optimizer
        in hand could show (1-bit Adam's options, say). Every worker would refuse it, so the
        job fails at once, and the launcher prints ``detail`` once instead of N tracebacks."""
        with self._lock:
            if self.status not in ("completed", "failed"):
                self.rejected = True
                self._set_status("failed", detail)

    def fail(self, reason: str) -> None:
        with self._lock:
            if self.status not in ("completed", "failed"):
                self._set_status("failed", reason)

    def tick(self) -> None:
        """Declare silent workers dead; call periodically."""
        with self._lock:
            self._evaluate()

    # -- queries ------------------------------------------------------------------------------

    @property
    def current(self) -> Generation | None:
        return self._generations[-1] if self._generations else None

    @property
    def current_number(self) -> int:
        return self._generations[-1].number if self._generations else 0

    def generation_after(self, number: int) -> Generation | None:
        with self._lock:
            current = self.current
            return current if current is not None and current.number > number else None

    def _generations_by_number(self) -> dict[int, Generation]:
        return {**self._past_generations, **{g.number: g for g in self._generations}}

    def committed_steps(self) -> list[tuple[int, Generation]]:
        """(step, generation that committed it), one per step, in step order."""
        with self._lock:
            by_number = self._generations_by_number()
            return [(s, _committer(r, by_number)) for s, r in sorted(self._steps.items())]

    def step_losses(self) -> dict[int, float]:
        """Global-batch loss of each step whose every share was reported."""
        with self._lock:
            by_number = self._generations_by_number()
            losses = {s: r.loss(_committer(r, by_number)) for s, r in sorted(self._steps.items())}
            return {s: loss for s, loss in losses.items() if loss is not None}

    def first_formed_at(self) -> float | None:
        with self._lock:
            return self._generations[0].formed_at if self._generations else None

    def latest(self) -> tuple[float | None, float | None]:
        """(the loss of the last step whose every share was reported, its commit time)."""
        with self._lock:
            by_number = self._generations_by_number()
            # Members report by heartbeat, so the newest steps lack some shares: look further
            # back (all shares of a step have come once every member reported past it).
            for step in sorted(self._steps, reverse=True):
                record = self._steps[step]
                loss = record.loss(_committer(record, by_number))
                if loss is not None:
                    return loss, record.committed_at
            return None, None

    def record(self) -> JobRecord:
        """A copy of what the job has committed so far (results.json, the sample log)."""
        with self._lock:
            by_number = self._generations_by_number()
            steps = []
            for step, record in sorted(self._steps.items()):
                generation = _committer(record, by_number)
                steps.append(CommittedStep(step, generation.number, list(generation.members),
                                           record.committed_at, record.loss(generation)))
            return JobRecord(
                status=self.status, reason=self.reason,
                first_formed_at=self.first_formed_at(),
                bytes_sent=sum(w.bytes_sent for w in self._workers.values()),
                bytes_by_worker={str(w.worker_id): w.bytes_sent for w in self._workers.values()},
                steps=steps, membership_changes=self.membership_changes(), results=self.results,
                timeout_changes=self.timeout_changes(),
                steps_redone=len(self._redone))

    def membership_changes(self) -> list[dict]:
        with self._lock:
            return [dict(change) for change in self._changes]

    def timeout_changes(self) -> list[dict]:
        """Each shrink of the step timeout (a lengthening comes with a membership change)."""
        with self._lock:
            return [dict(change) for change in self.timeouts.changes]

    def snapshot(self) -> dict:
        """The JSON of ``GET /status``."""
        with self._lock:
            now = self._clock()
            current = self.current
            return {
                "status": self.status,
                "reason": self.reason,
                "rejected": self.rejected,
                "generation": self.current_number,
                "members": current.members if current else [],
                "step": max(self._steps, default=-1) + 1,
                "workers": {
                    str(w.worker_id): {
                        "alive": w.alive,
                        "finished": w.finished,
                        "host": w.host,
                        "pid": w.pid,
                        "launcher": w.launcher,
                        "committed_step": w.committed_step,
                        "heartbeat_age": round(now - w.last_seen, 3),
                        "death_cause": w.death_cause,
                        "silenced": w.silenced,
                    }
                    for w in self._workers.values()
                },
                "membership_changes": len(self._changes),
                "takeover": copy.deepcopy(self._takeover),
                "held": None if self._held is None else {
                    "reason": self._held[0], "seconds": round(now - self._held[1], 3)},
            }

    # -- durable state ------------------------------------------------------------------------

    def keep_state_with(self, state: Callable[[dict], None], commits: Callable[[int, list], None]) -> None:
        """From now on, call ``state(export_state())`` on every change a listener hears of
        (before any request can hear of it), and ``commits(worker_id, commits)`` for every
        batch of commits a worker reports. Both run under the lock and must not raise."""
        with self._lock:
            self._keep_state, self._keep_commits = state, commits

    def export_state(self) -> dict:
        """As JSON, what a restarted coordinator could not learn back from the workers, but
        for the commits (``commits_by_worker``): the job's status and results, its generations
        and changes, the workers as last known, the faults that fired, the job's spec, the
        restarts announced (with when, in unix time: a job paused for one stays paused across
        a restart, and the 120 s it is waited for count the outage). ``restore_state`` takes
        it back."""
        with self._lock:
            now = self._clock()
            return {
                "status": self.status, "reason": self.reason, "rejected": self.rejected,
                "results": self.results, "job_spec": self.job_spec,
                "fired_faults": sorted(self.fired_faults),
                "kill_causes": {str(worker): spec for worker, spec in self._kill_causes.items()},
                "generations": [g.to_json() for g in self._generations],
                "past_generations": [g.to_json() for g in self._past_generations.values()],
                "changes": copy.deepcopy(self._changes),
                "redone": sorted(self._redone),
                "workers": [{**{name: getattr(w, name) for name in _KEPT_WORKER_FIELDS},
                             "silenced": w.silenced}
                            for w in self._workers.values()],
                "rejoin_expected": {str(w): round(time.time() - (now - since), 3)
                                    for w, since in self._rejoin_expected.items()},
                "admitted": sorted(self._admitted),
                **self.timeouts.export(),
            }

    def commits_by_worker(self) -> list[tuple[int, list]]:
        """The committed steps as the workers' reports that would rebuild them, every share
        of every step's loss (a dead member's too): what ``restore_state`` replays."""
        with self._lock:
            batches: dict[int, list] = {}
            for step, record in sorted(self._steps.items()):
                if record.whole_loss is not None:  # one report carried the whole loss (async)
                    whole = None if math.isnan(record.whole_loss) else record.whole_loss
                    batches.setdefault(-1, []).append([step, record.generation, record.committed_at, whole, True])
                for worker, part in record.loss_parts.items():
                    batches.setdefault(worker, []).append([step, record.generation, record.committed_at, part])
            return list(batches.items())

    def restore_state(self, state: dict, commits: Iterable[tuple[int, list]] = ()) -> None:
        """Take back what ``export_state`` gave, and replay ``commits`` (``commits_by_worker``,
        or the batches as they came): we are a coordinator restarted with its state file.

        The current generation of a running job is taken over as from the workers (``_adopt``):
        its members count as heard from now and are declared dead if they stay silent for
        the heartbeat timeout; a member that had finished stays finished. The workers resend
        their whole histories (the incarnation is new), which fills in the latest commits.
        """
        with self._lock:
            now = self._clock()
            self.status, self.reason, self.rejected = state["status"], state["reason"], state["rejected"]
            self.results, self.job_spec = state["results"], state["job_spec"]
            self.fired_faults = set(state["fired_faults"])
            self._kill_causes = {int(worker): spec for worker, spec in state["kill_causes"].items()}
            self._generations = [Generation(**g) for g in state["generations"]]
            self._past_generations = {g["number"]: Generation(**g) for g in state["past_generations"]}
            self._changes = state["changes"]
            self._redone = set(state["redone"])
            for worker_id, batch in commits:
                self._record_commits(worker_id, batch)
            self._workers = {w["worker_id"]: _restored_worker(w, now) for w in state["workers"]}
            self._rejoin_expected = {int(w): now - max(0.0, time.time() - announced)
                                     for w, announced in state.get("rejoin_expected", {}).items()}
            self._admitted = set(state.get("admitted", [""]))  # an older file: ids unknown, any counts
            self.timeouts.restore(state)  # after the replay: it adds no shrink that was not told
            current = self.current
            if self.status == "running" and current is not None:
                self._take_over(current, now)

    # -- rules --------------------------------------------------------------------------------

    def _record_history(self, worker_id: int, payload: dict) -> None:
        # A whole history (after a coordinator restart) names the generations it refers to.
        known = self._generations_by_number()
        for number, members in payload.get("generations", {}).items():
            if int(number) not in known:
                self._past_generations[int(number)] = Generation(int(number), [int(m) for m in members], 0.0)
        self._record_commits(worker_id, payload.get("commits", ()))

    def _record_commits(self, worker_id: int, commits) -> None:
        # [step, generation, unix time, this rank's share of the global-batch loss(, whole)]:
        # with ``whole`` the loss is the step's own (async's server finished it alone).
        if self._keep_commits is not None and commits:
            self._keep_commits(worker_id, list(commits))
        for step, generation, committed_at, loss_part, *whole in commits:
            record = self._steps.get(step)
            if record is not None and generation > record.generation:
                self._redone.add(step)
            if record is None or generation > record.generation:
                record = self._steps[step] = _StepRecord(generation, committed_at)
            if generation == record.generation:
                record.committed_at = min(record.committed_at, committed_at)
                if whole and whole[0]:
                    record.whole_loss = math.nan if loss_part is None else loss_part
                else:
                    record.loss_parts[worker_id] = loss_part
                self._note_recovery(generation, committed_at)
            if self._steps_timed() and self.timeouts.note_commit(worker_id, generation, step, committed_at,
                                                                 self.current_number, self._start_rounds()):
                self._keep()

    def _note_recovery(self, generation: int, committed_at: float) -> None:
        for change in self._changes:
            if change["generation_after"] == generation and change["recovery_seconds"] is None:
                change["recovery_seconds"] = round(committed_at - change["time"], 4)

    def _mark_dead(self, worker: _Worker, cause: str, at: float) -> None:
        worker.alive = False
        worker.death_cause = cause
        worker.died_at = at
        # Kept even when no generation is formed (a job paused below --min-workers): a
        # restarted coordinator that took the worker for alive would refuse its restart.
        self._keep()

    def _evaluate(self) -> None:
        if self.status in ("completed", "failed"):
            return
        now = self._clock()
        self._forgive_own_stall(now)
        for worker in self._workers.values():
            silence = now - worker.last_seen - worker.forgiven - (self.presumed_grace if worker.presumed else 0.0)
            if worker.alive and not worker.finished and silence > self.heartbeat_timeout:
                silent = f"no heartbeat for {self.heartbeat_timeout:g} s"
                planned = self._kill_causes.get(worker.worker_id)
                self._mark_dead(worker, f"{planned}; {silent}" if planned else silent, worker.last_seen)
                worker.declared_silent_at = now
        current = self.current
        if current is None:
            if sum(w.alive for w in self._workers.values()) >= self.expected_workers:
                self._form(cause="start", failed_at=now)
            return
        members = [self._workers[m] for m in current.members]
        dead = [m for m in members if not m.alive and not m.finished]
        if dead and self._every_member_done(current):  # they died after the last step
            self._set_status("completed", "")
            return
        waiting = [w for w in self._workers.values()
                   if w.alive and not w.finished and not w.presumed and w.worker_id not in current.members]
        if dead and self._awaiting_correlated_silence(members, dead, now):
            return
        if dead:
            cause = "; ".join(f"worker {m.worker_id}: {m.death_cause}" for m in dead)
            self._form(cause=cause, failed_at=min(m.died_at for m in dead))
        elif self._failure_reported_at is not None and all(
            m.finished or m.last_seen >= self._failure_reported_at for m in members
        ):
            self._form(cause=f"collective failed; all members alive{self._failure_detail}",
                       failed_at=self._failure_reported_at, lengthen=self._timed_out_in)
        elif waiting and not any(m.finished for m in members) and (
                self.max_workers is None or len(current.members) < self.max_workers):
            # Not once a member has finished: the last step is committed and the job is
            # ending. A generation formed now would hold the joiner and whoever had not yet
            # reported its end, and the joiner would wait for them to connect forever.
            self._form(cause="workers joined", failed_at=now)

    def _awaiting_correlated_silence(self, members: list[_Worker], dead: list[_Worker],
                                     now: float) -> bool:
        """Hold the re-form briefly while other members have gone quiet too.

        A host that drops off the network silences all its workers at once, but their last
        heartbeats differ by up to one interval, so they cross the timeout one by one.
        Re-forming at the first would build a generation that includes the others, which
        then fails to connect and costs another re-form. Members silent for more than half
        the timeout when a silent member is declared dead are waited for, at most half the
        timeout; crashes (reported exits) never wait.
        """
        grace = self.heartbeat_timeout / 2
        declared = [m.declared_silent_at for m in dead if m.declared_silent_at is not None]
        if not declared or now - max(declared) >= grace:
            return False
        return any(m.alive and not m.finished and now - m.last_seen - m.forgiven > grace
                   for m in members)

    def _forgive_own_stall(self, now: float) -> None:
        """Silence while *we* could not listen is not the workers' fault.

        Evaluations run at least every ``_STALL_SECONDS`` / 10 when the coordinator is
        healthy. After a longer gap (an overloaded machine, a paused process) the heartbeats
        sent meanwhile are still queued; without this, every worker would look dead at once.
        """
        gap = now - self._last_evaluated
        self._last_evaluated = now
        if gap > _STALL_SECONDS:
            for worker in self._workers.values():
                worker.forgiven += gap

    def _form(self, *, cause: str, failed_at: float, lengthen: set[str] = frozenset()) -> None:
        """The next generation, of the live workers (unless too few: then a pause, or the
        job fails); ``lengthen``: with longer timeouts for collectives in these phases."""
        previous = self.current
        in_coming = [w.worker_id for w in self._workers.values()  # (they may be long in coming)
                     if w.alive and not w.finished and w.presumed and self.presumed_grace]
        live = sorted(w.worker_id for w in self._workers.values()
                      if w.alive and not w.finished and w.worker_id not in in_coming)
        if self.max_workers is not None:
            keep = [m for m in (previous.members if previous else []) if m in live]
            live = sorted(keep + [w for w in live if w not in keep][: self.max_workers - len(keep)])
        self._failure_reported_at, self._timed_out_in = None, set()
        held, self._held = self._held, None  # (a hold lasts only while it is what stops the form)
        if len(live) < self.min_workers and len(live) + len(self._restarts_coming()) + len(in_coming) >= self.min_workers:
            return  # pause: survivors wait in their long-poll until the restarted (or awaited) workers join
        if len(live) < self.min_workers and self._may_still_announce_a_restart():
            return
        if len(live) < self.min_workers:
            self._set_status(
                "failed",
                f"only {len(live)} worker(s) remain, fewer than --min-workers {self.min_workers} ({cause})",
            )
            return
        self._below_minimum_since = None
        if self._held_for_quorum(live, held):
            return  # the members wait in their long-poll: for the quorum, or for the job's failure
        if held is not None:
            cause += f"; held {self._clock() - held[1]:.1f} s for a quorum ({held[0]})"
        # only a generation that forms lengthens: the change that says so is recorded with it
        cause += self.timeouts.lengthen(lengthen, steps_timed=self._steps_timed())
        generation = Generation(self.current_number + 1, live, self._clock(), self.timeouts.collective,
                                self.timeouts.step)
        self._generations.append(generation)
        if previous is not None:
            self._changes.append(
                {
                    "time": failed_at,
                    "cause": cause,
                    "generation_before": previous.number,
                    "generation_after": generation.number,
                    "members_before": previous.members,
                    "members_after": generation.members,
                    "detection_seconds": round(generation.formed_at - failed_at, 4),
                    "recovery_seconds": None,
                }
            )
        self._set_status("running", "")

    def _held_for_quorum(self, live: list[int], held: tuple[str, float] | None) -> bool:
        """Does the quorum rule hold the generation of ``live`` (``held``: the hold so far)?
        Only members heard from count. While workers are being restarted that would make the
        quorum, the hold starts anew: they are expected back (one of a node on the other side
        of a cut is no reason)."""
        if self.quorum is None:
            return False
        heard = [w for w in live if not self._workers[w].presumed]
        reason = self.quorum(heard)
        if reason is None:
            return False
        coming = self._restarts_coming()
        restarts_help = bool(coming) and self.quorum(heard + coming) is None
        since = held[1] if held is not None and not restarts_help else self._clock()
        self._held = (reason, since)
        if held is None or held[0] != reason:
            self._announce()
        return True

    def _steps_timed(self) -> bool:
        """Does a member of the current generation run its steps under the step timeout? (If
        none does, async or workers from before it, its changes would tell of nothing.)"""
        current = self.current
        return current is not None and any(
            self._workers[m].times_steps for m in current.members if m in self._workers)

    def _start_rounds(self) -> float | None:
        """The most a member of the current generation says a start sends, in its rounds'
        bytes (None: a member says nothing, and the collective timeout is left as it is)."""
        said = [self._workers[m].start_rounds if m in self._workers else 0.0 for m in self.current.members]
        return max(said) if said and min(said) > 0 else None

    def _restarts_coming(self) -> list[int]:
        """The workers whose restart was announced within ``_REJOIN_PATIENCE_SECONDS``: one not
        joined by then is not coming (its launcher, or its machine, was lost since), and a job
        paused for it must fail rather than wait forever."""
        now = self._clock()
        return [w for w, since in self._rejoin_expected.items() if now - since < _REJOIN_PATIENCE_SECONDS]

    def _may_still_announce_a_restart(self) -> bool:
        """With restarts, or a member declared dead for silence, give the launcher one
        heartbeat timeout to announce one.

        A worker that stalls before it dies is declared dead by silence before its process
        exits, so the launcher's "restarting it" can trail the verdict; failing the job in
        between would throw away a run that was about to pause for the rejoin. A hung worker's
        launcher kills it once it reads the verdict, and may start it again
        (``launch.workers.fence_silenced``): a standalone coordinator does not know which
        launchers restart, so it waits whenever a member went silent.
        """
        previous = self.current
        silenced = previous is not None and any(
            not self._workers[m].alive and self._workers[m].silenced
            for m in previous.members if m in self._workers)
        if not (self.restarts or silenced):
            return False
        now = self._clock()
        if self._below_minimum_since is None:
            self._below_minimum_since = now
        return now - self._below_minimum_since < self.heartbeat_timeout

    def _set_status(self, status: str, reason: str) -> None:
        self.status, self.reason = status, reason
        self._announce()

    def _announce(self) -> None:
        # The state is kept first: no worker or launcher can hear of a change (their
        # requests wait for the lock) that a restarted coordinator would not know.
        self._keep()
        for callback in self._listeners:
            callback()

    def _keep(self) -> None:
        if self._keep_state is not None:
            self._keep_state(self.export_state())

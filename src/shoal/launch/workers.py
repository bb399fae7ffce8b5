"""Start and supervise local worker processes: prefixed output, exit causes, clean shutdown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Self

from shoal._exit import EXIT_EVICTED
from shoal.launch.zygote import ForkedProcess, Zygote

__all__ = ["ENV_FORK_WORKERS", "PREEMPTION_GRACE_SECONDS", "SIGTERM_STOP", "TERMINATE_GRACE_SECONDS", "Preemption",
           "StopRequest", "WorkerGroup", "WorkerProcess", "describe_exit", "fence_silenced", "worker_zygote"]

ENV_FORK_WORKERS = "SHOAL_FORK_WORKERS"
"""``SHOAL_FORK_WORKERS=0`` starts every ``shoal train`` worker as a fresh Python process."""

_WORKER_PRELOAD = ("shoal.runtime.worker", "torch._dynamo")
"""What a worker imports before it trains; torch._dynamo comes with the first optimizer."""


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"


@dataclass(slots=True)
class WorkerProcess:
    worker_id: int
    process: subprocess.Popen | ForkedProcess
    exited_at: float | None = None
    fenced: bool = False
    """Killed by its launcher after the coordinator declared it dead for silence."""
    started: float = field(default_factory=time.monotonic)
    """When it was spawned (monotonic): a coordinator's record older than this is not its."""

    @property
    def returncode(self) -> int | None:
        """Its exit code; a fenced worker's is an evicted one's, whatever the kill made it."""
        code = self.process.returncode
        return EXIT_EVICTED if self.fenced and code is not None else code


class WorkerGroup:
    """Local workers of one job. ``on_exit(worker_id, returncode, when)`` runs as each ends."""

    def __init__(self, command: Sequence[str], *, env: dict[str, str],
                 on_exit: Callable[[int, int, float], None], echo: Callable[[str], None],
                 zygote: Zygote | None = None):
        self.command = list(command)
        self.zygote = zygote
        """When given, workers are forked from it instead of running ``command`` afresh."""
        self.env = env
        self.on_exit = on_exit
        self.echo = echo
        self.workers: dict[int, WorkerProcess] = {}
        self.stopping = False
        """Set once the launcher shuts workers down: their exits are not failures."""
        self._threads: list[threading.Thread] = []
        # Held while a worker's exit is handled, so that a restart in ``on_exit`` and the
        # exit look like one event to ``running()``.
        self._lock = threading.RLock()
        self._echo_lock = threading.Lock()

    def spawn(self, worker_id: int, extra_env: dict[str, str]) -> WorkerProcess:
        env = {**self.env, **extra_env}
        if self.zygote is not None:
            process = self.zygote.spawn(env)
        else:
            process = subprocess.Popen(
                self.command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, text=True, bufsize=1,
                start_new_session=True,  # a Ctrl-C reaches the launcher, which stops workers itself
            )
        worker = WorkerProcess(worker_id, process)
        with self._lock:
            self.workers[worker_id] = worker
        for target in (self._pump_output, self._wait):
            thread = threading.Thread(target=target, args=(worker,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return worker

    def _pump_output(self, worker: WorkerProcess) -> None:
        for line in worker.process.stdout:
            with self._echo_lock:  # print() writes a line and its newline apart: lines would mix
                self.echo(f"[worker {worker.worker_id}] {line.rstrip()}")

    def _wait(self, worker: WorkerProcess) -> None:
        worker.process.wait()
        exited_at = time.time()  # before the lock, which another exit's handler may hold a while
        with self._lock:
            worker.exited_at = exited_at
            self.on_exit(worker.worker_id, worker.returncode, worker.exited_at)

    def running(self) -> list[WorkerProcess]:
        with self._lock:
            return [w for w in self.workers.values() if w.exited_at is None]

    def wait_all(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._lock:
            workers = list(self.workers.values())
        for worker in workers:
            remaining = max(0.0, deadline - time.monotonic())
            try:
                worker.process.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                return False
        return True

    def wait_handled(self, timeout: float) -> bool:
        """Wait until every worker's exit was handled (``on_exit`` returned), not just reaped:
        what ``on_exit`` tells others (an exit reported) is told by then."""
        deadline = time.monotonic() + timeout
        while self.running():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def kill(self, worker_id: int) -> None:
        """SIGKILL one worker (a hung one: it would not act on SIGTERM)."""
        _signal(self.workers[worker_id].process, signal.SIGKILL)

    def signal_all(self, signum: int) -> None:
        for worker in self.running():
            _signal(worker.process, signum)

    def stop_all(self, grace: float = 5.0) -> None:
        """SIGTERM every running worker, SIGKILL those still there after ``grace`` seconds."""
        self.stopping = True
        for worker in self.running():
            _signal(worker.process, signal.SIGTERM)
            _signal(worker.process, signal.SIGCONT)  # a stopped (hung) worker must see it too
        if not self.wait_all(grace):
            for worker in self.running():
                _signal(worker.process, signal.SIGKILL)
            self.wait_all(grace)
        self.join_threads()

    def join_threads(self) -> None:
        for thread in self._threads:
            thread.join(timeout=5)


def fence_silenced(group: WorkerGroup, workers: dict, launcher: str,
                   on_fence: Callable[[str, WorkerProcess], None]) -> None:
    """SIGKILL each local worker still running that the coordinator declared dead for silence
    (``workers``: its ``/status`` workers, by job id; ``launcher``: this launcher's id, which
    with the pid names a local process). Hung, it would hold its memory, its device and its
    core until the job ends; cut off, it would leave anyway once it heard it was evicted.
    Its exit then counts as that evicted worker's (``EXIT_EVICTED``), and the launcher treats
    it as it treats one (``shoal train --restart`` starts it again). ``on_fence(job id, local
    worker)`` runs before the kill, under the group's lock: before the exit's handler.

    A record is this process's only if the process is older than the record's last
    heartbeat: a record stays after its worker is gone, and its pid may come back."""
    with group._lock:  # not a worker whose exit is being handled (and restarted) meanwhile
        for worker in group.running():
            age = time.monotonic() - worker.started
            for job_id, known in workers.items():
                if (known.get("silenced") and not known["alive"] and known.get("launcher") == launcher
                        and known["pid"] == worker.process.pid and not worker.fenced
                        and age > known.get("heartbeat_age", 0.0)):
                    worker.fenced = True
                    on_fence(job_id, worker)
                    _signal(worker.process, signal.SIGKILL)


def _signal(process: subprocess.Popen | ForkedProcess, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass


def worker_zygote() -> Zygote | None:
    """A zygote that forks ``shoal train`` workers; call it before starting any thread.

    None (fresh processes) under ``SHOAL_FORK_WORKERS=0``, where fork is missing, or when
    threads already run.
    """
    if os.environ.get(ENV_FORK_WORKERS, "1") == "0" or not hasattr(os, "fork"):
        return None
    from shoal.runtime import worker

    return Zygote.start(preload=_WORKER_PRELOAD, entry=worker.main)


def python_command(module: str) -> list[str]:
    return [sys.executable, "-u", "-m", module]


PREEMPTION_GRACE_SECONDS = 60.0
"""After SIGTERM, how long workers may take to reach a step boundary and save."""


class Preemption:
    """SIGTERM to the launcher (a preemption notice): pass it on to the workers, whose leader
    saves a checkpoint at its next step boundary; kill what is left after a grace period."""

    def __init__(self):
        self.deadline: float | None = None

    def notice(self, group: WorkerGroup) -> None:
        if self.deadline is None:
            self.deadline = time.monotonic() + PREEMPTION_GRACE_SECONDS
            group.signal_all(signal.SIGTERM)

    def overdue(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline


SIGTERM_STOP = "stopped (SIGTERM)"
TERMINATE_GRACE_SECONDS = 30.0
"""After SIGTERM to ``shoal run``, how long its workers may take to leave before SIGKILL
(torchrun's)."""


class StopRequest:
    """SIGTERM or Ctrl-C to the launcher. The first asks this node to stop (its workers get
    the grace); another one kills them at once. The handler only notes it, and the loops
    poll: a signal comes at any line, and an exception raised there (inside ``Popen``) would
    leave a child unregistered, a lock taken there (an Event's) could be the one the main
    thread holds."""

    def __init__(self, group: WorkerGroup):
        self._group = group
        self.how: str | None = None
        self.when = 0.0
        self.told = False
        self._previous: dict = {}

    def requested(self) -> bool:
        return self.how is not None

    def __enter__(self) -> Self:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._note)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _note(self, signum: int, frame) -> None:
        if self.how is None:
            self.how = SIGTERM_STOP if signum == signal.SIGTERM else "interrupted (Ctrl-C)"
            self.when = time.time()
        else:
            self._group.signal_all(signal.SIGKILL)

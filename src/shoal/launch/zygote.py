"""Start workers by forking a process that has already imported torch: a zygote.

A fresh Python process spends about 4 s of CPU importing torch and torch._dynamo (the
first optimizer pulls it in) before a worker does anything. With four workers on a
2-core laptop that was most of the first 20 s of every job, and a restarted worker paid it
again before it could rejoin. The launcher forks one zygote before it starts any thread;
the zygote imports the worker's modules once, then forks each worker from itself, so a
worker (or its replacement after a crash) starts in milliseconds.

The zygote is the workers' parent, so only it can wait for them: it sends each exit status
back over its control socket, where a thread of the launcher hands it to the waiting
``ForkedProcess``. The zygote ends when the launcher closes the socket or dies.
"""

from __future__ import annotations

import atexit
import ctypes
import importlib
import io
import json
import os
import random
import select
import signal
import socket
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable, Sequence

from shoal._exit import run_then_exit

__all__ = ["WORKER_NAME", "ZYGOTE_NAME", "ForkedProcess", "Zygote"]

WORKER_NAME = "shoal-worker"
ZYGOTE_NAME = "shoal-zygote"
"""Process names (as ps and top show them): forked processes keep the launcher's command line."""

_MAX_MESSAGE = 1 << 22  # a request carries the worker's environment, the job config included


class ForkedProcess:
    """A worker forked by the zygote, with the parts of ``subprocess.Popen`` a launcher uses."""

    def __init__(self, pid: int, stdout: io.TextIOBase):
        self.pid = pid
        self.stdout = stdout
        self.returncode: int | None = None
        self._exited = threading.Event()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._exited.wait(timeout):
            raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout)
        return self.returncode

    def _set_exited(self, returncode: int) -> None:
        self.returncode = returncode
        self._exited.set()


class Zygote:
    """The launcher's end of the zygote. ``start`` must run before the launcher starts a thread."""

    def __init__(self, control: socket.socket, pid: int):
        self._control = control
        self.pid = pid
        self._lock = threading.Lock()  # one request in flight: replies come back in order
        self._spawned = threading.Condition()
        self._next_pid: int | None = None
        self._processes: dict[int, ForkedProcess] = {}
        self._early_exits: dict[int, int] = {}
        self._reader = threading.Thread(target=self._read_replies, daemon=True, name="shoal-zygote")
        self._reader.start()

    @classmethod
    def start(cls, preload: Sequence[str], entry: Callable[[], int]) -> Zygote | None:
        """Fork the zygote; None when this process already runs threads (forking is unsafe then)."""
        if threading.active_count() > 1:
            return None
        sys.stdout.flush()
        sys.stderr.flush()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            ours.close()
            code = 1
            try:
                _serve(theirs, preload, entry)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        theirs.close()
        return cls(ours, pid)

    def spawn(self, env: dict[str, str]) -> ForkedProcess:
        """Fork a worker with this environment; its stdout and stderr come back as one pipe."""
        read_end, write_end = os.pipe()
        request = json.dumps({"env": env, "cwd": os.getcwd()}).encode()
        with self._lock:
            try:
                socket.send_fds(self._control, [request], [write_end])
            except OSError as error:
                os.close(read_end)
                raise RuntimeError(f"the worker zygote (pid {self.pid}) is gone: {error}") from None
            finally:
                os.close(write_end)
            with self._spawned:
                if not self._spawned.wait_for(lambda: self._next_pid is not None, timeout=60):
                    os.close(read_end)
                    raise RuntimeError(f"the worker zygote (pid {self.pid}) did not fork a worker")
                pid, self._next_pid = self._next_pid, None
                stdout = open(read_end, encoding="utf-8", errors="replace", buffering=1)
                process = ForkedProcess(pid, stdout)
                self._processes[pid] = process
                if pid in self._early_exits:
                    process._set_exited(self._early_exits.pop(pid))
        return process

    def _read_replies(self) -> None:
        while True:
            try:
                message = self._control.recv(_MAX_MESSAGE)
            except OSError:
                message = b""
            if not message:
                break
            reply = json.loads(message)
            with self._spawned:
                if "returncode" in reply:
                    process = self._processes.get(reply["pid"])
                    if process is None:  # exited before spawn() registered it
                        self._early_exits[reply["pid"]] = reply["returncode"]
                    else:
                        process._set_exited(reply["returncode"])
                else:
                    self._next_pid = reply["pid"]
                    self._spawned.notify_all()
        self._orphan_workers()

    def _orphan_workers(self) -> None:
        """The zygote died: nobody can report these workers' exits, so end them now."""
        with self._spawned:
            waiting = [p for p in self._processes.values() if p.returncode is None]
        for process in waiting:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process._set_exited(-signal.SIGKILL)

    def close(self) -> None:
        """End the zygote (it exits when its control socket closes) and reap it."""
        try:
            self._control.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._control.close()
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass
        self._reader.join(timeout=5)


def _serve(control: socket.socket, preload: Sequence[str], entry: Callable[[], int]) -> None:
    """The zygote's loop: fork a worker per request, report each exit, end at EOF."""
    # Ctrl-C and a SIGTERM to the launcher's process group are the launcher's to handle: it
    # stops the workers, then closes the socket, which ends the zygote.
    # SIGUSR1 asks workers for their stacks; the zygote has none worth reading.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)
    _set_process_name(ZYGOTE_NAME)
    for module in preload:
        importlib.import_module(module)
    # SIGCHLD wakes the select below through this pipe, so exits are reported at once.
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    while True:
        ready, _, _ = select.select([control, wake_read], [], [])
        if wake_read in ready:
            os.read(wake_read, 4096)
            _report_exits(control)
        if control in ready:
            try:
                message, fds, _, _ = socket.recv_fds(control, _MAX_MESSAGE, 1)
            except OSError:
                return
            if not message:
                return  # the launcher closed the socket or died
            request = json.loads(message)
            pid = os.fork()
            if pid == 0:
                _become_worker(request, fds[0], entry, close=(control.fileno(), wake_read, wake_write))
            os.close(fds[0])
            control.send(json.dumps({"pid": pid}).encode())


def _report_exits(control: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        control.send(json.dumps({"pid": pid, "returncode": os.waitstatus_to_exitcode(status)}).encode())


def _set_process_name(name: str) -> None:
    """Best effort, Linux only (prctl PR_SET_NAME); elsewhere the name stays the launcher's."""
    try:
        libc = ctypes.CDLL(None)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _become_worker(request: dict, output: int, entry: Callable[[], int], close: Sequence[int]) -> None:
    """In the forked child: look like ``python -u -m <worker>`` started fresh, run it, exit."""
    def run() -> int:
        _look_fresh(request, output, close)
        return entry()

    run_then_exit(run)


def _look_fresh(request: dict, output: int, close: Sequence[int]) -> None:
    """The child's own session, signals, output, environment and seed."""
    os.setsid()  # its own process group: a Ctrl-C reaches the launcher, which stops workers
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_DFL)
    _set_process_name(WORKER_NAME)
    for fd in close:
        os.close(fd)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(output, 1)
    os.dup2(output, 2)
    os.close(devnull)
    os.close(output)
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True,
                                  write_through=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True,
                                  write_through=True, errors="backslashreplace")
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    atexit._clear()  # the launcher's exit handlers are not the worker's
    random.seed()  # forked children would otherwise share the zygote's random sequence


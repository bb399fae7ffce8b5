"""The process a ``shoal run`` worker starts: the user's script, run as ``python script.py``
would run it (a module as ``python -m`` would, a program as it is), then left without the
interpreter's teardown (see ``shoal._exit``): on torch 2.13 gloo's teardown aborts a
finished script now and then (SIGABRT, "terminate called without an active exception"),
and the command would report a worker that did its work as failed. Exit handlers run and
open files are flushed first, as the teardown would.

    python -u -m shoal.launch.script_runner SCRIPT [ARGS...]
    python -u -m shoal.launch.script_runner --module MODULE [ARGS...]
    python -u -m shoal.launch.script_runner --no-python PROGRAM [ARGS...]
"""

from __future__ import annotations

import ctypes
import os
import runpy
import signal
import sys

from shoal._exit import run_then_exit
from shoal.config import ENV_WORKER_PID, ConfigError

__all__ = ["ENV_LAUNCHER_PID", "MODULE", "PROGRAM"]

ENV_LAUNCHER_PID = "SHOAL_LAUNCHER_PID"
MODULE = "--module"
"""The target is a module (``shoal run -m``)."""
PROGRAM = "--no-python"
"""The target is a program, executed in place of this process (``shoal run --no-python``)."""
_PR_SET_PDEATHSIG = 1


def _die_with_the_launcher() -> None:
    """A launcher that is SIGKILLed (the OOM killer, a node's agent) cannot stop its workers,
    which run in sessions of their own, so the kernel does (Linux's ``PR_SET_PDEATHSIG``):
    a worker goes as its launcher went, with no chance to clean up. It is set here, in the
    worker, because ``preexec_fn`` is not safe in a launcher that runs threads."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if str(os.getppid()) != os.environ.get(ENV_LAUNCHER_PID, str(os.getppid())):
        os._exit(1)  # the launcher died before the line above: no signal will come


def _run_script() -> int:
    _die_with_the_launcher()
    how = sys.argv[1] if sys.argv[1] in (MODULE, PROGRAM) else None
    target, *args = sys.argv[2:] if how else sys.argv[1:]
    if how == PROGRAM:  # the death signal set above outlives exec (but not in the program's children)
        os.environ[ENV_WORKER_PID] = str(os.getpid())  # a shoal.train child of a wrapper is known by it
        os.execvp(target, [target, *args])
    sys.argv = [target, *args]
    try:
        if how == MODULE:
            sys.path[0] = os.getcwd()  # as `python -m` does; run_module puts its file in argv[0]
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            sys.path[0] = os.path.dirname(os.path.abspath(target))  # as `python script.py` does
            runpy.run_path(target, run_name="__main__")
    except ConfigError as error:
        if not error.reported:
            raise
        return 2  # shoal.train refused its arguments and told the coordinator: `shoal run` prints it once
    return 0


if __name__ == "__main__":
    run_then_exit(_run_script)

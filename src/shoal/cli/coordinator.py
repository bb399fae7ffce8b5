"""``shoal coordinator``: a standalone coordinator for workers on several machines."""

from __future__ import annotations

import argparse
import math
import os
import secrets
import sys
import threading
import time

__all__ = ["add_coordinator"]


def add_coordinator(commands) -> None:
    parser = commands.add_parser("coordinator", help="run a standalone coordinator")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to bind (default: any free)")
    parser.add_argument("--token", help="job token (default: $SHOAL_TOKEN, else a new random one, printed)")
    parser.add_argument("--workers", type=int, default=1,
                        help="workers to wait for before the first generation (default 1)")
    parser.add_argument("--min-workers", type=int, default=1)
    parser.add_argument("--heartbeat-timeout", type=float, default=5.0)
    parser.add_argument("--linger", type=float, default=10.0,
                        help="seconds to keep answering after the job ends, so that every "
                        "launcher can read the outcome (default 10)")
    parser.add_argument("--state", metavar="FILE",
                        help="keep the job's record in FILE and take it back when started again "
                        "with it and the same --token: a restart then loses nothing, the job's "
                        "end included (default: workers resend what they know; the rest is lost)")
    parser.set_defaults(handler=_coordinator)


_LOG_SECONDS = 0.2


class _GenerationLog:
    """One stderr line per generation, as the embedded launcher prints them: the operator's
    record of who was in the job when, and why it changed. A generation formed without a
    change (the first; one a restarted coordinator took over from the workers) is named too."""

    def __init__(self, membership):
        self._membership = membership
        self._announced = len(membership.membership_changes())  # a restored record's were told
        self._timeouts_announced = len(membership.timeout_changes())
        self._generation = 0
        self._takeover_told = False

    def print_new(self) -> None:
        # as _coordinator: the CLI starts light
        from shoal.coordinator import describe_change, describe_timeout_change

        status = self._membership.snapshot()
        takeover = status["takeover"]
        if takeover is not None and takeover["generation"] > self._generation:  # before any change
            self._generation = takeover["generation"]
            self._tell(f"generation {self._generation}: members {takeover['members']}")
        self._tell_takeover(status)
        for change in self._membership.membership_changes()[self._announced:]:
            self._tell(describe_change(change))
            self._announced += 1
            self._generation = change["generation_after"]
        if status["generation"] > self._generation:
            self._generation = status["generation"]
            self._tell(f"generation {self._generation}: members {status['members']}")
        for change in self._membership.timeout_changes()[self._timeouts_announced:]:
            self._tell(describe_timeout_change(change))
            self._timeouts_announced += 1

    @staticmethod
    def _tell(line: str) -> None:
        print(f"shoal coordinator: {line}", file=sys.stderr, flush=True)

    def _tell_takeover(self, status: dict) -> None:
        """Once, for a restarted coordinator: how long after the first member of the
        generation it took over the last one spoke (or who never did, before it moved on).
        Members heard further apart than the heartbeat timeout are declared dead for it."""
        takeover = status["takeover"]
        if takeover is None or self._takeover_told:
            return
        heard, members = takeover["heard"], takeover["members"]
        over = status["generation"] != takeover["generation"] or status["status"] in ("completed", "failed")
        if len(heard) < len(members) and not over:
            return
        self._takeover_told = True
        line = f"took over generation {takeover['generation']}: "
        if heard:
            last = max(heard, key=heard.get)
            line += f"heard members {sorted(int(m) for m in heard)} within {heard[last]:.2f} s (worker {last} last)"
        silent = [m for m in members if str(m) not in heard]
        if silent:
            line += f"{'; ' if heard else ''}never heard from {silent}"
        self._tell(line)


def _keep_state(path: str, token: str, membership):
    """Take back the job's record from ``--state`` if a previous coordinator left one, and
    keep it there from now on. A file this coordinator cannot use is an exit 2."""
    from shoal.config import ConfigError
    from shoal.coordinator.state_file import StateFile

    state_file = StateFile(path, token)
    saved = state_file.load()
    if saved is not None:
        membership.restore_state(*saved)
        status = membership.snapshot()
        print(f"shoal coordinator: took back the job's record from {path}: {status['status']}, "
              f"generation {status['generation']}, {status['step']} steps committed", file=sys.stderr,
              flush=True)
    try:
        state_file.start(membership.export_state(), membership.commits_by_worker())
    except OSError as error:
        state_file.close()
        raise ConfigError("--state", f"cannot write {path}: {error.strerror or error}") from None
    membership.keep_state_with(state_file.keep_state, state_file.keep_commits)
    return state_file


def _coordinator(args: argparse.Namespace) -> int:
    from shoal.config import ENV_TOKEN, ConfigError, check_bindable, check_heartbeat_timeout
    from shoal.coordinator import Coordinator, Membership

    if args.workers < 1:
        raise ConfigError("--workers", f"must be at least 1, got {args.workers}")
    if not 1 <= args.min_workers <= args.workers:
        raise ConfigError("--min-workers", f"must be between 1 and --workers, got {args.min_workers}")
    if not 0 <= args.port < 65536:
        raise ConfigError("--port", f"must be a TCP port (0-65535), got {args.port}")
    check_heartbeat_timeout(args.heartbeat_timeout)
    if not 0 <= args.linger < math.inf:
        raise ConfigError("--linger", f"must be 0 or more seconds, got {args.linger:g}")
    if args.token is not None and not args.token:
        raise ConfigError("--token", "must not be empty (leave it out for a random one)")
    check_bindable("--host", args.host)
    token = args.token or os.environ.get(ENV_TOKEN) or secrets.token_hex(16)
    membership = Membership(expected_workers=args.workers, min_workers=args.min_workers,
                            heartbeat_timeout=args.heartbeat_timeout)
    state_file = _keep_state(args.state, token, membership) if args.state else None
    try:
        coordinator = Coordinator(membership, host=args.host, port=args.port, token=token).start()
    except OSError as error:  # the port is taken
        raise ConfigError("--port", f"cannot listen on {args.host}:{args.port}: {error.strerror or error}") from None
    print(f"shoal coordinator: listening on {coordinator.url}", flush=True)
    print(f"shoal coordinator: token {coordinator.token}", flush=True)
    done = threading.Event()
    membership.add_listener(lambda: membership.status in ("completed", "failed") and done.set())
    if membership.status in ("completed", "failed"):  # restored: linger for the launchers
        done.set()
    log = _GenerationLog(membership)
    try:
        while not done.wait(_LOG_SECONDS):
            log.print_new()
        log.print_new()
        time.sleep(args.linger)
    except KeyboardInterrupt:
        pass
    finally:
        coordinator.stop()
        if state_file is not None:
            state_file.close()
    if membership.rejected:  # the workers refused the job's configuration: bad input, exit 2
        print(f"shoal coordinator: error: {membership.reason}", file=sys.stderr)
        return 2
    print(f"shoal coordinator: job {membership.status} {membership.reason}".rstrip(), file=sys.stderr)
    return 0 if membership.status == "completed" else 1

"""``shoal coordinator``: a standalone coordinator for workers on several machines."""

from __future__ import annotations

import argparse
import math
import sys
import threading
import time

__all__ = ["add_coordinator"]


def add_coordinator(commands) -> None:
    parser = commands.add_parser("coordinator", help="run a standalone coordinator")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to bind (default: any free)")
    parser.add_argument("--token", help="job token (default: a new random one, printed)")
    parser.add_argument("--workers", type=int, default=1,
                        help="workers to wait for before the first generation (default 1)")
    parser.add_argument("--min-workers", type=int, default=1)
    parser.add_argument("--heartbeat-timeout", type=float, default=5.0)
    parser.add_argument("--linger", type=float, default=10.0,
                        help="seconds to keep answering after the job ends, so that every "
                        "launcher can read the outcome (default 10)")
    parser.set_defaults(handler=_coordinator)


_LOG_SECONDS = 0.2


class _GenerationLog:
    """One stderr line per generation, as the embedded launcher prints them: the operator's
    record of who was in the job when, and why it changed. A generation formed without a
    change (the first; one a restarted coordinator took over from the workers) is named too."""

    def __init__(self, membership):
        self._membership = membership
        self._announced = 0
        self._generation = 0
        self._takeover_told = False

    def print_new(self) -> None:
        from shoal.coordinator import describe_change  # as _coordinator: the CLI starts light

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


def _coordinator(args: argparse.Namespace) -> int:
    from shoal.config import ConfigError, check_bindable, check_heartbeat_timeout
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
    membership = Membership(expected_workers=args.workers, min_workers=args.min_workers,
                            heartbeat_timeout=args.heartbeat_timeout)
    try:
        coordinator = Coordinator(membership, host=args.host, port=args.port, token=args.token).start()
    except OSError as error:  # the port is taken
        raise ConfigError("--port", f"cannot listen on {args.host}:{args.port}: {error.strerror or error}") from None
    print(f"shoal coordinator: listening on {coordinator.url}", flush=True)
    print(f"shoal coordinator: token {coordinator.token}", flush=True)
    done = threading.Event()
    membership.add_listener(lambda: membership.status in ("completed", "failed") and done.set())
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
    if membership.rejected:  # the workers refused the job's configuration: bad input, exit 2
        print(f"shoal coordinator: error: {membership.reason}", file=sys.stderr)
        return 2
    print(f"shoal coordinator: job {membership.status} {membership.reason}".rstrip(), file=sys.stderr)
    return 0 if membership.status == "completed" else 1

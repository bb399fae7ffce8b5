"""Which shoal a process runs, and the version of what shoal's processes say to one another.

Launchers, coordinators and nodes of different protocols refuse to mix, at admission and
before any worker starts: a newer launcher's workers could otherwise misread an older
coordinator's replies, or an older worker an async request (its header's fields), and the
job would break in ways no error names.
"""

from __future__ import annotations

__all__ = ["PROTOCOL", "VERSION", "describe"]

VERSION = "0.1.0"
"""The package's version (``shoal.__version__``)."""

PROTOCOL = 3
"""Raise it with any change that a process of the previous one would misread: the
coordinator's HTTP API, the keys in its store, the workers' messages and blobs. 1: the
first numbered protocol (2026-12-07); processes from before it send none. 2: ``shoal run
--nnodes`` restarts a plain script's workers (``--max-restarts``): a failure's keys in node
0's store are per attempt, and nodes meet at barriers there. 3: ``shoal run --quorum``: a
node 1 of protocol 2 would take node 0's job over without node 0's rule for partitions
(it checks only the flags it knows)."""


_MINE = object()


def describe(protocol: object = _MINE, version: str | None = None) -> str:
    """"shoal 0.1.0 (protocol 1)": this process's by default, else another's (``None``: an
    older process that sends no protocol)."""
    if protocol is _MINE:
        protocol, version = PROTOCOL, VERSION
    if protocol is None:
        return "a shoal older than protocol 1 (it sends no protocol)"
    return f"shoal {version or '?'} (protocol {protocol})"

"""The coordinator: the single source of truth for membership. It never touches tensors."""

from shoal.coordinator.client import CoordinatorClient, CoordinatorUnreachable
from shoal.coordinator.membership import (
    Generation,
    Membership,
    describe_change,
    describe_timeout_change,
    for_slow_collective,
)

__all__ = ["Coordinator", "CoordinatorClient", "CoordinatorUnreachable", "Generation", "Membership",
           "describe_change", "describe_timeout_change", "for_slow_collective"]


def __getattr__(name: str):
    # The server (aiohttp, half a second to import) only where one runs: every worker
    # imports this package for the client, and N workers start at once on shared cores.
    if name == "Coordinator":
        from shoal.coordinator.server import Coordinator

        return Coordinator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

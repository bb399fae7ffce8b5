"""The coordinator: the single source of truth for membership. It never touches tensors."""

from shoal.coordinator.client import CoordinatorClient, CoordinatorUnreachable
from shoal.coordinator.membership import Generation, Membership
from shoal.coordinator.server import Coordinator

__all__ = ["Coordinator", "CoordinatorClient", "CoordinatorUnreachable", "Generation", "Membership"]

"""Strategies by name: ``--strategy`` choices come from this registry."""

from shoal.strategies import (  # noqa: F401  (each registers itself)
    allreduce as _allreduce,
    asyncsgd as _asyncsgd,
    diloco as _diloco,
    hierarchical as _hierarchical,
    localsgd as _localsgd,
    zero as _zero,
)
from shoal.strategies.api import STRATEGIES, Strategy, register

__all__ = ["STRATEGIES", "Strategy", "register"]

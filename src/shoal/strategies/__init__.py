"""Strategies by name: ``--strategy`` choices come from this registry."""

from shoal.strategies import allreduce as _allreduce  # noqa: F401  (registers itself)
from shoal.strategies.api import STRATEGIES, Strategy, register

__all__ = ["STRATEGIES", "Strategy", "register"]

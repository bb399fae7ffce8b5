"""Emulated networks: hosts as network namespaces on one machine (root only)."""

from shoal.network.namespaces import Hosts, namespaces_available

__all__ = ["Hosts", "namespaces_available"]

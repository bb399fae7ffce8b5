"""What the trainer is asked to checkpoint, and where."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Checkpointing"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Checkpointing:
    """Where and how often the leader checkpoints the committed state."""

    directory: str
    every: int = 100
    """Committed steps between checkpoints (a round-based strategy saves at the first round
    end past each multiple). The last step and a SIGTERM always save."""
    keep: int = 3
    """Newest checkpoints kept; older ones are deleted once a newer one is durable."""
    background: bool = True
    """Write from a thread of its own; training waits only for the memory copy."""

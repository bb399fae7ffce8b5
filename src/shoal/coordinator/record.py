"""What a job leaves behind: the committed steps and membership changes, as plain data.

The coordinator's membership keeps it while the job runs; ``Membership.record()`` takes a
copy, ``GET /record`` serves it to a remote launcher, and ``shoal.tracking`` turns it into
results.json and the sample log. Keeping it plain JSON is what lets a launcher on another
host write the same files as the embedded one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = ["CommittedStep", "JobRecord"]


@dataclass(slots=True)
class CommittedStep:
    step: int
    generation: int
    members: list[int]
    committed_at: float
    loss: float | None
    """The global-batch loss, when every member's share was reported."""


@dataclass(slots=True)
class JobRecord:
    status: str
    reason: str
    first_formed_at: float | None
    bytes_sent: int
    bytes_by_worker: dict[str, int] = field(default_factory=dict)
    """Payload bytes each worker (id) reported, as of its last heartbeat or finish."""
    steps: list[CommittedStep] = field(default_factory=list)
    membership_changes: list[dict] = field(default_factory=list)
    results: dict | None = None
    """What the leader reported when it finished (eval metrics, heals)."""
    timeout_changes: list[dict] = field(default_factory=list)
    """Each shrink of the step timeout (``coordinator.timeouts``): {time, step, step_timeout, cause}."""
    steps_redone: int = 0
    """Committed steps trained again after a membership change (zero's fallback to its
    last checkpoint; the other strategies never redo a committed step)."""

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> JobRecord:
        steps = [CommittedStep(**step) for step in data.get("steps", [])]
        return cls(**{**data, "steps": steps})

    @property
    def losses(self) -> dict[int, float]:
        return {s.step: s.loss for s in self.steps if s.loss is not None}

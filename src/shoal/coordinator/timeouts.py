"""How long the members' collectives may take: the coordinator's two timeouts, and when they change.

A generation's *collective timeout* bounds what its members do together outside their
steps: connecting, healing a newcomer (the model and the optimizer's state, two to three
times a step's bytes), setting a strategy up, checkpointing. The *step timeout* bounds a
step's own collectives. Both start at the heartbeat timeout, so that survivors blocked on a
hung peer leave about when the coordinator declares it dead. When a collective ran out of
time while every member stayed alive (a slow link, a straggler), up to ``MAX_TIMEOUT_GROWTH``
heartbeat timeouts: one in a step doubles the step timeout (the collective timeout is never
the shorter); one elsewhere doubles both, since on a link too slow for a generation's start
(DDP's first broadcast carries a step's bytes) the first step would time out next, and a
re-form costs more than a timeout that is too long for a while.

Both shrink again, so that a job that was slow once finds a cut link fast later (a hang
needs no timeout: its launcher kills it, which breaks its connections). Steps are measured:
the time between one worker's consecutive commits in the current generation bounds what the
collectives of the later step took. After ``window`` such intervals (first
``SHRINK_WINDOW``) whose longest times ``SHRINK_MARGIN`` is at most half the step timeout,
the step timeout becomes that. A step that then times out multiplies the window by
``WINDOW_GROWTH`` as well as doubling the timeout: a job with a slow step now and then (a
checkpoint's staging, an epoch's first batch) stops shrinking once the window spans one,
after a few re-forms, instead of paying two re-forms per slow step.

What the collective timeout bounds happens once per generation, with nothing before it to
time; but its bytes are known. Each member says how many times the bytes it sent off its
host in its last round a generation's start may make one member send (``start_rounds``: a
heal of the state and the strategy's first broadcast of the parameters, each a binomial
broadcast; zero says nothing, its starts also reading checkpoints). An
interval of that member bounds what its link takes for a round's bytes, so the same window
bounds a start by ``SHRINK_MARGIN`` x the longest interval x the members' largest
``start_rounds``, and the collective timeout shrinks to that on the same terms (at most half,
never below the step timeout; a start that then times out lengthens the next window). A
newcomer's own link is not measured: a heal slower over it times out, and lengthens both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["MAX_TIMEOUT_GROWTH", "SHRINK_MARGIN", "SHRINK_WINDOW", "START", "STEP", "WINDOW_GROWTH", "Timeouts"]

MAX_TIMEOUT_GROWTH = 32
"""The timeouts grow to at most this many heartbeat timeouts (160 s at the default 5 s).
Beyond it a collective that never ends among live members is a bug, not a slow link, and the
workers' own limit on failures without progress ends the job."""

SHRINK_WINDOW = 100
"""Commit intervals measured before the step timeout may shrink (rounds, for local SGD)."""

SHRINK_MARGIN = 4.0
"""The step timeout shrinks to this many times the longest interval measured."""

WINDOW_GROWTH = 4
"""A shrink that proved too far (a step timed out after it) makes the next window this many
times longer."""

STEP, START = "step", "start"
"""Where a member's collective failed: in a step's own work, or anywhere else (a failure
report that does not say is taken for the latter, as workers before step timeouts ran all
under the generation's collective timeout)."""


@dataclass(slots=True)
class Timeouts:
    heartbeat_timeout: float
    collective: float = 0.0
    """The next generation's collective timeout (seconds)."""
    step: float = 0.0
    """The step timeout the members use now (seconds)."""
    window: int = SHRINK_WINDOW
    """Commit intervals measured before the step timeout may shrink."""
    changes: list[dict] = field(default_factory=list)
    """Every shrink: {time, step, step_timeout or collective_timeout, cause} (a lengthening is
    told with the re-form that applies it)."""
    _shrunk: bool = False
    """The step timeout shrank since it last grew: a timeout in a step now means it shrank
    too far."""
    _collective_shrunk: bool = False
    """The collective timeout shrank since it last grew: so for a timeout outside steps."""
    _last_commit: dict[int, tuple[int, float]] = field(default_factory=dict)
    """Each worker's last commit: (generation, unix time)."""
    _window_steps: set[int] = field(default_factory=set)
    _window_longest: float = 0.0

    def __post_init__(self) -> None:
        self.collective = self.bounded(self.collective)
        self.step = self.bounded(self.step)

    def bounded(self, seconds: float) -> float:
        """``seconds`` within what the heartbeat timeout allows (a state file or a worker's
        heartbeat may come from a run with another)."""
        return min(max(seconds, self.heartbeat_timeout), MAX_TIMEOUT_GROWTH * self.heartbeat_timeout)

    # -- lengthening --------------------------------------------------------------------------

    def lengthen(self, phases: set[str], *, steps_timed: bool = True) -> str:
        """A collective ran out of time in each of ``phases`` while every member stayed alive:
        it was slow, not stuck on a dead peer (a hung one stops its heartbeats and is declared
        dead instead). Double its timeout, as TCP backs off its retransmission timer; returns
        what to add to the re-form's cause. ``steps_timed``: some member runs its steps under
        the step timeout (else it is left as it is, and not told)."""
        if not phases:
            return ""
        told = [self._doubled("collective")] if START in phases else []
        if not steps_timed:
            return "".join(told)
        if (STEP in phases and self._shrunk) or (START in phases and self._collective_shrunk):
            self.window *= WINDOW_GROWTH
        self._shrunk = False
        self._collective_shrunk &= START not in phases  # (it still stands where it did not grow)
        self._restart_window()
        told.append(self._doubled("step"))
        if self.step > self.collective:  # never the shorter: not told apart
            self.collective, self._collective_shrunk = self.step, False
        return "".join(told)

    def _doubled(self, which: str) -> str:
        """Double ``which`` ("step" or "collective"); what the cause says of it."""
        before = getattr(self, which)
        after = self.bounded(2 * before)
        if after == before:
            return f"; the {which} timeout stays at its limit, {after:g} s"
        setattr(self, which, after)
        return f"; {which} timeout now {after:g} s"

    def learn(self, collective: float, step: float) -> None:
        """What a member runs with, heard by a coordinator restarted without its state."""
        self.collective = self.bounded(max(self.collective, collective))
        self.step = self.bounded(max(self.step, step))

    # -- shrinking ----------------------------------------------------------------------------

    def note_commit(self, worker_id: int, generation: int, step: int, committed_at: float,
                    current: int, start_rounds: float | None = None) -> bool:
        """A worker committed ``step`` in ``generation`` (the job's is ``current``); True when
        that shrank a timeout. Only the current generation's new commits are measured: a
        history resent to a restarted coordinator, a finished worker's, or a step committed
        late for the generation before (spanning a heal) is not a step's time.
        ``start_rounds``: the largest a member of ``current`` reports (None: one reports
        none, and the collective timeout is left as it is)."""
        if generation != current:
            return False
        last = self._last_commit.get(worker_id)
        if last is not None and last[0] == generation and committed_at <= last[1]:
            return False  # a step of the same round (committed together), or one heard before
        self._last_commit[worker_id] = (generation, committed_at)
        if last is None or last[0] != generation:
            return False  # its first commit here: nothing to measure from
        self._window_steps.add(step)
        self._window_longest = max(self._window_longest, committed_at - last[1])
        if len(self._window_steps) < self.window:
            return False
        longest, steps = self._window_longest, len(self._window_steps)
        self._restart_window()
        measured = f"the last {steps} steps came at most {longest:.3g} s apart"
        shrunk = self._shrink("step", SHRINK_MARGIN * longest, step, committed_at,
                              f"{measured} (x {SHRINK_MARGIN:g})")
        if start_rounds:
            shrunk |= self._shrink(
                "collective", SHRINK_MARGIN * longest * start_rounds, step, committed_at,
                f"a start sends at most {start_rounds:.3g} times a step's bytes, and {measured} "
                f"(x {SHRINK_MARGIN:g} x {start_rounds:.3g})")
        return shrunk

    def _shrink(self, which: str, seconds: float, step: int, at: float, why: str) -> bool:
        """Shrink ``which`` ("step" or "collective") to ``seconds`` (a tenth of a second up,
        within bounds, the collective timeout not below the step timeout) if that halves it
        at least; the change is kept and told."""
        after = self.bounded(math.ceil(seconds * 10) / 10)
        if which == "collective":
            after = max(after, self.step)
        if after > getattr(self, which) / 2:
            return False
        setattr(self, which, after)
        setattr(self, "_shrunk" if which == "step" else "_collective_shrunk", True)
        self.changes.append({"time": at, "step": step, f"{which}_timeout": after,
                             "cause": f"{which} timeout now {after:g} s: {why}"})
        return True

    def _restart_window(self) -> None:
        self._window_steps, self._window_longest = set(), 0.0

    # -- durable state ------------------------------------------------------------------------

    def export(self) -> dict:
        return {"collective_timeout": self.collective, "step_timeout": self.step,
                "timeout_window": self.window, "timeout_shrunk": self._shrunk,
                "collective_timeout_shrunk": self._collective_shrunk,
                "timeout_changes": [dict(change) for change in self.changes]}

    def restore(self, state: dict) -> None:
        """Take back ``export``'s (an older state file has the collective timeout alone, which
        its workers used for their steps too)."""
        self.collective = self.bounded(float(state.get("collective_timeout", 0.0)))
        self.step = self.bounded(float(state.get("step_timeout", self.collective)))
        self.window = int(state.get("timeout_window", SHRINK_WINDOW))
        self._shrunk = bool(state.get("timeout_shrunk", False))
        self._collective_shrunk = bool(state.get("collective_timeout_shrunk", False))
        self.changes = [dict(change) for change in state.get("timeout_changes", [])]

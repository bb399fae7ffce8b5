"""The membership rules, driven with a fake clock: no network, no sleeping."""

import json

import pytest

from shoal import _protocol
from shoal.coordinator import Membership
from shoal.coordinator.membership import MAX_TIMEOUT_GROWTH
from shoal.coordinator.timeouts import SHRINK_WINDOW, START, STEP, WINDOW_GROWTH


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def started(workers=4, min_workers=1, timeout=5.0, times_steps=True):
    """A running job of ``workers``; ``times_steps``: its workers run their steps under the
    step timeout (as a heartbeat says; not async's)."""
    clock = Clock()
    membership = Membership(expected_workers=workers, min_workers=min_workers,
                            heartbeat_timeout=timeout, clock=clock)
    for worker in range(workers):
        membership.join(worker, "host", 100 + worker)
    for worker in range(workers):
        membership.heartbeat(worker, {"times_steps": times_steps})
    return membership, clock


def test_first_generation_waits_for_every_expected_worker():
    clock = Clock()
    membership = Membership(expected_workers=2, min_workers=1, clock=clock)
    membership.join(0, "h", 1)
    assert membership.current is None
    membership.join(1, "h", 2)
    assert membership.current.members == [0, 1]
    assert membership.status == "running"


def test_dead_worker_forms_next_generation_of_survivors():
    membership, clock = started()
    clock.now += 1
    membership.report_exit(2, "killed by SIGKILL")
    assert membership.current.number == 2
    assert membership.current.members == [0, 1, 3]
    [change] = membership.membership_changes()
    assert change["members_before"] == [0, 1, 2, 3] and change["members_after"] == [0, 1, 3]
    assert "SIGKILL" in change["cause"]


def test_recovery_is_measured_from_death_to_next_commit_of_new_generation():
    membership, clock = started(workers=2)
    membership.report_exit(1, "killed", at=clock.now)
    membership.heartbeat(0, {"commits": [[7, 2, clock.now + 0.4, 0.5]]})
    [change] = membership.membership_changes()
    assert change["recovery_seconds"] == pytest.approx(0.4)


def advance(membership, clock, seconds, step=0.05):
    """Let time pass with the coordinator ticking, as its server does."""
    for _ in range(round(seconds / step)):
        clock.now += step
        membership.tick()


def test_silent_worker_is_declared_dead_after_heartbeat_timeout():
    membership, clock = started(workers=3, timeout=5.0)
    advance(membership, clock, 4.0)
    for worker in (0, 1):
        membership.heartbeat(worker, {})
    membership.tick()
    assert membership.current.number == 1
    advance(membership, clock, 1.5)
    assert membership.current.members == [0, 1]
    assert membership.heartbeat(2, {})["evicted"] is True


def test_workers_silenced_together_leave_in_one_generation():
    """A cut-off host: its workers' last heartbeats differ by a fraction of an interval."""
    membership, clock = started(workers=4, timeout=2.0)
    clock.now += 0.1
    membership.heartbeat(2, {})  # worker 3 fell silent 0.1 s before worker 2
    for _ in range(60):  # 3 s of ticks, the survivors beating every 0.25 s
        advance(membership, clock, 0.05)
        if round(clock.now * 20) % 5 == 0:
            for worker in (0, 1):
                membership.heartbeat(worker, {})
    assert [g.members for g in membership._generations] == [[0, 1, 2, 3], [0, 1]]
    [change] = membership.membership_changes()
    assert "worker 2" in change["cause"] and "worker 3" in change["cause"]


def test_a_crash_does_not_wait_for_a_quiet_member():
    membership, clock = started(workers=3, timeout=2.0)
    advance(membership, clock, 1.5)  # nobody has beaten for 1.5 s: all quiet
    membership.report_exit(1, "killed by SIGKILL")
    assert membership.current.members == [0, 2]


def test_failure_report_waits_until_every_member_proves_it_is_alive():
    membership, clock = started(workers=3)
    clock.now += 1
    membership.report_failure(0, 1, "RuntimeError: [gloo] Timed out waiting 2000ms for recv\n  (stack)")
    assert membership.current.number == 1  # 1 and 2 have not spoken since
    membership.report_failure(1, 1, "connection reset")
    membership.heartbeat(2, {})
    assert membership.current.number == 2
    assert membership.current.members == [0, 1, 2]
    # The change names what the first reporter saw: with everyone alive, the only clue to why
    assert membership.membership_changes()[-1]["cause"] == (
        "collective failed; all members alive; worker 0: RuntimeError: [gloo] Timed out waiting 2000ms for recv"
        "; collective timeout now 10 s; step timeout now 10 s")


def reform_after(membership, clock, *details):
    """Every member reports ``details[rank]`` for the current generation: the next one forms."""
    clock.now += 1
    number = membership.current.number
    for worker, detail in zip(membership.current.members, details):
        membership.report_failure(worker, number, detail)
    assert membership.current.number == number + 1
    return membership.current


GLOO_TIMEOUT = "RuntimeError: [../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation to complete"


def test_a_collective_that_timed_out_among_live_members_doubles_the_next_timeout():
    """A slow link or a straggler, not a dead peer: the next generation waits twice as long,
    up to MAX_TIMEOUT_GROWTH heartbeat timeouts. A peer that left (a closed connection) is
    no reason to wait longer."""
    membership, clock = started(workers=2, timeout=5.0)
    assert membership.current.collective_timeout == 5.0
    assert reform_after(membership, clock, "connection closed by peer", "reset").collective_timeout == 5.0
    # what else times out is not the group's operation: the store, a checkpoint's writing
    assert reform_after(membership, clock, "DistStoreError: Socket Timeout",
                        "OSError: [Errno 110] Connection timed out").collective_timeout == 5.0
    # one timeout among the reports is enough: the peer it waited for saw the others leave
    assert reform_after(membership, clock, "Connection closed by peer", GLOO_TIMEOUT).collective_timeout == 10.0
    timeouts = [reform_after(membership, clock, GLOO_TIMEOUT, GLOO_TIMEOUT).collective_timeout for _ in range(6)]
    assert timeouts == [20.0, 40.0, 80.0, 160.0, 160.0, 160.0] and MAX_TIMEOUT_GROWTH * 5.0 == 160.0
    assert membership.membership_changes()[-1]["cause"].endswith(
        "; the collective timeout stays at its limit, 160 s; the step timeout stays at its limit, 160 s")


def test_a_hung_member_does_not_lengthen_the_timeout():
    """A SIGSTOPped member's peers time out too, but it stops beating: it is declared dead
    and the survivors' generation keeps the heartbeat timeout."""
    membership, clock = started(workers=3, timeout=2.0)
    clock.now += 0.1
    membership.report_failure(0, 1, "Timed out waiting 2000ms for recv")
    membership.report_failure(1, 1, "Timed out waiting 2000ms for recv")
    for _ in range(5):  # workers 0 and 1 keep beating; worker 2 says nothing
        advance(membership, clock, 0.5)
        membership.heartbeat(0, {})
        membership.heartbeat(1, {})
    assert membership.current.members == [0, 1] and membership.current.collective_timeout == 2.0


def test_a_restarted_coordinator_keeps_the_lengthened_timeout():
    membership, clock = started(workers=2, timeout=5.0)
    reform_after(membership, clock, GLOO_TIMEOUT, GLOO_TIMEOUT)
    restarted = Membership(expected_workers=2, min_workers=1, heartbeat_timeout=5.0, clock=clock)
    restarted.restore_state(json.loads(json.dumps(membership.export_state())))
    assert restarted.current.collective_timeout == 10.0
    restarted.heartbeat(0, {"generation": 2, "members": [0, 1]})
    restarted.heartbeat(1, {"generation": 2, "members": [0, 1]})
    assert reform_after(restarted, clock, GLOO_TIMEOUT, GLOO_TIMEOUT).collective_timeout == 20.0
    # one restarted with a shorter --heartbeat-timeout keeps it within its own limit
    shorter = Membership(expected_workers=2, min_workers=1, heartbeat_timeout=0.5, clock=clock)
    shorter.restore_state(json.loads(json.dumps(restarted.export_state())))
    assert shorter.timeouts.collective == 16.0


def test_a_coordinator_restarted_without_its_state_learns_the_timeout_from_the_workers():
    """It knows only the heartbeat timeout; the members run their generation with 40 s,
    and say so in their heartbeats. (Else the slow link's next re-form would start over.)"""
    clock = Clock()
    membership = Membership(expected_workers=2, min_workers=1, heartbeat_timeout=5.0, clock=clock)
    membership.heartbeat(0, {"generation": 4, "members": [0, 1], "collective_timeout": 40.0})
    membership.heartbeat(1, {"generation": 4, "members": [0, 1], "collective_timeout": 40.0})
    assert membership.current.collective_timeout == 40.0
    assert reform_after(membership, clock, GLOO_TIMEOUT, GLOO_TIMEOUT).collective_timeout == 80.0


def reform_after_timeout(membership, clock, phase):
    """Both members' ``phase`` ran out of time (one's report says where, the other's not)."""
    clock.now += 1
    number = membership.current.number
    membership.report_failure(0, number, GLOO_TIMEOUT, phase)
    membership.report_failure(1, number, "RuntimeError: Connection closed by peer")
    assert membership.current.number == number + 1
    return membership.current


def test_a_step_that_timed_out_lengthens_the_step_timeout_and_one_outside_steps_the_collective_timeout():
    """A step's collectives and the rest (a heal carries two to three times a step's bytes)
    have timeouts of their own; the collective timeout is never the shorter. One outside a
    step lengthens both (the first step over so slow a link would time out next). A report
    that does not say where (a worker from before step timeouts) is taken for outside a step."""
    membership, clock = started(workers=2, timeout=5.0)
    assert (membership.current.collective_timeout, membership.current.step_timeout) == (5.0, 5.0)
    after_step = reform_after_timeout(membership, clock, STEP)
    assert (after_step.collective_timeout, after_step.step_timeout) == (10.0, 10.0)
    assert membership.membership_changes()[-1]["cause"].endswith("; step timeout now 10 s")
    after_heal = reform_after_timeout(membership, clock, START)
    assert (after_heal.collective_timeout, after_heal.step_timeout) == (20.0, 20.0)
    assert membership.membership_changes()[-1]["cause"].endswith(
        "; collective timeout now 20 s; step timeout now 20 s")
    commit_steps(membership, clock, SHRINK_WINDOW + 1, 0.5)  # quick steps: back to 5 s
    after_step = reform_after_timeout(membership, clock, STEP)  # the collective timeout stays
    assert (after_step.collective_timeout, after_step.step_timeout) == (20.0, 10.0)
    unsaid = reform_after_timeout(membership, clock, None)
    assert (unsaid.collective_timeout, unsaid.step_timeout) == (40.0, 20.0)
    assert membership.heartbeat(0, {})["step_timeout"] == 20.0


def test_without_a_member_that_times_its_steps_the_step_timeout_is_left_alone():
    """async's workers (and workers from before step timeouts) run no step under it: a
    timeout doubles the collective timeout alone, the cause names nothing else, and quick
    commits shrink nothing."""
    membership, clock = started(workers=2, timeout=5.0, times_steps=False)
    after = reform_after_timeout(membership, clock, START)
    assert (after.collective_timeout, after.step_timeout) == (10.0, 5.0)
    assert membership.membership_changes()[-1]["cause"].endswith("; collective timeout now 10 s")
    membership.timeouts.step = 20.0  # as if it had grown
    commit_steps(membership, clock, 3 * SHRINK_WINDOW, 0.1)
    assert membership.timeouts.step == 20.0 and membership.timeout_changes() == []


def commit_steps(membership, clock, steps, seconds_apart, first=0, start_rounds=None):
    """Both members commit ``steps`` steps of the current generation, ``seconds_apart``;
    ``start_rounds`` (by worker): what each one's heartbeats say a start sends, in a step's
    bytes (else they say nothing)."""
    generation = membership.current.number
    for step in range(first, first + steps):
        clock.now += seconds_apart
        for worker in (0, 1):
            said = {} if start_rounds is None else {"start_rounds": start_rounds[worker]}
            membership.heartbeat(worker, {"commits": [[step, generation, clock.now + worker * 0.01, 0.1]], **said})


def test_the_step_timeout_shrinks_again_once_steps_are_quick():
    """A straggler's episode doubled it twice; a window of steps that came 0.5 s apart
    brings it back to the heartbeat timeout (4 x 0.5 s is less), and says so."""
    membership, clock = started(workers=2, timeout=5.0)
    reform_after_timeout(membership, clock, STEP)
    reform_after_timeout(membership, clock, STEP)
    assert membership.timeouts.step == 20.0
    commit_steps(membership, clock, SHRINK_WINDOW - 1, 0.5)
    assert membership.timeouts.step == 20.0  # not yet a whole window of intervals
    commit_steps(membership, clock, 2, 0.5, first=SHRINK_WINDOW - 1)
    assert membership.timeouts.step == 5.0
    assert membership.heartbeat(0, {})["step_timeout"] == 5.0
    [change] = membership.timeout_changes()
    assert change["step_timeout"] == 5.0 and change["cause"] == (
        f"step timeout now 5 s: the last {SHRINK_WINDOW} steps came at most 0.5 s apart (x 4)")
    assert membership.record().timeout_changes == [change]
    # the collective timeout (a heal's, a checkpoint's) shrinks only by what the members say
    # a start sends against a step's bytes, which these say nothing of
    assert membership.timeouts.collective == 20.0


def test_the_collective_timeout_shrinks_by_what_a_start_sends_against_a_steps_bytes():
    """Timeouts outside steps (a heal over a slow link) doubled both four times. Steps now
    come 0.25 s apart and the members say a start sends at most 3 and 6 times a step's
    bytes: the window brings the step timeout back to the heartbeat timeout, and the
    collective timeout to 4 x 0.25 s x 6, which the next generation gets."""
    membership, clock = started(workers=2, timeout=1.0)
    for _ in range(4):
        reform_after_timeout(membership, clock, START)
    assert (membership.timeouts.collective, membership.timeouts.step) == (16.0, 16.0)
    commit_steps(membership, clock, SHRINK_WINDOW + 1, 0.25, start_rounds={0: 3.0, 1: 6.0})
    assert (membership.timeouts.collective, membership.timeouts.step) == (6.0, 1.0)
    step_change, collective_change = membership.timeout_changes()
    assert step_change["step_timeout"] == 1.0
    assert collective_change["collective_timeout"] == 6.0 and collective_change["cause"] == (
        f"collective timeout now 6 s: a start sends at most 6 times a step's bytes, and the last "
        f"{SHRINK_WINDOW} steps came at most 0.25 s apart (x 4 x 6)")
    clock.now += 1
    membership.report_exit(1, "killed")
    assert (membership.current.collective_timeout, membership.current.step_timeout) == (6.0, 1.0)


def test_the_collective_timeout_stays_while_a_member_says_nothing_of_a_start():
    """A member that sent nothing yet, or one from before, does not say what a start sends:
    without its link measured, only the step timeout shrinks. Nor does the collective one
    shrink below the step timeout, or by less than half."""
    membership, clock = started(workers=2, timeout=1.0)
    for _ in range(4):
        reform_after_timeout(membership, clock, START)
    commit_steps(membership, clock, SHRINK_WINDOW + 1, 0.25, start_rounds={0: 3.0, 1: 0})
    assert (membership.timeouts.collective, membership.timeouts.step) == (16.0, 1.0)
    commit_steps(membership, clock, SHRINK_WINDOW, 0.25, first=1000, start_rounds={0: 12.0, 1: 1.0})
    assert membership.timeouts.collective == 16.0  # 4 x 0.25 s x 12: more than half
    commit_steps(membership, clock, SHRINK_WINDOW, 0.25, first=2000, start_rounds={0: 0.5, 1: 0.5})
    assert membership.timeouts.collective == 1.0  # 0.5 s: not below the step timeout


def test_a_timeout_outside_steps_after_the_collective_timeout_shrank_makes_the_next_window_longer():
    """The collective timeout shrank too far (a heal's link was slower than the steps'): it
    doubles as always, and the next shrink waits for a window four times as long. A restarted
    coordinator keeps that it shrank."""
    membership, clock = started(workers=2, timeout=1.0)
    for _ in range(4):
        reform_after_timeout(membership, clock, START)
    commit_steps(membership, clock, SHRINK_WINDOW + 1, 0.25, start_rounds={0: 2.0, 1: 2.0})
    assert membership.timeouts.collective == 2.0
    restarted = Membership(expected_workers=2, min_workers=1, heartbeat_timeout=1.0, clock=clock)
    restarted.restore_state(json.loads(json.dumps(membership.export_state())), membership.commits_by_worker())
    for shrunk in (membership, restarted):
        for worker in (0, 1):
            shrunk.heartbeat(worker, {"times_steps": True})
        after = reform_after_timeout(shrunk, clock, START)
        assert (after.collective_timeout, shrunk.timeouts.window) == (4.0, SHRINK_WINDOW * WINDOW_GROWTH)
    # a step's timeout in between, which leaves the collective timeout where it shrank, does
    # not forget that it shrank
    membership, clock = started(workers=2, timeout=1.0)
    for _ in range(4):
        reform_after_timeout(membership, clock, START)
    commit_steps(membership, clock, SHRINK_WINDOW + 1, 0.25, start_rounds={0: 3.0, 1: 3.0})
    assert (membership.timeouts.collective, membership.timeouts.step) == (3.0, 1.0)
    after = reform_after_timeout(membership, clock, STEP)  # the step timeout shrank too far
    assert (after.collective_timeout, after.step_timeout, membership.timeouts.window) == (
        3.0, 2.0, SHRINK_WINDOW * WINDOW_GROWTH)
    reform_after_timeout(membership, clock, START)  # and so did the collective one
    assert membership.timeouts.window == SHRINK_WINDOW * WINDOW_GROWTH ** 2


def test_the_step_timeout_shrinks_only_by_half_or_more_and_never_below_what_steps_take():
    membership, clock = started(workers=2, timeout=1.0)
    for _ in range(5):
        reform_after_timeout(membership, clock, STEP)
    assert membership.timeouts.step == 32.0
    commit_steps(membership, clock, SHRINK_WINDOW + 1, 5.0)  # 4 x 5 s: more than half of 32 s
    assert membership.timeouts.step == 32.0 and membership.timeout_changes() == []
    # (a window starts with the other member's interval of the step that ended the last)
    commit_steps(membership, clock, 2 * SHRINK_WINDOW, 2.0, first=SHRINK_WINDOW + 1)
    assert membership.timeouts.step == 8.0  # 4 x 2 s


def test_steps_committed_together_are_one_interval():
    """localsgd commits a round's steps at once: only the time between rounds is measured
    (else a round's zero intervals would shrink the timeout below a round's exchange)."""
    membership, clock = started(workers=2, timeout=1.0)
    for _ in range(3):
        reform_after_timeout(membership, clock, STEP)
    generation = membership.current.number
    for round_ in range(SHRINK_WINDOW - 1):
        clock.now += 1.0
        steps = [[round_ * 10 + i, generation, clock.now, 0.1] for i in range(10)]
        membership.heartbeat(0, {"commits": steps})
    assert membership.timeouts.step == 8.0  # 99 rounds: 98 intervals
    clock.now += 1.0
    membership.heartbeat(0, {"commits": [[990 + i, generation, clock.now, 0.1] for i in range(10)]})
    clock.now += 1.0
    membership.heartbeat(0, {"commits": [[1000, generation, clock.now, 0.1]]})
    assert membership.timeouts.step == 4.0  # 4 x 1 s between rounds


def test_a_step_timeout_after_a_shrink_makes_the_next_window_longer():
    """Steps that are quick for a window and then, once, slow (a checkpoint's staging, say):
    the shrink was too far. The timeout doubles as always, and the next shrink waits for a
    window four times as long, which a slow step now and then falls into: a job with uneven
    steps pays a few re-forms, not two per slow step."""
    membership, clock = started(workers=2, timeout=1.0)
    for _ in range(4):
        reform_after_timeout(membership, clock, STEP)
    commit_steps(membership, clock, SHRINK_WINDOW + 1, 1.0)
    assert membership.timeouts.step == 4.0
    reform_after_timeout(membership, clock, STEP)
    longer = SHRINK_WINDOW * WINDOW_GROWTH
    assert membership.timeouts.step == 8.0 and membership.timeouts.window == longer
    commit_steps(membership, clock, longer - 1, 0.25, first=1000)
    assert membership.timeouts.step == 8.0
    commit_steps(membership, clock, 2, 0.25, first=1000 + longer - 1)
    assert membership.timeouts.step == 1.0  # 4 x 0.25 s, and not below the heartbeat timeout
    assert membership.timeout_changes()[-1]["cause"].startswith(f"step timeout now 1 s: the last {longer} steps")


def test_a_resent_history_is_not_measured():
    """Workers resend their whole history to a restarted coordinator (and with their finish):
    quick steps of an earlier generation must not shrink the timeout of slow ones now."""
    membership, clock = started(workers=2, timeout=5.0)
    commit_steps(membership, clock, 3 * SHRINK_WINDOW, 0.1)  # generation 1: quick
    reform_after_timeout(membership, clock, STEP)
    reform_after_timeout(membership, clock, STEP)
    assert (membership.current.number, membership.timeouts.step) == (3, 20.0)
    commit_steps(membership, clock, 5, 12.0, first=3 * SHRINK_WINDOW)  # generation 3: slow
    history = [[step, 1, 2000.0 + step * 0.1, 0.1] for step in range(3 * SHRINK_WINDOW)]
    for worker in (0, 1):
        membership.heartbeat(worker, {"commits": history})
    restarted = Membership(expected_workers=2, min_workers=1, heartbeat_timeout=5.0, clock=clock)
    restarted.restore_state(json.loads(json.dumps(membership.export_state())), membership.commits_by_worker())
    for worker in (0, 1):
        restarted.heartbeat(worker, {"generation": 3, "members": [0, 1], "commits": history})
    assert membership.timeouts.step == restarted.timeouts.step == 20.0
    assert membership.timeout_changes() == restarted.timeout_changes() == []


def test_a_restarted_coordinator_keeps_the_step_timeout_and_its_shrinks():
    membership, clock = started(workers=2, timeout=1.0)
    for _ in range(3):
        reform_after_timeout(membership, clock, STEP)
    commit_steps(membership, clock, SHRINK_WINDOW + 1, 0.5)
    assert membership.timeouts.step == 2.0 and len(membership.timeout_changes()) == 1
    restarted = Membership(expected_workers=2, min_workers=1, heartbeat_timeout=1.0, clock=clock)
    restarted.restore_state(json.loads(json.dumps(membership.export_state())), membership.commits_by_worker())
    assert restarted.timeouts.step == 2.0 and restarted.timeout_changes() == membership.timeout_changes()
    assert (restarted.timeouts.collective, restarted.timeouts.window) == (8.0, SHRINK_WINDOW)
    # one restarted without its state learns the members' from their heartbeats
    bare = Membership(expected_workers=2, min_workers=1, heartbeat_timeout=1.0, clock=clock)
    for worker in (0, 1):
        bare.heartbeat(worker, {"generation": 4, "members": [0, 1], "collective_timeout": 8.0,
                                "step_timeout": 2.1})
    assert (bare.current.collective_timeout, bare.current.step_timeout) == (8.0, 2.1)


def test_too_few_workers_fails_the_job_with_a_reason():
    membership, _ = started(workers=3, min_workers=2)
    membership.report_exit(0, "exited with code 1")
    assert membership.status == "running"
    membership.report_exit(1, "exited with code 1")
    assert membership.status == "failed"
    assert "--min-workers 2" in membership.reason


def test_a_step_committed_again_by_a_later_generation_is_logged_once():
    membership, clock = started(workers=2)
    membership.heartbeat(0, {"commits": [[0, 1, clock.now, 0.1], [1, 1, clock.now, 0.1]]})
    membership.report_exit(1, "killed")
    membership.heartbeat(0, {"commits": [[1, 2, clock.now, 0.3]]})
    steps = membership.committed_steps()
    assert [(s, g.number) for s, g in steps] == [(0, 1), (1, 2)]
    assert membership.step_losses() == {1: 0.3}  # step 0 lacks worker 1's share


def test_newcomer_forms_a_generation_unless_at_max_workers():
    membership, _ = started(workers=2)
    membership.join(None, "h", 9)
    assert membership.current.members == [0, 1, 2]
    capped, _ = started(workers=2)
    capped.max_workers = 2
    capped.join(None, "h", 9)
    assert capped.current.members == [0, 1]


def test_a_restarted_coordinator_adopts_the_running_generation():
    clock = Clock()
    membership = Membership(expected_workers=3, min_workers=1, heartbeat_timeout=5.0, clock=clock)
    reply = membership.heartbeat(1, {"generation": 4, "members": [0, 1, 2], "committed_step": 99})
    assert reply == {"evicted": False, "generation": 4, "status": "running",
                     "incarnation": membership.incarnation, "step_timeout": 5.0}
    assert membership.current.members == [0, 1, 2]
    for _ in range(2):  # workers 0 and 1 keep beating; worker 2 never comes back
        advance(membership, clock, 3)
        membership.heartbeat(0, {"generation": 4, "members": [0, 1, 2]})
        membership.heartbeat(1, {"generation": 4, "members": [0, 1, 2]})
    membership.tick()
    assert membership.current.number == 5 and membership.current.members == [0, 1]
    assert membership.heartbeat(7, {"generation": 4, "members": [0, 1, 2]})["evicted"] is True
    # It says when it heard each member of the generation it took over, and not worker 2
    assert membership.snapshot()["takeover"] == {"generation": 4, "members": [0, 1, 2],
                                                 "heard": {"1": 0.0, "0": 3.0}}


def test_a_join_asked_again_by_the_same_process_is_answered_again_and_another_is_refused():
    """A worker's client asks again when an answer is late (with a successor listed, after
    10 s): its join had been taken, and must not now be refused as a live member's."""
    membership, _ = started(workers=2)
    assert membership.join(1, "host", 101) == 1  # as started() joined it
    assert (membership.current.number, membership.current.members) == (1, [0, 1])  # nothing re-formed
    with pytest.raises(ValueError, match="worker 1 is already a live member"):
        membership.join(1, "host", 102)  # another process with its id


def test_a_coordinator_that_took_over_before_the_first_generation_forms_it_for_the_workers_that_joined():
    """Node 0 lost after the workers joined it, before the first generation formed: node 1's
    coordinator counts node 0's worker out, and the others' heartbeats (generation 0) join
    them here. (Before, it answered them evicted, and the job failed.)"""
    clock = Clock()
    membership = Membership(expected_workers=3, min_workers=1, heartbeat_timeout=5.0, clock=clock)
    membership.report_exit_by_id(0, "lost with node 0")
    waiting = {"generation": 0, "members": [], "host": "b", "pid": 11, "launcher": "l1"}
    assert membership.heartbeat(1, waiting)["evicted"] is False
    assert membership.current is None  # worker 2 is still expected
    assert membership.heartbeat(2, {**waiting, "pid": 12})["evicted"] is False
    assert membership.current.number == 1 and membership.current.members == [1, 2]
    assert membership.snapshot()["workers"]["2"]["pid"] == 12
    assert membership.heartbeat(3, waiting)["evicted"] is True  # too late: the job runs without it


def test_a_restarted_coordinator_forms_the_next_generation_for_members_that_left_theirs():
    """The members' generation broke while the coordinator was down (localsgd's round-end
    wait reads the coordinator's store): their failure reports reached nobody, or the new
    coordinator before it knew them. Their heartbeats say they left generation 4, so it
    forms 5. (Before, it adopted 4 with every member alive and heartbeating, and they
    waited for a newer generation until the job was killed.)"""
    clock = Clock()
    membership = Membership(expected_workers=2, min_workers=1, heartbeat_timeout=5.0, clock=clock)
    membership.report_failure(0, 4, "store unreachable")  # before any heartbeat: unknown
    left = {"generation": 4, "members": [0, 1], "failed_generation": 4,
            "failure_detail": "RuntimeError: [/__w/pytorch/pytorch/third_party/gloo/gloo/transport/"
                              "tcp/unbound_buffer.cc:78] Timed out waiting 2000ms for recv\n(more)"}
    membership.heartbeat(0, left)  # adopts 4, whose members are alive as of now, then leaves it
    assert membership.current.number == 5 and membership.current.members == [0, 1]
    # the heartbeat carries what the lost report said (its first line, without where in C++;
    # these heartbeats do not say their steps run under the step timeout: it is left alone)
    assert membership.membership_changes()[-1]["cause"] == (
        "collective failed; all members alive; worker 0: RuntimeError: Timed out waiting 2000ms for recv"
        "; collective timeout now 10 s")
    clock.now += 0.25
    membership.heartbeat(1, left)  # still waiting to connect: an old generation's failure
    assert membership.current.number == 5


def test_a_restarted_coordinator_rebuilds_the_ledger_from_resent_histories():
    """Steps committed before the restart, in generations it never formed, are recovered."""
    clock = Clock()
    membership = Membership(expected_workers=2, min_workers=1, clock=clock)
    assert Membership(expected_workers=2, min_workers=1).incarnation != membership.incarnation
    history = {"generation": 3, "members": [0, 2],
               "commits": [[0, 1, clock.now, 0.1], [1, 2, clock.now, 0.2], [1, 3, clock.now, 0.3],
                           [2, 3, clock.now, 0.4]],
               "generations": {"1": [0, 1, 2], "2": [0, 1], "3": [0, 2]}}
    membership.heartbeat(0, history)
    membership.heartbeat(0, history)  # sent twice: nothing counts twice
    record = membership.record()
    assert [(s.step, s.generation, s.members) for s in record.steps] == [
        (0, 1, [0, 1, 2]), (1, 3, [0, 2]), (2, 3, [0, 2])]
    assert record.losses == {}  # worker 2's shares are still missing
    membership.heartbeat(2, {**history, "commits": [[1, 3, clock.now, 0.5], [2, 3, clock.now, 0.6]]})
    assert membership.record().losses == pytest.approx({1: 0.8, 2: 1.0})


def test_below_min_workers_waits_for_an_expected_rejoin_instead_of_failing():
    membership, _ = started(workers=2, min_workers=2)
    membership.expect_rejoin(1)
    membership.report_exit(1, "killed")
    assert membership.status == "running" and membership.current.number == 1  # paused
    membership.join(1, "host", 999)
    assert membership.current.number == 2 and membership.current.members == [0, 1]


def test_a_remote_launchers_exit_by_pid_names_the_worker_and_may_announce_its_restart():
    """`shoal run --coordinator` knows its workers' pids, not their ids."""
    membership, _ = started(workers=2, min_workers=2)
    assert membership.report_exit_of_process("host", 101, "killed", restarting=True) == 1
    assert membership.status == "running" and membership.current.number == 1  # paused for it
    assert membership.report_exit_of_process("host", 555, "exited with code 1", restarting=True) is None
    membership.withdraw_rejoin(1)  # its restart died before joining, and none is left
    assert membership.status == "failed" and "fewer than --min-workers 2" in membership.reason


def test_an_exit_by_pid_is_the_reporting_launchers_worker_even_where_hosts_and_pids_repeat():
    """Two containers on one machine (host networking): one host name, pids counted apart."""
    membership = Membership(expected_workers=2, min_workers=1, clock=Clock())
    membership.join(0, "node", 7, launcher="node/1/aaaa")
    membership.join(1, "node", 7, launcher="node/1/bbbb")
    assert membership.report_exit_of_process("node", 7, "killed", launcher="node/1/aaaa") == 0
    assert membership.current.members == [1]
    assert membership.snapshot()["workers"]["1"]["alive"]


def test_a_restart_that_never_joins_stops_holding_the_job_after_a_while():
    """Its launcher (or machine) was lost after announcing it: the paused job fails rather
    than waiting forever."""
    membership, clock = started(workers=2, min_workers=2)
    membership.report_exit_of_process("host", 101, "killed", restarting=True)
    for _ in range(28):  # worker 0 keeps beating for 112 s: the job stays paused for the restart
        advance(membership, clock, 4, step=0.5)
        membership.heartbeat(0, {"generation": 1, "members": [0, 1]})
    assert membership.status == "running" and membership.current.number == 1
    for _ in range(3):
        advance(membership, clock, 4, step=0.5)
        membership.heartbeat(0, {"generation": 1, "members": [0, 1]})
    assert membership.status == "failed" and "fewer than --min-workers 2" in membership.reason


def test_a_taken_over_members_process_is_known_from_its_own_heartbeat():
    """A coordinator restarted without a state file learns the members from one heartbeat
    (placeholders), and each one's host, pid and launcher from its own: exits by pid match."""
    membership = Membership(expected_workers=2, min_workers=1, clock=Clock())
    membership.heartbeat(0, {"generation": 3, "members": [0, 1], "host": "a", "pid": 10, "launcher": "a/1/x"})
    membership.heartbeat(1, {"generation": 3, "members": [0, 1], "host": "b", "pid": 20, "launcher": "b/1/y"})
    assert membership.report_exit_of_process("b", 20, "killed", launcher="b/1/y") == 1
    assert membership.current.members == [0]


def test_a_process_gone_before_joining_is_no_longer_waited_for():
    clock = Clock()
    membership = Membership(expected_workers=2, min_workers=1, clock=clock)
    membership.join(0, "h", 1)
    assert membership.report_exit_of_process("h", 2, "exited with code 1") is None
    assert membership.current.members == [0]  # formed without the one that will not come
    alone = Membership(expected_workers=1, min_workers=1, clock=clock)
    alone.report_exit_of_process("h", 2, "exited with code 1")
    assert alone.status == "failed"
    assert alone.reason == "a worker on h (pid 2) exited before joining: exited with code 1"


def test_a_coordinator_restarted_without_state_does_not_count_out_a_worker_it_has_not_heard_yet():
    """Restarted without a state file, the coordinator knows no worker until the heartbeats
    come. An exit reported first (by pid, or by id from a launcher that knows it joined) is
    of a worker that joined its predecessor: not one gone before joining, which would lower
    the workers expected and, below --min-workers, fail a job that goes on."""
    clock = Clock()
    restarted = Membership(expected_workers=2, min_workers=2, heartbeat_timeout=5.0, clock=clock)
    assert restarted.report_exit_of_process("b", 20, "killed by SIGKILL", launcher="b/7/y") is None
    restarted.report_exit(1, "killed by SIGKILL", joined=True)
    assert restarted.status == "waiting" and restarted.expected_workers == 2
    restarted.heartbeat(0, {"generation": 3, "members": [0, 1], "host": "a", "pid": 10, "launcher": "a/1/x"})
    assert restarted.status == "running" and restarted.current.number == 3  # taken over
    # A launcher it admitted itself: its process gone before joining is not waited for
    fresh = Membership(expected_workers=3, min_workers=1, clock=clock)
    fresh.admit_launcher({"--task": "digits"}, "a/1/x")
    fresh.report_exit_of_process("a", 11, "exited with code 1", launcher="a/1/x")
    assert fresh.expected_workers == 2
    kept = json.loads(json.dumps(fresh.export_state()))
    again = Membership(expected_workers=3, min_workers=1, clock=clock)
    again.restore_state(kept)  # with its state file, it knows whom it admitted
    again.report_exit_of_process("a", 12, "exited with code 1", launcher="a/1/x")
    assert again.expected_workers == 2
    nodes = Membership(expected_workers=2, min_workers=1, clock=clock)
    nodes.report_exit(1, "exited with code 1")  # shoal run --nnodes: rank 1 died before joining
    assert nodes.expected_workers == 1
    # A launcher of an earlier version gives no id when admitted (but does in its reports),
    # and a state file of an earlier version names none: any launcher's process counts out
    older = Membership(expected_workers=3, min_workers=1, clock=clock)
    older.admit_launcher({"--task": "digits"})
    older.report_exit_of_process("a", 11, "exited with code 1", launcher="a/1/x")
    assert older.expected_workers == 2
    state = json.loads(json.dumps(fresh.export_state()))
    del state["admitted"]
    from_older_file = Membership(expected_workers=3, min_workers=1, clock=clock)
    from_older_file.restore_state(state)
    from_older_file.report_exit_of_process("b", 12, "exited with code 1", launcher="b/1/y")
    assert from_older_file.expected_workers == 2


def test_with_restarts_a_late_restart_announcement_still_pauses_the_job():
    """Worker 2 went quiet before it died: the silence verdict came before the launcher's
    exit report. The launcher's "restarting it" a moment later must still pause the job."""
    clock = Clock()
    membership = Membership(expected_workers=3, min_workers=3, heartbeat_timeout=2.0,
                            restarts=True, clock=clock)
    for worker in range(3):
        membership.join(worker, "host", 100 + worker)
    def beat(seconds):  # workers 0 and 1 beat, worker 2 is silent
        for _ in range(round(seconds / 0.05)):
            advance(membership, clock, 0.05)
            for worker in (0, 1):
                membership.heartbeat(worker, {})

    beat(2.5)
    assert not membership._workers[2].alive and membership.status == "running"
    membership.expect_rejoin(2)  # the launcher saw the process end and restarts it
    membership.report_exit(2, "killed by SIGKILL")
    beat(5.0)
    assert membership.status == "running"  # paused, waiting for the rejoin
    membership.join(2, "host", 200)
    assert membership.current.members == [0, 1, 2]


def test_with_restarts_the_job_fails_if_no_restart_is_announced():
    clock = Clock()
    membership = Membership(expected_workers=2, min_workers=2, heartbeat_timeout=2.0,
                            restarts=True, clock=clock)
    for worker in range(2):
        membership.join(worker, "host", 100 + worker)
    membership.report_exit(1, "killed by SIGKILL")
    assert membership.status == "running"
    for _ in range(50):
        advance(membership, clock, 0.05)
        membership.heartbeat(0, {})
    assert membership.status == "failed" and "--min-workers" in membership.reason


def test_a_stalled_coordinator_does_not_declare_everyone_dead():
    membership, clock = started(workers=2, timeout=2.0)
    clock.now += 10  # the coordinator itself could not run for 10 s
    membership.tick()
    assert membership.status == "running" and membership.current.number == 1
    advance(membership, clock, 2.5)  # but silence while it listens still counts
    assert not any(w.alive for w in membership._workers.values())
    advance(membership, clock, 2.5)  # after a heartbeat timeout for launchers to restart them
    assert membership.status == "failed"


def test_a_job_below_its_minimum_after_a_silence_waits_a_heartbeat_timeout_for_a_restart():
    """A standalone coordinator does not know which launchers restart their workers, and a
    hung worker's launcher kills it only once it reads the verdict: the job below
    --min-workers after a silence waits one heartbeat timeout for a restart to be announced,
    and pauses for the rejoin once it is."""
    clock = Clock()
    membership = Membership(expected_workers=2, min_workers=2, heartbeat_timeout=2.0, clock=clock)
    for worker in range(2):
        membership.join(worker, "host", 100 + worker)
    for _ in range(50):  # worker 1 hangs: declared dead after 2 s
        advance(membership, clock, 0.05)
        membership.heartbeat(0, {})
    assert not membership._workers[1].alive and membership.status == "running"
    membership.report_exit_of_process("host", 101, "killed by SIGKILL", restarting=True)
    for _ in range(100):
        advance(membership, clock, 0.05)
        membership.heartbeat(0, {})
    assert membership.status == "running"  # paused, waiting for the rejoin
    membership.join(1, "host", 102)
    assert membership.current.members == [0, 1]


def test_a_worker_that_finishes_while_the_coordinator_restarts_is_adopted():
    membership = Membership(expected_workers=2, min_workers=1, clock=Clock())
    for worker in (0, 1):
        membership.finish(worker, {"generation": 3, "members": [0, 1], "results": None})
    assert membership.status == "completed"


def test_a_member_that_finished_with_the_previous_coordinator_does_not_fail_the_job():
    """Worker 1 finished with the coordinator before this one and left; worker 0 finishes
    here. Worker 1 never speaks again and is declared dead, but it died after the last
    step: the job completes. (It failed with 'only 0 worker(s) remain', one chaos trial in
    about forty of localsgd's coordinator restarts, whose runs end within a second of it.)"""
    clock = Clock()
    membership = Membership(expected_workers=2, min_workers=1, heartbeat_timeout=2.0, clock=clock)
    membership.heartbeat(0, {"generation": 3, "members": [0, 1]})
    membership.finish(0, {"generation": 3, "members": [0, 1], "results": None})
    assert membership.status == "running"  # worker 1 may yet finish here
    advance(membership, clock, 3)
    assert membership.status == "completed", membership.reason


def test_launchers_of_one_job_must_agree_on_what_it_trains():
    membership = Membership(expected_workers=2, min_workers=1)
    spec = {"--task": "digits", "--lr": 0.05, "--steps": 20}
    membership.admit_launcher(spec)
    membership.admit_launcher(dict(spec))  # the same job from another host
    with pytest.raises(ValueError, match=r"^--lr: this job was started with 0.05, this launcher gives 0.5$"):
        membership.admit_launcher(spec | {"--lr": 0.5})
    with pytest.raises(ValueError, match=r"^--compress: .* with None, this launcher gives int8$"):
        membership.admit_launcher(spec | {"--compress": "int8"})
    assert membership.job_spec == spec


def test_a_launcher_of_another_shoal_protocol_is_refused_naming_both():
    membership = Membership(expected_workers=2, min_workers=1)
    spec = {"--task": "digits"}
    with pytest.raises(ValueError, match=r"^this launcher runs shoal 0.2.0 \(protocol 7\), the coordinator "
                                         r"shoal \S+ \(protocol \d+\): run one shoal version on every machine$"):
        membership.admit_launcher(spec, protocol=7, version="0.2.0")
    with pytest.raises(ValueError, match=r"^this launcher runs a shoal older than protocol 1 \(it sends no "
                                         r"protocol\), the coordinator"):
        membership.admit_launcher(spec, protocol=None)
    for wrong in (True, -1, "1", 1.0):  # what a request could say: only the number itself is ours
        with pytest.raises(ValueError, match="run one shoal version"):
            membership.admit_launcher(spec, protocol=wrong if wrong != 1.0 else _protocol.PROTOCOL + 0.0)
    assert membership.job_spec is None  # none became the job's
    membership.admit_launcher(spec, protocol=_protocol.PROTOCOL, version=_protocol.VERSION)
    assert membership.job_spec == spec


def test_a_finished_worker_outside_the_generation_does_not_count_as_waiting():
    """Worker 1 finished the last step; worker 0's collective then failed and it re-formed
    alone. Worker 1 is alive but done: forming again for it would only force worker 0 out of
    its group, once per evaluation (it did, generation after generation)."""
    membership, clock = started(workers=2)
    membership.finish(1, {})
    membership.report_failure(0, 1, "the replica comparison timed out")
    membership.heartbeat(0, {})
    assert membership.current.members == [0] and membership.current_number == 2
    for _ in range(3):
        clock.now += 1.0
        membership.heartbeat(0, {})
        membership.heartbeat(1, {})
        membership.tick()
    assert membership.current_number == 2


def test_a_worker_that_joins_as_the_job_ends_gets_no_generation_and_the_job_completes():
    """A restarted worker back while the members finish (they committed the last step): a
    generation of it and the members not yet finished would wait for peers that are gone.
    It is left out, and the job completes when the members have all finished."""
    membership, clock = started(workers=3)
    membership.finish(0, {})
    clock.now += 0.1
    membership.join(3, "host", 200)
    assert membership.current.number == 1 and membership.current.members == [0, 1, 2]
    membership.finish(1, {})
    membership.finish(2, {})
    assert membership.status == "completed"


@pytest.mark.parametrize("launcher", ["shoal train", "shoal run --coordinator"])
def test_a_worker_killed_after_it_finished_and_restarted_does_not_hold_up_the_end(launcher):
    """Worker 0 finished its part, then died (its launcher saw a non-zero exit) while the
    others were still finishing, and was started again. Its restart has nothing to do: the
    job completes when the others finish, without a generation that could never meet.
    (Before, the rejoin formed one, and the job never completed.)"""
    membership, _ = started(workers=3)
    membership.heartbeat(0, {"committed_step": 9, "bytes_sent": 5000})
    membership.finish(0, {"generation": 1})
    if launcher == "shoal train":
        membership.expect_rejoin(0)
        membership.report_exit(0, "killed by SIGKILL")
    else:
        assert membership.report_exit_of_process("host", 100, "killed by SIGKILL", restarting=True) == 0
    assert membership.join(0, "host", 200) == 0
    assert membership.current.number == 1 and membership._rejoin_expected == {}
    membership.heartbeat(0, {"committed_step": -1, "bytes_sent": 0})  # the restart did nothing
    assert membership.record().bytes_by_worker["0"] == 5000  # what it did stays on record
    assert membership.snapshot()["workers"]["0"]["committed_step"] == 9
    membership.finish(1, {"generation": 1})
    membership.finish(2, {"generation": 1})
    assert membership.status == "completed", membership.reason


def test_the_job_completes_when_the_generation_that_committed_the_last_step_has_finished():
    """The restarted worker joined just before the members reported their end, and a
    generation with it was formed: the members finish in theirs, which committed the last
    step, and the job completes without the newcomer, which has nothing left to do."""
    membership, clock = started(workers=3)
    membership.join(3, "host", 200)
    assert membership.current.members == [0, 1, 2, 3]  # formed before anyone finished
    for worker in (0, 1, 2):
        assert membership.status == "running"
        membership.finish(worker, {"generation": 1})
    assert membership.status == "completed"


def restarted_from(membership, clock, **settings):
    """A new coordinator's membership, given what the old one kept (as JSON, as on disk)."""
    restored = Membership(expected_workers=3, min_workers=1, heartbeat_timeout=5.0, clock=clock, **settings)
    kept = json.loads(json.dumps([membership.export_state(), membership.commits_by_worker()]))
    restored.restore_state(*kept)
    return restored


def test_a_coordinator_restarted_with_its_state_keeps_what_the_workers_cannot_resend():
    """A dead member's shares of the loss, the membership changes, the faults that fired and
    the job's spec are known only to the coordinator: its state gives them back."""
    membership, clock = started(workers=3)
    membership.admit_launcher({"--task": "digits"})
    for worker in range(3):
        membership.heartbeat(worker, {"commits": [[0, 1, clock.now, 0.1 * (worker + 1)]]})
    membership.report_kill(2, "--kill 2@1")
    membership.report_exit(2, "killed by SIGKILL")
    restored = restarted_from(membership, clock)
    assert restored.record().to_json() == membership.record().to_json()
    assert restored.record().losses == pytest.approx({0: 0.6})  # worker 2 is gone: only kept here
    assert restored.membership_changes()[0]["cause"] == "worker 2: --kill 2@1"
    assert restored.fired_faults == {"--kill 2@1"}
    with pytest.raises(ValueError, match="^--task"):
        restored.admit_launcher({"--task": "charlm"})
    # It takes the running generation over: members that speak stay, a silent one is dead
    assert restored.current.number == 2 and restored.incarnation != membership.incarnation
    for _ in range(2):
        advance(restored, clock, 3)
        restored.heartbeat(0, {"generation": 2, "members": [0, 1]})
    assert restored.current.number == 3 and restored.current.members == [0]
    assert restored.snapshot()["takeover"] == {"generation": 2, "members": [0, 1], "heard": {"0": 3.0}}


def test_a_worker_declared_dead_for_silence_stays_so_across_a_restart_with_the_state():
    """Its launcher kills a silenced worker that still runs (hung): a coordinator restarted
    with its state file must still say it was silenced, or the hung process stays until the
    job ends. (A file from before says nothing of it: not silenced.)"""
    membership, clock = started(workers=3, timeout=2.0)
    for _ in range(50):  # worker 2 hangs
        advance(membership, clock, 0.05)
        for worker in (0, 1):
            membership.heartbeat(worker, {})
    membership.report_exit(1, "killed by SIGKILL")
    state = json.loads(json.dumps(membership.export_state()))
    restored = Membership(expected_workers=3, min_workers=1, heartbeat_timeout=2.0, clock=clock)
    restored.restore_state(state)
    workers = restored.snapshot()["workers"]
    assert [workers[w]["silenced"] for w in ("0", "1", "2")] == [False, False, True]
    for worker in state["workers"]:
        del worker["silenced"]
    older = Membership(expected_workers=3, min_workers=1, heartbeat_timeout=2.0, clock=clock)
    older.restore_state(state)
    assert not older.snapshot()["workers"]["2"]["silenced"]


@pytest.mark.parametrize("launcher", ["shoal train", "shoal run --coordinator"])
def test_a_job_paused_for_a_restart_stays_paused_across_a_coordinator_restart_with_the_state(launcher):
    """Worker 1's launcher restarts it below --min-workers 2 and the coordinator is restarted
    (with its state file) during the pause: the new one knows worker 1 is dead and coming
    back, waits for it, and forms the group when it joins, at once or later. Without the
    expectation in the state it failed the job after a heartbeat timeout; without the death
    it took worker 1 for a live member and refused its restart."""
    membership, clock = started(workers=2, min_workers=2)
    states = []
    membership.keep_state_with(states.append, lambda worker, batch: None)
    if launcher == "shoal train":  # it knows the id: announces the restart, then the exit
        membership.expect_rejoin(1)
        membership.report_exit(1, "killed")
    else:  # it knows the pid, and says both at once
        assert membership.report_exit_of_process("host", 101, "killed", restarting=True) == 1
    assert membership.status == "running" and states  # paused, and that is kept
    for late in (False, True):
        restored = Membership(expected_workers=2, min_workers=2, heartbeat_timeout=5.0, clock=clock)
        restored.restore_state(json.loads(json.dumps(states[-1])))
        for _ in range(5 if late else 0):  # 20 s: worker 0 beats, the restart takes its time
            advance(restored, clock, 4, step=0.5)
            restored.heartbeat(0, {"generation": 1, "members": [0, 1]})
        assert restored.status == "running", restored.reason
        restored.join(1, "host", 300)
        assert restored.current.number == 2 and restored.current.members == [0, 1]


def test_the_end_of_the_job_survives_a_restart_with_the_state():
    """A coordinator killed right after the job completed: the launchers that had not yet
    read the record get it, with the leader's results, from the restarted one."""
    membership, clock = started(workers=2)
    membership.finish(1, {"commits": [[0, 1, clock.now, 0.5]]})
    restored = restarted_from(membership, clock)  # a member that finished stays finished
    advance(restored, clock, 10)  # worker 1 left and is never heard again: it is done, not dead
    restored.finish(0, {"commits": [[0, 1, clock.now, 0.25]], "results": {"accuracy": 0.9}})
    assert restored.status == "completed"
    again = restarted_from(restored, clock)
    assert again.status == "completed" and again.record().results == {"accuracy": 0.9}
    with pytest.raises(ValueError, match="^the job this coordinator runs has already completed"):
        again.admit_launcher({"--task": "digits"})  # a new job started on the old file
    assert again.record().losses == pytest.approx({0: 0.75})
    assert again.heartbeat(0, {"generation": 1, "members": [0, 1]})["status"] == "completed"


def test_the_state_is_kept_before_anyone_hears_of_a_change_and_commits_as_they_come():
    membership, clock = started(workers=2)
    states, commits = [], []
    membership.keep_state_with(states.append, lambda worker, batch: commits.append((worker, batch)))
    membership.report_exit(1, "killed by SIGKILL")
    assert [g["number"] for g in states[-1]["generations"]] == [1, 2]  # before report_exit returned
    kept = len(states)  # the death, then the generation formed without it
    membership.heartbeat(0, {"commits": [[0, 2, clock.now, 0.1]]})
    membership.heartbeat(0, {})
    assert commits == [(0, [[0, 2, clock.now, 0.1]])] and len(states) == kept == 2
    restored = Membership(expected_workers=2, min_workers=1, clock=clock)
    restored.restore_state(states[-1], commits)
    assert restored.record().to_json() == membership.record().to_json()

"""``shoal run --quorum majority``: one side of a partition of the nodes goes on, never two.

The rule and the hold, driven with a fake clock; the partition itself, on network-namespace
hosts, is in test_run_nodes (node 0 cut off in CI, the others with SHOAL_LONG_TESTS=1)."""

from __future__ import annotations

import itertools
import subprocess
import sys
import time

from torch.distributed import TCPStore

import shoal.launch.rendezvous as rendezvous_keys
from shoal.config import RunConfig
from shoal.coordinator import Membership
from shoal.launch.quorum import NodeQuorum
from shoal.launch.rendezvous import NodeRendezvous
from shoal.launch.script_job import _mind_the_quorum, _RemoteJob
from tests.coordinator.test_membership import Clock, advance


def _sides(nnodes: int) -> list[tuple[set[int], set[int]]]:
    """Every split of the nodes in two, with node 0 on the first side and node 1 on the
    second (the only split that makes two coordinators: node 1 takes over on its side)."""
    others = range(2, nnodes)
    return [({0, *chosen}, {1, *(set(others) - set(chosen))})
            for size in range(len(others) + 1) for chosen in itertools.combinations(others, size)]


def _workers(nodes: set[int], nproc: int) -> list[int]:
    return [node * nproc + local for node in nodes for local in range(nproc)]


def test_of_two_sides_of_a_partition_exactly_one_may_go_on():
    """For 2 to 6 nodes, whichever nodes end up with node 0 and which with node 1 (one worker
    each, and two): one side has its quorum and the other does not. A tie goes to node 0."""
    for nnodes, nproc in itertools.product(range(2, 7), (1, 2)):
        for node_0_side, node_1_side in _sides(nnodes):
            held_0 = NodeQuorum(nnodes, nproc, host_node=0)(_workers(node_0_side, nproc))
            held_1 = NodeQuorum(nnodes, nproc, host_node=1)(_workers(node_1_side, nproc))
            assert (held_0 is None) != (held_1 is None), (nnodes, node_0_side, node_1_side)
            assert (held_0 is None) == (2 * len(node_0_side) >= nnodes)


def test_a_side_counts_its_own_node_and_says_which_it_reaches():
    assert NodeQuorum(3, 1, host_node=1)([2]) is None  # node 1's workers exited: it hosts
    assert NodeQuorum(3, 1, host_node=1)([1]) == (
        "node 1's coordinator reaches node(s) 1 of 3, not a majority of them (--quorum majority): "
        "node 1 may be the one cut off")
    assert NodeQuorum(5, 2, host_node=0)([0, 1, 3]) == (
        "node 0's coordinator reaches node(s) 0, 1 of 5, not a majority of them (--quorum majority): "
        "node 0 may be the one cut off")


def test_node_0_counts_a_node_whose_launcher_beats_after_its_workers_were_lost():
    """The workers of nodes 1 and 2 hung at once: their launchers, still beating, say the nodes
    are not cut off. A beat from before the loss does not count."""
    clock, beats = Clock(), {}
    quorum = NodeQuorum(3, 1, host_node=0, heard_since=lambda node, since: beats.get(node, 0.0) > since,
                        clock=clock)
    beats.update({1: clock.now - 1, 2: clock.now - 1})
    assert quorum([0]) is not None
    clock.now += 1
    beats[2] = clock.now
    assert quorum([0]) is None
    quorum([0, 1, 2])  # every node back: the next loss is judged from its own time
    clock.now += 1
    assert quorum([0]) is not None


def _held_membership(clock: Clock, quorum) -> Membership:
    membership = Membership(expected_workers=3, min_workers=1, heartbeat_timeout=1.0, quorum=quorum,
                            clock=clock)
    for worker in range(3):
        membership.join(worker, "host", 100 + worker)
    return membership


def test_a_generation_without_a_quorum_is_held_until_one_comes():
    """Node 0 loses the workers of nodes 1 and 2 to silence: no generation forms of its own
    worker alone (it says why, and since when), until node 2 is heard again."""
    clock, reached = Clock(), set()
    membership = _held_membership(clock, lambda present: None if len(present) > 1 or 2 in reached
                                  else "too few nodes")
    assert membership.current.members == [0, 1, 2]
    for _ in range(3):
        advance(membership, clock, 0.5)
        membership.heartbeat(0, {})
    assert membership.current.number == 1  # (workers 1 and 2 are dead, none formed since)
    held = membership.snapshot()["held"]
    assert held["reason"] == "too few nodes" and 0 < held["seconds"] < 1.5
    reached.add(2)
    advance(membership, clock, 0.05)
    assert membership.current.members == [0] and membership.snapshot()["held"] is None
    [change] = membership.membership_changes()
    assert change["cause"].endswith("; held 0.5 s for a quorum (too few nodes)")


def test_a_taken_over_generations_members_count_for_the_quorum_once_they_speak():
    """Node 1's coordinator, after a silent node 0: node 0's worker is counted out, node 2's is
    only presumed alive until it speaks. Until then no generation forms; once it has, one does."""
    clock = Clock()
    membership = Membership(expected_workers=3, min_workers=1, heartbeat_timeout=5.0, clock=clock,
                            quorum=NodeQuorum(3, 1, host_node=1, clock=clock))
    generation = {"generation": 4, "members": [0, 1, 2], "pid": 101}
    membership.heartbeat(1, generation)
    membership.report_exit_by_id(0, "lost with node 0")
    advance(membership, clock, 1)
    assert membership.current.number == 4
    assert membership.snapshot()["held"]["reason"].startswith("node 1's coordinator reaches node(s) 1 of 3")
    membership.heartbeat(2, {**generation, "pid": 102})
    assert membership.current.number == 5 and membership.current.members == [1, 2]


def test_node_1_holds_the_job_it_took_over_saying_so_then_fails_it_after_its_patience(capsys):
    config = RunConfig(script="train.py", nnodes=3, nproc_per_node=1, master_addr="127.0.0.1")
    hosted = Membership(expected_workers=3, min_workers=1)
    job = _RemoteJob("http://127.0.0.1:9", "t", 1.0)
    job.follow("http://127.0.0.1:9", "node 0 stopped answering", hosted, patience=27.0)
    held = {"status": "running", "workers": {"1": {"alive": True, "finished": False}},
            "held": {"reason": "node 1 may be the one cut off", "seconds": 1.0}}
    assert not _mind_the_quorum(job, held, config, told=False)  # (not said at once)
    held["held"]["seconds"] = 20.0
    assert _mind_the_quorum(job, held, config, told=False)
    assert _mind_the_quorum(job, held, config, told=True)
    assert hosted.status != "failed" and job.fenced is None
    assert capsys.readouterr().err == ("shoal run: holding the job: node 1 may be the one cut off; it fails "
                                       "unless workers of more nodes come within 27 s\n")
    _mind_the_quorum(job, {**held, "held": {**held["held"], "seconds": 28.0}}, config, told=True)
    assert hosted.status == "failed" and hosted.reason == job.fenced == "node 1 may be the one cut off (held 27 s)"


def test_quorum_flag_is_checked_with_one_line():
    for flags, line in ((["--quorum", "most"], "--quorum: must be one of majority, none, got 'most'"),
                        (["--coordinator", "127.0.0.1:9", "--token", "t", "--quorum", "none"],
                         ("--quorum: not with --coordinator: there is one coordinator, and no side "
                          "of a partition to choose"))):
        result = subprocess.run([sys.executable, "-m", "shoal.cli.main", "run", *flags, __file__],
                                capture_output=True, text=True, check=False)
        assert result.returncode == 2 and line in result.stderr, result.stderr


def test_node_0_hears_a_launcher_since_a_time_only_from_a_beat_sent_after_it():
    """The first move of a node's beat counter seen after a loss may be a beat sent before it
    (node 0 looks once a second): it takes a second move."""
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    rendezvous = NodeRendezvous(store, 0, 2, url="http://127.0.0.1:9", token="t", run_id="r")
    store.set(rendezvous_keys._NODE.format(1), "launcher")
    beat = rendezvous_keys._BEAT.format(1)
    store.add(beat, 1)
    assert rendezvous.silent_nodes(10.0) == []
    lost_at = time.monotonic()
    for heard in (False, True, True):
        store.add(beat, 1)
        rendezvous.silent_nodes(10.0)
        assert rendezvous.heard_since(1, lost_at) is heard
    rendezvous.silent_nodes(10.0)  # no beat since the last look: still heard since the loss
    assert rendezvous.heard_since(1, lost_at) and not rendezvous.heard_since(1, time.monotonic())

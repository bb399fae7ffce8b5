"""``shoal run --quorum majority``: one side of a partition of the nodes goes on, never two.

The rule and the hold, driven with a fake clock; the partition itself, on network-namespace
hosts, is in test_run_nodes (node 0 cut off in CI, the others with SHOAL_LONG_TESTS=1)."""

from __future__ import annotations

import itertools
import subprocess
import sys
from collections.abc import Iterable

import pytest

from shoal.config import RunConfig
from shoal.coordinator import Membership
from shoal.launch.quorum import NodeQuorum
from shoal.launch.rendezvous import _refused
from shoal.launch.script_job import _mind_silent_nodes, _mind_the_quorum, _RemoteJob
from tests.coordinator.test_membership import Clock, advance


def _workers(nodes: Iterable[int], nproc: int) -> list[int]:
    return [node * nproc + local for node in nodes for local in range(nproc)]


def _node_sets(nnodes: int) -> list[frozenset[int]]:
    return [frozenset(chosen) for size in range(1, nnodes + 1)
            for chosen in itertools.combinations(range(nnodes), size)]


def _forms(nnodes: int, nproc: int, nodes: frozenset[int], host: int) -> bool:
    """May the coordinator of node ``host`` form a generation of every worker on ``nodes``?"""
    return NodeQuorum(nnodes, nproc, host_node=host)(_workers(nodes, nproc)) is None


def test_no_two_generations_on_disjoint_nodes_may_both_form():
    """For 2 to 6 nodes (one worker each, and two), whichever coordinator forms them: two
    generations whose members are on disjoint sets of nodes (the two sides of a partition)
    never both pass. And when every node is on one side or the other with its workers alive,
    one of the sides passes: a partition stops at most the smaller side."""
    for nnodes, nproc in itertools.product(range(2, 7), (1, 2)):
        for side, other in itertools.product(_node_sets(nnodes), repeat=2):
            if side & other:
                continue
            assert not (_forms(nnodes, nproc, side, 0) and _forms(nnodes, nproc, other, 1)), (nnodes, side, other)
            if side | other == set(range(nnodes)):
                assert _forms(nnodes, nproc, side, 0) or _forms(nnodes, nproc, other, 0), (nnodes, side, other)


def test_only_the_members_count_not_the_coordinators_own_node():
    """Node 0 counting itself would let it form a generation of node 1's workers alone, which
    trains on by itself on node 1's side of a later cut while node 0 forms another of its own
    (restarted) workers: a tie goes to node 0 only with a worker of node 0 in it."""
    assert NodeQuorum(2, 1, host_node=0)([1]) == (
        "node 0's coordinator hears from live workers on node(s) 1 only, of 2 nodes: not a majority "
        "(--quorum majority); node 0 may be cut off from the others")
    assert NodeQuorum(2, 1, host_node=0)([0]) is None
    assert NodeQuorum(3, 1, host_node=1)([2, 0]) is None
    assert "live workers on node(s) 0, 1 only, of 5 nodes:" in NodeQuorum(5, 2, host_node=0)([0, 1, 3])


def _node_0s_job(nnodes: int, *, restarts: bool = False) -> tuple[Membership, Clock]:
    """Node 0's coordinator under ``--quorum majority``, one worker per node, all joined."""
    clock = Clock()
    membership = Membership(expected_workers=nnodes, min_workers=1, heartbeat_timeout=1.0, restarts=restarts,
                            clock=clock, quorum=NodeQuorum(nnodes, 1, host_node=0))
    for worker in range(nnodes):
        membership.join(worker, "host", 100 + worker)
    return membership, clock


def test_a_generation_without_a_quorum_is_held_until_one_comes():
    """Node 0 loses the workers of nodes 1 and 2 to silence: no generation forms of its own
    worker alone (it says why, and since when), until node 2's worker is back."""
    membership, clock = _node_0s_job(3)
    assert membership.current.members == [0, 1, 2]
    for _ in range(3):
        advance(membership, clock, 0.5)
        membership.heartbeat(0, {})
    assert membership.current.number == 1  # (workers 1 and 2 are dead, none formed since)
    held = membership.snapshot()["held"]
    assert held["reason"].startswith("node 0's coordinator hears from live workers on node(s) 0 only, of 3 nodes:")
    assert 0 < held["seconds"] < 1.5
    membership.join(2, "host", 202)  # started again, say
    assert membership.current.members == [0, 2] and membership.snapshot()["held"] is None
    [change] = membership.membership_changes()
    assert "; held 0.4 s for a quorum (node 0's coordinator hears from live workers on node(s) 0 only," in change["cause"]


def test_after_a_crash_on_node_0_of_two_node_1s_workers_alone_are_held():
    """The split brain of counting the coordinator's own node: of two nodes, node 0's only
    worker crashes and is started again. A generation of node 1's worker alone would train on by
    itself if the link were cut then, while node 0 formed another of its restarted worker. It is
    held instead, until the restarted worker is back (for up to two minutes of restart: the hold's
    clock starts anew while a restart that would make the quorum is coming)."""
    membership, clock = _node_0s_job(2, restarts=True)
    membership.expect_rejoin(0)
    membership.report_exit(0, "exited with code 1")
    for _ in range(10):
        advance(membership, clock, 0.5)
        membership.heartbeat(1, {})
    assert membership.current.members == [0, 1] and membership.snapshot()["held"]["seconds"] < 0.1
    membership.join(0, "host", 200)
    assert membership.current.members == [0, 1] and membership.current.number == 2


def test_a_taken_over_generations_members_count_for_the_quorum_once_they_speak():
    """Node 1's coordinator, after a silent node 0: node 0's worker is counted out, node 2's is
    only presumed alive until it speaks, and given the grace of a worker's try at node 0 to do
    so. Until then no generation forms; once it has, one does."""
    clock = Clock()
    membership = Membership(expected_workers=3, min_workers=1, heartbeat_timeout=2.0, clock=clock,
                            quorum=NodeQuorum(3, 1, host_node=1))
    membership.presumed_grace = 10.0
    generation = {"generation": 4, "members": [0, 1, 2], "pid": 101}
    membership.heartbeat(1, generation)
    membership.report_exit_by_id(0, "lost with node 0")
    for _ in range(10):  # 11 s: more than a heartbeat timeout, within the grace
        advance(membership, clock, 1.1)
        membership.heartbeat(1, generation)
    assert membership.current.number == 4
    assert membership.snapshot()["held"]["reason"].startswith("node 1's coordinator hears from live workers on node(s) 1 only,")
    membership.heartbeat(2, {**generation, "pid": 102})
    assert membership.current.number == 5 and membership.current.members == [1, 2]


def test_node_1_holds_the_job_it_took_over_saying_so_then_fails_it_after_its_patience(capsys):
    config = RunConfig(script="train.py", nnodes=3, nproc_per_node=1, master_addr="127.0.0.1")
    hosted = Membership(expected_workers=3, min_workers=1)
    job = _RemoteJob("http://127.0.0.1:9", "t", 1.0)
    job.follow("http://127.0.0.1:9", "node 0 stopped answering", hosted, patience=27.0)
    held = {"status": "running", "workers": {"1": {"alive": True, "finished": False}},
            "held": {"reason": "node 1 may be cut off", "seconds": 1.0}}
    assert _mind_the_quorum(job, held, config, told=False)
    assert _mind_the_quorum(job, {**held, "held": {**held["held"], "seconds": 20.0}}, config, told=True)
    assert hosted.status != "failed" and job.fenced is None
    assert capsys.readouterr().err == ("shoal run: holding the job: node 1 may be cut off; it fails "
                                       "unless workers on more nodes come within 26 s\n")
    _mind_the_quorum(job, {**held, "held": {**held["held"], "seconds": 28.2}}, config, told=True)
    assert hosted.status == "failed" and hosted.reason == job.fenced == "node 1 may be cut off (held 28 s)"
    follower = _RemoteJob("http://127.0.0.1:9", "t", 1.0)
    follower.follow("http://127.0.0.1:9", "node 0 stopped answering", None, patience=27.0)
    assert not _mind_the_quorum(follower, held, config, told=False)  # (node 1 says it)


def test_quorum_flag_is_checked_with_one_line():
    for flags, line in ((["--quorum", "most"], "--quorum: must be one of majority, none, got 'most'"),
                        (["--coordinator", "127.0.0.1:9", "--token", "t", "--quorum", "none"],
                         ("--quorum: not with --coordinator: there is one coordinator, and no side "
                          "of a partition to choose"))):
        result = subprocess.run([sys.executable, "-m", "shoal.cli.main", "run", *flags, __file__],
                                capture_output=True, text=True, check=False)
        assert result.returncode == 2 and line in result.stderr, result.stderr


def test_only_a_closed_reset_or_refused_connection_makes_node_0_gone_for_sure():
    """Its machine answered for a launcher that is dead: node 1 may take over alone (of two
    nodes). Not a call left unanswered, nor a network without a route to node 0."""
    for said, refused in (("Failed to recv, got 0 bytes. Connection was likely closed.", True),
                          ("Connection reset by peer", True), ("Broken pipe", True),
                          ("Connection refused", True), ("No route to host", False),
                          ("Network is unreachable", False)):
        assert _refused(RuntimeError(said)) is refused, said
    assert not _refused(TimeoutError("no answer within 6 s"))


def test_after_a_silent_node_0_node_1_forms_without_members_still_in_coming():
    """Five nodes, node 0 silent: node 1's coordinator gives the taken-over generation's
    members the 23 s a try at node 0 may take to come, but forms meanwhile of those that have
    (three nodes of five) rather than wait that long for worker 4 to connect. Worker 4 started
    again by its launcher may join at once: its placeholder is no live member."""
    clock = Clock()
    membership = Membership(expected_workers=5, min_workers=1, heartbeat_timeout=2.0, clock=clock,
                            quorum=NodeQuorum(5, 1, host_node=1))
    membership.presumed_grace = 23.0
    generation = {"generation": 7, "members": [0, 1, 2, 3, 4]}
    for worker in (1, 2, 3):
        membership.heartbeat(worker, {**generation, "pid": 100 + worker})
    membership.report_exit_by_id(0, "lost with node 0")
    assert membership.current.number == 8 and membership.current.members == [1, 2, 3]
    membership.join(4, "host-4", 204)
    assert membership.current.number == 9 and membership.current.members == [1, 2, 3, 4]


def test_a_hold_starts_anew_only_for_restarts_that_would_make_the_quorum():
    """Five nodes; node 0's coordinator has only its own worker left. A restart of worker 1
    coming would not make a majority (two nodes of five): the hold's clock runs on."""
    membership, clock = _node_0s_job(5, restarts=True)
    membership.expect_rejoin(1)
    for worker in range(1, 5):
        membership.report_exit(worker, "killed by SIGKILL")
    for _ in range(6):
        advance(membership, clock, 0.5)
        membership.heartbeat(0, {})
    assert membership.snapshot()["held"]["seconds"] == pytest.approx(3.0)


def test_node_0_frees_no_silent_nodes_rank_while_it_holds():
    """Held, node 0 may be the one cut off: a launcher that took a silent node's rank here
    would count for a node that goes on, with the others, on the other side."""
    class Rendezvous:
        def __init__(self):
            self.released: list[int] = []

        def silent_nodes(self, silence):
            return [1]

        def release(self, node):
            self.released.append(node)

    config = RunConfig(script="train.py", nnodes=3, nproc_per_node=1, master_addr="127.0.0.1",
                       heartbeat_timeout=2.0)
    workers = {str(rank): {"alive": rank == 0, "finished": False} for rank in range(3)}
    rendezvous = Rendezvous()
    _mind_silent_nodes(rendezvous, None, {"workers": workers, "held": {"reason": "r", "seconds": 3.0}}, config)
    assert rendezvous.released == []
    _mind_silent_nodes(rendezvous, None, {"workers": workers, "held": None}, config)
    assert rendezvous.released == [1]


def test_node_1_counts_node_0s_workers_out_once_even_never_heard_of():
    """Node 1's coordinator hears only workers of no generation (started again after node 0
    formed one, say): it must not wait for node 0's, which it never heard of, to form the
    first, and counts each of them out once (twice would wait for one worker too few)."""
    config = RunConfig(script="train.py", nnodes=3, nproc_per_node=1, master_addr="127.0.0.1")
    hosted = Membership(expected_workers=3, min_workers=1)
    job = _RemoteJob("http://127.0.0.1:9", "t", 1.0)
    job.follow("http://127.0.0.1:9", "node 0 stopped answering", hosted, patience=27.0)
    hosted.heartbeat(1, {"generation": 0, "pid": 101})
    for _ in range(3):
        job.check_successor(hosted.snapshot(), config)
    assert hosted.current is None and hosted.expected_workers == 2
    hosted.heartbeat(2, {"generation": 0, "pid": 102})
    assert hosted.current.members == [1, 2]


def test_node_1_waits_for_members_in_coming_when_node_0s_worker_came_first():
    """Node 0's launcher frozen: its worker, alive, may reach node 1 first and is counted out
    at once. The members still in coming are waited for, not taken for none (the job failed
    below --min-workers, under load, before)."""
    clock = Clock()
    membership = Membership(expected_workers=3, min_workers=1, heartbeat_timeout=2.0, clock=clock,
                            quorum=NodeQuorum(3, 1, host_node=1))
    membership.presumed_grace = 23.0
    generation = {"generation": 4, "members": [0, 1, 2]}
    membership.heartbeat(0, {**generation, "pid": 100})
    membership.report_exit_by_id(0, "lost with node 0")
    assert membership.status == "running" and membership.current.number == 4
    for worker in (1, 2):
        membership.heartbeat(worker, {**generation, "pid": 100 + worker})
    assert membership.current.number == 5 and membership.current.members == [1, 2]

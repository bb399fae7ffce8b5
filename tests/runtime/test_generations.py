"""Forming a generation's group across real processes when members arrive out of step."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch.distributed as dist

from shoal.coordinator import Coordinator, Membership
from shoal.runtime.context import Context

MEMBER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import torch, torch.distributed as dist
    from shoal.runtime.context import Context

    url, token, worker_id, signals = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])

    def wait_for(name):
        while not (signals / name).exists():
            time.sleep(0.01)

    context = Context(url, token, worker_id, heartbeat_interval=0.05)
    context.join()
    context.enter_next_generation()
    context.leave_generation()
    (signals / f"left-{worker_id}").touch()
    wait_for(f"go-{worker_id}")
    context.enter_next_generation()
    total = torch.tensor([float(worker_id + 1)])
    dist.all_reduce(total)
    print(context.generation, int(total.item()), flush=True)
    context.close()
    os._exit(0)  # as shoal's workers leave (shoal._exit): gloo's teardown aborts now and then
""")


def wait_for(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def start_worker(script: str, url: str, worker: int, signals) -> subprocess.Popen:
    """``script`` as worker ``worker`` of the coordinator at ``url`` (token "t"); files in
    ``signals`` tell it when to go on, and what it prints comes back on its stdout."""
    return subprocess.Popen([sys.executable, "-c", script, url, "t", str(worker), str(signals)],
                            stdout=subprocess.PIPE, text=True)


def test_a_member_that_skips_a_generation_does_not_hold_the_others(tmp_path):
    """Worker 0 enters generation 2; worker 1 asks only once generation 3 has formed, so it
    never comes to 2. Worker 0 must go on to 3 as soon as the coordinator forms it, not wait
    for 2's connection to time out (90 s here, three heartbeat timeouts, beyond the test's
    60 s)."""
    membership = Membership(expected_workers=2, min_workers=1, heartbeat_timeout=30)
    coordinator = Coordinator(membership, token="t").start()
    members = [start_worker(MEMBER, coordinator.url, worker, tmp_path) for worker in (0, 1)]
    try:
        wait_for(lambda: all((tmp_path / f"left-{w}").exists() for w in (0, 1)), "generation 1")
        membership.report_failure(0, 1, "test: form generation 2")
        wait_for(lambda: membership.current_number == 2, "generation 2")
        (tmp_path / "go-0").touch()
        joined = dist.PrefixStore("generation/2/", coordinator.store)
        wait_for(lambda: joined.check(["shoal/ready/joined/0"]), "worker 0 in generation 2")
        membership.report_failure(0, 2, "test: form generation 3")
        wait_for(lambda: membership.current_number == 3, "generation 3")
        (tmp_path / "go-1").touch()
        outputs = [member.communicate(timeout=60)[0] for member in members]
        assert [member.returncode for member in members] == [0, 0]
        assert [output.split() for output in outputs] == [["3", "3"], ["3", "3"]]
    finally:
        for member in members:
            member.kill()
            member.wait()
        coordinator.stop()


VETERAN_AND_NEWCOMER = textwrap.dedent("""
    import os, sys
    import torch, torch.distributed as dist
    from shoal.runtime.context import Context

    port, role = int(sys.argv[1]), sys.argv[2]
    context = Context(None, None, 0)  # its groups formed by hand, as enter_next_generation would
    context._store = dist.TCPStore("127.0.0.1", port, is_master=False)
    context.world_size = 2
    if role == "veteran":  # generation 1: the newcomer never comes, the connection times out
        context.generation, context.rank, context.collective_timeout = 1, 0, 1.0
        try:
            context._init_process_group()
        except RuntimeError:
            pass
        else:
            raise SystemExit("generation 1 formed without its second member")
    context.generation, context.rank = 2, 0 if role == "veteran" else 1
    context.collective_timeout = 20.0  # the two may reach generation 2 seconds apart
    context._init_process_group()
    total = torch.tensor([1.0])
    dist.all_reduce(total)
    print(int(total.item()), flush=True)
    os._exit(0)
""")


def test_a_group_that_failed_to_form_leaves_no_trace_on_the_next():
    """A member whose connection to one generation failed must connect to the next with a
    fresh process: torch names a default group after a per-process count that only
    destroying a group resets, and a failed group is never destroyed. (Before, the two
    waited for each other's keys under different names until both timed out.)"""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    processes = [subprocess.Popen([sys.executable, "-c", VETERAN_AND_NEWCOMER, str(store.port), role],
                                  stdout=subprocess.PIPE, text=True)
                 for role in ("veteran", "newcomer")]
    try:
        outputs = [process.communicate(timeout=120)[0] for process in processes]
        assert [process.returncode for process in processes] == [0, 0]
        assert outputs == ["2\n", "2\n"]
    finally:
        for process in processes:
            process.kill()
            process.wait()


LATE_JOINER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from shoal.runtime.context import Context, JobStopped

    url, token, worker_id, signals = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
    context = Context(url, token, worker_id, heartbeat_interval=0.05)
    context.join()
    if worker_id < 2:  # a member: in generation 1 it commits the last step, then reports its end
        context.enter_next_generation()
        (signals / f"in-{worker_id}").touch()
        while not (signals / "finish").exists():
            time.sleep(0.01)
        context.finish(None)
        print("finished", flush=True)
    else:  # restarted as they finish: the generation formed with it will never connect
        try:
            context.enter_next_generation()
            print(f"entered generation {context.generation}", flush=True)
        except JobStopped as stopped:
            print(f"stopped: {stopped} (completed: {stopped.completed})", flush=True)
        context.close()
    os._exit(0)
""")


def test_a_worker_that_rejoins_as_the_members_finish_does_not_hold_the_job(tmp_path):
    """Workers 0 and 1 commit the last step in generation 1; worker 2 joins just before they
    report their end, and generation 2 is formed with it. The job completes when 0 and 1
    finish (their generation committed the last step), and worker 2, waiting for members
    that will never connect, stops (a shoal worker then exits 0: nothing was left to do).
    Before, the job waited for worker 2 to finish and worker 2 for the others, until the
    job was killed."""
    membership = Membership(expected_workers=2, min_workers=1, heartbeat_timeout=30)
    coordinator = Coordinator(membership, token="t").start()
    members = [start_worker(LATE_JOINER, coordinator.url, worker, tmp_path) for worker in (0, 1)]
    joiner = None
    try:
        wait_for(lambda: all((tmp_path / f"in-{w}").exists() for w in (0, 1)), "generation 1")
        joiner = start_worker(LATE_JOINER, coordinator.url, 2, tmp_path)
        wait_for(lambda: membership.current_number == 2, "generation 2, with worker 2")
        (tmp_path / "finish").touch()
        outputs = [process.communicate(timeout=60)[0] for process in (*members, joiner)]
        assert outputs == ["finished\n", "finished\n", "stopped: the job completed (completed: True)\n"]
        assert membership.status == "completed"
    finally:
        for process in (*members, joiner):
            if process is not None:
                process.kill()
                process.wait()
        coordinator.stop()


FINISHER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from shoal.runtime.context import Context

    url, token, worker_id, signals = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
    context = Context(url, token, worker_id, heartbeat_interval=0.05)
    context.join()
    context.enter_next_generation()
    context.record_commit(0, 0.25 * (worker_id + 1))  # its share of step 0's loss
    (signals / f"in-{worker_id}").touch()
    while not (signals / f"finish-{worker_id}").exists():
        time.sleep(0.01)
    context.finish(None)
    print("finished", flush=True)
    os._exit(0)
""")


def test_a_member_that_finished_stays_until_a_restarted_coordinator_hears_its_end(tmp_path):
    """Worker 0 finishes; the coordinator is then killed and another started on its address
    before worker 1 finishes. Worker 0 must tell the new one its end (and its share of the
    loss): it used to exit at once, and the new coordinator declared it dead for silence and
    failed the job (only 0 workers remained: a chaos trial of localsgd in about forty)."""
    first = Coordinator(Membership(expected_workers=2, min_workers=1, heartbeat_timeout=30), token="t").start()
    port = first.port
    workers = [start_worker(FINISHER, first.url, worker, tmp_path) for worker in (0, 1)]
    second = None
    try:
        wait_for(lambda: all((tmp_path / f"in-{w}").exists() for w in (0, 1)), "generation 1")
        (tmp_path / "finish-0").touch()
        wait_for(lambda: first.membership.snapshot()["workers"]["0"]["finished"], "worker 0's end")
        first.stop()
        membership = Membership(expected_workers=2, min_workers=1, heartbeat_timeout=2.0)
        second = Coordinator(membership, token="t", port=port).start()
        (tmp_path / "finish-1").touch()
        outputs = [process.communicate(timeout=60)[0] for process in workers]
        assert outputs == ["finished\n", "finished\n"]
        assert membership.status == "completed", membership.reason
        assert [step.loss for step in membership.record().steps] == [0.75]  # both shares
    finally:
        for process in workers:
            if process.poll() is None:
                process.kill()
                process.wait()
        for coordinator in (first, second):
            if coordinator is not None:
                coordinator.stop()


def test_a_member_waiting_on_a_store_that_went_silent_fails_its_generation():
    """The coordinator's machine cut off or frozen (here its process SIGSTOPped) answers
    nothing, and torch's TCPStore client waits for an answer as long as the connection lasts.
    A member waiting for its peers there fails the generation after three heartbeat timeouts,
    to ask the coordinator (or its successor) for the next, on a store client of its own."""
    server = subprocess.Popen([sys.executable, "-c", (
        "import time\n"
        "from torch.distributed import TCPStore\n"
        "store = TCPStore('127.0.0.1', 0, is_master=True, wait_for_workers=False)\n"
        "print(store.port, flush=True)\n"
        "time.sleep(120)\n")], stdout=subprocess.PIPE, text=True)
    try:
        context = Context("http://127.0.0.1:9", "t", 0)
        context.heartbeat_timeout, context.world_size = 0.2, 2
        context._connect_store("127.0.0.1", int(server.stdout.readline()))
        context.generation_store = dist.PrefixStore("generation/1/", context._store)
        server.send_signal(signal.SIGSTOP)  # (a check answered before it takes hold is waited past)
        with pytest.raises(RuntimeError, match="the coordinator's store did not answer: no answer within 0.6 s"):
            context.await_members("joined")
        assert context._store_address is None  # the next generation's store gets a client of its own
    finally:
        server.kill()
        server.send_signal(signal.SIGCONT)
        server.communicate()

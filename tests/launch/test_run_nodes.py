"""`shoal run --nnodes`: torchrun's static rendezvous, several nodes' launchers as one job.

The nodes here are launchers on one machine (loopback), and, as root, network-namespace
hosts that reach node 0 only through its address, as machines would.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta

import psutil
import pytest
from torch.distributed import TCPStore

import shoal.launch.rendezvous as rendezvous_keys
from shoal import _protocol
from shoal.network import Hosts, namespaces_available
from tests.conftest import LONG, REPO, outputs, shoal
from tests.launch.test_run import (
    attempts_ended,
    elastic_script_losing_rank_1,
    elastic_script_losing_rank_1_once,
    elastic_with_step_hook,
    plain_script_resuming_from_its_checkpoint,
    plain_script_where_rank_1_gives_up,
)
from tests.launch.test_run_coordinator import newcomer_wait, undisturbed_accuracy

PLAIN = str(REPO / "examples" / "plain_ddp.py")


def _free_port() -> int:
    """A port for --master-port, which every node must be told beforehand (torchrun's way)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _nodes(script: str, nnodes: int, nproc: int, *flags: str, timeout: float = 120,
           env: dict | None = None, popen=subprocess.Popen,
           master_addr: str = "127.0.0.1", script_args: tuple[str, ...] = ()) -> list[tuple[int, str, str]]:
    """Run `shoal run` for every node at once; (exit code, stdout, stderr) of each, by rank."""
    port = str(_free_port())
    processes = [popen([sys.executable, "-m", "shoal.cli.main", "run", "--nnodes", str(nnodes),
                        "--node-rank", str(node), "--master-addr", master_addr, "--master-port", port,
                        "--nproc-per-node", str(nproc), *flags, script, *script_args],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or os.environ)
                 for node in reversed(range(nnodes))]  # node 0 last: the others wait for it
    return outputs(processes, timeout)[::-1]


def _losses(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if ": loss " in line]


def test_two_nodes_train_as_one_node_of_two_processes():
    """The same world of 2, split over two nodes: the same losses, digit for digit (one epoch:
    CI time)."""
    one_epoch = {**os.environ, "EPOCHS": "1"}
    one = shoal("run", "--nproc-per-node", "2", PLAIN, env=one_epoch)
    assert one.returncode == 0, one.stderr
    (code0, out0, err0), (code1, out1, err1) = _nodes(PLAIN, 2, 1, env=one_epoch)
    assert (code0, code1) == (0, 0), err0 + err1
    assert _losses(out0) == _losses(one.stdout) and len(_losses(out0)) == 1
    assert _losses(out1) == []  # rank 1 prints nothing: it is the other node's only process


def test_every_process_gets_torchruns_environment_for_its_node(tmp_path):
    script = tmp_path / "env.py"
    names = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
             "GROUP_WORLD_SIZE", "MASTER_PORT", "TORCHELASTIC_RUN_ID"]
    script.write_text(f"import os\nprint(' '.join(os.environ[n] for n in {names!r}))\n")
    runs = _nodes(str(script), 2, 2)
    values = {}
    for node, (code, out, err) in enumerate(runs):
        assert code == 0, err
        for line in out.splitlines():
            rank, local, world, local_world, group, groups, port, run_id = line.split("] ")[1].split()
            assert (int(local), int(group)) == (int(rank) % 2, node)
            assert (world, local_world, groups) == ("4", "2", "2")
            values[int(rank)] = (port, run_id)
    assert sorted(values) == [0, 1, 2, 3]
    assert len(set(values.values())) == 1  # one store, one run id


def test_torchruns_c10d_command_numbers_the_nodes_as_they_come(tmp_path):
    """The command torchrun's documentation gives for several nodes, the same on each: the
    node that can listen at the endpoint is node 0, the next is node 1; --rdzv-id is the
    run id."""
    script = tmp_path / "ranks.py"
    script.write_text("import os\nprint(os.environ['GROUP_RANK'], os.environ['RANK'], "
                      "os.environ['TORCHELASTIC_RUN_ID'])\n")
    command = [sys.executable, "-m", "shoal.cli.main", "run", "--nnodes=2", "--nproc-per-node=2",
               "--rdzv-id=job7", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}",
               str(script)]
    runs = outputs([subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                     for _ in range(2)], timeout=120)
    lines = []
    for code, out, err in runs:
        assert code == 0, err
        lines.append(sorted(line.split("] ")[1] for line in out.splitlines()))
    assert sorted(lines) == [["0 0 job7", "0 1 job7"], ["1 2 job7", "1 3 job7"]]


def _launch(script, *flags: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "shoal.cli.main", "run", "--master-addr",
                             "127.0.0.1", *flags, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _waiting_script(tmp_path):
    script = tmp_path / "wait.py"
    script.write_text("import time\nprint('ready', flush=True)\ntime.sleep(120)\n")
    return script


def test_a_node_that_disagrees_with_node_0s_job_exits_2_naming_the_flag(tmp_path, capsys, monkeypatch):
    """Nodes 0 and 1 of three wait for node 2; launchers that do not fit their job are
    refused before any worker starts, and the job, left alone, starts when node 2 comes.
    (The refused launchers run in this process: six fresh interpreters took half a minute
    of CI beside another test.)"""
    from shoal.cli.main import main

    script, port = _waiting_script(tmp_path), str(_free_port())
    job = ["--nnodes", "3", "--master-port", port, "--rdzv-id", "job7"]
    nodes = [_launch(script, *job, "--node-rank", "0"), _launch(script, *job, "--node-rank", "1")]
    try:
        peek = TCPStore("127.0.0.1", int(port), is_master=False, timeout=timedelta(seconds=60))
        peek.wait([rendezvous_keys._NODE.format(1)])  # node 1 took its rank
        for flags, named in [(["--nnodes", "2"], "--nnodes"),
                             (["--nnodes", "3", "--nproc-per-node", "2"], "--nproc-per-node"),
                             (["--nnodes", "3", "--rdzv-id", "job8"], "--rdzv-id"),
                             (["--nnodes", "3", "--heartbeat-timeout", "9"], "--heartbeat-timeout"),
                             (["--nnodes", "3", "--node-rank", "1"], "--node-rank"),
                             (["--nnodes", "3", "--node-rank", "0"], "--master-port")]:
            code = main(["run", *flags, "--master-addr", "127.0.0.1", "--master-port", port,
                         "--join-timeout", "3", str(script)])
            err = capsys.readouterr().err
            assert code == 2, (flags, err)
            [line] = err.strip().splitlines()
            assert line.startswith(f"shoal run: error: {named}: "), line
        ours = _protocol.describe()
        monkeypatch.setattr(_protocol, "PROTOCOL", 99)  # a launcher of another shoal
        code = main(["run", *job, "--master-addr", "127.0.0.1", "--join-timeout", "3", str(script)])
        monkeypatch.undo()
        assert (code, capsys.readouterr().err.strip().splitlines()) == (2, [(
            f"shoal run: error: --master-addr: node 0 at 127.0.0.1:{port} runs {ours}, this node "
            f"shoal {_protocol.VERSION} (protocol 99): run one shoal version on every node")])
        nodes.append(_launch(script, *job))  # no --node-rank: the next free one, 2
        for node, process in enumerate(nodes):
            assert process.stdout.readline().strip() == f"[worker {node}] ready"
    finally:
        nodes[0].send_signal(signal.SIGTERM)
        ends = outputs(nodes, timeout=60)
    assert [code for code, _, _ in ends] == [143, 1, 1]


def test_node_0_fails_the_job_when_a_node_never_joins_and_says_who_was_refused(tmp_path):
    script, port = _waiting_script(tmp_path), str(_free_port())
    node0 = _launch(script, "--nnodes", "2", "--node-rank", "0", "--master-port", port,
                    "--join-timeout", "6")
    refused = shoal("run", "--nnodes", "2", "--node-rank", "1", "--nproc-per-node", "2",
                    "--master-addr", "127.0.0.1", "--master-port", port, str(script), timeout=60)
    [(code, out, err)] = outputs([node0], timeout=60)
    assert refused.returncode == 2 and "--nproc-per-node" in refused.stderr
    assert code == 1 and out == "", err  # no worker started
    assert err.strip().splitlines()[-1] == (
        "shoal run: failed: node(s) 1 of 2 did not join within 6 s (--join-timeout); a launcher "
        "was refused: --nproc-per-node: node 0's job has 1, this node 2: give every node the same")


def test_a_plain_script_failing_on_one_node_stops_every_node(tmp_path):
    """Rank 1 (node 1) gives up; rank 0 would sleep for two minutes: node 0 stops it."""
    script = plain_script_where_rank_1_gives_up(tmp_path / "fail.py")
    runs = _nodes(str(script), 2, 1, timeout=60)
    for code, _, err in runs:
        assert code == 1, err
        assert err.strip().splitlines()[-1] == (
            "shoal run: failed: worker 1 (rank 1, node 1) exited with code 1")
    assert "[worker 1] rank 1 gives up" in runs[1][1]


@pytest.mark.skipif(not LONG, reason="CI checks the barrier without processes (SHOAL_LONG_TESTS=1 runs it)")
def test_with_max_restarts_a_plain_scripts_failure_on_one_node_starts_every_nodes_workers_again(tmp_path):
    """Rank 1 (node 1) fails after the last step, once node 0's worker has ended well: node 0
    still starts its worker again (it waited for node 1's to end well too), and the restart
    resumes from the script's checkpoint, at its end. (One node's restart mid-run is
    test_run's.)"""
    fail_at = 10
    script = str(plain_script_resuming_from_its_checkpoint(tmp_path / "resuming.py"))
    (code0, out0, err0), (code1, _, err1) = _nodes(script, 2, 1, "--max-restarts", "1", script_args=(
        str(tmp_path / "state.pt"), str(fail_at)))
    assert (code0, code1) == (0, 0), err0 + err1
    ended = attempts_ended(out0)
    assert ended[-1].startswith(f"attempt 1 of 1 from step {fail_at}: ")
    assert len(ended) == 2  # the first attempt ended well on node 0
    restart = ("shoal run: worker 1 (rank 1, node 1) exited with code 1; starting every worker again "
               "(restart 1 of 1)")
    assert restart in err0.splitlines() and restart in err1.splitlines()


def test_an_elastic_script_survives_losing_another_nodes_only_worker(tmp_path):
    """shoal.train across two nodes; node 1's only worker dies at step 10. Node 0 finishes the
    epoch alone; node 1's launcher stays until the job ends and reports it survived."""
    script = elastic_script_losing_rank_1(tmp_path / "elastic_kill.py")
    (code0, out0, err0), (code1, _, err1) = _nodes(str(script), 2, 1, env={**os.environ, "EPOCHS": "1"})
    assert (code0, code1) == (0, 0), err0 + err1
    assert "29 steps on 1 worker(s)" in out0
    assert "survived: worker 1 (rank 1, node 1) killed by SIGKILL" in err1


@pytest.mark.skipif(namespaces_available() is None and not LONG,
                    reason="the cut-off test covers the takeover where hosts can be built (SHOAL_LONG_TESTS=1 runs it)")
def test_an_elastic_job_goes_on_when_node_0_is_lost_under_node_1s_coordinator(tmp_path):
    """Three nodes of one worker each. At step 10 node 0's launcher is SIGKILLed: its worker,
    the job's coordinator and the store go with it. Node 1 takes the coordinator over on the
    ports it reserved, node 2 follows, the two workers left (told both coordinators) go on from
    their heartbeats' generation, and the job ends as one process ends it undisturbed."""
    script = elastic_with_step_hook(tmp_path / "lose_node_0.py", (
        "if os.environ['RANK'] == '0' and self.position == 10:\n"
        "    os.kill(int(os.environ['SHOAL_LAUNCHER_PID']), signal.SIGKILL)\n"
        "    time.sleep(60)  # the kernel ends it with its launcher"))
    env = {**os.environ, "EPOCHS": "1"}
    (code0, _, _), (code1, out1, err1), (code2, _, err2) = _nodes(str(script), 3, 1, env=env)
    assert (code0, code1, code2) == (-signal.SIGKILL, 0, 0), err1 + err2
    lost = "shoal run: node 0 stopped answering at its store"
    [takeover] = [line for line in err1.splitlines() if line.startswith(lost)]
    assert "; node 1 took over the job's coordinator at http://127.0.0.1:" in takeover
    assert "; following node 1's coordinator at http://127.0.0.1:" in err2
    assert f"shoal run: survived: {lost[len('shoal run: '):]}" in err2
    assert f"[worker 1] 29 steps on 2 worker(s): accuracy {undisturbed_accuracy()}" in out1


def _cut_at_step_10(tmp_path, nnodes: int, node: int, *flags: str) -> tuple[list[tuple[int, str, str]], list[str]]:
    """``nnodes`` hosts of one worker each (``--heartbeat-timeout 2``, one epoch): at step 10
    ``node``'s cable is pulled, while its worker waits for it. Each node's (exit code, stdout,
    stderr), and the hosts' addresses."""
    at_step_10, cut = tmp_path / "at-step-10", tmp_path / "cut"
    script = elastic_with_step_hook(tmp_path / f"cut_node_{node}.py", (
        f"if os.environ['RANK'] == '{node}' and self.position == 10 and not os.path.exists({str(cut)!r}):\n"
        f"    open({str(at_step_10)!r}, 'w').close()\n"
        f"    while not os.path.exists({str(cut)!r}):\n"
        "        time.sleep(0.01)"))
    hosts = Hosts(nnodes)

    def cut_at_step_10(node_0: subprocess.Popen) -> None:
        while not at_step_10.exists() and node_0.poll() is None:
            time.sleep(0.05)
        hosts.cut(node)
        cut.touch()

    def popen(argv, **kwargs):
        process = hosts.popen(int(argv[argv.index("--node-rank") + 1]), argv, **kwargs)
        if argv[argv.index("--node-rank") + 1] == "0":  # the last started
            threading.Thread(target=cut_at_step_10, args=(process,), daemon=True).start()
        return process

    try:
        ended = _nodes(str(script), nnodes, 1, "--heartbeat-timeout", "2", *flags, popen=popen,
                       master_addr=hosts.addresses[0], env={**os.environ, "EPOCHS": "1"})
    finally:
        hosts.close()
    assert cut.exists()
    return ended, hosts.addresses


def _failed_for_its_quorum(stderr: str, node: int, nnodes: int, patience: float) -> None:
    """``node``'s launcher failed the job holding its own workers alone, a little after
    ``patience`` seconds (checked once a second)."""
    said = re.search(rf"^shoal run: failed: node {node}'s coordinator hears from live workers on node\(s\) {node} "
                     rf"only, of {nnodes} nodes: not a majority \(--quorum majority\); node {node} may be cut off "
                     r"from the others \(held (\d+) s\)", stderr, re.MULTILINE)
    assert said and patience <= int(said.group(1)) <= patience + 3, stderr


@pytest.mark.skipif(namespaces_available() is not None, reason=str(namespaces_available()))
def test_an_elastic_job_goes_on_when_node_0_is_cut_off_without_a_reset(tmp_path):
    """Three hosts of one worker each; at step 10 node 0's cable is pulled. Nothing is reset:
    its store and coordinator just stop answering, as a dead machine's do, and torch's
    TCPStore would wait a quarter of an hour for an answer. Nodes 1 and 2 take node 0 for gone
    once a call is left unanswered three heartbeat timeouts, node 1 takes over, the workers'
    requests leave the silent connections for it, and the job ends on their side as one
    process ends it undisturbed. Node 0, cut off with its own worker, holds it without a
    generation (one node of three is not a majority, ``--quorum majority``), and fails once
    the others have been silent as long: one side goes on, never two."""
    ((code0, out0, err0), (code1, out1, err1), (code2, _, err2)), addresses = _cut_at_step_10(tmp_path, 3, 0)
    assert (code0, code1, code2) == (1, 0, 0), err0 + err1 + err2
    _failed_for_its_quorum(err0, 0, 3, 6)
    assert "steps on" not in out0  # it never finished on its own
    lost = "shoal run: node 0 stopped answering at its store"
    [takeover] = [line for line in err1.splitlines() if line.startswith(lost)]
    assert takeover.endswith(f"no answer within 6 s; node 1 took over the job's coordinator at "
                             f"http://{addresses[1]}:{takeover.rsplit(':', 1)[1]}")
    assert f"; following node 1's coordinator at http://{addresses[1]}:" in err2
    assert f"[worker 1] 29 steps on 2 worker(s): accuracy {undisturbed_accuracy()}" in out1


@pytest.mark.skipif(not LONG or namespaces_available() is not None,
                    reason="the node 0 cut-off test covers the quorum (SHOAL_LONG_TESTS=1 runs it, as root)")
def test_node_1_cut_off_alone_takes_nothing_over_for_itself(tmp_path):
    """Node 1's cable pulled: it takes node 0 for gone and starts its coordinator, but only its
    own worker comes there. It holds that worker without a generation for as long as the
    others' could take to come (two heartbeat timeouts and an unanswered try's 23 s), then
    fails saying it may be the one cut off. Nodes 0 and 2 go on without it."""
    ((code0, out0, err0), (code1, out1, err1), (code2, _, err2)), _ = _cut_at_step_10(tmp_path, 3, 1)
    assert (code0, code1, code2) == (0, 1, 0), err0 + err1 + err2
    _failed_for_its_quorum(err1, 1, 3, 27)
    assert "steps on" not in out1
    assert "survived: node 1's launcher went silent for 6 s" in err0
    assert f"[worker 0] 29 steps on 2 worker(s): accuracy {undisturbed_accuracy()}" in out0


@pytest.mark.skipif(not LONG or namespaces_available() is not None,
                    reason="the node 0 cut-off test covers the quorum (SHOAL_LONG_TESTS=1 runs it, as root)")
def test_of_two_nodes_cut_apart_node_0_goes_on(tmp_path):
    """Two nodes cut apart: a tie, which node 0's side wins. Node 0 finishes alone; node 1,
    which took over for itself, fails."""
    ((code0, out0, err0), (code1, _, err1)), _ = _cut_at_step_10(tmp_path, 2, 0)
    assert (code0, code1) == (0, 1), err0 + err1
    _failed_for_its_quorum(err1, 1, 2, 27)
    assert f"[worker 0] 29 steps on 1 worker(s): accuracy {undisturbed_accuracy()}" in out0


@pytest.mark.skipif(not LONG or namespaces_available() is not None,
                    reason="the node 0 cut-off test covers the quorum (SHOAL_LONG_TESTS=1 runs it, as root)")
def test_with_quorum_none_both_sides_of_a_partition_go_on(tmp_path):
    """``--quorum none``: node 0 cut off finishes with its own worker, nodes 1 and 2 with theirs."""
    ((code0, out0, err0), (code1, out1, err1), (code2, _, err2)), _ = _cut_at_step_10(
        tmp_path, 3, 0, "--quorum", "none")
    assert (code0, code1, code2) == (0, 0, 0), err0 + err1 + err2
    assert "steps on 1 worker(s)" in out0 and "steps on 2 worker(s)" in out1


@pytest.mark.skipif(not LONG, reason="the cut-off test covers a silent node 0 (SHOAL_LONG_TESTS=1 runs it)")
def test_an_elastic_job_goes_on_when_node_0s_launcher_freezes(tmp_path):
    """SIGSTOP to node 0's launcher at step 10: its store and coordinator take every call and
    answer none, while the workers, node 0's too, train on without them. The workers' requests
    time out and turn to node 1, which took over after three heartbeat timeouts; it waits for
    them as long as such a try may take, and the job ends on nodes 1 and 2. (The frozen
    launcher is killed once they have.)"""
    script = elastic_with_step_hook(tmp_path / "freeze_node_0.py", (
        "if os.environ['RANK'] == '0' and self.position == 10:\n"
        "    os.kill(int(os.environ['SHOAL_LAUNCHER_PID']), signal.SIGSTOP)"))
    launched = []

    def kill_node_0_once_the_others_end() -> None:
        for other in launched[:2]:
            other.wait()
        launched[2].kill()

    def popen(argv, **kwargs):
        launched.append(subprocess.Popen(argv, **kwargs))
        if len(launched) == 3:  # node 0, the last started
            threading.Thread(target=kill_node_0_once_the_others_end, daemon=True).start()
        return launched[-1]

    _, (code1, _, err1), (code2, _, err2) = _nodes(str(script), 3, 1, "--heartbeat-timeout", "2", popen=popen,
                                                   env={**os.environ, "EPOCHS": "1"})
    assert (code1, code2) == (0, 0), err1 + err2
    assert "no answer within 6 s; node 1 took over the job's coordinator at " in err1
    assert "survived: node 0 stopped answering at its store" in err2


@pytest.mark.skipif(not LONG, reason="CI checks the successor's first generation as a unit "
                                     "(SHOAL_LONG_TESTS=1 runs it)")
def test_an_elastic_job_goes_on_when_node_0_is_lost_before_its_first_generation(tmp_path):
    """Node 0's launcher SIGKILLed 3 s after its worker started, before that worker joined:
    the others had joined node 0's coordinator (or were about to) and waited for it. Node 1's
    coordinator counts node 0's worker out, takes the others' heartbeats (of no generation
    yet) as their joining, and forms the first generation. (Before, it answered them evicted
    and the job failed.)"""
    script = tmp_path / "lose_node_0_early.py"
    script.write_text(
        "import os, runpy, signal, time\n"
        "if os.environ['RANK'] == '0':\n"
        "    time.sleep(3)\n"
        "    os.kill(int(os.environ['SHOAL_LAUNCHER_PID']), signal.SIGKILL)\n"
        "    time.sleep(60)  # the kernel ends it with its launcher\n"
        f"runpy.run_path({str(REPO / 'examples' / 'elastic.py')!r}, run_name='__main__')\n")
    (code0, _, _), (code1, out1, err1), (code2, _, err2) = _nodes(
        str(script), 3, 1, "--heartbeat-timeout", "2", env={**os.environ, "EPOCHS": "1"})
    assert (code0, code1, code2) == (-signal.SIGKILL, 0, 0), err1 + err2
    assert "; node 1 took over the job's coordinator at " in err1
    assert f"[worker 1] 29 steps on 2 worker(s): accuracy {undisturbed_accuracy()}" in out1


@pytest.mark.skipif(not LONG, reason="the SIGKILL test covers the takeover (SHOAL_LONG_TESTS=1 runs it)")
def test_an_elastic_job_goes_on_when_node_0_is_preempted(tmp_path):
    """SIGTERM to node 0's launcher at step 10 (its machine preempted): before, it failed every
    node, since its workers had not joined when it last looked. Now its worker leaves, it
    gives the others 5 s, and node 1 takes over; the job ends as one process ends it. (Steps
    are slowed to outlive those 5 s within one epoch: past a hundred steps, this task's
    training grows the float differences of another reduction order into the third decimal
    of its accuracy, so a longer run could not be compared.)"""
    script = elastic_with_step_hook(tmp_path / "preempt_node_0.py", (
        "time.sleep(0.5)\n"
        "if os.environ['RANK'] == '0' and self.position == 10:\n"
        "    os.kill(int(os.environ['SHOAL_LAUNCHER_PID']), signal.SIGTERM)"))
    (code0, _, err0), (code1, out1, err1), (code2, _, err2) = _nodes(
        str(script), 3, 1, env={**os.environ, "EPOCHS": "1"})
    assert (code0, code1, code2) == (143, 0, 0), err0 + err1 + err2
    assert "; node 1 took over the job's coordinator at " in err1
    assert f"[worker 1] 29 steps on 2 worker(s): accuracy {undisturbed_accuracy()}" in out1


@pytest.mark.skipif(not LONG, reason="CI checks the report by id as a unit (SHOAL_LONG_TESTS=1 runs it)")
def test_with_max_restarts_another_nodes_elastic_worker_starts_again_and_rejoins(tmp_path):
    """As on one node: node 1's only worker, killed at step 10, is started again by its
    launcher, which tells node 0's coordinator so: the job waits for it (--min-workers 2),
    although it takes two heartbeat timeouts to come back. It rejoins, and both nodes finish
    the epoch."""
    script = elastic_script_losing_rank_1_once(tmp_path / "elastic_kill_once.py", rejoin_after=4.0)
    (code0, out0, err0), (code1, _, err1) = _nodes(str(script), 2, 1, "--min-workers", "2", "--max-restarts", "1",
                                                   "--heartbeat-timeout", "2", env={**os.environ, "EPOCHS": "1"})
    assert (code0, code1) == (0, 0), err0 + err1
    assert "29 steps on 2 worker(s)" in out0
    assert err1.strip().splitlines() == [
        "shoal run: starting worker 1 (rank 1, node 1) again (restart 1 of 1): it rejoins the job",
        "shoal run: survived: worker 1 (rank 1, node 1) killed by SIGKILL"]


def test_a_node_waits_for_node_0_and_says_so_when_it_never_comes():
    result = shoal("run", "--nnodes", "2", "--node-rank", "1", "--master-addr", "127.0.0.1",
                   "--master-port", str(_free_port()), "--join-timeout", "1", PLAIN, timeout=60)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("shoal run: error: --master-addr: no node 0 answered at 127.0.0.1:")


@pytest.mark.skipif(namespaces_available() is not None, reason=str(namespaces_available()))
def test_two_hosts_meet_at_node_0s_address():
    """Node 0 on host 0, node 1 on host 1: node 1 reaches the store and the coordinator only at
    --master-addr, over the hosts' link, and gloo's traffic goes over it too."""
    hosts = Hosts(2)
    try:
        def popen(argv, **kwargs):
            return hosts.popen(int(argv[argv.index("--node-rank") + 1]), argv, **kwargs)
        before = hosts.tx_bytes(1)
        (code0, out0, err0), (code1, _, err1) = _nodes(PLAIN, 2, 1, popen=popen,
                                                       master_addr=hosts.addresses[0])
        sent = hosts.tx_bytes(1) - before
    finally:
        hosts.close()
    assert (code0, code1) == (0, 0), err0 + err1
    assert len(_losses(out0)) == 2
    assert sent > 1_000_000  # DDP's gradients for 2 epochs of digits, not just the rendezvous


def _stop_a_node_once_ready(tmp_path, node: int, signum: int, *flags: str) -> list[tuple[int, str, str]]:
    """Two nodes of one process each run a script that waits; once ``node``'s worker is
    ready its launcher gets ``signum``. Its workers (in sessions of their own) must go too."""
    script = tmp_path / "wait.py"
    script.write_text("import time\nprint('ready', flush=True)\ntime.sleep(120)\n")
    launched = []

    def popen(argv, **kwargs):
        process = subprocess.Popen(argv, **kwargs)
        launched.insert(0, process)  # node 1 comes first
        if len(launched) == 2:
            target = launched[node]
            assert target.stdout.readline().strip() == f"[worker {node}] ready"
            workers = psutil.Process(target.pid).children(recursive=True)
            target.send_signal(signum)
            assert psutil.wait_procs(workers, timeout=30)[1] == []
        return process

    return _nodes(str(script), 2, 1, *flags, popen=popen, timeout=60)


def test_sigterm_to_a_node_stops_its_workers_and_every_other_nodes(tmp_path):
    """A scheduler cancelling node 1: its workers go with it, and node 0 stops too, as a
    plain script needs."""
    (code0, _, err0), (code1, _, err1) = _stop_a_node_once_ready(tmp_path, 1, signal.SIGTERM)
    assert (code0, code1) == (1, 143), err0 + err1  # 143 = 128 + SIGTERM, as shoal train's
    assert err0.strip().splitlines()[-1] == "shoal run: failed: node 1: stopped (SIGTERM)"
    assert err1.strip().splitlines()[-1] == "shoal run: node 1: stopped (SIGTERM)"


def test_a_killed_node_0_takes_its_workers_and_the_other_nodes_stop(tmp_path):
    """SIGKILL to node 0's launcher (the OOM killer): no one can stop its workers but the
    kernel (PR_SET_PDEATHSIG), and node 1 finds the store gone. It stands in with the job's
    coordinator, and as no worker comes to it within two heartbeat timeouts (a plain
    script's never will), the job fails."""
    (code0, _, _), (code1, _, err1) = _stop_a_node_once_ready(tmp_path, 0, signal.SIGKILL,
                                                              "--heartbeat-timeout", "1")
    assert (code0, code1) == (-signal.SIGKILL, 1), err1
    assert err1.strip().splitlines()[-1].startswith("shoal run: failed: node 0 stopped answering")


def test_every_node_names_the_worker_that_failed_first_not_its_victims(tmp_path):
    """Rank 1 leaves an all-reduce loop (exit 3); rank 0's next all-reduce then fails too
    (exit 1), and node 0 hears of its own worker first. Both name rank 1, its exit earlier."""
    script = tmp_path / "culprit.py"
    script.write_text(
        "import sys, time, torch, torch.distributed as dist\n"
        "dist.init_process_group('gloo')\n"
        "value = torch.ones(1)\n"
        "for step in range(1_000_000):\n"
        "    dist.all_reduce(value)\n"
        "    time.sleep(0.01)\n"
        "    if step == 50 and dist.get_rank() == 1:\n"
        "        sys.exit(3)\n"
    )
    for code, _, err in _nodes(str(script), 2, 1, timeout=120):
        assert code == 1, err
        assert err.strip().splitlines()[-1].startswith(
            "shoal run: failed: worker 1 (rank 1, node 1) exited with code 3"), err


def test_a_failure_after_node_0s_workers_finished_still_fails_node_0(tmp_path):
    """Rank 0 is done at once; rank 1 fails 3 s later. Node 0's exit code is the job's: 1."""
    script = tmp_path / "late.py"
    script.write_text("import os, sys, time\n"
                      "if os.environ['RANK'] == '1':\n"
                      "    time.sleep(3)\n"
                      "    sys.exit('rank 1 fails late')\n")
    for code, _, err in _nodes(str(script), 2, 1, timeout=60):
        assert code == 1, err
        assert err.strip().splitlines()[-1] == (
            "shoal run: failed: worker 1 (rank 1, node 1) exited with code 1")


def test_a_node_still_at_work_after_node_0_is_done_is_left_to_finish(tmp_path):
    script = tmp_path / "uneven.py"
    script.write_text("import os, time\n"
                      "if os.environ['RANK'] == '1':\n"
                      "    time.sleep(5)\n"
                      "    print('rank 1 done', flush=True)\n")
    (code0, _, err0), (code1, out1, err1) = _nodes(str(script), 2, 1, timeout=60)
    assert (code0, code1) == (0, 0), err0 + err1
    assert "[worker 1] rank 1 done" in out1


def test_an_elastic_node_whose_worker_hangs_reports_the_job_it_survived(tmp_path):
    """Node 1's only worker freezes (SIGSTOP) at step 10: the coordinator evicts it, node 0
    finishes the job, and node 1 stops the frozen worker and says the job survived it."""
    script = tmp_path / "elastic_hang.py"
    script.write_text(
        elastic_script_losing_rank_1(tmp_path / "unused.py").read_text().replace("SIGKILL", "SIGSTOP"))
    (code0, out0, err0), (code1, _, err1) = _nodes(str(script), 2, 1, "--heartbeat-timeout", "2",
                                                   env={**os.environ, "EPOCHS": "1"})
    assert (code0, code1) == (0, 0), err0 + err1
    assert "29 steps on 1 worker(s)" in out0
    assert ("survived: worker 1 (rank 1, node 1) evicted by the coordinator (hung or cut off), "
            "then stopped here") in err1


def test_a_second_sigterm_kills_workers_that_ignore_the_first(tmp_path):
    """A worker that traps SIGTERM would hold the launcher for the 30 s grace: a second
    SIGTERM ends it at once, with one line and no traceback."""
    script, noted = tmp_path / "stubborn.py", tmp_path / "noted"
    script.write_text("import signal, time\n"
                      f"signal.signal(signal.SIGTERM, lambda *_: open({str(noted)!r}, 'w').close())\n"
                      "print('ready', flush=True)\n"
                      "while True:\n"
                      "    time.sleep(0.1)\n")
    launcher = subprocess.Popen([sys.executable, "-m", "shoal.cli.main", "run", str(script)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert launcher.stdout.readline().strip() == "[worker 0] ready"
    worker = psutil.Process(launcher.pid).children()[0]
    launcher.send_signal(signal.SIGTERM)
    while not noted.exists():  # the worker got the first SIGTERM and goes on
        assert launcher.poll() is None
        time.sleep(0.01)
    launcher.send_signal(signal.SIGTERM)
    _, err = launcher.communicate(timeout=20)  # well inside the 30 s grace
    assert launcher.returncode == 143
    assert err.strip().splitlines() == ["shoal run: stopped (SIGTERM)"]
    assert psutil.wait_procs([worker], timeout=10)[1] == []


def test_a_node_killed_and_started_again_rejoins_the_running_job(tmp_path):
    """An elastic job of two nodes: node 1's launcher is SIGKILLed mid-run (its worker goes
    with it) and started again with the same command. It waits for the coordinator to
    declare the old worker dead, takes rank 1 again, and its worker rejoins: the job ends
    with two workers, and both nodes exit 0."""
    script = tmp_path / "elastic.py"
    script.write_text(
        newcomer_wait(50) +  # node 0's worker, alone, waits there for the node started again
        "import torch, torch.nn.functional as F, shoal\n"
        "from torch.utils.data import TensorDataset\n"
        "def loss_fn(model, batch):\n"
        "    return F.mse_loss(model(batch[0]), batch[1], reduction='sum')\n"
        "torch.manual_seed(0)\n"
        "model = torch.nn.Linear(4, 1)\n"
        "print('training', flush=True)\n"
        "result = shoal.train(model, torch.optim.SGD(model.parameters(), lr=0.01),\n"
        "                     TensorDataset(torch.randn(512, 4), torch.randn(512, 1)), loss_fn,\n"
        "                     global_batch_size=8, steps=100)\n"
        "if result.is_leader:\n"
        "    print(f'{result.steps} steps, {result.world_size} workers at the end', flush=True)\n"
    )
    job = ["--nnodes", "2", "--master-port", str(_free_port()), "--heartbeat-timeout", "2"]
    first = _launch(script, *job, "--node-rank", "1")
    node0 = _launch(script, *job, "--node-rank", "0")
    nodes = [node0, first]
    try:
        assert first.stdout.readline().strip() == "[worker 1] training"
        first.kill()
        first.wait()
        again = _launch(script, *job, "--node-rank", "1", "--join-timeout", "60")
        nodes.append(again)
        (code0, out0, err0), (code_again, _, err_again) = outputs([node0, again], timeout=120)
    finally:
        outputs(nodes, timeout=10)
    assert (code0, code_again) == (0, 0), err0 + err_again
    assert "[worker 0] 100 steps, 2 workers at the end" in out0


def test_a_plain_job_fails_when_another_nodes_launcher_goes_silent(tmp_path):
    """SIGKILL to node 1's launcher: its worker goes with it, and node 0's worker, which is
    in no collective that would notice, is stopped once node 1 has been silent for three
    heartbeat timeouts (6 s here)."""
    (code0, _, err0), (code1, _, _) = _stop_a_node_once_ready(tmp_path, 1, signal.SIGKILL, "--heartbeat-timeout", "2")
    assert (code0, code1) == (1, -signal.SIGKILL), err0
    assert err0.strip().splitlines()[-1] == "shoal run: failed: node 1's launcher went silent for 6 s"


def test_a_node_done_long_before_node_0_waits_for_it_and_is_not_taken_for_gone(tmp_path):
    """Rank 1 (node 1) is done at once, rank 0 takes 6 s: twice the 3 s after which node 0
    takes a silent node for gone. Node 1 stays, beating, until node 0 is done."""
    script = tmp_path / "early.py"
    script.write_text("import os, time\n"
                      "if os.environ['RANK'] == '0':\n"
                      "    time.sleep(6)\n")
    for code, _, err in _nodes(str(script), 2, 1, "--heartbeat-timeout", "1", timeout=60):
        assert code == 0, err


def test_a_ddp_job_that_loses_a_node_ends_at_once_and_names_it(tmp_path):
    """Node 1's launcher is SIGKILLed in the middle of a gloo all-reduce loop: node 0's
    worker fails at once, and node 0, not waiting out its exit barrier for a node that is
    gone, names the silent node."""
    script = tmp_path / "ddp_loop.py"
    script.write_text(
        "import time, torch, torch.distributed as dist\n"
        "dist.init_process_group('gloo')\n"
        "value = torch.ones(1)\n"
        "dist.all_reduce(value)\n"
        "print('ready', flush=True)\n"
        "while True:  # not a busy loop: the tests beside this one keep their timings\n"
        "    dist.all_reduce(value)\n"
        "    time.sleep(0.01)\n"
    )
    launched = []

    def popen(argv, **kwargs):
        process = subprocess.Popen(argv, **kwargs)
        launched.insert(0, process)
        if len(launched) == 2:
            assert launched[1].stdout.readline().strip() == "[worker 1] ready"
            launched[1].kill()
        return process

    (code0, _, err0), (code1, _, _) = _nodes(str(script), 2, 1, "--heartbeat-timeout", "2",
                                             popen=popen, timeout=60)
    assert (code0, code1) == (1, -signal.SIGKILL), err0
    assert "node 1's launcher went silent for 6 s" in err0.strip().splitlines()[-1]


def test_a_node_that_follows_node_1_fails_the_job_if_node_1_goes_silent_while_it_runs():
    """After node 0's loss the other nodes hear the job only from node 1's coordinator. If it
    stops answering too (node 1 lost), a follower must not keep node 0's last word, or its own
    last status of a running job, and wait forever: it gives up after the same patience it
    gave the takeover. A job that had ended is not failed for it."""
    from shoal.config import RunConfig
    from shoal.launch.script_job import _RemoteJob

    config = RunConfig(script="train.py", nnodes=3, nproc_per_node=1, master_addr="127.0.0.1")
    running = {"status": "running", "workers": {"1": {"alive": True, "finished": False}}}
    job = _RemoteJob("http://127.0.0.1:9", "t", 0.25)  # (a silence longer than two requests' bound)
    job.follow("http://127.0.0.1:9", "node 0 stopped answering", None, patience=0.5)
    job.check_successor({}, config)  # no word yet: it waits
    job.check_successor(running, config)  # a worker came: node 1 has the job
    assert job.successor_has_the_job
    time.sleep(0.6)  # node 1 silent for longer than that patience (status() saw no answer)
    with pytest.raises(rendezvous_keys.NodeGone, match="node 1's coordinator stopped answering too"):
        job.check_successor(running, config)
    job.check_successor({**running, "status": "completed"}, config)


def _freeze(pid: int) -> None:
    """SIGSTOP, once it has taken hold (a call sent just before would still be answered)."""
    os.kill(pid, signal.SIGSTOP)
    while psutil.Process(pid).status() != psutil.STATUS_STOPPED:
        time.sleep(0.01)


@pytest.mark.parametrize(("loss", "said"), [("frozen", "no answer within 2 s"),
                                             ("killed", "(Failed to recv|Connection reset by peer)")])
def test_a_node_takes_node_0_for_gone_when_its_store_leaves_a_call_unanswered_or_resets(loss, said):
    """Node 0 frozen (here its launcher SIGSTOPped) or cut off refuses nothing: torch's TCPStore
    client waits for an answer as long as the connection lasts (a quarter of an hour once a link
    is down; its own timeout bounds only ``get`` and ``wait``). The node's own patience
    decides, and every later call says so at once. Only a node 0 whose machine answered (its
    launcher killed: the connection reset) is gone for sure; a silent one may be alive on the
    other side of a partition (``host_unanswering``: a takeover then needs a quorum)."""
    node0 = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from torch.distributed import TCPStore\n"
        "from shoal.launch.rendezvous import NodeRendezvous\n"
        "store = TCPStore('127.0.0.1', 0, is_master=True, wait_for_workers=False)\n"
        "NodeRendezvous.host(store, 2, {'--nnodes': 2}, url='http://x', token='t', run_id='r')\n"
        "print(store.port, flush=True)\n"
        "time.sleep(120)\n")], stdout=subprocess.PIPE, text=True)
    try:
        port = int(node0.stdout.readline())
        node1 = rendezvous_keys.NodeRendezvous.join("127.0.0.1", port, None, 2, {"--nnodes": 2}, None,
                                                    timeout=30, patience=2.0)
        assert not node1.failed()
        if loss == "frozen":
            _freeze(node0.pid)
        else:
            node0.kill()
            node0.wait()
        for _ in range(2):
            with pytest.raises(rendezvous_keys.NodeGone, match=f"node 0 stopped answering at its store .*: {said}"):
                node1.failed()
        assert node1.host_unanswering is (loss == "frozen")
        with pytest.raises(rendezvous_keys.NodeGone):
            node1.finish()
    finally:
        node0.kill()
        node0.send_signal(signal.SIGCONT)
        node0.communicate()


def test_a_node_beats_while_its_launcher_waits_on_something_else():
    """Beats come from a thread of their own: a launcher whose main loop waits (on the
    coordinator's answer, on an exit being handled) for longer than node 0's silence limit is
    not taken for gone; one that finished is no longer watched."""
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    shape = {"--nnodes": 2}
    node0 = rendezvous_keys.NodeRendezvous.host(store, 2, shape, url="http://x", token="t", run_id="r")
    node1 = rendezvous_keys.NodeRendezvous.join("127.0.0.1", store.port, None, 2, shape, None, timeout=30)
    try:
        assert node0.silent_nodes(0.5) == []  # the first look: node 1's count noted
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:  # node 1's main loop busy elsewhere all along
            assert node0.silent_nodes(0.5) == []
            time.sleep(0.1)
    finally:
        node1.finish()
    assert node1._beater is not None and not node1._beater.is_alive()


def test_a_restart_asked_for_while_a_node_waits_having_succeeded_takes_every_node_to_a_new_store():
    """--max-restarts, the nodes' side: node 0's workers ended well and it waits for node 1's;
    node 1's worker fails. Node 0 leaves its wait for the restart, both meet at the barrier,
    and both go on to attempt 1 at a store node 0 opened for it. Then every node succeeds.
    (The processes are the two-node test's, with SHOAL_LONG_TESTS=1.)"""
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    shape = {"--nnodes": 2}
    node0 = rendezvous_keys.NodeRendezvous.host(store, 2, shape, url="http://x", token="t", run_id="r")
    node1 = rendezvous_keys.NodeRendezvous.join("127.0.0.1", store.port, None, 2, shape, None, timeout=30)
    for node in (node0, node1):
        node.max_restarts = 1
    try:
        outcome = {}
        waiter = threading.Thread(target=lambda: outcome.update(succeeded=node0.succeeded(lambda: True)))
        waiter.start()
        deadline = time.monotonic() + 30
        while store.add("shoal/run/succeeded/0", 0) < 1:  # node 0 counted itself
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert node1.report_failure(time.time(), "worker 1 (rank 1, node 1) exited with code 1", restartable=True)
        waiter.join(timeout=30)
        assert outcome == {"succeeded": False} and node0.restart_requested() and not node0.failed()
        assert node0.failures(0) == ["worker 1 (rank 1, node 1) exited with code 1"] and node0.failures() == []
        stopped = {}
        threads = [threading.Thread(target=lambda n=n: stopped.update({n.node_rank: n.stopped_for_restart(lambda: True)}))
                   for n in (node0, node1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert stopped == {0: True, 1: True}
        assert node0.attempt == node1.attempt == 1
        assert node0.store_port == node1.store_port != store.port
        TCPStore("127.0.0.1", node1.store_port, is_master=False, timeout=timedelta(seconds=10)).set("k", "v")
        assert not node0.restart_requested()  # attempt 1's flag is its own
        assert not node1.report_failure(time.time(), "worker 1 again", restartable=True)  # none left
        deadline = time.monotonic() + 30
        while not node0.failed():  # a store's set is not answered: node 0's check may come first
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert node0.failures() == ["worker 1 again"]
    finally:
        node1.finish()

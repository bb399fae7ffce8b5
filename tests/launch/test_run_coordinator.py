"""`shoal run --coordinator`: nodes whose script workers join a standalone coordinator, so that
the job survives losing any node's launcher, and a node started again rejoins it."""

from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import psutil

from shoal import _protocol
from tests.conftest import REPO, outputs, shoal
from tests.launch.test_run import elastic_with_step_hook

TOKEN = "script-token"
EXAMPLE = str(REPO / "examples" / "elastic.py")


def start_coordinator(*flags: str) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "shoal.cli.main", "coordinator", "--port", "0", "--token", TOKEN,
         "--heartbeat-timeout", "2", "--linger", "30", *flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = re.search(r"listening on (\S+)", process.stdout.readline()).group(1)
    return process, url


def status(url: str) -> dict:
    return httpx.get(f"{url}/status", headers={"Authorization": f"Bearer {TOKEN}"}).json()


def node(url: str, script, *flags: str, env: dict | None = None) -> subprocess.Popen:
    """One node's `shoal run --coordinator`."""
    return subprocess.Popen(
        [sys.executable, "-m", "shoal.cli.main", "run", "--coordinator", url.removeprefix("http://"),
         "--token", TOKEN, *flags, str(script)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "EPOCHS": "1", **(env or {})})


def test_the_nodes_of_one_job_must_run_one_script_module_or_program():
    """The admission key: a script's file name (the directory may differ between machines),
    a module, a program; the same name run in another way is another job's."""
    from shoal.config import RunConfig
    from shoal.launch.remote_script import _script_key

    keys = [_script_key(RunConfig(script=script, **how)) for script, how in [
        ("/a/train.py", {}), ("/b/train.py", {}), ("train.py", {"no_python": True}), ("train", {"module": True})]]
    assert keys == ["train.py", "train.py", "--no-python train.py", "-m train"]


def test_a_wrapper_programs_shoal_train_child_is_known_by_the_pid_its_launcher_started(monkeypatch):
    """`shoal run --no-python ./wrapper.sh` whose wrapper runs python without exec: the runner
    names its own pid (the wrapper's) in SHOAL_WORKER_PID, and the worker joins under it, so
    that the launcher's exit report by pid finds it."""
    from shoal.runtime.context import _launched_pid

    monkeypatch.delenv("SHOAL_WORKER_PID", raising=False)
    assert _launched_pid() == os.getpid()
    monkeypatch.setenv("SHOAL_WORKER_PID", "4242")
    assert _launched_pid() == 4242


def newcomer_wait(at_step: int) -> str:
    """Source that makes a script's ``shoal.train`` workers, left alone at ``at_step`` by a
    lost peer, wait there until the coordinator has formed a generation with the newcomer that
    the test brings and they have heard of it (so the job cannot end before the newcomer
    joins). The worker given DIE_ONCE=FILE kills itself at step 10, once; worker 0, given
    HOLD_WORKER_0=FILE, creates FILE at step 5 and waits there to be killed."""
    return (
        "import os, signal, time\n"
        "import httpx\n"
        "import shoal.runtime.trainer as trainer\n"
        "step = trainer._Loop._step\n"
        "def members():\n"
        "    headers = {'Authorization': 'Bearer ' + os.environ['SHOAL_TOKEN']}\n"
        "    return httpx.get(os.environ['SHOAL_COORDINATOR'] + '/status', headers=headers).json()['members']\n"
        "def step_that_waits(self, *args):\n"
        "    held = os.environ.get('HOLD_WORKER_0')\n"
        "    if held and self.position == 5 and self.context.worker_id == 0 and not os.path.exists(held):\n"
        "        open(held, 'w').close()\n"
        "        time.sleep(600)  # until the test kills it\n"
        "    marker = os.environ.get('DIE_ONCE')\n"
        "    if marker and self.position == 10 and not os.path.exists(marker):\n"
        "        open(marker, 'w').close()\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        f"    if self.position == {at_step} and len(self.context.members) == 1:\n"
        "        deadline = time.monotonic() + 120\n"
        "        while len(members()) < 2 or self.context.latest_generation == self.context.generation:\n"
        "            assert time.monotonic() < deadline, 'no newcomer came'\n"
        "            time.sleep(0.05)\n"
        "    step(self, *args)\n"
        "trainer._Loop._step = step_that_waits\n"
    )


def waiting_for_a_newcomer(path):
    """examples/elastic.py with :func:`newcomer_wait` at step 20."""
    path.write_text(newcomer_wait(20) + f"import runpy\nrunpy.run_path({EXAMPLE!r}, run_name='__main__')\n")
    return path


@functools.cache  # one process's run is the same for every test that compares with it
def undisturbed_accuracy() -> str:
    """examples/elastic.py's accuracy after one epoch in one plain process."""
    result = subprocess.run([sys.executable, EXAMPLE], capture_output=True, text=True,
                            env={**os.environ, "EPOCHS": "1"}, check=True)
    return re.search(r"accuracy (\S+)", result.stdout).group(1)


def test_the_job_goes_on_without_a_killed_node_which_rejoins_when_started_again(tmp_path):
    """Kill any node's launcher (here the first worker's: with --nnodes it would be node 0,
    whose loss node 1 takes over once, and after which no node can rejoin): the others go on;
    the same command started again joins the running job; the model equals one process's."""
    coordinator, url = start_coordinator("--workers", "2")
    script, held = waiting_for_a_newcomer(tmp_path / "script.py"), tmp_path / "held"
    nodes = [node(url, script, env={"HOLD_WORKER_0": str(held)}) for _ in range(2)]
    try:
        deadline = time.monotonic() + 120
        while not held.exists():  # worker 0 at step 5, the job waiting for it
            assert time.monotonic() < deadline and all(n.poll() is None for n in nodes)
            time.sleep(0.05)
        leader_launcher = psutil.Process(status(url)["workers"]["0"]["pid"]).ppid()
        first, second = sorted(nodes, key=lambda n: n.pid != leader_launcher)
        first.send_signal(signal.SIGKILL)  # its worker dies with it
        first.communicate()
        again = node(url, script)
        (code, out, err), (code_again, out_again, err_again) = outputs([second, again], timeout=180)
        final = status(url)
    finally:
        for process in (*nodes, coordinator):
            process.kill()
            process.communicate()
    everything = out + err + out_again + err_again
    assert code == 0 and code_again == 0, everything
    assert final["status"] == "completed", (final, everything)
    printed = re.search(r"(\d+) steps on (\d+) worker\(s\): accuracy (\S+)", out + out_again)
    assert printed is not None, everything
    assert printed.groups() == ("29", "2", undisturbed_accuracy()), everything


def two_nodes(coordinator_flags: tuple[str, ...], script, first_flags: tuple[str, ...] = (),
              first_env: dict | None = None) -> tuple[tuple[int, str, str], tuple[int, str, str], dict]:
    """Two nodes of one worker each on a fresh coordinator, the first given ``first_flags``
    and ``first_env``: each one's (exit code, stdout, stderr), and the job's last status."""
    coordinator, url = start_coordinator(*coordinator_flags)
    try:
        first = node(url, script, *first_flags, env=first_env)
        other = node(url, script)
        ends = outputs([first, other], timeout=180)
        final = status(url)
    finally:
        coordinator.kill()
        coordinator.communicate()
    return ends[0], ends[1], final


def test_a_failed_worker_is_started_again_and_rejoins_with_max_restarts(tmp_path):
    """The job cannot go on without it (--min-workers 2): told of the restart, the coordinator
    waits for the worker to rejoin, under its id, instead of failing the job."""
    (code, out, err), (other_code, other_out, other_err), final = two_nodes(
        ("--workers", "2", "--min-workers", "2"), waiting_for_a_newcomer(tmp_path / "script.py"),
        ("--max-restarts", "1"), {"DIE_ONCE": str(tmp_path / "died")})
    assert code == 0 and other_code == 0, err + other_err
    assert "starting local worker 0 again (restart 1 of 1)" in err
    assert re.search(r"survived: worker \d \(local rank 0\) killed by SIGKILL", err), err
    assert final["status"] == "completed" and len(final["workers"]) == 2  # it rejoined as itself
    assert "29 steps on 2 worker(s)" in out + other_out


def freezing_once(path, marker):
    """examples/elastic.py whose worker given FREEZE=1 SIGSTOPs itself at step 10, once (``marker``)."""
    return elastic_with_step_hook(path, (
        f"if os.environ.get('FREEZE') and self.position == 10 and not os.path.exists({str(marker)!r}):\n"
        f"    open({str(marker)!r}, 'w').close()\n"
        "    os.kill(os.getpid(), signal.SIGSTOP)"))


def test_a_frozen_worker_is_killed_and_started_again_with_max_restarts(tmp_path):
    """A worker freezes (SIGSTOP) at step 10. Declared dead for silence, it is killed by its
    launcher and, with --max-restarts, started again; it rejoins, and the job (which cannot go
    on without it: --min-workers 2) completes on both. Without the kill the frozen worker
    stayed, and the job failed below --min-workers."""
    (code, out, err), (other_code, other_out, other_err), final = two_nodes(
        ("--workers", "2", "--min-workers", "2"), freezing_once(tmp_path / "script.py", tmp_path / "frozen"),
        ("--max-restarts", "1"), {"FREEZE": "1"})
    assert code == 0 and other_code == 0, err + other_err
    assert "starting local worker 0 again (restart 1 of 1)" in err
    assert re.search(r"survived: worker \d \(local rank 0\) evicted by the coordinator \(hung or cut off\), "
                     r"then stopped here", err), err
    assert final["status"] == "completed" and len(final["workers"]) == 2  # it rejoined as itself
    assert "29 steps on 2 worker(s)" in out + other_out


def test_a_node_whose_only_worker_froze_stays_for_the_end_and_reports_it_survived(tmp_path):
    """Without restarts: the frozen worker is killed, and its node's launcher stays until the
    job ends elsewhere, exits 0 and says what it survived (as it did while the frozen worker
    stayed until the end)."""
    (code, _, err), (other_code, other_out, other_err), final = two_nodes(
        ("--workers", "2"), freezing_once(tmp_path / "script.py", tmp_path / "frozen"), (), {"FREEZE": "1"})
    assert code == 0 and other_code == 0, err + other_err
    assert re.search(r"survived: worker \d \(local rank 0\) evicted by the coordinator \(hung or cut off\), "
                     r"then stopped here", err), err
    assert final["status"] == "completed"
    assert "29 steps on 1 worker(s)" in other_out


def test_a_worker_killed_after_it_finished_its_part_is_not_restarted_and_the_job_completes(tmp_path):
    """Node B's worker takes 8 s to report its end (SLOW_FINISH); node A's finished its part
    and waits for the job's end, and is SIGKILLed there. A restart would have nothing to do
    (and before, re-formed a group that could never meet): node A's launcher does not start
    it and says why; both exit 0, and the job completes once B's worker has finished.
    Node A looks at the job only every 30 s, so its worker joins and finishes unseen: the
    launcher learns its id as it exits (CI once raced into a restart that way)."""
    coordinator, url = start_coordinator("--workers", "2")
    script = tmp_path / "script.py"
    script.write_text(
        "import os, time, runpy\n"
        "import shoal.runtime.context as context\n"
        "finish = context.Context.finish\n"
        "def slow_finish(self, *args, **kwargs):\n"
        "    if os.environ.get('SLOW_FINISH'):\n"
        "        time.sleep(8)\n"
        "    finish(self, *args, **kwargs)\n"
        "context.Context.finish = slow_finish\n"
        f"runpy.run_path({EXAMPLE!r}, run_name='__main__')\n")
    try:
        finishing = node(url, script, "--max-restarts", "1", env={"SHOAL_RUN_STATUS_SECONDS": "30"})
        slow = node(url, script, env={"SLOW_FINISH": "1"})
        deadline = time.monotonic() + 120
        while not any(w["finished"] for w in status(url)["workers"].values()):
            assert time.monotonic() < deadline and finishing.poll() is None and slow.poll() is None
            time.sleep(0.1)
        [worker] = psutil.Process(finishing.pid).children()
        worker.kill()
        (code, _, err), (slow_code, _, slow_err) = outputs([finishing, slow], timeout=120)
        final = status(url)
    finally:
        coordinator.kill()
        coordinator.communicate()
    assert code == 0 and slow_code == 0, err + slow_err
    assert "starting local worker 0 again" not in err
    assert re.search(r"survived: worker \d \(local rank 0\) killed by SIGKILL after it finished its part", err), err
    assert final["status"] == "completed"


def test_a_plain_script_under_coordinator_fails_saying_why(tmp_path):
    """No RANK or MASTER_ADDR here, not even an outer launcher's: a torchrun script cannot meet
    anyone, and is told how. The coordinator stops waiting for the worker it will not get."""
    coordinator, url = start_coordinator("--workers", "1")
    outer = {"RANK": "3", "WORLD_SIZE": "4", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    try:
        code, out, err = outputs([node(url, REPO / "examples" / "plain_ddp.py", env=outer)], timeout=180)[0]
        failed = status(url)
    finally:
        coordinator.kill()
        coordinator.communicate()
    assert code == 1
    assert "environment variable RANK expected" in out
    assert failed["status"] == "failed" and "exited before joining: exited with code 1" in failed["reason"]
    assert err.strip().splitlines()[-1] == (
        f"shoal run: failed: the job failed: {failed['reason']}; none of them joined it: a script run "
        "with --coordinator meets the others through shoal.train, not torchrun's RANK/MASTER_ADDR")


def test_a_node_is_refused_before_its_workers_start(tmp_path):
    """A wrong token (here from $SHOAL_TOKEN), or another script than the job's: exit 2, one
    line, the job untouched."""
    coordinator, url = start_coordinator("--workers", "2")
    other = tmp_path / "other.py"
    other.write_text("raise SystemExit('never run')\n")
    try:
        httpx.post(f"{url}/launcher", json={"spec": {"shoal run SCRIPT": "elastic.py"},
                                            "protocol": _protocol.PROTOCOL},
                   headers={"Authorization": f"Bearer {TOKEN}"}).raise_for_status()
        address = url.removeprefix("http://")
        wrong_token = shoal("run", "--coordinator", address, EXAMPLE,  # the token by its variable
                            env={**os.environ, "SHOAL_TOKEN": "nope"})
        wrong_script = shoal("run", "--coordinator", address, "--token", TOKEN, str(other))
        untouched = status(url)
    finally:
        coordinator.kill()
        coordinator.communicate()
    assert (wrong_token.returncode, wrong_token.stderr) == (
        2, f"shoal run: error: --token: the coordinator at {address} refused it\n")
    assert (wrong_script.returncode, wrong_script.stderr) == (
        2, ("shoal run: error: shoal run SCRIPT: this job was started with elastic.py, this launcher "
            "gives other.py\n"))
    assert untouched["status"] == "waiting" and untouched["workers"] == {}


def test_sigterm_stops_a_nodes_workers_and_the_job_goes_on_without_them():
    """A preempted node: its workers' exits are reported at once (the others re-form without
    waiting out a heartbeat timeout), and it exits 143 as torchrun does."""
    coordinator, url = start_coordinator("--workers", "3")
    nodes = [node(url, EXAMPLE, *flags, env={"EPOCHS": "3"}) for flags in (["--nproc-per-node", "2"], [])]
    try:
        deadline = time.monotonic() + 120
        while status(url)["step"] < 5:
            assert time.monotonic() < deadline and all(n.poll() is None for n in nodes)
            time.sleep(0.05)
        nodes[0].send_signal(signal.SIGTERM)
        (code, _, err), (other_code, other_out, _) = outputs(nodes, timeout=180)
        final = status(url)
    finally:
        coordinator.kill()
        coordinator.communicate()
    assert code == 143 and err.strip().splitlines()[-1] == (
        "shoal run: stopped (SIGTERM); the job goes on without this node's workers")
    assert other_code == 0 and "87 steps on 1 worker(s)" in other_out
    causes = [worker["death_cause"] for worker in final["workers"].values()]
    assert final["status"] == "completed" and causes.count("killed by SIGTERM") == 2, causes

"""Kill the standalone coordinator mid-run and start it again on the same address: the
workers keep training through the outage, the new coordinator adopts their generation,
a later crash still re-forms the group (on the new coordinator's store), and the model
equals an undisturbed run's."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import httpx

from shoal.reliability.checks import relative_difference
from tests.conftest import load_json, load_jsonl, shoal

TOKEN = "restart-token"
TASK = ["--task", "quadratic", "--steps", "600", "--batch-size", "64", "--seed", "0"]


def coordinator(port: int, *flags: str) -> tuple[subprocess.Popen, int]:
    process = subprocess.Popen(
        [sys.executable, "-m", "shoal.cli.main", "coordinator", "--port", str(port), "--token", TOKEN,
         "--workers", "3", "--heartbeat-timeout", "2", "--linger", "5", *flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    port = int(re.search(r":(\d+)$", process.stdout.readline().strip()).group(1))
    return process, port


def get(port: int, path: str) -> dict:
    return httpx.get(f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Bearer {TOKEN}"}).json()


def step(port: int) -> int:
    try:
        return get(port, "/status")["step"]
    except httpx.TransportError:
        return -1


def losses_known(port: int) -> set[int]:
    """The steps whose whole loss the coordinator knows (every member's share reported)."""
    return {s["step"] for s in get(port, "/record")["steps"] if s["loss"] is not None}


def wait_until(launcher: subprocess.Popen, condition, seconds: float = 120) -> None:
    """Poll ``condition`` until it holds; fail if the launcher ends or time runs out first."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline and launcher.poll() is None
        time.sleep(0.05)


def _same_members_reformed(line: str) -> bool:
    """A coordinator's log line of a re-form with every member alive and the same members."""
    found = re.search(r"collective failed; all members alive.*; members (\[.*\]) -> (\[.*\])$", line)
    return found is not None and found[1] == found[2]


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait()


def test_training_survives_a_coordinator_restart(tmp_path):
    first, port = coordinator(0)
    launcher = subprocess.Popen(
        [sys.executable, "-m", "shoal.cli.main", "train", *TASK, "--workers", "3", "--quiet",
         "--coordinator", f"127.0.0.1:{port}", "--token", TOKEN,
         "--kill", "1@500", "--save-model", str(tmp_path / "model.pt")],
        stderr=subprocess.PIPE, text=True)
    second = None
    try:
        wait_until(launcher, lambda: step(port) >= 100)
        first.send_signal(signal.SIGKILL)
        first.wait()
        second, _ = coordinator(port)
        assert launcher.wait(timeout=240) == 0, launcher.stderr.read()
        status = httpx.get(f"http://127.0.0.1:{port}/status",  # it lingers after the end
                           headers={"Authorization": f"Bearer {TOKEN}"}).json()
        assert status["status"] == "completed"
        assert status["membership_changes"] >= 1  # the crash after the restart re-formed the group
        assert second.wait(timeout=60) == 0
        # Each coordinator logs its generations: the second one the generation it took over
        # from the workers and when it had heard from all of them, then the re-form after
        # the crash.
        assert first.stderr.read().splitlines() == ["shoal coordinator: generation 1: members [0, 1, 2]"]
        log = second.stderr.read().splitlines()
        assert log[0] == "shoal coordinator: generation 1: members [0, 1, 2]"
        # (worker 1 may die before the new coordinator hears it: then it says so)
        assert log[1].startswith("shoal coordinator: took over generation 1: heard members [")
        # On a loaded machine a collective can outwait its 2 s timeout with every member alive
        # (3 of 20 runs of this file beside a busy loop, each cause a gloo error raised in
        # tcp/unbound_buffer.cc, where its receive times out): a re-form with the same
        # members, which changes nothing this test checks.
        changes = [line for line in log[2:-1] if not _same_members_reformed(line)]
        assert len(changes) == 1, log
        assert re.search(r"generation \d+ -> \d+: worker 1: --kill 1@500", changes[0]), log
        assert changes[0].endswith("members [0, 1, 2] -> [0, 2]") and log[-1] == "shoal coordinator: job completed"
        assert status["takeover"]["members"] == [0, 1, 2] and status["takeover"]["heard"]
    finally:
        for process in (first, second, launcher):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
    result = shoal("train", *TASK, "--workers", "3", "--quiet", "--save-model",
                   str(tmp_path / "reference.pt"))
    assert result.returncode == 0, result.stderr
    assert relative_difference(tmp_path / "model.pt", tmp_path / "reference.pt") <= 1e-5


def test_with_its_state_file_a_restarted_coordinator_loses_nothing_not_even_the_end(tmp_path):
    """Worker 1 is killed once the coordinator has its share of step 0's loss; the coordinator
    is killed a few steps into the next generation and again after the job completed. Without
    ``--state`` the second would not know of the death (the change, worker 1's share of each
    step's loss) and the third would not know the job had ended."""
    state = str(tmp_path / "coordinator.jsonl")
    first, port = coordinator(0, "--state", state)
    processes = [first]
    output, samples = tmp_path / "results.json", tmp_path / "samples.jsonl"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "shoal.cli.main", "train", *TASK, "--workers", "3", "--quiet",
         "--coordinator", f"127.0.0.1:{port}", "--token", TOKEN,
         "--output", str(output), "--sample-log", str(samples)],
        stderr=subprocess.PIPE, text=True)
    processes.append(launcher)
    try:
        # Killed from outside, not by --kill: whether a worker's heartbeat carried its shares
        # before its own kill at a given step would be a race with the step rate.
        wait_until(launcher, lambda: 0 in losses_known(port))
        os.kill(get(port, "/status")["workers"]["1"]["pid"], signal.SIGKILL)
        death = step(port)
        wait_until(launcher, lambda: get(port, "/status")["generation"] >= 2 and step(port) >= death + 20)
        known = losses_known(port)
        kill(processes[0])
        processes.append(coordinator(port, "--state", state)[0])
        assert launcher.wait(timeout=240) == 0, launcher.stderr.read()
        assert get(port, "/status")["status"] == "completed"
        kill(processes[-1])  # while it lingers: a launcher that had not read the record yet
        third = coordinator(port, "--state", state)[0]
        processes.append(third)
        assert "took back the job's record" in third.stderr.readline()
        assert get(port, "/status")["status"] == "completed"
        record = get(port, "/record")
        third.send_signal(signal.SIGINT)  # no need to wait out its linger
        assert third.wait(timeout=30) == 0
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    results = load_json(output)
    change, *others = changes = results["membership_changes"]
    assert change["cause"].startswith("worker 1") and change["members_after"] == [0, 2], changes
    # On a loaded machine a collective can outwait its 2 s timeout with every member alive:
    # the group re-forms with the same members, which changes no promise checked here.
    assert all(other["cause"].startswith("collective failed; all members alive") and
               other["members_after"] == [0, 2] for other in others), changes
    lines = load_jsonl(samples)
    assert [line["step"] for line in lines] == list(range(600))
    # Every loss the first coordinator knew: those of generation 1 need worker 1's shares
    # (but for the last steps before its death, which it committed and never reported)
    assert 0 in known and known <= {line["step"] for line in lines if line["loss"] is not None}
    assert [s["step"] for s in record["steps"]] == list(range(600)) and record["results"] is not None

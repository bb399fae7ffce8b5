"""`shoal train --coordinator`: a launcher that cannot or must not join is refused before
any of its workers starts (one line, exit 2), and the job it tried to join is untouched."""

import contextlib
import http.server
import importlib.metadata
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

import shoal as shoal_package
from shoal import _protocol
from shoal.coordinator import Coordinator, Membership
from shoal.launch.joining import admission_refusal
from tests.conftest import LONG, shoal

JOB = ["--task", "digits", "--steps", "20", "--batch-size", "32", "--workers", "1", "--quiet"]


def test_a_launcher_for_another_job_is_refused_and_the_job_goes_on(tmp_path):
    membership = Membership(expected_workers=2, min_workers=1)  # held until a second good launcher comes
    coordinator = Coordinator(membership, token="t").start()
    joining = ["--coordinator", coordinator.url.removeprefix("http://"), "--token", "t"]
    first = subprocess.Popen([sys.executable, "-m", "shoal.cli.main", "train", *JOB, *joining],
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not membership.snapshot()["workers"]:
            assert time.monotonic() < deadline and first.poll() is None, "the first worker never joined"
            time.sleep(0.05)
        for flags, line in [
            (["--task", "ackley"], "--task: this job was started with digits, this launcher gives ackley"),
            (["--lr", "0.5"], "--lr: this job was started with 0.05, this launcher gives 0.5"),
        ]:
            refused = shoal("train", *JOB, *flags, *joining, timeout=60)
            assert (refused.returncode, refused.stderr.strip().splitlines()) == (2, [f"shoal train: error: {line}"])
        wrong_token = shoal("train", *JOB, *joining[:-1], "nope", timeout=60)
        assert wrong_token.returncode == 2
        assert wrong_token.stderr.strip().splitlines() == [
            f"shoal train: error: --token: the coordinator at {joining[1]} refused it"]
        assert list(membership.snapshot()["workers"]) == ["0"]  # no refused worker ever joined
        second = shoal("train", *JOB, *joining, timeout=120)
        assert second.returncode == 0, second.stderr
        assert first.wait(timeout=120) == 0, first.stderr.read()
        assert membership.status == "completed" and membership.membership_changes() == []
    finally:
        first.kill()
        first.wait()
        coordinator.stop()


def test_a_launcher_and_a_coordinator_of_other_shoal_protocols_do_not_mix(monkeypatch):
    """This coordinator (in this process) speaks protocol 99: a launcher of this shoal (a
    fresh process: ours) is refused before any worker starts (one line, exit 2), and so
    is a launcher that sends no protocol at all."""
    ours = _protocol.PROTOCOL
    monkeypatch.setattr(_protocol, "PROTOCOL", 99)
    membership = Membership(expected_workers=1, min_workers=1)
    coordinator = Coordinator(membership, token="t").start()
    try:
        address = coordinator.url.removeprefix("http://")
        refused = shoal("train", *JOB, "--coordinator", address, "--token", "t", timeout=60)
        assert refused.returncode == 2, refused.stderr
        assert refused.stderr.strip().splitlines() == [(
            f"shoal train: error: this launcher runs shoal {_protocol.VERSION} (protocol {ours}), the coordinator "
            f"shoal {_protocol.VERSION} (protocol 99): run one shoal version on every machine")]
        older = httpx.post(f"{coordinator.url}/launcher", json={"spec": {}}, headers={"Authorization": "Bearer t"})
        assert older.status_code == 409 and "older than protocol 1" in older.json()["error"]
        assert membership.snapshot()["workers"] == {} and membership.job_spec is None
    finally:
        coordinator.stop()


def test_the_version_a_refusal_names_is_the_installed_packages():
    assert _protocol.VERSION == importlib.metadata.version("shoal") == shoal_package.__version__


class _OlderCoordinator(http.server.BaseHTTPRequestHandler):
    """A coordinator from before protocols: it admits any launcher and says nothing more."""

    def do_POST(self):  # http.server's name
        self.rfile.read(int(self.headers["Content-Length"]))
        body = json.dumps({"ok": True}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_launcher_refuses_a_coordinator_that_admits_it_without_a_protocol():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _OlderCoordinator)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        address = f"127.0.0.1:{server.server_address[1]}"
        refusal = admission_refusal(f"http://{address}", "t", address, {}, "here/1/x")
    finally:
        server.shutdown()
        thread.join()
    assert refusal == (f"--coordinator: the coordinator at {address} runs a shoal older than protocol 1 "
                       f"(it sends no protocol), this launcher {_protocol.describe()}: run one shoal version "
                       "on every machine")


def test_an_unreachable_coordinator_is_one_line():
    result = shoal("train", *JOB, "--coordinator", "127.0.0.1:1", "--token", "t", timeout=120)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("shoal train: error: --coordinator: cannot reach http://127.0.0.1:1 ("), line


@contextlib.contextmanager
def _two_hosts_at_step_20(steps: int, *launcher_options: str, min_workers: int = 1,
                          **membership_options) -> Iterator[tuple[Membership, list[subprocess.Popen]]]:
    """Two launchers of one worker each (two hosts) on a coordinator in this process, once
    their job reached step 20 of ``steps``; every launcher is gone after."""
    membership = Membership(expected_workers=2, min_workers=min_workers, **membership_options)
    coordinator = Coordinator(membership, token="t").start()
    joining = ["--coordinator", coordinator.url.removeprefix("http://"), "--token", "t", *launcher_options]
    job = [*JOB[:2], "--steps", str(steps), *JOB[4:]]
    launchers = [subprocess.Popen([sys.executable, "-m", "shoal.cli.main", "train", *job, *joining],
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        deadline = time.monotonic() + 120
        while membership.snapshot()["step"] < 20:
            assert time.monotonic() < deadline and all(p.poll() is None for p in launchers)
            time.sleep(0.05)
        yield membership, launchers
    finally:
        for launcher in launchers:
            launcher.kill()
            launcher.wait()
        coordinator.stop()


def test_sigterm_to_one_hosts_launcher_stops_its_workers_and_the_job_goes_on(tmp_path):
    """A preempted host: its launcher passes SIGTERM to its workers, which leave at a step
    boundary, and exits 143; the other host goes on alone. Its workers are not
    started again, --restart or not. (Before, the launcher died at once and left its worker
    running, orphaned; later, --restart started the worker that had left again.)"""
    import psutil

    with _two_hosts_at_step_20(600, "--restart") as (membership, (preempted, survivor)):  # far from its end
        workers = psutil.Process(preempted.pid).children(recursive=True)
        assert workers
        preempted.terminate()
        assert preempted.wait(timeout=90) == 143
        assert preempted.stderr.read().strip().splitlines() == [
            "shoal train: this host's workers stopped (SIGTERM); the job goes on without them"]
        assert not [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]
        _goes_on_alone(membership, survivor)
        assert len(membership.membership_changes()) >= 1


def test_a_hosts_frozen_worker_is_killed_by_its_launcher_while_the_job_goes_on():
    """One host's worker freezes (SIGSTOP). Once the coordinator declared it dead, its launcher
    kills it, says so, and exits 3 as for an evicted host, while the other host goes on
    alone. (The frozen worker used to stay until the job ended, holding its
    memory, its device and its core, and its launcher with it.)"""
    import psutil

    with _two_hosts_at_step_20(3000, heartbeat_timeout=2.0) as (membership, (frozen_host, survivor)):
        workers = membership.snapshot()["workers"]
        [worker] = [p for p in psutil.Process(frozen_host.pid).children(recursive=True)
                    if p.pid in {known["pid"] for known in workers.values()}]
        [job_id] = [job_id for job_id, known in workers.items() if known["pid"] == worker.pid]
        worker.suspend()
        assert frozen_host.wait(timeout=60) == 3
        assert membership.status == "running"  # the job goes on without it
        assert frozen_host.stderr.read().strip().splitlines() == [
            (f"shoal: local worker 0 (worker {job_id}) was declared dead (no heartbeat) "
             f"and its process {worker.pid} still runs: killing it"),
            "shoal train: this host's workers were evicted (cut off or hung); the job goes on without them"]
        assert not worker.is_running()
        _goes_on_alone(membership, survivor)


def _goes_on_alone(membership: Membership, survivor: subprocess.Popen) -> None:
    """The other host's worker commits 50 more steps, or the job's last (the job completes)."""
    since = membership.snapshot()["step"]
    deadline = time.monotonic() + 60
    while membership.status != "completed" and membership.snapshot()["step"] < since + 50:
        assert time.monotonic() < deadline and survivor.poll() is None, survivor.stderr.read()
        time.sleep(0.05)


def _exit_code(launcher: subprocess.Popen, membership: Membership, timeout: float = 120) -> int:
    """The launcher's exit code; one still running after ``timeout`` is killed, and fails the
    test with what the job looked like then and what the launcher said."""
    try:
        return launcher.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        snapshot = membership.snapshot()
        launcher.kill()
        raise AssertionError(
            f"launcher still running after {timeout:g} s; job {snapshot['status']} {snapshot['reason']!r}, "
            f"generation {snapshot['generation']} of {snapshot['members']}, changes "
            f"{membership.membership_changes()}, workers {snapshot['workers']}; its stderr: "
            f"{launcher.communicate()[1]}") from None


@pytest.mark.skipif(not LONG, reason="quarantined: in 2 of 8 full CI runs the frozen host's launcher never "
                                     "exited (not seen alone or under load); SHOAL_LONG_TESTS=1 runs it")
def test_a_hosts_frozen_worker_is_killed_and_started_again_with_restart():
    """As above, with --restart and a job that cannot go on without the frozen worker
    (--min-workers 2): killed, it is started again, rejoins as itself, and both hosts finish
    the job. (Before, --restart left the killed worker out as an evicted one: the job failed
    below --min-workers.)"""
    import psutil

    with _two_hosts_at_step_20(60, "--restart", min_workers=2, heartbeat_timeout=2.0) as (
            membership, (frozen_host, other_host)):
        workers = membership.snapshot()["workers"]
        [worker] = [p for p in psutil.Process(frozen_host.pid).children(recursive=True)
                    if p.pid in {known["pid"] for known in workers.values()}]
        [job_id] = [job_id for job_id, known in workers.items() if known["pid"] == worker.pid]
        worker.suspend()
        try:
            assert _exit_code(frozen_host, membership) == 0, frozen_host.stderr.read()
            assert _exit_code(other_host, membership) == 0, other_host.stderr.read()
        finally:  # its launcher failed to: a stopped process outlives the launchers' kill
            if worker.is_running():
                worker.kill()
        lines = frozen_host.stderr.read().strip().splitlines()
        assert lines == [
            (f"shoal: local worker 0 (worker {job_id}) was declared dead (no heartbeat) "
             f"and its process {worker.pid} still runs: killing it"),
            "shoal: restarting local worker 0"], lines
        assert not worker.is_running()
        assert membership.status == "completed"
        assert [(c["cause"], c["members_after"]) for c in membership.membership_changes()] == [
            (f"worker {job_id}: no heartbeat for 2 s; rejoined", [0, 1])]


def test_a_joining_launchers_checkpoint_is_checked_before_its_workers_start(tmp_path):
    """As the embedded launcher's: a checkpoint of another task is one line and exit 2
    (before, every worker printed the CheckpointError's traceback and the job failed)."""
    from shoal.checkpoint import CheckpointStore, job_identity
    from shoal.tasks import TASKS

    model = TASKS["quadratic"](0).build_model()
    identity = job_identity(model, task="quadratic", global_batch_size=64, seed=0, strategy="allreduce")
    checkpoint = CheckpointStore(tmp_path).save(3, {"position": 3, "model": model.state_dict()}, identity)
    result = shoal("train", *JOB, "--resume", str(tmp_path), "--coordinator", "127.0.0.1:1", "--token", "t",
                   timeout=120)
    assert (result.returncode, result.stderr.strip().splitlines()) == (2, [
        f"shoal train: error: --resume: {checkpoint.path}: written by task 'quadratic', this job trains 'digits'"])


def test_a_joining_launcher_keeps_metrics_and_reports_what_it_resumed(tmp_path):
    """As the embedded launcher: --checkpoint-dir gets a metrics.json of the committed steps,
    and a job resumed from an older checkpoint reports it in results.json (`resumed`, with
    the steps redone) and covers the whole job in its results and sample log. (Before, a
    joining launcher wrote no metrics.json and no `resumed`.)"""
    import json

    from shoal.reliability.checks import exactly_once_violations
    from shoal.tasks import TASKS

    job = [*JOB[:2], "--steps", "40", *JOB[4:], "--checkpoint-every", "20"]

    def joined_run(*flags):
        coordinator = Coordinator(Membership(expected_workers=1, min_workers=1), token="t").start()
        try:
            result = shoal("train", *job, *flags, "--coordinator", coordinator.url.removeprefix("http://"),
                           "--token", "t", timeout=180)
            assert result.returncode == 0, result.stderr
        finally:
            coordinator.stop()

    first, second = tmp_path / "first", tmp_path / "second"
    joined_run("--checkpoint-dir", str(first))
    metrics = json.loads((first / "metrics.json").read_text())
    assert [s["step"] for s in metrics["steps"]] == list(range(40))
    joined_run("--resume", str(first / "step-000000020"), "--checkpoint-dir", str(second),
               "--output", str(tmp_path / "r.json"), "--sample-log", str(tmp_path / "s.jsonl"))
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["resumed"]["step"] == 20 and results["resumed"]["steps_redone"] == 20
    assert results["steps"] == 40
    size = TASKS["digits"].train_samples(0)
    assert exactly_once_violations(tmp_path / "s.jsonl", dataset_size=size, steps=40) == []
    resumed_metrics = json.loads((second / "metrics.json").read_text())
    assert [s["step"] for s in resumed_metrics["steps"]] == list(range(40))
    assert [s["loss"] is not None for s in resumed_metrics["steps"]] == [True] * 40  # from first's metrics

"""Whole-job interruptions: SIGKILL of every process or a SIGTERM, then `--resume`.

The resumed run must end with the model of an undisturbed run: bit for bit on the same
number of workers, within 1e-5 on another number (the sums are added in another order).
"""

from __future__ import annotations

import hashlib
import json
import random
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from shoal.checkpoint import CheckpointStore, job_identity
from shoal.reliability.checks import exactly_once_violations, relative_difference
from shoal.tasks import TASKS
from tests.conftest import DIGITS_4, load_json, shoal, train_job

STEPS = 60
JOB = DIGITS_4[:-2]  # 60 steps of digits, without --workers


@pytest.fixture
def reference(digits_allreduce):
    """The undisturbed run on 4 workers."""
    return digits_allreduce[0]


@pytest.fixture(scope="module")
def reference_on_two(tmp_path_factory):
    """The undisturbed run on 2 workers: what a 2-worker job resumed on 2 must equal bit for bit.
    (On more than 2, DDP's first step after a start sums its bucket in another order than
    the uninterrupted run's step did, as after any membership change: equal within 1e-7.)"""
    return train_job(tmp_path_factory.mktemp("on-two"), "allreduce", *JOB, "--workers", "2")[0]


def _digest(path) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(torch.load(path, weights_only=True).items()):
        digest.update(name.encode() + tensor.numpy().tobytes())
    return digest.hexdigest()


def _start(*args: str) -> subprocess.Popen:
    """The job to interrupt. Worker 0 sleeps (--slowdown) so that a step takes about 0.1 s: the
    interruption must land mid-run, and metrics.json trails the job by up to a second.
    Sleeping changes no number."""
    return subprocess.Popen([sys.executable, "-m", "shoal.cli.main", "train", *JOB, "--slowdown", "0=20",
                             *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_until_committed(job: subprocess.Popen, checkpoint_dir, step: int) -> None:
    """Until the launcher's metrics.json shows ``step`` committed (or the job ended: a failure)."""
    metrics = checkpoint_dir / "metrics.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and job.poll() is None:
        try:
            if any(s["step"] >= step for s in json.loads(metrics.read_text())["steps"]):
                return
        except (OSError, ValueError):
            pass  # not written yet
        time.sleep(0.05)
    pytest.fail(f"step {step} was not committed (job exit code {job.poll()})")


def test_a_whole_job_killed_at_a_random_step_resumes_bit_identically(reference_on_two, tmp_path):
    """SIGKILL to the launcher and every worker at once; then resume: bit-identical to the
    undisturbed run, every sample once. (4 -> 2 workers: tests/strategies/test_zero.py.)"""
    kill_at = random.Random(5).randint(15, 30)
    checkpoints = tmp_path / "checkpoints"
    job = _start("--workers", "2", "--checkpoint-dir", str(checkpoints), "--checkpoint-every", "10")
    _wait_until_committed(job, checkpoints, kill_at)
    everyone = [psutil.Process(job.pid), *psutil.Process(job.pid).children(recursive=True)]
    for process in everyone:
        process.kill()
    job.communicate(timeout=30)
    psutil.wait_procs(everyone, timeout=30)
    assert job.returncode == -signal.SIGKILL

    model, output, samples = tmp_path / "resumed.pt", tmp_path / "resumed.json", tmp_path / "samples.jsonl"
    result = shoal("train", *JOB, "--workers", "2", "--resume", str(checkpoints),
                   "--save-model", str(model), "--output", str(output), "--sample-log", str(samples))
    assert result.returncode == 0, result.stderr
    assert _digest(model) == _digest(reference_on_two)
    resumed = load_json(output)["resumed"]
    # metrics.json trails the job by a second: the kill came at kill_at or later
    assert resumed["step"] % 10 == 0 and resumed["step"] >= kill_at // 10 * 10 - 10
    assert resumed["steps_redone"] >= 0
    dataset_size = len(TASKS["digits"](0).train_dataset())
    assert exactly_once_violations(samples, dataset_size=dataset_size, steps=STEPS) == []



def test_sigterm_saves_the_last_commit_and_two_workers_resume_on_four(reference, tmp_path):
    """A preemption notice: the leader saves at its next step boundary and the job exits 143;
    no committed step is lost, and the job goes on with 4 workers instead of 2."""
    checkpoints = tmp_path / "checkpoints"
    job = _start("--workers", "2", "--checkpoint-dir", str(checkpoints), "--checkpoint-every", "1000")
    _wait_until_committed(job, checkpoints, 15)
    job.send_signal(signal.SIGTERM)
    _, stderr = job.communicate(timeout=90)
    assert job.returncode == 128 + signal.SIGTERM, stderr
    assert f"--resume {checkpoints}" in stderr
    saved = CheckpointStore(checkpoints).checkpoints()
    assert len(saved) == 1 and saved[0].step >= 15

    model, output = tmp_path / "resumed.pt", tmp_path / "resumed.json"
    result = shoal("train", *JOB, "--workers", "4", "--resume", str(checkpoints),
                   "--save-model", str(model), "--output", str(output))
    assert result.returncode == 0, result.stderr
    results = load_json(output)
    assert results["resumed"]["steps_redone"] == 0 and results["steps"] == STEPS
    assert relative_difference(model, reference) <= 1e-5


def test_a_bad_or_foreign_checkpoint_is_refused_before_training(tmp_path):
    """The newest checkpoint is corrupted (named, skipped); the one before it belongs to
    another task: one clear line, exit code 2, and no worker started."""
    model = TASKS["charlm"](0).build_model()
    identity = job_identity(model, task="charlm", global_batch_size=64, seed=0, strategy="allreduce")
    store = CheckpointStore(tmp_path)
    store.save(10, {"position": 10, "model": model.state_dict()}, identity)
    corrupted = store.save(20, {"position": 20, "model": model.state_dict()}, identity).path / "state.pt"
    corrupted.write_bytes(corrupted.read_bytes()[:-10])
    result = shoal("train", *JOB, "--workers", "2", "--resume", str(tmp_path))
    assert result.returncode == 2
    assert f"warning: skipping a bad checkpoint: {corrupted}" in result.stderr
    assert "error: --resume:" in result.stderr and "written by task 'charlm'" in result.stderr
    assert "coordinator listening" not in result.stderr


def test_a_restarted_worker_continues_the_jobs_own_checkpoint_directory(tmp_path):
    """The directory holds the job's checkpoints by the time a worker is restarted; that
    worker joins a running job, so it goes on with them (it used to refuse them as another
    job's, and the job fell below --min-workers)."""
    checkpoints = tmp_path / "checkpoints"
    result = shoal("train", "--task", "quadratic", "--workers", "3", "--steps", "200", "--quiet",
                   "--checkpoint-dir", str(checkpoints), "--checkpoint-every", "20",
                   "--kill", "1@50", "--restart", "--min-workers", "3",
                   "--output", str(tmp_path / "results.json"))
    assert result.returncode == 0, result.stderr
    changes = load_json(tmp_path / "results.json")["membership_changes"]
    assert any("rejoined" in change["cause"] for change in changes), changes
    assert CheckpointStore(checkpoints).latest_good(load=False)[0].step == 200


def test_a_checkpoint_beyond_the_runs_steps_is_refused(tmp_path):
    """It would train nothing and report the checkpoint's steps as done (it did: 'done: 10
    steps' for --steps 5)."""
    model = TASKS["digits"](0).build_model()
    identity = job_identity(model, task="digits", global_batch_size=64, seed=0, strategy="allreduce")
    checkpoint = CheckpointStore(tmp_path).save(10, {"position": 10, "model": model.state_dict()}, identity)
    result = shoal("train", "--task", "digits", "--batch-size", "64", "--workers", "2", "--steps", "5",
                   "--quiet", "--resume", str(tmp_path))
    assert (result.returncode, result.stderr.strip().splitlines()) == (2, [
        f"shoal train: error: --steps: {checkpoint.path} is at step 10, beyond this run's 5 steps"])

"""A collective slower than its timeout while every member is alive: the job waits longer."""

from __future__ import annotations

import re
import subprocess
import sys

import torch

from tests.conftest import shoal

STRAGGLER = """
import os, sys, time
import torch
import shoal
from shoal.tasks import TASKS

straggler_seconds = float(sys.argv[1])
task = TASKS["quadratic"](0)
torch.manual_seed(0)
model = task.build_model()
optimizer = task.build_optimizer(model, task.defaults.lr)

def loss_fn(model, batch):
    if os.environ.get("RANK") == "1":  # alive and beating, but slow at every step
        time.sleep(straggler_seconds)
    return task.loss(model, batch)

result = shoal.train(model, optimizer, task.train_dataset(), loss_fn, global_batch_size=64, steps=4, seed=0)
if result.is_leader:
    print("generation", result.generation, "steps", result.steps)
    torch.save(result.model.state_dict(), sys.argv[2])
"""


def test_a_straggler_slower_than_the_timeout_lengthens_it_and_changes_nothing(tmp_path):
    """Worker 1 lags 1.6 s behind at every step, the collective timeout is 1 s: worker 0's
    all-reduce of the first step times out with both alive. The coordinator doubles the
    timeout, shoal run says so, and the job completes with the model of a plain run.
    (Before, every try of that step timed out alike, and the workers gave up after five.)"""
    script = tmp_path / "straggler.py"
    script.write_text(STRAGGLER)
    plain = subprocess.run([sys.executable, str(script), "0", str(tmp_path / "plain.pt")],
                           capture_output=True, text=True, timeout=120, check=False)
    assert plain.returncode == 0, plain.stderr
    result = shoal("run", "--nproc-per-node", "2", "--heartbeat-timeout", "1", str(script), "1.6",
                   str(tmp_path / "job.pt"), timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    # shoal run says why the job waits longer; the first re-form lengthened the timeout (a
    # loaded machine may need a second), and no worker died
    told = [line for line in result.stderr.splitlines() if line.startswith("shoal run: ")]
    assert told and all(re.fullmatch(r"shoal run: generation \d+ -> \d+: collective failed; all members alive; "
                                     r".*; collective timeout now \d+ s; members \[0, 1\] -> \[0, 1\]", line)
                        for line in told), told
    assert told[0].endswith("; collective timeout now 2 s; members [0, 1] -> [0, 1]"), told
    [line] = [line for line in result.stdout.splitlines() if "generation" in line]
    assert line.split()[-1] == "4", line  # every step committed
    job, reference = torch.load(tmp_path / "job.pt"), torch.load(tmp_path / "plain.pt")
    assert torch.allclose(job["weight"], reference["weight"], rtol=1e-6, atol=1e-7)

"""A collective slower than its timeout while every member is alive: the job waits longer."""

from __future__ import annotations

import re
import subprocess
import sys

import torch

from shoal.coordinator.timeouts import SHRINK_WINDOW
from tests.conftest import shoal

STRAGGLER = """
import os, sys, time
import torch
import shoal
from shoal.tasks import TASKS

straggler_seconds = float(sys.argv[1])
straggles = int(sys.argv[3]) if len(sys.argv) > 3 else None  # forwards that lag (None: every one)
steps = int(sys.argv[4]) if len(sys.argv) > 4 else 4
task = TASKS["quadratic"](0)
torch.manual_seed(0)
model = task.build_model()
optimizer = task.build_optimizer(model, task.defaults.lr)

forwards = 0

def loss_fn(model, batch):
    global forwards
    forwards += 1
    if os.environ.get("RANK") == "1" and (straggles is None or forwards <= straggles):
        time.sleep(straggler_seconds)  # alive and beating, but slow
    return task.loss(model, batch)

result = shoal.train(model, optimizer, task.train_dataset(), loss_fn, global_batch_size=64, steps=steps, seed=0)
if result.is_leader:
    print("generation", result.generation, "steps", result.steps)
    torch.save(result.model.state_dict(), sys.argv[2])
"""


def test_a_straggler_slower_than_the_timeout_lengthens_it_and_changes_nothing(tmp_path):
    """Worker 1 lags 1.6 s behind at every step, the step timeout is 1 s: worker 0's
    all-reduce of the first step times out with both alive. The coordinator doubles the
    step timeout, shoal run says so, and the job completes with the model of a plain run.
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
                                     r".*; step timeout now \d+ s; members \[0, 1\] -> \[0, 1\]", line)
                        for line in told), told
    assert told[0].endswith("; step timeout now 2 s; members [0, 1] -> [0, 1]"), told
    [line] = [line for line in result.stdout.splitlines() if "generation" in line]
    assert line.split()[-1] == "4", line  # every step committed
    job, reference = torch.load(tmp_path / "job.pt"), torch.load(tmp_path / "plain.pt")
    assert torch.allclose(job["weight"], reference["weight"], rtol=1e-6, atol=1e-7)


def test_both_timeouts_shrink_again_once_the_straggler_is_quick(tmp_path):
    """Worker 1 lags 4.5 s in its first three forwards only: the step timeout doubles to 2,
    4 and 8 s, as above, the collective timeout with it, and the step then redone is quick.
    After a window of quick steps the coordinator brings the step timeout back to the
    heartbeat timeout (1 s), so a hang later is found as fast as before the episode, and the
    collective timeout down by what the members say a start sends against a step (here 8
    times: a heal of parameters, momentum and a strategy's state, then DDP's broadcast of the
    parameters, each sent twice by gloo's binomial broadcast among three), in the next window
    or a later one (a member says nothing before it committed a step). shoal run says both,
    and the model is still a plain run's."""
    script = tmp_path / "straggler.py"
    script.write_text(STRAGGLER)
    steps = str(3 * SHRINK_WINDOW + 20)
    plain = subprocess.run([sys.executable, str(script), "0", str(tmp_path / "plain.pt"), "0", steps],
                           capture_output=True, text=True, timeout=120, check=False)
    assert plain.returncode == 0, plain.stderr
    result = shoal("run", "--nproc-per-node", "2", "--heartbeat-timeout", "1", str(script), "4.5",
                   str(tmp_path / "job.pt"), "3", steps, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    told = [line for line in result.stderr.splitlines() if line.startswith("shoal run: ")]
    lengthened = [line.rsplit("; ", 2)[1] for line in told if " -> " in line]
    assert lengthened[:3] == ["step timeout now 2 s", "step timeout now 4 s", "step timeout now 8 s"], told
    shrunk = [line.split(": ", 2)[2] for line in told if " -> " not in line]
    assert any(re.fullmatch(rf"step timeout now 1 s: the last {SHRINK_WINDOW} steps came at most [\d.e-]+ s "
                            r"apart \(x 4\)", line) for line in shrunk), told
    assert any(re.fullmatch(r"collective timeout now [1-4](\.\d)? s: a start sends at most 8 times a step's "
                            rf"bytes, and the last {SHRINK_WINDOW} steps came at most [\d.e-]+ s apart "
                            r"\(x 4 x 8\)", line) for line in shrunk), told
    [line] = [line for line in result.stdout.splitlines() if "generation" in line]
    assert line.split()[-1] == steps, line
    job, reference = torch.load(tmp_path / "job.pt"), torch.load(tmp_path / "plain.pt")
    assert torch.allclose(job["weight"], reference["weight"], rtol=1e-6, atol=1e-7)

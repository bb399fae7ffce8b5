"""A hang after a slow episode: how long does the survivor stand still?

Worker 1 lags ``--straggle`` seconds in its first two forwards (a straggler that then
catches up: the step timeout grows past the lag), and at its ``--hang-at``-th forward it
SIGSTOPs itself (a hung process: its heartbeats stop too). Worker 0 goes on alone; at the
end it prints the longest pause between two of its forwards after the episode, which is
what the hang cost it: until its collective with the hung peer timed out.

    shoal run --nproc-per-node 2 examples/hang_after_slow_steps.py --straggle 12
    shoal run --nproc-per-node 2 examples/hang_after_slow_steps.py --straggle 0

(docs/BENCHMARKS.md, "A hang after a slow episode", compares the two.)
"""

import argparse
import itertools
import os
import signal
import time

import torch

import shoal
from shoal.tasks import TASKS

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--straggle", type=float, default=12.0, help="seconds worker 1 lags, twice (default 12)")
parser.add_argument("--hang-at", type=int, default=250, help="worker 1's forward that hangs (default 250)")
parser.add_argument("--steps", type=int, default=400, help="steps (default 400)")
args = parser.parse_args()

rank = int(os.environ.get("RANK", "0"))
task = TASKS["quadratic"](0)
torch.manual_seed(0)
model = task.build_model()
optimizer = task.build_optimizer(model, task.defaults.lr)
forwards: list[float] = []


def loss_fn(model, batch):
    forwards.append(time.monotonic())
    if rank == 1 and len(forwards) <= 2:
        time.sleep(args.straggle)  # alive and beating, but slow
    if rank == 1 and len(forwards) == args.hang_at:
        os.kill(os.getpid(), signal.SIGSTOP)
    return task.loss(model, batch)


result = shoal.train(model, optimizer, task.train_dataset(), loss_fn, global_batch_size=64,
                     steps=args.steps, seed=0)
if result.is_leader:
    after_episode = forwards[10:]  # past the straggler's forwards and their retries
    pauses = [later - earlier for earlier, later in itertools.pairwise(after_episode)]
    longest = max(range(len(pauses)), key=pauses.__getitem__)
    print(f"steps {result.steps}, generation {result.generation}, members at the end {result.world_size}; "
          f"longest pause after the episode: {pauses[longest]:.1f} s "
          f"(forward {longest + 11} of {len(forwards)})")

"""A host cut off during a heal, after a slow episode: how long does the survivor stand still?

Three nodes of one worker each (`shoal run --coordinator`, on this machine) train the
quadratic task. Node b's worker lags ``--straggle`` seconds in its first three forwards (a
straggler that then catches up: the timeouts grow past the lag, the collective timeout with
the step timeout). At step ``--cut-at`` node c's worker is killed, and started again by its
launcher. It rejoins, and the heal that brings it the job's state begins: there node b's
worker freezes (``--hang``'s fault, at the heal), and so does its launcher at once (to the
others, a host cut off: no launcher is left to kill its worker). Node a and the newcomer wait
in the heal for b until the collective timeout ends it. Node a prints the longest pause
between two of its forwards after the episode.

    python examples/cut_during_a_start.py --straggle 4.5
    python examples/cut_during_a_start.py --straggle 0

(docs/BENCHMARKS.md, "A cut during a heal after a slow episode", compares the two.)
"""

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time

import httpx
import psutil
import torch

_ROLE = "CUT_DURING_A_START_ROLE"
_TOKEN = "cut-during-a-start"


def worker(args) -> None:
    """One node's worker: b lags, a measures."""
    import shoal
    from shoal.config import KillSpec
    from shoal.tasks import TASKS

    role = os.environ[_ROLE]
    task = TASKS["quadratic"](0)
    torch.manual_seed(0)
    model = task.build_model()
    optimizer = task.build_optimizer(model, task.defaults.lr)
    forwards: list[float] = []

    def loss_fn(model, batch):
        forwards.append(time.monotonic())
        if role == "b" and len(forwards) <= 3:
            time.sleep(args.straggle)  # alive and beating, but slow
        return task.loss(model, batch)

    # b freezes at the first heal from --cut-at on, whichever worker id the coordinator gave it
    hang = [KillSpec(worker_id, args.cut_at, "SIGSTOP", "heal") for worker_id in range(3)] if role == "b" else []
    result = shoal.train(model, optimizer, task.train_dataset(), loss_fn, global_batch_size=64,
                         steps=args.steps, seed=0, kills=hang)
    if role == "a":
        after_episode = forwards[10:]  # past the straggler's forwards and their retries
        pauses = [later - earlier for earlier, later in itertools.pairwise(after_episode)]
        longest = max(range(len(pauses)), key=pauses.__getitem__)
        print(f"steps {result.steps}, generation {result.generation}, members at the end "
              f"{result.world_size}; longest pause after the episode: {pauses[longest]:.1f} s "
              f"(forward {longest + 11} of {len(forwards)})", flush=True)


def drive(args) -> int:
    with tempfile.TemporaryFile("w+") as log:  # node a's stderr, told if it fails
        return _drive(args, log)


def _drive(args, log) -> int:
    """The coordinator and three nodes; c's worker killed at ``--cut-at``, b cut off as its
    worker hangs in the heal that follows."""
    shoal = [sys.executable, "-m", "shoal.cli.main"]
    coordinator = subprocess.Popen(
        [*shoal, "coordinator", "--port", "0", "--token", _TOKEN, "--workers", "3", "--min-workers", "1",
         "--heartbeat-timeout", str(args.heartbeat_timeout)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = re.search(r"listening on (\S+)", coordinator.stdout.readline()).group(1)
    me = [os.path.abspath(__file__), "--steps", str(args.steps), "--straggle", str(args.straggle)]
    nodes = {role: subprocess.Popen(
        [*shoal, "run", "--coordinator", url.removeprefix("http://"), "--token", _TOKEN,
         *(["--max-restarts", "1"] if role == "c" else []), *me],
        stdout=subprocess.PIPE if role == "a" else subprocess.DEVNULL, stderr=log if role == "a" else subprocess.DEVNULL,
        text=True, env={**os.environ, _ROLE: role})
        for role in "abc"}
    frozen: list[psutil.Process] = []
    try:
        while _status(url).get("step", -1) < args.cut_at:
            if any(node.poll() is not None for node in nodes.values()):
                log.seek(0)
                raise SystemExit(f"a node ended before step {args.cut_at}; node a said:\n{log.read()[-2000:]}")
            time.sleep(0.02)
        for process in psutil.Process(nodes["c"].pid).children(recursive=True):
            if _is_worker(process, me):
                process.kill()
        frozen = _cut_off_when_its_worker_hangs(psutil.Process(nodes["b"].pid), me)
        out, _ = nodes["a"].communicate(timeout=600)
        sys.stdout.write(out)
        return nodes["a"].returncode
    finally:
        for process in frozen:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        for process in [*nodes.values(), coordinator]:
            process.kill()
            process.wait()
        told = coordinator.stderr.read().splitlines()  # what changed, and why
        sys.stdout.write("".join(f"  {line}\n" for line in told if "timeout" in line))


def _cut_off_when_its_worker_hangs(launcher: psutil.Process, me: list[str]) -> list[psutil.Process]:
    """Suspend ``launcher`` and its other processes the moment its worker has stopped itself
    (before the heartbeat timeout declares it dead, when the launcher would kill it)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        tree = launcher.children(recursive=True)
        if any(_is_worker(p, me) and _stopped(p) for p in tree):
            for process in [launcher, *tree]:
                process.suspend()
            return [launcher, *tree]
        time.sleep(0.005)
    raise SystemExit("node b's worker never reached the heal")


def _is_worker(process: psutil.Process, me: list[str]) -> bool:
    """Is ``process`` a worker of this example (not a launcher's zygote, nor one gone)?"""
    try:
        return process.cmdline()[-len(me):] == me
    except psutil.Error:
        return False


def _stopped(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_STOPPED
    except psutil.Error:
        return False


def _status(url: str) -> dict:
    try:
        return httpx.get(f"{url}/status", headers={"Authorization": f"Bearer {_TOKEN}"}).json()
    except httpx.HTTPError:
        return {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--straggle", type=float, default=4.5,
                        help="seconds node b's worker lags, three times (default 4.5)")
    parser.add_argument("--cut-at", type=int, default=400, help="the step of the cut (default 400)")
    parser.add_argument("--steps", type=int, default=3000, help="steps (default 3000)")
    parser.add_argument("--heartbeat-timeout", type=float, default=1.0, help="seconds (default 1)")
    args = parser.parse_args()
    if os.environ.get(_ROLE):
        worker(args)
        return 0
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())

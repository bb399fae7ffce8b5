"""``shoal bench wan``: every strategy over an emulated slow network, side by side.

Hosts are network namespaces (root only): host 0 runs ``shoal coordinator``, hosts 1..N one
worker each, and every worker host's link is limited with ``tbf`` (both ways) to the given
rate. The same task, seed and global batch is trained once per strategy, one after the
other in one invocation. Each run reports the payload bytes shoal counted and the bytes the
hosts' interfaces really sent (the kernel's counters), the loss curve against wall time,
and when the smoothed training loss first reached the target.

With allreduce among the runs, allreduce is also trained once with the links unlimited:
its step time is the compute (and loopback-fast communication) that the communication
bound ``compute + 2(N-1)/N * bytes / bandwidth`` adds the ring all-reduce's transfer to.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shoal.bench._runs import committed_times, loss_text, steady_step_seconds
from shoal.network import Hosts

__all__ = ["DEFAULT_RUNS", "UNLIMITED", "WanRun", "WanSettings", "communication_bound", "loss_curve",
           "read_results", "run_wan"]

_TOKEN = "shoal-bench"
_SMOOTHING = 10  # steps in the running mean of the training loss
_WARMUP = 10  # steps left out of a run's step time
UNLIMITED = "allreduce, links unlimited"

DEFAULT_RUNS = (
    ("allreduce", ()),
    ("allreduce fp16", ("--compress", "fp16")),
    ("allreduce int8", ("--compress", "int8")),
    ("allreduce onebit", ("--compress", "onebit")),
    # After 10 uncompressed steps, charlm's AdamW becomes 1-bit Adam: the momentum in signs.
    ("allreduce 1-bit Adam W=10", ("--compress", "onebit", "--warmup-steps", "10")),
    ("allreduce powersgd r4", ("--compress", "powersgd", "--powersgd-rank", "4")),
    ("localsgd H=50", ("--strategy", "localsgd", "--sync-every", "50")),
    ("diloco H=50", ("--strategy", "diloco", "--sync-every", "50")),
)


@dataclass(kw_only=True, slots=True)
class WanSettings:
    task: str = "charlm"
    hosts: int = 4
    mbit: float = 50.0
    steps: int = 150
    batch_size: int | None = None
    seed: int = 0
    target_loss: float = 2.5
    heartbeat_timeout: float = 20.0
    """Generous, so that no collective over a slow link times out (the coordinator would
    lengthen the timeout, at the cost of a re-form, and time)."""
    runs: tuple[tuple[str, tuple[str, ...]], ...] = DEFAULT_RUNS
    bound: bool = True
    """Also train allreduce with unlimited links, for the communication bound."""


@dataclass(slots=True)
class WanRun:
    label: str
    flags: list[str]
    steps: int = 0
    train_seconds: float = 0.0
    step_seconds: float = 0.0
    """Mean step time after the first 10 steps (from the commit times)."""
    payload_bytes_per_step: float = 0.0
    """Counted by shoal, per worker."""
    wire_bytes_per_step: float = 0.0
    """Sent by the worker hosts' interfaces (all traffic), per worker."""
    final_train_loss: float | None = None
    eval: dict = field(default_factory=dict)
    seconds_to_target: float | None = None
    curve: list[tuple[float, float]] = field(default_factory=list)
    """(seconds since the start, smoothed training loss) per committed step."""
    membership_changes: list[str] = field(default_factory=list)
    """Why the group re-formed, if it did (a collective that outlasted its timeout): each
    re-form costs time that no strategy's communication explains."""
    error: str | None = None


def loss_curve(sample_log: Path, started: float) -> list[tuple[float, float]]:
    lines = [json.loads(line) for line in sample_log.read_text().splitlines() if line]
    losses = [line["loss"] for line in lines]
    curve = []
    for index, line in enumerate(lines):
        window = [x for x in losses[max(0, index - _SMOOTHING + 1): index + 1] if x is not None]
        if window:
            curve.append((line["committed_at"] - started, statistics.fmean(window)))
    return curve


def read_results(run: WanRun, output: Path, sample_log: Path, *, workers: int,
                 target_loss: float) -> None:
    """Fill ``run`` from a finished job's results.json and sample log (payload per worker)."""
    results = json.loads(output.read_text())
    run.steps = results["steps"]
    run.train_seconds = results["train_seconds"]
    run.payload_bytes_per_step = results["payload_bytes_per_step"] / workers
    run.final_train_loss = results["final_train_loss"]
    run.membership_changes = [change["cause"] for change in results["membership_changes"]]
    run.eval = results["eval"]
    run.curve = loss_curve(sample_log, results["started_at"])
    run.step_seconds = steady_step_seconds(committed_times(sample_log), _WARMUP)
    reached = [t for t, loss in run.curve if loss <= target_loss]
    run.seconds_to_target = reached[0] if reached else None


def _run_one(settings: WanSettings, label: str, flags: list[str], root: Path, *, limit: bool = True) -> WanRun:
    run = WanRun(label, flags)
    directory = root / re.sub(r"\W+", "-", label)
    directory.mkdir()
    hosts = Hosts(settings.hosts + 1)
    # The emulated hosts share this machine's cores: one launcher per host must not take all.
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // settings.hosts))}
    processes = []
    try:
        for index in range(1, settings.hosts + 1 if limit else 1):
            hosts.limit(index, settings.mbit)
        coordinator = hosts.popen(0, [sys.executable, "-m", "shoal.cli.main", "coordinator",
                                      "--host", hosts.addresses[0], "--token", _TOKEN,
                                      "--workers", str(settings.hosts), "--linger", "10",
                                      "--heartbeat-timeout", str(settings.heartbeat_timeout)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        processes.append(coordinator)
        address = re.search(r"listening on http://(\S+)", coordinator.stdout.readline()).group(1)
        before = [hosts.tx_bytes(i) for i in range(1, settings.hosts + 1)]
        batch = ["--batch-size", str(settings.batch_size)] if settings.batch_size else []
        for index in range(1, settings.hosts + 1):
            files = (["--output", str(directory / "results.json"),
                      "--sample-log", str(directory / "samples.jsonl")] if index == 1 else [])
            processes.append(hosts.popen(index, [
                sys.executable, "-m", "shoal.cli.main", "train", "--task", settings.task,
                "--steps", str(settings.steps), "--seed", str(settings.seed), *batch,
                "--workers", "1", "--quiet", "--coordinator", address, "--token", _TOKEN,
                *files, *flags],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env))
        codes = [p.wait(timeout=3600) for p in processes[1:]]
        sent = sum(hosts.tx_bytes(i) - b for i, b in zip(range(1, settings.hosts + 1), before))
        if any(codes):
            run.error = f"launcher exit codes {codes}: {processes[1].stderr.read()[-300:]}"
            return run
        read_results(run, directory / "results.json", directory / "samples.jsonl",
                     workers=settings.hosts, target_loss=settings.target_loss)
        run.wire_bytes_per_step = sent / max(run.steps, 1) / settings.hosts
        return run
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        hosts.close()


def run_wan(settings: WanSettings, *, report=print) -> list[WanRun]:
    """Train once per configured run, one after the other; ``report`` gets a line per run."""
    runs = []
    planned = list(settings.runs)
    if settings.bound and any(label == "allreduce" for label, _ in planned):
        planned.append((UNLIMITED, ()))
    with tempfile.TemporaryDirectory(prefix="shoal-bench-wan-") as temporary:
        for label, flags in planned:
            started = time.monotonic()
            run = _run_one(settings, label, list(flags), Path(temporary), limit=label != UNLIMITED)
            runs.append(run)
            outcome = run.error or (f"{run.train_seconds:.1f} s, payload {run.payload_bytes_per_step / 1e6:.3f} "
                                    f"MB/step, wire {run.wire_bytes_per_step / 1e6:.3f} MB/step, "
                                    f"loss {loss_text(run.final_train_loss)}"
                                    + "".join(f"; re-formed: {cause}" for cause in run.membership_changes))
            report(f"{label:24s} {outcome} ({time.monotonic() - started:.0f} s in all)")
    return runs


def communication_bound(settings: WanSettings, runs: list[WanRun]) -> dict | None:
    """allreduce's achieved step time against ``compute + 2(N-1)/N * bytes / bandwidth``:
    the bytes are the payload per worker, the compute the unlimited run's step time."""
    limited = next((r for r in runs if r.label == "allreduce" and r.error is None), None)
    unlimited = next((r for r in runs if r.label == UNLIMITED and r.error is None), None)
    if limited is None or unlimited is None:
        return None
    n = settings.hosts
    transfer = 2 * (n - 1) / n * limited.payload_bytes_per_step * 8 / (settings.mbit * 1e6)
    bound = unlimited.step_seconds + transfer
    return {"compute_seconds": unlimited.step_seconds, "transfer_seconds": transfer, "bound_seconds": bound,
            "achieved_seconds": limited.step_seconds, "ratio": limited.step_seconds / bound}


def to_json(settings: WanSettings, runs: list[WanRun]) -> dict:
    return {"settings": asdict(settings), "runs": [asdict(run) for run in runs],
            "communication_bound": communication_bound(settings, runs)}

"""``shoal train --coordinator HOST:PORT``: this host's workers join a standalone coordinator.

The coordinator (``shoal coordinator`` on some host) owns membership and the rendezvous
store; this launcher only starts and supervises the local workers, tells the coordinator
at once when one of them exits (it knows the pid; the coordinator maps it to the worker),
and restarts them with ``--restart``. Worker ids are assigned by the coordinator. At the
end it writes ``--output`` and ``--sample-log`` from the coordinator's record of the job,
so any launcher of the job can write them (the coordinator must still be answering: it
lingers after the end for that).
"""

from __future__ import annotations

import collections
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable

import httpx

from shoal._exit import EXIT_EVICTED
from shoal.config import TrainConfig, coordinator_url
from shoal.coordinator.client import CoordinatorClient, CoordinatorUnreachable
from shoal.coordinator.record import JobRecord
from shoal.data import GlobalBatchSampler
from shoal.launch.durable import MetricsFile, Resumption, choose_resume
from shoal.launch.joining import admission_refusal, final_status, launcher_id
from shoal.launch.workers import (
    Preemption,
    WorkerGroup,
    describe_exit,
    fence_silenced,
    python_command,
    worker_zygote,
)
from shoal.launch.zygote import Zygote
from shoal.runtime.context import (
    ENV_COORDINATOR,
    ENV_HEARTBEAT_INTERVAL,
    ENV_LAUNCHER_ID,
    ENV_TOKEN,
    ENV_WORKER_ID,
)
from shoal.runtime.worker import ENV_CONFIG, EXIT_PREEMPTED

__all__ = ["run_remote"]

_POLL_SECONDS = 0.5
_METRICS_SECONDS = 2.0
"""metrics.json comes over HTTP here: the whole record, so not every poll."""


def run_remote(config: TrainConfig) -> int:
    zygote = worker_zygote()  # first: the fork must come before any thread
    try:
        return _run_workers(config, zygote)
    finally:
        if zygote is not None:
            zygote.close()


def _run_workers(config: TrainConfig, zygote: Zygote | None) -> int:
    started = time.time()
    url = coordinator_url(config.coordinator)
    resumption = _choose_resume(config) if config.resume else None
    resumed_step = resumption.checkpoint.step if resumption else None
    host, launcher = socket.gethostname(), launcher_id()
    refusal = admission_refusal(url, config.token, config.coordinator,
                                config.job_spec() | {"--resume": resumed_step}, launcher)
    if refusal is not None:
        print(f"shoal train: error: {refusal}", file=sys.stderr)
        return 2
    # on_exit's: its thread holds the group's lock (the main loop, fencing and SIGTERM's
    # handler wait on it), so short tries; the coordinator notices missing heartbeats anyway
    client = CoordinatorClient(url, config.token, retry_seconds=2.0, timeout=5.0)
    restarts = collections.Counter()
    # SIGTERM (this host is preempted): its workers stop at a step boundary and leave; the
    # other hosts go on without them, as after any departure.
    preemption = Preemption()

    def echo(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    def on_exit(local_index: int, returncode: int, when: float) -> None:
        if group.stopping:
            return
        process = group.workers[local_index].process
        cause = describe_exit(returncode) if returncode else "exited"
        # An evicted worker (hung and killed here, or cut off and back) is started again too:
        # it rejoins as itself. Not one that left because this host was preempted, nor once
        # the job ended (its workers hear so and leave, evicted ones among them).
        restart = (returncode != 0 and config.restart and restarts[local_index] < config.max_restarts
                   and preemption.deadline is None and _job_goes_on(client))
        rejoining = {}  # a restart joins under the worker's id: the coordinator waits for that one
        try:
            reply = client.post("/report", {"kind": "exit", "host": host, "launcher": launcher,
                                            "pid": process.pid, "detail": cause, "restarting": restart})
            if reply.get("worker_id") is not None:
                rejoining = {ENV_WORKER_ID: str(reply["worker_id"])}
        except Exception as error:  # the coordinator also notices the missing heartbeats
            echo(f"shoal: could not report the exit of local worker {local_index}: {error}")
        if restart:
            restarts[local_index] += 1
            echo(f"shoal: restarting local worker {local_index}")
            group.spawn(local_index, rejoining)

    env = {**os.environ, ENV_COORDINATOR: url, ENV_TOKEN: config.token,
           ENV_CONFIG: config.to_json(), ENV_HEARTBEAT_INTERVAL: str(config.heartbeat_interval),
           ENV_LAUNCHER_ID: launcher}
    group = WorkerGroup(python_command("shoal.runtime.worker"), env=env, on_exit=on_exit, echo=echo,
                        zygote=zygote)
    record = None
    watcher = CoordinatorClient(url, config.token, retry_seconds=1.0)
    metrics = (MetricsFile(config.checkpoint_dir, resumption.earlier_steps if resumption else [],
                           interval=_METRICS_SECONDS) if config.checkpoint_dir else None)
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: preemption.notice(group))
    try:
        for local_index in range(config.workers):
            group.spawn(local_index, {})
        while group.running() and not preemption.overdue():
            time.sleep(_POLL_SECONDS)
            if metrics is not None:
                _update_metrics(metrics, watcher)
            job = _job_status(watcher)
            if job is None:
                continue  # restarting, or this host is cut off: its workers learn of it when it is back
            _fence_silenced(group, job, launcher, echo)
            if (config.output or config.sample_log) and record is None and job["status"] == "completed":
                # Fetch the record the moment the job completes: our workers may take a
                # while to exit, and the coordinator lingers only so long after the end.
                record = _record(watcher)
        status = (None if preemption.deadline is not None else
                  final_status(url, config.token, [w.returncode for w in group.workers.values()]))
    except KeyboardInterrupt:
        status = {"status": "interrupted", "reason": "Ctrl-C"}
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        group.stop_all()
        if metrics is not None:
            _update_metrics(metrics, watcher, force=True)
        client.close()
        watcher.close()
    if status is None:
        echo("shoal train: this host's workers stopped (SIGTERM); the job goes on without them")
        return EXIT_PREEMPTED
    codes = [w.returncode for w in group.workers.values()]
    if status["status"] != "completed" and codes and all(code == EXIT_EVICTED for code in codes):
        echo("shoal train: this host's workers were evicted (cut off or hung); "
             "the job goes on without them")
        return EXIT_EVICTED
    if status.get("rejected"):
        echo(f"shoal train: error: {status['reason']}")
        return 2
    if status["status"] != "completed":
        echo(f"shoal train: failed: the job is {status['status']} {status.get('reason', '')}".rstrip())
        return 1
    if (config.output or config.sample_log) and not _write_record(url, config, record, resumption,
                                                                   time.time() - started):
        return 1
    if not config.quiet:
        echo(f"shoal train: the job completed (generation {status['generation']}, "
             f"{status['step']} steps)")
    return 0


def _choose_resume(config: TrainConfig) -> Resumption:
    """As the embedded launcher: the checkpoint is checked before any worker starts (a
    ConfigError, one line, exit 2), and every local worker loads that one. Every launcher of
    the job must agree on its step. (It builds the task: only after the worker zygote's
    fork, see Task.train_samples.)"""
    from shoal.tasks import TASKS

    resumption = choose_resume(config, TASKS[config.task](config.seed),
                               warn=lambda line: print(f"shoal train: warning: {line}", file=sys.stderr))
    config.resume = str(resumption.checkpoint.path)
    return resumption


def _job_status(client: CoordinatorClient) -> dict | None:
    """``GET /status``; None while the coordinator cannot answer."""
    try:
        return client.get("/status")
    except (CoordinatorUnreachable, PermissionError, httpx.HTTPError):
        return None


def _job_goes_on(client: CoordinatorClient) -> bool:
    """Asked afresh as a worker exits: has the job not ended? (Yes while the coordinator cannot
    answer: a restarted worker that finds no job fails to join, and says so.)"""
    job = _job_status(client)
    return job is None or job["status"] not in ("completed", "failed")


def _fence_silenced(group: WorkerGroup, job: dict, launcher: str, echo: Callable[[str], None]) -> None:
    """Kill a local worker that the coordinator (``job``: its status) declared dead for
    silence and that still runs (hung): it exits as an evicted one, started again with
    ``--restart`` (``fence_silenced``). Also once the job ended: this launcher waits for its
    workers, and a hung one never leaves."""
    fence_silenced(group, job.get("workers", {}), launcher, lambda job_id, worker: echo(
        f"shoal: local worker {worker.worker_id} (worker {job_id}) was declared dead (no heartbeat) "
        f"and its process {worker.process.pid} still runs: killing it"))


def _update_metrics(metrics: MetricsFile, client: CoordinatorClient, force: bool = False) -> None:
    """Keep ``--checkpoint-dir``/metrics.json current from the coordinator's record, as the
    embedded launcher does from its own: a later ``--resume`` reads it. Every launcher
    given the flag writes its own copy (its host's disk may be the only one it sees)."""
    try:
        metrics.update(lambda: JobRecord.from_json(client.get("/record")), force=force)
    except CoordinatorUnreachable:
        pass  # restarting, or gone after the end: the last copy written stands


def _record(client: CoordinatorClient) -> JobRecord | None:
    try:
        return JobRecord.from_json(client.get("/record"))
    except CoordinatorUnreachable:
        return None  # it may be restarting: ask again on the next poll


def _write_record(url: str, config: TrainConfig, record: JobRecord | None,
                  resumption: Resumption | None, wall_seconds: float) -> bool:
    """Write --output and --sample-log from the coordinator's record; False if it is gone."""
    from shoal.tasks import TASKS
    from shoal.tracking import build_results, write_json, write_sample_log

    if record is None:
        client = CoordinatorClient(url, config.token, retry_seconds=5.0)
        try:
            record = JobRecord.from_json(client.get("/record"))
        except CoordinatorUnreachable as error:
            print(f"shoal train: cannot write --output/--sample-log: {error} (keep the coordinator "
                  "up a little after the end: shoal coordinator --linger)", file=sys.stderr)
            return False
        finally:
            client.close()
        if record.status != "completed":
            print("shoal train: cannot write --output/--sample-log: the coordinator restarted after "
                  "the job ended, before this host read its record, and lost it (shoal coordinator "
                  "--state FILE keeps it)", file=sys.stderr)
            return False
    task = TASKS[config.task](config.seed)
    sampler = GlobalBatchSampler(len(task.train_dataset()), config.batch_size, config.seed)
    earlier_steps = resumption.earlier_steps if resumption else []
    if config.output:
        results = build_results(record=record, config=json.loads(config.to_json()), sampler=sampler,
                                wall_seconds=wall_seconds, units=task.samples_to_units(),
                                earlier_steps=earlier_steps)
        results["resumed"] = resumption.to_json() if resumption else None
        write_json(config.output, results)
    if config.sample_log:
        record.steps = earlier_steps + record.steps
        write_sample_log(config.sample_log, record, sampler)
    return True

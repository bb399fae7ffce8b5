"""``shoal train``: an embedded coordinator, N local workers, progress, results."""

from __future__ import annotations

import collections
import json
import math
import os
import signal
import sys
import tempfile
import time

from shoal.checkpoint import CheckpointStore
from shoal.config import TrainConfig
from shoal.coordinator import Coordinator, Membership, describe_change, describe_timeout_change
from shoal.data import GlobalBatchSampler
from shoal.launch.durable import MetricsFile, Resumption, choose_resume
from shoal.launch.joining import launcher_id
from shoal.launch.progress import Progress
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
from shoal.tasks import TASKS
from shoal.tracking import build_results, write_json, write_sample_log

__all__ = ["run_train"]

_POLL_SECONDS = 0.2


def run_train(config: TrainConfig) -> int:
    """Run one training job to the end; returns the process exit code (0 ok, 1 failed, 2 the
    workers refused the configuration)."""
    if config.coordinator:
        from shoal.launch.remote_job import run_remote

        return run_remote(config)
    zygote = worker_zygote()  # first: the fork must come before any thread or torch computation
    try:
        return _run_local(config, zygote)
    finally:
        if zygote is not None:
            zygote.close()


def _run_local(config: TrainConfig, zygote: Zygote | None) -> int:
    started = time.time()
    task = TASKS[config.task](config.seed)
    sampler = GlobalBatchSampler(len(task.train_dataset()), config.batch_size, config.seed)
    total_steps = config.steps or config.epochs * sampler.steps_per_epoch
    resumption = None
    if config.resume:
        resumption = choose_resume(config, task, warn=lambda line: print(f"shoal train: warning: {line}",
                                                                          file=sys.stderr))
        config.resume = str(resumption.checkpoint.path)  # every worker loads this one
    scratch = None
    if config.strategy == "zero" and config.options.zero_replicas == 1 and not config.checkpoint_dir:
        # Each shard exists once: the checkpoint is what survivors of a crash go back to.
        scratch = tempfile.TemporaryDirectory(prefix="shoal-zero-")
        config.checkpoint_dir = scratch.name
    metrics = None
    if config.checkpoint_dir:
        CheckpointStore(config.checkpoint_dir).remove_partial()  # left by a job that was killed
        metrics = MetricsFile(config.checkpoint_dir, resumption.earlier_steps if resumption else [])
    membership = Membership(expected_workers=config.workers, min_workers=config.min_workers,
                            max_workers=config.max_workers,
                            heartbeat_timeout=config.heartbeat_timeout, restarts=config.restart)
    coordinator = Coordinator(membership, host=config.host).start()
    progress = Progress(total_steps, quiet=config.quiet)
    progress.message(f"shoal: coordinator listening on {coordinator.url}")
    progress.message(f"shoal: training {config.task} with {config.workers} worker(s), "
                     f"{total_steps} steps, global batch {config.batch_size}")
    if resumption:
        progress.message(f"shoal: resuming from {resumption.checkpoint.path} (step "
                         f"{resumption.checkpoint.step}; {resumption.steps_redone} committed "
                         f"step(s) after it are redone)", always=True)

    restarts = collections.Counter()
    preemption = Preemption()

    def on_exit(worker_id: int, returncode: int, when: float) -> None:
        if group.stopping or preemption.deadline is not None:
            return
        restart = (returncode != 0 and config.restart and membership.status == "running"
                   and restarts[worker_id] < config.max_restarts)
        if restart:
            membership.expect_rejoin(worker_id)
        membership.report_exit(worker_id, describe_exit(returncode) if returncode else "exited", when)
        if restart:
            restarts[worker_id] += 1
            progress.message(f"shoal: restarting worker {worker_id} "
                             f"({restarts[worker_id]} of {config.max_restarts})", always=True)
            group.spawn(worker_id, {ENV_WORKER_ID: str(worker_id)})

    launcher = launcher_id()
    env = {**os.environ, ENV_COORDINATOR: coordinator.url, ENV_TOKEN: coordinator.token,
           ENV_CONFIG: config.to_json(), ENV_HEARTBEAT_INTERVAL: str(config.heartbeat_interval),
           ENV_LAUNCHER_ID: launcher}
    group = WorkerGroup(python_command("shoal.runtime.worker"), env=env, on_exit=on_exit,
                        echo=lambda line: progress.message(line, always=True), zygote=zygote)
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: preemption.notice(group))
    try:
        for worker_id in range(config.workers):
            group.spawn(worker_id, {ENV_WORKER_ID: str(worker_id)})
        _watch(membership, group, launcher, progress, sampler, metrics, preemption)
    except KeyboardInterrupt:
        membership.fail("interrupted (Ctrl-C)")
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        group.stop_all()
        if preemption.deadline is not None and membership.status not in ("completed", "failed"):
            membership.fail("preempted (SIGTERM)" + (f"; go on with --resume {config.checkpoint_dir}"
                                                     if config.checkpoint_dir and not scratch else ""))
        progress.close()
        coordinator.stop()
    if metrics is not None:
        metrics.update(membership.record, force=True)
    code = _report(config, membership, sampler, task, time.time() - started, progress, resumption)
    if scratch is not None:
        scratch.cleanup()
    return EXIT_PREEMPTED if preemption.deadline is not None and code else code


def _watch(membership: Membership, group: WorkerGroup, launcher: str, progress: Progress,
           sampler: GlobalBatchSampler, metrics: MetricsFile | None, preemption: Preemption) -> None:
    """Show progress (and keep metrics.json current) until the job ends and every worker has
    exited; kill a worker declared dead for silence that still runs (hung)."""
    announced = timeouts_announced = 0
    while True:
        if metrics is not None:
            metrics.update(membership.record)
        snapshot = membership.snapshot()
        if snapshot["status"] not in ("completed", "failed"):  # then stop_all ends what is left
            fence_silenced(group, snapshot["workers"], launcher, lambda worker_id, worker: progress.message(
                f"shoal: worker {worker_id} was declared dead (no heartbeat) and its process "
                f"{worker.process.pid} still runs: killing it", always=True))
        for change in membership.membership_changes()[announced:]:
            progress.message(f"shoal: {describe_change(change)}", always=True)
            announced += 1
        for change in membership.timeout_changes()[timeouts_announced:]:
            progress.message(f"shoal: {describe_timeout_change(change)}", always=True)
            timeouts_announced += 1
        loss, committed_at = membership.latest()
        started = membership.first_formed_at()
        step = snapshot["step"]
        rate = (sampler.samples_in_first(step) / (committed_at - started)
                if committed_at and started and committed_at > started else 0.0)
        alive = sum(w["alive"] for w in snapshot["workers"].values())
        progress.update(step=step, loss=loss,
                        samples_per_second=rate, alive=alive, generation=snapshot["generation"])
        # Completed means every member reported its last commit (the leader after saving);
        # what still runs is exiting, or an evicted worker still frozen: stop_all ends it.
        if snapshot["status"] in ("completed", "failed") or not group.running() or preemption.overdue():
            return
        time.sleep(_POLL_SECONDS)


def _report(config: TrainConfig, membership: Membership, sampler: GlobalBatchSampler, task,
            wall_seconds: float, progress: Progress, resumption: Resumption | None) -> int:
    record = membership.record()
    results = build_results(record=record, config=_config_json(config), sampler=sampler,
                            wall_seconds=wall_seconds, units=task.samples_to_units(),
                            earlier_steps=resumption.earlier_steps if resumption else [])
    results["resumed"] = resumption.to_json() if resumption else None
    if config.output:
        write_json(config.output, results)
    if config.sample_log:
        if resumption:
            record.steps = resumption.earlier_steps + record.steps
        write_sample_log(config.sample_log, record, sampler)
    if membership.rejected:
        print(f"shoal train: error: {membership.reason}", file=sys.stderr)
        return 2
    if membership.status != "completed":
        reason = membership.reason or "every worker exited before the job completed"
        print(f"shoal train: failed: {reason}", file=sys.stderr)
        return 1
    if results["replicas_agree"] is False:
        print("shoal train: failed: the members ended with different parameters (a bug: "
              "please report it with the command line)", file=sys.stderr)
        return 1
    if results["loss_not_finite_from_step"] is not None:
        print(f"shoal train: warning: the training loss is not finite from step "
              f"{results['loss_not_finite_from_step']} on: the run diverged (a lower --lr?)",
              file=sys.stderr)
    if not config.quiet:
        metrics = ", ".join(f"{k}={_number(v)}" for k, v in results["eval"].items())
        print(f"shoal train: {config.task} done: {results['steps']} steps in "
              f"{results['wall_time_seconds']:.1f} s, train loss {_number(results['final_train_loss'])}, "
              f"{metrics}, {len(results['membership_changes'])} membership change(s)", file=sys.stderr)
    return 0


def _number(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.4f}"


def _config_json(config: TrainConfig) -> dict:
    return json.loads(config.to_json())

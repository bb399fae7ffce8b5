"""Entry point of one ``shoal train`` worker process (started by the launcher)."""

from __future__ import annotations

import dataclasses
import faulthandler
import os
import signal
import sys

import torch

from shoal._exit import EXIT_EVICTED, run_then_exit
from shoal._io import atomic_write
from shoal.checkpoint import Checkpointing
from shoal.config import ConfigError, TrainConfig
from shoal.runtime.context import Context, JobStopped
from shoal.runtime.trainer import Preempted, TrainResult, train
from shoal.tasks import TASKS

ENV_CONFIG = "SHOAL_CONFIG"
EXIT_PREEMPTED = 128 + signal.SIGTERM
"""A worker stopped by SIGTERM at a step boundary (after the leader's checkpoint)."""
EXIT_REJECTED = 2
"""A worker refused the job's configuration and told the coordinator (``Context.reject``)."""


def _leader_results(task, config: TrainConfig, result: TrainResult) -> dict:
    metrics = task.evaluate(result.model)
    if config.save_model:
        atomic_write(config.save_model, lambda f: torch.save(result.model.state_dict(), f))
    return {
        "eval": metrics,
        "steps": result.steps,
        "epochs": result.epochs,
        "replicas_agree": result.replicas_agree,
        "resumed_from": result.resumed_from,
        "state_bytes": result.state_bytes,
        "checkpoints": result.checkpoints,
        "heals": [{**dataclasses.asdict(h), "megabytes_per_second": h.bytes / 1e6 / h.seconds}
                  for h in result.heals if h.seconds > 0],
    }


def main() -> int:
    # `kill -USR1 <pid>` prints every thread's stack to stderr: how a stuck worker is read.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    config = TrainConfig.from_json(os.environ[ENV_CONFIG])
    # N workers share this machine's cores; oversubscribing them makes every worker slower
    # (OpenMP threads spin). OMP_NUM_THREADS, when set, wins, as under torchrun: several
    # launchers on one machine (emulated hosts) each see every core.
    threads = os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(int(threads) if threads and threads.isdigit() and int(threads) > 0
                          else max(1, (os.cpu_count() or 1) // config.workers))
    task = TASKS[config.task](config.seed)
    model = task.build_model()
    optimizer = task.build_optimizer(model, config.lr)
    context = Context.from_env()
    context.join()
    checkpoint = None
    if config.checkpoint_dir:
        checkpoint = Checkpointing(directory=config.checkpoint_dir, every=config.checkpoint_every,
                                   keep=config.checkpoint_keep)
    try:
        result = train(model, optimizer, task.train_dataset(), task.loss,
                       global_batch_size=config.batch_size, epochs=config.epochs,
                       steps=config.steps, seed=config.seed, strategy=config.strategy,
                       options=config.options, context=context, kills=config.kills,
                       slowdowns=config.slowdowns, checkpoint=checkpoint, resume=config.resume,
                       task=config.task, lr_schedule=config.schedule())
    except Preempted as stopped:
        context.close()
        print(f"worker {context.worker_id}: {stopped}", file=sys.stderr)
        return EXIT_PREEMPTED
    except JobStopped as stopped:
        context.close()
        if stopped.completed:  # restarted as the members finished: nothing was left to do
            return 0
        print(f"worker {context.worker_id}: {stopped}", file=sys.stderr)
        return EXIT_EVICTED
    except ConfigError as error:
        context.close()
        if not error.reported:
            raise
        return EXIT_REJECTED  # the launcher prints it, once for all workers
    results = _leader_results(task, config, result) if result.is_leader else None
    context.finish(results)
    return 0


if __name__ == "__main__":
    run_then_exit(main)  # as a forked worker leaves: see shoal._exit

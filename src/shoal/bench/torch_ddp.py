"""The plain-torch side of ``shoal bench overhead`` and ``shoal bench recovery``.

A DDP training script as people write it for torchrun, with nothing of shoal's runtime:
``init_process_group`` from torchrun's environment, DistributedDataParallel, and, for
fault tolerance, the usual recipe: rank 0 saves a checkpoint every C steps, torchrun
(``--max-restarts``) restarts every worker after a failure, and they resume from the
newest checkpoint. Only the task (model, data, loss) and the global batch's split come
from shoal, so that both sides train the same thing on the same samples::

    torchrun --standalone --nproc-per-node 2 -m shoal.bench.torch_ddp --task digits \\
        --steps 200 --batch-size 64 --output run.jsonl

Rank 0 appends JSON lines to ``--output``: as each attempt starts, the step it starts
from; as the last one ends, the time at which each of its steps ended (for step times).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from shoal._exit import run_then_exit
from shoal.data import GlobalBatchSampler, fetch
from shoal.tasks import TASKS

__all__ = ["main"]

_CHECKPOINT = "checkpoint.pt"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="torch_ddp", description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="digits", choices=sorted(TASKS))
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=64, help="the global batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-dir", help="save every --checkpoint-every steps; resume from it")
    parser.add_argument("--checkpoint-every", type=int, default=0)
    parser.add_argument("--kill", metavar="RANK@STEP",
                        help="SIGKILL this rank at the start of this step (first attempt only)")
    parser.add_argument("--output", required=True, help="rank 0 appends JSON lines here")
    parser.add_argument("--save-model", help="rank 0 saves the final state dict here")
    return parser.parse_args(argv)


def _load(checkpoint_dir: str | None, model, optimizer) -> int:
    """The step to start from: after the newest checkpoint, or 0."""
    path = Path(checkpoint_dir or "") / _CHECKPOINT
    if not checkpoint_dir or not path.exists():
        return 0
    state = torch.load(path, weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"])


def _save(checkpoint_dir: str, step: int, model, optimizer) -> None:
    """Atomically: a killed save leaves the previous checkpoint."""
    path = Path(checkpoint_dir) / _CHECKPOINT
    temporary = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}, temporary)
    os.replace(temporary, path)


def _append(path: str, line: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(line) + "\n")


def _init_process_group() -> None:
    """``init_process_group`` on torchrun's store, under a prefix per attempt: on torch 2.13
    a restarted gloo group otherwise reads the previous attempt's addresses from the store
    and fails to connect ("Connection reset by peer")."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=False, use_libuv=True)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group("gloo",  # the task's model is on the CPU, as in shoal's workers
                            store=dist.PrefixStore(f"attempt-{attempt}", store), rank=rank, world_size=world)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    _init_process_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    task = TASKS[args.task](args.seed)
    model = task.build_model()
    optimizer = task.build_optimizer(model, task.defaults.lr)  # shoal train's default too
    dataset = task.train_dataset()
    sampler = GlobalBatchSampler(len(dataset), args.batch_size, args.seed)
    start = _load(args.checkpoint_dir, model, optimizer)
    ddp = DistributedDataParallel(model)
    if rank == 0:
        _append(args.output, {"started_at_step": start})
    kill_rank, kill_step = (int(x) for x in args.kill.split("@")) if args.kill else (-1, -1)
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    ended = []
    for step in range(start, args.steps):
        if first_attempt and rank == kill_rank and step == kill_step:
            _append(args.output, {"killed_at": time.time()})  # for the benchmark's clock only
            os.kill(os.getpid(), signal.SIGKILL)
        optimizer.zero_grad(set_to_none=True)
        global_size = len(sampler.global_indices(step))
        batch = fetch(dataset, sampler.local_indices(step, rank, world))
        # DDP averages over ranks; the task's loss is a sum: this makes it the global mean.
        loss = task.loss(ddp, batch) * world / global_size
        loss.backward()
        optimizer.step()
        loss.item()  # as a script that logs its loss would
        ended.append(time.time())
        if args.checkpoint_dir and args.checkpoint_every and (step + 1) % args.checkpoint_every == 0 \
                and rank == 0:
            _save(args.checkpoint_dir, step + 1, model, optimizer)
    if rank == 0:
        _append(args.output, {"step_ended_at": ended})
        if args.save_model:
            torch.save(model.state_dict(), args.save_model)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    # Exit past the interpreter's teardown, as shoal's workers do: on torch 2.13 gloo's
    # teardown aborts about one run in four (SIGABRT after the work is saved), a plain
    # init_process_group("gloo") script too, and torchrun counts that as a failed worker.
    run_then_exit(main)

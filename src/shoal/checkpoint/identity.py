"""What a checkpoint belongs to, and whether a job may resume from it.

A checkpoint records the task, the shape of every parameter, the global batch size, the
seed and the strategy. The data position is a step number, and step ``s`` means the slice
``[s*B, (s+1)*B)`` of the seeded permutation: resuming with another batch size or seed would
silently repeat and skip samples, so both must match. The number of workers may differ.
"""

from __future__ import annotations

from torch import nn

from shoal.checkpoint.store import CheckpointError

__all__ = ["check_resumable", "job_identity"]


def job_identity(model: nn.Module, *, task: str | None, global_batch_size: int, seed: int,
                 strategy: str) -> dict:
    return {
        "task": task,
        "parameters": {name: list(p.shape) for name, p in model.state_dict().items()},
        "global_batch_size": global_batch_size,
        "seed": seed,
        "strategy": strategy,
    }


def check_resumable(meta: dict, identity: dict, where: str) -> None:
    """Raise :class:`CheckpointError` naming the first thing that differs and how to fix it."""
    saved_task, task = meta.get("task"), identity["task"]
    if saved_task != task:
        raise CheckpointError(f"{where}: written by task {saved_task!r}, this job trains {task!r}")
    saved, ours = meta.get("parameters", {}), identity["parameters"]
    for name in sorted(set(saved) | set(ours)):
        if saved.get(name) != ours.get(name):
            raise CheckpointError(f"{where}: parameter {name!r} has shape {saved.get(name)} there "
                                  f"and {ours.get(name)} in this model (another model?)")
    for key, flag in (("global_batch_size", "--batch-size"), ("seed", "--seed"),
                      ("strategy", "--strategy")):
        if meta.get(key) != identity[key]:
            raise CheckpointError(f"{where}: written with {flag} {meta.get(key)}; resume with "
                                  f"{flag} {meta.get(key)} (this job has {identity[key]})")

"""results.json and the sample log, assembled from what the coordinator recorded.

Workers report every committed step (with its generation and their share of the loss)
through their heartbeats; the coordinator keeps, per step, the generation that committed
it last. One writer (the launcher) turns that into files, so nothing is written N times.
"""

from __future__ import annotations

import json
import math
import statistics

from shoal._io import atomic_write
from shoal._json import finite_or_null
from shoal.coordinator.record import CommittedStep, JobRecord
from shoal.data import GlobalBatchSampler

__all__ = ["build_results", "write_json", "write_sample_log"]

_FINAL_LOSS_STEPS = 10


def build_results(*, record: JobRecord, config: dict, sampler: GlobalBatchSampler,
                  wall_seconds: float, units: tuple[str, int],
                  earlier_steps: list[CommittedStep] = ()) -> dict:
    """``earlier_steps``: those a resumed job's checkpoint holds. They count in the steps and
    the losses; the rates and times are this run's own."""
    results = record.results or {}
    samples = sum(len(sampler.global_indices(s.step)) for s in record.steps)
    last_commit = max((s.committed_at for s in record.steps), default=None)
    started = record.first_formed_at
    train_seconds = last_commit - started if last_commit and started else 0.0
    steps = len(earlier_steps) + len(record.steps)
    every_step = [*earlier_steps, *record.steps]
    losses = [s.loss for s in every_step if s.loss is not None]
    diverged = next((s.step for s in every_step if s.loss is not None and not math.isfinite(s.loss)), None)
    last_losses = losses[-_FINAL_LOSS_STEPS:]
    unit, per_sample = units
    output = {
        "task": config["task"],
        "status": record.status,
        "reason": record.reason,
        "config": config,
        "steps": steps,
        "epochs": steps / sampler.steps_per_epoch,
        "final_train_loss": statistics.fmean(last_losses) if last_losses else None,
        "loss_not_finite_from_step": diverged,
        "eval": results.get("eval", {}),
        "wall_time_seconds": round(wall_seconds, 3),
        "started_at": started,
        "train_seconds": round(train_seconds, 3),
        "samples_per_second": samples / train_seconds if train_seconds else 0.0,
        "payload_bytes_sent": record.bytes_sent,
        "payload_bytes_per_step": record.bytes_sent / len(record.steps) if record.steps else 0.0,
        "payload_bytes_by_worker": record.bytes_by_worker,
        "membership_changes": record.membership_changes,
        "timeout_changes": record.timeout_changes,
        "heals": results.get("heals", []),
        "replicas_agree": results.get("replicas_agree"),
        "checkpoints": results.get("checkpoints", []),
        "steps_redone": record.steps_redone,
        "state_bytes": results.get("state_bytes", {}),
    }
    if unit != "samples":
        output[f"{unit}_per_second"] = output["samples_per_second"] * per_sample
    return output


def write_json(path: str, data: dict) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(finite_or_null(data), indent=2).encode() + b"\n"))


def write_sample_log(path: str, record: JobRecord, sampler: GlobalBatchSampler) -> None:
    """One JSON line per committed step: epoch, step, generation, members, samples, the
    (unix) time its first member committed it, and its global-batch loss (null if a share
    was never reported, or if it was not finite)."""
    lines = []
    for committed in record.steps:
        lines.append(json.dumps({
            "epoch": sampler.epoch_of(committed.step),
            "step": committed.step,
            "generation": committed.generation,
            "members": committed.members,
            "samples": sampler.global_indices(committed.step).tolist(),
            "committed_at": round(committed.committed_at, 4),
            "loss": finite_or_null(committed.loss),
        }))
    atomic_write(path, lambda f: f.write(("\n".join(lines) + "\n").encode() if lines else b""))

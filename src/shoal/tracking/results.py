"""results.json and the sample log, assembled from what the coordinator recorded.

Workers report every committed step (with its generation and their share of the loss)
through their heartbeats; the coordinator keeps, per step, the generation that committed
it last. One writer (the launcher) turns that into files, so nothing is written N times.
"""

from __future__ import annotations

import json
import statistics

from shoal._io import atomic_write
from shoal.coordinator.membership import Membership
from shoal.data import GlobalBatchSampler

__all__ = ["build_results", "write_json", "write_sample_log"]

_FINAL_LOSS_STEPS = 10


def build_results(*, membership: Membership, config: dict, sampler: GlobalBatchSampler,
                  wall_seconds: float, units: tuple[str, int]) -> dict:
    committed = membership.committed_steps()
    losses = membership.step_losses()
    results = membership.results or {}
    samples = sum(len(sampler.global_indices(step)) for step, _ in committed)
    commit_times = membership.commit_times()
    started = membership.first_formed_at()
    train_seconds = max(commit_times.values()) - started if commit_times and started else 0.0
    last_losses = list(losses.values())[-_FINAL_LOSS_STEPS:]
    unit, per_sample = units
    output = {
        "task": config["task"],
        "status": membership.status,
        "reason": membership.reason,
        "config": config,
        "steps": len(committed),
        "epochs": len(committed) / sampler.steps_per_epoch,
        "final_train_loss": statistics.fmean(last_losses) if last_losses else None,
        "eval": results.get("eval", {}),
        "wall_time_seconds": round(wall_seconds, 3),
        "train_seconds": round(train_seconds, 3),
        "samples_per_second": samples / train_seconds if train_seconds else 0.0,
        "payload_bytes_sent": membership.bytes_sent(),
        "membership_changes": membership.membership_changes(),
        "heals": results.get("heals", []),
    }
    if unit != "samples":
        output[f"{unit}_per_second"] = output["samples_per_second"] * per_sample
    return output


def write_json(path: str, data: dict) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(data, indent=2).encode() + b"\n"))


def write_sample_log(path: str, membership: Membership, sampler: GlobalBatchSampler) -> None:
    """One JSON line per committed step: epoch, step, generation, members, samples."""
    lines = []
    for step, generation in membership.committed_steps():
        lines.append(json.dumps({
            "epoch": sampler.epoch_of(step),
            "step": step,
            "generation": generation.number,
            "members": generation.members,
            "samples": sampler.global_indices(step).tolist(),
        }))
    atomic_write(path, lambda f: f.write(("\n".join(lines) + "\n").encode() if lines else b""))

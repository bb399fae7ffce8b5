"""Heal: make every member of a new generation hold the state of the most advanced member.

After a failure some members may have committed one step more than others (a collective
can complete on some ranks and fail on others), and a newcomer has nothing at all. The
member with the highest committed step (lowest rank among ties) broadcasts model,
optimizer, strategy state, data position and RNG; members that differ load it. The blob is
written with ``torch.save`` and read with ``torch.load(weights_only=True)``: tensors and
plain containers only, never arbitrary pickled objects.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["HealReport", "broadcast_state", "deserialize", "heal", "serialize"]

FRESH = -1
"""The committed step a worker reports before it holds any state of the job."""


@dataclass(slots=True)
class HealReport:
    source_rank: int
    step: int
    received: bool
    bytes: int
    seconds: float


def serialize(state: dict) -> torch.Tensor:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return torch.frombuffer(bytearray(buffer.getbuffer()), dtype=torch.uint8)


def deserialize(blob: torch.Tensor) -> dict:
    return torch.load(io.BytesIO(blob.numpy().tobytes()), weights_only=True)


def heal(my_step: int, capture, restore, before_transfer=lambda step: None) -> HealReport | None:
    """Agree on the most advanced state; ``capture()`` gives it, ``restore(state)`` loads it.

    Returns ``None`` when every member already holds the same committed step (nothing moved),
    which is the common case of a clean crash between steps.
    """
    world = dist.get_world_size()
    steps = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(steps, torch.tensor([my_step], dtype=torch.int64))
    steps = [int(s) for s in steps]
    high = max(steps)
    if high == min(steps):
        return None
    before_transfer(high)  # fault injection: a member dying in the middle of a heal
    started = time.perf_counter()
    source = steps.index(high)
    rank = dist.get_rank()
    state, size = broadcast_state(capture() if rank == source else None, source)
    received = my_step != high
    if received:
        restore(state)
    return HealReport(source, high, received, size, time.perf_counter() - started)


def broadcast_state(state: dict | None, source: int) -> tuple[dict, int]:
    """Collective: ``source``'s ``state`` (None elsewhere) on every member, and its size in
    bytes. Serialised with ``torch.save``, read with ``weights_only=True``."""
    blob = serialize(state) if dist.get_rank() == source else None
    size = torch.tensor([blob.numel() if blob is not None else 0], dtype=torch.int64)
    dist.broadcast(size, src=source)
    if blob is None:
        blob = torch.empty(int(size), dtype=torch.uint8)
    dist.broadcast(blob, src=source)
    return (state if state is not None else deserialize(blob)), int(size)

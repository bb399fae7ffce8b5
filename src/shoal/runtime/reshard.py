"""Rebuild zero's committed state after a membership change, from the shards members hold.

Under ``--strategy zero`` with ``--zero-replicas R`` (R >= 2) every shard of the state lives
on R members. When a generation breaks, each survivor keeps its shards of the last layout
(``Zero.held``); the next generation agrees on a position and a layout whose every shard
still has a live copy, then, one tensor at a time, the one chosen holder of each shard
writes it into a zeroed whole tensor and a SUM all-reduce gives every member the whole,
of which it keeps its shard of the new layout. Newcomers hold nothing and receive the
same way. No disk is involved and no committed step is lost.

A position is usable when the members holding it cover every shard of one layout. Members
normally all hold the same one. After a collective that completed on some members and
failed on others, some are one step ahead: if that was zero's agreement to apply the step,
the members behind applied it on their own shards when they left (``Zero.held_next``), and
those copies count for the step ahead, which some member really applied; otherwise, if the
members ahead do not cover every shard, all go back to the step the others hold (that step
is redone, and the record says so). When no position is covered (every copy of some shard
died), ``ShardsLost``: the caller goes back to the newest checkpoint.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import torch
import torch.distributed as dist

from shoal.runtime.heal import FRESH, HealReport, broadcast_state

__all__ = ["ShardsLost", "restore_from_members"]


class ShardsLost(Exception):
    """Some shard of the committed state has no live copy left."""


def restore_from_members(strategy, position: int, extras: dict,
                         before_transfer=lambda step: None) -> tuple[dict, HealReport] | None:
    """Collective: rebuild ``strategy``'s state (a ``Zero``) for this generation from the
    shards the members hold. ``position`` is this member's committed step count (FRESH if it
    holds nothing of the job); ``extras`` its replicated state (position, RNG, ...).

    Returns the extras of the member the state came from and a report; None when no member
    holds anything yet (a new job); raises ``ShardsLost`` when no state can be rebuilt.
    ``before_transfer(step)`` runs once the position is agreed (fault injection, as in heal).
    """
    held, ahead = strategy.held, strategy.held_next
    holds = held is not None and position != FRESH
    mine = ([1, position, held.layout.generation, held.layout.shards, held.layout.index,
             int(ahead is not None)] if holds else [0, FRESH, -1, 0, 0, 0])
    gathered = [torch.zeros(len(mine), dtype=torch.int64) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, torch.tensor(mine, dtype=torch.int64))
    plan = _plan([[int(x) for x in d] for d in gathered])
    if plan is None:
        return None
    before_transfer(plan.position)
    started = time.perf_counter()
    rank, source = dist.get_rank(), plan.source
    if holds and ahead is not None and plan.position == position + 1:
        held = ahead  # the step this member missed, applied on its own shards
    header, size = broadcast_state({"extras": extras, "shapes": strategy.whole_shapes(),
                                    "values": held.values} if rank == source else None, source)
    my_shard = mine[4] if holds and plan.owners.get(mine[4]) == rank else None
    for key, (shape, dtype, sharded) in header["shapes"].items():
        whole = torch.zeros(shape, dtype=getattr(torch, dtype))
        if sharded and my_shard is not None:
            whole[held.layout.rows(shape[0], my_shard)] = held.tensors[key]
        elif not sharded and rank == source:
            whole.copy_(held.tensors[key])
        dist.all_reduce(whole)
        size += whole.numel() * whole.element_size()
        strategy.load_whole(key, whole, sharded)
    strategy.load_values(header["values"])
    strategy.forget_held()
    return header["extras"], HealReport(source, plan.position, position != plan.position, size,
                                        time.perf_counter() - started)


class _Plan(NamedTuple):
    position: int
    owners: dict[int, int]
    """The member chosen to send each shard of the layout, by shard index."""
    source: int
    """The member that sends the replicated state (position, RNG, ...): one that committed
    ``position`` itself."""


def _plan(descriptors: list[list[int]]) -> _Plan | None:
    """The highest position that some layout covers whole, and who sends what (the lowest
    rank, members that committed the position before those that applied a missed step).
    ``descriptors``: per rank, [holds, position, layout generation, shards, shard index,
    also holds position + 1 (a missed step applied)]."""
    holders = [(rank, d) for rank, d in enumerate(descriptors) if d[0]]
    if not holders:
        return None
    # (rank, position, generation, shards, index), committed copies first
    committed = [(rank, *d[1:5]) for rank, d in holders]
    caught_up = [(rank, d[1] + 1, *d[2:5]) for rank, d in holders if d[5]]
    for position in sorted({c[1] for c in committed}, reverse=True):
        for generation, shards in sorted({(c[2], c[3]) for c in committed if c[1] == position},
                                         reverse=True):
            layout = (position, generation, shards)
            owners: dict[int, int] = {}
            for rank, *where, index in committed + caught_up:
                if tuple(where) == layout:
                    owners.setdefault(index, rank)
            if len(owners) == shards:
                source = min(rank for rank, *where, _ in committed if tuple(where) == layout)
                return _Plan(position, owners, source)
    # Named, so that a loss that is not two deaths of one shard's holders can be told apart:
    # members that hold different steps (a step that completed on some members only).
    held = "; ".join(f"rank {rank} step {d[1]} shard {d[4]} of {d[3]}" for rank, d in holders)
    raise ShardsLost(f"no step has a live copy of every shard (the members hold: {held})")

"""Sharded checkpoints (``--strategy zero``) through torch.distributed.checkpoint.

Every member writes its own shards with ``dcp.save`` into the same temporary directory; the
leader then adds ``state.pt`` (data position, RNG, strategy state: small and replicated),
hashes every file into ``meta.json``, fsyncs and renames, exactly as for a whole checkpoint.
``dcp.load`` re-shards on load, so a checkpoint written by 4 members loads on 2. The shard
files hold tensors and DCP's own metadata; nothing in them is unpickled as code (DCP reads
its ``.metadata`` file with ``torch.load(weights_only=True)``-style restricted loading).
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from shoal.checkpoint.store import (STATE_FILE, Checkpoint, CheckpointError, CheckpointStore,
                                    describe_file, fsync_directory, write_meta)

__all__ = ["agreed_checkpoint", "full_model_state", "load_sharded", "save_sharded"]

SHARDS_DIRECTORY = "shards"


def _agreed_path(path: str | None) -> str:
    """The leader's ``path``, on every member (as bytes in a tensor: no pickle on the wire)."""
    data = torch.zeros(4096, dtype=torch.uint8)
    if dist.get_rank() == 0:
        encoded = path.encode()
        data[: len(encoded)] = torch.tensor(list(encoded), dtype=torch.uint8)
    dist.broadcast(data, src=0)
    return bytes(data[data != 0].tolist()).decode()


def save_sharded(store: CheckpointStore, step: int, model, optimizer, extra: dict, meta: dict, *,
                 group=None) -> Callable[[], int]:
    """Collective: every member calls it at the same step. Stages this member's shards (a
    copy: the next steps may change the live ones) and returns the writing, which may run in
    another thread: with ``group`` (a process group of the same members that nothing else
    uses) the members coordinate the writing on it; the leader then finishes the checkpoint.
    The writing returns the bytes the checkpoint holds (0 on the other members)."""
    leader = dist.get_rank() == 0
    temporary = None
    if leader:
        store.root.mkdir(parents=True, exist_ok=True)
        temporary = store.temporary_directory(step)
    temporary = Path(_agreed_path(str(temporary) if temporary else None))
    model_state, optimizer_state = _state_dicts(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    shards = str(temporary / SHARDS_DIRECTORY)
    extra = copy.deepcopy(extra)
    if group is None:
        dcp.save(state, checkpoint_id=shards)
        written = None
    else:  # returns once the shards are copied; a thread of DCP's writes them
        written = dcp.async_save(state, checkpoint_id=shards, process_group=group)

    def write() -> int:
        try:
            if written is not None:
                written.result()
            return _finish(store, temporary, step, extra, meta) if leader else 0
        except BaseException:
            if leader:
                shutil.rmtree(temporary, ignore_errors=True)
            raise

    return write


def _finish(store: CheckpointStore, temporary: Path, step: int, extra: dict, meta: dict) -> int:
    """The leader, once every member's shards are written: the replicated state, checksums,
    fsync, rename."""
    torch.save(extra, temporary / STATE_FILE)
    files = {str(p.relative_to(temporary)): describe_file(p)
             for p in sorted(temporary.rglob("*")) if p.is_file()}
    write_meta(temporary, {**meta, "step": step, "sharded": True, "files": files})
    fsync_directory(temporary / SHARDS_DIRECTORY)
    fsync_directory(temporary)
    store.publish(temporary, step)
    return sum(f["bytes"] for f in files.values())


def _state_dicts(model, optimizer) -> tuple[dict, dict]:
    """``get_state_dict``, without changing what the next step does. For an optimizer that has
    not stepped yet it creates the state with a step at learning rate 0, which leaves Adam's
    step count at 1: set back to 0 (with zero moments, exactly a fresh optimizer's state)."""
    fresh = not optimizer.state
    model_state, optimizer_state = get_state_dict(model, optimizer)
    if fresh:
        for state in optimizer.state.values():
            step = state.get("step")
            if torch.is_tensor(step):
                step.zero_()
            elif step is not None:
                state["step"] = 0
        model_state, optimizer_state = get_state_dict(model, optimizer)
    return model_state, optimizer_state


def load_sharded(checkpoint: Checkpoint, model, optimizer) -> dict:
    """Collective: load the shards this member now holds (re-sharded to the current members);
    returns the replicated extras (position, RNG, strategy state)."""
    if not checkpoint.meta.get("sharded"):
        raise CheckpointError(f"{checkpoint.path}: not a sharded (--strategy zero) checkpoint")
    checkpoint.verify()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(checkpoint.path / SHARDS_DIRECTORY))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return torch.load(checkpoint.path / STATE_FILE, weights_only=True)


def agreed_checkpoint(store: CheckpointStore | None, also: str | None = None) -> Checkpoint | None:
    """Collective: the newest good checkpoint in ``store`` (or ``also``, if newer), as the
    leader sees it: every member must load the same one."""
    chosen = ""
    if dist.get_rank() == 0:
        candidates = []
        found = store.latest_good(load=False) if store is not None else None
        if found is not None:
            candidates.append(found[0])
        if also and Checkpoint.is_checkpoint(also):
            candidates.append(Checkpoint.open(also))
        if candidates:
            chosen = str(max(candidates, key=lambda c: c.step).path)
    chosen = _agreed_path(chosen)
    return Checkpoint.open(chosen) if chosen else None


def full_model_state(checkpoint: Checkpoint) -> dict:
    """The whole model of a sharded checkpoint, in one process (``shoal export``)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    checkpoint.verify()
    with tempfile.TemporaryDirectory(prefix="shoal-export-") as temporary:
        whole = os.path.join(temporary, "whole.pt")
        dcp_to_torch_save(str(checkpoint.path / SHARDS_DIRECTORY), whole)
        return torch.load(whole, weights_only=True)["model"]


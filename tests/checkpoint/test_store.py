"""The on-disk checkpoint format: atomic, verified, pruned, and never unpickling code."""

from __future__ import annotations

import hashlib
import io
import json

import pytest
import torch
from torch import nn

from shoal.checkpoint import (AsyncSaver, Checkpoint, CheckpointError, CheckpointStore,
                              check_resumable, job_identity)
from shoal.checkpoint.export import export_model


def _state(value: float) -> dict:
    return {"position": 3, "model": {"w": torch.full((4, 4), value)}, "rng_cpu": torch.get_rng_state()}


def test_a_saved_state_loads_back_and_only_the_newest_are_kept(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    for step in (10, 20, 30):
        store.save(step, _state(step), {"task": "t"})
    assert [c.step for c in store.checkpoints()] == [30, 20]
    checkpoint, state = store.latest_good()
    assert checkpoint.step == 30 and checkpoint.meta["task"] == "t"
    assert torch.equal(state["model"]["w"], torch.full((4, 4), 30.0))


@pytest.mark.parametrize("damage", ["truncate", "flip", "remove"])
def test_a_damaged_checkpoint_is_named_and_the_previous_one_is_used(tmp_path, damage):
    store = CheckpointStore(tmp_path)
    store.save(1, _state(1), {})
    newest = store.save(2, _state(2), {})
    state_file = newest.path / "state.pt"
    data = state_file.read_bytes()
    if damage == "truncate":
        state_file.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        state_file.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    else:
        state_file.unlink()
    with pytest.raises(CheckpointError, match=str(state_file)):
        newest.load_state()
    warnings = []
    checkpoint, state = store.latest_good(warn=warnings.append)
    assert checkpoint.step == 1 and torch.equal(state["model"]["w"], torch.full((4, 4), 1.0))
    assert len(warnings) == 1 and str(state_file) in warnings[0]


def test_unreadable_metadata_skips_the_checkpoint(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save(1, _state(1), {})
    (store.save(2, _state(2), {}).path / "meta.json").write_text("{not json")
    warnings = []
    assert store.latest_good(warn=warnings.append)[0].step == 1
    assert "meta.json" in warnings[0]


def test_nothing_good_gives_none(tmp_path):
    assert CheckpointStore(tmp_path / "absent").latest_good() is None
    store = CheckpointStore(tmp_path)
    (store.save(5, _state(5), {}).path / "state.pt").write_bytes(b"")
    assert store.latest_good(warn=lambda line: None) is None


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_pickled_object_is_refused_even_with_a_matching_checksum(tmp_path):
    store = CheckpointStore(tmp_path)
    checkpoint = store.save(1, _state(1), {})
    evil = io.BytesIO()
    torch.save({"model": _Payload()}, evil)
    (checkpoint.path / "state.pt").write_bytes(evil.getvalue())
    meta = json.loads((checkpoint.path / "meta.json").read_text())
    meta["files"]["state.pt"] = {"bytes": len(evil.getvalue()), "sha256": hashlib.sha256(evil.getvalue()).hexdigest()}
    (checkpoint.path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="cannot be read"):
        Checkpoint.open(checkpoint.path).load_state()


def test_what_a_killed_writer_left_is_ignored_then_removed(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save(1, _state(1), {})
    partial = tmp_path / ".partial-step-000000002-123-456"
    partial.mkdir()
    (partial / "state.pt").write_bytes(b"half")
    assert [c.step for c in store.checkpoints()] == [1]
    store.remove_partial()
    assert not partial.exists() and [c.step for c in store.checkpoints()] == [1]


def test_the_background_saver_copies_the_state_before_training_changes_it(tmp_path):
    saver = AsyncSaver(CheckpointStore(tmp_path), {"task": "t"})
    live = _state(1.0)
    saver.save(7, live)
    live["model"]["w"].add_(100)  # the next step, while the disk is still being written
    saver.wait()
    _, state = CheckpointStore(tmp_path).latest_good()
    assert torch.equal(state["model"]["w"], torch.full((4, 4), 1.0))
    assert saver.saved[0]["step"] == 7 and saver.saved[0]["bytes"] > 0


def test_a_failed_background_save_is_raised_on_the_training_thread(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    saver = AsyncSaver(CheckpointStore(blocker), {})
    saver.save(1, _state(1))
    with pytest.raises(OSError):
        saver.wait()


def _identity(model, **changes):
    fields = {"task": "digits", "global_batch_size": 64, "seed": 0, "strategy": "allreduce", **changes}
    return job_identity(model, **fields)


@pytest.mark.parametrize("change, message", [
    ({"task": "charlm"}, "written by task 'digits'"),
    ({"global_batch_size": 32}, "resume with --batch-size 64"),
    ({"seed": 1}, "resume with --seed 0"),
    ({"strategy": "diloco"}, "resume with --strategy allreduce"),
])
def test_a_checkpoint_of_another_job_is_refused_naming_what_differs(change, message):
    model = nn.Linear(3, 2)
    with pytest.raises(CheckpointError, match=message):
        check_resumable(_identity(model), _identity(model, **change), "ckpt")
    check_resumable(_identity(model), _identity(model), "ckpt")


def test_a_checkpoint_of_another_model_shape_is_refused():
    with pytest.raises(CheckpointError, match="parameter 'bias' has shape \\[2\\] there and \\[4\\]"):
        check_resumable(_identity(nn.Linear(3, 2)), _identity(nn.Linear(3, 4)), "ckpt")


def test_export_writes_the_model_as_safetensors(tmp_path):
    from safetensors.torch import load_file

    model = nn.Linear(3, 2)
    store = CheckpointStore(tmp_path / "ckpt")
    store.save(4, {"model": model.state_dict()}, {"task": "t"})
    exported = export_model(tmp_path / "ckpt", tmp_path / "model.safetensors")
    assert exported.step == 4
    loaded = load_file(tmp_path / "model.safetensors")
    assert loaded.keys() == model.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())

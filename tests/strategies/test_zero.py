"""`--strategy zero` (FSDP2): equal to allreduce with a quarter of the state per worker;
a crash goes back to the last (sharded) checkpoint; resumes on another number of workers;
exports as one safetensors file."""

from __future__ import annotations

import pytest
import torch

from shoal.reliability.checks import exactly_once_violations, relative_difference
from shoal.tasks import TASKS
from tests.conftest import load_json, shoal

DIGITS = ["--task", "digits", "--steps", "60", "--batch-size", "64", "--seed", "0", "--quiet"]


def train(tmp_path, name: str, *args: str) -> tuple:
    model, output = tmp_path / f"{name}.pt", tmp_path / f"{name}.json"
    result = shoal("train", *args, "--save-model", str(model), "--output", str(output))
    assert result.returncode == 0, result.stderr
    return model, load_json(output)


@pytest.fixture(scope="module")
def allreduce(tmp_path_factory):
    return train(tmp_path_factory.mktemp("allreduce"), "allreduce", *DIGITS, "--workers", "4")


def _total(state_bytes: dict) -> int:
    return state_bytes["parameters"] + state_bytes["gradients"] + state_bytes["optimizer"]


def test_zero_equals_allreduce_with_a_quarter_of_the_state(allreduce, tmp_path):
    reference, plain = allreduce
    model, results = train(tmp_path, "zero", *DIGITS, "--workers", "4", "--strategy", "zero")
    assert relative_difference(model, reference) <= 1e-5
    assert _total(results["state_bytes"]) <= _total(plain["state_bytes"]) / 3
    assert results["steps_redone"] == 0 and results["payload_bytes_sent"] > 0


def test_charlm_under_zero_equals_allreduce(tmp_path):
    charlm = ["--task", "charlm", "--steps", "6", "--seed", "0", "--quiet", "--workers", "2"]
    reference, _ = train(tmp_path, "allreduce", *charlm)
    model, _ = train(tmp_path, "zero", *charlm, "--strategy", "zero")
    assert relative_difference(model, reference) <= 1e-5


def test_a_crash_goes_back_to_the_last_checkpoint_and_changes_nothing(allreduce, tmp_path):
    """Worker 1's shards die with it at step 25: the others reload step 20's checkpoint,
    re-sharded over 3, and redo 5 steps; the result is still allreduce's."""
    reference, _ = allreduce
    log = tmp_path / "samples.jsonl"
    model, results = train(tmp_path, "killed", *DIGITS, "--workers", "4", "--strategy", "zero",
                           "--checkpoint-dir", str(tmp_path / "checkpoints"), "--checkpoint-every", "10",
                           "--kill", "1@25", "--sample-log", str(log))
    assert relative_difference(model, reference) <= 1e-5
    assert results["steps_redone"] == 5 and len(results["membership_changes"]) == 1
    size = len(TASKS["digits"](0).train_dataset())
    assert exactly_once_violations(log, dataset_size=size, steps=60) == []


def test_a_sharded_checkpoint_resumes_on_two_workers_and_exports(allreduce, tmp_path):
    from safetensors.torch import load_file

    reference, _ = allreduce
    checkpoints = tmp_path / "checkpoints"
    short = [*DIGITS[:2], "--steps", "40", *DIGITS[4:]]
    result = shoal("train", *short, "--workers", "4", "--strategy", "zero",
                   "--checkpoint-dir", str(checkpoints), "--checkpoint-every", "20")
    assert result.returncode == 0, result.stderr
    model, results = train(tmp_path, "resumed", *DIGITS, "--workers", "2", "--strategy", "zero",
                           "--resume", str(checkpoints))
    assert results["resumed"]["step"] == 40
    assert relative_difference(model, reference) <= 1e-5

    exported = tmp_path / "model.safetensors"
    result = shoal("export", str(checkpoints), "--out", str(exported))
    assert result.returncode == 0, result.stderr
    saved = torch.load(model, weights_only=True)
    loaded = load_file(exported)
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], v) for k, v in saved.items())

"""The library API in one plain process equals the ordinary PyTorch loop it replaces."""

from __future__ import annotations

import torch
import torch.distributed as dist

import shoal
from shoal.data import GlobalBatchSampler
from shoal.tasks import TASKS


def test_train_in_one_process_equals_a_plain_loop(monkeypatch):
    monkeypatch.delenv("SHOAL_COORDINATOR", raising=False)
    task = TASKS["digits"](seed=0)
    model = task.build_model()
    optimizer = task.build_optimizer(model, lr=0.05)
    result = shoal.train(model, optimizer, task.train_dataset(), task.loss,
                         global_batch_size=64, steps=30, seed=0)
    assert result.steps == 30 and result.is_leader and result.world_size == 1
    assert not dist.is_initialized()  # the job's group is gone when train() returns

    reference = task.build_model()
    reference_optimizer = task.build_optimizer(reference, lr=0.05)
    sampler = GlobalBatchSampler(len(task.train_dataset()), 64, seed=0)
    images, labels = task.train_dataset().tensors
    for step in range(30):
        indices = sampler.global_indices(step)
        reference_optimizer.zero_grad()
        (task.loss(reference, (images[indices], labels[indices])) / len(indices)).backward()
        reference_optimizer.step()
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=1e-5, atol=1e-6)


def test_train_refuses_bad_arguments():
    task = TASKS["quadratic"]()
    model = task.build_model()
    optimizer = task.build_optimizer(model, 0.1)
    for kwargs, message in [({"steps": 1, "epochs": 1}, "exactly one"),
                            ({"steps": 1, "strategy": "nope"}, "unknown strategy")]:
        try:
            shoal.train(model, optimizer, task.train_dataset(), task.loss, global_batch_size=8,
                        **kwargs)
        except ValueError as error:
            assert message in str(error)
        else:
            raise AssertionError("expected ValueError")


def test_a_script_checkpoints_and_resumes_through_the_api(monkeypatch, tmp_path):
    """What `shoal run` scripts use: train 20 steps with checkpoints, then a new process
    (here: a new model and optimizer) resumes and ends bit-identical to 30 steps in one go."""
    monkeypatch.delenv("SHOAL_COORDINATOR", raising=False)
    task = TASKS["digits"](seed=0)

    def run(steps, **kwargs):
        torch.manual_seed(0)
        model = task.build_model()
        optimizer = task.build_optimizer(model, lr=0.05)
        return shoal.train(model, optimizer, task.train_dataset(), task.loss, global_batch_size=64,
                           steps=steps, seed=0, task="digits", **kwargs)

    first = run(20, checkpoint=shoal.Checkpointing(directory=str(tmp_path), every=8))
    assert [c["step"] for c in first.checkpoints] == [8, 16, 20]
    resumed = run(30, resume=tmp_path)
    assert resumed.resumed_from == 20 and resumed.steps == 30
    whole = run(30)
    for name, value in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name
    try:
        run(30, resume=tmp_path, strategy="localsgd")
    except shoal.CheckpointError as error:
        assert "resume with --strategy allreduce" in str(error)
    else:
        raise AssertionError("expected CheckpointError")


def test_a_schedule_sets_the_rates_torch_schedulers_would(monkeypatch):
    """A linear warm-up then cosine decay, from the step number alone, equals torch's
    LinearLR then CosineAnnealingLR stepping alongside a plain loop."""
    monkeypatch.delenv("SHOAL_COORDINATOR", raising=False)
    task = TASKS["digits"](seed=0)
    model = task.build_model()
    optimizer = task.build_optimizer(model, lr=0.05)
    shoal.train(model, optimizer, task.train_dataset(), task.loss, global_batch_size=64, steps=30,
                seed=0, lr_schedule=shoal.LRSchedule("cosine", warmup_steps=5))

    reference = task.build_model()
    reference_optimizer = task.build_optimizer(reference, lr=0.05)
    schedulers = torch.optim.lr_scheduler
    scheduler = schedulers.SequentialLR(reference_optimizer, [
        schedulers.LinearLR(reference_optimizer, start_factor=1 / 5, end_factor=1.0, total_iters=4),
        schedulers.CosineAnnealingLR(reference_optimizer, T_max=25)], milestones=[5])
    sampler = GlobalBatchSampler(len(task.train_dataset()), 64, seed=0)
    images, labels = task.train_dataset().tensors
    rates = []
    for step in range(30):
        indices = sampler.global_indices(step)
        reference_optimizer.zero_grad()
        (task.loss(reference, (images[indices], labels[indices])) / len(indices)).backward()
        rates.append(reference_optimizer.param_groups[0]["lr"])
        reference_optimizer.step()
        scheduler.step()
    expected = [0.05 * shoal.LRSchedule("cosine", 5).factor(step, 30) for step in range(30)]
    torch.testing.assert_close(rates, expected)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=1e-5, atol=1e-6)


def test_a_schedule_that_gives_no_rate_stops_the_run(monkeypatch):
    monkeypatch.delenv("SHOAL_COORDINATOR", raising=False)
    task = TASKS["quadratic"]()
    model = task.build_model()
    optimizer = task.build_optimizer(model, 0.1)
    for schedule, message in [(lambda step: -1.0 if step == 3 else 1.0, "gave -1.0 for step 3"),
                              (shoal.LRSchedule("cosine", warmup_steps=10), "fewer than the run's 10")]:
        try:
            shoal.train(model, optimizer, task.train_dataset(), task.loss, global_batch_size=8,
                        steps=10, lr_schedule=schedule)
        except ValueError as error:
            assert message in str(error)
        else:
            raise AssertionError("expected ValueError")

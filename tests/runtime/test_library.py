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

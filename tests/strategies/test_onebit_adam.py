"""1-bit Adam's step in one process, the exchange an exact sum over one member: which weight
decay it applies, and a step whose collective fails. (Its sum over real members is tested in
test_strategies.py.)"""

from __future__ import annotations

import copy

import pytest
import torch

from shoal.strategies._onebit_adam import onebit_adam_step


def _train(make_optimizer, *, warmup: int = 3, steps: int = 5) -> torch.Tensor:
    """A least-squares fit: ``warmup`` steps of the optimizer itself, then 1-bit Adam's."""
    torch.manual_seed(0)
    inputs, targets = torch.randn(64, 8), torch.randn(64)
    weight = torch.nn.Parameter(torch.randn(8))
    optimizer = make_optimizer([weight])
    for step in range(warmup + steps):
        optimizer.zero_grad()
        ((inputs @ weight - targets) ** 2).mean().backward()
        if step < warmup:
            optimizer.step()
        else:
            onebit_adam_step(optimizer, lambda flat, parameters: flat, members=1, frozen_at=warmup)
    return weight.detach()


def test_adam_with_decoupled_weight_decay_decays_as_adamw_does():
    """torch's Adam(decoupled_weight_decay=True) is AdamW: 1-bit Adam must decay its
    parameters, not add the L2 term to the gradient as for plain Adam."""
    adamw = _train(lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.5))
    decoupled = _train(lambda p: torch.optim.Adam(p, lr=0.1, weight_decay=0.5, decoupled_weight_decay=True))
    coupled = _train(lambda p: torch.optim.Adam(p, lr=0.1, weight_decay=0.5))
    assert torch.equal(decoupled, adamw)
    assert not torch.allclose(coupled, adamw, rtol=1e-3)


def test_a_step_whose_exchange_fails_leaves_the_optimizer_as_it_was_for_the_redo():
    """A member dies during the momentum's exchange, after the step's refresh summed the
    gradients: the survivors redo the step, so nothing may have changed yet (the variance
    taking the refresh in twice would be the silent result)."""
    torch.manual_seed(0)
    inputs, targets = torch.randn(64, 8), torch.randn(64)
    weight = torch.nn.Parameter(torch.randn(8))
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        ((inputs @ weight - targets) ** 2).mean().backward()
        optimizer.step()
    ((inputs @ weight - targets) ** 2).mean().backward()
    before = copy.deepcopy((weight.detach(), optimizer.state_dict()))

    def dies(flat, parameters):
        raise RuntimeError("Connection closed by peer")  # what gloo raises

    with pytest.raises(RuntimeError, match="peer"):
        onebit_adam_step(optimizer, dies, members=1, frozen_at=6, refresh=lambda flat: flat, refresh_spans=3)
    assert torch.equal(weight.detach(), before[0])
    after = optimizer.state_dict()["state"][0]
    for name, value in before[1]["state"][0].items():
        assert torch.equal(after[name], value), name
    # The redo gives what one step from that state gives.
    onebit_adam_step(optimizer, lambda flat, parameters: flat, members=1, frozen_at=6,
                     refresh=lambda flat: flat, refresh_spans=3)
    fresh_weight = torch.nn.Parameter(before[0].clone())
    fresh = torch.optim.AdamW([fresh_weight], lr=0.1)
    fresh.load_state_dict(before[1])
    fresh_weight.grad = weight.grad.clone()
    onebit_adam_step(fresh, lambda flat, parameters: flat, members=1, frozen_at=6,
                     refresh=lambda flat: flat, refresh_spans=3)
    assert torch.equal(weight.detach(), fresh_weight.detach())
    assert torch.equal(optimizer.state[weight]["exp_avg_sq"], fresh.state[fresh_weight]["exp_avg_sq"])

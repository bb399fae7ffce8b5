"""1-bit Adam's step in one process, the exchange an exact sum over one member: which weight
decay it applies. (Its sum over real members is tested in test_strategies.py.)"""

from __future__ import annotations

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
